"""The nbgrader pipeline: release ``solutions/`` into ``labs/``, autograde, feedback, grades.

``python -m labhelpers.grading release|autograde LAB|feedback LAB|export`` is what the Makefile
calls. :func:`round_trip` drives a whole cycle in a scratch course folder (tests use it): release a
lab, submit the solution and the untouched release as two students, autograde both and return
their scores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from labhelpers.paths import REPO_ROOT
from labhelpers.runner import discover


def nbgrader(args: list[str], course_dir: Path, env: dict | None = None, timeout_s: int = 3600) -> str:
    """Run one nbgrader command in ``course_dir``; raise RuntimeError with its log when it fails."""
    # nbgrader shells out to tools of its environment (alembic, jupyter): put that environment first
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course_dir, capture_output=True, text=True,
                          env={**os.environ, "PATH": path, **(env or {})}, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"nbgrader {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def lab_names(course_dir: Path = REPO_ROOT) -> list[str]:
    return [p.stem for p in discover(course_dir / "solutions")]


def release(course_dir: Path = REPO_ROOT, labs: list[str] | None = None) -> list[Path]:
    """Generate the student version of each lab into ``labs/`` (solutions and hidden tests removed)."""
    out = []
    for lab in labs or lab_names(course_dir):
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


def autograde(course_dir: Path, lab: str, env: dict | None = None) -> str:
    return nbgrader(["autograde", lab, "--force"], course_dir, env=env)


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
    """Release ``lab``, autograde its solution (student ``solution``) and its untouched release
    (student ``blank``) in a scratch course at ``dest``; return :func:`scores`."""
    course = scratch_course(dest, [lab], source)
    release(course, [lab])
    submit(course, "solution", lab, course / "solutions" / lab / f"{lab}.ipynb")
    submit(course, "blank", lab, course / "labs" / lab / f"{lab}.ipynb")
    autograde(course, lab, env=env)
    return scores(course, lab)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("release", "autograde", "feedback", "export"):
        print("usage: python -m labhelpers.grading release | autograde LAB | feedback LAB | export")
        return 2
    command, rest = args[0], args[1:]
    if command == "release":
        for path in release():
            print(f"released {path.relative_to(REPO_ROOT)}")
        return 0
    if command in ("autograde", "feedback") and not rest:
        print(f"name the lab: make {command} LAB=<one of {', '.join(lab_names())}>")
        return 2
    nb_args = {"autograde": ["autograde", *rest, "--force"], "feedback": ["generate_feedback", *rest, "--force"],
               "export": ["export"]}[command]
    print(nbgrader(nb_args, REPO_ROOT))
    if command == "autograde":
        print(json.dumps(scores(REPO_ROOT, rest[0]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
