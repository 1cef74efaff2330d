"""The graded checks of Lab 1 accept a correct implementation and reject wrong ones."""

import copy

import pytest
import torch

from labhelpers import adapters, lora
from reference_solutions import AdapterWithoutResidual, BottleneckAdapter, LoRALinear, LoRALinearWrongScaling


def test_correct_lora_layer_matches_peft():
    check = lora.compare_with_peft(LoRALinear)
    assert check.passed, check
    assert check.output_vs_peft < 1e-6 and check.merged_weight_vs_peft < 1e-6


def test_wrong_scaling_is_caught():
    check = lora.compare_with_peft(LoRALinearWrongScaling)
    assert not check.passed and check.output_vs_peft > 1e-3


def test_lora_layer_learns_and_base_stays_frozen():
    losses = lora.train_lora_layer(LoRALinear, steps=150)
    assert losses["mse"].iloc[-10:].mean() < losses["mse"].iloc[:10].mean() / 10


def test_parameter_counts_match_the_formula(base):
    df = lora.lora_parameter_counts(base[0], [1, 4, 16], ["q_proj", "v_proj"])
    assert (df["trainable_params"] == df["formula_params"]).all()
    assert df["trainable_params"].is_monotonic_increasing
    with pytest.raises(ValueError, match="valid names"):
        lora.lora_parameter_counts(base[0], [4], ["query"])


def test_adapter_check_accepts_and_rejects():
    assert adapters.check_adapter(BottleneckAdapter).passed
    assert not adapters.check_adapter(AdapterWithoutResidual).passed


def test_adapters_start_as_identity_and_round_trip(base, tmp_path):
    model = copy.deepcopy(base[0])
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(input_ids=ids).logits
    adapters.add_adapters(model, BottleneckAdapter, bottleneck=8)
    assert torch.equal(model(input_ids=ids).logits, before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter." in n:
                p.add_(0.05)
    changed = model(input_ids=ids).logits
    path = adapters.save_adapters(model, tmp_path / "adapters.safetensors")
    fresh = adapters.add_adapters(copy.deepcopy(base[0]), BottleneckAdapter, bottleneck=8)
    adapters.load_adapter_state(fresh, path)
    assert torch.equal(fresh(input_ids=ids).logits, changed)
    wrong = adapters.add_adapters(copy.deepcopy(base[0]), BottleneckAdapter, bottleneck=4)
    with pytest.raises(ValueError, match="wrong shape"):
        adapters.load_adapter_state(wrong, path)
    with pytest.raises(ValueError, match="positive"):
        adapters.add_adapters(copy.deepcopy(base[0]), BottleneckAdapter, bottleneck=0)
