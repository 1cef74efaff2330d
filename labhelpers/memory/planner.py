"""Before a run: which training method fits which GPU, and will this run fit this device?"""

from __future__ import annotations

import warnings

import pandas as pd
import torch

from labhelpers.memory.architectures import SIZE_LABELS, Architecture, architecture
from labhelpers.memory.estimate import estimate_training_step
from labhelpers.peft_methods import TrainingMethod, parse_method
from labhelpers.memory.measure import StepMemory, _check_positive
from labhelpers.units import GiB

PLAN_METHODS = ("full", "full+8bit", "lora", "lora+gc", "qlora", "qlora+gc+8bit")
GPU_SIZES_GB = (8, 12, 16, 24, 40, 80)
CUDA_CONTEXT_GB = 0.5  # CUDA context, kernels and allocator slack on a real GPU


def plan(model_size, gpu_memory_gb: float, methods=PLAN_METHODS, batch_size: int = 1, seq_len: int = 2048,
         dtype: str = "bfloat16", lora_r: int = 16, headroom: float = 0.9):
    """Which training methods fit a GPU of ``gpu_memory_gb`` for a model, with the estimate broken down.

    ``model_size``: a size label (``"1B"``, ``"3B"``, ``"7B"``, ``"13B"``, ``"70B"``), a shipped
    architecture name, a ``config.json`` path or an :class:`Architecture`. A method fits when its
    estimated peak plus the CUDA context stays within ``headroom`` of the GPU's memory.
    Returns a DataFrame, one row per method, sizes in GB (1e9 bytes, as GPUs are sold).
    """
    _check_positive(gpu_memory_gb=gpu_memory_gb, batch_size=batch_size, seq_len=seq_len)
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}")
    arch = model_size if isinstance(model_size, Architecture) else architecture(model_size)
    rows = []
    for method in methods:
        est = estimate_training_step(arch, method, batch_size, seq_len, dtype=dtype, lora_r=lora_r)
        need = est.peak / 1e9 + CUDA_CONTEXT_GB
        rows.append({"model": arch.name, "params (B)": round(arch.billions, 2), "method": parse_method(method).label,
                     "weights (GB)": est.weights / 1e9, "gradients (GB)": est.gradients / 1e9,
                     "optimizer (GB)": est.optimizer / 1e9, "activations (GB)": est.activations / 1e9,
                     "peak (GB)": need, "gpu (GB)": gpu_memory_gb, "fits": need <= headroom * gpu_memory_gb})
    return pd.DataFrame(rows)


def plan_grid(sizes=tuple(SIZE_LABELS), gpus=GPU_SIZES_GB, methods=PLAN_METHODS, **kwargs):
    """The planner over model sizes x methods: peak GB per row, one boolean column per GPU size."""
    frames = []
    for size in sizes:
        table = plan(size, max(gpus), methods, **kwargs)
        for gpu in gpus:
            _check_positive(gpu_memory_gb=gpu)
            table[f"fits {gpu} GB"] = table["peak (GB)"] <= kwargs.get("headroom", 0.9) * gpu
        frames.append(table.drop(columns=["gpu (GB)", "fits"]).assign(size=size))
    return pd.concat(frames, ignore_index=True)


class DoesNotFitWarning(UserWarning):
    """The estimated peak memory of a training run exceeds what the device has free."""


def available_bytes(device: str) -> int:
    """Free memory of ``device``: CUDA's free memory, or the machine's available RAM."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(model, method: "str | TrainingMethod", batch_size: int, seq_len: int, device: str, dtype: str = "float32",
               lora_r: int = 16, available: int | None = None) -> StepMemory:
    """Estimate a run's peak and warn (:class:`DoesNotFitWarning`) when ``device`` cannot hold it.

    The warning names the estimate, the free memory and what to try. Returns the estimate.
    Models whose config cannot be read (not a decoder-only transformer) are not checked.
    """
    try:
        arch = architecture(model)
    except Exception:  # noqa: BLE001 - any model we cannot describe is simply not checked
        return None
    est = estimate_training_step(arch, method, batch_size, seq_len, dtype=dtype, lora_r=lora_r)
    free = available_bytes(device) if available is None else available
    if est.peak > free:
        warnings.warn(
            f"this run will not fit: {parse_method(method).label} on {arch.name} with batch {batch_size} x "
            f"{seq_len} tokens needs about {est.peak / GiB:.2f} GiB, but {device} has {free / GiB:.2f} GiB free. "
            "Lower the batch size or sequence length, enable gradient checkpointing, or use LoRA/QLoRA "
            "(see labhelpers.memory.planner).", DoesNotFitWarning, stacklevel=2)
    return est


class DoesNotFitError(MemoryError):
    """A run's estimated peak memory exceeds what the device has free (see :func:`require_fits`)."""


def require_fits(model, method: "str | TrainingMethod", batch_size: int, seq_len: int, device: str, dtype: str = "float32",
                 lora_r: int = 16, available: int | None = None) -> StepMemory:
    """Like :func:`check_fits`, but raise :class:`DoesNotFitError` (naming the need, the free memory
    and what to change) instead of warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = check_fits(model, method, batch_size, seq_len, device, dtype, lora_r=lora_r, available=available)
    for w in caught:
        if issubclass(w.category, DoesNotFitWarning):
            raise DoesNotFitError(str(w.message))
    return est
