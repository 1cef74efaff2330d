"""Test lines judged outside the sandbox: each ``assert`` is split into the parts that touch the
program (probes, evaluated inside and sent back as literals) and the rest (the comparison, the
expected values, safe builtins), evaluated here on those literals."""

from __future__ import annotations

import ast
import builtins
import math
from dataclasses import dataclass
from typing import Sequence


# what an assertion may use outside the sandbox, on the literal values that come back from it
SAFE_NAMES = {name: getattr(builtins, name) for name in (
    "abs", "all", "any", "bool", "bytes", "chr", "complex", "dict", "divmod", "enumerate", "filter", "float",
    "frozenset", "int", "isinstance", "len", "list", "map", "max", "min", "ord", "pow", "range", "repr",
    "reversed", "round", "set", "slice", "sorted", "str", "sum", "tuple", "type", "zip")} | {"math": math}
_STRUCTURAL = (ast.Compare, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.IfExp, ast.List, ast.Tuple, ast.Set, ast.Dict,
               ast.Subscript, ast.Slice, ast.Starred, ast.keyword, ast.JoinedStr, ast.FormattedValue)
_SCOPES = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda)


class TestLineError(ValueError):
    """A test line the sandbox cannot judge outside."""


@dataclass(frozen=True)
class TestPlan:
    """How a test list runs: ``steps`` for the harness, in order (``("run", statement)`` executed inside,
    ``("probe", expression)`` evaluated inside and sent back as a literal), and ``checks``: one
    expression per ``assert``, evaluated outside on the probed values (``_v0``, ``_v1``...)."""

    steps: tuple[tuple[str, str], ...]
    checks: tuple[str, ...]


def _outside(node: ast.AST, bound: frozenset = frozenset()) -> bool:
    """Whether ``node`` can be evaluated outside: literals, safe builtins and ``math``, and the operators
    between them (no name the program defines, no call to its functions)."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Name):
        return node.id in SAFE_NAMES or node.id in bound
    if isinstance(node, ast.Attribute):
        return isinstance(node.value, ast.Name) and node.value.id == "math"
    if isinstance(node, ast.Call):
        return _outside(node.func, bound) and all(_outside(a, bound) for a in [*node.args, *node.keywords])
    if isinstance(node, _SCOPES):
        names = frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
        names |= {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)}
        return all(_outside(child, bound | names) for child in ast.iter_child_nodes(node)
                   if not isinstance(child, (ast.comprehension, ast.arguments))) and all(
            _outside(part, bound | names) for c in getattr(node, "generators", ()) for part in (c.iter, *c.ifs))
    if isinstance(node, (*_STRUCTURAL, ast.expr_context, ast.operator, ast.boolop, ast.unaryop, ast.cmpop)):
        return all(_outside(child, bound) for child in ast.iter_child_nodes(node))
    return False


class _Probes(ast.NodeTransformer):
    """Replace each largest part of an expression that touches the program with a probe ``_v<i>``."""

    def __init__(self, start: int) -> None:
        self.sources: list[str] = []
        self.start = start

    def visit(self, node):
        if _outside(node):
            return node
        if isinstance(node, _SCOPES):
            raise TestLineError("compares inside a comprehension or lambda, which would be judged inside the "
                                "sandbox; write one assert per case")
        if isinstance(node, _STRUCTURAL) or (isinstance(node, ast.Call) and _outside(node.func)):
            return self.generic_visit(node)
        self.sources.append(ast.unparse(node))
        return ast.copy_location(ast.Name(id=f"_v{self.start + len(self.sources) - 1}", ctx=ast.Load()), node)


def plan_tests(tests: Sequence[str]) -> TestPlan:
    """Split a test list into what runs inside and what is judged outside (see the module docstring).

    ``assert <expression>`` lines are judged outside (a message after the comma is ignored); simple
    statements (an assignment, an import, a call) run inside as setup. Raises :class:`TestLineError`,
    naming the line and the fix, for any other form (a loop or ``if`` holding an assert, an assertion
    inside a comprehension)."""
    steps: list[tuple[str, str]] = []
    checks: list[str] = []
    probes = 0
    for line in tests:
        if not line.strip():
            continue
        try:
            body = ast.parse(line.strip()).body
        except SyntaxError as error:
            raise TestLineError(f"test line {line!r} is not valid Python: {error.msg}") from None
        for statement in body:
            if isinstance(statement, ast.Assert):
                try:
                    transformer = _Probes(probes)
                    check = transformer.visit(statement.test)
                except TestLineError as error:
                    raise TestLineError(f"test line {line!r} {error}") from None
                steps += [("probe", source) for source in transformer.sources]
                probes += len(transformer.sources)
                checks.append(ast.unparse(check))
            elif isinstance(statement, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Import, ast.ImportFrom,
                                        ast.Expr, ast.Pass)):
                steps.append(("run", ast.unparse(statement)))
            else:
                raise TestLineError(f"test line {line!r}: its {type(statement).__name__.lower()} statement cannot be "
                                    "judged outside the sandbox; write each check as its own `assert <expression>` line")
    return TestPlan(tuple(steps), tuple(checks))


def read_results(stdout: bytes, n: int) -> list[object] | None:
    """The probed values (``None`` if the harness did not finish): the last ``n`` lines of the output."""
    lines = stdout.decode("utf-8", "replace").rstrip("\n").split("\n")
    block = lines[len(lines) - n:] if n else []
    if len(block) != n:
        return None
    values = []
    for i, line in enumerate(block):
        prefix = f"\x00RESULT {i} "
        if not line.startswith(prefix):
            return None
        try:
            values.append(ast.literal_eval(line[len(prefix):]))
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            return None  # not a literal: it cannot be compared outside
    return values


def judge(checks: Sequence[str], values: Sequence[object]) -> bool:
    """Every assertion on the probed values, outside the sandbox (the expressions are the test list's own)."""
    scope = {"__builtins__": {}, **SAFE_NAMES, **{f"_v{i}": v for i, v in enumerate(values)}}
    try:
        return all(bool(eval(check, scope)) for check in checks)  # noqa: S307 - our test lines, literal values
    except Exception:
        return False
