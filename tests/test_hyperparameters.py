"""Lab 2b's search: the search space, the median rule and its checker, the objective's pruning report,
the studies on disk (read back by optuna-dashboard), and the tables and fit read from them."""

from __future__ import annotations

import io
import json
import math
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

import reference_solutions as ref
from labhelpers import hyperparameters, profiles
from labhelpers.evaluation import with_intervals

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_search_space_is_log_uniform_in_the_learning_rate_around_the_profiles():
    profile = profiles.get("ci")
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    drawn = hyperparameters.lora_search_space(trial, profile)
    d = trial.distributions
    assert set(drawn) == set(hyperparameters.SEARCHED) and drawn == trial.params
    lr = profile.learning_rate
    assert d["learning_rate"] == optuna.distributions.FloatDistribution(lr / 10, lr * 10, log=True)
    assert d["r"] == optuna.distributions.CategoricalDistribution([2, 4, 8, 16])
    assert d["warmup"] == optuna.distributions.FloatDistribution(0.0, 0.2)
    assert hyperparameters.rank_choices(profiles.get("t4")) == [8, 16, 32, 64]
    assert hyperparameters.rank_choices(profile.with_(lora_r=1)) == [1, 2, 4]
    defaults = hyperparameters.default_settings(profile)  # trial 0 of every study: inside the space
    assert d["learning_rate"].low <= defaults["learning_rate"] <= d["learning_rate"].high
    assert defaults["r"] in d["r"].choices and 0 <= defaults["warmup"] <= 0.2


def test_the_shipped_search_space_solution_matches_the_reference():
    reference = optuna.create_study().ask()
    hyperparameters.lora_search_space(reference, profiles.get("ci"))
    yours = optuna.create_study().ask()
    ref.search_space_for(profiles.get("ci"))(yours)
    assert yours.distributions == reference.distributions


def test_median_rule_cases_follow_optunas_median_pruner():
    cases = hyperparameters.median_rule_cases(40, seed=3)
    assert 0 < sum(c["expected"] for c in cases) < len(cases)  # both answers occur
    # a hand-made case: completed trials reached 0.5 and 0.7 at step 3; a trial at 0.2 is pruned, 0.9 is not
    study = optuna.create_study(direction="maximize")
    for v in (0.5, 0.7):
        study.add_trial(optuna.trial.create_trial(value=v, intermediate_values={3: v}))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1)
    running = lambda v: optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, intermediate_values={3: v})
    assert pruner.prune(study, running(0.2)) and not pruner.prune(study, running(0.9))
    assert ref.median_should_prune({3: 0.2}, [{3: 0.5}, {3: 0.7}], 1, 0)
    assert not ref.median_should_prune({3: 0.9}, [{3: 0.5}, {3: 0.7}], 1, 0)


def test_the_median_rule_check_passes_the_solution_and_rejects_wrong_rules():
    cases = hyperparameters.median_rule_cases()
    assert hyperparameters.check_median_rule(ref.median_should_prune, cases).passed
    for wrong in (ref.median_rule_on_last_value, ref.median_rule_with_mean, ref.median_rule_without_startup,
                  ref.median_rule_ignoring_warmup):
        check = hyperparameters.check_median_rule(wrong, cases)
        assert not check.passed and (~check.rows["same"]).sum() >= 1, wrong.__name__


class _Trial:
    """What ValidationReport needs of an optuna.Trial: report and should_prune."""

    def __init__(self, prune: bool):
        self.prune, self.reported = prune, {}

    def report(self, value, step):
        self.reported[step] = value

    def should_prune(self):
        return self.prune


@pytest.mark.parametrize("prune", [False, True])
def test_the_validation_report_stops_the_run_only_when_the_trial_is_pruned(prune):
    model = torch.nn.Linear(2, 2)
    model.train()
    modes = []
    trial = _Trial(prune)
    report = hyperparameters.ValidationReport(trial, lambda m: modes.append(m.training) or 0.25, at_step=5)
    for step in (4, 5, 6):
        control = SimpleNamespace(should_training_stop=False)
        report.on_step_end(None, SimpleNamespace(global_step=step), control, model=model)
        assert control.should_training_stop == (prune and step == 5)
    assert trial.reported == {5: 0.25} and modes == [False] and model.training  # evaluated in eval mode, then back
    assert report.pruned_at == (5 if prune else None)


def test_evaluating_puts_a_fused_forward_back():
    model = torch.nn.Linear(2, 2)
    fused = lambda *a, **k: "fused"
    model.forward = fused
    with hyperparameters.evaluating(model) as m:
        assert "forward" not in m.__dict__ and not m.training
        assert m(torch.ones(1, 2)).shape == (1, 2)  # the model's own forward
    assert model.forward is fused and model.training


def test_fresh_storage_starts_over(tmp_path):
    path = tmp_path / "studies" / "s.db"
    url = hyperparameters.fresh_storage(path)
    optuna.create_study(study_name="old", storage=url)
    url = hyperparameters.fresh_storage(path)
    assert url == f"sqlite:///{path.resolve()}" and optuna.get_all_study_names(url) == []


def test_power_law_fit_recovers_the_exponent():
    params = np.array([3e5, 1e6, 3e6])
    slope, coefficient = hyperparameters.power_law_fit(params, 2.0 * params ** -0.5)
    assert slope == pytest.approx(-0.5) and coefficient == pytest.approx(2.0)
    with pytest.raises(ValueError, match="two different sizes"):
        hyperparameters.power_law_fit([1e6, 1e6], [1e-3, 2e-3])


def test_with_intervals_takes_one_size_per_row():
    table = pd.DataFrame({"task": ["sql", "code"], "score": [0.5, 0.5]})
    out = with_intervals(table, {"score": [34, 200]})
    widths = out["score 95% high"] - out["score 95% low"]
    assert widths.iloc[0] > widths.iloc[1]  # fewer examples, wider interval
    with pytest.raises(ValueError, match="one per row"):
        with_intervals(table, {"score": [34]})


class _PruneFromTrial(optuna.pruners.BasePruner):
    """Prunes every trial numbered ``first`` or later at its first report: a deterministic pruned trial."""

    def __init__(self, first: int):
        self.first = first

    def prune(self, study, trial) -> bool:
        return trial.number >= self.first


def _wsgi_get(app, path: str) -> dict:
    status = {}
    body = app({"REQUEST_METHOD": "GET", "PATH_INFO": path, "SERVER_NAME": "localhost", "SERVER_PORT": "80",
                "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http", "QUERY_STRING": ""},
               lambda s, headers, exc_info=None: status.setdefault("status", s))
    assert status["status"].startswith("200"), status
    return json.loads(b"".join(body))


@pytest.mark.slow
def test_a_study_runs_prunes_keeps_its_models_and_is_stored(tmp_path):
    """Three trials of micro on SQL (smoke counts): trial 0 is the defaults, trial 2 is pruned half-way,
    the default and best models are kept and scored on test, and the SQLite file reads back in Optuna
    and in optuna-dashboard."""
    profile = profiles.get("smoke").with_(sweep_models=("micro",))
    url = hyperparameters.fresh_storage(tmp_path / "studies.db")

    def new_study(model_name, task):
        return optuna.create_study(study_name=f"{task} | {model_name}", storage=url, direction="maximize",
                                   sampler=optuna.samplers.RandomSampler(seed=0), pruner=_PruneFromTrial(2))

    studies, objectives = hyperparameters.run_studies(
        new_study, lambda t: hyperparameters.lora_search_space(t, profile), profile, ["sql"], steps=4, n_trials=3)
    trials = hyperparameters.trials_table(studies)
    assert trials["state"].tolist() == ["complete", "complete", "pruned"]
    assert trials["steps_trained"].tolist() == [4, 4, 2]  # the pruned run stopped half-way
    assert trials.iloc[0][list(hyperparameters.SEARCHED)].to_dict() == hyperparameters.default_settings(profile)
    assert trials["halfway_score"].notna().all() and math.isnan(trials["score"].iloc[2])
    objective = objectives["micro", "sql"]
    best = studies["micro", "sql"].best_trial.number
    assert set(objective.kept) == {0, best} and objective.params > 0
    table = hyperparameters.best_settings(studies, objectives)
    assert table.loc[0, "score"] >= table.loc[0, "default_score"] and table.loc[0, "split"] == "validation"
    tuned = hyperparameters.tuned_against_default(studies, objectives)
    assert tuned.loc[0, "tuned_is_default"] == (best == 0)
    assert 0 <= tuned.loc[0, "tuned_test"] <= 1 and 0 <= tuned.loc[0, "default_test"] <= 1
    importance = hyperparameters.importances(studies).iloc[0]
    finished = trials.loc[trials["state"] == "complete", "score"]
    assert importance["score_spread"] == pytest.approx(finished.max() - finished.min())
    if importance["score_spread"] > 0:  # the importances share out the spread
        assert importance[list(hyperparameters.SEARCHED)].sum() == pytest.approx(1.0)
    else:  # nothing to explain
        assert importance[list(hyperparameters.SEARCHED)].isna().all()

    stored = optuna.load_study(study_name="sql | micro", storage=url)
    assert [t.state.name for t in stored.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    from optuna_dashboard import wsgi

    listed = _wsgi_get(wsgi(url), "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in listed] == ["sql | micro"]


def test_a_search_space_missing_a_field_is_named():
    objective = object.__new__(hyperparameters.LoraObjective)  # no model loaded: the check comes first
    objective.space = lambda trial: {"learning_rate": 1e-3, "r": 4}
    with pytest.raises(KeyError, match=r"missing: \['warmup'\]"):
        objective(optuna.create_study().ask())


def test_a_trial_needs_two_steps():
    with pytest.raises(ValueError, match="at least 2 steps"):
        hyperparameters.LoraObjective(lambda t: {}, "micro", "sql", profiles.get("smoke"), steps=1)
