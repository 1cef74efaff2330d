"""Where the project's data and shipped base model live.

``SFTLABS_DATA`` overrides the data directory (used on Colab, where the package is installed from a
wheel and the data is fetched next to the notebook); otherwise it is ``<repo>/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def course_dir() -> Path:
    """The course's checkout: its Makefile, ``tools/`` and the tools' own environments (``.venv-axolotl``).
    ``SFTLABS_COURSE_DIR`` where set (the Colab setup cell sets it to its clone: there the package is
    installed from it, so :data:`REPO_ROOT` is the site-packages folder), else :data:`REPO_ROOT`."""
    return Path(os.environ.get("SFTLABS_COURSE_DIR") or REPO_ROOT)


def data_dir() -> Path:
    """Directory holding the JSONL task files and ``base-model*/`` folders."""
    return Path(os.environ.get("SFTLABS_DATA", REPO_ROOT / "data"))


def base_model_dir(size: str = "tiny") -> Path:
    """Folder of a shipped tiny base model: ``data/base-model`` for ``tiny``, ``data/base-model-<size>`` else."""
    return data_dir() / ("base-model" if size == "tiny" else f"base-model-{size}")


def accelerate_config(name: str) -> Path:
    """A shipped ``accelerate`` config, ``labhelpers/configs/accelerate/<name>.yaml`` (package data, so a
    non-editable install has it too); an unknown name raises FileNotFoundError listing the shipped ones."""
    folder = Path(__file__).resolve().parent / "configs" / "accelerate"
    path = folder / f"{name}.yaml"
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise FileNotFoundError(f"no accelerate config {name!r}; shipped: {shipped}")
    return path


def build_dir() -> Path:
    """Where ``make labs`` writes executed notebooks, figures and the results summary."""
    return Path(os.environ.get("SFTLABS_BUILD", REPO_ROOT / "build"))
