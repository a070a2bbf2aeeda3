"""Ramp figures on hand-made series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from controller.ramp_metrics import TruthTail, ramp_figures, read_truth, tolerance_kw


def test_tolerance_is_two_percent_or_half_a_percent_of_site_max() -> None:
    assert tolerance_kw(1000.0, 10_000.0) == 50.0
    assert tolerance_kw(5000.0, 10_000.0) == 100.0


def test_settle_overshoot_and_iae_of_a_linear_ramp() -> None:
    t = np.arange(0.0, 10.01, 0.1)
    # From 1000 down to 500 at 100 kW/s starting at t=1, undershoot to 480 at t=6.5, back at 7.
    kw = np.interp(t, [0, 1, 6, 6.5, 7, 10], [1000, 1000, 500, 480, 500, 500])
    f = ramp_figures(t, kw, t0=0.5, t_end=10.0, target_kw=500.0, tol_kw=10.0)
    assert f.start_kw == 1000.0
    # Enters the band at 5.9 s, leaves it (below 490) after 6.25 s, back at 6.75 s.
    assert f.settle_s == pytest.approx(6.3, abs=0.11)
    assert f.overshoot_kw == pytest.approx(20.0)
    # Area of the error: 0.5 s at 500, a 5 s triangle of 500, and the undershoot triangle.
    expected_kws = 0.5 * 500 + 0.5 * 5 * 500 + 0.5 * 1.0 * 20
    assert f.iae_kwh == pytest.approx(expected_kws / 3600, rel=0.02)


def test_never_settled_when_it_ends_outside() -> None:
    t = np.arange(0.0, 5.0, 0.1)
    f = ramp_figures(t, np.full(t.size, 900.0), t0=0.0, t_end=5.0, target_kw=500.0, tol_kw=10)
    assert f.settle_s is None


def test_truth_readers_skip_torn_lines(tmp_path: Path) -> None:
    p = tmp_path / "truth.jsonl"
    p.write_text("".join(json.dumps({"t": i, "site_kw": 10.0 * i}) + "\n" for i in range(3)))
    tail = TruthTail(p)
    assert tail.poll() == 3
    with p.open("a") as fh:
        fh.write('{"t": 3, "site_')
    assert tail.poll() == 0
    with p.open("a") as fh:
        fh.write('kw": 30.0}\n')
    assert tail.poll() == 1
    assert tail.latest() == 30.0
    t, kw = read_truth(p, since_t=1.0)
    assert t.tolist() == [1, 2, 3] and kw.tolist() == [10.0, 20.0, 30.0]
