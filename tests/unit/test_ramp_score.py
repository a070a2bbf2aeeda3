"""The ramp scorer: its figures on hand-made series, online and offline alike; the truth readers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from controller.ramp_score import RampRecord, RampScorer, score_series, tolerance_w
from controller.tools.truth import TruthTail, read_truth, tolerance_kw


def test_tolerance_is_two_percent_or_half_a_percent_of_site_max() -> None:
    assert tolerance_w(1e6, 1e7) == 5e4
    assert tolerance_w(5e6, 1e7) == 1e5
    assert tolerance_kw(1000.0, 10_000.0) == pytest.approx(50.0)


def _undershooting_ramp(t: np.ndarray) -> np.ndarray:
    # 1000 -> 500 kW at 100 kW/s from t=1, undershoot to 480 kW at 6.5, back at 7; in W.
    return np.interp(t, [0, 1, 6, 6.5, 7, 30], [1000, 1000, 500, 480, 500, 500]) * 1e3


def test_settle_overshoot_and_iae_of_a_linear_ramp() -> None:
    t = np.arange(0.0, 10.01, 0.1)
    f = score_series(
        t, _undershooting_ramp(t), t0=0.5, t_end=10.0, target_w=5e5, tol_w=1e4, physical_min_s=5.0
    )
    assert f.from_w == 1e6 and f.outcome == "settled"
    # Enters the band at 5.9 s, leaves it (below 490 kW) after 6.25 s, back at 6.75 s.
    assert f.settle_s == pytest.approx(6.3, abs=0.11)
    assert f.ratio == pytest.approx(f.settle_s / 5.0)
    assert f.overshoot_w == pytest.approx(2e4)
    # Area of the error: 0.5 s at 500 kW, a 5 s triangle of 500 kW, the undershoot triangle.
    expected_j = (0.5 * 500 + 0.5 * 5 * 500 + 0.5 * 1.0 * 20) * 1e3
    assert f.iae_j == pytest.approx(expected_j, rel=0.02)


def test_never_settled_when_it_ends_outside() -> None:
    t = np.arange(0.0, 5.0, 0.1)
    f = score_series(t, np.full(t.size, 9e5), t0=0.0, t_end=5.0, target_w=5e5, tol_w=1e4)
    assert f.settle_s is None and f.settled_at is None and f.outcome == "timeout"


def test_an_empty_window_and_an_unknown_start() -> None:
    t = np.arange(0.0, 5.0, 0.1)
    f = score_series(t, np.full(t.size, 9e5), t0=10.0, t_end=20.0, target_w=5e5, tol_w=1e4)
    assert f.settle_s is None and f.overshoot_w == 0.0 and f.iae_j == 0.0
    # No sample before t0: the ramp started where the window's first sample is.
    g = score_series(t, np.full(t.size, 5e5), t0=0.0, t_end=5.0, target_w=5e5, tol_w=1e4)
    assert g.from_w == 5e5 and g.settle_s == 0.0


@pytest.mark.parametrize(
    ("series", "target_w", "tol_w"),
    [
        ("undershoot", 5e5, 1e4),  # settles, after an excursion past the target
        ("noisy", 7e5, 2e4),  # in and out of the band before it stays
        ("small step", 1.005e6, 1e4),  # starts inside the band
        ("never", 2e5, 1e4),  # times out
    ],
)
def test_online_and_offline_give_identical_figures(
    series: str, target_w: float, tol_w: float
) -> None:
    """Fed sample by sample as the daemon feeds the meter, the online scorer's record equals
    the offline one over the same samples, up to the instant the online one closed."""
    t = np.arange(0.0, 60.0, 0.1) + 1e9
    rng = np.random.default_rng(7)
    if series == "undershoot":
        w = _undershooting_ramp(t - 1e9)
    elif series == "noisy":
        w = np.interp(t - 1e9, [0, 2, 12, 60], [1e6, 1e6, 7e5, 7e5]) + rng.normal(0, 6e3, t.size)
    else:
        w = 1e6 + rng.normal(0, 2e3, t.size)
    t0 = 1e9 + 0.55
    scorer = RampScorer(confirm_s=10.0, timeout_s=40.0)
    start_w = float(w[t < t0][-1])
    scorer.start(t0, "d1", from_w=start_w, target_w=target_w, tol_w=tol_w, physical_min_s=4.0)
    online: RampRecord | None = None
    for ti, wi in zip(t.tolist(), w.tolist(), strict=True):
        if ti >= t0 and (online := scorer.observe(ti, wi)) is not None:
            break
    assert online is not None
    # The offline window ends at the last sample the online scorer took in (a timeout closes
    # on the sample that crosses it, without taking it in).
    t_end = online.ended_at if online.outcome != "timeout" else float(t[t < online.ended_at][-1])
    offline = score_series(
        t, w, t0=t0, t_end=t_end, target_w=target_w, tol_w=tol_w, dispatch_id="d1",
        physical_min_s=4.0,
    )  # fmt: skip
    assert offline.settle_s == online.settle_s
    assert offline.settled_at == online.settled_at
    assert offline.overshoot_w == online.overshoot_w
    assert offline.iae_j == online.iae_j
    assert (offline.from_w, offline.target_w, offline.tol_w) == (start_w, target_w, tol_w)
    assert offline.ratio == online.ratio
    assert (online.outcome == "settled") == (offline.outcome == "settled")
    if series == "never":
        assert online.outcome == "timeout" and online.settle_s is None


def test_online_superseded_timeout_and_interrupted() -> None:
    watch = RampScorer(confirm_s=5.0, timeout_s=60.0)
    watch.start(0.0, "a", from_w=1e6, target_w=5e5, tol_w=1e4)
    watch.observe(1.0, 9e5)
    prev = watch.start(2.0, "b", from_w=9e5, target_w=2e5, tol_w=1e4)
    assert prev is not None and prev.outcome == "superseded" and prev.settle_s is None
    rec = None
    for i in range(61):
        rec = watch.observe(2.0 + i, 5e5)
    assert rec is not None and rec.outcome == "timeout" and rec.dispatch_id == "b"
    watch.start(100.0, "c", from_w=5e5, target_w=6e5, tol_w=1e4)
    watch.observe(101.0, 6e5)
    rec = watch.stop(102.0)
    assert rec is not None and rec.outcome == "settled" and rec.settle_s == 1.0
    watch.start(200.0, "d", from_w=None, target_w=6e5, tol_w=1e4)
    watch.observe(200.5, 7e5)
    rec = watch.stop(201.0)
    assert rec is not None and rec.outcome == "interrupted" and rec.overshoot_w == 0.0
    assert watch.stop(202.0) is None and not watch.active
    assert watch.observe(203.0, math.nan) is None


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
