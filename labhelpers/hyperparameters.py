"""Hyperparameter search with Optuna around the course's LoRA fine-tuning (Lab 2b).

A study searches the learning rate, the LoRA rank and the warmup of one (base model, task) pair. Each
trial is one LoRA run of :func:`labhelpers.training.fine_tune`, scored on the validation split; half-way
through, :class:`ValidationReport` reports the validation score to the trial so that the study's pruner
can stop a run that is already behind (its remaining steps are saved). The sampler, the pruner and the
search space are the student's (Lab 2b builds them with Optuna's own API); this module runs the trials
and reads the studies back:

* :class:`LoraObjective`: the objective ``study.optimize`` calls; it keeps the models of the default
  trial and of the best trial so far, to score them on test once the search is over.
* :func:`fresh_storage`: a new SQLite file for the studies (``optuna-dashboard sqlite:///<file>``).
* :func:`run_studies`: one study per (base size, task), the defaults as trial 0.
* :func:`trials_table`, :func:`best_settings`, :func:`tuned_against_default`, :func:`importances`,
  :func:`power_law_fit`: tables, and the fitted slope of ``log(best learning rate)`` against
  ``log(parameters)``.
"""

from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from transformers import TrainerCallback

from labhelpers.evaluation import SELECTION_SPLIT, score
from labhelpers.models import count_parameters, load_model, unwrap_peft
from labhelpers.peft_methods import peft_config
from labhelpers.profiles import Profile
from labhelpers.tasks import task_rows
from labhelpers.training import fine_tune

#: The searched fields, as a search space names them: ``{"learning_rate", "r", "warmup"}``.
SEARCHED = ("learning_rate", "r", "warmup")


@contextlib.contextmanager
def evaluating(model):
    """Evaluation mode inside a training run: ``model.eval()`` and, while it lasts, without TRL's fused
    LM-head ``forward`` (generation needs the model's own), then both put back as they were."""
    inner = unwrap_peft(model)
    fused = inner.__dict__.pop("forward", None)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if fused is not None:
            inner.forward = fused
        model.train(was_training)


class ValidationReport(TrainerCallback):
    """Report ``evaluate(model)`` to an Optuna ``trial`` at ``at_step`` and stop the run there when the
    trial's pruner says so (``trial.should_prune()``); :attr:`pruned_at` is then the step it stopped at.
    Training stops through ``control.should_training_stop``: the Trainer ends the run cleanly."""

    def __init__(self, trial, evaluate: Callable[[object], float], at_step: int):
        self.trial, self.evaluate, self.at_step = trial, evaluate, at_step
        self.pruned_at: int | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.at_step:
            return control
        with evaluating(model):
            value = self.evaluate(model)
        self.trial.report(value, state.global_step)
        if self.trial.should_prune():
            self.pruned_at = state.global_step
            control.should_training_stop = True
        return control


def rank_choices(profile: Profile) -> list[int]:
    """The LoRA ranks a search tries: half, once, twice and four times the profile's ``lora_r``."""
    return sorted({max(1, profile.lora_r // 2), profile.lora_r, 2 * profile.lora_r, 4 * profile.lora_r})


def lora_search_space(trial, profile: Profile) -> dict:
    """Lab 2b's search space, drawn through ``trial`` (an ``optuna.Trial``): the learning rate
    log-uniform over a tenth to ten times the profile's, the LoRA rank among :func:`rank_choices`, and
    the warmup as a fraction of the steps, uniform over [0, 0.2]."""
    lr = profile.learning_rate
    return {"learning_rate": trial.suggest_float("learning_rate", lr / 10, lr * 10, log=True),
            "r": trial.suggest_categorical("r", rank_choices(profile)),
            "warmup": trial.suggest_float("warmup", 0.0, 0.2)}


def default_settings(profile: Profile) -> dict:
    """The profile's own LoRA settings in the searched fields: what a run uses when nobody searches."""
    return {"learning_rate": profile.learning_rate, "r": profile.lora_r, "warmup": 0.05}


@dataclass
class LoraObjective:
    """One LoRA run of ``model_name`` on ``task`` per trial, ``steps`` steps, scored on validation.

    ``space(trial)`` draws the settings (``{"learning_rate", "r", "warmup"}``, warmup a fraction of the
    steps). ``alpha / r`` stays at the profile's ratio, so that the rank changes capacity and not the
    step size. Half-way the validation score is reported to the trial (:class:`ValidationReport`); a
    pruned trial raises ``optuna.TrialPruned``. Each trial records, as user attributes, the steps it
    trained, its final loss and its training seconds. :attr:`kept` holds the models of trial 0 (enqueue
    the defaults there: :func:`default_settings`) and of the best trial so far.
    """

    space: Callable[[object], Mapping[str, float]]
    model_name: str
    task: str
    profile: Profile
    steps: int
    kept: dict[int, object] = field(default_factory=dict)
    params: int = field(default=0, init=False)  # the base's parameter count
    _best: float = field(default=-math.inf, repr=False)

    def __post_init__(self):
        if self.steps < 2:
            raise ValueError(f"a trial needs at least 2 steps (it reports half-way), got steps={self.steps}")
        base, self.tokenizer = load_model(self.profile, self.model_name)
        self.params = count_parameters(base)["total"]
        self.rows = task_rows(self.task, "train")

    def validation_score(self, model) -> float:
        return score(model, self.tokenizer, self.task, self.profile, SELECTION_SPLIT)

    def __call__(self, trial) -> float:
        import optuna

        settings = dict(self.space(trial))
        missing = set(SEARCHED) - set(settings)
        if missing:
            raise KeyError(f"the search space returned {sorted(settings)}; it must return {list(SEARCHED)} "
                           f"(missing: {sorted(missing)})")
        model, _ = load_model(self.profile, self.model_name)
        r = int(settings["r"])
        lora = peft_config("lora", self.profile, r=r, lora_alpha=self.profile.lora_alpha / self.profile.lora_r * r)
        report = ValidationReport(trial, self.validation_score, at_step=self.steps // 2)
        run = fine_tune(model, self.tokenizer, self.rows, self.profile, self.steps,
                        learning_rate=float(settings["learning_rate"]), peft_config=lora,
                        warmup_steps=float(settings["warmup"]), callbacks=[report])
        trial.set_user_attr("steps_trained", run.steps)
        trial.set_user_attr("final_loss", run.final_loss)
        trial.set_user_attr("train_seconds", run.train_seconds)
        if report.pruned_at is not None:
            raise optuna.TrialPruned(f"validation score below the median at step {report.pruned_at}")
        value = self.validation_score(run.model)
        if trial.number == 0 or value > self._best:
            if value > self._best:
                self._best = value
                self.kept = {n: m for n, m in self.kept.items() if n == 0}
            self.kept[trial.number] = run.model
        gc.collect()
        return value


def run_studies(new_study: Callable[[str, str], object], space: Callable[[object], Mapping[str, float]],
                profile: Profile, tasks: Sequence[str], steps: int, n_trials: int | None = None
                ) -> tuple[dict[tuple[str, str], object], dict[tuple[str, str], LoraObjective]]:
    """One study per (base in ``profile.sweep_models``, task): ``new_study(model, task)`` creates it (the
    sampler, pruner and storage are its own), trial 0 is the profile's defaults (:func:`default_settings`)
    and the other ``n_trials - 1`` (default: ``profile.search_trials``) are the sampler's, each a
    :class:`LoraObjective` run of ``steps`` steps. Returns ``(studies, objectives)`` keyed by ``(model, task)``."""
    import optuna

    n_trials = n_trials or profile.search_trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trials table shows every trial
    studies, objectives = {}, {}
    for task in tasks:
        for name in profile.sweep_models:
            study = new_study(name, task)
            study.enqueue_trial(default_settings(profile))
            objectives[name, task] = LoraObjective(space, name, task, profile, steps)
            study.optimize(objectives[name, task], n_trials=n_trials, gc_after_trial=True)
            studies[name, task] = study
    return studies, objectives


def fresh_storage(path: str | Path) -> str:
    """The SQLite storage URL of ``path``, after removing any earlier file there (a rerun starts over)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return f"sqlite:///{path.resolve()}"


def trials_table(studies: Mapping[tuple[str, str], object]) -> pd.DataFrame:
    """One row per trial of ``{(model, task): study}``: the settings, its state, the validation score
    (NaN for a pruned trial), the half-way score, and the steps and seconds it trained."""
    rows = []
    for (model, task), study in studies.items():
        for t in study.trials:
            rows.append({"model": model, "task": task, "trial": t.number, "state": t.state.name.lower(),
                         **{k: t.params.get(k) for k in SEARCHED},
                         "score": t.value if t.state.name == "COMPLETE" else math.nan,  # (Optuna keeps a
                         # pruned trial's last report as its value: that is the half-way score here)
                         "halfway_score": next(iter(t.intermediate_values.values()), math.nan),
                         "steps_trained": t.user_attrs.get("steps_trained"),
                         "train_seconds": t.user_attrs.get("train_seconds")})
    return pd.DataFrame(rows)


def best_settings(studies: Mapping[tuple[str, str], object], objectives: Mapping[tuple[str, str], LoraObjective]
                  ) -> pd.DataFrame:
    """Per study, the best trial's settings and validation ``score`` (the default, trial 0, beside it),
    with the base's parameter count; smallest base first within each task."""
    rows = []
    for key, study in studies.items():
        best, default = study.best_trial, study.trials[0]
        rows.append({"model": key[0], "task": key[1], "params": objectives[key].params, "best_trial": best.number,
                     **best.params, "score": best.value, "default_score": default.value,
                     "split": SELECTION_SPLIT})
    table = pd.DataFrame(rows)
    return table.sort_values(["task", "params"], kind="stable").reset_index(drop=True)


def tuned_against_default(studies: Mapping[tuple[str, str], object],
                          objectives: Mapping[tuple[str, str], LoraObjective]) -> pd.DataFrame:
    """The test score of each study's best trial and of its default trial (trial 0), one row per study.
    The best trial was chosen on validation; the test split is read here, once, for the report."""
    rows = []
    for key, study in studies.items():
        objective = objectives[key]
        best = study.best_trial.number
        if 0 not in objective.kept:
            raise ValueError(f"study {key}: trial 0, the defaults, did not finish ({study.trials[0].state.name}), so "
                             "there is no default to compare with; use a pruner that lets the first trial finish "
                             "(MedianPruner never prunes before a trial has completed)")
        test = {n: score(m, objective.tokenizer, objective.task, objective.profile) for n, m in objective.kept.items()
                if n in (0, best)}
        rows.append({"model": key[0], "task": key[1], "default_test": test[0], "tuned_test": test[best],
                     "tuned_is_default": best == 0})
    return pd.DataFrame(rows)


def importances(studies: Mapping[tuple[str, str], object], seed: int = 0) -> pd.DataFrame:
    """Optuna's parameter importances (fANOVA) of each study: one row per study, one column per
    searched field (they sum to 1), and ``score_spread``, the range of its finished trials' scores. A
    study whose finished trials all scored the same (or fewer than two finished) has nothing to
    explain: NaN."""
    import optuna

    rows = []
    for (model, task), study in studies.items():
        done = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        spread = max(done) - min(done) if done else 0.0
        values = ({} if len(done) < 2 or spread == 0 else optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)))
        rows.append({"model": model, "task": task, **{k: values.get(k, math.nan) for k in SEARCHED},
                     "score_spread": spread})
    return pd.DataFrame(rows)


def power_law_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """The least-squares line through ``(log x, log y)``: ``(b, a)`` with ``y ~ a * x**b`` (for the best
    learning rate against the parameter count, ``b`` is the size exponent). Needs two different ``x``."""
    if len(set(x)) < 2:
        raise ValueError(f"a slope needs at least two different sizes, got {list(x)}")
    slope, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(slope), float(np.exp(intercept))


def median_rule_cases(n_cases: int = 120, seed: int = 0) -> list[dict]:
    """Random pruning decisions for the median-rule exercise, each answered by Optuna's own
    ``MedianPruner.prune``: a maximized study with completed and pruned trials, a running trial's
    intermediate values ``{step: value}`` (some NaN, some steps missing) and a pruner setting. Keys:
    ``values``, ``completed`` (each completed trial's values), ``n_startup_trials``, ``n_warmup_steps``,
    ``expected``."""
    import warnings

    import optuna
    from optuna.trial import TrialState, create_trial

    rng = np.random.default_rng(seed)

    def values(n_steps: int) -> dict[int, float]:
        steps = sorted(rng.choice(8, size=n_steps, replace=False).tolist())
        return {s: (math.nan if rng.random() < 0.1 else float(rng.random())) for s in steps}

    cases, verbosity = [], optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per study created
    try:
        for _ in range(n_cases):
            study = optuna.create_study(direction="maximize")
            completed = [values(int(rng.integers(1, 6))) for _ in range(int(rng.integers(0, 6)))]
            for trial_values in completed:
                study.add_trial(create_trial(value=float(rng.random()), intermediate_values=trial_values))
            for _ in range(int(rng.integers(0, 3))):  # pruned trials: the rule must ignore them
                study.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values=values(2)))
            running = values(int(rng.integers(1, 4)))
            n_startup, n_warmup = int(rng.integers(0, 4)), int(rng.integers(0, 4))
            pruner = optuna.pruners.MedianPruner(n_startup_trials=n_startup, n_warmup_steps=n_warmup)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a median of NaNs only
                expected = pruner.prune(study, create_trial(state=TrialState.RUNNING, intermediate_values=running))
            cases.append({"values": running, "completed": completed, "n_startup_trials": n_startup,
                          "n_warmup_steps": n_warmup, "expected": bool(expected)})
    finally:
        optuna.logging.set_verbosity(verbosity)
    return cases


@dataclass
class RuleCheck:
    """Outcome of :func:`check_median_rule`: one row per case, ``passed`` when every answer matches."""

    passed: bool
    rows: pd.DataFrame


def check_median_rule(rule: Callable[..., bool], cases: Sequence[dict] | None = None) -> RuleCheck:
    """Compare ``rule(values, completed, n_startup_trials, n_warmup_steps)`` with Optuna's
    ``MedianPruner`` on :func:`median_rule_cases` (or the ``cases`` given)."""
    import warnings

    records = []
    for i, case in enumerate(cases if cases is not None else median_rule_cases()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a median of NaNs only
            got = rule(dict(case["values"]), [dict(c) for c in case["completed"]], case["n_startup_trials"],
                       case["n_warmup_steps"])
        records.append({"case": i, "completed": len(case["completed"]), "step": max(case["values"]),
                        "n_startup_trials": case["n_startup_trials"], "n_warmup_steps": case["n_warmup_steps"],
                        "optuna": case["expected"], "yours": got, "same": bool(got) == case["expected"]})
    rows = pd.DataFrame(records)
    return RuleCheck(bool(rows["same"].all()), rows)
