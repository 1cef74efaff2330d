"""Colab: the "Open in Colab" badge and the setup cell every lab carries (``make release`` syncs them).

The setup cell does nothing outside Colab. On Colab it clones this course at the release tag (the
package *and* its data: shipped base models, task files, architecture configs), installs the package
with its pinned dependencies (``torch`` is left as Colab ships it: the package asks only for
``torch>=2.4``), and points ``SFTLABS_DATA`` and ``SFTLABS_COURSE_DIR`` at the clone (Lab 1b's
Axolotl and Unsloth environments are built there with ``make -C <clone> axolotl unsloth``). The ``auto`` profile then picks ``t4`` on
a GPU runtime and ``cpu`` otherwise.

Forks: set ``COURSE_REPOSITORY`` (and tag releases as ``v<version>``), then ``make release``.
"""

from __future__ import annotations

import json
from pathlib import Path

from labhelpers import __version__

COURSE_REPOSITORY = "https://github.com/sft-labs/sft-labs"
RELEASE_TAG = f"v{__version__}"
BADGE_ID, SETUP_ID = "colab-badge", "colab-setup"


def colab_url(lab: str) -> str:
    """Colab's address for the released notebook of ``lab`` at the release tag."""
    path = COURSE_REPOSITORY.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{path}/blob/{RELEASE_TAG}/labs/{lab}/{lab}.ipynb"


def badge(lab: str) -> str:
    """Markdown of the "Open in Colab" badge for ``lab``."""
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(lab)})"


def setup_cell_source() -> str:
    """The setup cell (plain Python, so it also runs outside IPython)."""
    return f'''# Setup. On Colab this installs the course at its release; anywhere else it does nothing.
import os
import subprocess
import sys
from pathlib import Path

COURSE_REPOSITORY, RELEASE = "{COURSE_REPOSITORY}", "{RELEASE_TAG}"
if "google.colab" in sys.modules or os.environ.get("SFTLABS_COLAB") == "1":
    course = Path(os.environ.get("SFTLABS_COURSE_DIR", "/content/sft-labs"))
    if not (course / "pyproject.toml").exists():
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", RELEASE, COURSE_REPOSITORY,
                        str(course)], check=True)
    # pinned versions of everything but torch, which stays as the runtime ships it
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", str(course)], check=True)
    os.environ["SFTLABS_DATA"] = str(course / "data")
    os.environ["SFTLABS_COURSE_DIR"] = str(course)  # its Makefile builds Lab 1b's tool environments there
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    import importlib

    importlib.invalidate_caches()  # so that this kernel finds the package it just installed
'''


def _cell(kind: str, cell_id: str, source: str) -> dict:
    cell = {"cell_type": kind, "id": cell_id, "metadata": {}, "source": source.splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def sync_notebook(path: Path) -> bool:
    """Put the badge (first cell) and the setup cell (right after the ``parameters`` cell) into the
    notebook at ``path``, replacing older versions; returns whether the file changed."""
    path = Path(path)
    text = path.read_text()
    nb = json.loads(text)
    lab = path.stem
    cells = [c for c in nb["cells"] if c.get("id") not in (BADGE_ID, SETUP_ID)]
    params = next((i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", [])), None)
    if params is None:
        raise ValueError(f"{path} has no cell tagged 'parameters'; the setup cell goes right after it")
    cells.insert(params + 1, _cell("code", SETUP_ID, setup_cell_source()))
    cells.insert(0, _cell("markdown", BADGE_ID, badge(lab)))
    nb["cells"] = cells
    new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    if new != text:
        path.write_text(new)
    return new != text
