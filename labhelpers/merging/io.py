"""Safetensors without a memory map or a pickle: read a header, a tensor or a span of its elements,
write a file tensor by tensor, and a checkpoint folder (sharded or not) as one mapping."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from labhelpers.units import files_mib

_MALLOC_TRIM = None


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


def folder_size_mib(folder: str | Path) -> float:
    return files_mib(Path(folder).iterdir())
