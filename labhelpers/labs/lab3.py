"""Lab 3's experiments: a shared instruction-tuned start, one expert per skill, every merge of them
scored on every skill, and a merge compared against your own per-tensor rule."""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from labhelpers.continual import general_skill_from_pretraining
from labhelpers.evaluation import SELECTION_SPLIT, mean_over_seeds, scores, select_best
from labhelpers.harness import score_folder as harness_score_folder
from labhelpers.merging import NEEDS_BASE, Checkpoint, merge_checkpoints, preservation
from labhelpers.models import load_model, local_checkpoint  # local_checkpoint: the notebook calls lab3.local_checkpoint
from labhelpers.tasks import load_split, task_rows
from labhelpers.training import fine_tune

EXPERT_TASKS = ("code", "sql")


def lab_tasks(profile) -> tuple[str, ...]:
    """What every model of the lab is scored on: the experts' tasks and the profile's general skill
    (``general_task``: the tiny bases' arithmetic, an instruct model's instruction following)."""
    return (*EXPERT_TASKS, profile.general_task)


def save_model(model, tokenizer, folder: str | Path) -> Path:
    """Save a model and its tokenizer as a loadable folder with safetensors weights."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def score_folder(folder: str | Path, profile, tasks: Sequence[str] | None = None, split: str = "test",
                 harness: bool = False) -> dict[str, float]:
    """Load a model folder on the profile's device and score it on ``tasks`` (default:
    :func:`lab_tasks`; ``split`` of each): with
    the labs' own generation and scorers, or with ``harness=True`` through ``lm-eval``'s
    ``simple_evaluate`` and the course's custom tasks (:mod:`labhelpers.harness`: the same scorers)."""
    tasks = tasks or lab_tasks(profile)
    if harness:
        return harness_score_folder(folder, profile, tasks, split)
    model, tokenizer = load_model(profile, str(folder))
    return scores(model, tokenizer, tasks, profile, split)


def score_folders(folders: Mapping[str, str | Path], profile, tasks: Sequence[str] | None = None,
                  split: str = "test", harness: bool = False) -> pd.DataFrame:
    """One row per named model folder: a column per task, ``average`` over them, and ``split``
    (scored as :func:`score_folder` does, through ``lm-eval`` with ``harness=True``)."""
    tasks = tasks or lab_tasks(profile)
    table = pd.DataFrame({name: score_folder(folder, profile, tasks, split, harness)
                          for name, folder in folders.items()}).T
    table["average"] = table[list(tasks)].mean(axis=1)
    table["split"] = split
    return table


def general_rows() -> list[dict]:
    """General instruction data: the arithmetic facts as chats and as plain completions."""
    chats = [{"messages": row["messages"]} for row in load_split("arithmetic", "train")]  # stored with each fact
    return chats + task_rows("arithmetic", "train")


def train_instruct_start(profile, folder: str | Path, steps: int, task_fraction: float = 0.02,
                         tasks_: Sequence[str] = EXPERT_TASKS, repeats: int = 4) -> tuple[Path, object | None]:
    """The shared starting point of the experts, and its training run: the base instruction-tuned on
    general data (:func:`general_rows`, ``repeats`` times) plus a small ``task_fraction`` of each task's
    training rows, like an instruct model that has seen a little of everything. Saved to ``folder``.

    A base whose general skill was not learnt in pretraining (an instruct model:
    :func:`labhelpers.continual.general_skill_from_pretraining`) is already such a start: its own folder
    is returned, with no run."""
    if not 0.0 <= task_fraction <= 1.0:
        raise ValueError(f"task_fraction must be in [0, 1], got {task_fraction}")
    if not general_skill_from_pretraining(profile):
        return local_checkpoint(profile.base_model), None
    rng = random.Random(profile.seed)
    rows = general_rows() * repeats
    for task in tasks_:
        pool = task_rows(task, "train")
        rows += rng.sample(pool, round(task_fraction * len(pool)))
    rng.shuffle(rows)
    return _train_and_save(rows, profile, folder, steps)


def train_expert(tasks_: Sequence[str], profile, folder: str | Path, steps: int, start: str | Path | None = None,
                 learning_rate: float | None = None, peft_config=None) -> tuple[Path, object]:
    """Fine-tune ``start`` (default: the profile's base) on the union of ``tasks_``' training rows and
    save the full weights to ``folder``.

    One task makes an expert; several make the multi-task baseline. With ``peft_config`` (LoRA) the
    adapter alone is also saved to ``folder/adapter`` and ``folder`` receives the merged weights
    (``merge_and_unload``). Returns (folder, TrainResult).
    """
    rows = [row for task in tasks_ for row in task_rows(task, "train")]
    random.Random(profile.seed).shuffle(rows)
    return _train_and_save(rows, profile, folder, steps, start, learning_rate, peft_config)


def _train_and_save(rows: list[dict], profile, folder: str | Path, steps: int, start: str | Path | None = None,
                    learning_rate: float | None = None, peft_config=None) -> tuple[Path, object]:
    """Load ``start`` (default: the profile's base), fine-tune it on ``rows`` and save it to ``folder``
    (with ``peft_config``: the adapter to ``folder/adapter``, the merged weights to ``folder``)."""
    model, tokenizer = load_model(profile, str(start) if start is not None else None)
    run = fine_tune(model, tokenizer, rows, profile, steps, learning_rate=learning_rate, peft_config=peft_config)
    trained = run.model
    if peft_config is not None:
        trained.save_pretrained(Path(folder) / "adapter")
        trained = trained.merge_and_unload()
    return save_model(trained, tokenizer, folder), run


def compare_merge(tensor_fn: Callable, method: str, models: Sequence[str | Path], base: str | Path | None,
                  **knobs) -> float:
    """Merge real checkpoints with your per-tensor function and with the reference method; return the
    largest absolute difference over all tensors beyond the rounding of the stored dtype (two steps of
    its precision, ``2 eps |w|``: bf16 or fp16 checkpoints round what two correct merges compute in
    fp32 a step apart; fp32 ones are compared almost exactly). 0 means identical up to that rounding.
    Your function gets the tensors in float32, as the reference computes (in bf16, ``e - b`` alone
    rounds by a step of ``|b|``, more than the merged weight's rounding where they nearly cancel)."""
    def in_fp32(name, base_tensor, experts):
        return tensor_fn(name, None if base_tensor is None else base_tensor.float(), [e.float() for e in experts])

    with tempfile.TemporaryDirectory(prefix="sftlabs-merge-") as tmp:
        ours = merge_checkpoints(models, Path(tmp) / "yours", method, base=base, tensor_fn=in_fp32, **knobs)
        reference = merge_checkpoints(models, Path(tmp) / "reference", method, base=base, **knobs)
        a, b = Checkpoint(ours.folder), Checkpoint(reference.folder)
        return max(_beyond_rounding(a[n], b[n]) for n in b.tensors if b.tensors[n].end > b.tensors[n].start)


def _beyond_rounding(ours: torch.Tensor, reference: torch.Tensor) -> float:
    eps = torch.finfo(reference.dtype).eps if reference.is_floating_point() else 0.0
    excess = (ours.float() - reference.float()).abs() - 2 * eps * reference.float().abs()
    return max(0.0, excess.max().item())


def sweep_merges(configs: Sequence[Mapping], experts: Sequence[str | Path], base: str | Path, out_root: str | Path,
                 profile, tasks: Sequence[str] | None = None, tensor_fns: Mapping[str, Callable] | None = None,
                 split: str = SELECTION_SPLIT):
    """Run each merge config (``{"method": ..., "knob": <name>, <name>: value, ...}``) and score it.

    ``knob`` names the swept setting; its value is ``config["value"]`` when given (e.g. a label for a
    pair of weights), else ``config[knob]``. Every other key is passed to :func:`merge_checkpoints`.
    The merges are scored on ``split``: the validation split by default, because a sweep is for
    choosing (:func:`labhelpers.evaluation.select_best`); score the chosen merges on the test split
    with :func:`score_folders`.

    Returns a DataFrame: ``method``, ``knob``, ``value``, ``label``, one column per task, ``average``,
    ``seconds`` (merge time), ``folder`` (the merged checkpoint) and ``split``. ``tensor_fns`` maps a
    method to your per-tensor function. ``tasks`` default to :func:`lab_tasks`.
    """
    tasks = tasks or lab_tasks(profile)
    rows = []
    for config in tqdm(configs, desc="merges"):
        config = dict(config)
        method, knob = config.pop("method"), config.pop("knob")
        value = config.pop("value", config.get(knob, math.nan))
        label = f"{method} {knob}={value:g}"
        folder = Path(out_root) / label.replace(" ", "_").replace("=", "")
        fn = (tensor_fns or {}).get(method)
        report = merge_checkpoints(experts, folder, method, base=base if NEEDS_BASE[method] else None,
                                   tensor_fn=fn, **config)
        scores = score_folder(folder, profile, tasks, split)
        rows.append({"method": method, "knob": knob, "value": value, "label": label,
                     **scores, "average": sum(scores.values()) / len(scores), "seconds": report.seconds,
                     "folder": folder, "split": split})
    return pd.DataFrame(rows)


def chosen_merges_on_test(sweep: pd.DataFrame, profile, tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """Each method's best merge of ``sweep`` (scored on validation by :func:`sweep_merges`), chosen on
    validation (:func:`~labhelpers.evaluation.select_best`) and then scored once on the test split.

    One row per method, indexed by the chosen merge's ``label``: ``method``, its ``validation average``,
    each task's test score, ``average`` and ``split`` (``"test"``)."""
    chosen = select_best(sweep, "average", group="method").set_index("label")
    table = score_folders(chosen["folder"].to_dict(), profile, tasks, "test")
    table.insert(0, "validation average", chosen["average"].astype(float))
    table.insert(0, "method", chosen["method"])
    return table


def merge_methods_over_seeds(configs: Sequence[Mapping], profile, out_root: str | Path, steps: int,
                             learning_rate: float | None = None, first: tuple | None = None,
                             tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """The merge comparison repeated once per seed of the profile (``profile.seeds`` of them: seed
    ``profile.seed``, ``+ 1``, ...), so that a method's lead can be told from the luck of one training run.

    With each seed: train the instruction-tuned start (:func:`train_instruct_start`) and the code and SQL
    experts from it (:func:`train_expert`, ``steps`` each at ``learning_rate``), sweep ``configs`` on
    validation (:func:`sweep_merges`), score each method's chosen merge on test
    (:func:`chosen_merges_on_test`) and its retention of each expert's test score on that expert's task
    (:func:`~labhelpers.merging.preservation`; for the experts' tasks among ``tasks``). ``first = (start, {"code": folder, "sql": folder}, sweep)``
    reuses a seed already trained and swept with ``profile.seed`` and ``steps``.

    Returns one row per method: each number averaged over the seeds with its ``seed sd`` (test scores,
    ``average``, ``<task>_kept``, ``validation average``), ``chosen`` (the merge chosen in each seed) and
    ``seeds``. Choose between the methods on ``validation average``, never on the test columns.
    """
    tasks = tasks or lab_tasks(profile)
    per_method: dict[str, list[dict]] = {}
    for i in range(profile.seeds):
        seeded = profile.with_(seed=profile.seed + i)
        if i == 0 and first is not None:
            start, experts, sweep = first
        else:
            folder = Path(out_root) / f"seed{seeded.seed}"
            start, _ = train_instruct_start(seeded, folder / "instruct", steps)
            experts = {task: train_expert([task], seeded, folder / f"{task}_expert", steps, start=start,
                                          learning_rate=learning_rate)[0] for task in EXPERT_TASKS}
            sweep = sweep_merges(configs, list(experts.values()), start, folder / "merges", seeded, tasks)
        own = {task: score_folder(expert, seeded, [task], "test") for task, expert in experts.items() if task in tasks}
        table = preservation(chosen_merges_on_test(sweep, seeded, tasks), own).drop(columns="split")
        for label, row in table.iterrows():
            per_method.setdefault(row["method"], []).append({"chosen": label, **row.drop("method").to_dict()})
    rows = {method: mean_over_seeds(runs, spread=lambda key: True) for method, runs in per_method.items()}
    for method, runs in per_method.items():
        rows[method]["chosen"] = ", ".join(run["chosen"] for run in runs)
    return pd.DataFrame(rows).T.infer_objects()
