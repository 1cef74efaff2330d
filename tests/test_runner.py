"""The runner finds labs, and refuses what it cannot run with a message; a slow, failing or
interrupted lab keeps its executed notebook and names the cell."""

import inspect
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import fixture_lab

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


SLOW_CELL = "import time\ntime.sleep(600)"


def _lab_source(tmp_path, labs: dict[str, dict]):
    source = tmp_path / "solutions"
    for name, nb in labs.items():
        (source / name).mkdir(parents=True)
        (source / name / f"{name}.ipynb").write_text(json.dumps(nb, indent=1))
    return source


def _images(notebook) -> int:
    cells = json.loads(notebook.read_text())["cells"]
    return sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_a_cell_past_its_limit_is_named_and_the_outputs_before_it_are_kept(tmp_path):
    """``--cell-timeout`` is the only cell limit (make labs sets none); a lab that hits it keeps its
    executed notebook with every output before the cell, and the failure names that cell."""
    source = _lab_source(tmp_path, {"slow_lab": fixture_lab("slow_lab", before_save=SLOW_CELL)})
    run = runner.run_lab(source / "slow_lab" / "slow_lab.ipynb", tmp_path / "build", "ci", timeout_s=5)
    assert not run.passed and run.notebook.exists()
    assert _images(run.notebook) == 1, "the figure drawn before the slow cell is kept"
    assert run.failure.cell_first_line == "import time", run.failure
    assert "Timeout" in run.failure.error, run.failure
    assert "before any cell ran" not in run.failure.describe()


def test_make_labs_has_no_cell_time_limit():
    assert inspect.signature(runner.run_lab).parameters["timeout_s"].default is None
    source = inspect.getsource(runner.main)
    assert re.search(r'"--cell-timeout", type=int, default=None', source), "the CLI sets no cell limit by default"


@pytest.mark.slow
def test_an_interrupted_run_keeps_the_notebook_names_the_cell_and_stops(tmp_path):
    """SIGTERM (a closed terminal, a job killed) in the middle of a lab: the lab's notebook keeps what it
    showed, the summary names the cell, the labs after it do not run, and the exit status says so."""
    labs = {"a_stopped": fixture_lab("a_stopped", before_save=SLOW_CELL), "b_never": fixture_lab("b_never")}
    source, out = _lab_source(tmp_path, labs), tmp_path / "build"
    proc = subprocess.Popen([sys.executable, "-m", "labhelpers.course.runner", "--profile", "ci", "--out", str(out),
                             "--source", str(source)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    executed = out / "a_stopped" / "a_stopped.ipynb"
    deadline = time.monotonic() + 240
    while not (executed.exists() and _started(executed, "time.sleep(600)")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0] if proc.poll() is not None else "no start"
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    assert "interrupted in a_stopped" in stdout and "b_never" not in stdout, stdout
    assert _images(executed) == 1, "the figure drawn before the interruption is kept"
    summary = (out / "summary.md").read_text()
    assert "| a_stopped | FAILED |" in summary and "b_never" not in summary, summary
    assert re.search(r"failed at (cell In \[\d+\]|the cell) `import time`: Interrupted: stopped by signal SIGTERM",
                     summary), summary


def _started(notebook, source: str) -> bool:
    try:
        cells = json.loads(notebook.read_text())["cells"]
    except ValueError:  # being written
        return False
    index = next(i for i, c in enumerate(cells) if "".join(c["source"]).endswith(source))
    return bool(cells[index - 1].get("metadata", {}).get("papermill", {}).get("end_time"))
