"""Experiment tracking: TensorBoard event files, on this machine, with no account and no network.

Where ``SFTLABS_TRACKING`` names a folder (``make labs`` sets it to ``build/runs``), every training run
of :func:`labhelpers.training.train_sft` writes one run folder there, named by lab, method and seed
(``lab2_domain-lora-seed0``; a repeated name gets ``-2``, ``-3``...): the Trainer's loss, learning rate
and gradient norm at every logged step, through transformers' ``TensorBoardCallback``, and afterwards
each evaluation of the trained model on a task split (``eval/<split>/<task>``, at the run's last step),
through :func:`labhelpers.evaluation.evaluate`. The ``ci`` and ``smoke`` profiles never track (tests and
grading write nothing outside their folders). Open the runs with::

    .venv/bin/tensorboard --logdir build/runs
"""

from __future__ import annotations

import atexit
import os
import re
from pathlib import Path

TRACKING_ENV = "SFTLABS_TRACKING"
LAB_ENV = "SFTLABS_LAB"  # the runner names the lab it executes; a notebook opened by hand is "notebook"
_RUN = "_sftlabs_tracking_run"  # the attribute that ties a trained model to its run: (folder, last step)


def tracking_root(profile) -> Path | None:
    """The folder runs go to, or None when tracking is off (not asked for, or ``profile.track`` is off:
    the ci and smoke profiles)."""
    root = os.environ.get(TRACKING_ENV)
    if not root or not profile.track:
        return None
    return Path(root)


def new_run(profile, method: str) -> Path | None:
    """A new, empty run folder for one training run of ``method`` with ``profile.seed`` (None: off)."""
    root = tracking_root(profile)
    if root is None:
        return None
    lab = os.environ.get(LAB_ENV, "notebook")
    base = f"{lab}-{re.sub(r'[^A-Za-z0-9_.+]+', '-', method).strip('-')}-seed{profile.seed}"
    folder, n = root / base, 1
    while folder.exists():
        n += 1
        folder = root / f"{base}-{n}"
    folder.mkdir(parents=True)
    return folder


def method_name(model, peft_config) -> str:
    """How a run is named in the tracker: ``full``, or the PEFT type (``lora``, ``ia3``...; ``dora`` for
    LoRA with ``use_dora``, ``qlora`` for LoRA on a 4-bit model) with its rank where it has one (``lora-r8``)."""
    if peft_config is None:
        return "full"
    name = str(getattr(peft_config.peft_type, "value", peft_config.peft_type)).lower()
    if name == "lora":
        name = "dora" if getattr(peft_config, "use_dora", False) else (
            "qlora" if getattr(model, "is_loaded_in_4bit", False) else "lora")
    rank = getattr(peft_config, "r", None)
    return f"{name}-r{rank}" if isinstance(rank, int) else name


def training_callback(folder: Path):
    """transformers' own TensorBoard callback, writing to ``folder``."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder)))


def attach(model, folder: Path | None, last_step: int) -> None:
    """Remember that ``model`` was trained in the run ``folder``, so that its evaluations are logged there."""
    if folder is not None:
        object.__setattr__(model, _RUN, (folder, last_step))


def log_evaluation(model, task: str, split: str, value: float) -> None:
    """Log one evaluation of a tracked model to its run (nothing for an untracked model). The evaluations
    of one run, which come one after another, share one writer and so one event file."""
    run = getattr(model, _RUN, None)
    if run is None:
        return
    folder, step = run
    writer = _evaluation_writer(folder)
    writer.add_scalar(f"eval/{split}/{task}", value, step)
    writer.flush()


_evaluations = None  # (folder, SummaryWriter) of the run evaluated last, or None


def _evaluation_writer(folder: Path):
    """The open writer of ``folder``'s evaluations; another run's is closed first (one open at a time)."""
    global _evaluations
    from torch.utils.tensorboard import SummaryWriter

    if _evaluations is None or _evaluations[0] != folder:
        close_evaluation_writer()
        _evaluations = (folder, SummaryWriter(log_dir=str(folder)))
    return _evaluations[1]


def close_evaluation_writer() -> None:
    """Close the evaluation writer left open (also done when the interpreter exits)."""
    global _evaluations
    if _evaluations is not None:
        _evaluations[1].close()
        _evaluations = None


atexit.register(close_evaluation_writer)


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run folder, ``{tag: [(step, value), ...]}``, read back from its event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
