"""The functions the course's lm-eval task configs (``sftlabs_*.yaml`` beside this file) name with
``!function utils.<name>``: the dataset loader over the shipped JSONL, the prompt of a row, and one
metric function per task that calls the project's own scorer (so the harness and the labs judge an
answer the same way, tested)."""

from __future__ import annotations

from labhelpers.evaluation import reference_text
from labhelpers.tasks import get_task, load_split


def dataset(task: str, split: str = "test", **_) -> dict:
    """The rows of ``split`` of a shipped task, under the config's ``test_split`` name (``test``); the
    split comes from the run's metadata (``simple_evaluate(metadata={"split": ...})``)."""
    return {"test": load_split(task, split)}


def prompt(doc: dict) -> str:
    """What the model continues: the user's turn of a chat row (the harness renders it with the
    tokenizer's chat template), or the raw prompt of a completion row."""
    if get_task(doc["task"]).format == "completion":
        return doc["prompt"]
    *context, _answer = doc["messages"]
    if len(context) != 1 or context[0]["role"] != "user":
        raise ValueError(f"row {doc['id']}: the harness prompt is one user turn, got roles {[m['role'] for m in context]}")
    return context[0]["content"]


def reference(doc: dict) -> str:
    """The reference answer of a row (shown in the harness's samples; the metric does not read it)."""
    return reference_text(doc, get_task(doc["task"]).format)


def _verdict(task: str, doc: dict, results: list[str]) -> float:
    return float(get_task(task).score([doc], [results[0]])[0])


def pass_at_1(doc: dict, results: list[str]) -> dict[str, float]:
    """Code: the function passes its tests in the sandbox (``labhelpers.tasks.code.score``)."""
    return {"pass_at_1": _verdict("code", doc, results)}


def execution_accuracy(doc: dict, results: list[str]) -> dict[str, float]:
    """SQL: the query's rows equal the gold query's on the database (``labhelpers.tasks.sql.score``)."""
    return {"exec_acc": _verdict("sql", doc, results)}


def exact_match(doc: dict, results: list[str]) -> dict[str, float]:
    """Arithmetic: the answer equals the reference (``labhelpers.tasks.arithmetic.score``)."""
    return {"exact_match": _verdict("arithmetic", doc, results)}


def prompt_level_strict(doc: dict, results: list[str]) -> dict[str, float]:
    """Instructions: the response follows every instruction of its prompt (``labhelpers.tasks.instructions.score``)."""
    return {"prompt_level_strict_acc": _verdict("instructions", doc, results)}
