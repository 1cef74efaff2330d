"""The course's tasks in EleutherAI's evaluation harness (``lm-eval``), for models saved as folders.

The three tasks are registered as ``lm-eval`` custom tasks: one YAML config each in
``labhelpers/harness/tasks/`` (``sftlabs_code``, ``sftlabs_sql``, ``sftlabs_arithmetic``, tag
``sftlabs``), over the shipped JSONL, with metric functions that call the project's scorers (pass@1
in the sandbox, SQL execution accuracy, exact match). :func:`score_folder` runs a model folder through
``lm_eval.simple_evaluate`` with the ``hf`` model type, greedy, on the first ``profile.n_eval`` rows of
a split: the chat tasks through the tokenizer's chat template, arithmetic as a plain completion, as
the labs score them (:func:`labhelpers.evaluation.evaluate`). ``tests/test_harness.py`` shows the two
give the same verdict on every example.

From a shell, the same tasks::

    lm_eval --model hf --model_args pretrained=FOLDER --include_path labhelpers/harness/tasks \\
        --tasks sftlabs_sql --apply_chat_template
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

from labhelpers.evaluation import generation_limit
from labhelpers.profiles import Profile
from labhelpers.tasks import get_task

TASKS_DIR = Path(__file__).parent / "tasks"
PREFIX = "sftlabs_"
METRICS = {"code": "pass_at_1", "sql": "exec_acc", "arithmetic": "exact_match",  # each config's metric
           "instructions": "prompt_level_strict_acc"}


def harness_task(task: str) -> str:
    """The ``lm-eval`` name of a course task (``sql`` -> ``sftlabs_sql``)."""
    get_task(task)  # an unknown task names the valid ones
    return PREFIX + task


def task_manager(split: str = "test"):
    """An ``lm_eval.tasks.TaskManager`` that knows the course's tasks, and only them, reading ``split`` of
    each (indexing lm-eval's own tasks too, ``include_defaults=True``, takes about 11 s on 2 cores each
    time a manager is built; the course's alone take milliseconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"split": split})


@contextlib.contextmanager
def _quiet():
    """Send lm-eval's progress bars and what its subprocesses print (the ``git describe`` of its
    environment report says "fatal: not a git repository" outside a checkout) to a scratch file, not
    to the notebook. Errors still raise."""
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stderr(io.StringIO()):
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def evaluate_folder(folder: str | Path, profile: Profile, tasks: Sequence[str], split: str = "test") -> dict:
    """Run ``lm_eval.simple_evaluate`` on a model folder for ``tasks`` (course names), greedy, on the
    first ``profile.n_eval`` rows of ``split``, with the ``hf`` model type on ``profile.device``.

    Returns ``{task: {"score": mean metric, "verdicts": [0/1 per example, in the split's order],
    "completions": [...]}}`` read from the harness's results and logged samples."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings about custom datasets and limits
    model = HFLM(pretrained=str(folder), device=profile.device, batch_size=profile.eval_batch_size, dtype=profile.dtype)
    manager = task_manager(split)
    out = {}
    # chat tasks through the chat template, completion tasks as raw prompts; each with the answer length
    # the course's own scorer allows (the task's budget, or the profile's cap where smaller)
    groups: dict[tuple[bool, int], list[str]] = {}
    for task in tasks:
        key = (get_task(task).format == "chat", generation_limit(task, profile.max_new_tokens))
        groups.setdefault(key, []).append(task)
    for (chat, max_gen_toks), chosen in groups.items():
        capped = None if profile.max_new_tokens is None else {"max_gen_toks": max_gen_toks}
        with _quiet():
            run = lm_eval.simple_evaluate(model=model, tasks=[harness_task(t) for t in chosen], task_manager=manager,
                                          limit=profile.n_eval, apply_chat_template=chat, log_samples=True,
                                          bootstrap_iters=0, verbosity="ERROR", gen_kwargs=capped)
        for task in chosen:
            name, metric = harness_task(task), METRICS[task]
            samples = sorted(run["samples"][name], key=lambda s: s["doc_id"])
            out[task] = {"score": float(run["results"][name][f"{metric},none"]),
                         "verdicts": [float(s[metric]) for s in samples],
                         "completions": [s["resps"][0][0] for s in samples]}
    return out


def score_folder(folder: str | Path, profile: Profile, tasks: Sequence[str], split: str = "test") -> dict[str, float]:
    """``{task: score}`` of a model folder through the harness: the counterpart of
    :func:`labhelpers.labs.lab3.score_folder`, which scores with the labs' own generation."""
    return {task: result["score"] for task, result in evaluate_folder(folder, profile, tasks, split).items()}
