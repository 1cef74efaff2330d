"""The project's own files: pins agree, configs say what the docs say."""

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pins(lines):
    return dict(re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", s).groups() for s in lines if "==" in s)


def test_environment_yml_pins_equal_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    pyproject = _pins(declared)
    env = _pins(line.strip().lstrip("- ").strip() for line in (ROOT / "environment.yml").read_text().splitlines()
                if line.strip().startswith("- ") and "==" in line)
    torch = env.pop("torch")
    assert env == pyproject
    # every dependency but torch is pinned exactly; torch is a range so Colab keeps its own
    unpinned = [d for d in declared if "==" not in d]
    assert unpinned == ["torch>=2.4"]
    makefile_torch = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert torch == makefile_torch


def test_installed_versions_match_pins():
    from importlib.metadata import version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, pinned in _pins(project["dependencies"] + project["optional-dependencies"]["dev"]).items():
        assert version(name) == pinned, f"{name} {version(name)} is installed but {pinned} is pinned; run make setup"


def test_nbgrader_config_directories_and_timeout():
    text = (ROOT / "nbgrader_config.py").read_text()
    assert 'source_directory = "solutions"' in text
    assert 'release_directory = "labs"' in text
    timeout = int(re.search(r"ExecutePreprocessor.timeout = (\d+)", text).group(1))
    assert timeout > 30


def test_ci_runs_make_test():
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_gitignore_keeps_generated_state_out():
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in (".venv/", "build/", "gradebook.db", "submitted/", "autograded/", "feedback/"):
        assert entry in ignored


def test_bitsandbytes_hub_kernel_notice_is_dropped_and_other_warnings_pass(caplog):
    # bitsandbytes logs this on CPUs with AVX512-BF16 at import (it cannot fetch a hub kernel offline)
    import logging

    import labhelpers  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...",
                       "offline")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


def test_deepspeed_cpu_fallback_notice_is_dropped_and_other_messages_pass():
    # the first training run on a CPU imports deepspeed, which logs this (to stdout, its own handler)
    import logging

    import labhelpers  # noqa: F401  (installs the filter)

    logger = logging.getLogger("DeepSpeed")

    def passes(message: str) -> bool:
        return bool(logger.filter(logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 0, message, None, None)))

    assert not passes("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
    assert passes("something else went wrong")


def test_accelerate_and_harness_configs_ship_inside_the_package(tmp_path):
    # a non-editable install (Colab installs a wheel) must find them: build the wheel and look inside
    import shutil
    import subprocess
    import sys
    import zipfile

    from labhelpers.paths import accelerate_config

    source = tmp_path / "source"  # a copy: building in place would write setuptools' build/ into ours
    shutil.copytree(ROOT / "labhelpers", source / "labhelpers", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("labhelpers-*.whl"))).namelist()
    for name in ("fsdp", "fsdp_qlora", "fsdp_cpu_2proc", "deepspeed_zero2", "deepspeed_zero3"):
        assert f"labhelpers/configs/accelerate/{name}.yaml" in names, name
        assert accelerate_config(name).exists()
    with pytest.raises(FileNotFoundError, match="shipped: deepspeed_zero2"):
        accelerate_config("zero9")
    for task in ("code", "sql", "arithmetic"):  # lm-eval's custom task configs and the functions they name
        assert f"labhelpers/harness/tasks/sftlabs_{task}.yaml" in names, task
    assert "labhelpers/harness/tasks/utils.py" in names


def test_a_deprecation_raised_from_labhelpers_fails_the_suite():
    # what pyproject's filterwarnings does: a library deprecating an API we call (stacklevel=2) is an error
    import warnings

    def deprecated_library_call() -> None:
        warnings.warn("`old_name` is deprecated and will be removed in v6", FutureWarning, stacklevel=2)

    namespace = {"__name__": "labhelpers.some_module", "call": deprecated_library_call}
    with pytest.raises(FutureWarning, match="old_name"):
        exec("call()", namespace)
    exec("call()", {"__name__": "somebody_else", "call": deprecated_library_call})  # others only warn
