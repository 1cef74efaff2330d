"""Model merging that streams: task arithmetic, SLERP, TIES and DARE over safetensors checkpoints.

Every merge here is **per tensor**: output tensor ``name`` depends only on tensor ``name`` of the base
and of each input model, and once a few whole-tensor statistics are known (TIES' trim thresholds,
SLERP's angle, DARE's random streams) it is elementwise. :func:`merge_checkpoints` therefore reads
each tensor from the input files a chunk of elements at a time (:data:`CHUNK_ELEMENTS`), merges the
chunk and appends it to the output file before reading the next: peak memory is a few chunks (plus,
for TIES, one float32 buffer of the tensor's magnitudes while its threshold is found), whatever the
model's size or depth, and no GPU is needed (a 7B merge reads and writes ~14 GB per model from disk).
Files are read with plain ``seek``/``read`` (no memory map, so the resident set measures what the
merge holds) and written with a streaming safetensors writer. Nothing is unpickled.

The package, one concern a module:

* :mod:`~labhelpers.merging.maths`: the per-tensor maths of each method (semantics there);
* :mod:`~labhelpers.merging.methods`: the registry, one class per method (needs, checks, statistics,
  per-tensor rule, mergekit name);
* :mod:`~labhelpers.merging.io`: safetensors read and written without a memory map or a pickle;
* :mod:`~labhelpers.merging.stream`: :func:`merge_checkpoints`, chunk by chunk;
* :mod:`~labhelpers.merging.analysis`: task vectors, interference, what a merge keeps;
* :mod:`~labhelpers.merging.export`: peft's adapter merges and mergekit configs.

Lab 3's experiments built on these live in :mod:`labhelpers.labs.lab3`.
"""

from labhelpers.merging.analysis import interference, preservation, task_vectors
from labhelpers.merging.export import PEFT_COMBINATIONS, merge_lora_adapters, mergekit_config
from labhelpers.merging.io import (DTYPES, Checkpoint, SafetensorsWriter, check_compatible, folder_size_mib,
                                   read_elements, read_header, read_tensor)
from labhelpers.merging.maths import (CHUNK_ELEMENTS, dare, dare_generators, dare_merge, elect_and_merge, kth_largest,
                                      linear, slerp, task_arithmetic, tensor_seed, ties, trim, trim_count,
                                      trim_threshold)
from labhelpers.merging.methods import (METHODS, NEEDS_BASE, REGISTRY, MergeMethod, check_merge, get_method,
                                        merge_tensor, tensor_statistics)
from labhelpers.merging.stream import MergeReport, merge_checkpoints, merged_chunks

__all__ = ["interference", "preservation", "task_vectors", "PEFT_COMBINATIONS", "merge_lora_adapters",
           "mergekit_config", "DTYPES", "Checkpoint", "SafetensorsWriter", "check_compatible", "folder_size_mib",
           "read_elements", "read_header", "read_tensor", "METHODS", "NEEDS_BASE", "dare", "dare_generators",
           "dare_merge", "elect_and_merge", "linear", "merge_tensor", "slerp", "task_arithmetic", "tensor_seed",
           "ties", "trim", "trim_count", "trim_threshold", "CHUNK_ELEMENTS", "MergeReport", "kth_largest",
           "merge_checkpoints", "merged_chunks", "REGISTRY", "MergeMethod", "check_merge", "get_method",
           "tensor_statistics"]
