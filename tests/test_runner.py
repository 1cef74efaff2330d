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


def test_processor_names_the_model_the_cores_and_the_matrix_units_present(tmp_path):
    import os

    cores = len(os.sched_getaffinity(0))
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                       "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\n"
                       "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse avx2\n")
    assert runner.processor(cpuinfo) == f"Intel(R) Xeon(R) Processor, {cores} cores, amx_bf16 avx512_bf16 avx512f avx2"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu sse sse2 avx\n")
    assert runner.processor(cpuinfo) == f"Old CPU, {cores} cores, none of " + "/".join(runner.MATRIX_UNITS)
    assert runner.processor(tmp_path / "absent").endswith(f", {cores} cores")  # no /proc: Python's name for it


def test_summary_and_report_name_the_processor(tmp_path):
    from labhelpers.course.runner import LabRun, environment, processor, write_summary

    run = LabRun("lab", tmp_path / "lab" / "lab.ipynb", 12.0, {"score": 0.5})
    assert f"Processor: {processor()} " in write_summary([run], tmp_path, "ci").read_text()
    assert environment()["processor"] == processor()
