"""Constants and builders several test modules share (pytest fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

from labhelpers.course.runner import discover
from labhelpers.paths import REPO_ROOT

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_LAB = FIXTURES / "demo_lab" / "demo_lab.ipynb"
SOLUTION_NOTEBOOKS = discover(REPO_ROOT / "solutions")
RELEASED_NOTEBOOKS = discover(REPO_ROOT / "labs")
PICKLE_RAN = Path("/tmp/sftlabs-malicious-pickle-ran")
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7 + 5 ="},
         {"role": "assistant", "content": "12"}, {"role": "user", "content": "and 2 * 3 ="},
         {"role": "assistant", "content": "6"}]


class Payload:
    """Unpickling this runs a command (it touches :data:`PICKLE_RAN`): the reason pickles are refused."""

    def __reduce__(self):
        return os.system, (f"touch {PICKLE_RAN}",)


def malicious_pickle() -> bytes:
    """A pickle whose loading would run a command; :data:`PICKLE_RAN` is removed first."""
    PICKLE_RAN.unlink(missing_ok=True)
    return pickle.dumps(Payload())


def tiny_checkpoint(folder: Path, shape=(4, 4), scale: float = 1.0) -> Path:
    """A two-tensor safetensors "model" folder, enough for the merge code's checks."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(shape) * scale, "b": torch.zeros(shape[0])}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def fixture_lab(name: str, before_save: str | None = None) -> dict:
    """The demo fixture lab renamed to ``name`` (it saves its metrics under that name), with
    ``before_save`` inserted as a cell before its metrics are saved."""
    nb = json.loads(FIXTURE_LAB.read_text())
    for cell in nb["cells"]:
        cell["source"] = "".join(cell["source"]).replace('"demo_lab"', f'"{name}"')
    if before_save is not None:
        nb["cells"].insert(len(nb["cells"]) - 1, _code_cell(before_save))
    for i, cell in enumerate(nb["cells"]):
        cell["id"] = f"cell-{i}"
    return nb


def _code_cell(source: str) -> dict:
    return {"cell_type": "code", "metadata": {}, "source": source, "outputs": [], "execution_count": None}
