"""LoRA from scratch: the graded checks accept a correct layer (equal to peft) and reject wrong ones."""

import pytest

from labhelpers import lora
from reference_solutions import DoRAColumnNorms, DoRALinear, DoRANormNotDetached, LoRALinear, LoRALinearWrongScaling


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


def test_correct_dora_layer_matches_peft():
    for shape in [(48, 32, 4, 8.0, 0), (20, 36, 2, 5.0, 3), (64, 16, 8, 16.0, 7)]:
        check = lora.compare_dora_with_peft(DoRALinear, *shape)
        assert check.passed, check
        assert check.magnitude_init_vs_peft < 1e-6 and check.output_vs_peft < 1e-5


def test_a_dora_norm_that_is_not_detached_gives_peft_outputs_and_wrong_gradients():
    check = lora.compare_dora_with_peft(DoRANormNotDetached)
    assert check.output_vs_peft < 1e-5 and not check.passed
    assert check.grad_lora_A_vs_peft > 1e-2 and check.grad_lora_B_vs_peft > 1e-2


def test_dora_magnitudes_from_the_wrong_axis_are_caught():
    check = lora.compare_dora_with_peft(DoRAColumnNorms)
    assert not check.passed and check.magnitude_init_vs_peft > 1e-2 and check.output_vs_peft > 1e-2


def test_a_dora_layer_with_the_wrong_parameter_shapes_fails_without_comparing():
    check = lora.compare_dora_with_peft(LoRALinear)  # no magnitude vector
    assert not check.shapes_ok and not check.passed and check.output_vs_peft == float("inf")


def test_parameter_counts_match_the_formula(base):
    df = lora.lora_parameter_counts(base[0], [1, 4, 16], ["q_proj", "v_proj"])
    assert (df["trainable_params"] == df["formula_params"]).all()
    assert df["trainable_params"].is_monotonic_increasing
    with pytest.raises(ValueError, match="valid names"):
        lora.lora_parameter_counts(base[0], [4], ["query"])
