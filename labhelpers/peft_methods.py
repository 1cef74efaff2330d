"""Fine-tuning methods looked up by name, so Lab 1 can compare them side by side.

Each :class:`Method` says how to load the base (full precision or 4-bit NF4), how to prepare it
(freeze, quantization-aware prep, adapters) and which ``peft`` config, learning rate and callbacks
:func:`labhelpers.training.train_sft` should use. A new method is one entry in ``METHODS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transformers import TrainerCallback

from labhelpers.profiles import Profile
from labhelpers.units import GiB, files_mib


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


def peft_config(method: str, profile: Profile, **overrides):
    """The ``peft`` config of ``method`` for ``profile`` (None for ``full`` and ``bottleneck``)."""
    entry = get_method(method)
    return entry.config(profile, **overrides) if entry.config else None


def prepare(method: str, profile: Profile, adapter_cls=None, bottleneck: int = 16, **overrides) -> dict:
    """Load the base for ``method`` and set it up; returns the keyword arguments of ``train_sft``
    (``model``, ``tokenizer``, ``peft_config``, ``learning_rate``)."""
    from labhelpers.adapters import add_adapters
    from labhelpers.models import load_model

    entry = get_method(method)
    if entry.needs_adapter_class and adapter_cls is None:
        raise ValueError(f"method {method!r} needs adapter_cls=<your bottleneck adapter class>")
    trains_base_weights = entry.config is None and not entry.needs_adapter_class
    if trains_base_weights and profile.dtype == "float16":
        # fp16 mixed precision needs fp32 master weights for the parameters it trains (the Trainer
        # refuses to unscale fp16 gradients); adapters are kept in fp32 by peft, full FT is not.
        profile = profile.with_(dtype="float32")
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
    from torch import nn

    names = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    names |= {name.split(".")[-1] for name, m in model.named_modules() if type(m).__name__.startswith("Linear")}
    missing = sorted(set(targets) - names)
    if missing:
        raise ValueError(f"target modules {missing} are not in the model; valid linear layers: {sorted(names)}")


def callbacks_for(peft_config) -> list[TrainerCallback]:
    """Training callbacks a peft config needs (AdaLoRA's rank allocator)."""
    from peft import AdaLoraConfig

    return [AdaLoraAllocator()] if isinstance(peft_config, AdaLoraConfig) else []


def saved_size_mib(model, adapter_only: bool) -> float:
    """MiB on disk of what a method must ship: the adapter (peft or bottleneck) or the whole model."""
    import tempfile
    from pathlib import Path

    from labhelpers.adapters import adapter_state_dict, save_adapters

    with tempfile.TemporaryDirectory() as tmp:
        if adapter_only and adapter_state_dict(model):
            save_adapters(model, Path(tmp) / "adapters.safetensors")
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        return files_mib(Path(tmp).rglob("*.safetensors"))


def compare_methods(methods: list[str], profile: Profile, task: str = "code", adapter_cls=None,
                    bottleneck: int = 16, keep: tuple[str, ...] = (), overrides: dict | None = None,
                    curves: bool = False):
    """Train every method on the same data with the same step budget and measure it.

    Returns a DataFrame, one row per method: trainable parameters (absolute and %), peak memory,
    seconds per step, final training loss, score on the test split and on the held-out slice (where
    the task has one), and the size of what must be saved. With ``keep``, also returns
    ``{method: (trained model, tokenizer)}`` for those methods: ``(df, kept)``. ``overrides`` go to
    every run's ``SFTConfig`` (e.g. ``{"optim": "adamw_bnb_8bit"}``); ``curves`` adds each run's loss
    curve (a DataFrame) in a ``loss_curve`` column.
    """
    import gc

    import pandas as pd

    from labhelpers.evaluation import evaluate_task
    from labhelpers.tasks import load_split
    from labhelpers.training import train_sft

    train = load_split(task, "train")
    rows, kept = [], {}
    for name in methods:
        setup = prepare(name, profile, adapter_cls=adapter_cls, bottleneck=bottleneck)
        tokenizer = setup["tokenizer"]
        result = train_sft(dataset=train, profile=profile, **setup, **(overrides or {}))
        row = {"method": name, **result.summary()}
        if curves:
            row["loss_curve"] = result.loss_curve
        for split in ("test", "heldout"):
            try:
                scored = evaluate_task(result.model, tokenizer, task, split, profile.n_eval, profile.eval_batch_size)
            except FileNotFoundError:
                continue  # only some tasks have a held-out slice
            row[f"score_{split}"] = float(scored["correct"].mean())
        row["saved_mib"] = saved_size_mib(result.model, adapter_only=name != "full")
        rows.append(row)
        if name in keep:
            kept[name] = (result.model, tokenizer)
        del result, setup
        gc.collect()
    df = pd.DataFrame(rows)
    return (df, kept) if keep else df


def estimate_training_gib(n_params: float, trainable_fraction: float, quantization: str | None) -> float:
    """Weights + gradients + optimizer states in GiB (activations are excluded: Lab 4 measures them).

    Frozen weights in 16 bits, or NF4 with double quantization (``quantization="nf4"``); trainable
    parameters in fp32 with an fp32 gradient and AdamW's two moments. The bytes come from Lab 4's
    estimator (:func:`labhelpers.memory.nf4_bytes`, :func:`labhelpers.memory.adam_state_bytes`), here
    for a model seen as one tensor of ``n_params`` values."""
    from labhelpers.memory import adam_state_bytes, nf4_bytes

    trainable = round(n_params * trainable_fraction)
    weights = nf4_bytes(round(n_params)) if quantization == "nf4" else 2 * n_params
    return (weights + 8 * trainable + adam_state_bytes([trainable], adam_8bit=False)) / GiB


def gpu_guidance(comparison, model_sizes_b=(0.5, 1.5, 7.0, 13.0), gpus_gib=(8, 12, 16, 24),
                 headroom: float = 0.7):
    """For each model size and GPU, the best measured method whose estimate fits.

    Uses each method's *measured* trainable fraction and test score from ``comparison`` (the output
    of :func:`compare_methods`) and its weight format; a method fits when weights + gradients +
    optimizer states take at most ``headroom`` of the GPU (the rest is left for activations).
    "best" = highest measured test score, then least memory.
    """
    import pandas as pd

    rows = []
    for size in model_sizes_b:
        row = {"model_params_b": size}
        for gpu in gpus_gib:
            fits = []
            for rec in comparison.to_dict("records"):
                need = estimate_training_gib(size * 1e9, rec["trainable_pct"] / 100, get_method(rec["method"]).quantization)
                if need <= headroom * gpu:
                    fits.append((-rec["score_test"], need, rec["method"]))
            row[f"{gpu}GB"] = f"{min(fits)[2]} ({min(fits)[1]:.1f} GiB)" if fits else "none fits"
        rows.append(row)
    return pd.DataFrame(rows)


def save_reload_merge(peft_model, profile: Profile, folder) -> dict:
    """Save a trained LoRA model's adapter (safetensors), reload it onto a fresh base, merge it with
    ``merge_and_unload`` and report the largest logit differences of each step (they should be ~0)."""
    from pathlib import Path

    import torch
    from peft import PeftModel

    from labhelpers.models import load_model

    folder = Path(folder)
    peft_model.save_pretrained(folder, safe_serialization=True)
    base, _ = load_model(profile)
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    generator = torch.Generator().manual_seed(profile.seed)
    ids = torch.randint(10, base.config.vocab_size, (4, 24), generator=generator).to(base.device)
    with torch.no_grad():
        trained = peft_model.eval()(input_ids=ids).logits
        after_reload = reloaded(input_ids=ids).logits
        merged = reloaded.merge_and_unload()
        after_merge = merged(input_ids=ids).logits
    return {"adapter_files": sorted(p.name for p in folder.iterdir()),
            "adapter_mib": files_mib(folder.glob("*.safetensors")),
            "reload_max_abs_diff": (after_reload - trained).abs().max().item(),
            "merge_max_abs_diff": (after_merge - trained).abs().max().item(),
            "merged_model": merged}


def memory_estimates(comparison, model_sizes_b=(0.5, 1.5, 7.0, 13.0)):
    """GiB of weights + gradients + optimizer states per method (rows) and model size (columns),
    from each method's measured trainable fraction and weight format."""
    import pandas as pd

    return pd.DataFrame({f"{size}B_gib": [estimate_training_gib(size * 1e9, rec["trainable_pct"] / 100,
                                                                get_method(rec["method"]).quantization)
                                          for rec in comparison.to_dict("records")]
                         for size in model_sizes_b}, index=comparison["method"]).round(1)
