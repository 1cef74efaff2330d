"""The chat template renders, round-trips and adds the generation prompt."""

from helpers import CONVO


def test_template_renders_and_round_trips(tokenizer):
    text = tokenizer.apply_chat_template(CONVO, tokenize=False)
    assert text == ("<|system|>\nBe brief.<|end|><|user|>\n7 + 5 =<|end|><|assistant|>\n12<|end|>"
                    "<|user|>\nand 2 * 3 =<|end|><|assistant|>\n6<|end|>")
    ids = tokenizer.apply_chat_template(CONVO, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_generation_prompt(tokenizer):
    text = tokenizer.apply_chat_template(CONVO[:2], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|user|>\n7 + 5 =<|end|><|assistant|>\n")
