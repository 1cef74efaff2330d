import dataclasses
import json
import re
from pathlib import Path

import pytest

from labhelpers import profiles


def test_every_named_profile_resolves():
    for name in ("ci", "cpu", "t4", "gpu-24gb"):
        assert profiles.get(name).name == name


def test_auto_follows_the_hardware(monkeypatch):
    """cpu without CUDA; on a CUDA machine t4 or gpu-24gb by the device's memory (20 GiB and more)."""
    monkeypatch.delenv("SFTLABS_PROFILE", raising=False)
    monkeypatch.setattr(profiles.torch.cuda, "is_available", lambda: False)
    assert profiles.get("auto").name == "cpu"
    for gib, expected in ((15, "t4"), (24, "gpu-24gb"), (139, "gpu-24gb")):
        monkeypatch.setattr(profiles.torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(profiles.torch.cuda, "get_device_properties",
                            lambda i, gib=gib: type("Props", (), {"total_memory": gib * 2**30})())
        assert profiles.get("auto").name == expected, gib


def test_auto_honours_environment(monkeypatch):
    monkeypatch.setenv("SFTLABS_PROFILE", "smoke")
    assert profiles.get("auto").name == "smoke"
    monkeypatch.setenv("SFTLABS_PROFILE", "nope")
    with pytest.raises(ValueError, match="valid"):
        profiles.get("auto")


@pytest.mark.parametrize("bad", ["gpu", "CI", "", None, 3])
def test_unknown_profile_lists_valid_names(bad):
    with pytest.raises(ValueError) as err:
        profiles.get(bad)
    for name in ("ci", "cpu", "t4", "gpu-24gb", "auto"):
        assert name in str(err.value)


def test_profiles_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        profiles.get("ci").max_steps = 1
    assert profiles.get("ci").with_(max_steps=7).max_steps == 7


def test_same_fields_everywhere_only_sizes_differ():
    ci, t4 = profiles.get("ci"), profiles.get("t4")
    assert ci.max_steps < profiles.get("cpu").max_steps
    assert t4.device == "cuda" and "/" in t4.base_model and ci.base_model == "tiny"


def test_no_helper_branches_on_profile_name():
    root = Path(profiles.__file__).parent
    offenders = [str(p) for p in root.rglob("*.py")
                 if re.search(r"profile\.name\s*(==|!=|in)\b", p.read_text()) and p.name != "profiles.py"]
    assert offenders == []


def test_cpu_and_smoke_are_ci_with_a_few_fields_changed():
    ci = dataclasses.asdict(profiles.get("ci"))
    for name, changed in (("cpu", {"name", "batch_size", "max_steps", "n_eval", "seeds", "track", "search_trials", "search_steps"}),
                          ("smoke", {"name", "max_steps", "n_eval", "eval_batch_size", "search_trials", "search_steps"})):
        other = dataclasses.asdict(profiles.get(name))
        assert {k for k in ci if ci[k] != other[k]} == changed, name


def test_cpu_real_is_cpu_on_the_real_model_with_its_measured_counts():
    """Only the model, what on_real_model sets for it, and the counts measured for it differ from ``cpu``."""
    cpu, real = dataclasses.asdict(profiles.get("cpu")), profiles.get("cpu-real")
    assert real.base_model == real.large_model == profiles.REAL_MODEL
    assert {k for k in cpu if cpu[k] != dataclasses.asdict(real)[k]} == {
        "name", "base_model", "large_model", "lora_r", "lora_alpha", "learning_rate", "full_ft_learning_rate",
        "batch_size", "max_seq_length", "max_steps", "seeds", "n_eval", "eval_batch_size", "general_task"}
    assert real.general_task == "instructions"  # an instruct model's general skill; the tiny bases' is arithmetic
    assert real.max_steps // 3 // real.seeds == 16  # Lab 1's budget a method, as measured (docs/real-model.md)


@pytest.mark.parametrize("gpu", ["t4", "gpu-24gb"])
def test_rehearsal_is_the_gpu_profile_with_only_device_and_counts_changed(gpu):
    real, rehearsed = dataclasses.asdict(profiles.get(gpu)), dataclasses.asdict(profiles.get(f"{gpu}-rehearsal"))
    assert {k for k in real if real[k] != rehearsed[k]} <= {
        "name", "device", "max_steps", "batch_size", "gradient_accumulation_steps", "max_seq_length", "n_eval",
        "eval_batch_size", "search_trials", "search_steps", "max_new_tokens"}
    assert rehearsed["device"] == "cpu" and profiles.is_rehearsal(profiles.get(f"{gpu}-rehearsal"))
    assert not profiles.is_rehearsal(profiles.get(gpu))


def test_a_profile_round_trips_through_json_and_bad_fields_are_named():
    derived = profiles.get("t4").with_(name="t4-smoke", max_steps=30)  # has no name in PROFILES
    for profile in (*profiles.PROFILES.values(), derived):
        assert profiles.from_json(profile.to_json()) == profile
    fields = dataclasses.asdict(derived)
    with pytest.raises(ValueError, match="not profile fields: max_stepz"):
        profiles.from_json(json.dumps({**fields, "max_stepz": 3}))
    del fields["base_model"]
    with pytest.raises(ValueError, match="profile fields missing: base_model"):
        profiles.from_json(json.dumps(fields))
