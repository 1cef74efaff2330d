"""Claims a lab makes in its prose, checked on the run's own numbers.

A sentence such as "replay forgets less than naive fine-tuning" is a measurement the run can make, so
a lab states it in a claim cell instead of asserting it in prose::

    claim = Claims()
    claim("replay_forgets_less", "Replay keeps more arithmetic than naive fine-tuning",
          replay >= naive, f"replay {replay:.2f}, naive {naive:.2f}")

Each call prints *held* or *NOT held* with the evidence, and the lab's "What you measured" shows
:meth:`Claims.table` and saves :meth:`Claims.metrics` (``claim_<key>``: true/false), which the notebook
tests read. A claim that does not hold is reported, never hidden: the prose around it says what the
student should conclude either way. :meth:`Claims.higher` is the one to use when one score is said to
beat another: it holds only when their 95% intervals do not overlap, so a difference the evaluation
set is too small to show is not called one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from labhelpers.evaluation import distinguishable, score_interval

_KEY = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Claim:
    key: str
    statement: str
    held: bool
    evidence: str

    def __str__(self) -> str:
        return f"{'held' if self.held else 'NOT held'}: {self.statement} ({self.evidence})"


class Claims:
    """The claims of one notebook run, in the order they were checked (a key checked again replaces
    its earlier result, so re-running a cell does not duplicate it)."""

    def __init__(self) -> None:
        self._claims: dict[str, Claim] = {}

    def __call__(self, key: str, statement: str, held, evidence: str) -> Claim:
        """Record whether ``statement`` held in this run, with the numbers that decided it, and print it.

        ``held`` is the comparison itself (a ``bool`` or a numpy boolean); ``key`` names the claim in
        the metrics (``claim_<key>``): lower case letters, digits and underscores."""
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"claim key {key!r} must be lower case letters, digits and underscores, "
                             "starting with a letter (it becomes the metric claim_<key>)")
        if not hasattr(held, "__bool__") or isinstance(held, (str, pd.Series, pd.DataFrame)):
            raise TypeError(f"claim {key!r}: held must be the comparison's truth value (True/False), got "
                            f"{type(held).__name__}; reduce a Series with .all() or .any() first")
        result = Claim(key, statement, bool(held), evidence)
        self._claims.pop(key, None)
        self._claims[key] = result
        print(result)
        return result

    def higher(self, key: str, statement: str, scores: dict[str, float], n: int) -> Claim:
        """Claim that the first of two scores (fractions correct of ``n`` examples each) is higher than
        the second, beyond their 95% Wilson intervals (:func:`labhelpers.evaluation.distinguishable`).

        ``scores`` is ``{label: score}`` with exactly two entries, the one claimed higher first; the
        evidence shows both with their intervals, and says so when the first is higher but within them.
        """
        if len(scores) != 2:
            raise ValueError(f"claim {key!r}: higher() compares two scores, got {len(scores)}: {list(scores)}")
        a, b = scores.values()
        shown = [f"{label} {s:.2f} [{lo:.2f}, {hi:.2f}]" for label, s in scores.items()
                 for lo, hi in [score_interval(s, n)]]
        apart = distinguishable(a, b, n, n)
        note = "" if apart or a <= b else "; higher, but within the 95% intervals: not a difference at this n"
        return self(key, statement, a > b and apart, f"{' vs '.join(shown)}, n={n}{note}")

    def __len__(self) -> int:
        return len(self._claims)

    def table(self) -> pd.DataFrame:
        """One row per claim: the statement, held / not held, and the evidence."""
        return pd.DataFrame([{"claim": c.statement, "held": "held" if c.held else "NOT held", "evidence": c.evidence}
                             for c in self._claims.values()], columns=["claim", "held", "evidence"])

    def metrics(self) -> dict[str, bool]:
        """``{"claim_<key>": held}`` for :func:`labhelpers.results.save_metrics`."""
        return {f"claim_{c.key}": c.held for c in self._claims.values()}
