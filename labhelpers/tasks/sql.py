"""The ``sql`` task: a question about a company database -> one SQLite query.

The database (one ``employees`` table, seeded rows) is built by :func:`build_database`; its SQL text
is also written to ``data/sql_company.sql`` by ``make data``. Questions compose a *target* (count,
average/max/min/sum of a column, names) with a *filter* (department, city, age or salary
threshold). Every question carries the table's columns on its first line (:data:`PROMPT_SCHEMA`):
a real model cannot know the table otherwise, and a text-to-SQL prompt states its schema. Scoring is
execution accuracy: the predicted query and the gold query run on the real
database (read-only, time-limited, SELECT only) and their result multisets must be equal.
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
    suffix, where = (s.format(x=value) for s in FILTERS[filt])
    question = f"{prefix} {suffix}?" if target != "names" else f"{prefix} {suffix}."
    return f"{PROMPT_SCHEMA}\n{question}", f"SELECT {select} FROM employees WHERE {where};"


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Deterministic train/validation/test rows of the SQL task."""
    keys = [(t, f, v) for t in TARGETS for f in FILTERS for v in FILTER_VALUES[f]]
    splits = split_keys(keys, SPLIT_SIZES, seed)
    out = {}
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
