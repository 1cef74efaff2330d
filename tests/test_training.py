"""Acceptance: a ci-profile LoRA SFT run lifts the base model's pass@1 and SQL accuracy clearly.

The measured numbers are written to ``build/test-results/acceptance.json`` for the record.
"""

from __future__ import annotations

import json

import pytest

from labhelpers.evaluation import score
from labhelpers.models import load_model
from labhelpers.paths import build_dir
from labhelpers.peft_methods import peft_config
from labhelpers.tasks import load_split
from labhelpers.training import train_sft

RECORD: dict = {}


def _record(**values) -> None:
    RECORD.update(values)
    path = build_dir() / "test-results" / "acceptance.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(RECORD, indent=2, sort_keys=True) + "\n")


def _score(model, tokenizer, task, split, profile) -> float:
    return score(model, tokenizer, task, profile, split)


@pytest.fixture(scope="module")
def base_scores(base, ci_profile):
    model, tokenizer = base
    scores = {"code_test": _score(model, tokenizer, "code", "test", ci_profile),
              "code_heldout": _score(model, tokenizer, "code", "heldout", ci_profile),
              "sql_test": _score(model, tokenizer, "sql", "test", ci_profile),
              "arithmetic_test": _score(model, tokenizer, "arithmetic", "test", ci_profile)}
    _record(base=scores)
    return scores


def _lora_run(task: str, profile):
    model, tokenizer = load_model(profile)
    result = train_sft(model, tokenizer, load_split(task, "train"), profile, peft_config=peft_config("lora", profile))
    return result, tokenizer


@pytest.fixture(scope="module")
def code_run(ci_profile):
    return _lora_run("code", ci_profile)


@pytest.fixture(scope="module")
def sql_run(ci_profile):
    return _lora_run("sql", ci_profile)


@pytest.mark.slow
def test_lora_lifts_code_pass_at_1(code_run, base_scores, ci_profile):
    result, tokenizer = code_run
    test = _score(result.model, tokenizer, "code", "test", ci_profile)
    heldout = _score(result.model, tokenizer, "code", "heldout", ci_profile)
    _record(code_lora={"test_pass_at_1": test, "heldout_pass_at_1": heldout, **result.summary(),
                       "steps": result.steps})
    assert result.steps == ci_profile.max_steps
    assert result.trainable_params < 0.05 * result.total_params
    assert result.final_loss < result.loss_curve["loss"].iloc[:5].mean() / 4
    assert base_scores["code_test"] <= 0.2
    assert test >= 0.5 and test >= base_scores["code_test"] + 0.4
    assert heldout > base_scores["code_heldout"]


@pytest.mark.slow
def test_lora_lifts_sql_execution_accuracy(sql_run, base_scores, ci_profile):
    result, tokenizer = sql_run
    test = _score(result.model, tokenizer, "sql", "test", ci_profile)
    _record(sql_lora={"test_execution_accuracy": test, **result.summary(), "steps": result.steps})
    assert base_scores["sql_test"] <= 0.2
    assert test >= 0.5 and test >= base_scores["sql_test"] + 0.4


@pytest.mark.slow
def test_training_is_deterministic(ci_profile):
    profile = ci_profile.with_(max_steps=5)
    curves = []
    for _ in range(2):
        model, tokenizer = load_model(profile)
        result = train_sft(model, tokenizer, load_split("sql", "train", 200), profile,
                           peft_config=peft_config("lora", profile))
        curves.append(result.loss_curve["loss"].tolist())
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)


def test_train_sft_rejects_bad_data(ci_profile):
    from datasets import Dataset

    model, tokenizer = load_model(ci_profile)
    with pytest.raises(ValueError, match="row 0"):
        train_sft(model, tokenizer, Dataset.from_list([{"question": "no schema"}]), ci_profile)


@pytest.mark.slow
def test_packed_padding_free_training_runs(ci_profile):
    import math

    profile = ci_profile.with_(max_steps=3)
    model, tokenizer = load_model(profile)
    result = train_sft(model, tokenizer, load_split("code", "train", 64), profile,
                       peft_config=peft_config("lora", profile), packing=True, padding_free=True)
    assert result.steps == 3 and all(math.isfinite(x) for x in result.loss_curve["loss"])


@pytest.mark.parametrize("group, most_padding", [(4, 1.15), (50, 1.03)])
def test_length_grouped_batches_cover_every_row_with_less_padding(group, most_padding):
    import random

    from labhelpers.training import LengthGroupedBatches

    rng = random.Random(0)
    lengths = [rng.randint(40, 160) for _ in range(1000)]
    sampler = LengthGroupedBatches(lengths, batch_size=16, seed=3, group=group)
    first = list(sampler)
    assert sorted(first) == list(range(1000)) and len(sampler) == 1000  # every row once per epoch
    batches = [first[i:i + 16] for i in range(0, 1000, 16)]
    assert batches == sampler.batches()  # the loader's batches are the sampler's (the short one last)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches) / sum(lengths)
    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    random_padded = sum(max(lengths[i] for i in shuffled[k:k + 16]) * 16 for k in range(0, 992, 16))
    random_padded = (random_padded + max(lengths[i] for i in shuffled[992:]) * 8) / sum(lengths)
    assert padded < most_padding < 1.3 < random_padded
    assert list(LengthGroupedBatches(lengths, 16, seed=3, group=group)) == first  # a resumed run sees the same order
    sampler.set_epoch(1)
    assert list(sampler) != first
    # not longest-to-shortest: batch lengths are shuffled across the epoch
    widths = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert widths != sorted(widths, reverse=True)


def _padded_batch(tokenizer, n: int = 6):
    """A padded batch of code rows as TRL's collator makes it: -100 on the prompt and the padding."""
    import torch

    from labhelpers.data import tokenize_rows
    from labhelpers.tasks import task_rows

    rows = tokenize_rows(task_rows("code", "train", n), tokenizer, 160)
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((n, width), tokenizer.pad_token_id)
    labels = torch.full((n, width), -100)
    mask = torch.zeros((n, width), dtype=torch.long)
    for k, r in enumerate(rows):
        m = len(r["input_ids"])
        ids[k, :m], labels[k, :m], mask[k, :m] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    assert (labels == -100).sum() > (mask == 0).sum()  # some prompt tokens are untrained too
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("method", ["full", "lora", "dora", "ia3"])
@pytest.mark.parametrize("num_items", [None, 123])
def test_trained_positions_loss_equals_the_models_loss(ci_profile, method, num_items):
    import torch
    from peft import get_peft_model

    from labhelpers.training import supports_trained_positions_loss, trained_positions_loss

    model, tokenizer = load_model(ci_profile)
    config = peft_config(method, ci_profile)
    if config is not None:
        model = get_peft_model(model, config)
    model.train()
    assert supports_trained_positions_loss(model)
    batch = _padded_batch(tokenizer)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = model(**batch, use_cache=False, **extra).loss
    want = torch.autograd.grad(expected, trainable)
    got_loss = trained_positions_loss(model, batch, extra.get("num_items_in_batch"))
    got = torch.autograd.grad(got_loss, trainable)
    assert got_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_trained_positions_loss_is_refused_where_the_forward_adds_to_the_loss(ci_profile):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from labhelpers.training import supports_trained_positions_loss

    model, _ = load_model(ci_profile)
    assert not supports_trained_positions_loss(get_peft_model(model, peft_config("adalora", ci_profile)))
    model, _ = load_model(ci_profile)
    prompt = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    assert not supports_trained_positions_loss(get_peft_model(model, prompt))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert not supports_trained_positions_loss(gpt2)


@pytest.mark.slow
def test_training_on_trained_positions_only_gives_the_same_losses(ci_profile, monkeypatch):
    from labhelpers import training

    profile = ci_profile.with_(max_steps=6)
    curves = []
    for supported in (True, False):
        monkeypatch.setattr(training, "supports_trained_positions_loss", lambda model, s=supported: s)
        model, tokenizer = load_model(profile)
        result = train_sft(model, tokenizer, load_split("code", "train", 200), profile)
        curves.append(result.loss_curve["loss"].tolist())
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)


@pytest.mark.parametrize("length_group", [0, 4])
def test_the_profiles_length_group_chooses_the_sampler(ci_profile, length_group, tmp_path):
    from labhelpers.data import sft_dataset
    from labhelpers.training import LengthGroupedBatches, sft_config, trainer_class

    assert ci_profile.length_group == 4  # what every lab runs with
    model, tokenizer = load_model(ci_profile)
    dataset, fmt = sft_dataset(load_split("code", "train", 64), tokenizer)
    trainer = trainer_class(fused_lm_head=False, length_group=length_group)(
        model=model, args=sft_config(ci_profile, fmt, str(tmp_path)), train_dataset=dataset, processing_class=tokenizer)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedBatches) == (length_group > 0)
    if length_group:
        assert sampler.group == length_group and sorted(sampler) == list(range(64))


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_fp16_runs_train_fp32_master_weights(ci_profile, method):
    """The dtype policy, as an invariant of every trained model: under fp16 mixed precision the
    trained parameters are fp32 and the frozen ones keep the profile's fp16."""
    import torch

    from labhelpers.peft_methods import prepare

    profile = ci_profile.with_(dtype="float16", max_steps=2, batch_size=4)
    setup = prepare(method, profile)
    result = train_sft(dataset=load_split("code", "train", 16), profile=profile, **setup)
    trained = {n: p.dtype for n, p in result.model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in result.model.parameters() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}
    # frozen weights stay as loaded: fp16 under LoRA, 4-bit (uint8-packed) under QLoRA
    assert method == "full" or {"lora": torch.float16, "qlora": torch.uint8}[method] in frozen
    assert result.loss_curve["loss"].notna().all()


def test_train_tokens_count_each_micro_batch_without_padding(ci_profile):
    """Throughput is measured in the tokens the steps processed: 3 steps x 2 micro-batches x 4 rows of
    one conversation of L tokens are 24 L tokens (a token count, not a row count or padded length)."""
    from datasets import Dataset

    from labhelpers.data import sft_dataset

    profile = ci_profile.with_(max_steps=3, batch_size=4, gradient_accumulation_steps=2)
    model, tokenizer = load_model(profile)
    rows = Dataset.from_list([{"messages": load_split("sql", "train", 1)[0]["messages"]}] * 32)
    length = len(sft_dataset(rows, tokenizer)[0][0]["input_ids"])
    result = train_sft(model, tokenizer, rows, profile)
    assert result.train_tokens == 3 * 2 * 4 * length
    assert result.tokens_per_second == pytest.approx(result.train_tokens / result.train_seconds)
    assert result.summary()["tokens_per_sec"] > 0


def test_fine_tune_takes_the_recipe_from_an_sft_config_you_built(ci_profile, monkeypatch):
    """``fine_tune(..., args=SFTConfig(...))`` trains with that config's recipe (learning rate, batch,
    accumulation, length, loss mask, precision, checkpointing, optimizer); the steps are the run's."""
    from trl import SFTConfig

    from labhelpers import training
    from labhelpers.tasks import task_rows

    seen = {}
    monkeypatch.setattr(training, "train_sft", lambda *a, **kw: seen.update(kw))
    mine = SFTConfig(output_dir="unused", learning_rate=7e-4, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                     max_length=96, assistant_only_loss=True, activation_checkpointing=False, use_cpu=True, bf16=False,
                     optim="adamw_torch", weight_decay=0.01, max_steps=999)
    training.fine_tune(None, None, task_rows("code", "train")[:4], ci_profile, 5, args=mine)
    assert {k: seen[k] for k in training.RECIPE_FIELDS} == training.recipe_of(mine)
    assert seen["max_steps"] == 5 and seen["learning_rate"] == 7e-4
    training.fine_tune(None, None, task_rows("code", "train")[:4], ci_profile, 5, learning_rate=1e-5, args=mine)
    assert seen["learning_rate"] == 1e-5  # an explicit learning rate still wins


def test_neftune_and_the_loss_mask_are_one_field_of_the_recipe(ci_profile, tokenizer):
    """``fine_tune(..., args=...)`` switches NEFTune (``neftune_noise_alpha``) and the loss on all tokens
    (``assistant_only_loss=False``) on: each changes the losses of the same seed and data, and NEFTune's
    noise is gone once training ends (the trained model is evaluated without it)."""
    from labhelpers.tasks import task_rows
    from labhelpers.training import fine_tune, sft_config

    profile = ci_profile.with_(batch_size=4)
    rows = task_rows("sql", "train")[:16]

    def run(**change):
        model, _ = load_model(profile)
        result = fine_tune(model, tokenizer, rows, profile, 3, args=sft_config(profile, "chat", "unused", **change))
        return result.loss_curve["loss"].tolist(), result.model

    plain, _ = run()
    assert run()[0] == plain  # the same seed and data: the same losses
    noisy, model = run(neftune_noise_alpha=15.0)
    assert noisy != plain and not model.get_input_embeddings()._forward_hooks
    everything, _ = run(assistant_only_loss=False)
    assert everything != plain
