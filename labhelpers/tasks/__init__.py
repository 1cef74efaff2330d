"""Generated, automatically scored tasks, looked up by name.

``code`` (spec -> Python function, pass@1 in the sandbox), ``sql`` (question -> SQLite query,
execution accuracy), ``arithmetic`` (the tiny bases' general skill and forgetting probe) and
``instructions`` (requests with verifiable instructions: a real instruct model's general skill).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from labhelpers.tasks import corpus
from labhelpers.paths import data_dir
from labhelpers.tasks import arithmetic, code, instructions, sql
from labhelpers.tasks.base import Task, read_jsonl, write_jsonl

TASKS: dict[str, Task] = {t.name: t for t in (code.TASK, sql.TASK, arithmetic.TASK, instructions.TASK)}
#: the tasks whose training text the shipped tiny bases' tokenizer was trained on (labhelpers.course.pretrain)
PRETRAINING_TASKS = ("code", "sql", "arithmetic")
DATA_SEED = 0


def get_task(name: str) -> Task:
    """The task registered under ``name``; an unknown name lists the valid ones."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def split_path(task: str, split: str, root: Path | None = None) -> Path:
    return (root or data_dir()) / task / f"{split}.jsonl"


def load_split(task: str, split: str, n: int | None = None, root: Path | None = None):
    """One split of a task as a ``datasets.Dataset`` (first ``n`` rows when given)."""
    from datasets import Dataset

    rows = read_jsonl(split_path(get_task(task).name, split, root))
    valid = sorted(p.stem for p in split_path(task, "x", root).parent.glob("*.jsonl"))
    if not rows:
        raise ValueError(f"split {split!r} of task {task!r} is empty; valid splits: {valid}")
    return Dataset.from_list(rows[:n] if n else rows)


def load_splits(task: str, splits: Sequence[str], root: Path | None = None):
    """Several splits of a task as one ``datasets.Dataset``, in the order given; a split named twice
    counts twice (how a run weights the smaller ``train_composed`` against ``train``)."""
    from datasets import concatenate_datasets

    if isinstance(splits, str) or not splits:
        raise ValueError(f"splits must be a non-empty sequence of split names, got {splits!r}")
    return concatenate_datasets([load_split(task, split, root=root) for split in splits])


def write_all(root: Path | None = None, seed: int = DATA_SEED) -> list[Path]:
    """Generate every task's splits, the SQL database dump and the pretraining corpus into ``root``."""
    root = root or data_dir()
    written = []
    for task in TASKS.values():
        for split, rows in task.generate(seed).items():
            write_jsonl(rows, split_path(task.name, split, root))
            written.append(split_path(task.name, split, root))
    sql_path = root / "sql" / "company.sql"
    sql_path.write_text(sql.database_sql(), encoding="utf-8")
    written.append(sql_path)
    written += corpus.write_corpus(root / "corpus", seed=seed)
    return written


def task_rows(task: str, split: str = "train", n: int | None = None) -> list[dict]:
    """Rows of a task in the format it is trained and scored in (chat: ``messages``; completion:
    ``prompt`` + ``completion``), without the other fields."""
    fmt = get_task(task).format
    keep = ("messages",) if fmt == "chat" else ("prompt", "completion")
    return [{k: row[k] for k in ("id", *keep)} for row in load_split(task, split, n)]
