"""Lab 1's experiments: every PEFT method trained on the same data and measured, the adapter saved,
reloaded and merged, and which method fits which GPU."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from labhelpers.adapters import adapter_state_dict, save_adapters
from labhelpers.evaluation import SELECTION_SPLIT, distinguishable, evaluate, mean_over_seeds, select_best
from labhelpers.memory import plan_grid
from labhelpers.models import load_model, quantization_config
from labhelpers.peft_methods import get_method, peft_config, prepare
from labhelpers.profiles import Profile
from labhelpers.tasks import load_splits
from labhelpers.quantization import CheckReport
from labhelpers.training import RECIPE_FIELDS, sft_config, train_sft
from labhelpers.units import files_mib


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
                    curves: bool = False, seeds: int = 1, splits=(SELECTION_SPLIT, "test", "heldout"),
                    latency: bool = False, train_splits: tuple[str, ...] = ("train",)):
    """Train every method on the same data with the same step budget and measure it.

    Returns a DataFrame, one row per method: trainable parameters (absolute and %), peak memory,
    seconds per step, final training loss, score on the validation split (what a choice between the
    methods may read, :func:`gpu_guidance`), on the test split and on the held-out slice (where the
    task has one), the size of what must be saved and, with ``latency``, the latency of a forward pass
    with the method's adapters in place (``forward_ms``, :func:`forward_ms`). With ``keep``, also returns
    ``{method: (trained model, tokenizer)}`` for those methods: ``(df, kept)``. ``overrides`` go to
    every run's ``SFTConfig`` (e.g. ``{"optim": "adamw_bnb_8bit"}``); ``curves`` adds each run's loss
    curve (a DataFrame) in a ``loss_curve`` column; ``splits`` are the splits scored, ``train_splits``
    the splits trained on (:func:`labhelpers.tasks.load_splits`: one named twice counts twice).

    With ``seeds`` > 1 each method trains once per seed (``profile.seed``, ``profile.seed + 1``, ...:
    the data order and the adapters' initialisation change) and its row holds the mean over the
    seeds, a ``<score> seed sd`` column (standard deviation across seeds) after each score, and the
    first seed's loss curve and kept model. ``seeds`` is always a column.
    """
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer (how many times each method trains), got {seeds!r}")
    train = load_splits(task, train_splits)
    rows, kept = [], {}
    for name in methods:
        per_seed = []
        for i in range(seeds):
            run_profile = profile.with_(seed=profile.seed + i)
            setup = prepare(name, run_profile, adapter_cls=adapter_cls, bottleneck=bottleneck)
            tokenizer = setup["tokenizer"]
            result = train_sft(dataset=train, profile=run_profile, **setup, **(overrides or {}))
            row = {"method": name, **result.summary()}
            if curves:
                row["loss_curve"] = result.loss_curve
            for split in splits:
                try:
                    scored = evaluate(result.model, tokenizer, task, run_profile, split)
                except FileNotFoundError:
                    continue  # only some tasks have a held-out slice
                row[f"score_{split}"] = float(scored["correct"].mean())
            row["saved_mib"] = saved_size_mib(result.model, adapter_only=name != "full")
            if latency:
                row["forward_ms"] = forward_ms(result.model, inference_batch(result.model, run_profile))
            per_seed.append(row)
            if name in keep and i == 0:
                kept[name] = (result.model, tokenizer)
            del result, setup
            gc.collect()
        rows.append(mean_over_seeds(per_seed))
    df = pd.DataFrame(rows)
    return (df, kept) if keep else df


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def rank_target_ablation(profile: Profile, ranks=(1, 8), target_sets: dict | None = None,
                         task: str = "code", examples: int = 264) -> pd.DataFrame:
    """LoRA at every rank x set of target modules, each run trained on about ``examples`` examples (the
    same short budget in every profile, where the knobs still show: a larger one brings every setting
    of the small model to the ceiling; never more than the profile's ``max_steps``) with ``alpha / r`` held at the profile's ratio (so the rank
    changes capacity, not the update's scale).

    ``target_sets``: ``{label: module names}``, by default the attention projections alone and the
    profile's targets (attention and MLP). One row per run: ``targets``, ``rank``, trainable
    parameters (%), ``score_validation`` (for choosing), ``score_test`` and ``split`` (``validation``,
    what :func:`labhelpers.evaluation.select_best` reads).
    """
    target_sets = target_sets or {"attention": ATTENTION_PROJECTIONS, "attention + MLP": tuple(profile.target_modules)}
    steps = min(profile.max_steps, max(2, examples // (profile.batch_size * profile.gradient_accumulation_steps)))
    rows = []
    for label, targets in target_sets.items():
        for r in ranks:
            run = profile.with_(lora_r=r, lora_alpha=profile.lora_alpha / profile.lora_r * r,
                                target_modules=tuple(targets), max_steps=steps)
            result = compare_methods(["lora"], run, task=task, splits=(SELECTION_SPLIT, "test")).iloc[0]
            rows.append({"targets": label, "rank": r, "trainable_pct": result["trainable_pct"],
                         "score_validation": result[f"score_{SELECTION_SPLIT}"], "score_test": result["score_test"],
                         "split": SELECTION_SPLIT})
    return pd.DataFrame(rows)


def memory_method(peft_method: str, checkpointing: bool = True) -> str:
    """The method Lab 4's estimator knows that has ``peft_method``'s memory: ``full``; ``qlora`` for a
    4-bit base; ``lora`` for every adapter method on a 16-bit base (their adapters, a few percent of
    the parameters or less, are small next to the frozen weights and the activations). With
    ``checkpointing`` (``+gc``), as these methods are trained on a consumer GPU: without it QLoRA's
    fp32 residual stream costs more than its 4-bit weights save (:func:`memory.estimate_training_step`)."""
    method = get_method(peft_method)
    base = "full" if method.name == "full" else "qlora" if method.quantization == "nf4" else "lora"
    return base + ("+gc" if checkpointing else "")


def memory_estimates(comparison, sizes=("1B", "3B", "7B", "13B"), seq_len: int = 1024) -> pd.DataFrame:
    """Estimated peak GB of one training step (batch 1, ``seq_len`` tokens, bf16, gradient checkpointing,
    plus the CUDA context) per method (rows) and model size (columns), from Lab 4's estimator (:func:`memory.plan`)
    on the real architectures of those sizes."""
    grid = _plan(comparison, sizes, (80,), seq_len)
    return pd.DataFrame({f"{size} (GB)": [grid[(size, memory_method(m))]["peak (GB)"] for m in comparison["method"]]
                         for size in sizes}, index=comparison["method"]).round(1)


# (use case, column of the comparison, lower is better, what the column measures)
USE_CASES = (
    ("the best answers", f"score_{SELECTION_SPLIT}", False, f"pass@1 ({SELECTION_SPLIT})"),
    ("training on the smallest GPU", "7B (GB)", True, "estimated training peak of a 7B model (GB)"),
    ("the fastest training", "sec_per_step", True, "seconds per training step (measured)"),
    ("the fewest trained parameters", "trainable_pct", True, "trainable parameters (%)"),
    ("one small file per task", "saved_mib", True, "saved size (MiB)"),
    ("serving without merging", "forward_ms", True, "forward pass with the adapter in place (ms)"),
)


def decision_table(comparison: pd.DataFrame, n_validation: int, estimates: pd.DataFrame | None = None) -> pd.DataFrame:
    """Which method for which use case, decided from the measured trade-offs.

    Quality comes first: the candidates are the methods whose validation pass@1 is not below the best
    one's beyond the 95% intervals (:func:`labhelpers.evaluation.distinguishable`, ``n_validation``
    examples); among them each use case takes the best value of its own measure (:data:`USE_CASES`;
    ``estimates``, from :func:`memory_estimates`, supplies the 7B column). The test split is not read.
    """
    table = comparison.set_index("method")
    if estimates is not None:
        table = table.join(estimates)
    scores = table[f"score_{SELECTION_SPLIT}"]
    best = scores.max()
    candidates = [m for m in table.index
                  if not (scores[m] < best and distinguishable(scores[m], best, n_validation, n_validation))]
    rows = []
    for use, column, lower, measure in USE_CASES:
        if column not in table.columns:
            continue
        pool = table.loc[candidates, column].sort_values(ascending=lower, kind="stable")
        rows.append({"for": use, "measured by": measure, "method": pool.index[0], "value": float(pool.iloc[0]),
                     "next best": pool.index[1] if len(pool) > 1 else "", f"pass@1 ({SELECTION_SPLIT})": scores[pool.index[0]],
                     "candidates": ", ".join(candidates)})
    return pd.DataFrame(rows)


def gpu_guidance(comparison, sizes=("1B", "3B", "7B", "13B"), gpus_gb=(8, 12, 16, 24), seq_len: int = 1024):
    """For each model size and GPU, the best measured method whose estimated peak fits.

    Scores come from ``comparison`` (the output of :func:`compare_methods`); memory from
    :func:`memory.plan_grid` (a method fits when its peak plus the CUDA context is at most 90% of the
    GPU). "best" = highest score on the validation split, then least memory
    (:func:`labhelpers.evaluation.select_best`: the test split is not read).
    """
    grid = _plan(comparison, sizes, gpus_gb, seq_len)
    scored = pd.DataFrame({"method": comparison["method"], "planned": comparison["method"].map(memory_method),
                           "score": comparison[f"score_{SELECTION_SPLIT}"], "split": SELECTION_SPLIT})
    rows = []
    for size in sizes:
        row = {"model": size}
        for gpu in gpus_gb:
            plans = [grid[(size, planned)] for planned in scored["planned"]]
            fits = scored.assign(peak=[plan["peak (GB)"] for plan in plans])[[plan[f"fits {gpu} GB"] for plan in plans]]
            best = select_best(fits, "score", tie_breakers=[("peak", True)]) if len(fits) else None
            row[f"{gpu} GB"] = "none fits" if best is None else f"{best['method'].iloc[0]} ({best['peak'].iloc[0]:.1f} GB)"
        rows.append(row)
    return pd.DataFrame(rows)


def _plan(comparison, sizes, gpus_gb, seq_len: int) -> dict:
    methods = sorted({memory_method(m) for m in comparison["method"]})
    table = plan_grid(sizes=sizes, gpus=gpus_gb, methods=methods, seq_len=seq_len)
    return {(rec["size"], rec["method"]): rec for rec in table.to_dict("records")}


def inference_batch(model, profile: Profile, batch_size: int = 4, seq_len: int = 64) -> torch.Tensor:
    """Random token ids, ``batch_size`` x ``seq_len``, on the model's device: what :func:`forward_ms`
    times (small, so that a 150k-token vocabulary's logits stay cheap on a CPU)."""
    generator = torch.Generator().manual_seed(profile.seed)
    shape = (batch_size, seq_len)
    return torch.randint(10, model.config.vocab_size, shape, generator=generator).to(model.device)


def forward_ms(model, input_ids, repeats: int = 7, budget_s: float = 2.0, min_repeats: int = 3) -> float:
    """Median wall time of one forward pass over ``input_ids``, in milliseconds, over ``repeats`` timed
    passes after two warm-up passes (on CUDA each pass is synchronized). Timing stops early, after at
    least ``min_repeats`` passes, once the timed passes took ``budget_s``: a pass of milliseconds gets
    every repeat, while one of most of a second (a 151,936-token head in fp16 on a CPU, the rehearsal of
    ``t4``) does not take ten seconds to time."""
    import time

    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            if input_ids.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=input_ids)
            if input_ids.is_cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append(1000 * (time.perf_counter() - start))
                if len(times) >= min_repeats and sum(times) >= 1000 * budget_s:
                    break
    return float(np.median(times))


def save_reload_merge(peft_model, profile: Profile, folder) -> dict:
    """Save a trained LoRA model's adapter (safetensors), reload it onto a fresh base, merge it with
    ``merge_and_unload`` and report the largest logit differences of each step (they should be ~0),
    and the latency of a forward pass (:func:`forward_ms` on :func:`inference_batch`) with the adapter
    unmerged and merged."""
    from peft import PeftModel

    folder = Path(folder)
    peft_model.save_pretrained(folder, safe_serialization=True)
    base, _ = load_model(profile)
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    generator = torch.Generator().manual_seed(profile.seed)
    ids = torch.randint(10, base.config.vocab_size, (4, 24), generator=generator).to(base.device)
    timed = inference_batch(base, profile)
    with torch.no_grad():
        trained = peft_model.eval()(input_ids=ids).logits
        after_reload = reloaded(input_ids=ids).logits
        unmerged_ms = forward_ms(reloaded, timed)
        merged = reloaded.merge_and_unload()
        after_merge = merged(input_ids=ids).logits
        merged_ms = forward_ms(merged, timed)
    return {"adapter_files": sorted(p.name for p in folder.iterdir()),
            "adapter_mib": files_mib(folder.glob("*.safetensors")),
            "reload_max_abs_diff": (after_reload - trained).abs().max().item(),
            "merge_max_abs_diff": (after_merge - trained).abs().max().item(),
            "unmerged_forward_ms": unmerged_ms, "merged_forward_ms": merged_ms,
            "merged_model": merged}


QLORA_BNB_FIELDS = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
QLORA_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type")
QLORA_SFT_FIELDS = ("max_steps", *(f for f in RECIPE_FIELDS if f not in ("optim", "weight_decay", "neftune_noise_alpha")))


def check_qlora_setup(bnb_config, lora_config, sft_args, profile: Profile) -> CheckReport:
    """The graded check of a QLoRA setup: the ``BitsAndBytesConfig``, ``LoraConfig`` and ``SFTConfig``
    a student built must hold what QLoRA and the profile call for, field by field (NF4 with double
    quantization and the profile's compute dtype; the profile's rank, alpha, dropout and target
    modules; its steps, learning rate, batch, accumulation, length, precision and checkpointing, with the
    loss on the assistant's tokens only). Compared with the course's own configs for the profile."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    failures = []
    for obj, cls in ((bnb_config, BitsAndBytesConfig), (lora_config, LoraConfig), (sft_args, SFTConfig)):
        if not isinstance(obj, cls):
            failures.append(f"expected {cls.__name__}, got {type(obj).__name__}")
    if failures:
        return CheckReport(False, 3, failures)
    with tempfile.TemporaryDirectory() as out:
        expected = ((bnb_config, quantization_config("nf4", getattr(torch, profile.dtype)), QLORA_BNB_FIELDS),
                    (lora_config, peft_config("qlora", profile), QLORA_LORA_FIELDS),
                    (sft_args, sft_config(profile, "chat", out), QLORA_SFT_FIELDS))
    cases = 0
    for ours, reference, fields in expected:
        for name in fields:
            cases += 1
            got, want = getattr(ours, name, None), getattr(reference, name)
            if name == "target_modules":
                got, want = set(got or ()), set(want)
            if got != want:
                failures.append(f"{type(ours).__name__}.{name}: expected {want!r}, got {got!r}")
    return CheckReport(not failures, cases, failures)
