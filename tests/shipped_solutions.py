"""The exercises' reference solutions, taken from ``solutions/<lab>/<lab>.ipynb`` by nbgrader ``grade_id``.

Tests check the graded checks (and the library) against what the course ships, never against a hand
copy that could drift from it. A solution cell is executed in a namespace holding what the lab's
earlier cells import (``torch``, ``nn``, ``math``, labhelpers' ``quantization``, Lab 1b's driver ``lab1b``).
"""

from __future__ import annotations

import json
import math
from functools import cache

import torch
from torch import nn

from labhelpers import quantization
from labhelpers.labs import lab1b
from labhelpers.paths import REPO_ROOT

NOTEBOOK_NAMES = {"torch": torch, "nn": nn, "math": math, "quantization": quantization, "lab1b": lab1b}


@cache
def _cells(lab: str) -> dict[str, str]:
    nb = json.loads((REPO_ROOT / "solutions" / lab / f"{lab}.ipynb").read_text())
    return {c["metadata"]["nbgrader"]["grade_id"]: "".join(c["source"]) for c in nb["cells"]
            if c["metadata"].get("nbgrader", {}).get("solution")}


@cache
def _namespace(lab: str, grade_id: str) -> dict:
    cells = _cells(lab)
    if grade_id not in cells:
        raise KeyError(f"{lab} has no solution cell {grade_id!r}; it has {sorted(cells)}")
    namespace = {"__name__": f"solutions.{lab}.{grade_id}", **NOTEBOOK_NAMES}
    exec(compile(cells[grade_id], f"<{lab}:{grade_id}>", "exec"), namespace)
    return namespace


def solution(lab: str, grade_id: str, name: str):
    """What the solution cell ``grade_id`` of ``lab`` defines as ``name`` (a function or class)."""
    return _namespace(lab, grade_id)[name]
