"""Known-good (and known-bad) exercise implementations that the graded checks are tested with."""

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out if self.merged else out + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


class LoRALinearWrongScaling(LoRALinear):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.scaling = alpha  # forgets to divide by r


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.nn.functional.gelu(self.down(h)))


class AdapterWithoutResidual(BottleneckAdapter):
    def forward(self, h):
        return self.up(torch.nn.functional.gelu(self.down(h)))


# ---- Lab 2


def assistant_only_labels(messages, tokenizer):
    """Labels from character spans of the assistant turns (no return_assistant_tokens_mask)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [t if any(s <= a < e for s, e in spans) else -100 for t, (a, _) in zip(enc["input_ids"], enc["offset_mapping"])]


def labels_on_everything(messages, tokenizer):
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def l2_to_base(params, anchor, strength, fisher=None):
    total = sum(((params[n] - a) ** 2 * (1 if fisher is None else fisher[n])).sum() for n, a in anchor.items())
    return strength / 2 * total


def l2_without_half(params, anchor, strength, fisher=None):
    return 2 * l2_to_base(params, anchor, strength, fisher)


def interpolate(base, tuned, alpha):
    if not 0 <= alpha <= 1:
        raise ValueError(alpha)
    return {k: (1 - alpha) * base[k] + alpha * tuned[k] for k in base}


def cl_metrics(r):
    import numpy as np

    r = np.asarray(r, dtype=float)
    t = len(r)
    return {"average_accuracy": r[-1].mean(),
            "backward_transfer": np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]),
            "forgetting": np.mean([r[j:t - 1, j].max() - r[-1, j] for j in range(t - 1)])}


# ---- Lab 3


def task_arithmetic(base, experts, weights, lam):
    return base + lam * sum(w * (e - base) for w, e in zip(weights, experts))


def slerp(a, b, t, eps=1e-8):
    if not 0 <= t <= 1:
        raise ValueError(t)
    na, nb = a.norm(), b.norm()
    if na < eps or nb < eps:
        return (1 - t) * a + t * b
    cos = torch.clamp(torch.dot(a.flatten() / na, b.flatten() / nb), -1.0, 1.0)
    if cos.abs() > 0.9995:
        return (1 - t) * a + t * b
    omega = torch.arccos(cos)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def ties(base, experts, density, lam):
    deltas = []
    for e in experts:
        d = e - base
        k = math.ceil(density * d.numel())
        threshold = d.abs().flatten().sort(descending=True).values[k - 1]
        deltas.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    stacked = torch.stack(deltas)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0)
    merged = torch.where(count > 0, (stacked * agree).sum(0) / count.clamp_min(1), torch.zeros_like(sign))
    return base + lam * merged


def dare(delta, density, generator):
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep / density
