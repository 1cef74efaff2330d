"""The ``code`` task: a natural-language spec of a list function -> a Python function.

Specs are compositions of three parts, e.g. *the sum of* | *the squares of the numbers* | *that are
even*, rendered as::

    Write a Python function sum_squares_even(xs) that returns the sum of the squares of the numbers
    in xs that are even.

and the reference answer is a two-line function. Some (aggregate, transform, condition)
compositions never occur in train, validation or test: they form the ``heldout`` slice, which
measures whether a model *composes* parts it saw separately. Scoring is pass@1: the completion is run
with the example's ``assert`` tests in :mod:`labhelpers.sandbox`.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from labhelpers.sandbox import run_tests_batch
from labhelpers.tasks.base import Task, chat_row, split_keys

AGGREGATES = {  # name -> (phrase, code template over a generator/iterable expression)
    "sum": ("the sum of", "sum({e} for x in {v} if {c})"),
    "max": ("the largest of", "max(({e} for x in {v} if {c}), default=0)"),
    "min": ("the smallest of", "min(({e} for x in {v} if {c}), default=0)"),
    "list": ("a list of", "[{e} for x in {v} if {c}]"),
    "count": ("the count of", "sum(1 for x in {v} if {c})"),
}
TRANSFORMS = {  # name -> (phrase, expression of x); "count" only takes "numbers"
    "numbers": ("the numbers", "x"),
    "squares": ("the squares of the numbers", "x * x"),
    "doubles": ("the doubles of the numbers", "2 * x"),
}
CONDITIONS = {  # name -> (phrase, condition on x); {k} is a small integer parameter
    "even": ("even", "x % 2 == 0"),
    "odd": ("odd", "x % 2 == 1"),
    "positive": ("positive", "x > 0"),
    "negative": ("negative", "x < 0"),
    "gt": ("greater than {k}", "x > {k}"),
    "lt": ("less than {k}", "x < {k}"),
    "div": ("divisible by {k}", "x % {k} == 0"),
}
K_VALUES = range(2, 10)
VARIABLES = ("xs", "nums", "values", "items")
PHRASINGS = (
    "Write a Python function {name}({v}) that returns {spec}.",
    "Implement {name}({v}): return {spec}.",
    "Define a function {name}({v}) returning {spec}.",
)
HELDOUT_COMPOSITIONS = (  # never trained on; every part still appears in train
    ("sum", "doubles", "odd"), ("max", "squares", "lt"), ("min", "numbers", "div"),
    ("list", "doubles", "positive"), ("sum", "squares", "gt"), ("max", "numbers", "negative"),
    ("list", "squares", "even"), ("min", "doubles", "gt"),
)
SPLIT_SIZES = {"train": 1000, "validation": 100, "test": 200}  # unique problems
TRAIN_PHRASINGS_PER_PROBLEM = 2  # train rows = 2000: each train problem in two wordings
HELDOUT_SIZE = 200
N_TESTS = 5


def compositions() -> list[tuple[str, str, str]]:
    """All valid (aggregate, transform, condition) triples."""
    return [(a, t, c) for a in AGGREGATES for t in TRANSFORMS for c in CONDITIONS
            if a != "count" or t == "numbers"]


def problems(composition: tuple[str, str, str]) -> list[tuple]:
    """Every concrete problem (composition, k, variable) of one composition."""
    cond = composition[2]
    ks = K_VALUES if "{k}" in CONDITIONS[cond][1] else (None,)
    return [(composition, k, v) for k in ks for v in VARIABLES]


def function_name(composition: tuple[str, str, str], k: int | None) -> str:
    agg, transform, cond = composition
    parts = [agg] + ([] if transform == "numbers" else [transform]) + [cond] + ([str(k)] if k else [])
    return "_".join(parts)


def render(problem: tuple, phrasing: int) -> tuple[str, str, str]:
    """(spec, reference solution, function name) of a problem."""
    (agg, transform, cond), k, v = problem
    cond_phrase, cond_code = (s.format(k=k) for s in CONDITIONS[cond])
    trans_phrase, expr = TRANSFORMS[transform]
    agg_phrase, agg_code = AGGREGATES[agg]
    if agg == "count":
        spec = f"{agg_phrase} the numbers in {v} that are {cond_phrase}"
    else:
        spec = f"{agg_phrase} {trans_phrase} in {v} that are {cond_phrase}"
    if agg in ("max", "min"):
        spec += ", or 0 if there are none"
    name = function_name((agg, transform, cond), k)
    body = agg_code.format(e=expr, v=v, c=cond_code)
    solution = f"def {name}({v}):\n    return {body}\n"
    return PHRASINGS[phrasing].format(name=name, v=v, spec=spec), solution, name


def make_tests(solution: str, name: str, rng: random.Random) -> list[str]:
    """``assert`` lines whose expected values come from running the reference solution."""
    namespace: dict = {}
    exec(solution, namespace)  # our own generated reference code, never model output
    inputs = [[]] + [[rng.randint(-9, 12) for _ in range(rng.randint(3, 8))] for _ in range(N_TESTS - 1)]
    return [f"assert {name}({xs!r}) == {namespace[name](xs)!r}" for xs in inputs]


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Deterministic train/validation/test/heldout rows of the code task."""
    rng = random.Random(seed)
    seen = [c for c in compositions() if c not in HELDOUT_COMPOSITIONS]
    splits = split_keys([p for c in seen for p in problems(c)], SPLIT_SIZES, seed)
    heldout = [p for c in HELDOUT_COMPOSITIONS for p in problems(c)]
    splits["heldout"] = sorted(rng.sample(heldout, min(HELDOUT_SIZE, len(heldout))), key=repr)
    out: dict[str, list[dict]] = {}
    for split, items in splits.items():
        rows = []
        repeats = TRAIN_PHRASINGS_PER_PROBLEM if split == "train" else 1
        for problem in items:
            for phrasing in rng.sample(range(len(PHRASINGS)), repeats):
                spec, solution, name = render(problem, phrasing)
                rows.append(chat_row("code", split, len(rows), spec, solution, entry_point=name,
                                     composition="/".join(problem[0]),
                                     tests=make_tests(solution, name, rng)))
        out[split] = rows
    return out


_FENCE = re.compile(r"```(?:python)?\n(.*?)(?:```|$)", re.S)


def extract_code(completion: str) -> str:
    """The code in a completion: the first fenced block if there is one, else the whole text."""
    match = _FENCE.search(completion)
    return match.group(1) if match else completion


def score(rows: Sequence[dict], completions: Sequence[str]) -> list[bool]:
    """pass@1 verdicts: each completion must pass all of its row's tests inside the sandbox."""
    return run_tests_batch([extract_code(c) for c in completions], [r["tests"] for r in rows])


TASK = Task(name="code", format="chat", generate=generate, score=score, max_new_tokens=64)
