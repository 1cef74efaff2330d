"""Experiment tracking: a tracked training run writes the Trainer's loss, learning rate and gradient
norm, and each later evaluation of its model, to a TensorBoard run folder named by lab, method and
seed; the ci and smoke profiles write nothing."""

import pytest

from labhelpers import profiles, tracking
from labhelpers.evaluation import score
from labhelpers.models import load_model
from labhelpers.peft_methods import peft_config
from labhelpers.tasks import task_rows
from labhelpers.training import fine_tune


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.TRACKING_ENV, str(tmp_path / "runs"))
    monkeypatch.setenv(tracking.LAB_ENV, "lab9")
    return tmp_path / "runs"


def test_a_tracked_run_logs_training_and_evaluation(tracked):
    profile = profiles.get("smoke").with_(track=True, n_eval=8)  # smoke's settings, tracked
    model, tokenizer = load_model(profile)
    run = fine_tune(model, tokenizer, task_rows("arithmetic", "train")[:64], profile, steps=3)
    folder = tracked / "lab9-full-seed0"
    assert sorted(p.name for p in tracked.iterdir()) == [folder.name]
    accuracy = score(run.model, tokenizer, "arithmetic", profile, "validation")
    scalars = tracking.read_scalars(folder)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(run.loss_curve["loss"].tolist(), rel=1e-5)
    assert len(scalars["train/learning_rate"]) == 3 and len(scalars["train/grad_norm"]) == 3
    assert scalars["eval/validation/arithmetic"] == [(3, pytest.approx(accuracy))]
    again = score(run.model, tokenizer, "arithmetic", profile, "test")  # a second evaluation of the same run
    assert tracking.read_scalars(folder)["eval/test/arithmetic"] == [(3, pytest.approx(again))]
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # training's, and one for all its evaluations

    model, _ = load_model(profile)
    fine_tune(model, tokenizer, task_rows("arithmetic", "train")[:64], profile, steps=2,
              peft_config=peft_config("lora", profile))
    fine_tune(load_model(profile)[0], tokenizer, task_rows("arithmetic", "train")[:64], profile, steps=2)
    rank = peft_config("lora", profile).r
    assert sorted(p.name for p in tracked.iterdir()) == ["lab9-full-seed0", "lab9-full-seed0-2", f"lab9-lora-r{rank}-seed0"]


@pytest.mark.parametrize("name", ["ci", "smoke"])
def test_the_ci_and_smoke_profiles_track_nothing(tracked, name):
    profile = profiles.get(name).with_(max_steps=1, n_eval=8)
    assert tracking.tracking_root(profile) is None and tracking.new_run(profile, "full") is None
    model, tokenizer = load_model(profile)
    run = fine_tune(model, tokenizer, task_rows("arithmetic", "train")[:16], profile, steps=1)
    score(run.model, tokenizer, "arithmetic", profile, "validation")  # an untracked model logs nothing
    assert not tracked.exists()


def test_tracking_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv(tracking.TRACKING_ENV, raising=False)
    assert tracking.tracking_root(profiles.get("cpu")) is None
