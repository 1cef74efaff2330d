import pytest
import torch

from labhelpers.evaluation import evaluate_task, generate, perplexity, prompt_text, token_blocks
from labhelpers.tasks import load_split


def test_generation_is_greedy_and_batch_independent(base):
    model, tokenizer = base
    prompts = ["3 + 4 =", "9 * 9 =", "def sum_even(xs):\n"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert batched == generate(model, tokenizer, prompts, max_new_tokens=6)


def test_chat_prompts_end_with_the_generation_prompt(tokenizer):
    row = load_split("code", "test", 1)[0]
    text = prompt_text(row, tokenizer, "chat")
    assert text.endswith("<|assistant|>\n") and row["messages"][-1]["content"] not in text


def test_evaluate_task_returns_a_scored_frame(base):
    model, tokenizer = base
    df = evaluate_task(model, tokenizer, "arithmetic", "test", n=16)
    assert list(df.columns) == ["id", "prompt", "reference", "completion", "correct", "composition", "new_tokens",
                                "stopped"]
    assert len(df) == 16 and df["correct"].dtype == bool


def test_generations_count_their_tokens_and_say_whether_the_model_stopped(base):
    """``new_tokens`` counts up to and including the end-of-turn token; an answer cut by ``max_new_tokens`` did
    not stop. A ``GenerationConfig`` changes the decoding and is left as it was."""
    from transformers import GenerationConfig

    from labhelpers.evaluation import generate_detailed

    model, tokenizer = base
    prompts = [prompt_text(row, tokenizer, "chat") for row in load_split("sql", "validation", 4)]
    long = generate_detailed(model, tokenizer, prompts, max_new_tokens=64)
    short = generate_detailed(model, tokenizer, prompts, max_new_tokens=3)
    for g, cut in zip(long, short):
        ids = tokenizer(g.text, add_special_tokens=False)["input_ids"]
        assert g.new_tokens == len(ids) + g.stopped and g.new_tokens <= 64
        assert cut.new_tokens <= 3 and (cut.stopped or cut.new_tokens == 3)
    assert [g.text for g in long] == generate(model, tokenizer, prompts, max_new_tokens=64)
    config = GenerationConfig(do_sample=False, repetition_penalty=1.5)
    penalized = generate_detailed(model, tokenizer, prompts, max_new_tokens=64, generation_config=config)
    assert config.max_new_tokens is None or config.max_new_tokens != 64  # the caller's config is not changed
    assert [g.text for g in penalized] != [g.text for g in long]


def test_a_profile_caps_the_answers_length_and_never_raises_the_tasks(base, ci_profile):
    """``Profile.max_new_tokens`` (the rehearsal's: random weights never end a turn) cuts every answer
    at the cap; a cap above the task's budget leaves the task's; None is the task's."""
    from labhelpers.evaluation import evaluate
    from labhelpers.tasks import get_task

    model, tokenizer = base
    untrained = ci_profile.with_(n_eval=4, eval_batch_size=4)
    full = evaluate(model, tokenizer, "sql", untrained, "validation")
    capped = evaluate(model, tokenizer, "sql", untrained.with_(max_new_tokens=3), "validation")
    above = evaluate(model, tokenizer, "sql", untrained.with_(max_new_tokens=10_000), "validation")
    assert full["new_tokens"].max() <= get_task("sql").max_new_tokens
    assert (capped["new_tokens"] <= 3).all() and (capped["stopped"] | (capped["new_tokens"] == 3)).all()
    assert above["completion"].tolist() == full["completion"].tolist()
    assert [c[:len(s)] for c, s in zip(full["completion"], capped["completion"])] == capped["completion"].tolist()


def test_perplexity_and_blocks(base):
    model, tokenizer = base
    assert perplexity(model, tokenizer, ["1 + 1 = 2\n2 + 2 = 4"] * 40, seq_len=32) < 50
    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks(["hi"], tokenizer, 512)
    assert token_blocks(["1 + 1 = 2"] * 10, tokenizer, 8).dtype == torch.long


def test_retention_is_the_kept_fraction_and_one_when_there_was_nothing_to_keep():
    from labhelpers.evaluation import retention

    assert retention(0.45, 0.9) == pytest.approx(0.5) and retention(1.0, 0.5) == pytest.approx(2.0)
    # a reference that scores 0 has nothing to lose (the smoke profile's 4-step experts)
    assert retention(0.0, 0.0) == 1.0 and retention(0.3, 0.0) == 1.0
    for bad in ((float("nan"), 1.0), (0.5, float("inf")), (-0.1, 1.0)):
        with pytest.raises(ValueError, match="finite, non-negative"):
            retention(*bad)


def test_preservation_is_finite_when_an_expert_scores_zero():
    import pandas as pd

    from labhelpers.merging import preservation

    table = pd.DataFrame({"code": [0.0, 0.5], "sql": [0.2, 0.4]})
    out = preservation(table, {"code": {"code": 0.0, "sql": 0.1}, "sql": {"code": 0.3, "sql": 0.8}})
    assert out["code_kept"].tolist() == [1.0, 1.0] and out["sql_kept"].tolist() == pytest.approx([0.25, 0.5])


def test_select_best_takes_the_highest_validation_score_per_group():
    import pandas as pd

    from labhelpers.evaluation import select_best

    sweep = pd.DataFrame({"method": ["ties", "ties", "dare", "dare"], "average": [0.5, 0.7, 0.6, 0.6],
                          "final_loss": [1.0, 2.0, 0.9, 0.3], "split": "validation"})
    assert select_best(sweep, "average").index.tolist() == [1]
    per_method = select_best(sweep, "average", group="method", tie_breakers=[("final_loss", True)])
    assert per_method.index.tolist() == [1, 3]  # dare: tie on the score, the lower loss wins
    for bad in (sweep.assign(split="test"), sweep.drop(columns=["split"]),
                sweep.assign(split=["validation", "validation", "validation", "test"])):
        with pytest.raises(ValueError, match="selection must use scores on the 'validation' split"):
            select_best(bad, "average")


def test_a_merge_sweep_chooses_without_reading_a_test_row(tmp_path, monkeypatch):
    """The sweep that Lab 3 chooses from, then the choice: not one test row is read (the loader of
    every split is watched), and the chosen merge is then scored on the test split alone."""
    from labhelpers import evaluation, profiles
    from labhelpers.evaluation import select_best
    from labhelpers.labs import lab3

    profile = profiles.get("smoke")
    expert = lab3.local_checkpoint(profile.base_model)
    read: list[tuple[str, str]] = []
    real_load_split = evaluation.load_split

    def watched(task, split, n=None):
        read.append((task, split))
        return real_load_split(task, split, n)

    monkeypatch.setattr(evaluation, "load_split", watched)
    configs = [{"method": "linear", "knob": "w_code", "value": w, "weights": [w, 1 - w]} for w in (0.3, 0.7)]
    sweep = lab3.sweep_merges(configs, [expert, expert], expert, tmp_path, profile, tasks=("sql", "arithmetic"))
    best = select_best(sweep, "average").iloc[0]
    assert read and {split for _, split in read} == {"validation"}, read
    read.clear()
    final = lab3.score_folders({best["label"]: best["folder"]}, profile, tasks=("sql", "arithmetic"))
    assert {split for _, split in read} == {"test"} and final["split"].tolist() == ["test"]


@pytest.mark.parametrize("k, n, low, high", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
                                             (1, 29, 0.0061, 0.1718), (29, 29, 0.8830, 1.0)])
def test_binomial_interval_matches_newcombes_published_wilson_intervals(k, n, low, high):
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score interval)
    from labhelpers.evaluation import binomial_interval

    assert binomial_interval(k, n) == pytest.approx((low, high), abs=6e-5)


def test_intervals_on_a_table_and_distinguishable_scores():
    import pandas as pd

    from labhelpers.evaluation import binomial_interval, distinguishable, with_intervals

    table = with_intervals(pd.DataFrame({"method": ["a", "b"], "score": [0.9, 0.5]}), {"score": 100})
    assert list(table.columns) == ["method", "score", "score 95% low", "score 95% high"]
    assert table.loc[0, "score 95% low"] == pytest.approx(binomial_interval(90, 100)[0])
    unscored = with_intervals(pd.DataFrame({"score": [0.5, float("nan")]}), {"score": 10})  # a row without a score
    assert unscored.loc[1, ["score 95% low", "score 95% high"]].isna().all() and unscored.loc[0, "score 95% low"] > 0
    assert distinguishable(0.9, 0.5, 100, 100) and not distinguishable(0.9, 0.85, 100, 100)
    assert not distinguishable(0.9, 0.5, 5, 5)  # five examples cannot tell 0.9 from 0.5
    for bad in ((3, 0), (5, 4), (-1, 4)):
        with pytest.raises(ValueError, match="successes"):
            binomial_interval(*bad)


def test_merge_methods_over_seeds_train_each_seed_choose_on_validation_and_average(tmp_path):
    """Lab 3's comparison over seeds: a seed already run is reused as it is (its table equals the one
    seed's choice scored on test), every other seed trains its own start and experts, and each method
    gets the mean over the seeds with its spread and the merge chosen in each seed."""
    from labhelpers import profiles
    from labhelpers.labs import lab3

    profile = profiles.get("smoke")
    tasks = ("sql", "arithmetic")
    configs = [{"method": "linear", "knob": "w_code", "value": w, "weights": [w, 1 - w]} for w in (0.3, 0.7)]
    configs += [{"method": "task_arithmetic", "knob": "lam", "lam": lam} for lam in (0.5, 1.0)]
    base = lab3.local_checkpoint(profile.base_model)
    code, _ = lab3.train_expert(["code"], profile, tmp_path / "code", 2, start=base)
    sql, _ = lab3.train_expert(["sql"], profile, tmp_path / "sql", 2, start=base)
    sweep = lab3.sweep_merges(configs, [code, sql], base, tmp_path / "merges", profile, tasks=tasks)
    one = lab3.chosen_merges_on_test(sweep, profile, tasks)
    assert sorted(one["method"]) == ["linear", "task_arithmetic"] and set(one["split"]) == {"test"}

    first = (base, {"code": code, "sql": sql}, sweep)
    reused = lab3.merge_methods_over_seeds(configs, profile, tmp_path / "seeds", 2, first=first, tasks=tasks)
    assert not (tmp_path / "seeds").exists()  # nothing trained
    for label, row in one.iterrows():
        assert reused.loc[row["method"], "chosen"] == label and reused.loc[row["method"], "seeds"] == 1
        assert reused.loc[row["method"], "average"] == pytest.approx(row["average"])
        assert reused.loc[row["method"], "average seed sd"] == 0.0

    two = lab3.merge_methods_over_seeds(configs, profile.with_(seeds=2), tmp_path / "seeds", 2, first=first, tasks=tasks)
    assert (tmp_path / "seeds" / f"seed{profile.seed + 1}" / "sql_expert").is_dir()
    assert not (tmp_path / "seeds" / f"seed{profile.seed}").exists()
    assert (two["seeds"] == 2).all() and all(len(chosen.split(", ")) == 2 for chosen in two["chosen"])
    for column in ("validation average", "sql", "average", "sql_kept"):
        assert (two[f"{column} seed sd"] >= 0).all()
    assert "code_kept" not in two.columns  # code was not scored


def test_lab3_scores_the_profiles_general_skill_and_an_instruct_base_is_its_own_start(tmp_path):
    """Lab 3 scores every model on the experts' tasks and the profile's general skill; the tiny bases are
    instruction-tuned into a start, while an instruct base (the real model) already is one: nothing trains."""
    from labhelpers import profiles
    from labhelpers.labs import lab3
    from labhelpers.models import local_checkpoint

    tiny, real = profiles.get("ci"), profiles.get("cpu-real")
    assert lab3.lab_tasks(tiny) == ("code", "sql", "arithmetic")
    assert lab3.lab_tasks(real) == ("code", "sql", "instructions")
    start, run = lab3.train_instruct_start(real, tmp_path / "instruct", steps=5)
    assert start == local_checkpoint(real.base_model) and run is None and not (tmp_path / "instruct").exists()
