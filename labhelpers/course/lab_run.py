"""How a lab run ended: what it recorded (:class:`LabRun`) and, when it did not pass, where and why it
stopped (:class:`LabFailure`), read from papermill's error or, for a cell past its limit, a dead kernel
or an interruption, from the executed notebook that the runner saves after every cell."""

from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class LabFailure:
    """Where a lab stopped: the cell as the student sees it (``In [n]`` and its first line) and the error."""

    execution_count: int | None
    cell_first_line: str
    error: str
    traceback: str = ""

    def describe(self) -> str:
        where = (f"cell In [{self.execution_count}]" if self.execution_count is not None
                 else "the cell" if self.cell_first_line else "before any cell ran")
        first = f" `{self.cell_first_line}`" if self.cell_first_line else ""
        return f"{where}{first}: {self.error}"


@dataclass(frozen=True)
class LabRun:
    lab: str
    notebook: Path
    seconds: float
    metrics: dict
    failure: LabFailure | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None


def _first_line(source: str) -> str:
    return next((line.strip() for line in str(source).splitlines() if line.strip()), "")[:120]


def failure_from(error: BaseException, executed: Path | None = None) -> LabFailure:
    """A :class:`LabFailure` from what papermill raised (a cell's error) or from any other exception
    (a dead kernel, a cell past its time limit, an interruption): then the cell that was running is
    read from the executed notebook, saved as the run went (:func:`last_started_cell`)."""
    from papermill.exceptions import PapermillExecutionError, strip_color

    if isinstance(error, PapermillExecutionError):
        trace = strip_color("\n".join(error.traceback or []))
        return LabFailure(error.exec_count, _first_line(error.source), f"{error.ename}: {error.evalue}", trace)
    message = f"{type(error).__name__}: {error}".rstrip(": ") if str(error) else type(error).__name__
    cell = last_started_cell(executed) if executed is not None else None
    if cell is None:
        return LabFailure(None, "", message)
    return LabFailure(cell.get("execution_count"), _first_line("".join(cell.get("source", ""))), message)


def last_started_cell(executed: Path) -> dict | None:
    """The last code cell that papermill started in a saved, partly executed notebook (the one running
    when the run stopped), or None when no cell started or the notebook was never written."""
    try:
        cells = json.loads(Path(executed).read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return None
    # papermill stamps start_time when a cell starts; its status is no guide (at the end it marks every
    # pending cell "completed", run or not)
    started = [c for c in cells if c.get("cell_type") == "code"
               and c.get("metadata", {}).get("papermill", {}).get("start_time")]
    return started[-1] if started else None


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the lab's notebook and the summary are still written."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While running labs, SIGTERM raises :class:`Interrupted` (as Ctrl-C raises KeyboardInterrupt)."""
    def interrupt(signum, frame):
        raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LabInterrupted(KeyboardInterrupt):
    """A lab was interrupted; :attr:`run` is what it recorded up to then (its notebook is saved)."""

    def __init__(self, run: LabRun):
        super().__init__(run.failure.describe() if run.failure else run.lab)
        self.run = run
