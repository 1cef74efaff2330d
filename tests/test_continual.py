"""labhelpers.continual and the data formats Lab 2 mixes: replay, penalties, interpolation, CL metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import reference_solutions as ref
from labhelpers import continual, profiles
from labhelpers.data import IGNORE_INDEX, check_assistant_labels, tokenize_rows, validate_rows
from labhelpers.labs import lab2
from labhelpers.models import load_model, load_tokenizer
from labhelpers.tasks import sql, task_rows
from labhelpers.training import fine_tune

CI = profiles.get("ci")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(CI)


CONVERSATIONS = [
    [{"role": "user", "content": "2 + 3 ="}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "Answer with SQL."}, {"role": "user", "content": "How many employees?"},
     {"role": "assistant", "content": "SELECT COUNT(*) FROM employees;"},
     {"role": "user", "content": "And in Oslo?"},
     {"role": "assistant", "content": "SELECT COUNT(*) FROM employees WHERE city = 'Oslo';"}],
    [{"role": "user", "content": "Write a function"}, {"role": "assistant", "content": "def f(x):\n    return x\n"}],
]


def test_assistant_label_check_accepts_the_reference_and_rejects_full_labels(tokenizer):
    check = check_assistant_labels(ref.assistant_only_labels, tokenizer, CONVERSATIONS)
    assert check.passed, check.rows
    assert (check.rows["trained_tokens"] > 0).all()
    bad = check_assistant_labels(ref.labels_on_everything, tokenizer, CONVERSATIONS)
    assert not bad.passed and (bad.rows["mismatches"] > 0).all()


def test_tokenize_rows_mixes_formats_with_the_right_loss_mask(tokenizer):
    rows = [{"messages": CONVERSATIONS[0]}, {"prompt": "2 + 3 =", "completion": " 5"},
            {"text": "Ana buys 3 apples at the market."}]
    chat, completion, text = tokenize_rows(rows, tokenizer, max_length=64)
    assert validate_rows([chat, completion, text]) == "tokenized"
    decoded = tokenizer.decode([t for t in chat["labels"] if t != IGNORE_INDEX])
    assert decoded == "5<|end|>"
    assert tokenizer.decode([t for t in completion["labels"] if t != IGNORE_INDEX]) == " 5<|end|>"
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == tokenizer.eos_token_id


def test_tokenize_rows_cuts_long_text_but_refuses_long_chats(tokenizer):
    pieces = tokenize_rows([{"text": "Ana buys 3 apples at the market. " * 40}], tokenizer, max_length=32)
    assert len(pieces) > 1 and all(len(p["input_ids"]) <= 32 for p in pieces)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_rows([{"messages": CONVERSATIONS[1]}], tokenizer, max_length=8)


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role"),
    ({"question": "hi"}, "needs 'messages'"),
    ({"input_ids": [1, 2], "labels": [1]}, "equal length"),
])
def test_bad_rows_are_named(tokenizer, row, message):
    with pytest.raises(ValueError, match=message):
        tokenize_rows([{"messages": CONVERSATIONS[0]}, row], tokenizer, 64)


def test_replay_mix_has_the_requested_fraction(tokenizer):
    domain = [{"messages": CONVERSATIONS[0]}] * 30
    general = [{"text": f"Ana buys {i} apples."} for i in range(5)]
    mixed = continual.replay_mix(domain, general, 0.25, tokenizer, 64, seed=1)
    n_text = sum(1 for r in mixed if r["labels"][0] != IGNORE_INDEX)  # text rows train on every token
    assert len(mixed) == 40 and n_text == 10
    assert len(continual.replay_mix(domain, general, 0.0, tokenizer, 64)) == 30
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        continual.replay_mix(domain, general, 1.0, tokenizer, 64)


def test_domain_texts_hold_no_questions():
    docs = continual.domain_texts()
    assert any("CREATE TABLE employees" in d for d in docs) and any("-- query log" in d for d in docs)
    questions = {r["messages"][0]["content"] for r in task_rows("sql", "train")}
    assert not any(q in d for q in questions for d in docs)
    tests = {r["messages"][1]["content"] for r in task_rows("sql", "test")}
    assert not any(t in d for t in tests for d in docs)  # no test query leaks into the domain text


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(7, generator=g)}


def test_l2_penalty_matches_its_formula_and_gradient():
    params = {k: v.requires_grad_() for k, v in _random_state(0).items()}
    anchor, fisher = _random_state(1), {k: v.abs() for k, v in _random_state(2).items()}
    for f in (None, fisher):
        ours = continual.l2_penalty(params, anchor, 0.3, f)
        theirs = ref.l2_to_base(params, anchor, 0.3, f)
        assert torch.allclose(ours, theirs)
        g1 = torch.autograd.grad(ours, list(params.values()))
        g2 = torch.autograd.grad(theirs, list(params.values()))
        assert all(torch.allclose(a, b) for a, b in zip(g1, g2))
    assert not torch.allclose(continual.l2_penalty(params, anchor, 0.3), ref.l2_without_half(params, anchor, 0.3))
    with pytest.raises(KeyError, match="snapshot"):
        continual.l2_penalty({"a": params["a"]}, anchor, 1.0)


def test_penalty_is_zero_at_the_anchor_and_pulls_back_in_training():
    model, tokenizer = load_model(CI)
    anchor = continual.snapshot(model)
    penalty = continual.penalty_fn(anchor, strength=1.0)
    assert penalty(model).item() == 0.0
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.1)
    assert penalty(model).item() > 0
    fisher = continual.fisher_diagonal(model, tokenizer, continual.corpus_texts("heldout", 40), max_batches=2)
    assert set(fisher) == set(anchor)
    assert math.isclose(torch.cat([f.flatten() for f in fisher.values()]).mean().item(), 1.0, rel_tol=1e-4)


def test_interpolation_endpoints_and_errors():
    base, tuned = _random_state(0), _random_state(1)
    assert all(torch.equal(continual.interpolate_weights(base, tuned, 0.0)[k], base[k]) for k in base)
    assert all(torch.allclose(continual.interpolate_weights(base, tuned, 1.0)[k], tuned[k]) for k in base)
    mid = continual.interpolate_weights(base, tuned, 0.3)
    assert all(torch.allclose(mid[k], ref.interpolate(base, tuned, 0.3)[k]) for k in base)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        continual.interpolate_weights(base, tuned, 1.5)
    with pytest.raises(ValueError, match="'a'"):
        continual.interpolate_weights(base, {**tuned, "a": torch.zeros(2, 2)}, 0.5)
    with pytest.raises(ValueError, match="different tensors"):
        continual.interpolate_weights(base, {"a": tuned["a"]}, 0.5)


def test_wise_ft_leaves_its_inputs_alone():
    base, _ = load_model(CI)
    tuned, _ = load_model(CI)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    half = continual.wise_ft(base, tuned, 0.5)
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(half.state_dict()[key], base.state_dict()[key] + 0.5)
    assert torch.equal(tuned.state_dict()[key], before[key])


def test_continual_metrics_on_a_known_matrix():
    r = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.1], [0.3, 0.6, 0.7]]
    m = continual.continual_metrics(r)
    assert m["average_accuracy"] == pytest.approx((0.3 + 0.6 + 0.7) / 3)
    assert m["backward_transfer"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)
    frame = pd.DataFrame([[0.0, 0.0, 0.0], *r], index=["base", "after a", "after b", "after c"])
    assert continual.continual_metrics(frame) == m
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.random((4, 4))
        assert continual.continual_metrics(x) == pytest.approx(ref.cl_metrics(x))
    with pytest.raises(ValueError, match="square"):
        continual.continual_metrics(np.zeros((2, 3)))


def test_mitigation_table_and_best():
    runs = {"base": {"sql": 0.0, "arithmetic": 1.0}, "full FT": {"sql": 0.8, "arithmetic": 0.6},
            "replay": {"sql": 0.7, "arithmetic": 0.9}, "lora": {"sql": 0.2, "arithmetic": 1.0}}
    table = continual.mitigation_table(runs, "arithmetic", split="validation").set_index("run")
    assert table.loc["replay", "domain_gain_kept"] == pytest.approx(0.875)
    assert table.loc["replay", "general_recovered"] == pytest.approx(0.75)
    assert continual.best_mitigation(table.reset_index())["run"] == "replay"
    assert continual.best_mitigation(table.reset_index(), min_domain_kept=0.95) is None
    with pytest.raises(ValueError, match="'validation' split"):  # the test table is for reporting only
        continual.best_mitigation(continual.mitigation_table(runs, "arithmetic"))
    with pytest.raises(KeyError, match="no 'instructions' scores.*profile.general_task"):
        continual.mitigation_table(runs, "instructions")


def test_the_general_data_is_where_the_general_skill_came_from(tokenizer):
    """The tiny bases learnt arithmetic in pretraining: it is replayed as the corpus's train text. An
    instruct model's instruction following is replayed as the instructions task's train chats, and none
    of them is a validation or test prompt."""
    tiny = continual.general_rows(CI, tokenizer)
    assert tiny and all(set(row) == {"text"} for row in tiny)
    assert [row["text"] for row in tiny] == continual.corpus_texts("train")
    real = continual.general_rows(CI.with_(general_task="instructions", max_seq_length=10_000), tokenizer)
    assert real == task_rows("instructions", "train") and all("messages" in row for row in real)
    short = continual.general_rows(CI.with_(general_task="instructions", max_seq_length=150), tokenizer)
    assert 0 < len(short) < len(real) and all(len(r["input_ids"]) <= 150 for r in tokenize_rows(short, tokenizer, 150))
    held_out = {row["messages"][0]["content"] for split in ("validation", "test")
                for row in task_rows("instructions", split)}
    assert not held_out & {row["messages"][0]["content"] for row in real}
    texts = continual.row_texts(tiny[:2] + real[:2], tokenizer)
    assert texts[:2] == [row["text"] for row in tiny[:2]]
    assert texts[2] == tokenizer.apply_chat_template(real[0]["messages"], tokenize=False)
    assert real[0]["messages"][-1]["content"] in texts[2]


def test_sql_format_report():
    report = sql.format_report(["SELECT COUNT(*) FROM employees;", "SELECT COUNT(*) FROM employees; -- done",
                                "SELECT nothing FROM nowhere;", "sure! here it is"])
    assert report["valid_sql"].tolist() == [True, True, False, False]
    assert report["no_chatter"].tolist() == [True, False, True, False]


def test_a_trained_model_can_be_copied():
    # TRL patches the trained model's forward with a closure over the original; a deepcopy (wise_ft)
    # would then run the original's weights. train_sft removes the patch.
    model, tokenizer = load_model(CI)
    run = fine_tune(model, tokenizer, task_rows("sql", "train", 32), CI.with_(batch_size=4), 2)
    copy_ = continual.wise_ft(run.model, run.model, 1.0)
    with torch.no_grad():
        for p in copy_.parameters():
            p.zero_()
    ids = torch.tensor([[5, 6, 7]])
    assert not torch.equal(copy_(input_ids=ids).logits, run.model(input_ids=ids).logits)


def _distance(model, anchor) -> float:
    return sum((p.detach() - anchor[n]).pow(2).sum().item() for n, p in model.named_parameters() if n in anchor)


def test_the_penalty_reaches_training_and_holds_weights_near_the_base():
    profile = CI.with_(batch_size=4)
    rows = task_rows("sql", "train", 64)
    distances = {}
    for strength in (0.0, 100.0):
        model, tokenizer = load_model(profile)
        anchor = continual.snapshot(model)
        run = fine_tune(model, tokenizer, rows, profile, 8,
                                  loss_penalty=continual.penalty_fn(anchor, strength) if strength else None)
        distances[strength] = _distance(run.model, anchor)
    assert distances[100.0] < distances[0.0] / 2


def test_plain_text_rows_train_directly():
    from datasets import Dataset

    from labhelpers.training import train_sft

    model, tokenizer = load_model(CI)
    texts = Dataset.from_list([{"text": t} for t in continual.domain_texts()[:16]])
    run = train_sft(model, tokenizer, texts, CI.with_(batch_size=4), max_steps=2)
    assert run.steps == 2 and math.isfinite(run.final_loss)


def test_fisher_batches_never_cost_more_than_training(ci_profile):
    assert continual.fisher_batches(ci_profile) == 16  # ci and cpu: the 16 batches the lab always used
    assert continual.fisher_batches(ci_profile.with_(max_steps=6)) == 1
    assert continual.fisher_batches(ci_profile.with_(max_steps=40)) == 10


def test_runs_over_seeds_trains_each_seed_and_averages_every_run(monkeypatch):
    """The comparison is repeated once per seed (profile.seed, +1, ...), every model it yields is
    scored on test and on validation, and each run's scores are averaged with their spread."""
    profile = profiles.get("ci").with_(seed=7, seeds=3)
    scores = {("full FT", 7): 0.9, ("full FT", 8): 0.7, ("full FT", 9): 0.8, ("LoRA", 7): 0.5, ("LoRA", 8): 0.5,
              ("LoRA", 9): 0.8}
    seen = []

    def train(p):
        seen.append(p.seed)
        yield "full FT", ("full FT", p.seed), pd.DataFrame({"step": [1], "loss": [float(p.seed)]})
        yield "LoRA", ("LoRA", p.seed), None

    monkeypatch.setattr(lab2, "all_scores", lambda model, tok, p: {"sql": scores[model], "arithmetic": 1 - scores[model],
                                                                    "heldout_ppl": 2.0})
    monkeypatch.setattr(lab2, "validation_scores", lambda model, tok, p: {"sql": scores[model] / 2, "arithmetic": 0.5})
    assert profile.general_task == "arithmetic"  # whose seed spread is reported beside the domain's
    test, validation, curves = lab2.runs_over_seeds(train, profile, tokenizer=None)
    assert seen == [7, 8, 9]
    assert test["full FT"]["sql"] == pytest.approx(0.8) and test["full FT"]["sql seed sd"] == pytest.approx(0.1)
    assert test["LoRA"]["arithmetic"] == pytest.approx(0.4) and test["LoRA"]["seeds"] == 3
    assert test["LoRA"]["arithmetic seed sd"] == pytest.approx(0.1732, abs=1e-4)
    assert test["LoRA"]["heldout_ppl"] == 2.0 and "heldout_ppl seed sd" not in test["LoRA"]
    assert validation["full FT"]["sql"] == pytest.approx(0.4)
    assert list(curves) == ["full FT"] and curves["full FT"]["loss"].iloc[0] == 7.0  # the first seed's curve

    def uneven(p):
        yield "full FT", ("full FT", p.seed), None
        if p.seed == 7:
            yield "LoRA", ("LoRA", p.seed), None
    with pytest.raises(ValueError, match="same runs"):
        lab2.runs_over_seeds(uneven, profile, tokenizer=None)


def test_train_variants_trains_each_recipe_once_and_reuses_a_run_already_made(ci_profile, monkeypatch):
    from labhelpers.labs import lab2

    calls = []

    def fake_fine_tune(model, tokenizer, rows, profile, steps, args=None):
        calls.append((len(rows), steps, args))
        return type("Run", (), {"model": f"model {len(calls)}"})()

    monkeypatch.setattr(lab2, "fine_tune", fake_fine_tune)
    monkeypatch.setattr(lab2, "load_model", lambda profile: ("base", "tokenizer"))
    variants = {"default": ([{}] * 3, "recipe a"), "noise": ([{}] * 3, "recipe b"), "short data": ([{}] * 2, "recipe a")}
    models = lab2.train_variants(variants, ci_profile, "tokenizer", 7, reuse={"default": "the naive run"})
    assert models == {"default": "the naive run", "noise": "model 1", "short data": "model 2"}
    assert calls == [(3, 7, "recipe b"), (2, 7, "recipe a")]
