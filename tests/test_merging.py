"""labhelpers.merging: the per-tensor methods follow the papers, the merge streams, errors name the culprit."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import reference_solutions as ref
from labhelpers import merging
from labhelpers.memory import measure_peak_memory
from labhelpers.paths import base_model_dir


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- per-tensor rules

def test_linear_and_task_arithmetic():
    a, b, base = _randn(5, seed=1), _randn(5, seed=2), _randn(5, seed=3)
    assert torch.allclose(merging.linear([a, b], [1, 3]), 0.25 * a + 0.75 * b)
    assert torch.allclose(merging.task_arithmetic(base, [a, b], [0.5, 1.0], lam=2.0),
                          base + 2.0 * (0.5 * (a - base) + (b - base)))
    assert torch.allclose(merging.task_arithmetic(base, [a, b]), ref.task_arithmetic(base, [a, b], [1, 1], 1.0))
    with pytest.raises(ValueError, match="2 weights for 3 models"):
        merging.linear([a, b, base], [1, 1])


def test_slerp_endpoints_fallback_and_geometry():
    a, b = _randn(64, seed=1), _randn(64, seed=2)
    assert torch.allclose(merging.slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(merging.slerp(a, b, 1.0), b, atol=1e-5)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = merging.slerp(e1, e2, 0.5)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))  # stays on the circle
    assert torch.allclose(merging.slerp(a, 2 * a, 0.3), torch.lerp(a, 2 * a, 0.3))  # parallel: linear
    assert torch.allclose(merging.slerp(torch.zeros(3), torch.ones(3), 0.5), torch.full((3,), 0.5))
    for t in (0.2, 0.7):
        assert torch.allclose(merging.slerp(a, b, t), ref.slerp(a, b, t), atol=1e-5)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        merging.slerp(a, b, 1.2)


def test_trim_keeps_the_largest_magnitudes():
    delta = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2])
    assert merging.trim(delta, 0.4).tolist() == [0.0, -3.0, 0.0, 2.0, 0.0]
    assert torch.equal(merging.trim(delta, 1.0), delta)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            merging.trim(delta, bad)


def test_ties_elects_by_mass_not_by_count():
    base = torch.zeros(3)
    experts = [torch.tensor([1.0, 1.0, -1.0]), torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-5.0, -1.0, 3.0])]
    merged = merging.ties(base, experts, density=1.0)
    # entry 0: mass 1 + 1 - 5 < 0 -> only the -5 agrees; entry 1: mass 2 > 0 -> mean(1, 2); entry 2: mass 2 > 0 -> 3
    assert merged.tolist() == [-5.0, 1.5, 3.0]
    x = [_randn(50, seed=i) for i in range(3)]
    assert torch.allclose(merging.ties(torch.zeros(50), x, 0.3, lam=0.8), ref.ties(torch.zeros(50), x, 0.3, 0.8))


def test_dare_is_seeded_and_unbiased():
    delta = _randn(20000, seed=4)
    first = merging.dare(delta, 0.3, torch.Generator().manual_seed(7))
    again = merging.dare(delta, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    kept = (first != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.02
    assert torch.allclose(first[first != 0], delta[first != 0] / 0.3)
    assert torch.equal(first, ref.dare(delta, 0.3, torch.Generator().manual_seed(7)))
    mean = torch.stack([merging.dare(delta[:50], 0.5, torch.Generator().manual_seed(s)) for s in range(4000)]).mean(0)
    assert torch.allclose(mean, delta[:50], atol=0.1)  # E[dare(delta)] = delta: the rescaling keeps the sum
    with pytest.raises(ValueError, match="density"):
        merging.dare(delta, 0.0, torch.Generator())


def test_dare_merge_masks_depend_on_name_and_expert_only():
    base, e = torch.zeros(100), [_randn(100, seed=1), _randn(100, seed=2)]
    one = merging.dare_merge(base, e, 0.5, seed=3, name="x")
    assert torch.equal(one, merging.dare_merge(base, e, 0.5, seed=3, name="x"))
    assert not torch.equal(one, merging.dare_merge(base, e, 0.5, seed=3, name="y"))


# ------------------------------------------------------------------------------- safetensors I/O

def test_streaming_writer_round_trips_through_safetensors(tmp_path):
    tensors = {"a": _randn(3, 4), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
               "c": _randn(5).to(torch.bfloat16), "d": torch.zeros(0)}
    writer = merging.SafetensorsWriter(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    save_file(tensors, tmp_path / "y.safetensors")
    infos = merging.read_header(tmp_path / "y.safetensors")
    assert all(torch.equal(merging.read_tensor(infos[k]), v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        merging.SafetensorsWriter(tmp_path / "z.safetensors", [("a", torch.float32, (2,))]).write("b", torch.zeros(2))


def _copy_base(dest, shift: float, seed: int):
    shutil.copytree(base_model_dir("tiny"), dest)
    state = load_file(dest / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    state = {k: v + shift * torch.randn(v.shape, generator=g) for k, v in state.items()}
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return state


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    states = {name: _copy_base(root / name, 0.01, i) for i, name in enumerate(("a", "b"))}
    return root, states, load_file(base_model_dir("tiny") / "model.safetensors")


@pytest.mark.parametrize("method, knobs", [
    ("linear", {"weights": [0.3, 0.7]}), ("task_arithmetic", {"lam": 0.8}), ("slerp", {"t": 0.4}),
    ("ties", {"density": 0.3}), ("dare", {"density": 0.5, "seed": 2}),
    ("dare", {"density": 0.5, "sign_election": True}),
])
@pytest.mark.parametrize("chunk", [None, 5000], ids=["whole-tensors", "5000-element-chunks"])
def test_streamed_merge_equals_the_in_memory_merge(experts, tmp_path, method, knobs, chunk, monkeypatch):
    root, states, base_state = experts
    if chunk:  # every matrix of the tiny model is then read, merged and written in pieces
        monkeypatch.setattr(merging.stream, "CHUNK_ELEMENTS", chunk)
    base = base_model_dir("tiny") if merging.NEEDS_BASE[method] else None
    report = merging.merge_checkpoints([root / "a", root / "b"], tmp_path / "m", method, base=base, **knobs)
    merged = load_file(tmp_path / "m" / "model.safetensors")
    for name in merged:
        expected = merging.merge_tensor(method, name, base_state[name] if base else None,
                                        [states["a"][name], states["b"][name]], **knobs)
        if method == "slerp" and chunk:  # the angle is summed chunk by chunk (in float64)
            torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(merged[name], expected), name
    assert report.n_tensors == len(merged) and (tmp_path / "m" / "config.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # a loadable model folder


def test_tensor_fn_runs_your_rule_on_real_checkpoints(experts, tmp_path):
    root, states, base_state = experts
    merging.merge_checkpoints([root / "a", root / "b"], tmp_path / "m", "task_arithmetic", base=base_model_dir("tiny"),
                              tensor_fn=lambda name, b, e: ref.task_arithmetic(b, e, [1.0, 1.0], 0.5))
    merged = load_file(tmp_path / "m" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(merged[name], base_state[name] + 0.5 * (states["a"][name] + states["b"][name] - 2 * base_state[name]))


def test_errors_name_the_offending_tensor_or_argument(experts, tmp_path):
    root, states, _ = experts
    odd = tmp_path / "odd"
    shutil.copytree(root / "a", odd)
    state = dict(states["a"])
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, odd / "model.safetensors")
    with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.weight' has shape"):
        merging.merge_checkpoints([root / "a", odd], tmp_path / "m", "linear")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, odd / "model.safetensors")
    with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        merging.merge_checkpoints([root / "a", odd], tmp_path / "m", "linear")
    other = tmp_path / "other"
    shutil.copytree(base_model_dir("micro"), other)
    with pytest.raises(ValueError, match="hidden_size"):
        merging.merge_checkpoints([root / "a", other], tmp_path / "m", "linear")
    cases = [
        (dict(method="linear", weights=[1.0]), "1 weights for 2 models"),
        (dict(method="ties", density=0.0, base=base_model_dir("tiny")), r"density must be in \(0, 1\]"),
        (dict(method="dare", density=1.5, base=base_model_dir("tiny")), r"density must be in \(0, 1\]"),
        (dict(method="slerp", t=1.5), r"t must be in \[0, 1\]"),
        (dict(method="ties", density=0.5), "needs base="),
        (dict(method="median"), "unknown merge method"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            merging.merge_checkpoints([root / "a", root / "b"], tmp_path / "m", **kwargs)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        merging.Checkpoint(tmp_path)


# peak over one 64 MiB tensor: task arithmetic holds a few 1 MiB chunks; TIES also one float32 buffer of
# a task vector's magnitudes while it finds the trim threshold (kth_largest: no copy of it). The rest of
# the bound is headroom for the test process's heap (up to ~15 MiB of RSS growth seen in the full suite).
TA_BOUND, TIES_BOUND = 0.5, 2.0


def test_kth_largest_equals_kthvalue_without_a_copy():
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(10_007, generator=g).abs(), torch.randint(0, 5, (4_000,), generator=g).float(),
             torch.zeros(100), torch.tensor([3.0]), torch.rand(50_000, generator=g) * 1e-30]
    for values in cases:
        n = values.numel()
        for k in sorted({k for k in (1, 2, n // 7 + 1, n // 2 + 1, n) if k <= n}):
            expected = values.kthvalue(n - k + 1).values
            assert torch.equal(merging.kth_largest(values, k, chunk=999), expected), (n, k)


@pytest.mark.slow
def test_merge_streams_by_chunks(tmp_path, monkeypatch):
    # three 512 MiB checkpoints (8 tensors of 64 MiB): loading them whole would take 1.5 GiB; merged in
    # chunks of 1 MiB, the merge holds a few chunks (TIES also one 64 MiB buffer of magnitudes)
    monkeypatch.setattr(merging.stream, "CHUNK_ELEMENTS", 2**18)
    n_tensors, numel = 8, 16 * 2**20
    one_tensor_mib = numel * 4 / 2**20
    folders = []
    for m in range(3):
        folder = tmp_path / f"m{m}"
        folder.mkdir()
        specs = [(f"layer{i}.weight", torch.float32, (numel,)) for i in range(n_tensors)]
        writer = merging.SafetensorsWriter(folder / "model.safetensors", specs)
        for i in range(n_tensors):
            writer.write(f"layer{i}.weight", torch.full((numel,), float(m + i)))
        writer.close()
        folders.append(folder)
    for method, knobs, bound in (("task_arithmetic", {}, TA_BOUND), ("ties", {"density": 0.5}, TIES_BOUND)):
        with measure_peak_memory("cpu") as peak:
            merging.merge_checkpoints(folders[1:], tmp_path / method, method, base=folders[0], **knobs)
        assert peak.peak_mib < bound * one_tensor_mib, (method, peak.peak_mib, one_tensor_mib)
        out = merging.Checkpoint(tmp_path / method)
        assert torch.equal(out["layer3.weight"][:4], torch.full((4,), 6.0 if method == "task_arithmetic" else 4.5))  # deltas 1, 2


def test_task_vector_statistics(experts):
    root, _, _ = experts
    stats = merging.task_vectors(base_model_dir("tiny"), {"a": root / "a", "b": root / "b"})
    assert set(stats["expert"]) == {"a", "b"} and (stats["norm"] > 0).all()
    overlap = merging.interference(base_model_dir("tiny"), root / "a", root / "b", density=0.2).set_index("tensor")
    assert abs(overlap.loc["all", "cosine"]) < 0.05  # independent noise: orthogonal task vectors
    assert 0.4 < overlap.loc["all", "sign_conflict"] < 0.6 and overlap.loc["all", "topk_overlap"] < 0.2


def test_mergekit_config_round_trips_through_yaml():
    config = yaml.safe_load(merging.mergekit_config("ties", ["org/code", "org/sql"], base="org/base",
                                                    density=0.4, weights=[1.0, 0.5], lam=1.2))
    assert config["merge_method"] == "ties" and config["base_model"] == "org/base"
    assert config["models"][1] == {"model": "org/sql", "parameters": {"weight": 0.5, "density": 0.4}}
    assert config["parameters"] == {"lambda": 1.2, "normalize": True}
    slerp = yaml.safe_load(merging.mergekit_config("slerp", ["a", "b"], t=0.3))
    assert slerp["base_model"] == "a" and slerp["parameters"] == {"t": 0.3}
    dare = yaml.safe_load(merging.mergekit_config("dare", ["a", "b"], base="c", density=0.5, sign_election=True))
    assert dare["merge_method"] == "dare_ties"
    with pytest.raises(ValueError, match="needs base="):
        merging.mergekit_config("task_arithmetic", ["a", "b"])
    assert json.dumps(config)  # plain data only


def test_a_new_merge_method_is_one_registered_class(monkeypatch):
    class Midpoint(merging.MergeMethod):
        name, n_models = "midpoint", 2

        def apply(self, name, base, experts, knobs):
            return (experts[0] + experts[1]) / 2

    monkeypatch.setitem(merging.REGISTRY, "midpoint", Midpoint())
    a, b = torch.zeros(3, dtype=torch.bfloat16), torch.full((3,), 2.0, dtype=torch.bfloat16)
    out = merging.merge_tensor("midpoint", "w", None, [a, b])
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.ones(3, dtype=torch.bfloat16))
    merging.check_merge("midpoint", 2, False, {})
    with pytest.raises(ValueError, match="got 3 models"):
        merging.check_merge("midpoint", 3, False, {})
    assert "midpoint" in merging.mergekit_config("midpoint", ["a", "b"])
    with pytest.raises(ValueError, match="unknown merge method 'magic'; valid: linear, .*midpoint"):
        merging.get_method("magic")


def test_registry_says_what_each_method_needs():
    assert merging.METHODS == ("linear", "task_arithmetic", "slerp", "ties", "dare")
    assert {m for m, needs in merging.NEEDS_BASE.items() if needs} == {"task_arithmetic", "ties", "dare"}
    assert all(merging.get_method(m).name == m for m in merging.METHODS)
