"""The course's tasks in lm-eval: the configs match the tasks, and the harness gives the labs' verdicts."""

import json

import pytest
import yaml

from labhelpers import harness
from labhelpers.paths import build_dir
from labhelpers.tasks import TASKS, get_task, load_split


def _config(task: str) -> dict:
    text = (harness.TASKS_DIR / f"{harness.harness_task(task)}.yaml").read_text()
    return yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)  # the tag is lm-eval's


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_config_matches_the_course_task(task):
    config = _config(task)
    assert config["task"] == harness.harness_task(task) and config["dataset_kwargs"] == {"task": task}
    assert config["generation_kwargs"]["max_gen_toks"] == get_task(task).max_new_tokens
    assert config["generation_kwargs"]["do_sample"] is False and config["output_type"] == "generate_until"
    assert [m["metric"] for m in config["metric_list"]] == [harness.METRICS[task]]


def test_the_task_manager_registers_the_course_tasks():
    manager = harness.task_manager()
    assert set(manager.all_tasks) == {harness.harness_task(t) for t in TASKS} | {"sftlabs"}  # the tasks and their tag
    for split in ("validation", "test"):  # the split reaches the dataset loader through the manager's metadata
        [task] = harness.task_manager(split).load([harness.harness_task("sql")])["tasks"].values()
        assert [doc["id"] for doc in task.test_docs()] == load_split("sql", split)["id"]
    with pytest.raises(KeyError, match="valid tasks"):
        harness.harness_task("poetry")


@pytest.mark.slow
def test_the_harness_and_the_course_scorers_agree_on_every_example(ci_profile, tmp_path):
    """A model tuned on code and SQL (so that scores are neither 0 nor 1), saved as a folder, scored by
    ``lm_eval.simple_evaluate`` (hf model type, the course's custom tasks) and by the labs' own
    generation and scorers: the same completion and the same verdict for every example of every task,
    also with answers capped by the profile (``max_new_tokens``, as the rehearsal does: 8 cuts code and SQL
    answers and leaves arithmetic's budget of 4), on Lab 3's tasks and the instruction probe."""
    from labhelpers.evaluation import evaluate
    from labhelpers.labs import lab3
    from labhelpers.models import load_model

    profile = ci_profile.with_(n_eval=60)
    folder, _ = lab3.train_expert(["code", "sql"], profile, tmp_path / "model", 60)
    model, tokenizer = load_model(profile, str(folder))
    completions, record = {}, {}
    tasks = (*lab3.lab_tasks(profile), "instructions")
    for scored in (profile, profile.with_(max_new_tokens=8)):
        by_harness = harness.evaluate_folder(folder, scored, tasks)
        for task in tasks:
            ours = evaluate(model, tokenizer, task, scored)
            assert by_harness[task]["completions"] == ours["completion"].tolist(), (task, scored.max_new_tokens)
            assert by_harness[task]["verdicts"] == ours["correct"].astype(float).tolist(), (task, scored.max_new_tokens)
            assert by_harness[task]["score"] == pytest.approx(ours["correct"].mean())
            completions[task, scored.max_new_tokens] = ours["completion"].tolist()
            record.setdefault(task, {"examples": len(ours), "score": float(ours["correct"].mean())})
    assert any(0 < r["score"] < 1 for r in record.values())  # the agreement is not all zeros or all ones
    assert completions["code", None] != completions["code", 8]  # the cap reached both generations
    assert completions["arithmetic", None] == completions["arithmetic", 8]  # and never raised a task's budget
    build_dir().mkdir(exist_ok=True)
    (build_dir() / "harness-agreement.json").write_text(json.dumps(record, indent=1) + "\n")
