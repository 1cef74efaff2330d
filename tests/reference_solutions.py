"""Deliberately wrong variants of the exercises, for testing that the graded checks reject them.

The correct implementations are the course's own solution cells, extracted from ``solutions/`` by
``grade_id`` (:mod:`shipped_solutions`) and re-exported here under the exercise names."""

import math

import torch

from shipped_solutions import solution

# ---- Lab 1
LoRALinear = solution("lab1_peft", "lora_layer", "LoRALinear")
BottleneckAdapter = solution("lab1_peft", "bottleneck_adapter", "BottleneckAdapter")
DoRALinear = solution("lab1_peft", "dora_layer", "DoRALinear")


class LoRALinearWrongScaling(LoRALinear):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.scaling = alpha  # forgets to divide by r


class DoRANormNotDetached(DoRALinear):
    def forward(self, x):
        direction = self.base.weight + self.scaling * self.lora_B @ self.lora_A
        weight = (self.magnitude / direction.norm(dim=1)).unsqueeze(1) * direction  # gradient flows through the norm
        return torch.nn.functional.linear(x, weight, self.base.bias)


class DoRAColumnNorms(DoRALinear):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        with torch.no_grad():  # norms over the output dimension (columns), not each output's row
            self.magnitude.copy_(base.weight.norm(dim=0)[: base.out_features])

    def forward(self, x):
        direction = self.base.weight + self.scaling * self.lora_B @ self.lora_A
        norm = direction.norm(dim=0).detach()[: direction.shape[0]]
        return torch.nn.functional.linear(x, (self.magnitude / norm).unsqueeze(1) * direction, self.base.bias)


class AdapterWithoutResidual(BottleneckAdapter):
    def forward(self, h):
        return self.up(torch.nn.functional.gelu(self.down(h)))


# ---- Lab 2
assistant_only_labels = solution("lab2_domain", "assistant_labels", "assistant_only_labels")
l2_to_base = solution("lab2_domain", "l2_penalty", "l2_to_base")
interpolate = solution("lab2_domain", "interpolate", "interpolate")
cl_metrics = solution("lab2_domain", "cl_metrics", "cl_metrics")


def labels_on_everything(messages, tokenizer):
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def l2_without_half(params, anchor, strength, fisher=None):
    return 2 * l2_to_base(params, anchor, strength, fisher)


# ---- Lab 3
task_arithmetic = solution("lab3_merging", "task_arithmetic", "task_arithmetic")
slerp = solution("lab3_merging", "slerp", "slerp")
ties = solution("lab3_merging", "ties", "ties")
dare = solution("lab3_merging", "dare", "dare")

# ---- Lab 4
quantize_nf4 = solution("lab4_memory", "quantize_nf4", "quantize_nf4")
dequantize_nf4 = solution("lab4_memory", "dequantize_nf4", "dequantize_nf4")
double_quantize = solution("lab4_memory", "double_quantize", "double_quantize")


def quantize_nf4_nearest_by_argmin_low_nibble_first(x, blocksize):
    packed, absmax = quantize_nf4(x, blocksize)
    return (packed << 4) | (packed >> 4), absmax  # nibbles swapped: a classic packing bug


def dequantize_nf4_one_scale(packed, absmax, shape, blocksize):
    return dequantize_nf4(packed, absmax.max().expand(absmax.shape).clone(), shape, blocksize)


def double_quantize_without_offset(absmax, blocksize):
    from labhelpers.quantization import DoubleQuant, dynamic_map, quantize_blockwise_8bit

    codes, absmax2 = quantize_blockwise_8bit(absmax, dynamic_map(), blocksize)
    return DoubleQuant(codes=codes, absmax2=absmax2, offset=0.0, blocksize=blocksize)

# ---- Lab 2b
median_should_prune = solution("lab2b_hyperparameters", "median_rule", "median_should_prune")


def search_space_for(profile):
    """The shipped ``search_space`` with the notebook names it reads (``profile``, ``hyperparameters``, ``optuna``)."""
    import optuna

    from labhelpers import hyperparameters

    fn = solution("lab2b_hyperparameters", "search_space", "search_space")
    fn.__globals__.update(profile=profile, hyperparameters=hyperparameters, optuna=optuna)
    return fn


def median_rule_on_last_value(values, completed, n_startup_trials, n_warmup_steps):
    last = max(values)  # the latest value instead of the best so far
    return median_should_prune({last: values[last]}, completed, n_startup_trials, n_warmup_steps)


def median_rule_with_mean(values, completed, n_startup_trials, n_warmup_steps):
    if not completed or len(completed) < n_startup_trials or max(values) < n_warmup_steps:
        return False
    reported = [v for v in values.values() if not math.isnan(v)]
    at_step = [c[max(values)] for c in completed if max(values) in c and not math.isnan(c[max(values)])]
    if not reported:
        return True
    return bool(at_step) and max(reported) < sum(at_step) / len(at_step)  # the mean, not the median


def median_rule_without_startup(values, completed, n_startup_trials, n_warmup_steps):
    return median_should_prune(values, completed, 0, n_warmup_steps)


def median_rule_ignoring_warmup(values, completed, n_startup_trials, n_warmup_steps):
    return median_should_prune(values, completed, n_startup_trials, 0)
