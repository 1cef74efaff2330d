import pytest
import torch

from labhelpers.numerics import largest_relative_difference, relative_difference


def test_relative_difference_is_relative_to_the_reference_above_the_floor_and_absolute_below():
    assert relative_difference(torch.tensor([10.0, 20.0]), torch.tensor([10.0, 22.0])) == pytest.approx(2 / 22)
    small = torch.tensor([0.1, 0.2])
    assert relative_difference(small + 0.01, small) == pytest.approx(0.05)              # relative: 0.01 / 0.2
    assert relative_difference(small + 0.01, small, floor=1.0) == pytest.approx(0.01)   # absolute under the floor
    assert relative_difference(torch.tensor([0.0, 0.5]), torch.zeros(2)) == pytest.approx(0.5)  # zeros: absolute
    assert relative_difference(torch.ones(2, dtype=torch.bfloat16), torch.ones(2)) == 0.0


def test_relative_difference_refuses_what_cannot_be_compared():
    assert relative_difference(None, torch.ones(2)) == float("inf")  # a parameter that got no gradient
    with pytest.raises(ValueError, match="shapes"):
        relative_difference(torch.ones(2), torch.ones(3))


def test_largest_relative_difference_compares_tensor_by_tensor():
    a = {"w": torch.tensor([1.0, 2.0]), "z": torch.zeros(2)}
    assert largest_relative_difference(a, {"w": torch.tensor([1.0, 2.2]), "z": torch.zeros(2)}) == pytest.approx(0.2 / 2.2)
    assert largest_relative_difference({"w": a["w"], "z": torch.tensor([0.0, 0.5])}, a) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="different tensors"):
        largest_relative_difference(a, {"w": a["w"]})
