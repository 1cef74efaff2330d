"""Hidden tests that check an exercise is the student's own code.

Every lab's reference implementations are one import away (``merging.ties``, ``continual.l2_penalty``,
``quantization.quantize_nf4``...), and a solution that returns the reference's result would pass a test
that only compares results. A hidden test therefore runs one call of the student's code inside
:func:`own_work`::

    with own_work(ties, merging.ties, merging.elect_and_merge):
        ties(base, experts, 0.5, 1.0)

Inside the block, every binding of each reference (a module attribute, a name in the notebook) raises
:class:`DelegationError`, so a solution that calls one fails its test and scores zero; outside the
block nothing changes. The exercise itself must be a function or class written in the notebook: an
alias of a reference, a ``functools.partial`` or a subclass of a reference class fails before the call.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

NOTEBOOK_MODULE = "__main__"  # where a kernel (and `python -c`) defines the cells' functions


class DelegationError(AssertionError):
    """The exercise called (or is) the reference implementation it is compared with."""


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _namespaces(solution: Any) -> list[dict]:
    """Every loaded module's names, and the globals that ``solution``'s code (its methods, for a class)
    looks names up in."""
    spaces: list[dict] = []
    for module in list(sys.modules.values()):
        try:
            spaces.append(vars(module))
        except TypeError:  # a module stand-in without __dict__
            continue
    if inspect.isclass(solution):
        functions = [member for _, member in inspect.getmembers(solution, inspect.isfunction)]
    else:
        functions = [solution]
    return spaces + [f.__globals__ for f in functions]


def check_defined_here(solution: Any, references: tuple = ()) -> None:
    """Raise :class:`DelegationError` unless ``solution`` is a function or class defined in the notebook
    and neither is, nor subclasses, one of ``references``."""
    name = getattr(solution, "__name__", repr(solution))
    if any(solution is ref for ref in references):
        raise DelegationError(f"{name} is {_qualified(solution)} itself: write the exercise yourself")
    if not (inspect.isfunction(solution) or inspect.isclass(solution)):
        raise DelegationError(f"{name} must be a function (def) or a class written in the notebook, "
                              f"got {type(solution).__name__}")
    if solution.__module__ != NOTEBOOK_MODULE:
        raise DelegationError(f"{name} comes from {solution.__module__}, not from this notebook: the exercise "
                              "asks for your own code")
    if inspect.isclass(solution):
        borrowed = [ref for ref in references if inspect.isclass(ref) and issubclass(solution, ref)]
        if borrowed:
            raise DelegationError(f"{name} subclasses {_qualified(borrowed[0])}, the implementation it is compared "
                                  "with: write the layer yourself (subclass nn.Module)")


@contextmanager
def own_work(solution: Any, *references: Callable) -> Iterator[None]:
    """Within the block, calling any of ``references`` raises :class:`DelegationError`.

    Every binding of a reference found in a loaded module, or in the namespace of ``solution``'s code,
    is swapped for a stand-in that raises, and put back when the block ends (also when it raises).
    ``solution`` is first checked by :func:`check_defined_here`.
    """
    check_defined_here(solution, references)
    exercise = solution.__name__
    swapped: list[tuple[dict, str, Any]] = []

    def stand_in(reference):
        def refuse(*args, **kwargs):
            raise DelegationError(f"{exercise} calls {_qualified(reference)}, the implementation it is checked "
                                  "against: the exercise asks for your own code")
        return refuse

    stand_ins = {id(ref): stand_in(ref) for ref in references}  # the references stay alive: ids are unique
    try:
        for space in _namespaces(solution):
            for key, value in list(space.items()):
                if id(value) in stand_ins:
                    swapped.append((space, key, value))
                    space[key] = stand_ins[id(value)]
        yield
    finally:
        for space, key, value in reversed(swapped):
            space[key] = value
