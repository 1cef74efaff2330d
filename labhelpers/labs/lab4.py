"""Lab 4's experiments: measured memory of training steps next to the estimate, checkpointing,
optimizers, accumulation and mixed precision, and the methods compared end to end."""

from __future__ import annotations

import gc
import importlib
import warnings

import pandas as pd
from tqdm.auto import tqdm

from labhelpers.memory import (
    CUDA_CONTEXT_GB,
    Architecture,
    StepMemory,
    estimate_for_profile,
    hub_architecture,
    make_batch,
    measure_training_step,
    profile_architecture,
)
from labhelpers.labs.lab1 import compare_methods
from labhelpers.peft_methods import TrainingMethod, parse_method, prepare
from labhelpers.profiles import get
from labhelpers.training import keep_trainable_fp32
from labhelpers.units import MiB


HEADROOM = 0.9  # as the planner: a step fits when its peak plus the CUDA context is within 90% of the GPU


BATCH_KEYS = {"breakdown": "batch_sizes", "accumulation": "effective_batch"}  # the others: "batch_size"


def grid_sizes(profile, arch: Architecture | None = None) -> dict[str, dict]:
    """Every batch size and sequence length Lab 4 measures, derived from the profile's batch size ``b``
    and maximum length ``s`` (in ``ci``, b=8 and s=160: batches 2 and 8, lengths 64 to 512).

    On a profile sized for a GPU (``device_memory_gib``), each experiment's batch is then halved until
    the estimated peak of its largest step (full fine-tuning, no checkpointing: the lab's most
    memory-hungry method) fits that GPU with the planner's headroom (:func:`step_fits`); lengths that
    do not fit even at batch 1 are dropped.
    """
    b, s = profile.batch_size, profile.max_seq_length
    at = lambda fifths: max(8, s * fifths // 5)  # noqa: E731 - lengths in fifths of the maximum
    sizes = {"breakdown": {"batch_sizes": (max(1, b // 4), b), "seq_lens": (at(2), s)},
             "activations": {"batch_size": max(1, b // 2), "seq_len": at(8)},
             "checkpointing": {"batch_size": max(1, b // 2), "seq_lens": (at(2), at(4), at(8), at(16))},
             "optimizers": {"batch_size": max(1, b // 2), "seq_len": at(4)},
             "accumulation": {"effective_batch": 2 * b, "seq_len": at(4)},
             "methods": {"batch_size": b, "seq_len": s}}
    if profile.device_memory_gib is not None:
        arch = arch or profile_architecture(profile)
        for name, grid in sizes.items():
            key = BATCH_KEYS.get(name, "batch_size")
            longest = max(grid.get("seq_lens", (grid.get("seq_len", 0),)))
            largest = max(grid[key]) if isinstance(grid[key], tuple) else grid[key]
            fitted = largest
            while fitted > 1 and not step_fits(profile, "full", fitted, longest, arch):
                fitted //= 2
            grid[key] = tuple(sorted({max(1, x * fitted // largest) for x in grid[key]})) \
                if isinstance(grid[key], tuple) else fitted
            if "seq_lens" in grid:  # at batch 1 and still too long: the longest lengths go
                fitting = tuple(n for n in grid["seq_lens"] if step_fits(profile, "full", fitted, n, arch))
                grid["seq_lens"] = fitting or grid["seq_lens"][:1]
    e = sizes["accumulation"]["effective_batch"]
    sizes["accumulation"]["micro_batches"] = tuple(sorted({e, max(1, e // 2), max(1, e // 4), max(1, e // 8)},
                                                          reverse=True))
    return sizes


def step_fits(profile, method: str, batch_size: int, seq_len: int, arch: Architecture | None = None) -> bool:
    """Whether one training step's estimated peak (plus the CUDA context) is within the planner's
    headroom of the profile's GPU (``device_memory_gib``; always True for a profile without one)."""
    if profile.device_memory_gib is None:
        return True
    return _peak_gb(profile, method, batch_size, seq_len, arch) <= HEADROOM * profile.device_memory_gib * 2**30 / 1e9


def _peak_gb(profile, method, batch_size, seq_len, arch=None) -> float:
    return estimate_for_profile(profile, method, batch_size, seq_len, arch, device="cuda").peak / 1e9 + CUDA_CONTEXT_GB


def lab_plan(profile) -> pd.DataFrame:
    """The largest training step of every lab in ``profile``, on the real architectures of its models
    (:func:`memory.hub_architecture`, not the rehearsal stand-ins): estimated peak GB and whether it
    fits the profile's GPU. Labs 1-3 train at the profile's batch and length (Lab 1 every method;
    Lab 2 full fine-tuning of the base; Lab 2b a LoRA run of each of ``sweep_models``; Lab 3 full fine-tuning
    of the experts; Lab 1 also QLoRA on ``large_model``); Lab 4's grids are :func:`grid_sizes`."""
    b, s, gc_suffix = profile.batch_size, profile.max_seq_length, "+gc" if profile.gradient_checkpointing else ""
    base = hub_architecture(profile.base_model)
    steps = [("lab1_peft", "every method (full is the largest)", base, "full" + gc_suffix, b, s),
             ("lab1_peft", "QLoRA on the large model", hub_architecture(profile.large_model), "qlora" + gc_suffix, b, s),
             ("lab2_domain", "full fine-tuning of the base", base, "full" + gc_suffix, b, s),
             *[("lab2b_hyperparameters", "LoRA search (one trial)", hub_architecture(m), "lora" + gc_suffix, b, s)
               for m in profile.sweep_models],
             ("lab3_merging", "full fine-tuning of each expert", base, "full" + gc_suffix, b, s)]
    sizes = grid_sizes(profile, base)
    steps += [("lab4_memory", "breakdown grid", base, "full", max(sizes["breakdown"]["batch_sizes"]),
               max(sizes["breakdown"]["seq_lens"])),
              ("lab4_memory", "activations with and without checkpointing", base, "full",
               sizes["activations"]["batch_size"], sizes["activations"]["seq_len"]),
              ("lab4_memory", "checkpointing sweep", base, "full", sizes["checkpointing"]["batch_size"],
               max(sizes["checkpointing"]["seq_lens"])),
              ("lab4_memory", "optimizers", base, "full", sizes["optimizers"]["batch_size"], sizes["optimizers"]["seq_len"]),
              ("lab4_memory", "accumulation", base, "full", max(sizes["accumulation"]["micro_batches"]),
               sizes["accumulation"]["seq_len"]),
              ("lab4_memory", "methods compared (one full-length step)", base, "full", sizes["methods"]["batch_size"],
               sizes["methods"]["seq_len"])]
    gpu_gb = None if profile.device_memory_gib is None else profile.device_memory_gib * 2**30 / 1e9
    rows = []
    for lab, step, arch, method, batch, seq in steps:
        peak = _peak_gb(profile, method, batch, seq, arch)
        rows.append({"lab": lab, "step": step, "model": arch.name, "method": method, "batch": batch, "seq_len": seq,
                     "estimated peak (GB)": round(peak, 2), "GPU (GB)": gpu_gb and round(gpu_gb, 1),
                     "fits": gpu_gb is None or peak <= HEADROOM * gpu_gb})
    return pd.DataFrame(rows)


def step_precision(profile) -> str | None:
    """The ``autocast`` dtype of the profile's training runs (what ``SFTConfig(fp16=True)`` or
    ``bf16=True`` switches on: matrix products in 16 bits, trained weights in their own dtype); None in
    fp32. Pass it to :func:`labhelpers.memory.measure_training_step` to measure the step a run takes."""
    return None if profile.dtype == "float32" else profile.dtype


def setup_training(method: "str | TrainingMethod", profile, lora_r: int | None = None, learning_rate: float = 1e-4):
    """(model, optimizer) ready to train with ``method`` on the profile's base model.

    ``full`` trains every weight; ``lora`` adds LoRA (the profile's targets, rank ``lora_r`` or the
    profile's) to the frozen base; ``qlora`` loads the base in NF4 with double quantization first.
    ``+gc`` turns on gradient checkpointing, ``+8bit`` uses bitsandbytes' 8-bit AdamW. The trained
    weights follow the training runs' dtype policy (:func:`labhelpers.training.keep_trainable_fp32`);
    measure its steps under :func:`step_precision`.
    """
    from peft import get_peft_model

    m = parse_method(method)
    setup = prepare(m.base, profile.with_(gradient_checkpointing=m.gradient_checkpointing),
                    **({"r": lora_r} if lora_r and m.base != "full" else {}))
    model = setup["model"]
    if setup["peft_config"] is not None:
        model = get_peft_model(model, setup["peft_config"])
    if m.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if m.base != "full":
            model.enable_input_require_grads()  # as prepare_model_for_kbit_training does for QLoRA
    keep_trainable_fp32(model, profile)  # fp16 profiles: fp32 master weights, as every training run has
    optimizer = make_optimizer(m.optimizer,
                               (p for p in model.parameters() if p.requires_grad), lr=learning_rate)
    return model, optimizer


def _rows(method, measured: StepMemory, estimated: StepMemory | None, **keys) -> dict:
    row = {**keys, "method": parse_method(method).label}
    row.update({f"measured {k}": v for k, v in measured.mib().items()})
    if estimated is not None:
        row.update({f"estimated {k}": v for k, v in estimated.mib().items()})
        row["total error (%)"] = 100 * (estimated.total - measured.total) / measured.total
        row["peak error (%)"] = 100 * (estimated.peak - measured.peak) / measured.peak
    row["seconds per step"] = measured.details["seconds"]
    return row


def measured_vs_estimated(profile, methods=("full", "lora", "qlora", "qlora+gc+8bit")) -> pd.DataFrame:
    """One training step of each method at the profile's batch size and maximum length, measured next
    to :func:`memory.estimate_training_step`: peaks and totals (MiB), their ratio, seconds per step and
    tokens per second (the batch has no padding)."""
    arch = profile_architecture(profile)
    batch = make_batch(arch.vocab, profile.batch_size, profile.max_seq_length, device=profile.device)
    rows = []
    for method in methods:
        model, optimizer = setup_training(method, profile)
        measured = measure_training_step(model, batch, optimizer, autocast_dtype=step_precision(profile))
        estimated = estimate_for_profile(profile, method)
        rows.append({"method": parse_method(method).label, "measured_peak_mib": measured.peak / MiB,
                     "estimated_peak_mib": estimated.peak / MiB, "estimate_over_measured": estimated.peak / measured.peak,
                     "measured_total_mib": measured.total / MiB, "estimated_total_mib": estimated.total / MiB,
                     "seconds_per_step": measured.details["seconds"],
                     "tokens_per_sec": batch["input_ids"].numel() / measured.details["seconds"]})
        del model, optimizer
    return pd.DataFrame(rows)


def memory_split(profile, methods=("full", "lora", "qlora"), reference: str = "t4") -> pd.DataFrame:
    """Where one training step's memory goes, by part: measured here on the profile's base model (at its
    batch size and maximum length), next to the estimate for a real model: the profile's own on a GPU,
    else the base model of the ``reference`` GPU profile, each at its profile's batch, length, dtype and
    checkpointing.

    One row per method and source (``measured here``, ``estimated, real model``; ``model`` says which
    model, batch x length and dtype), MiB: weights, trained state (gradients and optimizer states),
    activations, temporaries (what the peak holds above those four: the logits and their gradient for
    every method and, measured on QLoRA, the weights dequantized from 4 bits for each layer's matrix
    products) and the peak.
    """
    real = profile if profile.device.startswith("cuda") else get(reference)
    real_arch, arch = hub_architecture(real.base_model), profile_architecture(profile)
    batch = make_batch(arch.vocab, profile.batch_size, profile.max_seq_length, device=profile.device)
    gc_suffix = "+gc" if real.gradient_checkpointing else ""
    here = f"{profile.base_model}, {profile.batch_size} x {profile.max_seq_length}, {profile.dtype}"
    there = (f"{real_arch.name}, {real.batch_size} x {real.max_seq_length}, {real.dtype}"
             + (", checkpointing" if gc_suffix else ""))
    rows = []
    for method in methods:
        model, optimizer = setup_training(method, profile)
        measured = measure_training_step(model, batch, optimizer, autocast_dtype=step_precision(profile))
        del model, optimizer
        gc.collect()
        estimated = estimate_for_profile(real, method + gc_suffix, arch=real_arch)
        for source, setting, step in (("measured here", here, measured), ("estimated, real model", there, estimated)):
            rows.append({"method": method, "source": source, "model": setting, "weights (MiB)": step.weights / MiB,
                         "trained state (MiB)": (step.gradients + step.optimizer) / MiB,
                         "activations (MiB)": step.activations / MiB,
                         "temporaries (MiB)": max(0, step.peak - step.total) / MiB, "peak (MiB)": step.peak / MiB})
    return pd.DataFrame(rows).set_index(["method", "source"])


def breakdown_grid(profile, methods=("full", "lora", "qlora", "full+gc", "qlora+gc+8bit"),
                   batch_sizes=(4, 16), seq_lens=(64, 160)):
    """Measure one training step of each method at each batch size x sequence length on the profile's
    base model, next to :func:`memory.estimate_training_step`; one row per run, MiB, with relative errors."""
    arch = profile_architecture(profile)
    rows = []
    bar = tqdm(total=len(methods) * len(batch_sizes) * len(seq_lens), desc="measure steps", unit="run")
    for method in methods:
        model, optimizer = setup_training(method, profile)
        for b in batch_sizes:
            for s in seq_lens:
                bar.update()
                measured = measure_training_step(model, make_batch(arch.vocab, b, s, device=profile.device), optimizer,
                                                  autocast_dtype=step_precision(profile))
                estimated = estimate_for_profile(profile, method, b, s)
                rows.append(_rows(method, measured, estimated, batch_size=b, seq_len=s))
        del model, optimizer
    bar.close()
    return pd.DataFrame(rows)


def checkpointing_sweep(profile, seq_lens=(64, 128, 256, 512), batch_size: int = 8, method: str = "full",
                        steps: int = 2):
    """Activation memory, peak and time per step with and without gradient checkpointing, per length."""
    arch = profile_architecture(profile)
    rows = []
    for checkpointing in (False, True):
        label = method + ("+gc" if checkpointing else "")
        model, optimizer = setup_training(label, profile)
        for s in seq_lens:
            m = measure_training_step(model, make_batch(arch.vocab, batch_size, s, device=profile.device), optimizer,
                                      steps=steps, autocast_dtype=step_precision(profile))
            rows.append({"seq_len": s, "checkpointing": checkpointing, "activations (MiB)": m.activations / MiB,
                         "peak (MiB)": m.peak / MiB, "seconds per step": m.details["seconds"]})
        del model, optimizer
    return pd.DataFrame(rows)


OPTIMIZERS = {"adamw_torch": "torch.optim.AdamW", "adamw_bnb_8bit": "bitsandbytes.optim.AdamW8bit",
              "paged_adamw_8bit": "bitsandbytes.optim.PagedAdamW8bit", "paged_adamw_32bit": "bitsandbytes.optim.PagedAdamW32bit"}


def make_optimizer(name: str, params, lr: float = 1e-4):
    """An optimizer by its ``transformers`` ``optim`` name: the class :data:`OPTIMIZERS` names."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    module, _, class_name = OPTIMIZERS[name].rpartition(".")
    optimizer_class = getattr(importlib.import_module(module), class_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged optimizers fall back to ordinary memory off CUDA, and say so
        return optimizer_class(list(params), lr=lr)


def optimizer_memory(profile, optimizers=tuple(OPTIMIZERS), method: str = "full", batch_size: int = 8,
                     seq_len: int = 128):
    """Measured optimizer-state bytes (and the rest of the step) for each optimizer, ``method`` fixed."""
    arch = profile_architecture(profile)
    rows = []
    for name in optimizers:
        model, _ = setup_training(method, profile)
        optimizer = make_optimizer(name, [p for p in model.parameters() if p.requires_grad])
        m = measure_training_step(model, make_batch(arch.vocab, batch_size, seq_len, device=profile.device), optimizer,
                                  autocast_dtype=step_precision(profile))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"optimizer": name, "optimizer states (MiB)": m.optimizer / MiB,
                     "bytes per trainable parameter": m.optimizer / trainable, "peak (MiB)": m.peak / MiB})
        del model, optimizer
    return pd.DataFrame(rows)


def gradient_tolerance(profile) -> float:
    """How far two sums of the same gradients may differ through rounding alone (the order of the
    additions changes the last bits): the trained weights are fp32 in fp32 and fp16 profiles (master
    weights, :func:`setup_training`), where the gap is about 1e-6, and bf16 in bf16 profiles (about 1e-2)."""
    return 5e-2 if profile.dtype == "bfloat16" else 1e-3


def accumulation_table(profile, effective_batch: int = 32, micro_batches=(32, 16, 8, 4), seq_len: int = 128,
                       precisions=(None, "bfloat16"), method: str = "full"):
    """Gradient accumulation and mixed precision: peak memory and time per optimizer step for the same
    effective batch, split into micro-batches, in fp32 and under autocast."""
    arch = profile_architecture(profile)
    model, optimizer = setup_training(method, profile)
    weights = str(next(p for p in model.parameters() if p.requires_grad).dtype).removeprefix("torch.")  # no autocast
    rows = []
    for precision in precisions:
        if precision == profile.dtype and None in precisions:
            continue  # autocast to the dtype the weights are loaded in is the same run (a bf16 profile)
        for micro in micro_batches:
            if effective_batch % micro:
                raise ValueError(f"micro-batch {micro} does not divide the effective batch {effective_batch}")
            m = measure_training_step(model, make_batch(arch.vocab, micro, seq_len, device=profile.device), optimizer,
                                      accumulation_steps=effective_batch // micro, autocast_dtype=precision)
            rows.append({"precision": precision or weights, "micro-batch": micro,
                         "accumulation steps": effective_batch // micro, "effective batch": effective_batch,
                         "activations (MiB)": m.activations / MiB, "peak (MiB)": m.peak / MiB,
                         "seconds per optimizer step": m.details["seconds"]})
    return pd.DataFrame(rows)


def compare_efficiency(profile, methods=("full", "lora", "qlora", "qlora+gc+8bit"), task: str = "code",
                       steps: int | None = None, seeds: int = 1):
    """Train each method on ``task`` with the same data and steps, then measure one full-length step.

    Returns one row per method: trainable parameters, measured peak of a step at the profile's batch
    size (halved until it fits the profile's GPU, :func:`grid_sizes`) and maximum length (and its
    estimate), seconds per training step, final loss and test score; with ``seeds`` > 1 the training
    runs once per seed and the row holds their means and ``pass@1 seed sd``
    (:func:`labhelpers.labs.lab1.compare_methods`), with the first seed's loss curve.
    """
    arch = profile_architecture(profile)
    size = grid_sizes(profile, arch)["methods"]
    batch = make_batch(arch.vocab, size["batch_size"], size["seq_len"], device=profile.device)

    rows, curves = [], {}
    for method in tqdm(methods, desc="methods", unit="method"):
        m = parse_method(method)
        run_profile = profile.with_(gradient_checkpointing=m.gradient_checkpointing,
                                    max_steps=steps or profile.max_steps)
        overrides = {"optim": m.optimizer} if m.adam_8bit else {}  # else SFTConfig's default AdamW
        trained = compare_methods([m.base], run_profile, task=task, overrides=overrides, curves=True, seeds=seeds)
        model, optimizer = setup_training(m, profile)
        step = measure_training_step(model, batch, optimizer, autocast_dtype=step_precision(profile))
        est = estimate_for_profile(profile, m, size["batch_size"], size["seq_len"])
        row = trained.iloc[0].to_dict()
        curves[m.label] = row.pop("loss_curve")
        rows.append({"method": m.label, "trainable params": row["trainable_params"],
                     "measured peak (MiB)": step.peak / MiB, "estimated peak (MiB)": est.peak / MiB,
                     "weights (MiB)": step.weights / MiB, "optimizer (MiB)": step.optimizer / MiB,
                     "activations (MiB)": step.activations / MiB, "seconds per step": row["sec_per_step"],
                     "final loss": row["final_train_loss"], "pass@1": row["score_test"],
                     "pass@1 seed sd": row["score_test seed sd"], "seeds": seeds})
        del model, optimizer, trained
        gc.collect()
    return pd.DataFrame(rows), curves
