"""Unsloth as an optional backend, run from its own environment, and what its runs measure.

Unsloth (``FastLanguageModel``) patches transformers, peft and TRL with its own kernels on NVIDIA GPUs.
Its pins (unsloth 2026.10.9: transformers <= 5.17.0, trl <= 1.15.0, datasets < 5) conflict with the
course's, so it lives in ``.venv-unsloth`` (``make unsloth``, ``tools/unsloth/requirements.txt``) and the
course runs :mod:`labhelpers.unsloth_train` with that environment's Python, in its own process: the
process starts clean (Unsloth must be imported before transformers; CUDA's memory peaks are the run's
own). A run of the course's own trainer writes the same result (:mod:`labhelpers.labs.backend_comparison`), so
the two compare field by field as :class:`BackendRun`.

Without a GPU Unsloth falls back to stock transformers + peft + TRL ("no GPU found, training on CPU"):
a CPU run checks the API and the loss, not the kernels, and its speed is no claim about Unsloth's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from labhelpers.tool_env import ToolEnvironment

ENV_VARIABLE = "SFTLABS_UNSLOTH_ENV"
TRAINER = Path(__file__).resolve().parent / "unsloth_train.py"
UNSLOTH = ToolEnvironment("Unsloth", ENV_VARIABLE, ".venv-unsloth", "python", "unsloth",
                          extra={"UNSLOTH_DISABLE_STATISTICS": "1"})
# what BackendRun keeps of the base's quantization config (the writers write all of it, as strings)
QUANTIZATION_KEYS = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")


@dataclass
class BackendRun:
    """What one QLoRA run measured, in its own process: the loss of every step, training time and the
    tokens trained on (padding excluded), peak CUDA memory after a reset (None on a CPU), the base's
    quantization (:data:`QUANTIZATION_KEYS`), the versions that ran and where the adapter was saved."""

    backend: str
    device: str
    losses: list
    train_seconds: float
    steps: int
    train_tokens: int
    max_memory_allocated_mib: float | None
    max_memory_reserved_mib: float | None
    trainable_params: int
    quantization: dict
    versions: dict
    adapter_dir: str = ""

    @property
    def tokens_per_second(self) -> float:
        """Real tokens (padding excluded) over the training loop's wall time."""
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def loss_curve(self) -> pd.DataFrame:
        return pd.DataFrame(self.losses, columns=["step", "loss"])

    @classmethod
    def read(cls, path: str | Path, adapter_dir: str | Path = "") -> "BackendRun":
        """A result file; raises ValueError naming the fields it lacks (a writer out of step with this one)."""
        given = json.loads(Path(path).read_text())
        needed = {f.name for f in fields(cls)} - {"adapter_dir"}
        if missing := sorted(needed - set(given)):
            raise ValueError(f"{path} lacks {missing}: its writer and BackendRun disagree")
        given["quantization"] = {k: str(given["quantization"].get(k)) for k in QUANTIZATION_KEYS}
        return cls(**{k: given[k] for k in needed}, adapter_dir=str(adapter_dir))


def train(spec: dict, workdir: str | Path, timeout_s: float = 1800) -> BackendRun:
    """The QLoRA run ``spec`` describes through Unsloth (:mod:`labhelpers.unsloth_train`), in a process
    of Unsloth's environment; its log is ``<workdir>/unsloth.log``, its adapter ``spec["adapter_dir"]``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "unsloth-spec.json", workdir / "unsloth-result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    UNSLOTH.run([UNSLOTH.bin("python"), TRAINER, spec_path, result_path], workdir / "unsloth.log", timeout_s)
    return BackendRun.read(result_path, spec["adapter_dir"])
