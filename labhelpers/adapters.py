"""Bottleneck adapters (Houlsby et al., 2019), which ``peft`` does not provide.

An adapter is a small residual MLP inserted after a frozen sub-layer::

    h' = h + W_up · act(W_down · h + b_down) + b_up,   W_down: [m, d],  W_up: [d, m],  m << d

``W_up`` and ``b_up`` start at zero, so a model with fresh adapters computes exactly what the base
did. :func:`add_adapters` freezes the model and inserts one adapter after every decoder block's MLP;
:func:`check_adapter` is the graded check of a student's adapter class; :func:`adapter_state_dict`
and :func:`load_adapter_state` save and restore only the adapter weights (safetensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class WithAdapter(nn.Module):
    """Runs ``sublayer`` then ``adapter`` on its output (the adapter holds the residual connection)."""

    def __init__(self, sublayer: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.sublayer = sublayer
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.sublayer(*args, **kwargs)
        # adapters train in fp32 (fp16 mixed precision cannot unscale fp16 gradients); cast around them
        dtype = next(self.adapter.parameters()).dtype
        return self.adapter(out.to(dtype)).to(out.dtype)


def _mlp_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every decoder block's ``mlp`` sub-layer."""
    slots = [(parent, "mlp") for parent in model.modules()
             if isinstance(getattr(parent, "mlp", None), nn.Module) and not isinstance(parent.mlp, WithAdapter)]
    if not slots:
        raise ValueError("found no sub-layer named 'mlp' to put adapters after; this helper supports Llama-style "
                         "decoder blocks (model.model.layers[i].mlp)")
    return slots


def add_adapters(model: nn.Module, adapter_cls, bottleneck: int) -> nn.Module:
    """Freeze ``model`` and insert ``adapter_cls(hidden_size, bottleneck)`` after every block's MLP, in place."""
    if bottleneck <= 0:
        raise ValueError(f"bottleneck size must be a positive integer, got {bottleneck}")
    hidden = model.config.hidden_size
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name in _mlp_slots(model):
        sublayer = getattr(parent, name)
        ref = next(sublayer.parameters())
        adapter = adapter_cls(hidden, bottleneck).to(device=ref.device, dtype=torch.float32)
        setattr(parent, name, WithAdapter(sublayer, adapter))
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, keyed by their module path."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".adapter." in k}


def save_adapters(model: nn.Module, path: Path) -> Path:
    """Write the adapter weights to a safetensors file (atomic write)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(adapter_state_dict(model), str(tmp))
    tmp.replace(path)
    return path


def load_adapter_state(model: nn.Module, path: Path) -> None:
    """Load adapter weights saved by :func:`save_adapters`; names and shapes must match exactly."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    expected = adapter_state_dict(model)
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    wrong_shape = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"adapter file {path} does not fit this model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}, wrong shape {sorted(wrong_shape)[:3]}; "
                         "add adapters with the same bottleneck size to the same base model first")
    model.load_state_dict(state, strict=False)


@dataclass(frozen=True)
class AdapterCheck:
    identity_at_init: float
    changes_after_update: float
    n_params: int
    expected_params: int
    residual_gradient_ok: bool

    @property
    def passed(self) -> bool:
        return (self.identity_at_init == 0.0 and self.changes_after_update > 0 and self.n_params == self.expected_params
                and self.residual_gradient_ok)


def check_adapter(adapter_cls, hidden: int = 32, bottleneck: int = 8, seed: int = 0) -> AdapterCheck:
    """The graded check of a bottleneck adapter: identity at init, residual, size ``2·d·m + d + m``, and
    that it changes its input once the up-projection is non-zero."""
    torch.manual_seed(seed)
    adapter = adapter_cls(hidden, bottleneck)
    h = torch.randn(3, 5, hidden, requires_grad=True)
    out = adapter(h)
    identity = (out - h).abs().max().item()
    out.sum().backward()
    residual_ok = h.grad is not None and torch.allclose(h.grad, torch.ones_like(h))  # zero branch: d out/d h = I
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        changed = (adapter(h) - h).abs().max().item()
    n_params = sum(p.numel() for p in adapter.parameters())
    return AdapterCheck(identity, changed, n_params, 2 * hidden * bottleneck + hidden + bottleneck, residual_ok)
