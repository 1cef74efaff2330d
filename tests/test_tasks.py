"""Task generators and scorers: deterministic, disjoint splits, references score as correct."""

import filecmp
import random

import pytest

from labhelpers.paths import data_dir
from labhelpers.tasks import TASKS, arithmetic, code, corpus, get_task, load_split, load_splits, read_jsonl, sql, write_all


def _prompt(row):
    return row["messages"][0]["content"] if "messages" in row else row["prompt"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_do_not_overlap(task):
    splits = TASKS[task].generate(0)
    prompts = {name: {_prompt(r) for r in rows} for name, rows in splits.items()}
    names = sorted(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not prompts[a] & prompts[b], f"{task}: {a} and {b} share prompts"
    assert all(len(rows) > 0 for rows in splits.values())


def test_code_problems_are_disjoint_across_wordings():
    # the same problem must not reach test in another wording: compare the reference solutions
    splits = code.generate(0)
    solutions = {n: {r["messages"][1]["content"] for r in rows} for n, rows in splits.items()}
    assert not solutions["train"] & solutions["test"]
    assert not solutions["train"] & solutions["validation"]


def test_heldout_compositions_never_seen_elsewhere():
    splits = code.generate(0)
    held = {"/".join(c) for c in code.HELDOUT_COMPOSITIONS}
    assert {r["composition"] for r in splits["heldout"]} <= held
    for name in ("train", "validation", "test"):
        assert not {r["composition"] for r in splits[name]} & held
    # every part of a held-out composition is still trained on
    train_parts = [set(r["composition"].split("/")) for r in splits["train"]]
    for composition in code.HELDOUT_COMPOSITIONS:
        for part in composition:
            assert any(part in parts for parts in train_parts)


def test_sql_heldout_asks_composed_combinations_that_train_never_does():
    """train_composed teaches each composed form (AND, GROUP BY, HAVING) on some combinations; the heldout
    slice asks only the others, and train, validation and test ask none. Every held-out reference is right, and the same
    query without its new part (the first filter, the grouping, the HAVING clause) is wrong."""
    splits = sql.generate(0)
    forms = set(sql.COMPOSED_FORMS)
    assert {r["composition"] for r in splits["heldout"]} == forms
    assert {r["composition"] for r in splits["train_composed"]} == forms
    assert not forms & {r["composition"] for r in splits["train"] + splits["validation"] + splits["test"]}
    rendered = {sql.render_composed(form, p)[1]: (form, p, sql.render_composed(form, p)[2])
                for form, problems in sql.composed_problems().items() for p in problems}
    for split, heldout in (("train_composed", False), ("heldout", True)):
        for row in splits[split]:
            form, problem, _ = rendered[row["gold_sql"]]
            assert sql.is_heldout_combination(form, problem) is heldout, (split, row["gold_sql"])
    rows = splits["heldout"]
    assert len(rows) >= 140 and all(sql.score(rows, [r["gold_sql"] for r in rows]))
    assert not any(sql.score(rows, [rendered[r["gold_sql"]][2] for r in rows]))
    with pytest.raises(ValueError, match="unknown composed form 'join'; valid: and, group, having"):
        sql.render_composed("join", ())


def test_code_composed_pairs_are_held_out_and_partial_answers_fail():
    """Two conditions at once: train_composed teaches some pairs, heldout_composed asks only the others;
    every reference passes its tests, and each one-condition version of it fails them."""
    splits = code.generate(0)
    pairs = {split: {tuple(r["composition"].split("/")[2:]) for r in splits[split]}
             for split in ("train_composed", "heldout_composed")}
    assert pairs["heldout_composed"] <= set(code.HELDOUT_CONDITION_PAIRS)
    assert not pairs["train_composed"] & set(code.HELDOUT_CONDITION_PAIRS) and len(pairs["train_composed"]) >= 6
    for name in ("train", "validation", "test", "heldout"):
        assert all(r["composition"].count("/") == 2 for r in splits[name]), name
    rows = splits["heldout_composed"][:40]
    assert len(splits["heldout_composed"]) == code.COMPOSED_SIZES["heldout_composed"]
    assert all(code.score(rows, [r["messages"][-1]["content"] for r in rows]))
    by_name = {code.render_composed(p, 0)[2]: p for p in code.composed_problems(True)}
    for only in (0, 1):
        partial = [code.render_composed(by_name[r["entry_point"]], 0, only)[1] for r in rows]
        assert not any(code.score(rows, partial)), only


def test_generation_is_deterministic_and_seeded():
    assert code.generate(0) == code.generate(0)
    assert sql.generate(0) == sql.generate(0)
    assert code.generate(1)["test"] != code.generate(0)["test"]


def test_make_data_is_byte_identical(tmp_path):
    written = write_all(tmp_path)
    assert written
    for path in written:
        shipped = data_dir() / path.relative_to(tmp_path)
        assert shipped.exists(), f"{shipped} is not shipped; run make data and commit it"
        assert filecmp.cmp(path, shipped, shallow=False), f"{shipped} differs from a fresh `make data`"


def test_code_references_pass_and_wrong_answers_fail():
    rows = list(load_split("code", "test", 40))
    references = [r["messages"][-1]["content"] for r in rows]
    assert all(code.score(rows, references))
    wrong = [ref.replace("return ", "return 1 + ", 1) if "[" not in ref else ref.replace("if", "if not", 1)
             for ref in references]
    assert not any(code.score(rows, wrong))
    assert code.score(rows[:2], ["```python\n" + references[0] + "```", "not python at all"]) == [True, False]


def test_code_heldout_references_pass():
    rows = list(load_split("code", "heldout"))
    assert len(rows) >= 100
    assert all(code.score(rows, [r["messages"][-1]["content"] for r in rows]))


def test_sql_execution_accuracy():
    rows = list(load_split("sql", "test"))
    golds = [r["gold_sql"] for r in rows]
    assert all(sql.score(rows, golds))
    # equivalent query with a different text still counts; a different result does not
    row = rows[0]
    equivalent = row["gold_sql"].replace("SELECT", "select").replace(";", " ;")
    assert sql.score([row], [equivalent]) == [True]
    assert sql.score([row], ["SELECT 42;"]) == [False]


@pytest.mark.parametrize("attack", ["DROP TABLE employees;", "DELETE FROM employees;",
                                    "INSERT INTO employees VALUES (999, 'x', 'y', 'z', 1, 1);",
                                    "ATTACH DATABASE '/tmp/x.db' AS x;", "PRAGMA query_only = OFF;",
                                    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                                    "SELECT COUNT(*) FROM c;", "SELECT", ""])
def test_sql_scorer_rejects_writes_and_runaways(attack):
    assert sql.run_query(attack) is None
    assert sql.run_query("SELECT COUNT(*) FROM employees;") == [(sql.N_EMPLOYEES,)]


def test_sql_database_dump_is_shipped():
    assert (data_dir() / "sql" / "company.sql").read_text() == sql.database_sql()


def test_arithmetic_probe_scoring():
    rows = list(load_split("arithmetic", "test"))
    assert len(rows) == arithmetic.SPLIT_SIZES["test"]
    assert all(arithmetic.score(rows, [r["completion"] for r in rows]))
    assert arithmetic.score(rows[:1], [f" {rows[0]['answer'] + 1}"]) == [False]
    assert arithmetic.score(rows[:1], [" "]) == [False]


def test_corpus_heldout_is_disjoint_and_mixed():
    train = read_jsonl(data_dir() / "corpus" / "train.jsonl")
    heldout = read_jsonl(data_dir() / "corpus" / "heldout.jsonl")
    assert len(train) == corpus.N_DOCUMENTS and len(heldout) == corpus.HELDOUT_DOCUMENTS
    assert not {d["text"] for d in train} & {d["text"] for d in heldout}
    assert {d["kind"] for d in train} == set(corpus.MIX)


def test_corpus_never_contains_task_spec_wording_or_heldout_code():
    texts = " ".join(d["text"] for d in read_jsonl(data_dir() / "corpus" / "train.jsonl"))
    assert "Write a Python function" not in texts and "FROM employees" not in texts
    for composition in code.HELDOUT_COMPOSITIONS:
        name = code.function_name(composition, None)
        assert f"def {name}(" not in texts and f"def {name}_" not in texts


def test_unknown_task_and_split_errors():
    with pytest.raises(KeyError, match="valid tasks"):
        get_task("poetry")
    with pytest.raises(FileNotFoundError, match="make data"):
        load_split("code", "nonexistent")


def test_load_splits_concatenates_in_order_and_a_repeated_split_counts_twice():
    train, composed = load_split("code", "train"), load_split("code", "train_composed")
    both = load_splits("code", ["train", "train_composed", "train_composed"])
    assert len(both) == len(train) + 2 * len(composed)
    assert both[0]["id"] == train[0]["id"] and both[len(train)]["id"] == both[len(train) + len(composed)]["id"]
    for bad in ("train", []):
        with pytest.raises(ValueError, match="non-empty sequence of split names"):
            load_splits("code", bad)
    with pytest.raises(FileNotFoundError, match="make data"):
        load_splits("code", ["train", "nonexistent"])


def test_split_keys_refuses_impossible_sizes():
    from labhelpers.tasks.base import split_keys

    with pytest.raises(ValueError, match="unique"):
        split_keys(range(3), {"train": 2, "test": 2}, seed=0)
    parts = split_keys(range(10), {"a": 4, "b": 6}, seed=random.randrange(100))
    assert sorted(parts["a"] + parts["b"]) == list(range(10))


def test_every_sql_question_names_the_tables_columns():
    """A real model cannot know the table: each prompt's first line names it with its columns, the
    columns the database really has, in order."""
    columns = [r[1] for r in sql.build_database().execute("PRAGMA table_info(employees)").fetchall()]
    assert sql.PROMPT_SCHEMA == f"Table employees({', '.join(columns)})."
    for split in ("train", "validation", "test", "train_composed", "heldout"):
        for row in load_split("sql", split):
            schema, question = row["messages"][0]["content"].split("\n", 1)
            assert schema == sql.PROMPT_SCHEMA and question.endswith(("?", "."))
