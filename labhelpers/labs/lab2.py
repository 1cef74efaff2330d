"""Lab 2's experiments: full fine-tuning on a sequence of tasks (the accuracy matrix behind
backward transfer and forgetting, with and without replay) and the LoRA sweep over base models,
learning rates and ranks."""

from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd

from labhelpers.continual import DOMAIN_TASK, replay_mix
from labhelpers.evaluation import SELECTION_SPLIT, score, select_best
from labhelpers.models import count_parameters, load_model
from labhelpers.peft_methods import peft_config
from labhelpers.profiles import Profile
from labhelpers.tasks import task_rows
from labhelpers.training import fine_tune


def continual_sequence(tasks: Sequence[str], profile: Profile, steps: int, replay_fraction: float = 0.0,
                       seed: int = 0) -> pd.DataFrame:
    """Full fine-tuning on ``tasks`` one after another, from the shipped base.

    Returns the accuracy matrix: row ``base`` then one row per stage (``after <task>``), one column per
    task, each entry the test score measured right after that stage. With ``replay_fraction`` > 0,
    each stage mixes that fraction of examples from the earlier tasks' training data (replay).
    """
    model, tokenizer = load_model(profile)
    matrix = {"base": {t: score(model, tokenizer, t, profile) for t in tasks}}
    seen: list[dict] = []
    for i, task in enumerate(tasks):
        rows = task_rows(task, "train")
        data = replay_mix(rows, seen, replay_fraction if seen else 0.0, tokenizer, profile.max_seq_length, seed + i)
        model = fine_tune(model, tokenizer, data, profile, steps).model
        matrix[f"after {task}"] = {t: score(model, tokenizer, t, profile) for t in tasks}
        seen += rows
    return pd.DataFrame(matrix).T[list(tasks)]


def lora_sweep(models: Iterable[str], learning_rates: Iterable[float], ranks: Iterable[int], profile: Profile,
               steps: int, task: str = DOMAIN_TASK) -> pd.DataFrame:
    """LoRA on ``task`` for every (base model, learning rate, rank); one row per run.

    ``alpha / r`` is held at the profile's ratio so that the rank changes capacity, not step size.
    Columns: ``model``, ``params`` (base size), ``learning_rate``, ``r``, ``score`` (on the validation
    split: what :func:`best_settings` chooses by), ``split``, ``test_score`` (reported for the chosen
    runs only), ``final_loss``, ``train_seconds``.
    """
    rows = task_rows(task, "train")
    ratio = profile.lora_alpha / profile.lora_r
    records = []
    for name in models:
        _, tokenizer = load_model(profile, name)
        data = replay_mix(rows, [], 0.0, tokenizer, profile.max_seq_length)
        for lr in learning_rates:
            for r in ranks:
                model, _ = load_model(profile, name)
                params = count_parameters(model)["total"]
                run = fine_tune(model, tokenizer, data, profile, steps, learning_rate=lr,
                                peft_config=peft_config("lora", profile, r=r, lora_alpha=ratio * r))
                records.append({"model": name, "params": params, "learning_rate": lr, "r": r,
                                "score": score(run.model, tokenizer, task, profile, SELECTION_SPLIT),
                                "split": SELECTION_SPLIT, "test_score": score(run.model, tokenizer, task, profile),
                                "final_loss": run.final_loss, "train_seconds": run.train_seconds})
    return pd.DataFrame(records)


def best_settings(sweep: pd.DataFrame) -> pd.DataFrame:
    """The best run per base model: the highest validation ``score``, then the lowest final loss
    (:func:`labhelpers.evaluation.select_best`; ``test_score`` is never read), smallest base first."""
    chosen = select_best(sweep, "score", group="model", tie_breakers=[("final_loss", True)])
    return chosen.sort_values("params", kind="stable").reset_index(drop=True)
