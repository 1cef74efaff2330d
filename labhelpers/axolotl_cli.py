"""Axolotl's command line, run from its own environment, and what its runs leave behind.

Axolotl turns one YAML file into a transformers + peft + TRL run. Its pins (transformers 5.16.1,
trl 1.9.0, peft 0.20.0 for axolotl 0.19.0, the last release for Python 3.11) conflict with the
course's, so it lives in ``.venv-axolotl`` (``make axolotl``, ``tools/axolotl/requirements.txt``) and
the course calls it as a program: ``axolotl preprocess | train | merge-lora`` on a config file, and
Axolotl's own schema (``axolotl_validate.py``, run by that environment's Python) on config dicts.
Everything read back (the tokenized dataset, the loss log, the adapter, the merged model) is a plain
file the course's libraries load.
"""

from __future__ import annotations

import ast
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from labhelpers.tool_env import ToolEnvironment, ToolRun

ENV_VARIABLE = "SFTLABS_AXOLOTL_ENV"
VALIDATOR = Path(__file__).resolve().parent / "axolotl_validate.py"
# Axolotl's fused LoRA kernels are Triton/CUDA code: on a CPU they stop with "Torch not compiled with
# CUDA enabled", so a CPU run switches them off (on a GPU they stay as the config says).
CPU_SETTINGS = {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}
AXOLOTL = ToolEnvironment("Axolotl", ENV_VARIABLE, ".venv-axolotl", "axolotl", "axolotl",
                          extra={"AXOLOTL_DO_NOT_TRACK": "1"})


def environment() -> Path:
    """The folder of Axolotl's environment: ``$SFTLABS_AXOLOTL_ENV``, else ``<repo>/.venv-axolotl``.
    Raises FileNotFoundError naming the fix when it holds no ``axolotl`` program."""
    return AXOLOTL.path()


def run(args: list[str], log: str | Path, timeout_s: float = 1800) -> ToolRun:
    """``axolotl <args>`` from Axolotl's environment, its output into ``log``. A failure raises
    RuntimeError with the command and the end of its log (the whole log stays in ``log``)."""
    return AXOLOTL.run([AXOLOTL.bin("axolotl"), *args], log, timeout_s)


def write_config(cfg: dict, path: str | Path) -> Path:
    """``cfg`` as the YAML file Axolotl reads (keys in the order written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))
    return path


def _plain(value):
    """Tuples as lists, recursively: YAML and JSON of plain types only."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass
class Validation:
    """Axolotl's verdict on one config: ``valid``, and its error messages otherwise."""

    valid: bool
    errors: list[str]


def validate(configs: list[dict], timeout_s: float = 600) -> list[Validation]:
    """Each config checked by Axolotl's own schema (``axolotl.utils.config.validate_config``, the check
    ``axolotl train`` starts with), in one process of Axolotl's environment."""
    proc = subprocess.run([AXOLOTL.bin("python"), str(VALIDATOR)], input=json.dumps(_plain(configs)),
                          capture_output=True, text=True, env=AXOLOTL.variables(), timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"Axolotl's validator failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return [Validation(**v) for v in json.loads(proc.stdout)]


def prepared_dataset(prepared_path: str | Path):
    """The tokenized dataset ``axolotl preprocess`` saved under ``dataset_prepared_path`` (one run's:
    the newest folder there), loaded with the course's ``datasets``: ``input_ids`` and ``labels``."""
    from datasets import load_from_disk

    folders = sorted((p for p in Path(prepared_path).iterdir() if (p / "state.json").exists()),
                     key=lambda p: p.stat().st_mtime)
    if not folders:
        raise FileNotFoundError(f"no prepared dataset under {prepared_path}; run `axolotl preprocess` first")
    return load_from_disk(str(folders[-1]))


def loss_log(log_text: str) -> pd.DataFrame:
    """The training loss of every logged step, from the dictionaries the Trainer prints in Axolotl's
    log (``{'loss': '0.64', ..., 'epoch': '0.125'}``): columns ``step`` (1, 2, ...: the run logs every
    step, ``logging_steps: 1``) and ``loss``."""
    losses = []
    for line in log_text.replace("\r", "\n").splitlines():
        start = line.find("{'loss'")
        if start < 0:
            continue
        entry = ast.literal_eval(line[start:line.index("}", start) + 1])
        losses.append(float(entry["loss"]))
    if not losses:
        raise ValueError("no training loss in Axolotl's log; is logging_steps set, and did the run train?")
    return pd.DataFrame({"step": range(1, len(losses) + 1), "loss": losses})

