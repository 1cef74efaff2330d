"""Interrupted runs resume, checkpoints are atomic, runs are reproducible, loading is safe."""

from __future__ import annotations

import ast
import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import PICKLE_RAN, malicious_pickle
from labhelpers.paths import REPO_ROOT

STEPS, SAVE_EVERY, KILL_AFTER = 40, 8, "checkpoint-16"


def _train(out: Path, kill_after: str | None = None) -> dict | None:
    command = [sys.executable, "-m", "labhelpers.training", "--steps", str(STEPS), "--save-steps", str(SAVE_EVERY),
               "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return json.loads((out / "result.json").read_text())
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / kill_after).exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the checkpoint appeared"
        time.sleep(0.02)
    time.sleep(0.2)  # a few more steps, possibly mid-save of nothing; then a real SIGKILL
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return None


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path):
    whole = _train(tmp_path / "whole")
    _train(tmp_path / "killed", kill_after=KILL_AFTER)
    saved = sorted((tmp_path / "killed" / "checkpoints").glob("checkpoint-*"))
    assert saved and not (tmp_path / "killed" / "result.json").exists()
    for folder in saved:  # every visible checkpoint is complete: they appear by rename, whole
        assert (folder / "trainer_state.json").exists() and (folder / "optimizer.pt").exists(), folder
    resumed = _train(tmp_path / "killed")
    assert resumed["last_step"] == whole["last_step"] == STEPS
    assert resumed["steps"] < STEPS  # it really resumed instead of starting over
    full = dict(zip(whole["losses"]["step"], whole["losses"]["loss"]))
    for step, loss in zip(resumed["losses"]["step"], resumed["losses"]["loss"]):
        assert loss == pytest.approx(full[step], rel=1e-4, abs=1e-6), step
    assert resumed["last_step_loss"] == pytest.approx(whole["last_step_loss"], rel=1e-4)


@pytest.mark.slow
def test_same_profile_and_seed_give_the_same_metrics(ci_profile):
    from datasets import Dataset

    from labhelpers.evaluation import scores
    from labhelpers.models import load_model
    from labhelpers.tasks import task_rows
    from labhelpers.training import train_sft

    profile = ci_profile.with_(max_steps=12)
    rows = Dataset.from_list(task_rows("sql", "train", 64))
    runs = []
    for _ in range(2):
        model, tokenizer = load_model(profile)
        result = train_sft(model, tokenizer, rows, profile, learning_rate=profile.full_ft_learning_rate)
        scored = scores(result.model, tokenizer, ["sql", "arithmetic"], profile.with_(n_eval=24))
        runs.append((result.loss_curve["loss"].tolist(), scored))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]


def test_every_torch_load_is_weights_only():
    for path in (REPO_ROOT / "labhelpers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" \
                    and getattr(node.func.value, "id", "") == "torch":
                kwargs = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kwargs and getattr(kwargs["weights_only"], "value", None) is True, \
                    f"{path.name}:{node.lineno} calls torch.load without weights_only=True"


def test_a_malicious_pickle_is_refused(tmp_path, ci_profile):
    from labhelpers.models import load_model

    blob = malicious_pickle()
    (tmp_path / "evil.pt").write_bytes(blob)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pt", weights_only=True)  # what any torch.load of ours does
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(blob)
    with pytest.raises(ValueError, match="only as pickles"):
        load_model(ci_profile, str(folder))
    assert not PICKLE_RAN.exists(), "the payload ran"
