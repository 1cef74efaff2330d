"""The ``sql`` task: a question about a company database -> one SQLite query.

The database (one ``employees`` table, seeded rows) is built by :func:`build_database`; its SQL text
is also written to ``data/sql_company.sql`` by ``make data``. Questions compose a *target* (count,
average/max/min/sum of a column, names) with a *filter* (department, city, age or salary
threshold). Every question carries the table's columns on its first line (:data:`PROMPT_SCHEMA`):
a real model cannot know the table otherwise, and a text-to-SQL prompt states its schema. Scoring is
execution accuracy: the predicted query and the gold query run on the real
database (read-only, time-limited, SELECT only) and their result multisets must be equal.

Three harder *forms* (:data:`COMPOSED_FORMS`) compose more: two filters joined by AND, an aggregate
per department or city (GROUP BY), and the departments or cities whose count passes a threshold
(GROUP BY ... HAVING). The ``train_composed`` split teaches some combinations of each form (a run adds
it to ``train``: the real model's runs do; the tiny model's ``ci`` labs were calibrated on ``train``
alone, and two of their claims fail with it); the other combinations (:func:`is_heldout_combination`)
are asked only by the ``heldout`` slice, which therefore measures whether a model composes what it was
taught: the real pretrained model reaches 1.00 on the test split after a short run, and stays below
that here (docs/real-model.md). A composed problem whose gold result
is empty, a lone zero, or equal to what the same query without its new part returns is left out: such
an answer could not tell a composed query from a partial one.
"""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from functools import lru_cache
from typing import Sequence

import pandas as pd

from labhelpers.tasks.base import Task, chat_row, split_keys

SCHEMA = ("CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT NOT NULL, department TEXT NOT NULL, "
          "city TEXT NOT NULL, age INTEGER NOT NULL, salary INTEGER NOT NULL);")
PROMPT_SCHEMA = "Table employees(id, name, department, city, age, salary)."  # first line of every question
DEPARTMENTS = ("Sales", "Engineering", "Marketing", "Finance", "Support", "Legal")
CITIES = ("Paris", "Berlin", "Madrid", "Rome", "Vienna", "Oslo")
FIRST_NAMES = ("Ana", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jon", "Kim", "Lea",
               "Max", "Nia", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vera", "Wes", "Yan", "Zoe")
N_EMPLOYEES = 240
DB_SEED = 1234

TARGETS = {  # name -> (question prefix, SELECT expression)
    "count": ("How many employees", "COUNT(*)"),
    "avg_salary": ("What is the average salary of employees", "AVG(salary)"),
    "max_salary": ("What is the highest salary of employees", "MAX(salary)"),
    "min_age": ("What is the lowest age of employees", "MIN(age)"),
    "sum_salary": ("What is the total salary of employees", "SUM(salary)"),
    "names": ("List the names of employees", "name"),
}
FILTERS = {  # name -> (question suffix, WHERE clause), {x} is the value
    "dept": ("in the {x} department", "department = '{x}'"),
    "city": ("based in {x}", "city = '{x}'"),
    "older": ("older than {x}", "age > {x}"),
    "younger": ("younger than {x}", "age < {x}"),
    "earn_more": ("earning more than {x}", "salary > {x}"),
    "earn_less": ("earning less than {x}", "salary < {x}"),
}
FILTER_VALUES = {
    "dept": DEPARTMENTS, "city": CITIES,
    "older": tuple(range(22, 64, 2)), "younger": tuple(range(22, 64, 2)),
    "earn_more": tuple(range(30000, 125001, 5000)), "earn_less": tuple(range(30000, 125001, 5000)),
}
SPLIT_SIZES = {"train": 400, "validation": 34, "test": 130}  # all 564 unique problems
COMPOSED_FORMS = ("and", "group", "having")
COMPOSED_PER_FORM = {"train_composed": 50, "heldout": 50}  # sampled problems of each form
GROUP_KEYS = ("department", "city")
THRESHOLD_FILTERS = ("older", "younger", "earn_more", "earn_less")  # paired after a dept or city filter
HAVING_COUNTS = (3, 5, 7)
TRAIN_REPEATS = 2  # each train problem appears twice (800 train rows)


def database_rows(seed: int = DB_SEED) -> list[tuple]:
    """The seeded employee rows (id, name, department, city, age, salary)."""
    rng = random.Random(seed)
    return [(i + 1, f"{rng.choice(FIRST_NAMES)} {chr(65 + rng.randrange(26))}.", rng.choice(DEPARTMENTS),
             rng.choice(CITIES), rng.randint(21, 65), rng.randrange(25000, 130001, 500))
            for i in range(N_EMPLOYEES)]


def database_sql() -> str:
    """The database as SQL text: the schema then one INSERT per row (what ``make data`` writes)."""
    lines = [SCHEMA] + [f"INSERT INTO employees VALUES ({i}, '{n}', '{d}', '{c}', {a}, {s});"
                        for i, n, d, c, a, s in database_rows()]
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=1)
def build_database() -> sqlite3.Connection:
    """An in-memory SQLite database with the task's table, shared read-only by the scorer."""
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.executescript(database_sql())
    conn.execute("PRAGMA query_only = ON")
    return conn


def render(problem: tuple[str, str, object]) -> tuple[str, str]:
    """(prompt, gold SQL) of a (target, filter, value) problem; the prompt is the schema line, then the
    question."""
    target, filt, value = problem
    prefix, select = TARGETS[target]
    suffix, where = _clause(filt, value)
    question = f"{prefix} {suffix}?" if target != "names" else f"{prefix} {suffix}."
    return f"{PROMPT_SCHEMA}\n{question}", f"SELECT {select} FROM employees WHERE {where};"


def _clause(filt: str, value) -> tuple[str, str]:
    """(question suffix, WHERE clause) of a filter, its value filled in."""
    return tuple(part.format(x=value) for part in FILTERS[filt])


def composed_problems() -> dict[str, list[tuple]]:
    """Every problem of each of the :data:`COMPOSED_FORMS` (before the filter and sampling):
    ``and``: (target, (filter, value), (filter, value)); ``group``: (target, key, (filter, value));
    ``having``: (key, count, (filter, value))."""
    thresholds = [(f, v) for f in THRESHOLD_FILTERS for v in FILTER_VALUES[f]]
    equal = [(f, v) for f in ("dept", "city") for v in FILTER_VALUES[f]]
    aggregates = [t for t in TARGETS if t != "names"]
    return {"and": [(t, a, b) for t in TARGETS for a in equal for b in thresholds],
            "group": [(t, k, b) for t in aggregates for k in GROUP_KEYS for b in thresholds],
            "having": [(k, n, b) for k in GROUP_KEYS for n in HAVING_COUNTS for b in thresholds]}


def is_heldout_combination(form: str, problem: tuple) -> bool:
    """Whether only the ``heldout`` slice asks this combination: for ``and``, a department with a salary
    threshold or a city with an age threshold (train pairs them the other way); for ``group``, the
    highest salary or the lowest age (train groups counts, averages and totals); for ``having``, the
    younger-than and earning-less-than filters (train uses older-than and earning-more-than)."""
    if form == "and":
        return (problem[1][0], problem[2][0]) in {("dept", "earn_more"), ("dept", "earn_less"),
                                                  ("city", "older"), ("city", "younger")}
    if form == "group":
        return problem[0] in ("max_salary", "min_age")
    if form == "having":
        return problem[2][0] in ("younger", "earn_less")
    raise ValueError(f"unknown composed form {form!r}; valid: {', '.join(COMPOSED_FORMS)}")


def render_composed(kind: str, problem: tuple) -> tuple[str, str, str]:
    """(prompt, gold SQL, shortcut SQL) of a composed problem of form ``kind`` (:func:`composed_problems`). The
    shortcut drops what is new (the first filter of ``and``, the grouping, the HAVING clause): a problem
    whose gold result equals the shortcut's would not tell a composed answer from a partial one."""
    if kind == "and":
        target, a, b = problem
        prefix, select = TARGETS[target]
        (sa, wa), (sb, wb) = _clause(*a), _clause(*b)
        question = f"{prefix} {sa} and {sb}" + ("." if target == "names" else "?")
        sql = f"SELECT {select} FROM employees WHERE {wa} AND {wb};"
        shortcut = f"SELECT {select} FROM employees WHERE {wb};"
    elif kind == "group":
        target, key, b = problem
        prefix, select = TARGETS[target]
        suffix, where = _clause(*b)
        question = f"For each {key}: {prefix[0].lower()}{prefix[1:]} {suffix}? Give the {key} and the value."
        sql = f"SELECT {key}, {select} FROM employees WHERE {where} GROUP BY {key};"
        shortcut = f"SELECT {select} FROM employees WHERE {where};"
    elif kind == "having":
        key, count, b = problem
        suffix, where = _clause(*b)
        plural = "departments" if key == "department" else "cities"
        question = f"Which {plural} have more than {count} employees {suffix}?"
        shortcut = f"SELECT {key} FROM employees WHERE {where} GROUP BY {key}"
        sql, shortcut = f"{shortcut} HAVING COUNT(*) > {count};", f"{shortcut};"
    else:
        raise ValueError(f"unknown composed form {kind!r}; valid: {', '.join(COMPOSED_FORMS)}")
    return f"{PROMPT_SCHEMA}\n{question}", sql, shortcut


def _informative(sql: str, shortcut: str) -> bool:
    """A gold query whose result can tell answers apart: not empty, not a lone zero or NULL, and not
    the shortcut's result."""
    result = run_query(sql)
    return bool(result) and result not in ([(0,)], [(None,)]) and Counter(result) != Counter(run_query(shortcut))


def composed_rows(split: str, seed: int) -> list[tuple[str, str, str]]:
    """(question, gold SQL, form) of :data:`COMPOSED_PER_FORM` sampled problems of each form: combinations
    :func:`is_heldout_combination` gives to ``heldout``, the others to ``train_composed``."""
    rng, rows = random.Random(seed), []
    for form, problems in composed_problems().items():
        mine = [p for p in problems if is_heldout_combination(form, p) == (split == "heldout")]
        usable = [(q, sql) for q, sql, shortcut in (render_composed(form, p) for p in mine)
                  if _informative(sql, shortcut)]
        rows += [(q, sql, form) for q, sql in rng.sample(usable, min(COMPOSED_PER_FORM[split], len(usable)))]
    return rows


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Deterministic train/validation/test rows of the SQL task, ``train_composed`` (composed problems to
    add to train) and the ``heldout`` slice of composed combinations that no other split asks."""
    keys = [(t, f, v) for t in TARGETS for f in FILTERS for v in FILTER_VALUES[f]]
    splits = split_keys(keys, SPLIT_SIZES, seed)
    out = {split: [chat_row("sql", split, i, q, gold, gold_sql=gold, composition=form)
                   for i, (q, gold, form) in enumerate(composed_rows(split, seed))] for split in COMPOSED_PER_FORM}
    for split, items in splits.items():
        rows = []
        for problem in items * (TRAIN_REPEATS if split == "train" else 1):
            question, gold = render(problem)
            rows.append(chat_row("sql", split, len(rows), question, gold, gold_sql=gold,
                                 composition=f"{problem[0]}/{problem[1]}"))
        if split == "train":
            random.Random(seed).shuffle(rows)
        out[split] = rows
    return out


def run_query(sql: str, timeout_steps: int = 200_000) -> list[tuple] | None:
    """Rows of a read-only query, or None if it is not a valid, terminating, single SELECT."""
    if not sql.strip():
        return None
    conn = build_database()

    def deny_writes(action, *_):
        allowed = (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION)
        return sqlite3.SQLITE_OK if action in allowed else sqlite3.SQLITE_DENY

    steps = {"n": 0}

    def budget():
        steps["n"] += 1
        return 1 if steps["n"] > timeout_steps // 1000 else 0  # non-zero aborts the query

    conn.set_authorizer(deny_writes)
    conn.set_progress_handler(budget, 1000)
    try:
        return conn.execute(sql.strip()).fetchall()
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
        return None
    finally:
        conn.set_authorizer(None)
        conn.set_progress_handler(None, 0)


def extract_sql(completion: str) -> str:
    """The first statement of a completion: text up to and including the first ``;``."""
    text = completion.strip().removeprefix("```sql").removeprefix("```").strip()
    return text.split(";")[0] + ";" if text else ""


def score(rows: Sequence[dict], completions: Sequence[str]) -> list[bool]:
    """Execution accuracy: predicted and gold results must be equal as multisets of rows."""
    verdicts = []
    for row, completion in zip(rows, completions, strict=True):
        predicted = run_query(extract_sql(completion))
        gold = run_query(row["gold_sql"])
        verdicts.append(predicted is not None and Counter(predicted) == Counter(gold))
    return verdicts


TASK = Task(name="sql", format="chat", generate=generate, score=score, max_new_tokens=48)


def format_report(completions: Sequence[str]):
    """Response quality per completion, as a DataFrame:

    * ``valid_sql``: its first statement runs on the database (whether or not the answer is right);
    * ``no_chatter``: nothing follows that statement (no explanation, no second query).
    """
    return pd.DataFrame({
        "valid_sql": [run_query(extract_sql(c)) is not None for c in completions],
        "no_chatter": [c.strip().endswith(";") and c.strip().count(";") == 1 for c in completions],
    })
