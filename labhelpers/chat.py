"""The chat template of the shipped tokenizer, and checks that a tokenizer can do chat.

The template marks every assistant turn with ``{% generation %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` (and TRL's
``assistant_only_loss=True``) can train on assistant tokens only. A conversation renders as::

    <|user|>
    question<|end|><|assistant|>
    answer<|end|>
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", END_OF_TURN, "<|system|>", "<|user|>", "<|assistant|>")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- elif message['role'] == 'user' or message['role'] == 'system' -%}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' + message['role'] + '; valid roles: system, user, assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def require_chat_template(tokenizer) -> None:
    """Raise a clear error when ``tokenizer`` has no chat template (base tokenizers often don't)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set one, e.g. "
            "`tokenizer.chat_template = labhelpers.chat.CHAT_TEMPLATE`, or load the instruct variant")


def validate_messages(messages: list[dict], require_assistant: bool = True) -> None:
    """Check a conversation's schema: a list of {role, content} turns with known roles.

    Raises ValueError naming the offending turn and the fix.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or set(turn) < {"role", "content"}:
            raise ValueError(f"turn {i} must be a dict with 'role' and 'content', got {turn!r}")
        if turn["role"] not in ROLES:
            raise ValueError(f"turn {i} has unknown role {turn['role']!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(turn["content"], str):
            raise ValueError(f"turn {i} content must be a string, got {type(turn['content']).__name__}")
    if require_assistant and not any(t["role"] == "assistant" for t in messages):
        raise ValueError("conversation has no assistant turn, so there is nothing to train on; "
                         "add the reference answer as a final {'role': 'assistant', 'content': ...} turn")
