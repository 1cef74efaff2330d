"""Unsloth as a backend (labhelpers.unsloth_cli, labhelpers.labs.backend_comparison): the spec both runs
read, the result both write, the comparison. The runs themselves: Lab 1b in test_notebooks, and the
gpu-smoke dry run in test_make_targets."""

import json

import pytest

from labhelpers import profiles, unsloth_cli
from labhelpers.data import sft_dataset
from labhelpers.labs import backend_comparison
from labhelpers.models import load_tokenizer
from labhelpers.peft_methods import get_method, peft_config
from labhelpers.tasks import load_split
from labhelpers.training import sft_config_fields
from labhelpers.unsloth_cli import BackendRun


def _run(backend="course", device="cpu", losses=((1, 0.6), (2, 0.5), (3, 0.4)), **changes) -> BackendRun:
    fields = dict(backend=backend, device=device, losses=[list(x) for x in losses], train_seconds=2.0,
                  steps=len(losses), train_tokens=1000, max_memory_allocated_mib=None, max_memory_reserved_mib=None,
                  trainable_params=10, quantization={}, versions={})
    return BackendRun(**{**fields, **changes})


def test_a_missing_environment_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(unsloth_cli.ENV_VARIABLE, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"run `make -C .+ unsloth`"):
        unsloth_cli.UNSLOTH.path()


def test_a_result_file_is_read_whole_or_its_missing_fields_are_named(tmp_path):
    run = _run()
    full = {k: v for k, v in vars(run).items() if k != "adapter_dir"}
    (tmp_path / "r.json").write_text(json.dumps(full))
    read = BackendRun.read(tmp_path / "r.json", tmp_path / "adapter")
    assert read.tokens_per_second == 500 and read.adapter_dir == str(tmp_path / "adapter")
    assert list(read.loss_curve["loss"]) == [0.6, 0.5, 0.4]
    (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in full.items() if k not in ("losses", "steps")}))
    with pytest.raises(ValueError, match=r"\['losses', 'steps'\]"):
        BackendRun.read(tmp_path / "bad.json")


def test_loss_parity_compares_step_by_step():
    parity = backend_comparison.loss_parity(_run(), _run("unsloth", losses=((1, 0.6), (2, 0.45), (3, 0.41))))
    assert parity["steps"] == 3 and parity["same_steps"]
    assert parity["first_step_difference"] == 0 and parity["max_difference"] == pytest.approx(0.05)
    short = backend_comparison.loss_parity(_run(), _run("unsloth", losses=((1, 0.6), (2, 0.5))))
    assert short["steps"] == 2 and not short["same_steps"]


def test_the_table_labels_cpu_runs_and_shows_gpu_memory():
    table = backend_comparison.comparison({"course": _run(), "unsloth": _run("unsloth", "cuda", train_seconds=1.0,
                                                                               max_memory_allocated_mib=300.0,
                                                                               max_memory_reserved_mib=400.0)})
    assert table.loc["course", "speed"] == backend_comparison.CPU_LABEL == "no kernels, no speed claim"
    assert table.loc["unsloth", "speed"] == "measured" and table.loc["unsloth", "max_reserved_mib"] == 400.0
    assert table.loc["unsloth", "tokens_per_s"] == 2 * table.loc["course", "tokens_per_s"]
    assert table.loc["course", "final_loss"] == pytest.approx(0.4)


def test_the_spec_is_the_course_recipe_on_the_course_tokens(tmp_path):
    profile = profiles.get("ci")
    spec = backend_comparison.qlora_spec(profile, tmp_path)
    run_profile = backend_comparison.backend_profile(profile)
    assert profiles.from_json(spec["profile"]) == run_profile and run_profile.length_group == 0  # TRL's own sampler
    expected = sft_config_fields(run_profile, "tokenized", str(tmp_path / "trainer"),
                                 learning_rate=get_method("qlora").lr(run_profile))
    assert spec["gradient_checkpointing"] == expected.pop("activation_checkpointing")
    assert spec["sft"] == expected
    lora = peft_config("qlora", run_profile)
    assert spec["lora"] == {"r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
                            "target_modules": sorted(lora.target_modules)}
    rows, _ = sft_dataset(load_split("code", "train"), load_tokenizer(run_profile))
    written = [json.loads(line) for line in open(spec["data"])]
    assert len(written) == len(rows) and written[:5] == [{"input_ids": r["input_ids"], "labels": r["labels"]}
                                                         for r in rows.select(range(5))]
    json.dumps(spec)  # what the other process reads: plain JSON
