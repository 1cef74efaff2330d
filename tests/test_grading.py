"""nbgrader round trip: the solution autogrades to full marks, the untouched release to zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import FIXTURES, SOLUTION_NOTEBOOKS
from labhelpers.course import grading
from labhelpers.paths import REPO_ROOT

SOLUTION_LABS = [p.stem for p in SOLUTION_NOTEBOOKS]


def _check_round_trip(scores: dict) -> None:
    solution = scores["solution"]
    assert solution["max_score"] > 0
    assert solution["score"] == solution["max_score"], solution["cells"]
    if "blank" in scores:
        assert scores["blank"]["score"] == 0, scores["blank"]["cells"]


@pytest.mark.slow
def test_round_trip_on_the_fixture_lab(tmp_path):
    _check_round_trip(grading.round_trip(tmp_path, "demo_lab", source=FIXTURES))
    released = (tmp_path / "labs" / "demo_lab" / "demo_lab.ipynb").read_text()
    assert "BEGIN HIDDEN TESTS" not in released and "### BEGIN SOLUTION" not in released
    assert "raise NotImplementedError()" in released


@pytest.mark.slow
@pytest.mark.parametrize("lab", SOLUTION_LABS or [None], ids=lambda lab: lab or "no-labs-yet")
def test_round_trip_on_every_lab(lab, tmp_path):
    if lab is None:  # nothing to grade yet: then nothing may have been released either
        assert not list((REPO_ROOT / "labs").glob("*/*.ipynb"))
        return
    # the papermill run already asserts the lab's effects; grading runs it in the smallest profile.
    # The untouched release is graded on the fixture lab (zero marks); here it would run every cell of
    # the lab a second time (about 4.5 minutes over the four labs), so the released answers are
    # checked to be stripped instead (test_every_released_answer_is_stripped).
    _check_round_trip(grading.round_trip(tmp_path, lab, env={"SFTLABS_PROFILE": "smoke"}, blank=False))
    # nbgrader goes on past an error in an ungraded cell: the solution must run clean in that profile too
    errors = _error_cells(tmp_path / "autograded" / "solution" / lab / f"{lab}.ipynb")
    assert not errors, f"{lab} fails in the smoke profile: {errors}"


def _error_cells(notebook: Path) -> list[str]:
    """``"In [n]: ename: evalue"`` for every cell of an executed notebook that shows an error."""
    nb = json.loads(notebook.read_text())
    return [f"In [{c.get('execution_count')}]: {o['ename']}: {o['evalue']}"[:300]
            for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]


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
