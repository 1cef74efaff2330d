"""The chat template of the shipped tokenizer, and checks that a tokenizer can do chat.

The template marks every assistant turn with ``{% generation %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` (and TRL's
``assistant_only_loss=True``) can train on assistant tokens only. A conversation renders as::

    <|user|>
    question<|end|><|assistant|>
    answer<|end|>

Hub models' templates have no such markers. :data:`TEMPLATE_FAMILIES` holds the three families the
GPU profiles' models use, written here from each format's public description (for the offline
rehearsal models, :mod:`labhelpers.course.rehearsal`); :func:`labhelpers.data.tokenize_chats` masks
them by rendering prefixes instead.
"""

from __future__ import annotations

import re

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

# ChatML (Qwen2 / Qwen2.5 instruct): a default system turn when none is given; each turn ends with
# <|im_end|> (the instruct models' end-of-sequence token) and a newline.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
# Llama 3 instruct: <|begin_of_text|>, a header per turn, contents trimmed, each turn ends with <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)
# Llama 2 / CodeLlama instruct: <s>[INST] user [/INST] answer </s>, a system prompt folded into the
# first user turn between <<SYS>> markers.
INST_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system is not none -%}"
    "{%- set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
TEMPLATE_FAMILIES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "inst": INST_TEMPLATE}


def has_generation_markers(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant content with ``{% generation %}``."""
    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", getattr(tokenizer, "chat_template", None) or ""))


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
