"""Paired comparison of two systems on the same questions: the exact McNemar test.

Only the discordant questions tell the systems apart: `b` answered right by the system and
wrong by the reference (the best member alone), `c` the other way round. Under the null
hypothesis (equal accuracy) each discordant question is a fair coin, so the two-sided
p-value is `min(1, 2 * P(X <= min(b, c)))` for `X ~ Binomial(b + c, 1/2)`.

The oracle of the members is the ceiling of any way of choosing between their answers: a
question counts when at least one member alone answers it right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .task import Score


def mcnemar(system: Sequence[bool], reference: Sequence[bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test of `system` against `reference`, answer by answer."""
    if len(system) != len(reference):
        raise ValueError(f"paired answers differ in number: {len(system)} vs {len(reference)}")
    b = sum(1 for s, r in zip(system, reference) if s and not r)
    c = sum(1 for s, r in zip(system, reference) if r and not s)
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n if n else 1.0
    p = min(1.0, 2 * tail)
    return {
        "gained": b,
        "lost": c,
        "p_value": round(p, 4),
        "significant": p < 0.05,
        "verdict": "same" if p >= 0.05 else ("better" if b > c else "worse"),
    }


def oracle(members: Sequence[Score]) -> Score:
    """Questions answered right by at least one member alone (the same questions, in order)."""
    if not members or len({s.total for s in members}) != 1:
        totals = [s.total for s in members]
        raise ValueError(f"the oracle needs members scored on the same questions, got {totals}")
    rows = zip(*(s.records for s in members))
    correct = sum(1 for answers in rows if any(r["correct"] for r in answers))
    return Score(system="oracle (any member right)", correct=correct, total=members[0].total)
