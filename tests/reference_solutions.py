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


# ---- Lab 4

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]


def quantize_nf4(x, blocksize):
    code = torch.tensor(NF4)
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = padded * (1.0 / absmax.clamp(min=1e-38))[:, None]
    if n % blocksize:  # bitsandbytes divides the tail block instead of multiplying by the reciprocal
        scaled[-1] = padded[-1] / absmax[-1].clamp(min=1e-38)
    scaled = scaled.clamp(-1, 1).reshape(-1)[:n]
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def quantize_nf4_nearest_by_argmin_low_nibble_first(x, blocksize):
    packed, absmax = quantize_nf4(x, blocksize)
    return (packed << 4) | (packed >> 4), absmax  # nibbles swapped: a classic packing bug


def dequantize_nf4(packed, absmax, shape, blocksize):
    code = torch.tensor(NF4)
    n = math.prod(shape)
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()
    return (code[codes] * absmax.repeat_interleave(blocksize)[:n]).reshape(shape)


def dequantize_nf4_one_scale(packed, absmax, shape, blocksize):
    return dequantize_nf4(packed, absmax.max().expand(absmax.shape).clone(), shape, blocksize)


def double_quantize(absmax, blocksize):
    from labhelpers.quantization import DoubleQuant, dynamic_map

    code = dynamic_map()
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(centred, (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)
    absmax2 = padded.abs().amax(dim=1)
    scaled = (padded / absmax2[:, None]).reshape(-1)[:n]
    codes = (scaled[:, None] - code).abs().argmin(dim=1).to(torch.uint8)
    return DoubleQuant(codes=codes, absmax2=absmax2, offset=float(offset), blocksize=blocksize)


def double_quantize_without_offset(absmax, blocksize):
    from labhelpers.quantization import DoubleQuant, quantize_blockwise_8bit, dynamic_map

    codes, absmax2 = quantize_blockwise_8bit(absmax, dynamic_map(), blocksize)
    return DoubleQuant(codes=codes, absmax2=absmax2, offset=0.0, blocksize=blocksize)
