"""How far apart two tensors are, one definition for every check that compares ours with a reference.

Used where a lab's own code is checked against a library's (the DoRA layer against peft's) and where
two computations of the same quantity must agree (accumulated gradients against the whole batch's).
"""

from __future__ import annotations

from typing import Mapping

import torch


def relative_difference(a: torch.Tensor | None, b: torch.Tensor | None, floor: float = 0.0) -> float:
    """The largest ``|a - b|``, relative to the largest ``|b|`` when that is above ``floor``, else absolute.

    ``floor`` decides what counts as small: with ``floor=1.0`` gradients that reach tens compare
    relatively (float32 rounding alone differs by about 1e-6 of them) and small ones absolutely; with
    the default 0 every tensor compares relatively except one of zeros. A missing tensor (a parameter
    that got no gradient) is infinitely far.
    """
    if a is None or b is None:
        return float("inf")
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        raise ValueError(f"cannot compare tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    scale = b.abs().max().item() if b.numel() else 0.0
    gap = (a - b).abs().max().item() if b.numel() else 0.0
    return gap / scale if scale > floor else gap


def largest_relative_difference(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                                floor: float = 0.0) -> float:
    """The largest :func:`relative_difference` over two sets of tensors with the same names (gradients
    by parameter name), each tensor against its own reference."""
    if set(tensors) != set(reference):
        raise ValueError(f"the two sets name different tensors: {sorted(set(tensors) ^ set(reference))[:5]}")
    return max(relative_difference(tensors[n], reference[n], floor) for n in reference)
