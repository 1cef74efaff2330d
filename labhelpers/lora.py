"""LoRA, checked against ``peft``: the graded comparison for the from-scratch layer of Lab 1.

LoRA (Hu et al., 2021) freezes a linear layer's weight ``W`` and learns a low-rank update::

    h = W x + b + (alpha / r) * B A x,    A: [r, in_features],  B: [out_features, r]

``A`` starts like ``nn.Linear``'s own weights (Kaiming uniform, ``a = sqrt(5)``) and ``B`` at zero, so
the wrapped layer starts exactly equal to the base. Merging adds ``(alpha / r) B A`` into ``W``.

A student's layer class must take ``(base: nn.Linear, r: int, alpha: float)``, keep the frozen layer
as ``.base``, expose ``.lora_A`` ``[r, in]`` and ``.lora_B`` ``[out, r]`` parameters, and provide
``merge()`` / ``unmerge()``. :func:`compare_with_peft` checks it against ``peft``'s own LoRA layer on
the same weights; :func:`train_lora_layer` checks that it learns.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from torch import nn

from labhelpers.numerics import relative_difference


class _OneLayer(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.proj = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_lora_layer(base: nn.Linear, r: int, alpha: float):
    """``peft``'s LoRA layer wrapping a copy of ``base`` (adapter ``default``), via ``inject_adapter_in_model``."""
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0),
                                    _OneLayer(copy.deepcopy(base)))
    return model.proj


class _Check:
    """What the LoRA and DoRA checks share: a one-column table of every field and the verdict (each
    check defines ``passed``)."""

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(self) | {"passed": self.passed}]).T.rename(columns={0: "value"})


@dataclass(frozen=True)
class LoRACheck(_Check):
    """Maximum absolute differences between a student's layer and ``peft``'s on the same weights."""

    starts_equal_to_base: float
    output_vs_peft: float
    merged_weight_vs_peft: float
    merged_output_vs_unmerged: float
    unmerged_weight_vs_original: float
    b_initialised_to_zero: bool
    a_shape_ok: bool
    b_shape_ok: bool
    atol: float

    @property
    def passed(self) -> bool:
        diffs = (self.starts_equal_to_base, self.output_vs_peft, self.merged_weight_vs_peft,
                 self.merged_output_vs_unmerged, self.unmerged_weight_vs_original)
        return self.b_initialised_to_zero and self.a_shape_ok and self.b_shape_ok and max(diffs) <= self.atol


@torch.no_grad()
def compare_with_peft(layer_cls, in_features: int = 48, out_features: int = 32, r: int = 4, alpha: float = 8.0,
                      seed: int = 0, atol: float = 1e-5) -> LoRACheck:
    """Build ``layer_cls`` and ``peft``'s LoRA layer on one base layer, give both the same random A and B,
    and measure how far apart their outputs and merged weights are."""
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features)
    x = torch.randn(5, 7, in_features)
    student = layer_cls(copy.deepcopy(base), r=r, alpha=alpha)
    reference = peft_lora_layer(base, r=r, alpha=alpha)
    a_ok = tuple(student.lora_A.shape) == (r, in_features)
    b_ok = tuple(student.lora_B.shape) == (out_features, r)
    starts_equal = (student(x) - base(x)).abs().max().item()
    b_zero = bool((student.lora_B == 0).all())
    if not (a_ok and b_ok):
        nan = float("inf")
        return LoRACheck(starts_equal, nan, nan, nan, nan, b_zero, a_ok, b_ok, atol)
    A, B = torch.randn(r, in_features), torch.randn(out_features, r) * 0.1
    student.lora_A.copy_(A)
    student.lora_B.copy_(B)
    reference.lora_A["default"].weight.copy_(A)
    reference.lora_B["default"].weight.copy_(B)
    unmerged = student(x)
    output_diff = (unmerged - reference(x)).abs().max().item()
    original = student.base.weight.detach().clone()
    student.merge()
    reference.merge()
    merged_diff = (student.base.weight - reference.get_base_layer().weight).abs().max().item()
    merged_vs_unmerged = (student(x) - unmerged).abs().max().item()
    student.unmerge()
    unmerged_diff = (student.base.weight - original).abs().max().item()
    return LoRACheck(starts_equal, output_diff, merged_diff, merged_vs_unmerged, unmerged_diff, b_zero, a_ok, b_ok,
                     atol)


def train_lora_layer(layer_cls, steps: int = 200, r: int = 4, alpha: float = 8.0, lr: float = 1e-2,
                     seed: int = 0) -> pd.DataFrame:
    """Fit a LoRA-wrapped layer to a target that differs from its base by a rank-``r`` update.

    Returns the loss per step (``step``, ``mse``); only ``lora_A``/``lora_B`` may have gradients.
    """
    torch.manual_seed(seed)
    base = nn.Linear(32, 32)
    target_delta = torch.randn(32, r) @ torch.randn(r, 32) * 0.1
    layer = layer_cls(copy.deepcopy(base), r=r, alpha=alpha)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    if {id(p) for p in trainable} != {id(layer.lora_A), id(layer.lora_B)}:
        raise ValueError("only lora_A and lora_B may require gradients: freeze the base layer's weight and bias")
    optimizer = torch.optim.Adam(trainable, lr=lr)
    losses = []
    for step in range(steps):
        x = torch.randn(64, 32)
        with torch.no_grad():
            y = base(x) + x @ target_delta.T
        loss = nn.functional.mse_loss(layer(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append((step, loss.item()))
    return pd.DataFrame(losses, columns=["step", "mse"])


def lora_parameter_counts(model, ranks: list[int], target_modules: list[str]) -> pd.DataFrame:
    """Trainable LoRA parameters for each rank, counted on the real model by ``peft``, next to the
    formula ``r * (in + out)`` summed over targeted layers."""
    from peft import LoraConfig, get_peft_model

    total = sum(p.numel() for p in model.parameters())
    formula_layers = [(m.in_features, m.out_features) for name, m in model.named_modules()
                      if isinstance(m, nn.Linear) and name.split(".")[-1] in target_modules]
    if not formula_layers:
        raise ValueError(f"no nn.Linear named {target_modules} in the model; valid names: "
                         f"{sorted({n.split('.')[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})}")
    rows = []
    for r in ranks:
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules))
        counted = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        rows.append({"rank": r, "trainable_params": counted, "formula_params": sum(r * (i + o) for i, o in formula_layers),
                     "trainable_pct": 100 * counted / total})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- DoRA

def peft_dora_layer(base: nn.Linear, r: int, alpha: float):
    """``peft``'s DoRA layer (``LoraConfig(use_dora=True)``) wrapping a copy of ``base``; its magnitude
    vector is ``.lora_magnitude_vector["default"].weight``."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, use_dora=True)
    return inject_adapter_in_model(config, _OneLayer(copy.deepcopy(base))).proj


@dataclass(frozen=True)
class DoRACheck(_Check):
    """Maximum absolute differences between a student's DoRA layer and ``peft``'s on the same weights.

    The gradients are those of one loss through both layers (differences relative to the largest
    gradient when above 1): they agree only when the row norm ``||W + (alpha/r) B A||`` is treated as
    a constant (detached), as DoRA's section 4.3 and ``peft`` do.
    """

    starts_equal_to_base: float
    magnitude_init_vs_peft: float
    output_vs_peft: float
    grad_magnitude_vs_peft: float
    grad_lora_A_vs_peft: float
    grad_lora_B_vs_peft: float
    base_frozen: bool
    shapes_ok: bool
    atol: float

    @property
    def passed(self) -> bool:
        diffs = (self.starts_equal_to_base, self.magnitude_init_vs_peft, self.output_vs_peft,
                 self.grad_magnitude_vs_peft, self.grad_lora_A_vs_peft, self.grad_lora_B_vs_peft)
        return self.base_frozen and self.shapes_ok and max(diffs) <= self.atol


def compare_dora_with_peft(layer_cls, in_features: int = 48, out_features: int = 32, r: int = 4,
                           alpha: float = 8.0, seed: int = 0, atol: float = 1e-5) -> DoRACheck:
    """Build ``layer_cls(base, r, alpha)`` and ``peft``'s DoRA layer on one base layer, compare the
    magnitude vector each initialises, then give both the same random A, B and magnitude and compare
    outputs and the gradients of one loss.

    The student's layer keeps the frozen layer as ``.base`` and has parameters ``.lora_A`` ``[r, in]``,
    ``.lora_B`` ``[out, r]`` and ``.magnitude`` ``[out]``.
    """
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features)
    x = torch.randn(5, 7, in_features)
    student = layer_cls(copy.deepcopy(base), r=r, alpha=alpha)
    reference = peft_dora_layer(base, r=r, alpha=alpha)
    ref_magnitude = reference.lora_magnitude_vector["default"].weight
    shapes_ok = (tuple(getattr(student, "lora_A", torch.empty(0)).shape) == (r, in_features)
                 and tuple(getattr(student, "lora_B", torch.empty(0)).shape) == (out_features, r)
                 and tuple(getattr(student, "magnitude", torch.empty(0)).shape) == (out_features,))
    base_frozen = all(not p.requires_grad for p in getattr(student, "base", base).parameters())
    with torch.no_grad():
        starts_equal = (student(x) - base(x)).abs().max().item()
    if not shapes_ok:
        inf = float("inf")
        return DoRACheck(starts_equal, inf, inf, inf, inf, inf, base_frozen, shapes_ok, atol)
    magnitude_init = (student.magnitude.detach() - ref_magnitude.detach()).abs().max().item()
    A, B = torch.randn(r, in_features), torch.randn(out_features, r) * 0.3
    m = ref_magnitude.detach() * (1 + 0.2 * torch.randn(out_features))
    with torch.no_grad():
        for ours, theirs, value in ((student.lora_A, reference.lora_A["default"].weight, A),
                                    (student.lora_B, reference.lora_B["default"].weight, B),
                                    (student.magnitude, ref_magnitude, m)):
            ours.copy_(value)
            theirs.copy_(value)
    upstream = torch.randn(5, 7, out_features)
    ours_out, theirs_out = student(x), reference(x)
    (ours_out * upstream).sum().backward()
    (theirs_out * upstream).sum().backward()
    return DoRACheck(
        starts_equal_to_base=starts_equal,
        magnitude_init_vs_peft=magnitude_init,
        output_vs_peft=(ours_out - theirs_out).abs().max().item(),
        grad_magnitude_vs_peft=relative_difference(student.magnitude.grad, ref_magnitude.grad, floor=1.0),
        grad_lora_A_vs_peft=relative_difference(student.lora_A.grad, reference.lora_A["default"].weight.grad, floor=1.0),
        grad_lora_B_vs_peft=relative_difference(student.lora_B.grad, reference.lora_B["default"].weight.grad, floor=1.0),
        base_frozen=base_frozen, shapes_ok=shapes_ok, atol=atol)
