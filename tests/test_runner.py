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


def test_the_summary_counts_each_labs_claims_and_names_those_not_held(tmp_path):
    from labhelpers.course.runner import LabRun, write_summary

    notebook = tmp_path / "lab" / "lab.ipynb"
    run = LabRun("lab", notebook, 12.0, {"profile": "ci", "claim_replay_forgets_less": True,
                                         "claim_ewc_beats_l2_at_0_1": False, "score": 0.5})
    text = write_summary([run], tmp_path, "ci").read_text()
    assert "- claims held: 1 of 2 (not held: ewc_beats_l2_at_0_1)" in text
    plain = write_summary([LabRun("lab", notebook, 1.0, {"score": 0.5})], tmp_path, "ci").read_text()
    assert "claims held" not in plain
