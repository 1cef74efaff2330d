"""Lab 2's experiments: the forgetting mitigations over seeds, full fine-tuning on a sequence of tasks
(the accuracy matrix behind backward transfer and forgetting, with and without replay), and the
response-quality variants. (Lab 2b's hyperparameter search is :mod:`labhelpers.hyperparameters`.)"""

from __future__ import annotations

import gc
from typing import Callable, Iterable, Mapping, Sequence

import pandas as pd
from torch import nn

from labhelpers.continual import DOMAIN_TASK, all_scores, replay_mix, validation_scores
from labhelpers.data import rows_that_fit
from labhelpers.evaluation import mean_over_seeds, score
from labhelpers.models import load_model
from labhelpers.profiles import Profile
from labhelpers.tasks import task_rows
from labhelpers.training import fine_tune


#: What the training function of a comparison yields: the run's name, its model and its loss curve (or None).
Trained = tuple[str, nn.Module, pd.DataFrame | None]


def runs_over_seeds(train: Callable[[Profile], Iterable[Trained]], profile: Profile, tokenizer
                    ) -> tuple[dict[str, dict], dict[str, dict], dict[str, pd.DataFrame]]:
    """Repeat a comparison once per seed of the profile and average each run's scores over the seeds.

    ``train(seeded_profile)`` trains every run of the comparison with ``seeded_profile.seed``
    (``profile.seed``, ``+ 1``, ...: ``profile.seeds`` of them) and yields ``(name, model, loss curve
    or None)``; each model is scored as it comes, on the test split (:func:`continual.all_scores`) and
    on the validation split (:func:`continual.validation_scores`), and then let go.

    Returns ``(test, validation, curves)``: per run name, the scores averaged over the seeds with a
    ``<task> seed sd`` beside the domain and general (``profile.general_task``) scores
    (:func:`mean_over_seeds`), and each run's loss curve from the first seed.
    """
    test: dict[str, list] = {}
    validation: dict[str, list] = {}
    curves: dict[str, pd.DataFrame] = {}
    for i in range(profile.seeds):
        for name, model, curve in train(profile.with_(seed=profile.seed + i)):
            test.setdefault(name, []).append(all_scores(model, tokenizer, profile))
            validation.setdefault(name, []).append(validation_scores(model, tokenizer, profile))
            if i == 0 and curve is not None:
                curves[name] = curve
            del model
            gc.collect()
    if any(len(scores) != profile.seeds for scores in test.values()):
        raise ValueError("every seed must yield the same runs: "
                         + ", ".join(f"{name} {len(scores)}x" for name, scores in test.items()))
    spread = (DOMAIN_TASK, profile.general_task).__contains__
    return ({name: mean_over_seeds(scores, spread) for name, scores in test.items()},
            {name: mean_over_seeds(scores, spread) for name, scores in validation.items()}, curves)


def continual_sequence(tasks: Sequence[str], profile: Profile, steps: int, replay_fraction: float = 0.0,
                       seed: int = 0) -> pd.DataFrame:
    """Full fine-tuning on ``tasks`` one after another, from the shipped base.

    Returns the accuracy matrix: row ``base`` then one row per stage (``after <task>``), one column per
    task, each entry the test score measured right after that stage. With ``replay_fraction`` > 0,
    each stage mixes that fraction of examples from the earlier tasks' training data (replay). Each
    task trains on its train rows that fit the profile's ``max_seq_length`` (:func:`rows_that_fit`).
    """
    model, tokenizer = load_model(profile)
    matrix = {"base": {t: score(model, tokenizer, t, profile) for t in tasks}}
    seen: list[dict] = []
    for i, task in enumerate(tasks):
        rows = rows_that_fit(task_rows(task, "train"), tokenizer, profile.max_seq_length)
        data = replay_mix(rows, seen, replay_fraction if seen else 0.0, tokenizer, profile.max_seq_length, seed + i)
        model = fine_tune(model, tokenizer, data, profile, steps).model
        matrix[f"after {task}"] = {t: score(model, tokenizer, t, profile) for t in tasks}
        seen += rows
    return pd.DataFrame(matrix).T[list(tasks)]


def train_variants(variants: Mapping[str, tuple[Sequence[dict], object]], profile: Profile, tokenizer, steps: int,
                   reuse: Mapping[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """Fine-tune the profile's base once per variant, ``{name: (training rows, SFTConfig)}``, for
    ``steps`` steps each with that config's recipe (:func:`labhelpers.training.fine_tune`); a variant
    named in ``reuse`` takes the model given there instead (a run already made with the same recipe).
    Returns ``{name: trained model}`` in the variants' order."""
    models = dict(reuse or {})
    for name, (rows, args) in variants.items():
        if name not in models:
            model, _ = load_model(profile)
            models[name] = fine_tune(model, tokenizer, rows, profile, steps, args=args).model
    return {name: models[name] for name in variants}
