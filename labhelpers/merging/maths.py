"""The maths of each merge method, on one tensor (or one chunk of it): linear, task arithmetic, SLERP, TIES and DARE.

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

import math
import zlib
from typing import Sequence

import torch

PARALLEL_THRESHOLD = 0.9995


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


CHUNK_ELEMENTS = 1 << 21  # 8 MiB of float32 per model and chunk: the unit of a streamed merge


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
