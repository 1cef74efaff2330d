"""Bottleneck adapters: the graded check, identity at start, save and reload."""

import copy

import pytest
import torch

from labhelpers import adapters
from reference_solutions import AdapterWithoutResidual, BottleneckAdapter


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
