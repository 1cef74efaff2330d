"""Batched greedy generation through the chat template, task scoring into DataFrames, perplexity."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from labhelpers import tracking
from labhelpers.chat import require_chat_template
from labhelpers.profiles import Profile
from labhelpers.tasks import get_task, load_split


def retention(score: float, reference: float) -> float:
    """The fraction of a reference score that a model keeps: ``score / reference``.

    When the reference scores 0 there is no skill to lose, so nothing was lost: the retention is 1.0,
    whatever ``score`` is (a reference of 0 happens in the ``smoke`` profile, whose 4-step experts learn
    nothing). Above 1 means the model beats the reference. Scores must be finite and non-negative.
    """
    if not (math.isfinite(score) and math.isfinite(reference)) or score < 0 or reference < 0:
        raise ValueError(f"retention needs finite, non-negative scores; got score={score!r}, reference={reference!r}")
    return score / reference if reference > 0 else 1.0


SELECTION_SPLIT = "validation"
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def binomial_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion of ``successes`` out of ``n`` (Wilson, 1927).

    A score such as pass@1 on ``n`` examples is a proportion; its 95% interval says how far another
    draw of ``n`` examples could move it. Wilson's interval stays inside [0, 1] and keeps its coverage
    for small ``n`` and for scores near 0 or 1, where the normal approximation fails. Only the 95%
    level is offered (``confidence`` is checked, not interpolated).
    """
    if confidence != 0.95:
        raise ValueError(f"only the 95% interval is implemented, got confidence={confidence}")
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    p, z2 = successes / n, Z_95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score_interval(score: float, n: int) -> tuple[float, float]:
    """The :func:`binomial_interval` of a score that is the fraction correct of ``n`` examples."""
    return binomial_interval(round(float(score) * n), n)


def eval_size(task: str, profile: Profile, split: str = "test") -> int:
    """How many examples a score of ``task`` on ``split`` averages over in ``profile`` (its ``n_eval``)."""
    return len(load_split(task, split, profile.n_eval))


def with_intervals(table: pd.DataFrame, sizes: dict[str, "int | Sequence[int]"]) -> pd.DataFrame:
    """Add ``<column> 95% low`` and ``<column> 95% high`` after each score column named in ``sizes``
    (``{column: number of examples it averages over}``, one number for every row or one per row, as
    when the rows score different tasks): the :func:`binomial_interval` of each row (a row without a
    score, NaN, gets none)."""
    out = table.copy()
    for column, n in sizes.items():
        ns = [n] * len(out) if isinstance(n, int) else list(n)
        if len(ns) != len(out):
            raise ValueError(f"{column!r}: {len(ns)} sizes for {len(out)} rows; give one size, or one per row")
        bounds = [(math.nan, math.nan) if pd.isna(v) else score_interval(v, k) for v, k in zip(out[column], ns)]
        at = out.columns.get_loc(column) + 1
        out.insert(at, f"{column} 95% low", [lo for lo, _ in bounds])
        out.insert(at + 1, f"{column} 95% high", [hi for _, hi in bounds])
    return out


def mean_over_seeds(runs: list[dict], spread: Callable[[str], bool] = lambda key: key.startswith("score_")) -> dict:
    """One row from the runs of one configuration with different seeds: numbers averaged (kept as they
    are when every seed gives the same, like a parameter count), a ``<key> seed sd`` (sample standard
    deviation, 0 for one seed) after each number whose key ``spread`` accepts (default: ``score_*``),
    anything else (a name, a loss curve) from the first run, and ``seeds``."""
    row: dict = {}
    for key, first in runs[0].items():
        values = [run[key] for run in runs]
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            row[key] = first if len(set(values)) == 1 else float(np.mean(values))  # counts stay integers
            if spread(key):
                row[f"{key} seed sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        else:
            row[key] = first
    row["seeds"] = len(runs)
    return row


def distinguishable(a: float, b: float, n_a: int, n_b: int) -> bool:
    """Whether two scores differ beyond their 95% intervals (the intervals do not overlap): a
    conservative test, used before a lab calls one score higher than another."""
    (lo_a, hi_a), (lo_b, hi_b) = score_interval(a, n_a), score_interval(b, n_b)
    return hi_a < lo_b or hi_b < lo_a


def select_best(candidates: pd.DataFrame, by: str, group: str | None = None,
                tie_breakers: Sequence[tuple[str, bool]] = ()) -> pd.DataFrame:
    """The candidates with the highest ``by`` (per ``group`` when given), chosen on the validation split.

    Selection never sees test rows: ``candidates`` must carry a ``split`` column equal to
    ``"validation"`` on every row (the scoring functions that feed a selection write it), otherwise
    this raises. Score the chosen rows on the test split afterwards, once, for the final table.
    ``tie_breakers``: further ``(column, ascending)`` sort keys (e.g. ``("final_loss", True)``).
    Returns the chosen rows (their index kept), in the order of ``group`` or as a one-row frame.
    """
    if "split" not in candidates.columns or set(candidates["split"]) != {SELECTION_SPLIT}:
        found = sorted(set(candidates["split"])) if "split" in candidates.columns else "no split column"
        raise ValueError(f"selection must use scores on the {SELECTION_SPLIT!r} split, got {found}; score the "
                         f"candidates with split={SELECTION_SPLIT!r} and report the test split only for the winner")
    keys = [by, *(column for column, _ in tie_breakers)]
    ordered = candidates.sort_values(keys, ascending=[False, *(asc for _, asc in tie_breakers)], kind="stable")
    return ordered.groupby(group, sort=False).head(1) if group else ordered.head(1)


def reference_text(row: dict, task_format: str) -> str:
    """The reference answer of a row: the ``completion`` of a completion task, the last (assistant)
    turn of a chat task."""
    return row["completion"] if task_format == "completion" else row["messages"][-1]["content"]


def prompt_text(row: dict, tokenizer, task_format: str) -> str:
    """The text a model continues for a row: the chat prompt (all turns but the answer, plus the
    generation prompt) for chat tasks, the raw ``prompt`` for completion tasks."""
    if task_format == "completion":
        return row["prompt"]
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class Generation:
    """One completion: its text (special tokens stripped), how many tokens were generated (up to and
    including the end-of-turn token) and whether the model stopped by itself (emitted the tokenizer's
    end-of-turn token before ``max_new_tokens``)."""

    text: str
    new_tokens: int
    stopped: bool


@torch.no_grad()
def generate_detailed(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32,
                      progress: bool = False, generation_config=None) -> list[Generation]:
    """Completions of ``prompts`` (left-padded batches) with their lengths.

    Greedy unless ``generation_config`` (a ``transformers.GenerationConfig``) says otherwise, e.g.
    ``GenerationConfig(do_sample=True, temperature=0.7)`` or ``GenerationConfig(repetition_penalty=1.3)``;
    ``max_new_tokens`` and the end-of-turn and padding tokens are always the task's and the tokenizer's.
    Sampling draws from torch's global generator: seed it (``torch.manual_seed``) for a repeatable run.
    """
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    limits = {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}
    if generation_config is None:
        decoding = {"do_sample": False, **limits}
    else:  # the caller's config with the task's limits (a copy: theirs is left as it was)
        decoding = {"generation_config": copy.deepcopy(generation_config)}
        decoding["generation_config"].update(**limits)
    outputs: list[Generation] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress):
        enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        out = model.generate(**enc, **decoding)
        new = out[:, enc["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for text, ids in zip(texts, new.tolist()):
            stopped = eos in ids
            outputs.append(Generation(text, ids.index(eos) + 1 if stopped else len(ids), stopped))
    model.train(was_training)
    return outputs


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32,
             progress: bool = False, generation_config=None) -> list[str]:
    """The texts of :func:`generate_detailed` (greedy unless ``generation_config`` says otherwise)."""
    return [g.text for g in generate_detailed(model, tokenizer, prompts, max_new_tokens, batch_size, progress,
                                              generation_config)]


def generation_limit(task: str, cap: int | None = None) -> int:
    """How many tokens an answer to ``task`` may have: the task's ``max_new_tokens``, or ``cap`` where it is
    given and smaller (``Profile.max_new_tokens``). The course's scorer and the harness's both read it."""
    budget = get_task(task).max_new_tokens
    return budget if cap is None else min(budget, cap)


def evaluate_task(model, tokenizer, task: str, split: str = "test", n: int | None = None,
                  batch_size: int = 32, progress: bool = False, generation_config=None,
                  max_new_tokens: int | None = None) -> pd.DataFrame:
    """Generate for the first ``n`` rows of a split and score them (greedy decoding unless
    ``generation_config`` says otherwise, see :func:`generate_detailed`), each answer at most the task's
    ``max_new_tokens`` long, or ``max_new_tokens`` where that is given and smaller.

    Returns one row per example: ``id``, ``prompt``, ``reference``, ``completion``, ``correct``,
    ``composition`` (where the task has one), ``new_tokens`` (the answer's length in tokens) and
    ``stopped`` (the model ended its turn before the generation limit).
    ``df["correct"].mean()`` is the task's score (pass@1 for ``code``, execution accuracy for ``sql``,
    exact match for ``arithmetic``).
    """
    spec = get_task(task)
    rows = list(load_split(task, split, n))
    prompts = [prompt_text(r, tokenizer, spec.format) for r in rows]
    generations = generate_detailed(model, tokenizer, prompts, generation_limit(task, max_new_tokens), batch_size,
                                    progress, generation_config)
    completions = [g.text for g in generations]
    return pd.DataFrame({
        "id": [r["id"] for r in rows],
        "prompt": [r["messages"][0]["content"] if "messages" in r else r["prompt"] for r in rows],
        "reference": [reference_text(r, spec.format) for r in rows],
        "completion": completions,
        "correct": spec.score(rows, completions),
        "composition": [r.get("composition", "") for r in rows],
        "new_tokens": [g.new_tokens for g in generations],
        "stopped": [g.stopped for g in generations],
    })


def evaluate(model, tokenizer, task: str, profile: Profile, split: str = "test",
             generation_config=None) -> pd.DataFrame:
    """:func:`evaluate_task` on the profile's evaluation slice (first ``profile.n_eval`` rows, batches
    of ``profile.eval_batch_size``, answers capped at ``profile.max_new_tokens`` where it is set): the
    one way the labs score a model. The greedy score of a model trained in a tracked run is logged to
    that run (:mod:`labhelpers.tracking`)."""
    table = evaluate_task(model, tokenizer, task, split, profile.n_eval, profile.eval_batch_size,
                          generation_config=generation_config, max_new_tokens=profile.max_new_tokens)
    if generation_config is None:  # the tracked score is the greedy one, whatever else is tried
        tracking.log_evaluation(model, task, split, float(table["correct"].mean()))
    return table


def score(model, tokenizer, task: str, profile: Profile, split: str = "test") -> float:
    """The task's score (mean of ``correct``) on the profile's evaluation slice."""
    return float(evaluate(model, tokenizer, task, profile, split)["correct"].mean())


def scores(model, tokenizer, tasks: Sequence[str], profile: Profile, split: str = "test") -> dict[str, float]:
    """``{task: score}`` on the profile's evaluation slice of each task."""
    return {task: score(model, tokenizer, task, profile, split) for task in tasks}


def token_blocks(texts: Sequence[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Texts joined by the end-of-turn token and cut into ``[n_blocks, seq_len]`` blocks of ids."""
    ids: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(enc + [tokenizer.eos_token_id])
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"texts hold {len(ids)} tokens, fewer than one block of {seq_len}; pass more text "
                         "or a smaller seq_len")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], seq_len: int = 256, batch_size: int = 32) -> float:
    """exp(mean next-token cross-entropy) of ``texts`` packed into blocks of ``seq_len`` tokens."""
    blocks = token_blocks(texts, tokenizer, seq_len)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i:i + batch_size].to(model.device)
        loss = model(input_ids=batch, labels=batch).loss
        total += loss.item() * (batch.shape[0] * (batch.shape[1] - 1))
        count += batch.shape[0] * (batch.shape[1] - 1)
    model.train(was_training)
    return math.exp(total / count)
