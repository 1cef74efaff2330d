"""Training data: schema checks, chat formatting, assistant-only labels, and the columns TRL needs.

Four row formats are accepted, matching TRL's ``SFTTrainer``:

* ``chat``: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``, trained with
  the loss on assistant tokens only;
* ``completion``: ``{"prompt": str, "completion": str}``, trained on the completion only;
* ``text``: ``{"text": str}``, plain language modelling on every token (continued pretraining);
* ``tokenized``: ``{"input_ids": [...], "labels": [...]}``, already tokenized with ``-100`` where no
  loss is taken. :func:`tokenize_rows` turns rows of any other format into these, which is how
  datasets of different formats are mixed (e.g. replaying pretraining text during SQL tuning).

Packing (several examples per row, no padding) is TRL's: ``train_sft(..., packing=True,
padding_free=True)`` passes both to ``SFTConfig``; the assistant-only mask survives it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Sequence

import pandas as pd

from labhelpers.chat import has_generation_markers, require_chat_template, validate_messages

IGNORE_INDEX = -100


def row_format(row: dict) -> str:
    """``"chat"`` or ``"completion"``; raises ValueError naming the missing fields otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a dict, got {type(row).__name__}")
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "input_ids" in row and "labels" in row:
        return "tokenized"
    if "text" in row:
        return "text"
    raise ValueError(f"row has fields {sorted(row)}; it needs 'messages' (a chat), both 'prompt' and "
                     "'completion', 'text' (plain text), or 'input_ids' and 'labels' (tokenized); rename the "
                     "fields or build rows with labhelpers.tasks")


def _check_fields(row: dict, fmt: str) -> None:
    if fmt == "chat":
        validate_messages(row["messages"])
    elif fmt == "completion":
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise ValueError("'prompt' and 'completion' must be strings")
    elif fmt == "text":
        if not isinstance(row["text"], str) or not row["text"]:
            raise ValueError("'text' must be a non-empty string")
    elif len(row["input_ids"]) != len(row["labels"]) or not row["input_ids"]:
        raise ValueError(f"'input_ids' ({len(row['input_ids'])}) and 'labels' ({len(row['labels'])}) must be "
                         "non-empty and of equal length")


def validate_rows(rows: Iterable[dict]) -> str:
    """Check every row and that all share one format; return that format.

    Raises ValueError naming the first bad row (its index and id) and how to fix it.
    """
    formats = set()
    n = 0
    for i, row in enumerate(rows):
        n += 1
        try:
            fmt = row_format(row)
            _check_fields(row, fmt)
        except ValueError as err:
            raise ValueError(f"row {i} (id={row.get('id', '?') if isinstance(row, dict) else '?'}): {err}") from None
        formats.add(fmt)
    if n == 0:
        raise ValueError("the dataset is empty; pass at least one training row")
    if len(formats) > 1:
        raise ValueError(f"rows mix the formats {sorted(formats)}; convert them to one, e.g. with "
                         "labhelpers.data.tokenize_rows (every format becomes 'tokenized')")
    return formats.pop()


def sft_dataset(dataset, tokenizer=None, assistant_only: bool = True):
    """The dataset TRL trains on, after validation, and its format: ``(dataset, format)``.

    With a ``tokenizer``, chat rows are tokenized here, in one pass (:func:`tokenize_chats`: the same
    ``apply_chat_template(..., return_assistant_tokens_mask=True)`` call TRL makes, so the same ids and
    assistant-only labels, tested), and come back as ``tokenized`` rows; TRL then only truncates them
    to ``max_length``: one pass instead of TRL's four ``datasets.map`` passes (timed in
    ``docs/measurements.md``), once per split and tokenizer: the last few tokenized are kept, by content,
    for the next runs. Other
    formats keep only the columns TRL trains on (``prompt``+``completion``, ``text``, or
    ``input_ids``+``labels``). ``assistant_only=False`` (what ``SFTConfig(assistant_only_loss=False)``
    asks) puts the loss of chat rows on every token, the prompt's and the role markers' too.
    """
    from datasets import Dataset

    fmt = validate_rows(dataset)
    if fmt == "chat" and tokenizer is not None:
        conversations = list(dataset["messages"])
        key = _tokenized_key(conversations, tokenizer, assistant_only)
        tokenized = _TOKENIZED.pop(key, None) if key is not None else None
        if tokenized is None:
            rows = tokenize_chats(conversations, tokenizer, max_length=None)
            tokenized = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                           "labels": [r["labels" if assistant_only else "input_ids"] for r in rows]})
        if key is not None:
            _TOKENIZED[key] = tokenized  # most recently used last; the oldest go
            while len(_TOKENIZED) > _TOKENIZED_KEPT:
                _TOKENIZED.pop(next(iter(_TOKENIZED)))
        return tokenized, "tokenized"
    return dataset.select_columns(FORMAT_COLUMNS[fmt]), fmt


# The splits :func:`sft_dataset` tokenized last, by content: a lab trains many runs on one split with one
# tokenizer (Lab 1's seven methods, Lab 2b's trials), and each run would otherwise tokenize it again
_TOKENIZED: dict[tuple[str, str, bool], object] = {}
_TOKENIZED_KEPT = 8


def _tokenized_key(conversations: list, tokenizer, assistant_only: bool) -> tuple[str, str, bool] | None:
    """What :func:`sft_dataset`'s tokenization depends on: the conversations' text, the tokenizer (its
    vocabulary, merges, normalizer and special tokens, as serialized by the ``tokenizers`` library, and
    its chat template) and the mask; None for a tokenizer without that serialization (not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    rows = hashlib.sha256(json.dumps(conversations, sort_keys=True, default=str).encode()).hexdigest()
    spec = [backend.to_str(), tokenizer.chat_template or "", str(tokenizer.eos_token), str(tokenizer.pad_token)]
    return rows, hashlib.sha256(json.dumps(spec).encode()).hexdigest(), assistant_only


FORMAT_COLUMNS = {"chat": ["messages"], "completion": ["prompt", "completion"], "text": ["text"],
                  "tokenized": ["input_ids", "labels"]}


def tokenize_chat(messages: list[dict], tokenizer, max_length: int | None) -> dict[str, list[int]]:
    """Token ids and labels of one conversation, with labels ``-100`` outside assistant turns.

    The mask covers each assistant turn's content and its end-of-turn token (:func:`assistant_masks`:
    the template's ``{% generation %}`` markers where it has them, else rendered prefixes, so any
    chat template works). Raises ValueError for a conversation longer than ``max_length`` tokens
    instead of silently cutting the answer off (``None``: no limit here; the trainer truncates as
    TRL does).
    """
    validate_messages(messages)
    return tokenize_chats([messages], tokenizer, max_length)[0]


def tokenize_chats(conversations: list[list[dict]], tokenizer, max_length: int | None,
                   chunk: int = 512) -> list[dict[str, list[int]]]:
    """:func:`tokenize_chat` of many (already validated) conversations, a chunk at a time: the
    tokenizer encodes a chunk in one batched call, about twice as fast as one call per conversation."""
    require_chat_template(tokenizer)
    out = []
    for start in range(0, len(conversations), chunk):
        for ids, mask in assistant_masks(conversations[start:start + chunk], tokenizer):
            if not any(mask):
                raise ValueError("the chat template marks no assistant tokens; it needs {% generation %} ... "
                                 "{% endgeneration %} around assistant content (see labhelpers.chat.CHAT_TEMPLATE), "
                                 "or a template that renders assistant turns after their prompt")
            if max_length is not None and len(ids) > max_length:
                raise ValueError(f"conversation has {len(ids)} tokens, more than max_length={max_length}; raise the "
                                 "profile's max_seq_length or shorten the example")
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                        "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]})
    return out


def assistant_masks(conversations: list[list[dict]], tokenizer,
                    use_markers: bool | None = None) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, mask)`` of each conversation, ``mask`` 1 on the assistant's tokens.

    With ``{% generation %}`` markers in the template, the mask is the tokenizer's own
    (``return_assistant_tokens_mask=True``). Otherwise (hub templates: ChatML, Llama 3, ``[INST]``)
    it comes from rendering prefixes, as TRL's ``assistant_only_loss`` cannot: an assistant turn
    ``i`` spans the characters between the render of turns ``< i`` with the generation prompt and
    the render of turns ``<= i``, cut after its end-of-sequence token when the template adds text
    after it (ChatML's newline); a token belongs to the assistant when it starts inside a span.
    ``use_markers=False`` takes the prefix route even where markers exist (the two agree, tested).
    """
    if use_markers is None:
        use_markers = has_generation_markers(tokenizer)
    if use_markers:
        enc = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(zip(enc["input_ids"], enc["assistant_masks"]))
    texts, spans = zip(*(assistant_char_spans(messages, tokenizer) for messages in conversations))
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return [(ids, [int(any(s <= a < e for s, e in turn_spans)) for a, _ in offsets])
            for ids, offsets, turn_spans in zip(enc["input_ids"], enc["offset_mapping"], spans)]


def assistant_char_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``(start, end)`` characters of each assistant turn (see
    :func:`assistant_masks`). Raises ValueError when the template renders a conversation's prefix
    differently from the start of the whole (the mask would then be wrong)."""
    def render(turns, prompt=False):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt) if turns else ""

    text = render(messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], prompt=True), render(messages[:i + 1])
        if not (text.startswith(prompt) and text.startswith(upto)):
            raise ValueError(f"the chat template renders the first {i + 1} turns differently from the start of the "
                             "whole conversation, so assistant tokens cannot be located; add {% generation %} "
                             "markers to the template")
        start, end = len(prompt), len(upto)
        eos = tokenizer.eos_token
        if eos and eos in text[start:end]:
            end = text.rindex(eos, start, end) + len(eos)
        spans.append((start, end))
    return text, spans


def tokenize_completion(prompt: str, completion: str, tokenizer) -> dict[str, list[int]]:
    """Ids of ``prompt + completion + eos`` with labels on the completion and eos only (as TRL does)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def tokenize_text(text: str, tokenizer) -> dict[str, list[int]]:
    """Ids of ``text + eos`` (the pretraining format) with a loss on every token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def tokenize_rows(rows: Iterable[dict], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Rows of any one or several formats as ``tokenized`` rows (``input_ids`` and ``labels``).

    Chat rows keep the loss on assistant tokens, completion rows on the completion, text rows on
    everything. Plain text longer than ``max_length`` is cut into consecutive pieces; a chat or
    completion longer than that raises ValueError (cutting would drop the answer).
    """
    out = []
    for i, row in enumerate(rows):
        try:
            fmt = row_format(row)
            _check_fields(row, fmt)
        except ValueError as err:
            raise ValueError(f"row {i} (id={row.get('id', '?') if isinstance(row, dict) else '?'}): {err}") from None
        if fmt == "tokenized":
            pieces = [{"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}]
        elif fmt == "chat":
            enc = tokenize_chat(row["messages"], tokenizer, max_length)
            pieces = [{"input_ids": enc["input_ids"], "labels": enc["labels"]}]
        elif fmt == "completion":
            pieces = [tokenize_completion(row["prompt"], row["completion"], tokenizer)]
        else:
            enc = tokenize_text(row["text"], tokenizer)
            pieces = [{k: v[s:s + max_length] for k, v in enc.items()} for s in range(0, len(enc["input_ids"]), max_length)]
        for piece in pieces:
            if len(piece["input_ids"]) > max_length:
                raise ValueError(f"row {i} has {len(piece['input_ids'])} tokens, more than max_length={max_length}; "
                                 "raise the profile's max_seq_length or shorten the example")
        out += pieces
    return out


def rows_that_fit(rows: Sequence[dict], tokenizer, max_length: int) -> list[dict]:
    """``rows`` without the chat rows whose whole conversation is longer than ``max_length`` tokens (other
    rows stay: plain text is cut into pieces anyway). For data whose longest examples may be left out, such
    as replayed general data, where :func:`tokenize_rows` would raise: an answer cut short would teach the
    model to stop mid-answer. A template with a long default system prompt (Qwen's) leaves out more."""
    chats = [i for i, row in enumerate(rows) if "messages" in row]
    masks = assistant_masks([rows[i]["messages"] for i in chats], tokenizer) if chats else []
    too_long = {i for i, (ids, _) in zip(chats, masks) if len(ids) > max_length}
    return [row for i, row in enumerate(rows) if i not in too_long]


def training_dataset(rows, tokenizer, max_length: int):
    """The ``datasets.Dataset`` that :func:`labhelpers.training.fine_tune` trains on.

    A Dataset is kept as it is. Chat or completion rows of one format go to TRL as they are (only
    their format's columns: chat rows train with ``assistant_only_loss``, completion rows with
    ``completion_only_loss``); plain text and rows of several formats are tokenized first
    (:func:`tokenize_rows`: the same masks, and long text is cut into pieces instead of truncated).
    """
    from datasets import Dataset

    if isinstance(rows, Dataset):
        return rows
    formats = {row_format(row) for row in rows}
    if formats in ({"chat"}, {"completion"}):
        columns = FORMAT_COLUMNS[formats.pop()]
        return Dataset.from_list([{c: row[c] for c in columns} for row in rows])
    return Dataset.from_list(tokenize_rows(rows, tokenizer, max_length))


@dataclass
class LabelCheck:
    """Outcome of :func:`check_assistant_labels`: one row per conversation, ``passed`` when all match."""

    passed: bool
    rows: "pd.DataFrame"


def check_assistant_labels(labels_fn, tokenizer, conversations: list[list[dict]]) -> LabelCheck:
    """Compare ``labels_fn(messages, tokenizer)`` with the labels of :func:`tokenize_chat` (the mask of
    :func:`assistant_masks`), token by token."""
    records = []
    for i, messages in enumerate(conversations):
        expected = tokenize_chat(messages, tokenizer, max_length=10**6)["labels"]
        got = list(labels_fn(messages, tokenizer))
        same_length = len(got) == len(expected)
        wrong = sum(a != b for a, b in zip(got, expected)) if same_length else None
        records.append({"conversation": i, "tokens": len(expected), "your_tokens": len(got),
                        "trained_tokens": sum(t != IGNORE_INDEX for t in expected), "mismatches": wrong})
    rows = pd.DataFrame(records)
    passed = bool((rows["tokens"] == rows["your_tokens"]).all() and (rows["mismatches"] == 0).all())
    return LabelCheck(passed, rows)
