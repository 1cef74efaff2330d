"""The package's layering (pyproject's import-linter contracts) holds, and would catch a back-import;
modules stay small; no labhelpers import hides inside a function."""

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from labhelpers.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "labhelpers"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, timeout=120)


def test_layering_contracts_are_kept():
    result = _lint(REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_back_import_breaks_the_contract(tmp_path):
    """A core module importing course tooling (the kind of shortcut the layers forbid) is reported."""
    shutil.copytree(PACKAGE, tmp_path / "labhelpers", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    units = tmp_path / "labhelpers" / "units.py"
    units.write_text(units.read_text() + "\nfrom labhelpers.course import runner  # noqa: E402,F401\n")
    result = _lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and "labhelpers.units -> labhelpers.course.runner" in result.stdout


def test_every_module_has_a_layer():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in config if c["type"] == "layers")["layers"]
    named = {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}
    top = {f"labhelpers.{p.stem if p.is_file() else p.name}" for p in PACKAGE.iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert top - named == set(), "add these modules to a layer in pyproject.toml"
    assert named - top == set(), "these layers name modules that do not exist"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small_and_imports_at_the_top(path):
    text = path.read_text()
    assert text.count("\n") <= MAX_LINES, f"{path.name}: {text.count(chr(10))} lines; split it by concern"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("labhelpers"):
                    pytest.fail(f"{path.name}:{inner.lineno} imports labhelpers inside {node.name}(); "
                                "import at the top (a cycle there means a layer is wrong)")


# Modules without a test file of their own name, and where they are tested instead.
TESTED_ELSEWHERE = {
    "paths": "every test (the shipped data and model are found through it)",
    "trainer_speedups": "test_training (loss equal to the model's, batches by length)",
    "course.bench": "test_make_targets (make bench QUICK=1)",
    "course.bench_report": "test_make_targets (make bench QUICK=1: every section's table)",
    "course.lab_run": "test_runner (a cell past its limit and an interrupted run: the cell named, the notebook kept)",
    "course.real_model": "test_real_model (bad input, the manifest) and test_make_targets (make real-model)",
    "course.pretrain": "test_models (the shipped base, its manifest) and test_make_targets (make base-model)",
    "labs.sharding_demo": "test_memory (FSDP and DeepSpeed ZeRO ranks hold what the formulas say)",
    "labs.lab1b": "test_axolotl_cli (the config check, the mask comparison, NF4) and test_notebooks (Lab 1b in ci)",
    "axolotl_validate": "test_axolotl_cli (run by Axolotl's environment: valid and broken configs)",
    "unsloth_train": "test_notebooks (Lab 1b: run by Unsloth's environment, its result read by unsloth_cli) and "
                     "test_make_targets (the gpu-smoke dry run)",
    "labs.backend_comparison": "test_unsloth_cli (spec, parity, table) and test_notebooks (Lab 1b in ci)",
    "labs.lab1": "test_peft_methods (compare_methods, guidance) and test_notebooks (Lab 1 in the ci profile)",
    "labs.lab2": "test_continual (sweep, best settings) and test_notebooks (Lab 2 in the ci profile)",
    "labs.lab3": "test_merging and test_notebooks (Lab 3 in the ci profile)",
    "labs.lab4": "test_memory (breakdown, checkpointing, optimizers, accumulation) and test_notebooks",
}


def test_every_module_has_tests_named_after_it():
    """tests/test_<module>.py, or for a package's module tests/test_<package>.py (memory, merging,
    tasks) or tests/test_<module>.py (course, labs); the rest say where they are tested."""
    tests = {p.stem.removeprefix("test_") for p in (REPO_ROOT / "tests").glob("test_*.py")}
    untested = []
    for path in _modules():
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] in ("__init__", "__main__"):
            continue
        name = ".".join(parts)
        if not ({parts[-1], parts[0]} & tests) and name not in TESTED_ELSEWHERE:
            untested.append(name)
    assert untested == [], "add tests/test_<module>.py or say in TESTED_ELSEWHERE where these are tested"
    assert all(name.replace(".", "/") + ".py" in {str(p.relative_to(PACKAGE)) for p in _modules()}
               for name in TESTED_ELSEWHERE), "TESTED_ELSEWHERE names a module that no longer exists"
