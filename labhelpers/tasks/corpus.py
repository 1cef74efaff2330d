"""The pretraining corpus of the tiny base model: a small world of arithmetic, code, SQL and prose.

Every document is generated from a seeded grammar:

* **arithmetic** worksheets of single-digit facts (the general skill, see ``tasks.arithmetic``);
* **python** functions in the code task's building blocks, introduced by terse comments (never the
  task's spec wording, and never a held-out composition), plus small generic helpers;
* **sql** queries over a *shop* schema (products, orders), so SQL syntax is known but the task's
  ``employees`` schema is not;
* **prose**: short sentences about people, places and things;
* **office** prose about a company's staff (departments, cities, ages, salaries), so the words of the
  SQL task are known to the base, though never as SQL over an ``employees`` table.

Held-out documents (``heldout.jsonl``) measure perplexity; they never enter pretraining.
"""

from __future__ import annotations

import random
from pathlib import Path

from labhelpers.tasks import arithmetic, code
from labhelpers.tasks.base import write_jsonl
from labhelpers.tasks.sql import CITIES, DEPARTMENTS, FIRST_NAMES

N_DOCUMENTS = 24000
HELDOUT_DOCUMENTS = 600
MIX = {"arithmetic": 0.25, "python": 0.25, "sql": 0.2, "prose": 0.1, "office": 0.2}

NAMES = ("Ana", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jon", "Kim", "Lea")
PLACES = ("the market", "the park", "the library", "the station", "the garden", "the office")
THINGS = ("apples", "books", "letters", "tickets", "flowers", "coins", "maps", "cups")
VERBS = ("buys", "finds", "counts", "sorts", "carries", "paints", "keeps", "sells")
CATEGORIES = ("Toys", "Books", "Garden", "Kitchen", "Music", "Sports")
GENERIC_PY = (
    "def add(a, b):\n    return a + b\n",
    "def is_even(n):\n    return n % 2 == 0\n",
    "def first(xs):\n    return xs[0] if xs else None\n",
    "def last(xs):\n    return xs[-1] if xs else None\n",
    "def total(xs):\n    result = 0\n    for x in xs:\n        result += x\n    return result\n",
    "def reverse(xs):\n    return xs[::-1]\n",
    "def square(x):\n    return x * x\n",
    "def clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n",
)


def arithmetic_doc(rng: random.Random) -> str:
    return "\n".join(arithmetic.fact_line(f) for f in rng.sample(arithmetic.facts(), rng.randint(6, 14)))


def python_doc(rng: random.Random) -> str:
    seen = [c for c in code.compositions() if c not in code.HELDOUT_COMPOSITIONS]
    parts = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.2:
            parts.append(rng.choice(GENERIC_PY))
            continue
        problem = rng.choice([p for p in code.problems(rng.choice(seen))])
        (agg, transform, cond), k, v = problem
        _, solution, _ = code.render(problem, 0)
        words = [agg, transform, cond.replace("gt", ">").replace("lt", "<").replace("div", "mod")]
        parts.append(f"# {' '.join(words)}{f' {k}' if k else ''}\n{solution}")
    return "\n".join(parts)


def sql_doc(rng: random.Random) -> str:
    cat, price = rng.choice(CATEGORIES), rng.randrange(5, 100, 5)
    options = [
        (f"-- products in {cat}", f"SELECT name FROM products WHERE category = '{cat}';"),
        (f"-- number of products under {price}", f"SELECT COUNT(*) FROM products WHERE price < {price};"),
        (f"-- average price of {cat}", f"SELECT AVG(price) FROM products WHERE category = '{cat}';"),
        (f"-- most expensive price over {price}", f"SELECT MAX(price) FROM products WHERE price > {price};"),
        (f"-- total quantity ordered of {cat}",
         f"SELECT SUM(quantity) FROM orders WHERE category = '{cat}';"),
        (f"-- cheapest stock in {cat}", f"SELECT MIN(stock) FROM products WHERE category = '{cat}';"),
        (f"-- products cheaper than {price}", f"SELECT name FROM products WHERE price < {price};"),
        (f"-- count of orders with more than {price % 20 + 2} items",
         f"SELECT COUNT(*) FROM orders WHERE quantity > {price % 20 + 2};"),
        (f"-- lowest price of {cat}", f"SELECT MIN(price) FROM products WHERE category = '{cat}';"),
        (f"-- total stock in {cat}", f"SELECT SUM(stock) FROM products WHERE category = '{cat}';"),
    ]
    return "\n".join(f"{c}\n{q}" for c, q in rng.sample(options, rng.randint(1, 3)))


def prose_doc(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 5)):
        name, verb, n, thing = rng.choice(NAMES), rng.choice(VERBS), rng.randint(2, 9), rng.choice(THINGS)
        sentences.append(f"{name} {verb} {n} {thing} at {rng.choice(PLACES)}.")
    return " ".join(sentences)


def office_doc(rng: random.Random) -> str:
    dept, city = rng.choice(DEPARTMENTS), rng.choice(CITIES)
    age, salary, n = rng.randint(21, 65), rng.randrange(25000, 130001, 500), rng.randint(2, 40)
    name = f"{rng.choice(FIRST_NAMES)} {chr(65 + rng.randrange(26))}."
    options = [
        f"{name} works in the {dept} department and is based in {city}.",
        f"{name} is {age} years old and earns {salary} a year.",
        f"The {dept} department has {n} employees.",
        f"{n} employees are based in {city}.",
        f"{n} employees are older than {age}, and {n // 2 + 1} are younger than {age}.",
        f"{n} employees earn more than {salary}; some earn less than {salary}.",
        f"The average salary in {city} is {salary}.",
        f"The highest salary in {dept} is {salary}, the lowest age there is {age}.",
        f"The total salary of the {dept} team is {salary * n}.",
        f"The names of the {dept} staff are listed in the report from {city}.",
    ]
    return " ".join(rng.sample(options, rng.randint(2, 4)))


GENERATORS = {"arithmetic": arithmetic_doc, "python": python_doc, "sql": sql_doc, "prose": prose_doc,
              "office": office_doc}


def documents(n: int, seed: int) -> list[dict]:
    """``n`` documents ``{"kind", "text"}`` drawn from the mix, deterministic given ``seed``."""
    rng = random.Random(seed)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=n)
    return [{"kind": kind, "text": GENERATORS[kind](rng)} for kind in kinds]


def write_corpus(out_dir: Path, seed: int = 0) -> list[Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl``; held-out documents differ from training ones."""
    docs = documents(N_DOCUMENTS + 4 * HELDOUT_DOCUMENTS, seed)
    train, seen_texts = [], set()
    for doc in docs[:N_DOCUMENTS]:
        train.append(doc)
        seen_texts.add(doc["text"])
    heldout = [d for d in docs[N_DOCUMENTS:] if d["text"] not in seen_texts][:HELDOUT_DOCUMENTS]
    paths = [out_dir / "train.jsonl", out_dir / "heldout.jsonl"]
    write_jsonl(train, paths[0])
    write_jsonl(heldout, paths[1])
    return paths
