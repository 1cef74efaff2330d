"""The runner finds labs, and refuses what it cannot run with a message."""

import pytest

from labhelpers.course import runner


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
