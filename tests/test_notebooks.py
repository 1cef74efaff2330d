"""Every lab notebook runs headlessly in the ``ci`` profile and shows its effect.

The fixture ``demo_lab`` proves the harness itself (parameters injection, metrics capture). A lab
in ``solutions/`` without an entry in ``EFFECTS`` fails: "cells ran" is not enough.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from labhelpers.paths import REPO_ROOT
from labhelpers.runner import discover, run_lab

FIXTURES = Path(__file__).parent / "fixtures"


def _demo(metrics: dict) -> None:
    assert metrics["profile"] == "ci"  # PROFILE was injected into the parameters cell
    assert metrics["mean"] == pytest.approx(3.0)


EFFECTS: dict[str, Callable[[dict], None]] = {"demo_lab": _demo}
NOTEBOOKS = discover(FIXTURES) + discover(REPO_ROOT / "solutions")


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_its_effect(notebook, tmp_path):
    assert notebook.stem in EFFECTS, f"add an effects check for {notebook.stem} to tests/test_notebooks.py"
    run = run_lab(notebook, tmp_path, profile="ci")
    EFFECTS[notebook.stem](run.metrics)
    assert (tmp_path / notebook.stem / notebook.name).exists()


@pytest.mark.parametrize("notebook", NOTEBOOKS + discover(REPO_ROOT / "labs"), ids=lambda p: str(p.parent.name))
def test_notebook_conventions(notebook):
    nb = json.loads(notebook.read_text())
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    first = code_cells[0]
    assert "parameters" in first["metadata"].get("tags", []), "first code cell must be tagged 'parameters'"
    assert "".join(first["source"]).strip() == 'PROFILE = "auto"'
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code_cells), \
        "commit notebooks without outputs"
