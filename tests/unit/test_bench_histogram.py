"""Histogram quantiles between two scrapes, against counts worked out by hand."""

from __future__ import annotations

import math

import pytest

from controller.tools.bench.histogram import Located, locate, quantile

INF = math.inf
BEFORE = [(0.001, 10.0), (0.005, 20.0), (0.01, 20.0), (INF, 20.0)]


def test_only_what_was_observed_between_the_scrapes_counts() -> None:
    # 100 new observations: 50 up to 1 ms, 48 in (1, 5] ms, 2 in (5, 10] ms.
    after = [(0.001, 60.0), (0.005, 118.0), (0.01, 120.0), (INF, 120.0)]
    assert quantile(0.5, BEFORE, after) == pytest.approx(0.001)
    # The 99th of 100 is the 1st of the 2 in (5, 10] ms: half way through that bucket.
    assert locate(0.99, BEFORE, after) == Located(0.005, 0.01, pytest.approx(0.0075))
    assert quantile(0.25, BEFORE, after) == pytest.approx(0.0005)


def test_beyond_the_last_bucket_and_nothing_observed() -> None:
    after = [(0.001, 10.0), (0.005, 20.0), (0.01, 21.0), (INF, 30.0)]
    assert locate(0.99, BEFORE, after) == Located(0.01, INF, 0.01)
    assert locate(0.99, BEFORE, BEFORE) is None
    assert math.isnan(quantile(0.99, BEFORE, BEFORE))
