"""Training data: schema checks, chat formatting, assistant-only labels, and the columns TRL needs.

Two row formats are accepted, matching TRL's ``SFTTrainer``:

* conversational: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``, trained with
  the loss on assistant tokens only;
* prompt/completion: ``{"prompt": str, "completion": str}``, trained on the completion only.

Packing (several examples per row, no padding) is TRL's: ``train_sft(..., packing=True,
padding_free=True)`` passes both to ``SFTConfig``; the assistant-only mask survives it.
"""

from __future__ import annotations

from typing import Iterable

from labhelpers.chat import require_chat_template, validate_messages

IGNORE_INDEX = -100


def row_format(row: dict) -> str:
    """``"chat"`` or ``"completion"``; raises ValueError naming the missing fields otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a dict, got {type(row).__name__}")
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "completion"
    raise ValueError(f"row has fields {sorted(row)}; it needs 'messages' (a chat) or both 'prompt' and "
                     "'completion' (plain text); rename the fields or build rows with labhelpers.tasks")


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
            if fmt == "chat":
                validate_messages(row["messages"])
            elif not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
                raise ValueError("'prompt' and 'completion' must be strings")
        except ValueError as err:
            raise ValueError(f"row {i} (id={row.get('id', '?') if isinstance(row, dict) else '?'}): {err}") from None
        formats.add(fmt)
    if n == 0:
        raise ValueError("the dataset is empty; pass at least one training row")
    if len(formats) > 1:
        raise ValueError("rows mix chat ('messages') and prompt/completion formats; convert them to one format")
    return formats.pop()


def sft_dataset(dataset):
    """Keep only the columns TRL trains on (``messages``, or ``prompt``+``completion``), after validation."""
    fmt = validate_rows(dataset)
    keep = ["messages"] if fmt == "chat" else ["prompt", "completion"]
    return dataset.select_columns(keep)


def tokenize_chat(messages: list[dict], tokenizer, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels of one conversation, with labels ``-100`` outside assistant turns.

    The mask comes from the template's ``{% generation %}`` markers
    (``return_assistant_tokens_mask=True``). Raises ValueError for a conversation longer than
    ``max_length`` tokens instead of silently cutting the answer off.
    """
    validate_messages(messages)
    require_chat_template(tokenizer)
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    if not any(mask):
        raise ValueError("the chat template marks no assistant tokens; it needs {% generation %} ... "
                         "{% endgeneration %} around assistant content (see labhelpers.chat.CHAT_TEMPLATE)")
    if len(ids) > max_length:
        raise ValueError(f"conversation has {len(ids)} tokens, more than max_length={max_length}; raise the "
                         "profile's max_seq_length or shorten the example")
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
