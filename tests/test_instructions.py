"""The instruction-following probe: its prompts, its references and its checks, against lm-eval's IFEval."""

import importlib
import json
import os
import sys
import types

import pytest

from labhelpers.tasks import get_task, instructions, load_split

CASES = [  # (instruction, response, follows?) the checks' edges, beyond the references
    ({"id": "change_case:english_capital", "kwargs": {}}, "ALL CAPS, 42 TIMES.", True),
    ({"id": "change_case:english_capital", "kwargs": {}}, "ALL CAPS but one.", False),
    ({"id": "change_case:english_lowercase", "kwargs": {}}, "no capitals here.", True),
    ({"id": "punctuation:no_comma", "kwargs": {}}, "One, two.", False),
    ({"id": "startend:end_checker", "kwargs": {"end_phrase": "Any other questions?"}}, '"Fine. ANY OTHER QUESTIONS?"', True),
    ({"id": "startend:end_checker", "kwargs": {"end_phrase": "Any other questions?"}}, "Any other questions? Bye.", False),
    ({"id": "detectable_format:number_bullet_lists", "kwargs": {"num_bullets": 2}}, "* one\n- two", True),
    ({"id": "detectable_format:number_bullet_lists", "kwargs": {"num_bullets": 2}}, "* one\n* two\n* three", False),
    ({"id": "detectable_format:number_bullet_lists", "kwargs": {"num_bullets": 1}}, "** bold line\n* one", True),
    ({"id": "length_constraints:number_words", "kwargs": {"relation": "less than", "num_words": 3}}, "two words", True),
    ({"id": "length_constraints:number_words", "kwargs": {"relation": "at least", "num_words": 3}}, "it's two", True),
    ({"id": "keywords:existence", "kwargs": {"keywords": ["plan", "habit"]}}, "A PLAN and a habitual habit.", True),
    ({"id": "keywords:existence", "kwargs": {"keywords": ["plan", "habit"]}}, "A plan only.", False),
    ({"id": "keywords:forbidden_words", "kwargs": {"forbidden_words": ["very"]}}, "Everything is fine.", True),
    ({"id": "keywords:forbidden_words", "kwargs": {"forbidden_words": ["very"]}}, "VERY fine.", False),
    ({"id": "startend:quotation", "kwargs": {}}, '  "quoted"  ', True),
    ({"id": "startend:quotation", "kwargs": {}}, '"', False),
    ({"id": "detectable_format:title", "kwargs": {}}, "<<A title>>\nText", True),
    ({"id": "detectable_format:title", "kwargs": {}}, "<< >> only", False),
    ({"id": "detectable_content:postscript", "kwargs": {"postscript_marker": "P.S."}}, "Hi.\n\np. s. later", True),
    ({"id": "detectable_content:postscript", "kwargs": {"postscript_marker": "P.S."}}, "Hi. PS later", False),
    ({"id": "detectable_format:number_highlighted_sections", "kwargs": {"num_highlights": 2}}, "*a* and **b**", True),
    ({"id": "detectable_format:number_highlighted_sections", "kwargs": {"num_highlights": 2}}, "*a* and * * only", False),
]


@pytest.fixture(scope="module")
def ifeval():
    """lm-eval's IFEval checkers, imported offline: no language detection (a stub that says English: every
    prompt here is English) and no nltk download (LOCAL_RANK other than 0 skips it; no check used here
    needs nltk's data)."""
    saved = sys.modules.get("langdetect")
    stub = types.ModuleType("langdetect")
    stub.LangDetectException = type("LangDetectException", (Exception,), {})
    stub.detect = lambda text: "en"
    sys.modules["langdetect"] = stub
    rank = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "1"
    try:
        registry = importlib.import_module("lm_eval.tasks.ifeval.instructions_registry")
    finally:
        if rank is None:
            os.environ.pop("LOCAL_RANK")
        else:
            os.environ["LOCAL_RANK"] = rank

    def follows(response: str, instruction: dict) -> bool:
        checker = registry.INSTRUCTION_DICT[instruction["id"]](instruction["id"])
        checker.build_description(**instruction["kwargs"])
        return bool(response.strip()) and checker.check_following(response)

    yield follows
    if saved is None:
        sys.modules.pop("langdetect", None)
    else:
        sys.modules["langdetect"] = saved


@pytest.fixture(scope="module")
def splits():
    return instructions.generate(0)


def test_at_least_300_prompts_split_by_topic(splits):
    assert {name: len(rows) for name, rows in splits.items()} == instructions.SPLIT_SIZES
    assert sum(instructions.SPLIT_SIZES.values()) >= 300
    topics = {name: {row["topic"] for row in rows} for name, rows in splits.items()}
    assert {name: len(t) for name, t in topics.items()} == instructions.TOPIC_SPLITS
    assert not topics["test"] & (topics["train"] | topics["validation"]) and not topics["train"] & topics["validation"]
    for rows in splits.values():
        assert len({row["messages"][0]["content"] for row in rows}) == len(rows)
        for row in rows:
            assert 1 <= len(instructions.row_instructions(row)) <= 2
    used = {i["id"] for row in splits["test"] for i in instructions.row_instructions(row)}
    assert used == set(instructions.INSTRUCTIONS)  # every instruction is probed on test


def test_the_shipped_split_is_what_generate_writes(splits):
    shipped = load_split("instructions", "test")
    assert shipped["messages"] == [row["messages"] for row in splits["test"]]
    assert [json.loads(x) for x in shipped["instructions"]] == [json.loads(r["instructions"]) for r in splits["test"]]


def test_every_reference_follows_its_instructions_by_our_checks_and_ifevals(splits, ifeval):
    for rows in splits.values():
        answers = [row["messages"][1]["content"] for row in rows]
        assert instructions.score(rows, answers) == [True] * len(rows)
        for row, answer in zip(rows, answers):
            for instruction in instructions.row_instructions(row):
                assert ifeval(answer, instruction), (row["id"], instruction, answer)


def test_our_checks_agree_with_ifeval_on_answers_to_other_prompts(splits, ifeval):
    """Each test prompt answered with the references of other prompts (which break some of its
    instructions): the same verdict, instruction by instruction."""
    rows = splits["test"]
    verdicts = []
    for shift in (1, 7, 31):
        for i, row in enumerate(rows):
            answer = rows[(i + shift) % len(rows)]["messages"][1]["content"]
            for instruction in instructions.row_instructions(row):
                ours = instructions.follows(answer, instruction)
                assert ours == ifeval(answer, instruction), (instruction, answer)
                verdicts.append(ours)
    assert 0.2 < sum(verdicts) / len(verdicts) < 0.8  # both verdicts are exercised


@pytest.mark.parametrize("instruction,response,expected", CASES)
def test_the_edges_of_each_check_agree_with_ifeval(instruction, response, expected, ifeval):
    assert instructions.follows(response, instruction) is expected
    assert ifeval(response, instruction) is expected


def test_an_answer_that_ignores_the_request_passes_no_prompt(splits):
    """What a model over-tuned on SQL writes: it follows 'no commas' or 'fewer than 40 words', but every
    prompt also asks for something, so it passes none."""
    rows = [row for rows in splits.values() for row in rows]
    assert all(not all(instructions._restrictive(i) for i in instructions.row_instructions(row)) for row in rows)
    assert instructions.score(rows, ["SELECT * FROM t;"] * len(rows)) == [False] * len(rows)


def test_prompt_and_instruction_level_accuracy():
    row = {"instructions": json.dumps([{"id": "punctuation:no_comma", "kwargs": {}},
                                       {"id": "change_case:english_lowercase", "kwargs": {}}])}
    answers = ["all lower, with a comma", "all lower and no comma", ""]
    assert instructions.score([row] * 3, answers) == [False, True, False]
    assert instructions.instruction_accuracy([row] * 3, answers) == pytest.approx(3 / 6)
    with pytest.raises(KeyError, match="unknown instruction 'poetry:rhymes'; known: "):
        instructions.follows("x", {"id": "poetry:rhymes", "kwargs": {}})


def test_every_reference_fits_the_generation_budget_of_the_real_model(splits):
    """The real model is the one this probe is for (the tiny bases' tokenizer, trained on lowercase
    synthetic text, spells capitals out in single characters)."""
    from transformers import AutoTokenizer

    from labhelpers.models import real_model_dir

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir())
    longest = max(len(tokenizer(row["messages"][1]["content"])["input_ids"]) for rows in splits.values() for row in rows)
    assert longest + 1 <= get_task("instructions").max_new_tokens  # and the end-of-turn token
