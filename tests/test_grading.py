"""The released labs are up to date and give nothing away. The round trip (a solution autogrades to
full marks, the untouched release to zero) is tested through make on the fixture lab
(tests/test_make_targets.py::test_instructor_cycle_through_make), and every real lab's solution is
autograded in tests/test_notebooks.py (test_notebook_runs_and_grades_in_the_t4_rehearsal)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import SOLUTION_NOTEBOOKS
from labhelpers.course import grading
from labhelpers.paths import REPO_ROOT

SOLUTION_LABS = [p.stem for p in SOLUTION_NOTEBOOKS]


def _cells(notebook: Path) -> list[tuple]:
    nb = json.loads(notebook.read_text())
    return [(c["cell_type"], "".join(c["source"]), json.dumps(c["metadata"].get("nbgrader"), sort_keys=True))
            for c in nb["cells"]]


def test_released_labs_are_up_to_date(tmp_path):
    released = sorted(p.name for p in (REPO_ROOT / "labs").iterdir() if p.is_dir()) if (REPO_ROOT / "labs").exists() else []
    assert released == sorted(SOLUTION_LABS), "labs/ and solutions/ hold different labs; run make release"
    if not SOLUTION_LABS:
        return
    course = grading.scratch_course(tmp_path, SOLUTION_LABS)
    for fresh in grading.release(course):
        committed = REPO_ROOT / "labs" / fresh.parent.name / fresh.name
        assert _cells(fresh) == _cells(committed), f"{committed} is out of date; run make release"


def test_hidden_tests_never_released():
    for notebook in (REPO_ROOT / "labs").glob("*/*.ipynb"):
        text = notebook.read_text()
        assert "BEGIN HIDDEN TESTS" not in text and "BEGIN SOLUTION" not in text, notebook


@pytest.mark.parametrize("lab", SOLUTION_LABS)
def test_every_released_answer_is_stripped(lab):
    """What a student gets cannot pass an exercise untouched: every autograded answer cell of the
    release raises NotImplementedError (that no solution or hidden test is left anywhere in it is
    test_hidden_tests_never_released)."""
    nb = json.loads((REPO_ROOT / "labs" / lab / f"{lab}.ipynb").read_text())
    graded = [c for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("solution")]
    assert graded, f"{lab} has no exercise"
    for cell in graded:
        source = "".join(cell["source"])
        assert "raise NotImplementedError()" in source, source[:300]
