"""Axolotl from its own environment (labhelpers.axolotl_cli) and Lab 1b's checks (labhelpers.labs.lab1b).

The notebook run (tests/test_notebooks.py) trains, preprocesses and merges with Axolotl; here the
pieces are held to the library: the config check against Axolotl's own schema, the mask comparison,
the NF4 round trip against bitsandbytes' own 4-bit layer, and the log and error handling."""

from __future__ import annotations

import pytest
import torch
import yaml

from labhelpers import axolotl_cli
from labhelpers.data import tokenize_chats
from labhelpers.labs import lab1b
from labhelpers.models import load_model, load_tokenizer
from labhelpers.profiles import PROFILES
from labhelpers.tasks import load_split
from shipped_solutions import solution

axolotl_config = solution("lab1b_axolotl", "axolotl_config", "axolotl_config")
PROFILE = lab1b.comparison_profile(PROFILES["ci"])

LOG = """Tokenizing ... {'loss': '0.6383', 'grad_norm': '0.82', 'epoch': '0.125'}
 10%|#  | 1/10 [00:01<00:13]\r{'loss': '0.5788', 'grad_norm': '0.65', 'learning_rate': '0.003', 'epoch': '0.25'}
{'train_runtime': '13.1', 'train_loss': '0.61'}"""


def test_loss_log_reads_each_logged_step():
    curve = axolotl_cli.loss_log(LOG)
    assert list(curve["step"]) == [1, 2] and list(curve["loss"]) == [pytest.approx(0.6383), pytest.approx(0.5788)]
    with pytest.raises(ValueError, match="logging_steps"):
        axolotl_cli.loss_log("no training here")


def test_a_missing_environment_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(axolotl_cli.ENV_VARIABLE, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"run `make -C .+ axolotl`"):
        axolotl_cli.environment()


def test_config_is_written_as_plain_yaml(tmp_path):
    path = axolotl_cli.write_config({"lora_target_modules": ("q_proj", "v_proj"), "datasets": [{"path": "x"}]},
                                    tmp_path / "c.yaml")
    assert yaml.safe_load(path.read_text()) == {"lora_target_modules": ["q_proj", "v_proj"], "datasets": [{"path": "x"}]}


def test_comparison_budget_is_the_same_examples_in_every_profile():
    assert PROFILE.max_steps == 60  # 480 examples at ci's batch of 8
    assert lab1b.comparison_profile(PROFILES["t4"]).max_steps == 30  # batch 8 x accumulation 2
    assert lab1b.comparison_profile(PROFILES["t4-rehearsal"]).max_steps == PROFILES["t4-rehearsal"].max_steps


def test_the_course_solution_passes_and_each_broken_config_is_rejected(tmp_path):
    data = tmp_path / "train.jsonl"
    cfg = axolotl_config(PROFILE, data)
    for config in (cfg, lab1b.recipe_config(PROFILE, data)):  # the exercise's solution and make gpu-smoke's config
        check = lab1b.check_axolotl_config(config, PROFILE, data)
        assert check.passed, check.failures
    errors = lab1b.schema_errors(cfg, PROFILE)
    assert list(errors["valid"]) == [True, False, False, False]
    messages = dict(zip(errors["config"], errors["axolotl says"]))
    assert "load_in_4bit" in messages["qlora without load_in_4bit"]
    assert "chat_template" in messages["retired dataset type sharegpt"]  # it names the replacement
    assert "deepspeed and fsdp" in messages["deepspeed and fsdp together"]


def test_a_config_off_the_recipe_fails_naming_each_key(tmp_path):
    data = tmp_path / "train.jsonl"
    cfg = {**axolotl_config(PROFILE, data), "lora_r": PROFILE.lora_r * 2, "lr_scheduler": "linear"}
    cfg["datasets"] = [{**cfg["datasets"][0], "roles_to_train": ["user", "assistant"]}]
    check = lab1b.check_axolotl_config(cfg, PROFILE, data)
    assert not check.passed
    assert {f.split(":")[0] for f in check.failures} == {"lora_r", "lr_scheduler", "datasets.roles_to_train"}
    schema = lab1b.check_axolotl_config({**cfg, "lora_r": "four"}, PROFILE, data)
    assert any(f.startswith("Axolotl's schema: lora_r") for f in schema.failures)  # Axolotl's own message
    assert not lab1b.check_axolotl_config("base_model: x", PROFILE, data).passed


def test_mask_agreement_finds_a_row_that_differs():
    tokenizer = load_tokenizer(PROFILE)
    rows = tokenize_chats([r["messages"] for r in list(load_split("code", "train"))[:5]], tokenizer, None)
    rows[2] = {**rows[2], "labels": rows[2]["input_ids"]}  # the loss on every token, the question too
    agreement = lab1b.mask_agreement(rows, tokenizer)
    assert (agreement["rows"], agreement["same_tokens"], agreement["same_labels"]) == (5, 5, 4)
    assert agreement["first_difference"]["axolotl"] == rows[2]["labels"]


def test_nf4_roundtrip_equals_the_weights_bitsandbytes_computes_with():
    import bitsandbytes.functional as bnb_f

    full, _ = load_model(PROFILE)
    quantized, _ = load_model(PROFILE, quantization="nf4")
    ours = full.model.layers[0].mlp.down_proj.weight
    layer = quantized.model.layers[0].mlp.down_proj
    theirs = bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(lab1b.nf4_roundtrip(ours), theirs.to(ours.dtype))


def test_a_failing_command_raises_with_the_end_of_its_log(tmp_path):
    with pytest.raises(RuntimeError, match="failed") as failure:
        axolotl_cli.run(["train", str(tmp_path / "missing.yaml")], tmp_path / "train.log")
    assert (tmp_path / "train.log").exists() and "missing.yaml" in str(failure.value)
