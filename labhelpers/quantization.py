"""NF4 blockwise quantization and double quantization, written out (Lab 4) and checked against bitsandbytes.

QLoRA (Dettmers et al., 2023) stores a weight in three steps:

1. **Blocks and absmax**: the flattened weight is cut into blocks of 64 values; each block is divided
   by its largest magnitude, so every value lands in ``[-1, 1]``.
2. **NF4 codes**: each scaled value is replaced by the index (0..15) of the nearest of 16 levels, the
   quantiles of a standard normal ("NormalFloat"), so that each level is equally likely for normally
   distributed weights. Two 4-bit indices are packed into one byte, the first in the high nibble.
3. **Double quantization**: the fp32 absmax of every block (32 bits per 64 weights = 0.5 bit per
   weight) is itself quantized: its mean is subtracted, then it is cut into blocks of 256 and stored
   as 8-bit codes of bitsandbytes' signed dynamic map, with one fp32 scale per block
   (8/64 + 32/(64·256) ≈ 0.127 bit per weight).

The functions here are the reference for the lab's exercises; :func:`bnb_nf4` and
:func:`storage_report` use bitsandbytes itself, the library QLoRA training runs on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

# The 16 NF4 levels exactly as bitsandbytes stores them (float32), ascending; index 7 is exactly 0.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _check_tensor(x: torch.Tensor, blocksize: int, name: str = "x") -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}; convert it with .float()")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty; there is nothing to quantize")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The largest magnitude of each block of ``blocksize`` values (the last block may be shorter)."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=1)
    if n % blocksize:
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return absmax


def quantize_nf4(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantize ``x``: returns ``(packed, absmax)``, bit-for-bit what
    ``bitsandbytes.functional.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")`` stores.

    ``packed``: uint8 of ``ceil(numel / 2)`` bytes, element ``2k`` in the high nibble, ``2k + 1`` in
    the low one (an odd count is padded with a zero). ``absmax``: fp32, one per block.
    Each value is scaled as ``x * (1 / absmax)`` (the tail block, if any, as ``x / absmax``), clamped to
    ``[-1, 1]`` and mapped to the level whose interval between midpoints holds it (a value exactly on a
    midpoint takes the lower level).
    """
    _check_tensor(x, blocksize)
    flat = x.reshape(-1).float()
    n = flat.numel()
    absmax = blockwise_absmax(flat, blocksize)
    full = n - n % blocksize
    safe = absmax.clamp(min=1e-38)
    scaled = torch.clamp(flat[:full].reshape(-1, blocksize) * (1.0 / safe[: full // blocksize, None]), -1, 1)
    scaled = scaled.reshape(-1)
    if n % blocksize:
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / safe[-1], -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Undo :func:`quantize_nf4`: unpack the nibbles, look up the levels, multiply by each block's absmax."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8 (two 4-bit codes per byte), got {packed.dtype}")
    n = math.prod(shape)
    flat = packed.reshape(-1)
    if flat.numel() != math.ceil(n / 2) or absmax.numel() != math.ceil(n / blocksize):
        raise ValueError(f"{flat.numel()} packed bytes and {absmax.numel()} absmax values do not fit shape "
                         f"{tuple(shape)} with blocksize {blocksize}: expected {math.ceil(n / 2)} and "
                         f"{math.ceil(n / blocksize)}")
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].long()
    values = NF4_CODE[codes]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).reshape(shape).to(dtype)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 levels in [-1, 1], ascending): a sign bit, a run of
    zeros that sets a power-of-ten exponent, and the remaining bits as a linear fraction, so small
    magnitudes get fine steps (Dettmers, 2016). Equal to ``bitsandbytes.functional.create_dynamic_map()``."""
    data: list[float] = []
    non_sign_bits, max_exponent_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = ((boundaries[:-1] + boundaries[1:]) / 2.0)
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(data).sort().values


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """8-bit blockwise quantization with a code book: ``(codes uint8, absmax fp32)``, nearest level."""
    _check_tensor(x, blocksize)
    flat = x.reshape(-1).float()
    absmax = blockwise_absmax(flat, blocksize)
    scale = absmax.clamp(min=1e-38).repeat_interleave(blocksize)[: flat.numel()]
    scaled = torch.clamp(flat / scale, -1, 1)
    codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return codes.reshape(x.shape), absmax


@dataclass
class DoubleQuant:
    """Double-quantized absmax constants: ``absmax ≈ code[codes] * absmax2[block] + offset``."""

    codes: torch.Tensor  # uint8, one per first-level block
    absmax2: torch.Tensor  # fp32, one per block of ``blocksize`` codes
    offset: float
    blocksize: int = 256

    def nbytes(self, with_code_book: bool = True) -> int:
        """Bytes stored: codes, second-level scales, the offset and (by default) the 256-entry map."""
        return self.codes.numel() + 4 * self.absmax2.numel() + 4 + (4 * 256 if with_code_book else 0)


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> DoubleQuant:
    """Quantize NF4's fp32 absmax constants as bitsandbytes does with ``compress_statistics=True``:
    subtract their mean (the ``offset``; absmax values are all positive, centring them uses the signed
    map's full range), then 8-bit blockwise quantization with :func:`dynamic_map`."""
    offset = absmax.float().mean()
    codes, absmax2 = quantize_blockwise_8bit(absmax.float() - offset, dynamic_map(), blocksize)
    return DoubleQuant(codes=codes, absmax2=absmax2, offset=float(offset), blocksize=blocksize)


def double_dequantize(dq: DoubleQuant) -> torch.Tensor:
    """The fp32 absmax constants back from :class:`DoubleQuant`."""
    n = dq.codes.numel()
    scale = dq.absmax2.repeat_interleave(dq.blocksize)[:n]
    return dynamic_map()[dq.codes.reshape(-1).long()] * scale + dq.offset


def bnb_nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    """bitsandbytes' NF4 of ``x``: ``(packed uint8 (flat), quant_state)``."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    return packed.reshape(-1), state


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    import bitsandbytes.functional as F

    return F.dequantize_4bit(packed.reshape(-1, 1), state)


def code_agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Compare two code tensors from the same code book: the share that is identical, and whether
    every disagreement is a neighbouring level (``|i - j| == 1``)."""
    a, b = ours.reshape(-1).long(), theirs.reshape(-1).long()
    same = (a == b).float().mean().item()
    return {"identical": same, "only_neighbours": bool(((a - b).abs() <= 1).all())}


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def storage_report(weight: torch.Tensor, blocksize: int = 64):
    """Bytes, bits per parameter and reconstruction error of one weight in each storage format.

    Formats: fp32, bf16, int8 (bitsandbytes' LLM.int8() row-wise absmax: int8 + one fp32 scale per row),
    NF4 (bitsandbytes, fp32 absmax per ``blocksize``) and NF4 with double quantization. Bytes are
    counted from the tensors each format really stores, code books included. Errors are measured
    after dequantizing: relative RMS error ``||w - ŵ|| / ||w||`` and the largest absolute error.
    """
    import bitsandbytes.functional as F

    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError(f"storage_report needs a 2-D weight matrix, got shape {tuple(w.shape)}")
    rows = []

    def add(name: str, nbytes: int, restored: torch.Tensor) -> None:
        err = (restored.float() - w)
        rows.append({"format": name, "bytes": nbytes, "bits per parameter": 8 * nbytes / w.numel(),
                     "bytes per parameter": nbytes / w.numel(),
                     "relative RMS error": (err.norm() / w.norm()).item(), "max abs error": err.abs().max().item()})

    add("fp32", _bytes(w), w)
    bf16 = w.to(torch.bfloat16)
    add("bf16", _bytes(bf16), bf16)
    q8, row_scale, _ = F.int8_vectorwise_quant(w)
    add("int8 (row-wise)", _bytes(q8, row_scale), q8.float() * row_scale[:, None].float() / 127)
    packed, state = bnb_nf4(w, blocksize)
    add("NF4", _bytes(packed, state.absmax, state.code), bnb_dequantize(packed, state))
    packed, state = bnb_nf4(w, blocksize, double_quant=True)
    add("NF4 + double quant", _bytes(packed, state.absmax, state.code, state.offset.reshape(1),
                                     state.state2.absmax, state.state2.code), bnb_dequantize(packed, state))
    return pd.DataFrame(rows).set_index("format")


# --------------------------------------------------------------------------------------------------
# Checks of a student's implementation against bitsandbytes (the lab's graded exercises use them)
# --------------------------------------------------------------------------------------------------
def check_cases(seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """Tensors and block sizes to check with: shapes with a short last block and an odd count,
    float32 and bfloat16, a constant block and an all-zero one."""
    g = torch.Generator().manual_seed(seed)
    cases = [(torch.randn(64, 64, generator=g), 64), (torch.randn(33, 7, generator=g), 64),
             (torch.randn(5, generator=g), 32), (torch.randn(129, 257, generator=g).to(torch.bfloat16), 128),
             (0.02 * torch.randn(384, 128, generator=g), 64)]
    special = torch.randn(256, generator=g)
    special[:64] = 0.0
    special[64:128] = 3.0
    return cases + [(special, 64)]


@dataclass
class CheckReport:
    passed: bool
    cases: int
    failures: list[str]

    def __str__(self) -> str:
        return f"{self.cases - len(self.failures)}/{self.cases} cases match" + (
            "" if self.passed else ": " + "; ".join(self.failures[:3]))


def check_quantize_nf4(fn, seed: int = 0) -> CheckReport:
    """``fn(x, blocksize) -> (packed, absmax)`` must equal bitsandbytes bit for bit on every case."""
    failures = []
    cases = check_cases(seed)
    for x, bs in cases:
        packed, state = bnb_nf4(x, bs)
        ours, absmax = fn(x, bs)
        if not torch.equal(ours.reshape(-1), packed):
            same = (ours.reshape(-1) == packed).float().mean().item() if ours.numel() == packed.numel() else 0.0
            failures.append(f"shape {tuple(x.shape)} {x.dtype} blocksize {bs}: packed bytes differ "
                            f"({same:.1%} equal, {ours.numel()} vs {packed.numel()} bytes)")
        elif not torch.equal(absmax.float(), state.absmax):
            failures.append(f"shape {tuple(x.shape)} blocksize {bs}: absmax differs")
    return CheckReport(not failures, len(cases), failures)


def check_dequantize_nf4(fn, seed: int = 0) -> CheckReport:
    """``fn(packed, absmax, shape, blocksize) -> tensor`` must equal ``bitsandbytes.dequantize_4bit``."""
    failures = []
    cases = check_cases(seed)
    for x, bs in cases:
        packed, state = bnb_nf4(x, bs)
        ours = fn(packed, state.absmax, tuple(x.shape), bs)
        theirs = bnb_dequantize(packed, state).float()  # bitsandbytes computes in fp32, returns x.dtype
        ours = ours.to(x.dtype).float()
        if tuple(ours.shape) != tuple(x.shape):
            failures.append(f"shape {tuple(x.shape)}: got shape {tuple(ours.shape)}")
        elif not torch.equal(ours.reshape(-1), theirs.reshape(-1)):
            failures.append(f"shape {tuple(x.shape)} blocksize {bs}: max difference "
                            f"{(ours.reshape(-1) - theirs.reshape(-1)).abs().max().item():.3g}")
    return CheckReport(not failures, len(cases), failures)


def check_double_quantize(fn, seed: int = 0, min_identical: float = 0.99) -> CheckReport:
    """``fn(absmax, blocksize) -> DoubleQuant`` against ``quantize_4bit(..., compress_statistics=True)``:
    the offset and second-level scales must be identical, the 8-bit codes identical on at least
    ``min_identical`` of the entries and never more than one level apart (bitsandbytes' CPU kernel
    finds the level with an approximate binary search, so a value within a hair of the midpoint of
    two levels can land on the other one), and the dequantized absmax within one level's step."""
    import bitsandbytes.functional as F

    failures = []
    g = torch.Generator().manual_seed(seed)
    cases = [torch.randn(n, generator=g) * s for n, s in ((64 * 256 * 3, 1.0), (64 * 700 + 5, 0.02), (64 * 10, 1.0))]
    for x in cases:
        packed, state = bnb_nf4(x, 64, double_quant=True)
        absmax = blockwise_absmax(x.float(), 64)
        dq = fn(absmax, 256)
        if abs(float(dq.offset) - state.offset.item()) > 0:
            failures.append(f"{x.numel()} values: offset {float(dq.offset)} != {state.offset.item()}")
            continue
        if not torch.equal(dq.absmax2.float(), state.state2.absmax):
            failures.append(f"{x.numel()} values: second-level absmax differs")
            continue
        agreement = code_agreement(dq.codes, state.absmax)
        if agreement["identical"] < min_identical or not agreement["only_neighbours"]:
            failures.append(f"{x.numel()} values: codes {agreement['identical']:.2%} identical "
                            f"(neighbours only: {agreement['only_neighbours']})")
            continue
        theirs = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        step = (dynamic_map().diff().max() * state.state2.absmax.max()).item()
        if (double_dequantize(dq) - theirs).abs().max().item() > step:
            failures.append(f"{x.numel()} values: dequantized absmax off by more than one level")
    return CheckReport(not failures, len(cases), failures)
