"""Tools in their own environments (labhelpers.tool_env): where they are, how their programs run."""

import sys
from pathlib import Path

import pytest

from labhelpers.tool_env import ToolEnvironment, run_logged

TOOL = ToolEnvironment("Tool", "SFTLABS_TEST_TOOL_ENV", ".venv-tool", "python", "tool", extra={"TOOL_TELEMETRY": "0"})


def test_a_missing_environment_names_the_make_target_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(TOOL.variable, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"run `make -C .+ tool`.+tools/tool/requirements.txt.+SFTLABS_TEST_TOOL_ENV"):
        TOOL.path()


def test_its_programs_run_offline_first_on_path_without_the_course_pythonpath(monkeypatch):
    env = Path(sys.prefix)  # any environment with a python stands in
    monkeypatch.setenv(TOOL.variable, str(env))
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    variables = TOOL.variables()
    assert variables["PATH"].split(":")[0] == str(env / "bin") and variables["VIRTUAL_ENV"] == str(env)
    assert "PYTHONPATH" not in variables and variables["HF_HUB_OFFLINE"] == "1" and variables["TOOL_TELEMETRY"] == "0"
    assert TOOL.bin("python") == str(env / "bin" / "python")


def test_run_logged_keeps_the_log_and_a_failure_shows_its_end(tmp_path):
    done = run_logged([sys.executable, "-c", "print('hello')"], tmp_path / "ok.log")
    assert done.text().strip() == "hello" and done.seconds > 0
    script = "import sys\nfor i in range(40): print('line', i)\nsys.exit(3)"
    with pytest.raises(RuntimeError, match=r"(?s)failed \(exit 3\).+line 39") as failure:
        run_logged([sys.executable, "-c", script], tmp_path / "bad.log")
    assert "line 0\n" not in str(failure.value)  # the end of the log, not all of it
    assert (tmp_path / "bad.log").read_text().count("line") == 40
