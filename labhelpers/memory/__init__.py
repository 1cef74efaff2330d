"""Where the memory of training goes: measure it on the real model, estimate it from a config, plan.

* :mod:`~labhelpers.memory.measure`: bytes by part (weights, gradients, optimizer states, saved
  activations) and the peak of one training step, measured; the one peak-memory measure.
* :mod:`~labhelpers.memory.architectures`: a model's shape from its ``config.json``, no weights.
* :mod:`~labhelpers.memory.estimate`: the only estimator, from an architecture and a method, and
  the ZeRO / FSDP sharding formulas.
* :mod:`~labhelpers.memory.planner`: which method fits which GPU; will this run fit this device.

Lab 4's experiments built on these live in :mod:`labhelpers.labs.lab4`.

The names below are imported on first use (PEP 562), so a process that needs one part, such as a
merge or FSDP worker that only measures, does not pay for importing transformers and peft (about five
seconds per process start on two cores).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS: dict[str, tuple[str, ...]] = {
    "architectures": ("SIZE_LABELS", "Architecture", "architecture", "list_architectures", "hub_architecture",
                      "profile_architecture"),
    "estimate": ("ESTIMATED_METHODS", "ZERO_STAGES", "adam_state_bytes", "estimate_for_profile",
                 "estimate_training_step", "nf4_bytes", "zero_per_gpu"),
    "measure": ("DTYPE_BYTES", "PeakMemory", "SavedActivations", "StepMemory", "gradient_bytes", "make_batch",
                "measure_peak_memory", "measure_training_step", "optimizer_state_bytes", "saved_activations",
                "tensor_bytes", "weight_bytes", "weight_tensors"),
    "planner": ("CUDA_CONTEXT_GB", "GPU_SIZES_GB", "PLAN_METHODS", "DoesNotFitError", "DoesNotFitWarning",
                "available_bytes", "check_fits", "plan", "plan_grid", "require_fits"),
}
_SUBMODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_SUBMODULE_OF)


def __getattr__(name: str):
    """Import the submodule that defines ``name`` (or the submodule ``name``) on first use."""
    if name in _EXPORTS:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from labhelpers.memory.architectures import (
        SIZE_LABELS,
        Architecture,
        architecture,
        list_architectures,
        hub_architecture,
        profile_architecture,
    )
    from labhelpers.memory.estimate import (
        ESTIMATED_METHODS,
        ZERO_STAGES,
        adam_state_bytes,
        estimate_for_profile,
        estimate_training_step,
        nf4_bytes,
        zero_per_gpu,
    )
    from labhelpers.memory.measure import (
        DTYPE_BYTES,
        PeakMemory,
        SavedActivations,
        StepMemory,
        gradient_bytes,
        make_batch,
        measure_peak_memory,
        measure_training_step,
        optimizer_state_bytes,
        saved_activations,
        tensor_bytes,
        weight_bytes,
        weight_tensors,
    )
    from labhelpers.memory.planner import (
        CUDA_CONTEXT_GB,
        GPU_SIZES_GB,
        PLAN_METHODS,
        DoesNotFitError,
        DoesNotFitWarning,
        available_bytes,
        check_fits,
        plan,
        plan_grid,
        require_fits,
    )
