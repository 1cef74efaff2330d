"""Response quality: the end-of-turn ablation's data, the quality measures, tables and recommendations."""

import pandas as pd
import pytest

from labhelpers import quality
from labhelpers.data import IGNORE_INDEX, tokenize_chat
from labhelpers.tasks import load_split


def test_without_end_of_turn_drops_only_the_answers_end_of_turn_token(tokenizer):
    rows = list(load_split("sql", "train", 6))
    eos = tokenizer.eos_token_id
    for row, stripped in zip(rows, quality.without_end_of_turn(rows, tokenizer)):
        full = tokenize_chat(row["messages"], tokenizer, None)
        answers = sum(m["role"] == "assistant" for m in row["messages"])
        assert len(full["input_ids"]) - len(stripped["input_ids"]) == answers == 1
        assert not [t for t, label in zip(stripped["input_ids"], stripped["labels"]) if t == eos and label != IGNORE_INDEX]
        assert stripped["input_ids"].count(eos) == full["input_ids"].count(eos) - 1  # the user turn keeps its own
        kept = [t for t, label in zip(full["input_ids"], full["labels"]) if not (t == eos and label != IGNORE_INDEX)]
        assert stripped["input_ids"] == kept


def test_without_end_of_turn_names_a_missing_eos_token(tokenizer):
    import copy

    rows = list(load_split("sql", "train", 1))
    broken = copy.deepcopy(tokenizer)
    broken.eos_token = None
    with pytest.raises(ValueError, match="no eos token"):
        quality.without_end_of_turn(rows, broken)


def _table(scores: dict, split="validation", column="variant"):
    measured = {name: {"sql": s, "valid_sql": 1.0, "no_chatter": c, "answer_tokens": t, "stopped": c}
                for name, (s, c, t) in scores.items()}
    return quality.quality_table(measured, split, column)


def test_recommend_keeps_the_default_unless_the_evidence_is_clear():
    close = _table({"default": (0.91, 1.0, 16), "other": (0.94, 1.0, 16)})
    rec = quality.recommend(close, n=34, default="default")
    assert (rec.choice, rec.best) == ("default", "other") and "within the 95% intervals" in rec.reason
    clear = _table({"default": (0.50, 1.0, 16), "other": (0.95, 1.0, 16)})
    assert quality.recommend(clear, n=100, default="default").choice == "other"
    cleaner = _table({"default": (0.90, 0.40, 30), "other": (0.90, 1.0, 16)})  # as accurate, far less chatter
    rec = quality.recommend(cleaner, n=100, default="default")
    assert rec.choice == "other" and "ends more answers cleanly" in rec.reason
    top = _table({"default": (0.95, 1.0, 16), "other": (0.90, 1.0, 16)})
    assert quality.recommend(top, n=34, default="default").reason == "default scores highest on validation"


def test_recommend_refuses_test_scores_and_an_unknown_default():
    with pytest.raises(ValueError, match="validation"):
        quality.recommend(_table({"a": (0.5, 1, 1)}, split="test"), n=10, default="a")
    with pytest.raises(KeyError, match="not a row"):
        quality.recommend(_table({"a": (0.5, 1, 1)}), n=10, default="b")


def test_metrics_name_each_variant_and_measure():
    table = _table({"NEFTune α=5": (0.9, 1.0, 16)}, column="decoding")
    got = quality.metrics(table, "q", column="decoding")
    assert got == {"q_neftune_5_sql": 0.9, "q_neftune_5_valid_sql": 1.0, "q_neftune_5_no_chatter": 1.0,
                   "q_neftune_5_answer_tokens": 16.0, "q_neftune_5_stopped": 1.0}


def test_sql_quality_measures_the_answers_and_the_side_by_side_view(base, ci_profile):
    from transformers import GenerationConfig

    model, tokenizer = base
    profile = ci_profile.with_(n_eval=8, eval_batch_size=8)
    measures, examples = quality.sql_quality(model, tokenizer, profile, "validation")
    assert set(measures) == set(quality.MEASURES) and len(examples) == 8
    assert measures["answer_tokens"] == examples["new_tokens"].mean()
    assert measures["no_chatter"] == examples["no_chatter"].mean()
    hot = GenerationConfig(do_sample=True, temperature=1.5, top_k=0)
    first, again = (quality.sql_quality(model, tokenizer, profile, "validation", hot)[1] for _ in range(2))
    assert first["completion"].tolist() == again["completion"].tolist()  # sampling is seeded with the profile's seed
    view = quality.side_by_side({"greedy": examples, "hot": first}, n=2)
    assert isinstance(view, pd.DataFrame) and len(view) == 4
    assert list(view.columns) == ["answer", "correct", "tokens"]
