"""Response quality of a SQL model: what the answers look like, and what training and decoding change.

:func:`sql_quality` scores one model (optionally under a decoding other than greedy) on five measures:
execution accuracy, valid SQL, no chatter, the answer's length in tokens, and the fraction of answers
the model ended by itself. :func:`without_end_of_turn` builds the training data of the
end-of-turn ablation, :func:`quality_table` and :func:`recommend` turn measured variants into a
table and a choice made on the validation split, and :func:`side_by_side` shows a few answers of
several models next to each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd
import torch

from labhelpers.data import IGNORE_INDEX, tokenize_chats
from labhelpers.evaluation import SELECTION_SPLIT, distinguishable, evaluate, select_best
from labhelpers.profiles import Profile
from labhelpers.tasks import sql

#: The measures of :func:`sql_quality`, each with its title in a figure.
MEASURES = {"sql": "execution accuracy", "valid_sql": "fraction valid SQL", "no_chatter": "fraction with no trailing text",
            "answer_tokens": "answer length (tokens)", "stopped": "fraction the model ended itself"}


def sql_quality(model, tokenizer, profile: Profile, split: str = "test",
                generation_config=None) -> tuple[dict[str, float], pd.DataFrame]:
    """Score ``model`` on the SQL task's ``split`` (the profile's evaluation slice) and measure its answers.

    Returns ``(measures, examples)``: ``sql`` (execution accuracy), ``valid_sql`` and ``no_chatter``
    (:func:`labhelpers.tasks.sql.format_report`), ``answer_tokens`` (mean generated tokens) and
    ``stopped`` (the fraction of answers that ended with the end-of-turn token instead of running into
    the task's token limit); and the per-example frame with those columns. Decoding is greedy unless
    ``generation_config`` says otherwise; a sampling config draws from a generator seeded with
    ``profile.seed``, so a rerun gives the same answers.
    """
    if generation_config is not None and generation_config.do_sample:
        torch.manual_seed(profile.seed)
    examples = evaluate(model, tokenizer, sql.TASK.name, profile, split, generation_config)
    examples = pd.concat([examples, sql.format_report(examples["completion"])], axis=1)
    measures = {"sql": float(examples["correct"].mean()), "valid_sql": float(examples["valid_sql"].mean()),
                "no_chatter": float(examples["no_chatter"].mean()),
                "answer_tokens": float(examples["new_tokens"].mean()), "stopped": float(examples["stopped"].mean())}
    return measures, examples


def without_end_of_turn(rows: Sequence[dict], tokenizer) -> list[dict[str, list[int]]]:
    """Chat rows as tokenized rows (assistant-only labels) whose assistant turns lack their closing
    end-of-turn token: the training data of a model that never sees where an answer stops.

    Only the assistant's end-of-turn tokens go (the ones the loss is on); the prompt keeps its own.
    Raises ValueError when the tokenizer has no end-of-turn (eos) token or no row ends its answer with one.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token (its end-of-turn token); set tokenizer.eos_token")
    out, dropped = [], 0
    for row in tokenize_chats([r["messages"] for r in rows], tokenizer, max_length=None):
        keep = [not (t == eos and label != IGNORE_INDEX) for t, label in zip(row["input_ids"], row["labels"])]
        dropped += keep.count(False)
        out.append({key: [v for v, k in zip(row[key], keep) if k] for key in ("input_ids", "labels")})
    if dropped == 0:
        raise ValueError(f"no assistant turn ends with the eos token {tokenizer.eos_token!r}; the chat template "
                         "must close assistant turns with it for this ablation to remove anything")
    return out


def quality_table(measured: Mapping[str, Mapping[str, float]], split: str = SELECTION_SPLIT,
                  column: str = "variant") -> pd.DataFrame:
    """One row per variant (``{name: sql_quality measures}``), in the given order, with ``split``."""
    table = pd.DataFrame([{column: name, **{m: values[m] for m in MEASURES}} for name, values in measured.items()])
    table["split"] = split
    return table


@dataclass(frozen=True)
class Recommendation:
    """What :func:`recommend` chose (``choice``), the variant that scored highest (``best``), and why."""

    choice: str
    best: str
    reason: str


def recommend(table: pd.DataFrame, n: int, default: str, column: str = "variant") -> Recommendation:
    """The variant to use, read from a validation :func:`quality_table` of ``n`` examples per score.

    The best variant has the highest execution accuracy, ties broken by more answers without chatter,
    then by shorter answers (:func:`select_best`, which refuses a table of test scores). It replaces
    the ``default`` recipe only when the evidence is clear: its accuracy is higher beyond the 95%
    intervals, or it is as accurate and ends more answers cleanly beyond them
    (:func:`labhelpers.evaluation.distinguishable`). Otherwise the default stays, and the reason says so.
    """
    rows = table.set_index(column)
    if default not in rows.index:
        raise KeyError(f"the default {default!r} is not a row of the table; rows: {list(rows.index)}")
    best = str(select_best(table, "sql", tie_breakers=[("no_chatter", False), ("answer_tokens", True)]).iloc[0][column])
    b, d = rows.loc[best], rows.loc[default]
    if best == default:
        return Recommendation(default, best, f"{default} scores highest on validation")
    if distinguishable(b["sql"], d["sql"], n, n):
        return Recommendation(best, best, f"{best} is more accurate than {default} beyond the 95% intervals "
                                          f"({b['sql']:.2f} vs {d['sql']:.2f}, n={n})")
    if b["sql"] >= d["sql"] and b["no_chatter"] > d["no_chatter"] and distinguishable(b["no_chatter"], d["no_chatter"], n, n):
        return Recommendation(best, best, f"{best} is as accurate as {default} and ends more answers cleanly, beyond "
                                          f"the 95% intervals (no chatter {b['no_chatter']:.2f} vs {d['no_chatter']:.2f}, n={n})")
    return Recommendation(default, best, f"{best} leads {default} on validation ({b['sql']:.2f} vs {d['sql']:.2f}), but "
                                         f"within the 95% intervals at n={n}: not a difference, so keep {default}")


def metrics(table: pd.DataFrame, prefix: str, column: str = "variant") -> dict[str, float]:
    """``{"<prefix>_<variant>_<measure>": value}`` of a :func:`quality_table`, for
    :func:`labhelpers.results.save_metrics` (a variant's name in lower case, each run of other
    characters an underscore: ``"NEFTune α=5"`` becomes ``neftune_5``)."""
    return {f"{prefix}_{slug(str(row[column]))}_{measure}": float(row[measure])
            for _, row in table.iterrows() for measure in MEASURES}


def slug(name: str) -> str:
    """``name`` in lower case ASCII letters and digits, each run of anything else one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def side_by_side(examples: Mapping[str, pd.DataFrame], n: int = 3) -> pd.DataFrame:
    """The first ``n`` questions with each model's answer (``{model name: sql_quality examples}``) and
    whether it was right: one row per (question, model), for reading outputs before and after a change."""
    rows = []
    for i in range(n):
        for name, frame in examples.items():
            row = frame.iloc[i]
            rows.append({"question": row["prompt"].splitlines()[-1], "model": name, "answer": row["completion"],
                         "correct": bool(row["correct"]), "tokens": int(row["new_tokens"])})
    return pd.DataFrame(rows).set_index(["question", "model"])
