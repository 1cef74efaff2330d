"""Where the memory of training goes: measure it on the real model, estimate it from a config, plan.

* :mod:`~labhelpers.memory.measure`: bytes by part (weights, gradients, optimizer states, saved
  activations) and the peak of one training step, measured; the one peak-memory measure.
* :mod:`~labhelpers.memory.architectures`: a model's shape from its ``config.json``, no weights.
* :mod:`~labhelpers.memory.estimate`: the only estimator, from an architecture and a method, and
  the ZeRO / FSDP sharding formulas.
* :mod:`~labhelpers.memory.planner`: which method fits which GPU; will this run fit this device.

Lab 4's experiments built on these live in :mod:`labhelpers.labs.lab4`.
"""

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

__all__ = ["SIZE_LABELS", "Architecture", "architecture", "hub_architecture", "list_architectures", "profile_architecture",
           "ESTIMATED_METHODS", "ZERO_STAGES", "adam_state_bytes", "estimate_for_profile", "estimate_training_step",
           "nf4_bytes", "zero_per_gpu", "DTYPE_BYTES", "PeakMemory", "SavedActivations", "StepMemory",
           "gradient_bytes", "make_batch", "measure_peak_memory", "measure_training_step", "optimizer_state_bytes",
           "saved_activations", "tensor_bytes", "weight_bytes", "weight_tensors", "CUDA_CONTEXT_GB", "GPU_SIZES_GB",
           "PLAN_METHODS", "DoesNotFitError", "DoesNotFitWarning", "available_bytes", "check_fits", "plan", "plan_grid",
           "require_fits"]
