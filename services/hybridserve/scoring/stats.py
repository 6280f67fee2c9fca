"""Statistics for comparing arms: percentiles, and the paired sign test.

`paired` compares two arms on the same questions, each answered correctly or
not by each arm. Only the questions where the arms disagree say which is
better: `wins` counts those where arm b is correct and arm a is not, `losses`
the reverse, and `ties` the questions where both are correct or both wrong.
Under the hypothesis that neither arm is better, each disagreement is a fair
coin toss, so the p-value is the exact two-sided sign test on the n = wins +
losses disagreements (the exact McNemar test):

    p = min(1, 2 * sum_{i=0}^{min(wins, losses)} C(n, i) / 2**n),  and p = 1 when n = 0.

A small p (say below 0.05) means a split as lopsided as this one is unlikely
by chance: the difference is real on this question set. A large p means it is
not shown on this many questions, which is not proof that the arms are equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Paired", "paired", "percentile"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0 <= q <= 100) of `values`, by linear interpolation
    between the two nearest ranks (numpy's default): the value at position
    (len - 1) * q / 100 of the sorted values. None when there are no values.

    Raises:
        ValueError: q is outside [0, 100].
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Paired:
    """Arm `b` against arm `a` on the same questions (see the module docstring)."""

    a: str
    b: str
    #: Questions b answers correctly and a does not ("b better").
    wins: int
    #: Questions a answers correctly and b does not ("b worse").
    losses: int
    #: Questions both answer correctly, or both wrongly.
    ties: int
    #: Exact two-sided sign test on the wins and losses.
    p_value: float


def paired(
    a_name: str, a_correct: Sequence[bool], b_name: str, b_correct: Sequence[bool]
) -> Paired:
    """Compares arm b with arm a, question by question (the same questions in the
    same order in both sequences).

    Raises:
        ValueError: the sequences differ in length.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(
            f"{a_name!r} has {len(a_correct)} results and {b_name!r} {len(b_correct)}; "
            "a paired comparison needs the same questions"
        )
    wins = sum(bool(b) and not a for a, b in zip(a_correct, b_correct))
    losses = sum(bool(a) and not b for a, b in zip(a_correct, b_correct))
    n = wins + losses
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    # Integer numerator and denominator, so the division rounds once; n == 0 gives
    # min(1, 2 * 1 / 1) = 1.
    p_value = min(1.0, 2 * tail / 2**n)
    return Paired(a_name, b_name, wins, losses, len(a_correct) - n, p_value)
