"""The ``code`` task: a natural-language spec of a list function -> a Python function.

Specs are compositions of three parts, e.g. *the sum of* | *the squares of the numbers* | *that are
even*, rendered as::

    Write a Python function sum_squares_even(xs) that returns the sum of the squares of the numbers
    in xs that are even.

and the reference answer is a two-line function. Some (aggregate, transform, condition)
compositions never occur in train, validation or test: they form the ``heldout`` slice, which
measures whether a model *composes* parts it saw separately. Scoring is pass@1: the completion is run
with the example's ``assert`` tests in :mod:`labhelpers.sandbox`.

*Composed* specs ask for two conditions at once (*that are even and greater than 3*). The
``train_composed`` split teaches some pairs of conditions; the other pairs
(:data:`HELDOUT_CONDITION_PAIRS`) are asked only by ``heldout_composed``. A real pretrained model tuned
for 40 steps reaches pass@1 1.00 on test and on ``heldout`` (docs/real-model.md); the composed slice is
where methods can still differ. A composed problem's tests are drawn until they tell its reference
from each one-condition version of it (a partial answer fails).
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


FIRST_CONDITIONS = ("even", "odd", "positive", "negative")  # composed: one of these, then one with {k}
SECOND_CONDITIONS = ("gt", "lt", "div")
HELDOUT_CONDITION_PAIRS = (("even", "lt"), ("odd", "gt"), ("positive", "div"), ("negative", "gt"))
COMPOSED_SIZES = {"train_composed": 200, "heldout_composed": 150}  # unique problems, one wording each
COMPOSED_SEED_OFFSET = 1000  # the composed splits draw from their own generator: the others stay as they were


def compositions() -> list[tuple[str, str, str]]:
    """All valid (aggregate, transform, condition) triples."""
    return [(a, t, c) for a in AGGREGATES for t in TRANSFORMS for c in CONDITIONS
            if a != "count" or t == "numbers"]


def problems(composition: tuple[str, str, str]) -> list[tuple]:
    """Every concrete problem (composition, k, variable) of one composition."""
    cond = composition[2]
    ks = K_VALUES if "{k}" in CONDITIONS[cond][1] else (None,)
    return [(composition, k, v) for k in ks for v in VARIABLES]


def function_name(composition: tuple[str, ...], k: int | None) -> str:
    """``sum_squares_even``, ``max_gt_3``; a composed problem names both conditions: ``sum_even_lt_4``."""
    agg, transform, *conditions = composition
    parts = [agg] + ([] if transform == "numbers" else [transform]) + conditions + ([str(k)] if k else [])
    return "_".join(parts)


def condition(cond: str, k: int | None) -> tuple[str, str]:
    """(phrase, Python condition on x) of a condition, its ``{k}`` filled in."""
    return tuple(part.format(k=k) for part in CONDITIONS[cond])


def render(problem: tuple, phrasing: int) -> tuple[str, str, str]:
    """(spec, reference solution, function name) of a problem."""
    (agg, transform, cond), k, v = problem
    cond_phrase, cond_code = condition(cond, k)
    expr = TRANSFORMS[transform][1]
    name = function_name((agg, transform, cond), k)
    body = AGGREGATES[agg][1].format(e=expr, v=v, c=cond_code)
    solution = f"def {name}({v}):\n    return {body}\n"
    return PHRASINGS[phrasing].format(name=name, v=v, spec=spec_text(agg, transform, v, cond_phrase)), solution, name


def spec_text(agg: str, transform: str, v: str, cond_phrase: str) -> str:
    """What the function returns, in words: ``the sum of the squares of the numbers in xs that are even``."""
    agg_phrase, trans_phrase = AGGREGATES[agg][0], TRANSFORMS[transform][0]
    spec = f"{agg_phrase} {'the numbers' if agg == 'count' else trans_phrase} in {v} that are {cond_phrase}"
    return spec + (", or 0 if there are none" if agg in ("max", "min") else "")


def composed_problems(heldout: bool) -> list[tuple]:
    """Every composed problem ((aggregate, transform, first, second), k, variable) whose condition pair is
    (``heldout``) or is not in :data:`HELDOUT_CONDITION_PAIRS`, and whose two conditions together select
    something that neither selects alone (not *even and divisible by 4*, not *negative and greater than 3*)."""
    return [((a, t, c1, c2), k, v) for a in AGGREGATES for t in TRANSFORMS if a != "count" or t == "numbers"
            for c1 in FIRST_CONDITIONS for c2 in SECOND_CONDITIONS
            if ((c1, c2) in HELDOUT_CONDITION_PAIRS) == heldout for k in K_VALUES if _both_matter(c1, c2, k)
            for v in VARIABLES]


def _both_matter(c1: str, c2: str, k: int, values=range(-9, 13)) -> bool:
    first, second = (eval(f"lambda x: {condition(c, k)[1]}") for c in (c1, c2))  # our own code
    both = {x for x in values if first(x) and second(x)}
    return bool(both) and both != {x for x in values if first(x)} and both != {x for x in values if second(x)}


def render_composed(problem: tuple, phrasing: int, only: int | None = None) -> tuple[str, str, str]:
    """(spec, reference solution, function name) of a composed problem; ``only`` (0 or 1) keeps just
    that condition in the code: the partial answer its tests must reject."""
    (agg, transform, c1, c2), k, v = problem
    (p1, code1), (p2, code2) = condition(c1, k), condition(c2, k)
    name = function_name(problem[0], k)
    kept = {None: f"{code1} and {code2}", 0: code1, 1: code2}[only]
    body = AGGREGATES[agg][1].format(e=TRANSFORMS[transform][1], v=v, c=kept)
    spec = PHRASINGS[phrasing].format(name=name, v=v, spec=spec_text(agg, transform, v, f"{p1} and {p2}"))
    return spec, f"def {name}({v}):\n    return {body}\n", name


def make_tests(solution: str, name: str, rng: random.Random) -> list[str]:
    """``assert`` lines whose expected values come from running the reference solution."""
    inputs = [[]] + [[rng.randint(-9, 12) for _ in range(rng.randint(3, 8))] for _ in range(N_TESTS - 1)]
    return [f"assert {name}({xs!r}) == {e!r}" for xs, e in zip(inputs, _results(solution, name, inputs))]


def _results(solution: str, name: str, inputs: list[list[int]]) -> list:
    """What the reference ``solution`` returns on each input."""
    namespace: dict = {}
    exec(solution, namespace)  # our own generated reference code, never model output
    return [namespace[name](xs) for xs in inputs]


def composed_tests(problem: tuple, rng: random.Random, tries: int = 50) -> list[str] | None:
    """``assert`` lines for a composed problem whose inputs tell the reference from both one-condition
    versions (each fails at least one), and give a non-default answer on at least two inputs; None when
    ``tries`` draws find no such inputs (the largest square of the odd multiples of 7 is 49 either way)."""
    _, solution, name = render_composed(problem, 0)
    partials = [render_composed(problem, 0, only)[1] for only in (0, 1)]
    for _ in range(tries):
        inputs = [[]] + [[rng.randint(-9, 12) for _ in range(rng.randint(4, 9))] for _ in range(N_TESTS - 1)]
        expected = _results(solution, name, inputs)
        if (sum(e != expected[0] for e in expected[1:]) >= 2
                and all(_results(p, name, inputs) != expected for p in partials)):
            return [f"assert {name}({xs!r}) == {e!r}" for xs, e in zip(inputs, expected)]
    return None


def composed_rows(split: str, seed: int) -> list[dict]:
    """The ``train_composed`` or ``heldout_composed`` rows (:data:`COMPOSED_SIZES` problems)."""
    rng = random.Random(seed + COMPOSED_SEED_OFFSET + (split == "heldout_composed"))
    candidates = composed_problems(split == "heldout_composed")
    rng.shuffle(candidates)
    rows = []
    for problem in candidates:
        if len(rows) == COMPOSED_SIZES[split]:
            break
        if (tests := composed_tests(problem, rng)) is None:
            continue
        spec, solution, name = render_composed(problem, rng.randrange(len(PHRASINGS)))
        rows.append(chat_row("code", split, len(rows), spec, solution, entry_point=name,
                             composition="/".join(problem[0]), tests=tests))
    return rows


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
    return out | {split: composed_rows(split, seed) for split in COMPOSED_SIZES}


_FENCE = re.compile(r"```(?:python)?\n(.*?)(?:```|$)", re.S)


def extract_code(completion: str) -> str:
    """The code in a completion: the first fenced block if there is one, else the whole text."""
    match = _FENCE.search(completion)
    return match.group(1) if match else completion


def score(rows: Sequence[dict], completions: Sequence[str]) -> list[bool]:
    """pass@1 verdicts: each completion must pass all of its row's tests inside the sandbox."""
    return run_tests_batch([extract_code(c) for c in completions], [r["tests"] for r in rows])


TASK = Task(name="code", format="chat", generate=generate, score=score, max_new_tokens=64)
