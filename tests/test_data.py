"""Assistant-only masks and labels, data schema errors, the dataset TRL trains on."""

import pytest

from helpers import CONVO
from labhelpers import chat, data


def test_assistant_mask_covers_exactly_the_assistant_tokens(tokenizer):
    enc = tokenizer.apply_chat_template(CONVO, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    expected = []
    for turn in CONVO:
        if turn["role"] == "assistant":
            expected += tokenizer(turn["content"] + chat.END_OF_TURN, add_special_tokens=False)["input_ids"]
    assert masked == expected
    assert tokenizer.decode(masked) == "12<|end|>6<|end|>"


def test_labels_train_only_on_assistant_tokens(tokenizer):
    out = data.tokenize_chat(CONVO, tokenizer, max_length=128)
    kept = [t for t in out["labels"] if t != data.IGNORE_INDEX]
    assert tokenizer.decode(kept) == "12<|end|>6<|end|>"
    assert len(out["labels"]) == len(out["input_ids"]) == len(out["attention_mask"])


def test_unknown_role_is_a_clear_error(tokenizer):
    bad = [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(ValueError, match="unknown role 'robot'.*valid roles"):
        data.tokenize_chat(bad, tokenizer, 64)
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template(bad, tokenize=False)


def test_missing_assistant_turn_and_missing_template(tokenizer):
    with pytest.raises(ValueError, match="no assistant turn"):
        data.tokenize_chat(CONVO[:2], tokenizer, 64)

    class NoTemplate:
        chat_template = None
        name_or_path = "some/base-model"

    with pytest.raises(ValueError, match="has no chat template.*CHAT_TEMPLATE"):
        data.tokenize_chat(CONVO, NoTemplate(), 64)


def test_over_long_conversation_is_refused(tokenizer):
    with pytest.raises(ValueError, match="max_length=8"):
        data.tokenize_chat(CONVO, tokenizer, max_length=8)


@pytest.mark.parametrize("rows, message", [
    ([], "empty"),
    ([{"question": "hello"}], "needs 'messages'"),
    ([{"text": ""}], "non-empty string"),
    ([{"prompt": "a"}], "needs 'messages'"),
    ([{"messages": "hi"}], "non-empty list"),
    ([{"messages": [{"role": "user"}]}], "'role' and 'content'"),
    ([{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}], "must be a string"),
    ([{"prompt": 1, "completion": "x"}], "must be strings"),
    ([{"messages": CONVO}, {"prompt": "a", "completion": "b"}], "mix"),
])
def test_bad_rows_name_the_problem(rows, message):
    with pytest.raises(ValueError, match=message):
        data.validate_rows(rows)


def test_sft_dataset_keeps_only_training_columns():
    from labhelpers.tasks import load_split

    ds, fmt = data.sft_dataset(load_split("code", "train", 4))
    assert (ds.column_names, fmt) == (["messages"], "chat")
    ds, fmt = data.sft_dataset(load_split("arithmetic", "train", 4).remove_columns("messages"))
    assert (ds.column_names, fmt) == (["prompt", "completion"], "completion")


def test_a_split_is_tokenized_once_per_tokenizer_and_mask(tokenizer):
    import copy

    from labhelpers.tasks import load_split

    rows = load_split("code", "train", 6)
    first, fmt = data.sft_dataset(rows, tokenizer)
    assert fmt == "tokenized" and data.sft_dataset(load_split("code", "train", 6), tokenizer)[0] is first
    everything = data.sft_dataset(rows, tokenizer, assistant_only=False)[0]
    assert everything is not first and everything["labels"] == everything["input_ids"]
    assert data.sft_dataset(load_split("code", "train", 5), tokenizer)[0]["input_ids"] == first["input_ids"][:5]
    other = copy.deepcopy(tokenizer)
    other.chat_template = other.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert data.sft_dataset(rows, other)[0] is not first  # another template: tokenized again (prefix masks)
    other.chat_template = "no generation markers, no assistant prefix"
    with pytest.raises(ValueError):  # a template the masks cannot be read from still fails, cached or not
        data.sft_dataset(rows, other)


def test_only_the_last_splits_tokenized_are_kept(tokenizer, monkeypatch):
    from labhelpers.tasks import load_split

    monkeypatch.setattr(data, "_TOKENIZED", {})
    monkeypatch.setattr(data, "_TOKENIZED_KEPT", 2)
    code, sql = (data.sft_dataset(load_split(task, "train", 3), tokenizer)[0] for task in ("code", "sql"))
    assert data.sft_dataset(load_split("code", "train", 3), tokenizer)[0] is code  # used last: sql is now the oldest
    data.sft_dataset(load_split("arithmetic", "train", 3), tokenizer)
    assert len(data._TOKENIZED) == 2 and data.sft_dataset(load_split("code", "train", 3), tokenizer)[0] is code
    assert data.sft_dataset(load_split("sql", "train", 3), tokenizer)[0] is not sql  # evicted, tokenized again


@pytest.mark.parametrize("task", ["code", "sql", "arithmetic"])
def test_chat_rows_tokenized_here_equal_trl_preparation(task, base, tmp_path):
    """labhelpers tokenizes chat rows itself (faster); TRL's own preparation gives the same ids and labels."""
    from trl import SFTConfig, SFTTrainer

    from labhelpers.tasks import load_split

    model, tokenizer = base  # TRL only reads its config here; nothing trains
    rows = load_split(task, "train", 300).select_columns(["messages"])
    ours, fmt = data.sft_dataset(rows, tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=None, use_cpu=True,
                     report_to="none", activation_checkpointing=False)
    theirs = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer).train_dataset
    assert fmt == "tokenized" and len(ours) == len(theirs) == len(rows) > 100
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["labels"] == theirs["labels"]


def test_trl_sees_generation_markers_and_a_trained_stop_token(tokenizer):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)


def test_loss_on_all_tokens_is_what_trl_trains_without_assistant_only_loss(base, tmp_path):
    """``assistant_only=False`` (``SFTConfig(assistant_only_loss=False)`` in ``fine_tune``) labels every token
    of a conversation, as TRL's collator does for the same config: the prompt and the role markers too."""
    from trl import SFTConfig, SFTTrainer

    from labhelpers.tasks import load_split

    model, tokenizer = base
    rows = load_split("sql", "train", 8).select_columns(["messages"])
    ours, _ = data.sft_dataset(rows, tokenizer, assistant_only=False)
    masked, _ = data.sft_dataset(rows, tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=False, max_length=None, use_cpu=True,
                     report_to="none", activation_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    for i in range(len(rows)):
        theirs = trainer.data_collator([trainer.train_dataset[i]])["labels"][0].tolist()
        assert ours[i]["labels"] == ours[i]["input_ids"] == theirs
        trained = sum(label != data.IGNORE_INDEX for label in masked[i]["labels"])
        assert 0 < trained < len(theirs)  # the default trains on the answer only
