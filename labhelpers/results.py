"""Where a lab run records its measured numbers, so tests and the results summary can read them.

A notebook calls ``save_metrics("lab1_peft", {...})`` once, at its end (each call replaces the file);
``make labs`` and the notebook tests point ``SFTLABS_RESULTS`` at the run's output folder. Values must be
JSON numbers, strings or booleans.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from labhelpers.paths import build_dir


def results_dir() -> Path:
    return Path(os.environ.get("SFTLABS_RESULTS", build_dir()))


def save_metrics(lab: str, metrics: dict) -> Path:
    """Write ``metrics`` to ``<results>/<lab>/metrics.json`` (atomic write) and return its path.

    The file holds this run's metrics only: what an earlier run wrote there is replaced, never merged,
    so a summary cannot mix runs. Each lab calls this once, at its end. Nothing is written when a value
    is not a finite number, a string or a boolean."""
    for key, value in metrics.items():
        if not isinstance(value, (int, float, str, bool)) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"metric {key!r} is {value!r}; metrics must be finite numbers, strings or booleans")
    path = results_dir() / lab / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = {k: float(v) if isinstance(v, float) else v for k, v in metrics.items()}
    write_atomic(path, json.dumps(fresh, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_metrics(lab: str, root: Path | None = None) -> dict:
    path = (root or results_dir()) / lab / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the {lab} notebook did not call save_metrics")
    return json.loads(path.read_text())
