"""Colab: every lab carries the badge and the same setup cell, and the setup cell really installs
the course into a fresh environment that already has torch, without touching torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import RELEASED_NOTEBOOKS, SOLUTION_NOTEBOOKS
from labhelpers.course import colab
from labhelpers.paths import REPO_ROOT

LABS = RELEASED_NOTEBOOKS


@pytest.mark.parametrize("notebook", LABS + SOLUTION_NOTEBOOKS, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_every_lab_has_the_badge_and_the_setup_cell(notebook):
    nb = json.loads(notebook.read_text())
    assert "".join(nb["cells"][0]["source"]) == colab.badge(notebook.stem), "run make release"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assert "".join(code[1]["source"]) == colab.setup_cell_source(), "run make release"


def test_readme_links_every_lab_on_colab():
    readme = (REPO_ROOT / "README.md").read_text()
    for notebook in LABS:
        assert colab.badge(notebook.stem) in readme, notebook.stem


def test_setup_cell_does_nothing_outside_colab(monkeypatch):
    monkeypatch.delenv("SFTLABS_COLAB", raising=False)
    before = dict(os.environ)
    exec(colab.setup_cell_source(), {})
    assert dict(os.environ) == before


def test_setup_cell_on_colab_clones_installs_and_points_the_course_at_the_clone(monkeypatch):
    """What the cell runs on Colab (its commands recorded, not run) and what it leaves set: the data and
    the checkout (Lab 1b's tool environments are built and looked for there) are the clone's."""
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: commands.append(command))
    monkeypatch.setenv("SFTLABS_COLAB", "1")
    for name in ("SFTLABS_COURSE_DIR", "SFTLABS_DATA", "HF_HUB_OFFLINE"):  # unset here, restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    exec(colab.setup_cell_source(), {})
    clone = "/content/sft-labs"
    assert commands[0][:2] == ["git", "clone"] and commands[0][-1] == clone
    assert commands[1] == [sys.executable, "-m", "pip", "install", "--quiet", clone]
    assert os.environ["SFTLABS_COURSE_DIR"] == clone and os.environ["SFTLABS_DATA"] == f"{clone}/data"


def _first_cells(notebook: Path, n: int) -> str:
    nb = json.loads(notebook.read_text())
    sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"][:n]
    return "\n".join(sources)


@pytest.mark.slow
def test_setup_cell_installs_the_course_next_to_an_existing_torch(tmp_path):
    import torch

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    subprocess.run([python, "-m", "pip", "install", "--quiet", torch_pin], check=True, timeout=900)
    before = subprocess.run([python, "-c", "import torch; print(torch.__version__, torch.__file__)"],
                            capture_output=True, text=True, check=True).stdout
    # the course as Colab gets it: this commit, cloned
    course = tmp_path / "sft-labs"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(course)], check=True)
    script = _first_cells(REPO_ROOT / "labs" / "lab1_peft" / "lab1_peft.ipynb", 3)
    script += "\nimport labhelpers, torch\nprint('LABHELPERS', labhelpers.__file__)\nprint('PROFILE', profile.name)\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFTLABS_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(SFTLABS_COLAB="1", SFTLABS_COURSE_DIR=str(course), HF_HUB_OFFLINE="1",
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    run = subprocess.run([python, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert re.search(r"LABHELPERS .*venv.*site-packages", run.stdout), run.stdout[-2000:]
    assert "PROFILE cpu" in run.stdout
    after = subprocess.run([python, "-c", "import torch; print(torch.__version__, torch.__file__)"],
                           capture_output=True, text=True, check=True).stdout
    assert after == before, "installing the course changed torch"


COLAB_PYTHON = "3.12"  # Colab's runtime


# Packages published as source only (deepspeed, and three of lm-eval's dependencies); each builds into a
# pure-Python wheel (checked below; deepspeed compiles no op unless asked), so Colab installs them without
# a compiler
PURE_PYTHON_SDISTS = ("sqlitedict==2.1.0", "word2number==1.1", "rouge-score==0.1.2", "deepspeed==0.19.8")
# the same for the pins of Lab 1b's tool environments (tools/<tool>/requirements.txt), by name
TOOLS, TOOL_SDISTS = ("axolotl", "unsloth"), ("axolotl-contribs-lgpl", "axolotl-contribs-mit", "langdetect",
                                              "rouge-score", "sqlitedict", "word2number")


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-")


def _pins(requirements: Path) -> dict[str, str]:
    """``{name: version}`` of every ``name==version`` line of a requirements file."""
    return {_normalized(n): v for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", requirements.read_text(), re.M)}


def _resolve_for_colab(tmp_path: Path, wheels: Path, *what: str, isolated: bool = False) -> dict[str, str]:
    """``{name: version}`` of what pip's resolver picks for ``what`` on Colab's Python, binary wheels only
    (``wheels``: the source-only packages, built), without installing; ``isolated`` leaves out this
    machine's pip settings."""
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "pip", "install", *(["--isolated"] if isolated else []), "--dry-run",
                          "--quiet", "--ignore-installed", "--report", str(report), "--python-version", COLAB_PYTHON,
                          "--only-binary=:all:", "--find-links", str(wheels), "--target", str(tmp_path / "target"),
                          *what], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {_normalized(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


@pytest.fixture(scope="module")
def source_only_wheels(tmp_path_factory) -> Path:
    """The source-only packages of the course's and the tools' pins, built into ``py3-none-any`` wheels."""
    wheels = tmp_path_factory.mktemp("wheels")
    tool_pins = {f"{name}=={version}" for tool in TOOLS
                 for name, version in _pins(REPO_ROOT / "tools" / tool / "requirements.txt").items() if name in TOOL_SDISTS}
    wanted = {*PURE_PYTHON_SDISTS, *tool_pins}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), *sorted(wanted)],
                   check=True, capture_output=True, timeout=600)
    built = sorted(w.name for w in wheels.glob("*.whl"))
    assert len(built) == len(wanted) and all(w.endswith("-py3-none-any.whl") for w in built), built
    return wheels


@pytest.mark.slow
def test_the_install_set_resolves_for_colabs_python(tmp_path, source_only_wheels):
    """What the setup cell installs (this package and its pins) resolves for Colab's Python with
    binary wheels only, but for the few pure-Python source packages of :data:`PURE_PYTHON_SDISTS`,
    built here into ``py3-none-any`` wheels: pip's own resolver, without installing (network: the
    package index)."""
    resolved = _resolve_for_colab(tmp_path, source_only_wheels, str(REPO_ROOT))
    pins = re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text().split("[project.optional")[0])
    assert pins and all(resolved.get(_normalized(name)) == version for name, version in pins), \
        {name: resolved.get(_normalized(name)) for name, _ in pins}
    assert "torch" in resolved  # on Colab its preinstalled torch satisfies torch>=2.4 and stays


@pytest.mark.slow
@pytest.mark.parametrize("tool", TOOLS)
def test_the_tools_pins_resolve_with_the_cuda_torch_for_colabs_python(tool, tmp_path, source_only_wheels):
    """``make axolotl`` / ``make unsloth`` on a GPU machine or on Colab (the Makefile falls back to Colab's
    Python where python3.11 is missing): pip resolves the tool's whole pin set against the package index's
    torch 2.13.0, the CUDA build, which requires one triton release. ``--isolated`` leaves out this
    machine's pip settings, which offer torch's CPU build from its disk (it requires no triton, so a wrong
    triton pin resolves here and nowhere else)."""
    requirements = REPO_ROOT / "tools" / tool / "requirements.txt"
    resolved = _resolve_for_colab(tmp_path, source_only_wheels, "-r", str(requirements), isolated=True)
    pins = _pins(requirements)
    assert {name: resolved.get(name) for name in pins} == pins
    assert resolved["torch"] == "2.13.0" and any(name.startswith("nvidia-") for name in resolved)  # the CUDA build
