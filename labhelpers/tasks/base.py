"""What every task shares: the row schema, deterministic splits and JSONL I/O.

A *task* generates rows (plain dicts, one per example) and scores model completions. Chat tasks
store a ``messages`` conversation whose last turn is the reference answer; completion tasks store a
``prompt`` and a ``completion`` (plain-text continuation, no chat template).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence


@dataclass(frozen=True)
class Task:
    """A generated, automatically scored task.

    Attributes:
        name: registry key (``code``, ``sql``, ``arithmetic``).
        format: ``"chat"`` (rows have ``messages``) or ``"completion"`` (rows have ``prompt``/``completion``).
        generate: ``generate(seed) -> {split: [row, ...]}``; deterministic given the seed.
        score: ``score(rows, completions) -> [bool, ...]``; one verdict per row.
        max_new_tokens: generation budget that always fits a reference answer.
    """

    name: str
    format: str
    generate: Callable[[int], dict[str, list[dict]]]
    score: Callable[[Sequence[dict], Sequence[str]], list[bool]]
    max_new_tokens: int


def split_keys(keys: Iterable, sizes: dict[str, int], seed: int) -> dict[str, list]:
    """Shuffle unique ``keys`` with ``seed`` and cut them into disjoint splits of the given sizes.

    Raises ValueError when there are fewer unique keys than the sizes ask for.
    """
    unique = sorted(set(keys), key=repr)
    need = sum(sizes.values())
    if need > len(unique):
        raise ValueError(f"asked for {need} examples but only {len(unique)} unique problems exist; "
                         "lower the split sizes")
    random.Random(seed).shuffle(unique)
    out, start = {}, 0
    for split, n in sizes.items():
        out[split] = unique[start:start + n]
        start += n
    return out


def chat_row(task: str, split: str, index: int, user: str, assistant: str, **extra) -> dict:
    """One chat example in the shared schema."""
    return {"id": f"{task}-{split}-{index:05d}", "task": task, "split": split,
            "messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}], **extra}


def write_jsonl(rows: Iterable[dict], path: Path) -> None:
    """Write rows as UTF-8 JSONL with sorted keys, so regeneration is byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file; a missing file raises FileNotFoundError telling how to build it."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist; run `make data` to generate the task files")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
