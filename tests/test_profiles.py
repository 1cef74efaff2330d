import dataclasses
import re
from pathlib import Path

import pytest

from labhelpers import profiles


def test_every_named_profile_resolves():
    for name in ("ci", "cpu", "t4", "gpu-24gb"):
        assert profiles.get(name).name == name


def test_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.delenv("SFTLABS_PROFILE", raising=False)
    assert profiles.get("auto").name == "cpu"


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
    for name, changed in (("cpu", {"name", "max_steps", "n_eval"}), ("smoke", {"name", "max_steps", "n_eval", "eval_batch_size"})):
        other = dataclasses.asdict(profiles.get(name))
        assert {k for k in ci if ci[k] != other[k]} == changed, name
