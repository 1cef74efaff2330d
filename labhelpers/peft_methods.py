"""PEFT methods looked up by name: one registry entry per method, configured from a profile.

``peft_config("lora", profile)`` returns the ``peft`` config that :func:`labhelpers.training.train_sft`
wraps the model with; ``"full"`` means full fine-tuning (no config). Lab 1 compares them side by side.
"""

from __future__ import annotations

from typing import Callable

from labhelpers.profiles import Profile


def _lora(profile: Profile, **overrides):
    from peft import LoraConfig

    fields = dict(r=profile.lora_r, lora_alpha=profile.lora_alpha, lora_dropout=profile.lora_dropout,
                  target_modules=list(profile.target_modules), task_type="CAUSAL_LM")
    fields.update(overrides)
    if fields["r"] <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {fields['r']}")
    return LoraConfig(**fields)


def _dora(profile: Profile, **overrides):
    return _lora(profile, use_dora=True, **overrides)


def _ia3(profile: Profile, **overrides):
    from peft import IA3Config

    fields = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                  task_type="CAUSAL_LM")
    fields.update(overrides)
    return IA3Config(**fields)


METHODS: dict[str, Callable[..., object]] = {
    "full": lambda profile, **overrides: None,
    "lora": _lora,
    "dora": _dora,
    "ia3": _ia3,
}


def peft_config(method: str, profile: Profile, **overrides):
    """The ``peft`` config of ``method`` for ``profile`` (None for ``full``); unknown names list the valid ones."""
    if method not in METHODS:
        raise ValueError(f"unknown PEFT method {method!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[method](profile, **overrides)
