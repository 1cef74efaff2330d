"""LoRA from scratch: the graded checks accept a correct layer (equal to peft) and reject wrong ones."""

import pytest

from labhelpers import lora
from reference_solutions import LoRALinear, LoRALinearWrongScaling


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
