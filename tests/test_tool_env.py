"""Tools in their own environments (labhelpers.tool_env): where they are, how their programs run."""

import re
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


def test_without_its_variable_it_is_looked_for_in_the_course_checkout(tmp_path, monkeypatch):
    """On Colab the package is installed from the clone (the setup cell sets SFTLABS_COURSE_DIR to it), so
    the environment and the `make -C` of the fix are the clone's, not the installed package's folder."""
    from labhelpers.paths import REPO_ROOT

    monkeypatch.delenv(TOOL.variable, raising=False)
    clone = tmp_path / "sft-labs"
    monkeypatch.setenv("SFTLABS_COURSE_DIR", str(clone))
    with pytest.raises(FileNotFoundError, match=re.escape(f"missing at {clone / '.venv-tool'}: run `make -C {clone} tool`")):
        TOOL.path()
    monkeypatch.delenv("SFTLABS_COURSE_DIR")
    with pytest.raises(FileNotFoundError, match=re.escape(f"missing at {REPO_ROOT / '.venv-tool'}: run `make -C {REPO_ROOT} tool`")):
        TOOL.path()
