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

Semantics (``base`` :math:`\\theta_0`, experts :math:`\\theta_i`, task vectors
:math:`\\tau_i = \\theta_i - \\theta_0`, weights :math:`w_i`):

* ``linear`` (model soups, Wortsman et al. 2022): :math:`\\sum_i w_i \\theta_i / \\sum_i w_i`
  (mergekit ``linear`` with ``normalize: true``);
* ``task_arithmetic`` (Ilharco et al. 2023): :math:`\\theta_0 + \\lambda \\sum_i w_i \\tau_i`
  (mergekit ``task_arithmetic``, ``lambda``);
* ``slerp`` (two models): spherical interpolation of the flattened tensors, angle from their
  normalised dot product, :math:`\\frac{\\sin((1-t)\\Omega)}{\\sin\\Omega}a + \\frac{\\sin(t\\Omega)}{\\sin\\Omega}b`,
  falling back to linear interpolation when they are nearly parallel (|cos| > 0.9995) or a norm is ~0
  (mergekit ``slerp``: ``t = 0`` is the first model);
* ``ties`` (Yadav et al. 2023): trim each :math:`\\tau_i` to its top-``density`` fraction by magnitude,
  elect a sign per entry as the sign of the summed (weighted) trimmed mass, average only the entries
  that agree with it (disjoint mean; weighted: :math:`\\sum_i w_i\\hat\\tau_i m_i / \\sum_i w_i m_i`, as
  mergekit's ``normalize: true``), then :math:`\\theta_0 + \\lambda\\,\\tau_{merged}`;
* ``dare`` (Yu et al. 2024): drop each entry of :math:`\\tau_i` with probability :math:`p = 1 - density`
  and rescale the survivors by :math:`1/(1-p)` (unbiased), then task arithmetic (mergekit
  ``dare_linear``) or, with ``sign_election=True``, the TIES sign election and disjoint mean
  (``dare_ties``). The random mask of tensor ``name`` for expert ``i`` comes from a generator seeded
  by (``seed``, ``name``, ``i``): merges are deterministic and independent of tensor order.

``peft``'s ``add_weighted_adapter`` merges LoRA *adapters* instead (``linear``, ``ties``, ``dare_ties``
on the low-rank factors or on their products); :func:`labhelpers.merging.merge_lora_adapters` wraps it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from labhelpers.units import files_mib

PARALLEL_THRESHOLD = 0.9995
METHODS = ("linear", "task_arithmetic", "slerp", "ties", "dare")
NEEDS_BASE = {"linear": False, "task_arithmetic": True, "slerp": False, "ties": True, "dare": True}

# ----------------------------------------------------------------------------- per-tensor methods


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} models; pass one weight per model")
    return weights


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the fraction of each task vector kept), got {density}")


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted average :math:`\\sum_i w_i \\theta_i / \\sum_i w_i`."""
    weights = _check_weights(weights, len(tensors))
    if sum(weights) == 0:
        raise ValueError("weights sum to 0; a weighted average needs a non-zero total")
    return sum(w * t for w, t in zip(weights, tensors)) / sum(weights)


def task_arithmetic(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                    lam: float = 1.0) -> torch.Tensor:
    """:math:`\\theta_0 + \\lambda \\sum_i w_i (\\theta_i - \\theta_0)`."""
    weights = _check_weights(weights, len(experts))
    return base + lam * sum(w * (e - base) for w, e in zip(weights, experts))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8,
          geometry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), linear where they are nearly parallel.
    (``geometry``: the whole tensors' norms and cosine, when ``a`` and ``b`` are chunks of them.)"""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1] (0 = first model, 1 = second), got {t}")
    a32, b32 = a.float(), b.float()
    na, nb, cos = geometry if geometry is not None else (a32.norm(), b32.norm(), None)
    if na < eps or nb < eps:
        return torch.lerp(a32, b32, t).to(a.dtype)
    if cos is None:
        cos = (a32 / na * (b32 / nb)).sum()
    cos = torch.clamp(cos, -1.0, 1.0)
    if cos.abs() > PARALLEL_THRESHOLD:
        return torch.lerp(a32, b32, t).to(a.dtype)
    omega = torch.arccos(cos)
    s = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / s * a32 + torch.sin(t * omega) / s * b32).to(a.dtype)


def trim_count(n: int, density: float) -> int | None:
    """How many of ``n`` entries TIES keeps: ``ceil(density * n)`` (None: all of them)."""
    _check_density(density)
    k = math.ceil(density * n)
    return None if k >= n else k


def trim_threshold(magnitudes: torch.Tensor, density: float) -> torch.Tensor | None:
    """The magnitude of the ``ceil(density * n)``-th largest entry (None: density keeps everything)."""
    k = trim_count(magnitudes.numel(), density)
    if k is None:
        return None
    return magnitudes.flatten().kthvalue(magnitudes.numel() - k + 1).values


def trim(delta: torch.Tensor, density: float, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``ceil(density * n)`` entries of largest magnitude, zero the rest (ties: all at the threshold).

    ``threshold`` (from :func:`trim_threshold` of the whole tensor) lets a streamed merge trim one
    chunk of a tensor at a time."""
    _check_density(density)
    if threshold is None:
        threshold = trim_threshold(delta.abs(), density)
    if threshold is None:
        return delta.clone()
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def elect_and_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES sign election by summed weighted mass, then the weighted disjoint mean of agreeing entries."""
    weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
    sign = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(weighted) == sign) & (weighted != 0)
    w = torch.tensor(weights, dtype=weighted.dtype).view(-1, *[1] * (weighted.dim() - 1))
    denominator = (w * agree).sum(dim=0)
    return torch.where(denominator != 0, (weighted * agree).sum(dim=0) / denominator.clamp_min(1e-12),
                       torch.zeros_like(denominator))


def ties(base: torch.Tensor, experts: Sequence[torch.Tensor], density: float, weights: Sequence[float] | None = None,
         lam: float = 1.0, thresholds: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """TIES-merging of one tensor: trim, elect sign, disjoint mean, add to the base scaled by ``lam``.
    (``thresholds``: each task vector's trim threshold, when ``base`` and ``experts`` are chunks.)"""
    weights = _check_weights(weights, len(experts))
    thresholds = thresholds if thresholds is not None else [None] * len(experts)
    trimmed = [trim(e - base, density, th) for e, th in zip(experts, thresholds)]
    return base + lam * elect_and_merge(trimmed, weights)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop-and-rescale: keep an entry where ``torch.rand(delta.shape, generator=generator) < density``,
    i.e. drop with probability ``p = 1 - density``, and divide the kept ones by ``density``."""
    _check_density(density)
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def tensor_seed(seed: int, name: str, index: int) -> int:
    """The seed of the DARE mask of tensor ``name`` for expert ``index`` (stable across runs and orders)."""
    return zlib.crc32(f"{seed}:{name}:{index}".encode())


def dare_generators(seed: int, name: str, n: int) -> list[torch.Generator]:
    """The generators of the DARE masks of tensor ``name``, one per expert."""
    return [torch.Generator().manual_seed(tensor_seed(seed, name, i)) for i in range(n)]


def dare_merge(base: torch.Tensor, experts: Sequence[torch.Tensor], density: float, weights: Sequence[float] | None = None,
               lam: float = 1.0, seed: int = 0, name: str = "", sign_election: bool = False,
               generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """DARE on every task vector of one tensor, then task arithmetic (or TIES' election with ``sign_election``).

    ``generators`` (from :func:`dare_generators`) carry the masks' random streams from one chunk of a
    tensor to the next: the CPU generator draws ``torch.rand`` element by element, so consecutive
    chunks get exactly the mask of the whole tensor (tested)."""
    weights = _check_weights(weights, len(experts))
    generators = generators if generators is not None else dare_generators(seed, name, len(experts))
    deltas = [dare(e - base, density, g) for e, g in zip(experts, generators)]
    if sign_election:
        return base + lam * elect_and_merge(deltas, weights)
    return base + lam * sum(w * d for w, d in zip(weights, deltas))


def merge_tensor(method: str, name: str, base: torch.Tensor | None, experts: Sequence[torch.Tensor], **knobs) -> torch.Tensor:
    """Apply a registered method to tensor ``name`` (float32 maths, cast back to the experts' dtype)."""
    dtype = experts[0].dtype
    if not dtype.is_floating_point:  # integer buffers are copied from the first model
        return experts[0].clone()
    experts32 = [e.float() for e in experts]
    base32 = base.float() if base is not None else None
    if method == "linear":
        out = linear(experts32, knobs.get("weights"))
    elif method == "task_arithmetic":
        out = task_arithmetic(base32, experts32, knobs.get("weights"), knobs.get("lam", 1.0))
    elif method == "slerp":
        if len(experts32) != 2:
            raise ValueError(f"slerp merges exactly 2 models, got {len(experts32)}")
        out = slerp(experts32[0], experts32[1], knobs["t"], geometry=knobs.get("geometry"))
    elif method == "ties":
        out = ties(base32, experts32, knobs["density"], knobs.get("weights"), knobs.get("lam", 1.0),
                   knobs.get("thresholds"))
    elif method == "dare":
        out = dare_merge(base32, experts32, knobs["density"], knobs.get("weights"), knobs.get("lam", 1.0),
                         knobs.get("seed", 0), name, knobs.get("sign_election", False), knobs.get("generators"))
    else:
        raise ValueError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    return out.to(dtype)


# -------------------------------------------------------------------------- streaming safetensors

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


NOT_SAFETENSORS_FIX = ("; if it is a pickle (torch.save), labhelpers will not load it, since unpickling can run code: "
                       "re-save the model where you trust it with save_pretrained(..., safe_serialization=True)")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes, shapes and byte ranges of a safetensors file, reading only its header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short){NOT_SAFETENSORS_FIX}")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header of {size} bytes){NOT_SAFETENSORS_FIX}")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON){NOT_SAFETENSORS_FIX}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is not a safetensors file (its header is not a table){NOT_SAFETENSORS_FIX}")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        out[name] = TensorInfo(Path(path), entry["dtype"], tuple(entry["shape"]), 8 + size + start, 8 + size + end)
    return out


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor, read with ``seek``/``read`` into memory of its own (no memory map)."""
    return read_elements(info, 0, math.prod(info.shape)).view(info.shape)


def read_elements(info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Elements ``[start, stop)`` of a tensor in storage (row-major) order, as a 1-D tensor."""
    tensor = torch.empty(stop - start, dtype=DTYPES[info.dtype])
    if tensor.numel() == 0:
        return tensor
    size = tensor.element_size()
    buffer = memoryview(tensor.view(torch.uint8).numpy())
    with open(info.file, "rb") as f:
        f.seek(info.start + start * size)
        if f.readinto(buffer) != (stop - start) * size:
            raise ValueError(f"{info.file} ends before tensor data at {info.start}-{info.end}; the file is truncated")
    return tensor


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is fixed
    up front from ``specs``, then :meth:`write` appends each tensor's bytes in that order."""

    def __init__(self, path: Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None) -> None:
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._order = []
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape)))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, dtype, shape = self._order[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"expected tensor {expected!r} {dtype} {shape}, got {name!r} {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        self.write_parts(name, [tensor])

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write tensor ``name`` from consecutive pieces of it in storage order (each piece is written,
        and can be freed, before the next is asked for)."""
        expected, dtype, shape = self._order[self._next]
        if name != expected:
            raise ValueError(f"expected tensor {expected!r}, got {name!r}")
        written = 0
        for part in parts:
            if part.dtype != dtype:
                raise ValueError(f"tensor {name!r} is {dtype}, got a piece of {part.dtype}")
            if part.numel():
                self._file.write(memoryview(part.contiguous().view(-1).view(torch.uint8).numpy()))
            written += part.numel()
        if written != math.prod(shape):
            raise ValueError(f"tensor {name!r} {tuple(shape)} has {math.prod(shape)} elements, {written} were written")
        self._next += 1

    def abort(self) -> None:
        """Close the file after a failure (the caller removes it)."""
        self._file.close()

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")


class Checkpoint:
    """A model folder with ``model.safetensors`` or a sharded ``model.safetensors.index.json``; tensors
    are read one at a time on demand."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            self.files = [self.folder / s for s in shards]
        elif single.exists():
            self.files = [single]
        else:
            raise FileNotFoundError(f"{self.folder} holds no model.safetensors (or .index.json); save the model "
                                    "with save_pretrained(..., safe_serialization=True)")
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self.tensors.update(read_header(file))
        config = self.folder / "config.json"
        self.config = json.loads(config.read_text()) if config.exists() else {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} is missing from {self.folder}")
        return read_tensor(self.tensors[name])

    def elements(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of tensor ``name`` (flattened), read from disk."""
        return read_elements(self.tensors[name], start, stop)

    @property
    def n_bytes(self) -> int:
        return sum(i.end - i.start for i in self.tensors.values())


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``), so that the resident set of a
    long merge stays at its working set instead of growing with heap fragmentation; a no-op elsewhere."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None
ARCHITECTURE_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def check_compatible(reference: Checkpoint, others: Sequence[Checkpoint]) -> None:
    """Raise ValueError naming the first difference in architecture, tensor names or shapes."""
    for other in others:
        for key in ARCHITECTURE_KEYS:
            if key in reference.config and key in other.config and reference.config[key] != other.config[key]:
                raise ValueError(f"{other.folder} has {key}={other.config[key]!r} but {reference.folder} has "
                                 f"{reference.config[key]!r}: only checkpoints of one architecture can be merged")
        missing = sorted(set(reference.tensors) - set(other.tensors))
        if missing:
            raise ValueError(f"tensor {missing[0]!r} is missing from {other.folder} ({len(missing)} missing); "
                             "merge checkpoints of the same architecture")
        extra = sorted(set(other.tensors) - set(reference.tensors))
        if extra:
            raise ValueError(f"tensor {extra[0]!r} of {other.folder} is not in {reference.folder}")
        for name, info in reference.tensors.items():
            if other.tensors[name].shape != info.shape:
                raise ValueError(f"tensor {name!r} has shape {other.tensors[name].shape} in {other.folder} but "
                                 f"{info.shape} in {reference.folder}")


def _check_knobs(method: str, n_models: int, has_base: bool, knobs: dict) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if NEEDS_BASE[method] and not has_base:
        raise ValueError(f"{method} merges task vectors and needs base= (the checkpoint the experts were tuned from)")
    if n_models < 1 or (method == "slerp" and n_models != 2):
        raise ValueError(f"{method} got {n_models} models; slerp needs exactly 2, the others at least 1")
    _check_weights(knobs.get("weights"), n_models)
    if method == "slerp":
        if "t" not in knobs:
            raise ValueError("slerp needs t= in [0, 1]")
        if not 0.0 <= knobs["t"] <= 1.0:
            raise ValueError(f"t must be in [0, 1] (0 = first model, 1 = second), got {knobs['t']}")
    if method in ("ties", "dare"):
        if "density" not in knobs:
            raise ValueError(f"{method} needs density= in (0, 1]")
        _check_density(knobs["density"])


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
    _check_knobs(method, len(models), base is not None, knobs)
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


CHUNK_ELEMENTS = 1 << 21  # 8 MiB of float32 per model and chunk


def kth_largest(magnitudes: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    """The ``k``-th largest of the non-negative float32 ``magnitudes`` (1-D), exactly the value of
    ``magnitudes.kthvalue(n - k + 1)``, without a copy of them: a radix selection on their bit
    patterns (non-negative floats order as their bits do), one byte per pass, from histograms of
    ``chunk``-element pieces. ``kthvalue`` copies the values and builds int64 indices: three times the
    tensor."""
    chunk = chunk or CHUNK_ELEMENTS
    bits = magnitudes.view(torch.int32)
    prefix, remaining = 0, k
    for shift in (24, 16, 8, 0):
        histogram = torch.zeros(256, dtype=torch.int64)
        for start in range(0, bits.numel(), chunk):
            piece = bits[start:start + chunk]
            if shift < 24:  # only the entries that share the bytes chosen so far
                piece = piece[(piece >> (shift + 8)) == (prefix >> (shift + 8))]
            histogram += torch.bincount((piece >> shift) & 0xFF, minlength=256)
        from_top = histogram.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, remaining))
        remaining -= int(from_top[j - 1]) if j > 0 else 0
        prefix |= (255 - j) << shift
    return torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0]


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


def tensor_statistics(method: str, name: str, base: Checkpoint | None, experts: Sequence[Checkpoint], knobs: dict,
                      chunk: int) -> dict:
    """What a chunked merge of tensor ``name`` needs to know about the whole tensor, read by chunks:
    TIES' trim threshold of each task vector (:func:`kth_largest` of a float32 buffer of its
    magnitudes: the one whole-tensor buffer a streamed merge holds), SLERP's norms and cosine, DARE's
    random generators."""
    if not DTYPES[experts[0].tensors[name].dtype].is_floating_point:
        return {}
    if method == "dare":
        return {"generators": dare_generators(knobs.get("seed", 0), name, len(experts))}
    n = math.prod(experts[0].tensors[name].shape)
    spans = [(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    if method == "ties":
        k = trim_count(n, knobs["density"])
        if k is None:
            return {"thresholds": [None] * len(experts)}
        thresholds = []
        for expert in experts:
            magnitudes = torch.empty(n, dtype=torch.float32)
            for start, stop in spans:
                torch.sub(expert.elements(name, start, stop).float(), base.elements(name, start, stop).float(),
                          out=magnitudes[start:stop]).abs_()
            thresholds.append(kth_largest(magnitudes, k, chunk))
            del magnitudes
        return {"thresholds": thresholds}
    if method == "slerp":
        sums = torch.zeros(3, dtype=torch.float64)
        for start, stop in spans:
            a, b = (c.elements(name, start, stop).double() for c in experts)
            sums += torch.stack([(a * a).sum(), (b * b).sum(), (a * b).sum()])
        na, nb = sums[0].sqrt(), sums[1].sqrt()
        cos = sums[2] / (na * nb) if na > 0 and nb > 0 else torch.zeros((), dtype=torch.float64)
        return {"geometry": (na.float(), nb.float(), cos.float())}
    return {}


# ----------------------------------------------------------------------------------- task vectors

def task_vectors(base: str | Path, experts: Mapping[str, str | Path], skip_embeddings: bool = False):
    """Statistics of each expert's task vector, tensor by tensor, as a DataFrame: ``expert``, ``tensor``,
    ``numel``, ``norm`` (L2 of :math:`\\tau`), ``relative`` (``norm`` / L2 of the base tensor)."""
    import pandas as pd

    base_ckpt = Checkpoint(base)
    rows = []
    for label, folder in experts.items():
        ckpt = Checkpoint(folder)
        check_compatible(base_ckpt, [ckpt])
        for name in base_ckpt.tensors:
            if skip_embeddings and "embed" in name:
                continue
            b = base_ckpt[name].float()
            delta = ckpt[name].float() - b
            rows.append({"expert": label, "tensor": name, "numel": delta.numel(), "norm": delta.norm().item(),
                         "relative": (delta.norm() / b.norm().clamp_min(1e-12)).item()})
    return pd.DataFrame(rows)


def interference(base: str | Path, a: str | Path, b: str | Path, density: float = 0.2):
    """How two task vectors overlap, per tensor: cosine similarity, the fraction of entries where both
    change with opposite signs (``sign_conflict``), and the overlap of their top-``density`` entries
    (``topk_overlap``, Jaccard). A DataFrame with one row per tensor and a row ``all``."""
    import pandas as pd

    base_ckpt, ca, cb = Checkpoint(base), Checkpoint(a), Checkpoint(b)
    check_compatible(base_ckpt, [ca, cb])
    rows, ta_all, tb_all = [], [], []
    for name in base_ckpt.tensors:
        b0 = base_ckpt[name].float()
        ta, tb = (ca[name].float() - b0).flatten(), (cb[name].float() - b0).flatten()
        ta_all.append(ta)
        tb_all.append(tb)
        rows.append({"tensor": name, **_overlap(ta, tb, density)})
    rows.append({"tensor": "all", **_overlap(torch.cat(ta_all), torch.cat(tb_all), density)})
    return pd.DataFrame(rows)


def _overlap(ta: torch.Tensor, tb: torch.Tensor, density: float) -> dict[str, float]:
    both = (ta != 0) & (tb != 0)
    conflict = both & (torch.sign(ta) != torch.sign(tb))
    ka, kb = trim(ta, density) != 0, trim(tb, density) != 0
    union = (ka | kb).sum().item()
    return {"cosine": torch.nn.functional.cosine_similarity(ta, tb, dim=0).item(),
            "sign_conflict": conflict.sum().item() / max(1, both.sum().item()),
            "topk_overlap": (ka & kb).sum().item() / max(1, union)}


# ------------------------------------------------------------------------------------- adapters

PEFT_COMBINATIONS = ("linear", "ties", "dare_ties")


def merge_lora_adapters(peft_model, adapters: Sequence[str], weights: Sequence[float], combination_type: str,
                        name: str, density: float | None = None):
    """``peft``'s ``add_weighted_adapter`` on loaded LoRA adapters, then activate the result.

    ``linear`` needs adapters of one rank and mixes the factors; ``ties`` and ``dare_ties`` work on the
    full update :math:`BA` of each adapter (via SVD back to low rank), with ``density`` as in TIES/DARE.
    """
    if combination_type not in PEFT_COMBINATIONS:
        raise ValueError(f"unknown combination {combination_type!r}; valid: {', '.join(PEFT_COMBINATIONS)}")
    _check_weights(weights, len(adapters))
    kwargs = {}
    if combination_type != "linear":
        if density is None:
            raise ValueError(f"{combination_type} needs density= in (0, 1]")
        _check_density(density)
        kwargs["density"] = density
    peft_model.add_weighted_adapter(list(adapters), list(weights), name, combination_type=combination_type, **kwargs)
    peft_model.set_adapter(name)
    return peft_model


# ------------------------------------------------------------------------------------ mergekit

def mergekit_config(method: str, models: Sequence[str], base: str | None = None, dtype: str = "bfloat16",
                    **knobs) -> str:
    """The same merge as a mergekit YAML config (run ``mergekit-yaml config.yml ./out`` on any machine).

    Maps our names to mergekit's: ``dare`` -> ``dare_linear`` (``dare_ties`` with ``sign_election``),
    ``lam`` -> ``lambda``; ``slerp`` uses the first model as mergekit's ``base_model`` (t = 0).
    """
    import yaml

    _check_knobs(method, len(models), base is not None, knobs)
    weights = _check_weights(knobs.get("weights"), len(models))
    config: dict = {}
    if method == "slerp":
        config = {"merge_method": "slerp", "base_model": str(models[0]),
                  "models": [{"model": str(m)} for m in models], "parameters": {"t": float(knobs["t"])}}
    else:
        name = {"dare": "dare_ties" if knobs.get("sign_election") else "dare_linear"}.get(method, method)
        entries = []
        for model, weight in zip(models, weights):
            params = {"weight": weight}
            if method in ("ties", "dare"):
                params["density"] = float(knobs["density"])
            entries.append({"model": str(model), "parameters": params})
        config = {"merge_method": name, "models": entries}
        if base is not None:
            config["base_model"] = str(base)
        global_params = {}
        if method == "linear":
            global_params["normalize"] = True
        if method in ("task_arithmetic", "ties", "dare"):
            global_params["lambda"] = float(knobs.get("lam", 1.0))
        if method == "ties":
            global_params["normalize"] = True
        if global_params:
            config["parameters"] = global_params
    config["dtype"] = dtype
    return yaml.safe_dump(config, sort_keys=False)


def folder_size_mib(folder: str | Path) -> float:
    return files_mib(Path(folder).iterdir())



# ------------------------------------------------------------------------- experiments (Lab 3)

TASKS = ("code", "sql", "arithmetic")


def local_checkpoint(name: str) -> Path:
    """A folder with safetensors weights for a shipped size, a path, or a hub id (downloaded once)."""
    from labhelpers.models import model_source

    source = model_source(name)
    if Path(source).exists():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]))


def save_model(model, tokenizer, folder: str | Path) -> Path:
    """Save a model and its tokenizer as a loadable folder with safetensors weights."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def score_folder(folder: str | Path, profile, tasks: Sequence[str] = TASKS) -> dict[str, float]:
    """Load a model folder on the profile's device and score it on ``tasks`` (test splits)."""
    from labhelpers.evaluation import task_scores
    from labhelpers.models import load_model

    model, tokenizer = load_model(profile, str(folder))
    return task_scores(model, tokenizer, tasks, profile.n_eval, profile.eval_batch_size)


def general_rows() -> list[dict]:
    """General instruction data: the arithmetic facts as chats and as plain completions."""
    from labhelpers.tasks import task_rows

    completions = task_rows("arithmetic", "train")
    chats = [{"messages": [{"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "content": r["completion"].strip()}]} for r in completions]
    return chats + completions


def train_instruct_start(profile, folder: str | Path, steps: int, task_fraction: float = 0.02,
                         tasks_: Sequence[str] = ("code", "sql"), repeats: int = 4) -> tuple[Path, object]:
    """The shared starting point of the experts: the base instruction-tuned on general data
    (:func:`general_rows`, ``repeats`` times) plus a small ``task_fraction`` of each task's training rows,
    like an instruct model that has seen a little of everything. Saved to ``folder``."""
    import random

    from labhelpers.tasks import task_rows

    if not 0.0 <= task_fraction <= 1.0:
        raise ValueError(f"task_fraction must be in [0, 1], got {task_fraction}")
    rng = random.Random(profile.seed)
    rows = general_rows() * repeats
    for task in tasks_:
        pool = task_rows(task, "train")
        rows += rng.sample(pool, round(task_fraction * len(pool)))
    rng.shuffle(rows)
    return _train_and_save(rows, profile, folder, steps)


def train_expert(tasks_: Sequence[str], profile, folder: str | Path, steps: int, start: str | Path | None = None,
                 learning_rate: float | None = None, peft_config=None) -> tuple[Path, object]:
    """Fine-tune ``start`` (default: the profile's base) on the union of ``tasks_``' training rows and
    save the full weights to ``folder``.

    One task makes an expert; several make the multi-task baseline. With ``peft_config`` (LoRA) the
    adapter alone is also saved to ``folder/adapter`` and ``folder`` receives the merged weights
    (``merge_and_unload``). Returns (folder, TrainResult).
    """
    import random

    from labhelpers.tasks import task_rows

    rows = [row for task in tasks_ for row in task_rows(task, "train")]
    random.Random(profile.seed).shuffle(rows)
    return _train_and_save(rows, profile, folder, steps, start, learning_rate, peft_config)


def _train_and_save(rows: list[dict], profile, folder: str | Path, steps: int, start: str | Path | None = None,
                    learning_rate: float | None = None, peft_config=None) -> tuple[Path, object]:
    """Load ``start`` (default: the profile's base), fine-tune it on ``rows`` and save it to ``folder``
    (with ``peft_config``: the adapter to ``folder/adapter``, the merged weights to ``folder``)."""
    from labhelpers.models import load_model
    from labhelpers.training import fine_tune

    model, tokenizer = load_model(profile, str(start) if start is not None else None)
    run = fine_tune(model, tokenizer, rows, profile, steps, learning_rate=learning_rate, peft_config=peft_config)
    trained = run.model
    if peft_config is not None:
        trained.save_pretrained(Path(folder) / "adapter")
        trained = trained.merge_and_unload()
    return save_model(trained, tokenizer, folder), run


def compare_merge(tensor_fn: Callable, method: str, models: Sequence[str | Path], base: str | Path | None,
                  **knobs) -> float:
    """Merge real checkpoints with your per-tensor function and with the reference method; return the
    largest absolute difference over all tensors (0 means identical)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sftlabs-merge-") as tmp:
        ours = merge_checkpoints(models, Path(tmp) / "yours", method, base=base, tensor_fn=tensor_fn, **knobs)
        reference = merge_checkpoints(models, Path(tmp) / "reference", method, base=base, **knobs)
        a, b = Checkpoint(ours.folder), Checkpoint(reference.folder)
        return max((a[n].float() - b[n].float()).abs().max().item() for n in b.tensors if b.tensors[n].end > b.tensors[n].start)


def sweep_merges(configs: Sequence[Mapping], experts: Sequence[str | Path], base: str | Path, out_root: str | Path,
                 profile, tasks: Sequence[str] = TASKS, tensor_fns: Mapping[str, Callable] | None = None):
    """Run each merge config (``{"method": ..., "knob": <name>, <name>: value, ...}``) and score it.

    ``knob`` names the swept setting; its value is ``config["value"]`` when given (e.g. a label for a
    pair of weights), else ``config[knob]``. Every other key is passed to :func:`merge_checkpoints`.

    Returns a DataFrame: ``method``, ``knob``, ``value``, ``label``, one column per task, ``average``
    and ``seconds`` (merge time). ``tensor_fns`` maps a method to your per-tensor function.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    rows = []
    for config in tqdm(configs, desc="merges"):
        config = dict(config)
        method, knob = config.pop("method"), config.pop("knob")
        value = config.pop("value", config.get(knob, math.nan))
        label = f"{method} {knob}={value:g}"
        folder = Path(out_root) / label.replace(" ", "_").replace("=", "")
        fn = (tensor_fns or {}).get(method)
        report = merge_checkpoints(experts, folder, method, base=base if NEEDS_BASE[method] else None,
                                   tensor_fn=fn, **config)
        scores = score_folder(folder, profile, tasks)
        rows.append({"method": method, "knob": knob, "value": value, "label": label,
                     **scores, "average": sum(scores.values()) / len(scores), "seconds": report.seconds})
    return pd.DataFrame(rows)


def preservation(table, expert_scores: Mapping[str, Mapping[str, float]]):
    """Add ``<task>_kept`` = the :func:`~labhelpers.evaluation.retention` of each merge's score against
    the score of that task's own expert (capability preservation; 1.0 where the expert scores 0)."""
    from labhelpers.evaluation import retention

    out = table.copy()
    for task, scores in expert_scores.items():
        out[f"{task}_kept"] = [retention(float(v), float(scores[task])) for v in out[task]]
    return out
