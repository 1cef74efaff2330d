"""The instructor's whole cycle, and grading that survives what students do to their notebooks.

Runs on the small fixture lab (two exercises, 3 points): release, students submit into
``submitted/<student>/<lab>/``, autograde, feedback, export to CSV.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from helpers import FIXTURES
from labhelpers.course import grading

LAB = "demo_lab"
GOOD = {"mean_of": "def mean_of(xs):\n    return sum(xs) / len(xs)\n",
        "largest": "def largest(xs):\n    best = xs[0]\n    for x in xs:\n        best = x if x > best else best\n    return best\n"}

# passes the visible assert (positive numbers) and fails the hidden one (all negative: 0 is returned)
FAILS_ONLY_HIDDEN = "def largest(xs):\n    best = 0\n    for x in xs:\n        best = x if x > best else best\n    return best\n"


def _fill(nb: dict, answers: dict) -> dict:
    for cell in nb["cells"]:
        grade_id = cell["metadata"].get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell["source"] = answers[grade_id]
    return nb


def _student_notebooks(course: Path) -> dict[str, dict]:
    released = json.loads((course / "labs" / LAB / f"{LAB}.ipynb").read_text())

    def copy(answers):
        return _fill(json.loads(json.dumps(released)), answers)

    tampered = copy({**GOOD, "mean_of": "def mean_of(xs):\n    return 0\n", "test_mean_of": "pass\n"})
    deleted = copy(GOOD)
    deleted["cells"] = [c for c in deleted["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") != "test_largest"]
    reordered = copy(GOOD)
    cells = reordered["cells"]
    i = next(k for k, c in enumerate(cells) if c["metadata"].get("nbgrader", {}).get("grade_id") == "largest")
    cells.insert(2, cells.pop(i))  # the second exercise's solution moved up, before the first
    return {
        "perfect": copy(GOOD),
        "wrong": copy({**GOOD, "mean_of": "def mean_of(xs):\n    return sum(xs) / (len(xs) + 1)\n"}),
        "crashes": copy({**GOOD, "mean_of": "def mean_of(xs):\n    raise RuntimeError('oops')\n"}),
        "hangs": copy({**GOOD, "mean_of": "def mean_of(xs):\n    while True:\n        pass\n"}),
        "memory_hog": copy({**GOOD, "mean_of": "def mean_of(xs):\n    hog = bytearray(64 * 2**30)\n    return 0\n"}),
        "tampered": tampered,
        "deleted": deleted,
        "reordered": reordered,
        "fails_hidden": copy({**GOOD, "largest": FAILS_ONLY_HIDDEN}),
    }


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    course = grading.scratch_course(tmp_path_factory.mktemp("course"), [LAB], source=FIXTURES)
    grading.release(course, [LAB])
    for student, nb in _student_notebooks(course).items():
        path = course / "incoming" / f"{student}.ipynb"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(nb))
        grading.submit(course, student, LAB, path)
    start = time.perf_counter()
    grading.autograde(course, LAB, timeout_s=20)
    seconds = time.perf_counter() - start
    return course, grading.scores(course, LAB), seconds


@pytest.mark.slow
def test_perfect_and_wrong_students_export_full_and_partial_marks(graded):
    course, scores, _ = graded
    assert scores["perfect"]["score"] == scores["perfect"]["max_score"] == 3
    assert scores["wrong"]["score"] == 1, scores["wrong"]["cells"]
    files = grading.feedback(course, LAB)
    assert {f.parent.parent.name for f in files} >= {"perfect", "wrong"}
    assert "oops" not in (course / "feedback" / "perfect" / LAB / f"{LAB}.html").read_text()
    rows = {r["student_id"]: r for r in csv.DictReader(grading.export(course).open())}
    assert float(rows["perfect"]["score"]) == 3 and float(rows["perfect"]["max_score"]) == 3
    assert float(rows["wrong"]["score"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("student", ["crashes", "hangs", "memory_hog"])
def test_a_failing_exercise_leaves_the_others_graded(graded, student):
    """An exception, a hang (per-cell time limit) or a memory bomb (address-space cap) costs only its cell."""
    _, scores, _ = graded
    assert scores[student]["cells"] == {"test_mean_of": 0, "test_largest": 1}


@pytest.mark.slow
def test_a_hanging_cell_does_not_hold_up_grading(graded):
    _, _, seconds = graded
    assert seconds < 240  # nine students, one of them hanging: the per-cell limit ends it


@pytest.mark.slow
def test_hidden_tests_run_at_grading(graded):
    """A solution that passes the visible assert but not the hidden ones loses that exercise's points."""
    visible = next(c for c in json.loads((FIXTURES / LAB / f"{LAB}.ipynb").read_text())["cells"]
                   if c["metadata"].get("nbgrader", {}).get("grade_id") == "test_largest")
    namespace: dict = {}
    exec(FAILS_ONLY_HIDDEN, namespace)
    exec("".join(visible["source"]).split("### BEGIN HIDDEN TESTS")[0], namespace)  # the visible part passes
    _, scores, _ = graded
    assert scores["fails_hidden"]["cells"] == {"test_mean_of": 2, "test_largest": 0}


@pytest.mark.slow
def test_edited_tests_are_restored_before_grading(graded):
    _, scores, _ = graded
    assert scores["tampered"]["cells"]["test_mean_of"] == 0  # the original assert ran, not "pass"


@pytest.mark.slow
def test_deleted_and_reordered_cells(graded):
    _, scores, _ = graded
    assert scores["reordered"]["score"] == 3
    assert scores["deleted"]["cells"]["test_mean_of"] == 2  # a deleted test cell earns nothing, the rest counts
    assert scores["deleted"]["cells"].get("test_largest", 0) in (0, 1)


@pytest.mark.slow
def test_check_reports_each_exercise(tmp_path, capsys):
    course = grading.scratch_course(tmp_path, [LAB], source=FIXTURES)
    grading.release(course, [LAB])
    released = json.loads((course / "labs" / LAB / f"{LAB}.ipynb").read_text())
    mine = tmp_path / "mine" / f"{LAB}.ipynb"
    mine.parent.mkdir()
    mine.write_text(json.dumps(_fill(released, {"mean_of": GOOD["mean_of"]})))
    table = grading.check(mine, timeout_s=60).set_index("exercise")
    assert bool(table.loc["test_mean_of", "passed"]) and not bool(table.loc["test_largest", "passed"])
    assert "NotImplementedError" in table.loc["test_largest", "problem"]
    assert "2 of 3 points" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="labs/lab1_peft"):
        grading.check(tmp_path / "missing.ipynb")
