"""Quantiles of a Prometheus histogram over what was observed between two scrapes, as
PromQL's `histogram_quantile` over an increase: the benches' cycle figures."""

from __future__ import annotations

import math
from typing import NamedTuple

Buckets = list[tuple[float, float]]
"""A histogram's cumulative buckets from one scrape: (le, count) in order, +Inf last."""


class Located(NamedTuple):
    lower: float
    upper: float
    """The bucket's bounds (upper inf: beyond the last finite bucket)."""
    estimate: float
    """Linear inside the bucket; its lower bound in the +Inf one."""


def locate(q: float, before: Buckets, after: Buckets) -> Located | None:
    """Where the q-quantile of the observations between the two scrapes falls; None when
    nothing was observed."""
    counts = [(le, c1 - c0) for (le, c1), (_, c0) in zip(after, before, strict=True)]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    rank, lo, below = q * total, 0.0, 0.0
    for le, c in counts:
        if c >= rank:
            if math.isinf(le):
                return Located(lo, le, lo)
            return Located(lo, le, lo + (le - lo) * (rank - below) / max(c - below, 1e-9))
        lo, below = le, c
    return Located(lo, math.inf, lo)  # cumulative counts end at the total: not reached


def quantile(q: float, before: Buckets, after: Buckets) -> float:
    """The q-quantile's estimate; NaN when nothing was observed."""
    at = locate(q, before, after)
    return math.nan if at is None else at.estimate
