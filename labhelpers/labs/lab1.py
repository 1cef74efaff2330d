"""Lab 1's experiments: every PEFT method trained on the same data and measured, the adapter saved,
reloaded and merged, and which method fits which GPU."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import pandas as pd
import torch

from labhelpers.adapters import adapter_state_dict, save_adapters
from labhelpers.evaluation import evaluate_task
from labhelpers.memory import adam_state_bytes, nf4_bytes
from labhelpers.models import load_model
from labhelpers.peft_methods import get_method, prepare
from labhelpers.profiles import Profile
from labhelpers.tasks import load_split
from labhelpers.training import train_sft
from labhelpers.units import GiB, files_mib


def saved_size_mib(model, adapter_only: bool) -> float:
    """MiB on disk of what a method must ship: the adapter (peft or bottleneck) or the whole model."""

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
    from peft import PeftModel

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
    return pd.DataFrame({f"{size}B_gib": [estimate_training_gib(size * 1e9, rec["trainable_pct"] / 100,
                                                                get_method(rec["method"]).quantization)
                                          for rec in comparison.to_dict("records")]
                         for size in model_sizes_b}, index=comparison["method"]).round(1)
