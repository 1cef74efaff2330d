"""The ``arithmetic`` task: the general skill the base model has before any lab.

Single-digit facts (``7 + 5 = 12``, ``9 - 4 = 5``, ``6 * 7 = 42``) are part of the pretraining
corpus, so the shipped base answers them as plain-text continuations (no chat template). Labs
measure this skill before and after fine-tuning on another domain: it is the forgetting probe.
Splits partition the facts, so a replay set (train) never contains a probed fact (test).
"""

from __future__ import annotations

import re
from typing import Sequence

from labhelpers.tasks.base import Task, split_keys

OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
SPLIT_SIZES = {"train": 155, "validation": 20, "test": 80}


def facts() -> list[tuple[int, str, int]]:
    """All (a, op, b) facts: digits 0-9, subtraction only where the result is not negative."""
    return [(a, op, b) for op in OPERATORS for a in range(10) for b in range(10)
            if op != "-" or a >= b]


def answer(fact: tuple[int, str, int]) -> int:
    a, op, b = fact
    return OPERATORS[op](a, b)


def fact_line(fact: tuple[int, str, int]) -> str:
    """``"a op b = c"``, the form used in pretraining."""
    a, op, b = fact
    return f"{a} {op} {b} = {answer(fact)}"


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Rows with a plain-text ``prompt``/``completion`` and the same fact as a chat turn."""
    out = {}
    for split, items in split_keys(facts(), SPLIT_SIZES, seed).items():
        rows = []
        for i, (a, op, b) in enumerate(items):
            prompt, completion = f"{a} {op} {b} =", f" {answer((a, op, b))}"
            rows.append({"id": f"arithmetic-{split}-{i:05d}", "task": "arithmetic", "split": split,
                         "prompt": prompt, "completion": completion, "answer": answer((a, op, b)),
                         "messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": completion.strip()}]})
        out[split] = rows
    return out


_NUMBER = re.compile(r"-?\d+")


def score(rows: Sequence[dict], completions: Sequence[str]) -> list[bool]:
    """Exact match of the first integer in the completion with the answer."""
    verdicts = []
    for row, completion in zip(rows, completions, strict=True):
        match = _NUMBER.search(completion.split("\n")[0])
        verdicts.append(bool(match) and int(match.group()) == row["answer"])
    return verdicts


TASK = Task(name="arithmetic", format="completion", generate=generate, score=score, max_new_tokens=4)
