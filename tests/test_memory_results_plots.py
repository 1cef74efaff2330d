"""Small helpers: peak memory measurement, metrics files, runner discovery, figure conventions."""

import json

import pytest
import torch

from labhelpers import plots, results
from labhelpers.course import runner
from labhelpers.memory import measure_peak_memory


def test_peak_memory_sees_a_large_allocation():
    with measure_peak_memory("cpu") as small:
        torch.ones(1024)
    with measure_peak_memory("cpu") as big:
        x = torch.ones(64, 2**20)  # 256 MiB
        x.add_(1)
        del x
    assert big.peak_mib > 200 and big.peak_mib > small.peak_mib + 150


def test_save_metrics_merges_and_validates(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLABS_RESULTS", str(tmp_path))
    results.save_metrics("lab", {"a": 1.5})
    path = results.save_metrics("lab", {"b": "x", "ok": True})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": "x", "ok": True}
    with pytest.raises(ValueError, match="metric 'c'"):
        results.save_metrics("lab", {"c": [1, 2]})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite"):
            results.save_metrics("lab", {"d": bad})
    with pytest.raises(FileNotFoundError, match="save_metrics"):
        results.load_metrics("other")


def test_runner_discovers_lab_layout(tmp_path):
    (tmp_path / "lab_x").mkdir()
    (tmp_path / "lab_x" / "lab_x.ipynb").write_text("{}")
    (tmp_path / "lab_x" / "scratch.ipynb").write_text("{}")
    assert [p.stem for p in runner.discover(tmp_path)] == ["lab_x"]


def test_runner_with_no_labs_says_so(tmp_path, capsys):
    assert runner.main(["--profile", "ci", "--source", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "no labs yet" in capsys.readouterr().out


def test_runner_rejects_unknown_profile(tmp_path):
    with pytest.raises(ValueError, match="valid profiles"):
        runner.main(["--profile", "gpu", "--source", str(tmp_path)])


def test_figures_have_titles_and_labelled_axes(tmp_path):
    import pandas as pd

    curve = pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.0, 1.5]})
    fig = plots.loss_curves({"lora": curve})
    ax = fig.axes[0]
    assert ax.get_title() and "step" in ax.get_xlabel() and "nats" in ax.get_ylabel()
    fig = plots.bars(pd.DataFrame({"method": ["a", "b"], "pass_at_1": [0.1, 0.9]}), "method", "pass_at_1",
                     "pass@1 by method", "pass@1 (fraction of tests passed)")
    assert fig.axes[0].get_title() == "pass@1 by method"
    plots.save(fig, tmp_path / "f" / "fig.png")
    assert (tmp_path / "f" / "fig.png").stat().st_size > 1000
