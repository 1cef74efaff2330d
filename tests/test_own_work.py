"""A solution that delegates to the course's reference implementation scores zero: the guard itself,
and every exercise's hidden test run against its real solution and against a delegating one."""

from __future__ import annotations

import ast
import functools
import json
import math

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from helpers import SOLUTION_NOTEBOOKS
from labhelpers import adapters, continual, data, hyperparameters, lora, merging, profiles, quantization
from labhelpers.course.own_work import DelegationError, own_work
from labhelpers.labs import lab1, lab1b, lab2, lab3, lab4


def _notebook(code: str, **names) -> dict:
    """Run ``code`` as a notebook cell would: its functions are defined in ``__main__``."""
    namespace = {"__name__": "__main__", "torch": torch, "nn": nn, "merging": merging, **names}
    exec(code, namespace)
    return namespace


HONEST = "def ties(base, experts, density, lam):\n    return base + lam * sum(e - base for e in experts)\n"
CALL = "ties(torch.zeros(3), [torch.ones(3)], 0.5, 1.0)"


@pytest.mark.parametrize("solution", [
    "def ties(base, experts, density, lam):\n    return merging.ties(base, experts, density, lam=lam)\n",
    "from labhelpers.merging import ties as reference\n"
    "def ties(base, experts, density, lam):\n    return reference(base, experts, density, lam=lam)\n",
    "def ties(base, experts, density, lam):\n    return merging.maths.ties(base, experts, density, lam=lam)\n",
], ids=["module attribute", "imported name", "defining module"])
def test_a_call_to_the_reference_raises_inside_the_block_only(solution):
    ns = _notebook(solution)
    with pytest.raises(DelegationError, match="ties calls labhelpers.merging.maths.ties"):
        with own_work(ns["ties"], merging.ties):
            eval(CALL, ns)
    assert torch.equal(eval(CALL, ns), merging.ties(torch.zeros(3), [torch.ones(3)], 0.5))  # restored
    assert merging.ties is merging.maths.ties


def test_aliases_partials_and_subclasses_of_a_reference_fail_before_the_call():
    aliased = _notebook("ties = merging.ties\n")
    with pytest.raises(DelegationError, match="is labhelpers.merging.maths.ties itself"):
        with own_work(aliased["ties"], merging.ties):
            pass
    with pytest.raises(DelegationError, match="must be a function"):
        with own_work(functools.partial(merging.ties, lam=1.0), merging.ties):
            pass
    with pytest.raises(DelegationError, match="not from this notebook"):
        with own_work(merging.slerp, merging.ties):
            pass
    sub = _notebook("class Layer(Reference):\n    pass\n", Reference=nn.Linear)
    with pytest.raises(DelegationError, match="subclasses torch.nn.modules.linear.Linear"):
        with own_work(sub["Layer"], nn.Linear):
            pass


def test_honest_code_runs_unchanged_inside_the_block():
    ns = _notebook(HONEST)
    with own_work(ns["ties"], merging.ties, merging.elect_and_merge):
        out = eval(CALL, ns)
    assert torch.equal(out, torch.ones(3))


# ------------------------------------------------------------------------------------ every exercise

def _hidden_guards():
    """(lab, test cell id, exercise name, guard source, imports source, solution cell source) per hidden test."""
    found = []
    for path in SOLUTION_NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        solutions = {}
        for cell in cells:
            meta = cell["metadata"].get("nbgrader", {})
            source = "".join(cell["source"])
            if meta.get("solution") and cell["cell_type"] == "code":
                for node in ast.parse(source).body:
                    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                        solutions[node.name] = source
            if "### BEGIN HIDDEN TESTS" in source:
                tree = ast.parse(source)
                guards = [node for node in ast.walk(tree) if isinstance(node, ast.With)
                          and getattr(node.items[0].context_expr.func, "id", "") == "own_work"]
                imports = "\n".join(ast.get_source_segment(source, n) for n in tree.body
                                    if isinstance(n, (ast.Import, ast.ImportFrom)))
                found.append((path.stem, meta.get("grade_id"), guards, source, imports, solutions))
    return found


HIDDEN = _hidden_guards()


def test_every_hidden_test_guards_its_exercise():
    assert len(HIDDEN) >= 15
    unguarded = [(lab, grade_id) for lab, grade_id, guards, *_ in HIDDEN if len(guards) != 1]
    assert not unguarded, f"hidden tests without one own_work(...) block: {unguarded}"


@pytest.mark.parametrize("lab, grade_id, guards, source, imports, solutions", HIDDEN,
                         ids=[f"{h[0]}-{h[1]}" for h in HIDDEN])
def test_the_solution_passes_and_a_delegating_one_scores_zero(lab, grade_id, guards, source, imports, solutions,
                                                              tokenizer):
    guard = guards[0]
    call = guard.items[0].context_expr
    exercise, references = call.args[0].id, [ast.unparse(arg) for arg in call.args[1:]]
    block = ast.get_source_segment(source, guard)
    names = dict(np=np, math=math, adapters=adapters, continual=continual, data=data, lora=lora,
                 quantization=quantization, hyperparameters=hyperparameters, optuna=optuna, lab1=lab1, lab1b=lab1b, lab2=lab2, lab3=lab3, lab4=lab4, own_work=own_work,
                 tokenizer=tokenizer, profile=profiles.get("ci"), conversation=[{"role": "user", "content": "How many employees?"},
                                                    {"role": "assistant", "content": "SELECT COUNT(*) FROM employees;"}])
    ns = _notebook(imports + "\n" + solutions[exercise], **names)
    exec(block, ns)  # the real solution runs inside the guard
    if not references:
        return  # nothing in the course implements this exercise (the bottleneck adapter)
    delegating = _notebook(imports + f"\ndef {exercise}(*args, **kwargs):\n    return {references[0]}(*args, **kwargs)\n",
                           **names)
    with pytest.raises(DelegationError, match=f"{exercise} calls"):
        exec(block, delegating)
