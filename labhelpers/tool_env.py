"""Tools that live in their own Python environment (Axolotl, Unsloth): where the environment is, the
process environment its programs run with, and running one of them with its output in a log file.

Their pins conflict with the course's (``tools/<tool>/requirements.txt``; ``make <tool>`` builds
``.venv-<tool>``), so the course never imports them: it runs their programs and reads back plain files.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from labhelpers.paths import course_dir

# offline (no model hub here, and a course run never depends on one), no telemetry, no tokenizer threads
_QUIET = {"DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
          "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


@dataclass(frozen=True)
class ToolEnvironment:
    """A tool's own environment: ``$<variable>``, else ``<course checkout>/<folder>``, built by ``make <target>``."""

    name: str  # how errors name the tool, e.g. "Axolotl"
    variable: str  # the environment variable that points elsewhere, e.g. SFTLABS_AXOLOTL_ENV
    folder: str  # the default folder under the course, e.g. .venv-axolotl
    program: str  # a program the environment must hold, e.g. axolotl
    target: str  # the make target that builds it
    extra: dict[str, str] = field(default_factory=dict)  # the tool's own switches (telemetry off ...)

    def path(self) -> Path:
        """The environment's folder (``$<variable>``, else :attr:`folder` in the course's checkout,
        :func:`labhelpers.paths.course_dir`). Raises FileNotFoundError naming the fix when it holds no
        :attr:`program`."""
        course = course_dir()
        env = Path(os.environ.get(self.variable) or course / self.folder)
        if not (env / "bin" / self.program).exists():
            raise FileNotFoundError(
                f"{self.name}'s environment is missing at {env}: run `make -C {course} {self.target}` (it builds "
                f"{self.folder} with {self.name}'s own pins, tools/{self.target}/requirements.txt), or set "
                f"{self.variable} to an environment that has {self.program} installed")
        return env

    def bin(self, program: str) -> str:
        """The path of one of the environment's programs (``python``, ``axolotl``)."""
        return str(self.path() / "bin" / program)

    def variables(self) -> dict[str, str]:
        """The process environment of the tool's programs: its environment first on PATH (Axolotl
        launches ``accelerate``), offline, no telemetry, none of the course environment's Python settings."""
        env = self.path()
        out = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        out.update(PATH=f"{env / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(env),
                   **_QUIET, **self.extra)
        return out

    def run(self, command: list, log: str | Path, timeout_s: float = 1800) -> "ToolRun":
        """``command`` (its first word one of :meth:`bin`'s paths) with :meth:`variables`: :func:`run_logged`."""
        return run_logged(command, log, self.variables(), timeout_s)


def run_logged(command: list, log: str | Path, env: dict[str, str] | None = None, timeout_s: float = 1800) -> "ToolRun":
    """``command`` in its own process (``env``: its environment variables, None: this process's), its
    output (stdout + stderr) into ``log``. A failure raises RuntimeError with the command and the end of
    its log (the whole log stays in ``log``)."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [str(c) for c in command]
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
    done = ToolRun(command, time.perf_counter() - start, log)
    if proc.returncode != 0:
        tail = "\n".join(done.text().splitlines()[-25:])
        shown = " ".join([Path(command[0]).name, *command[1:]])
        raise RuntimeError(f"`{shown}` failed (exit {proc.returncode}); its log is {log}, ending:\n{tail}")
    return done


@dataclass
class ToolRun:
    """One finished command of a tool: its arguments, wall time and the log it wrote (stdout + stderr)."""

    args: list[str]
    seconds: float
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")
