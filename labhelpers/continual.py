"""Specializing a model without losing what it knew: forgetting, its mitigations, continual learning.

Lab 2 fine-tunes a base on the SQL domain and measures what happens to its *general* skill: the
profile's ``general_task`` (the arithmetic the course's tiny bases learnt in pretraining, or an instruct
model's instruction following) and held-out perplexity on the course's pretraining corpus. This module
holds the pieces the lab compares:

* **replay**: :func:`replay_mix` mixes a fraction of general data (:func:`general_rows`) into the domain data;
* **L2 / EWC penalty**: :func:`l2_penalty` adds
  :math:`\\frac{\\lambda}{2} \\sum_i F_i (\\theta_i - \\theta^*_i)^2` to the loss, with :math:`F_i = 1`
  (L2-SP, Xuhong et al. 2018) or the diagonal Fisher information of the base on general data
  (:func:`fisher_diagonal`; EWC, Kirkpatrick et al. 2017), through ``train_sft(loss_penalty=...)``;
* **weight interpolation**: :func:`interpolate_weights` / :func:`wise_ft`,
  :math:`\\theta_\\alpha = (1 - \\alpha)\\,\\theta_{base} + \\alpha\\,\\theta_{tuned}` (WiSE-FT, Wortsman et al. 2022);
* **continual learning**: :func:`continual_sequence` trains tasks one after another and records the
  accuracy matrix; :func:`continual_metrics` derives average accuracy, backward transfer and forgetting
  (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018);
* **domain-adaptive continued pretraining** on unlabeled domain text (:func:`domain_texts`,
  Gururangan et al. 2020).
"""

from __future__ import annotations

import copy
import math
import random
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from labhelpers.data import rows_that_fit, tokenize_rows
from labhelpers.evaluation import SELECTION_SPLIT, evaluate, perplexity, score, select_best, token_blocks
from labhelpers.paths import data_dir
from labhelpers.profiles import Profile
from labhelpers.quality import sql_quality
from labhelpers.tasks import PRETRAINING_TASKS, load_split, read_jsonl, sql, task_rows

DOMAIN_TASK = "sql"


# ----------------------------------------------------------------------------------------- data

def corpus_texts(split: str = "heldout", n: int | None = None, kinds: Sequence[str] | None = None) -> list[str]:
    """Documents of the pretraining corpus (``train`` or ``heldout``), optionally of some kinds only."""
    docs = read_jsonl(data_dir() / "corpus" / f"{split}.jsonl")
    texts = [d["text"] for d in docs if kinds is None or d["kind"] in kinds]
    return texts[:n] if n else texts


def domain_texts(queries_per_document: int = 8, seed: int = 0) -> list[str]:
    """Unlabeled text of the SQL domain, for domain-adaptive continued pretraining.

    What a company's repositories hold without any question attached: the table's schema, its data
    as INSERT statements, and query logs (the train split's queries, grouped into documents). No
    question/answer pairs, so nothing here is instruction data.
    """
    dump = sql.database_sql().splitlines()
    docs = ["\n".join(dump[i:i + 12]) for i in range(0, len(dump), 12)]
    queries = sorted({row["gold_sql"] for row in load_split(DOMAIN_TASK, "train")})
    random.Random(seed).shuffle(queries)
    docs += ["-- query log\n" + "\n".join(queries[i:i + queries_per_document])
             for i in range(0, len(queries), queries_per_document)]
    return docs


def general_skill_from_pretraining(profile: Profile) -> bool:
    """Whether the profile's base learnt its general skill in pretraining (the tiny bases' arithmetic),
    rather than in an instruction tuning of its own (an instruct model's ``instructions``)."""
    return profile.general_task in PRETRAINING_TASKS


def general_rows(profile: Profile, tokenizer) -> list[dict]:
    """Training data of the profile's general skill, for replay and for the Fisher information of EWC.

    A skill the base learnt in pretraining (the tiny bases' arithmetic) is replayed as pretraining text:
    the course corpus's train split. Any other general task (an instruct model's ``instructions``) is
    replayed as its own train split, chats with reference answers, those that fit the profile's
    ``max_seq_length`` with ``tokenizer``'s template (:func:`labhelpers.data.rows_that_fit`). Neither
    holds a validation or test prompt of the task.
    """
    if general_skill_from_pretraining(profile):
        return [{"text": t} for t in corpus_texts("train")]
    return rows_that_fit(task_rows(profile.general_task, "train"), tokenizer, profile.max_seq_length)


def row_texts(rows: Sequence[dict], tokenizer) -> list[str]:
    """Each row as the text the model reads: a ``text`` row as it is, a chat row through the chat template."""
    return [row["text"] if "text" in row else tokenizer.apply_chat_template(row["messages"], tokenize=False)
            for row in rows]


def replay_mix(domain_rows: Sequence[dict], replay_rows: Sequence[dict], fraction: float, tokenizer,
               max_length: int, seed: int = 0):
    """A shuffled ``datasets.Dataset`` of tokenized rows in which ``fraction`` of the examples are
    replayed general data (drawn from ``replay_rows``, with repetition when it is short).

    ``fraction`` is in [0, 1); 0 returns the domain rows alone. Rows of different formats (chat SQL,
    plain pretraining text) are tokenized first so that they can share one dataset.
    """
    from datasets import Dataset

    if not 0 <= fraction < 1:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    if fraction > 0 and not replay_rows:
        raise ValueError("replay fraction > 0 needs replay rows; pass general data (e.g. corpus text rows)")
    rng = random.Random(seed)
    n_replay = round(len(domain_rows) * fraction / (1 - fraction))
    pool = list(replay_rows)
    replay = [pool[i % len(pool)] for i in rng.sample(range(max(n_replay, len(pool))), n_replay)] if n_replay else []
    rows = tokenize_rows(list(domain_rows), tokenizer, max_length) + tokenize_rows(replay, tokenizer, max_length)
    rng.shuffle(rows)
    return Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------- scores

PPL_TEXTS = 200


def general_scores(model, tokenizer, profile: Profile, n_texts: int | None = None) -> dict[str, float]:
    """The general skill: the score of the profile's ``general_task`` on its test split (keyed by the
    task's name) and held-out corpus perplexity over ``n_texts`` documents (default: 200, or twice the
    profile's ``n_eval`` when that is smaller), in batches of at most the profile's ``eval_batch_size`` blocks."""
    acc = evaluate(model, tokenizer, profile.general_task, profile)
    n_texts = n_texts or (PPL_TEXTS if profile.n_eval is None else min(PPL_TEXTS, 2 * profile.n_eval))
    return {profile.general_task: float(acc["correct"].mean()),
            "heldout_ppl": perplexity(model, tokenizer, corpus_texts("heldout", n_texts),
                                      batch_size=min(32, profile.eval_batch_size))}


def domain_scores(model, tokenizer, profile: Profile) -> tuple[dict[str, float], pd.DataFrame]:
    """SQL execution accuracy and format adherence on the test split, plus the per-example frame
    (:func:`labhelpers.quality.sql_quality`)."""
    measures, df = sql_quality(model, tokenizer, profile)
    return {key: measures[key] for key in (DOMAIN_TASK, "valid_sql", "no_chatter")}, df


def all_scores(model, tokenizer, profile: Profile) -> dict[str, float]:
    """Domain scores and general scores of one model, as one record."""
    return {**domain_scores(model, tokenizer, profile)[0], **general_scores(model, tokenizer, profile)}


def validation_scores(model, tokenizer, profile: Profile) -> dict[str, float]:
    """The domain and general task scores on the validation split: all that a choice between runs may
    read (:func:`best_mitigation`). The test split is for the final table (:func:`all_scores`)."""
    return {task: score(model, tokenizer, task, profile, SELECTION_SPLIT)
            for task in (DOMAIN_TASK, profile.general_task)}


def mitigation_table(runs: Mapping[str, Mapping[str, float]], general: str, base: str = "base",
                     naive: str = "full FT", split: str = "test") -> pd.DataFrame:
    """Compare runs against the base and the naive fine-tune, all scored on ``split``; ``general`` names
    the general task's column (the profile's ``general_task``).

    Adds ``domain_gain_kept`` = (sql - sql_base) / (sql_naive - sql_base) and ``general_recovered`` =
    (general - general_naive) / (general_base - general_naive): 1 means "as good as the naive run on
    SQL" and "no forgetting" respectively (NaN when the naive run gained or lost nothing), and
    ``split``.
    """
    if base not in runs or naive not in runs:
        raise KeyError(f"runs must include {base!r} and {naive!r}; got {list(runs)}")
    df = pd.DataFrame(runs).T
    if general not in df:
        raise KeyError(f"no {general!r} scores in the runs (columns: {list(df)}); pass the general task the runs "
                       "were scored on, profile.general_task")
    gain = df.loc[naive, DOMAIN_TASK] - df.loc[base, DOMAIN_TASK]
    loss = df.loc[base, general] - df.loc[naive, general]
    df["domain_gain_kept"] = (df[DOMAIN_TASK] - df.loc[base, DOMAIN_TASK]) / gain if gain > 0 else math.nan
    df["general_recovered"] = (df[general] - df.loc[naive, general]) / loss if loss > 0 else math.nan
    df["split"] = split
    return df.rename_axis("run").reset_index()


def best_mitigation(table: pd.DataFrame, min_domain_kept: float = 0.7,
                    exclude=("base", "full FT")) -> pd.Series | None:
    """The run that recovers the most general skill among those keeping ``min_domain_kept`` of the
    domain gain, or None when none does (or when the naive run gained or forgot nothing).

    ``table`` is a :func:`mitigation_table` of validation scores (:func:`validation_scores`): the choice
    is made there, and only the chosen run's row of the test table is reported."""
    candidates = table[~table["run"].isin(exclude) & (table["domain_gain_kept"] >= min_domain_kept)]
    if candidates.empty or candidates["general_recovered"].isna().all():
        return None
    return select_best(candidates, "general_recovered", tie_breakers=[("domain_gain_kept", False)]).iloc[0]


# ----------------------------------------------------------------------------- L2 / EWC penalty

def snapshot(model) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters: the anchor :math:`\\theta^*` of the penalty."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def l2_penalty(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], strength: float,
               fisher: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """:math:`\\frac{\\lambda}{2} \\sum_i F_i (\\theta_i - \\theta^*_i)^2` over the parameters named in ``anchor``.

    ``fisher`` None means :math:`F_i = 1` (plain L2 towards the base). Differentiable in ``params``.
    Raises KeyError for an anchored parameter missing from ``params``.
    """
    missing = [n for n in anchor if n not in params]
    if missing:
        raise KeyError(f"parameters {missing[:3]} are anchored but not in the model; take the anchor with "
                       "snapshot(model) from the same model")
    total = None
    for name, ref in anchor.items():
        sq = (params[name] - ref).pow(2)
        term = (sq * fisher[name]).sum() if fisher is not None else sq.sum()
        total = term if total is None else total + term
    return 0.5 * strength * total


def penalty_fn(anchor: Mapping[str, torch.Tensor], strength: float, fisher=None,
               penalty: Callable = l2_penalty) -> Callable[[torch.nn.Module], torch.Tensor]:
    """``model -> penalty`` for ``train_sft(loss_penalty=...)``; ``penalty`` may be your own function."""
    def loss_penalty(model: torch.nn.Module) -> torch.Tensor:
        return penalty(dict(model.named_parameters()), anchor, strength, fisher)
    return loss_penalty


def fisher_batches(profile: Profile, most: int = 16) -> int:
    """Batches the Fisher estimate averages over: ``most``, or a quarter of the profile's training
    steps when that is fewer (at least 1), so that estimating it never costs more than training."""
    return max(1, min(most, profile.max_steps // 4))


def fisher_diagonal(model, tokenizer, texts: Sequence[str], seq_len: int = 128, batch_size: int = 8,
                    max_batches: int = 16) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher information :math:`F_i = E[(\\partial \\log p / \\partial \\theta_i)^2]` of
    the model on ``texts``, normalised to mean 1 over all parameters so that one strength suits both
    L2 (F = 1) and EWC."""
    blocks = token_blocks(texts, tokenizer, seq_len)[: batch_size * max_batches]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i:i + batch_size].to(model.device)
        model.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().pow(2)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    # the sum over batches, normalised by its mean: the batch count cancels
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean()
    return {n: f / mean for n, f in fisher.items()}


# ------------------------------------------------------------------------------- interpolation

def interpolate_weights(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """:math:`(1 - \\alpha)\\,\\theta_{base} + \\alpha\\,\\theta_{tuned}` for every tensor.

    ``alpha`` 0 is the base, 1 the fine-tuned model. Raises ValueError for ``alpha`` outside [0, 1]
    and for state dicts whose names or shapes differ (naming the tensor).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (0 = base, 1 = fine-tuned), got {alpha}")
    if set(base) != set(tuned):
        odd = sorted(set(base) ^ set(tuned))
        raise ValueError(f"state dicts hold different tensors, e.g. {odd[:3]}; interpolate two checkpoints of "
                         "the same architecture")
    out = {}
    for name, b in base.items():
        t = tuned[name]
        if b.shape != t.shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(b.shape)} in base and {tuple(t.shape)} in tuned")
        out[name] = torch.lerp(b.float(), t.float(), alpha).to(b.dtype) if b.is_floating_point() else b.clone()
    return out


def wise_ft(base_model, tuned_model, alpha: float, interpolate: Callable = interpolate_weights):
    """A new model with the weights ``interpolate(base_state, tuned_state, alpha)`` (default:
    :func:`interpolate_weights`; pass your own to run it); the inputs stay unchanged."""
    merged = copy.deepcopy(tuned_model)
    merged.load_state_dict(interpolate(base_model.state_dict(), tuned_model.state_dict(), alpha))
    return merged.eval()


# ----------------------------------------------------------------------------- continual learning

def continual_metrics(matrix) -> dict[str, float]:
    """Average accuracy, backward transfer and forgetting of a T x T accuracy matrix.

    ``matrix[i, j]`` is the score on task j after training on tasks 0..i (rows in training order; a
    DataFrame may carry an extra leading ``base`` row, which is dropped). With T tasks:

    * average accuracy :math:`A = \\frac{1}{T}\\sum_j R_{T-1,j}`;
    * backward transfer :math:`BWT = \\frac{1}{T-1}\\sum_{j<T-1} (R_{T-1,j} - R_{j,j})` (negative: forgetting);
    * forgetting :math:`F = \\frac{1}{T-1}\\sum_{j<T-1} \\max_{j \\le l < T-1} (R_{l,j} - R_{T-1,j})`.
    """
    if isinstance(matrix, pd.DataFrame):
        matrix = matrix.drop(index="base", errors="ignore").to_numpy(dtype=float)
    r = np.asarray(matrix, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 2:
        raise ValueError(f"need a square T x T accuracy matrix with T >= 2, got shape {r.shape}")
    t = r.shape[0]
    bwt = np.mean([r[t - 1, j] - r[j, j] for j in range(t - 1)])
    forgetting = np.mean([max(r[l, j] for l in range(j, t - 1)) - r[t - 1, j] for j in range(t - 1)])
    return {"average_accuracy": float(r[t - 1].mean()), "backward_transfer": float(bwt),
            "forgetting": float(forgetting)}
