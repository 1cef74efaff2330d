"""The nbgrader pipeline: release ``solutions/`` into ``labs/``, check, autograde, feedback, grades.

``python -m labhelpers.course.grading release | check NOTEBOOK | autograde LAB | feedback LAB | export`` is
what the Makefile calls. :func:`round_trip` drives a whole cycle in a scratch course folder (tests use
it): release a lab, submit the solution and the untouched release as two students, autograde both
and return their scores.

Grading runs student code. Notebooks execute in their own kernel, one cell at a time with a time
limit (``nbgrader_config.py``: 900 s, or ``timeout_s``), in the smallest profile (``smoke``) unless
``SFTLABS_PROFILE`` says otherwise; locked cells (the tests) are restored from the gradebook before
execution, so a student cannot edit the asserts away. See the instructor guide for the trust model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from labhelpers.course.colab import sync_notebook
from labhelpers.course.runner import discover, stderr_to
from labhelpers.paths import REPO_ROOT
from labhelpers.units import GiB


def _memory_limit(gib: float | None):
    """A ``preexec_fn`` capping the address space of nbgrader and every kernel it starts."""
    if not gib:
        return None

    def apply() -> None:
        import resource

        limit = int(gib * GiB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def nbgrader(args: list[str], course_dir: Path, env: dict | None = None, timeout_s: int = 3600,
             memory_gib: float | None = None) -> str:
    """Run one nbgrader command in ``course_dir``; raise RuntimeError with its log when it fails.

    ``memory_gib`` caps the address space of nbgrader and of each kernel it runs (a student's memory
    bomb then gets ``MemoryError`` in its own cell instead of taking the machine down)."""
    # nbgrader shells out to tools of its environment (alembic, jupyter): put that environment first
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course_dir, capture_output=True, text=True,
                          env={**os.environ, "PATH": path, **(env or {})}, timeout=timeout_s,
                          preexec_fn=_memory_limit(memory_gib))
    if proc.returncode != 0:
        raise RuntimeError(f"nbgrader {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


GRADING_PROFILE = "smoke"  # every graded notebook runs its cells in the smallest profile
GRADING_MEMORY_GIB = 8.0  # address-space cap of each grading kernel (a smoke-profile lab needs about 1.5)


def grading_env(env: dict | None = None) -> dict:
    """Environment for running student notebooks: the grading profile unless one is set already."""
    return {"SFTLABS_PROFILE": os.environ.get("SFTLABS_PROFILE", GRADING_PROFILE), **(env or {})}


def lab_names(course_dir: Path = REPO_ROOT) -> list[str]:
    return [p.stem for p in discover(course_dir / "solutions")]


def release(course_dir: Path = REPO_ROOT, labs: list[str] | None = None) -> list[Path]:
    """Generate the student version of each lab into ``labs/`` (solutions and hidden tests removed),
    after syncing each source's Colab badge and setup cell (:mod:`labhelpers.course.colab`)."""
    out = []
    for lab in labs or lab_names(course_dir):
        sync_notebook(course_dir / "solutions" / lab / f"{lab}.ipynb")
        nbgrader(["generate_assignment", lab, "--force"], course_dir)
        out.append(course_dir / "labs" / lab / f"{lab}.ipynb")
    return out


def scratch_course(dest: Path, labs: list[str], source: Path = REPO_ROOT / "solutions") -> Path:
    """A fresh course folder with our ``nbgrader_config.py`` and copies of the given labs' sources."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "nbgrader_config.py", dest / "nbgrader_config.py")
    for lab in labs:
        shutil.copytree(source / lab, dest / "solutions" / lab, dirs_exist_ok=True)
    return dest


def submit(course_dir: Path, student: str, lab: str, notebook: Path) -> Path:
    """Place ``notebook`` as ``student``'s submission of ``lab`` (with the timestamp nbgrader expects)."""
    target = course_dir / "submitted" / student / lab
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(notebook, target / f"{lab}.ipynb")
    (target / "timestamp.txt").write_text("2026-01-01 00:00:00.000000 UTC")
    return target / f"{lab}.ipynb"


def autograde(course_dir: Path, lab: str, env: dict | None = None, timeout_s: int | None = None,
              memory_gib: float = GRADING_MEMORY_GIB) -> str:
    """Autograde every submission of ``lab``: each in its own kernel, ``timeout_s`` per cell (default:
    ``nbgrader_config.py``), ``memory_gib`` of address space per process."""
    limit = [f"--Execute.timeout={timeout_s}"] if timeout_s else []
    return nbgrader(["autograde", lab, "--force", *limit], course_dir, env=grading_env(env), memory_gib=memory_gib)


def feedback(course_dir: Path, lab: str) -> list[Path]:
    """Generate the HTML feedback of every autograded submission; returns the files."""
    nbgrader(["generate_feedback", lab, "--force"], course_dir)
    return sorted((course_dir / "feedback").glob(f"*/{lab}/*.html"))


def export(course_dir: Path) -> Path:
    """Export the gradebook to ``grades.csv`` (one row per student and assignment) and return it."""
    nbgrader(["export", "--to", str(course_dir / "grades.csv")], course_dir)
    return course_dir / "grades.csv"


def check(notebook: Path, env: dict | None = None, timeout_s: int = 900) -> "pd.DataFrame":
    """Run a student's notebook the way the grader does (``nbgrader validate``: a fresh kernel, every
    cell in order, the grading profile) and return one row per graded test cell: points, passed, the
    error's last line. Prints the table. A notebook whose graded cells were changed is reported too."""
    from nbgrader.utils import chdir
    from nbgrader.validator import Validator
    from traitlets.config import Config

    notebook = Path(notebook).resolve()
    if not notebook.exists():
        raise FileNotFoundError(f"{notebook} does not exist; pass the path of your lab notebook, "
                                "e.g. labs/lab1_peft/lab1_peft.ipynb")
    config = Config()
    config.Execute.timeout = timeout_s
    validator = Validator(config=config)
    old = {k: os.environ.get(k) for k in grading_env(env)}
    os.environ.update(grading_env(env))
    try:
        with chdir(str(notebook.parent)), tempfile.TemporaryDirectory() as tmp:
            import nbformat

            log = Path(tmp) / "kernel.log"
            try:  # the kernel's start-up log ("running over TCP without encryption") only if it fails
                with stderr_to(log):
                    nb = validator._preprocess(nbformat.read(notebook.name, as_version=4))
            except Exception:
                print(log.read_text()[-3000:], file=sys.stderr)
                raise
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    changed = {id(c) for c in validator._get_changed_cells(nb)}
    rows = []
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if not meta.get("grade"):
            continue
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        rows.append({"exercise": meta["grade_id"], "points": meta.get("points", 0),
                     "passed": not errors and id(cell) not in changed,
                     "problem": ("this graded cell was changed: restore it from the released lab" if id(cell) in changed
                                 else f"{errors[0]['ename']}: {errors[0]['evalue']}"[:200] if errors else "")})
    table = pd.DataFrame(rows, columns=["exercise", "points", "passed", "problem"])
    earned = int(table.loc[table["passed"], "points"].sum())
    print(table.to_string(index=False))
    print(f"{earned} of {int(table['points'].sum())} points would be awarded by the visible tests "
          "(the grader also runs hidden tests).")
    return table


def scores(course_dir: Path, lab: str) -> dict[str, dict]:
    """``{student: {"score": points, "max_score": points, "cells": {grade_id: points}}}`` from the gradebook."""
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course_dir / 'gradebook.db'}") as gb:
        out = {}
        for sub in gb.assignment_submissions(lab):
            cells = {g.name: g.score for nb in sub.notebooks for g in nb.grades}
            out[sub.student_id] = {"score": sub.score, "max_score": sub.max_score, "cells": cells}
        return out


def round_trip(dest: Path, lab: str, source: Path = REPO_ROOT / "solutions", env: dict | None = None) -> dict:
    """Release ``lab`` and autograde its solution (student ``solution``) in a scratch course at ``dest``,
    with ``env`` added to the grading environment (e.g. a profile); return :func:`scores`."""
    course = scratch_course(dest, [lab], source)
    release(course, [lab])
    submit(course, "solution", lab, course / "solutions" / lab / f"{lab}.ipynb")
    autograde(course, lab, env=env)
    return scores(course, lab)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("release", "check", "autograde", "feedback", "export"):
        print("usage: python -m labhelpers.course.grading release | check NOTEBOOK | autograde LAB | feedback LAB | export")
        return 2
    command, rest = args[0], args[1:]
    if command == "check":
        if not rest:
            print(f"name the lab: make check LAB=<one of {', '.join(lab_names())}>")
            return 2
        target = Path(rest[0])
        if not target.suffix:  # a lab name: the student's copy in labs/
            target = REPO_ROOT / "labs" / rest[0] / f"{rest[0]}.ipynb"
        table = check(target)
        return 0 if table["passed"].all() else 1
    if command == "release":
        for path in release():
            print(f"released {path.relative_to(REPO_ROOT)}")
        return 0
    if command in ("autograde", "feedback") and not rest:
        print(f"name the lab: make {command} LAB=<one of {', '.join(lab_names())}>")
        return 2
    nb_args = {"autograde": ["autograde", *rest, "--force"], "feedback": ["generate_feedback", *rest, "--force"],
               "export": ["export", "--to", "grades.csv"]}[command]
    print(nbgrader(nb_args, REPO_ROOT, env=grading_env() if command == "autograde" else None,
                   memory_gib=GRADING_MEMORY_GIB if command == "autograde" else None))
    if command == "autograde":
        print(json.dumps(scores(REPO_ROOT, rest[0]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
