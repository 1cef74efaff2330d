"""Merge checkpoint folders tensor by tensor, a chunk of elements at a time: peak memory is a few
chunks whatever the model's size (see :mod:`labhelpers.merging`)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from labhelpers.merging.io import DTYPES, Checkpoint, SafetensorsWriter, _return_freed_memory, check_compatible
from labhelpers.merging.maths import CHUNK_ELEMENTS
from labhelpers.merging.methods import check_merge, merge_tensor, tensor_statistics


@dataclass
class MergeReport:
    folder: Path
    method: str
    knobs: dict
    n_tensors: int
    n_bytes_in: int
    seconds: float


def merge_checkpoints(models: Sequence[str | Path], out: str | Path, method: str, base: str | Path | None = None,
                      tensor_fn: Callable | None = None, **knobs) -> MergeReport:
    """Merge checkpoint folders tensor by tensor into ``out`` (a loadable model folder).

    Args:
        models: expert folders (each with safetensors weights and the same architecture).
        out: output folder; receives ``model.safetensors`` (or shards mirroring the first model's) and
            the first model's config and tokenizer files.
        method: one of :data:`METHODS`.
        base: the common base folder (needed by ``task_arithmetic``, ``ties``, ``dare``).
        tensor_fn: optional ``(name, base_tensor, expert_tensors) -> tensor`` replacing the method's
            per-tensor rule (this is how your own implementation runs on real checkpoints).
        knobs: ``weights``, ``lam``, ``t``, ``density``, ``seed``, ``sign_election`` as the method needs.
    """
    start = time.perf_counter()
    check_merge(method, len(models), base is not None, knobs)
    experts = [Checkpoint(m) for m in models]
    base_ckpt = Checkpoint(base) if base is not None else None
    reference = base_ckpt or experts[0]
    check_compatible(reference, [c for c in (*experts, base_ckpt) if c is not None and c is not reference])
    final = Path(out)
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))  # renamed when complete
    try:
        _write_merge(out, experts, base_ckpt, method, tensor_fn, knobs)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(out, final)
    return MergeReport(final, method, dict(knobs), len(experts[0].tensors),
                       sum(c.n_bytes for c in experts) + (base_ckpt.n_bytes if base_ckpt else 0),
                       time.perf_counter() - start)


def _write_merge(out: Path, experts, base_ckpt, method: str, tensor_fn, knobs: dict) -> None:
    """The body of :func:`merge_checkpoints`: config files, then every tensor, into ``out``."""
    first = experts[0]
    for file in first.folder.iterdir():  # config, generation config, tokenizer, chat template
        if file.is_file() and not file.name.startswith("model.safetensors") and file.suffix in (".json", ".jinja", ".txt", ".model"):
            shutil.copy(file, out / file.name)
    if len(first.files) > 1:
        shutil.copy(first.folder / "model.safetensors.index.json", out / "model.safetensors.index.json")
    for file in first.files:
        names = [n for n, info in first.tensors.items() if info.file == file]
        specs = [(n, DTYPES[first.tensors[n].dtype], first.tensors[n].shape) for n in names]
        writer = SafetensorsWriter(out / file.name, specs, {"format": "pt", "merge_method": method})
        try:
            for name in names:
                if tensor_fn is not None and DTYPES[first.tensors[name].dtype].is_floating_point:
                    expert_tensors = [c[name] for c in experts]
                    base_tensor = base_ckpt[name] if base_ckpt is not None else None
                    writer.write(name, tensor_fn(name, base_tensor, expert_tensors).to(expert_tensors[0].dtype))
                    del expert_tensors, base_tensor
                else:
                    writer.write_parts(name, merged_chunks(method, name, base_ckpt, experts, knobs))
                _return_freed_memory()
        except BaseException:
            writer.abort()
            raise
        writer.close()




def merged_chunks(method: str, name: str, base: Checkpoint | None, experts: Sequence[Checkpoint], knobs: dict,
                  chunk: int | None = None) -> Iterator[torch.Tensor]:
    """Tensor ``name`` merged by ``method``, as consecutive flat pieces of at most ``chunk`` elements.

    A tensor of up to ``chunk`` elements is merged whole (:func:`merge_tensor`). A larger one is read
    and merged ``chunk`` elements at a time, so the merge holds a few chunks, not a few whole tensors:
    every method is elementwise once its whole-tensor statistics are known, and those are gathered
    first, also by chunks (:func:`tensor_statistics`). The pieces are those of the whole-tensor merge
    (bit for bit for linear, task arithmetic, TIES and DARE; SLERP's angle is summed chunk by chunk,
    in float64; all tested).
    """
    chunk = chunk or CHUNK_ELEMENTS
    n = math.prod(experts[0].tensors[name].shape)
    if n <= chunk:
        whole = merge_tensor(method, name, base[name] if base is not None else None, [c[name] for c in experts], **knobs)
        yield whole.view(-1)
        return
    knobs = {**knobs, **tensor_statistics(method, name, base, experts, knobs, chunk)}
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        yield merge_tensor(method, name, base.elements(name, start, stop) if base is not None else None,
                           [c.elements(name, start, stop) for c in experts], **knobs)
