"""Fine-tuning methods looked up by name, so Lab 1 can compare them side by side.

Each :class:`Method` says how to load the base (full precision or 4-bit NF4), how to prepare it
(freeze, quantization-aware prep, adapters) and which ``peft`` config, learning rate and callbacks
:func:`labhelpers.training.train_sft` should use. A new method is one entry in ``METHODS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from transformers import TrainerCallback

from labhelpers.adapters import add_adapters
from labhelpers.models import load_model
from labhelpers.profiles import Profile


def _lora(profile: Profile, **overrides):
    from peft import LoraConfig

    fields = dict(r=profile.lora_r, lora_alpha=profile.lora_alpha, lora_dropout=profile.lora_dropout,
                  target_modules=list(profile.target_modules), task_type="CAUSAL_LM")
    fields.update(overrides)
    if not isinstance(fields["r"], int) or fields["r"] <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {fields['r']!r}")
    if not isinstance(fields["lora_alpha"], (int, float)) or fields["lora_alpha"] <= 0:
        raise ValueError(f"lora_alpha must be positive (the update is scaled by alpha / r), got {fields['lora_alpha']!r}")
    if not 0 <= fields["lora_dropout"] < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {fields['lora_dropout']!r}")
    return LoraConfig(**fields)


def _dora(profile: Profile, **overrides):
    return _lora(profile, use_dora=True, **overrides)


def _adalora(profile: Profile, **overrides):
    from peft import AdaLoraConfig

    steps = overrides.pop("total_step", profile.max_steps)
    fields = dict(init_r=2 * profile.lora_r, target_r=profile.lora_r, lora_alpha=profile.lora_alpha,
                  target_modules=list(profile.target_modules), total_step=steps, tinit=steps // 10,
                  tfinal=steps // 5, deltaT=max(1, steps // 20), task_type="CAUSAL_LM")
    fields.update(overrides)
    return AdaLoraConfig(**fields)


def _ia3(profile: Profile, **overrides):
    from peft import IA3Config

    fields = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                  task_type="CAUSAL_LM")
    fields.update(overrides)
    return IA3Config(**fields)


class AdaLoraAllocator(TrainerCallback):
    """AdaLoRA re-allocates rank from gradient-based importance: ``update_and_allocate`` must run after
    every optimizer step, while gradients still exist (peft's documented training loop)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


@dataclass(frozen=True)
class Method:
    """How one fine-tuning method is set up.

    ``config``: ``(profile, **overrides) -> peft config`` (None: no peft wrapping).
    ``quantization``: how the base is loaded (``"nf4"`` for QLoRA).
    ``lr``: ``profile -> learning rate`` (full fine-tuning uses a smaller one).
    ``needs_adapter_class``: the bottleneck adapter is built from the student's class.
    """

    name: str
    description: str
    config: Callable[..., object] | None = None
    quantization: str | None = None
    lr: Callable[[Profile], float] = lambda p: p.learning_rate
    needs_adapter_class: bool = False


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", "all weights trained", None, lr=lambda p: p.full_ft_learning_rate),
    Method("lora", "low-rank update B·A on attention and MLP projections", _lora),
    Method("qlora", "LoRA on a 4-bit NF4 base with double quantization", _lora, quantization="nf4"),
    Method("dora", "LoRA with a learned magnitude per output (weight-decomposed)", _dora),
    Method("adalora", "LoRA whose rank budget is re-allocated by importance", _adalora),
    Method("ia3", "learned rescaling vectors on keys, values and MLP activations", _ia3,
           lr=lambda p: 10 * p.learning_rate),
    Method("bottleneck", "bottleneck adapters after every MLP (ours; peft has none)", None,
           needs_adapter_class=True),
)}


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name lists the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown PEFT method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


TRAINING_OPTIONS = ("gc", "8bit")  # gradient checkpointing, 8-bit AdamW: "qlora+gc+8bit"


@dataclass(frozen=True)
class TrainingMethod:
    """How a run trains, in one record: the PEFT method ``base`` (its weight format, ``peft`` config,
    learning rate and callbacks: :data:`METHODS`), gradient checkpointing and 8-bit AdamW. Written
    ``"qlora+gc+8bit"`` (:func:`parse_method`)."""

    base: str
    gradient_checkpointing: bool = False
    adam_8bit: bool = False

    @property
    def label(self) -> str:
        return self.base + ("+gc" if self.gradient_checkpointing else "") + ("+8bit" if self.adam_8bit else "")

    @property
    def peft(self) -> Method:
        return get_method(self.base)

    @property
    def optimizer(self) -> str:
        """The ``transformers`` ``optim`` name: bitsandbytes' 8-bit AdamW with ``+8bit``."""
        return "adamw_bnb_8bit" if self.adam_8bit else "adamw_torch"


def parse_method(method: "str | TrainingMethod", bases: tuple[str, ...] | None = None) -> TrainingMethod:
    """``"qlora+gc+8bit"`` -> ``TrainingMethod("qlora", True, True)``; ``bases`` limits the PEFT
    methods accepted (default: every one in :data:`METHODS`). Unknown parts raise ValueError."""
    bases = bases or tuple(METHODS)
    if isinstance(method, TrainingMethod):
        parts = method
    elif not isinstance(method, str) or not method:
        raise ValueError(f"method must be a string like 'lora' or 'qlora+gc+8bit', got {method!r}")
    else:
        base, *options = method.lower().split("+")
        if any(o not in TRAINING_OPTIONS for o in options):
            base = ""  # reported below
        parts = TrainingMethod(base, "gc" in options, "8bit" in options)
    if parts.base not in bases:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(bases)}, optionally with "
                         f"'+gc' (gradient checkpointing) and/or '+8bit' (8-bit AdamW), e.g. 'qlora+gc+8bit'")
    return parts


def method_of(peft_config) -> Method:
    """The method a ``peft`` config (or None: full fine-tuning) belongs to."""
    if peft_config is None:
        return METHODS["full"]
    peft_type = str(getattr(peft_config.peft_type, "value", peft_config.peft_type)).lower()
    if peft_type == "lora" and getattr(peft_config, "use_dora", False):
        return METHODS["dora"]
    return METHODS.get(peft_type, METHODS["lora"])


def default_learning_rate(peft_config, profile: Profile) -> float:
    """The one learning-rate policy: each method's ``lr`` (full fine-tuning the profile's
    ``full_ft_learning_rate``, adapters its ``learning_rate``, IA3 ten times that)."""
    return method_of(peft_config).lr(profile)


def peft_config(method: str, profile: Profile, **overrides):
    """The ``peft`` config of ``method`` for ``profile`` (None for ``full`` and ``bottleneck``)."""
    entry = get_method(method)
    return entry.config(profile, **overrides) if entry.config else None


# the fields of each peft config that set what trains (the rest are defaults that do not change the method)
_SHOWN_FIELDS = {"LoraConfig": ("r", "lora_alpha", "lora_dropout", "use_dora", "target_modules"),
                 "AdaLoraConfig": ("init_r", "target_r", "lora_alpha", "tinit", "tfinal", "deltaT", "total_step",
                                   "target_modules"),
                 "IA3Config": ("target_modules", "feedforward_modules")}


def _config_text(config) -> str:
    kind = type(config).__name__
    shown = []
    for field in _SHOWN_FIELDS.get(kind, ()):
        value = getattr(config, field)
        if field == "use_dora" and not value:
            continue
        shown.append(f"{field}={sorted(value) if isinstance(value, (set, frozenset)) else value!r}")
    return f"{kind}({', '.join(shown)})"


def describe_methods(names, profile: Profile, bottleneck: int = 16) -> "pd.DataFrame":
    """What each method trains with in ``profile``: how the base is stored, the ``peft`` config that
    :func:`prepare` builds (its fields that matter), and the learning rate: one row per method."""
    import pandas as pd

    rows = []
    for name in names:
        entry, config = get_method(name), peft_config(name, profile)
        if config is not None:
            setup = _config_text(config)
        elif entry.needs_adapter_class:
            setup = f"add_adapters(model, your BottleneckAdapter, bottleneck={bottleneck}): after every MLP"
        else:
            setup = "no peft config: every weight trains"
        base = (f"NF4 + double quantization, compute in {profile.dtype}" if entry.quantization == "nf4"
                else f"{profile.dtype}" + (", frozen" if name != "full" else ""))
        rows.append({"method": name, "base weights": base, "setup": setup, "learning rate": entry.lr(profile)})
    return pd.DataFrame(rows).set_index("method")


def prepare(method: str, profile: Profile, adapter_cls=None, bottleneck: int = 16, **overrides) -> dict:
    """Load the base for ``method`` and set it up; returns the keyword arguments of ``train_sft``
    (``model``, ``tokenizer``, ``peft_config``, ``learning_rate``)."""
    entry = get_method(method)
    if entry.needs_adapter_class and adapter_cls is None:
        raise ValueError(f"method {method!r} needs adapter_cls=<your bottleneck adapter class>")
    model, tokenizer = load_model(profile, quantization=entry.quantization)
    if entry.quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=profile.gradient_checkpointing)
    if entry.needs_adapter_class:
        add_adapters(model, adapter_cls, bottleneck)
    config = peft_config(method, profile, **overrides)
    if config is not None:
        check_target_modules(model, config.target_modules)
    return {"model": model, "tokenizer": tokenizer, "peft_config": config, "learning_rate": entry.lr(profile)}


def check_target_modules(model, targets) -> None:
    """Raise ValueError naming the targets that match no ``nn.Linear`` of ``model``, and the valid names."""
    names = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    names |= {name.split(".")[-1] for name, m in model.named_modules() if type(m).__name__.startswith("Linear")}
    missing = sorted(set(targets) - names)
    if missing:
        raise ValueError(f"target modules {missing} are not in the model; valid linear layers: {sorted(names)}")


def callbacks_for(peft_config) -> list[TrainerCallback]:
    """Training callbacks a peft config needs (AdaLoRA's rank allocator)."""
    from peft import AdaLoraConfig

    return [AdaLoraAllocator()] if isinstance(peft_config, AdaLoraConfig) else []
