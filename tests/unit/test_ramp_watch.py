"""The daemon's ramp records: a real TargetTracker, a real journal file, the site meter fed in."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from controller.config import FailsafeConfig, SiteLimits
from controller.journal import Journal, RampRecord
from controller.ramp_score import RampScorer, tolerance_w
from controller.ramp_watch import RampWatch
from controller.target import TargetTracker
from controller.wire import Dispatch

LIMITS = SiteLimits(min_kw=0.0, max_kw=3000.0)
MAX_W = 3e6


def dispatch(seq: int, target_kw: float, at: float, **kw: object) -> Dispatch:
    fields: dict[str, object] = {
        "id": f"d{seq}", "seq": seq, "issued_at": at, "mode": "setpoint",
        "target_w": target_kw * 1e3, "ramp_s": 0.0, "start_at": None, "expires_at": None,
        "signal": None, "band_w": None, **kw,
    }  # fmt: skip
    return Dispatch(**fields)  # type: ignore[arg-type]


def ramps(path: Path, t0: float) -> list[RampRecord]:
    with Journal(path) as j:
        return j.ramps_between(t0 - 1, t0 + 1000)


def test_a_setpoint_coming_into_force_opens_a_ramp_and_what_follows_closes_it(
    tmp_path: Path,
) -> None:
    db = tmp_path / "journal.sqlite"
    t0 = float(int(time.time()))
    mono = 100.0  # the tracker's own axis
    tracker = TargetTracker(LIMITS, FailsafeConfig(), MAX_W, now_mono=mono)
    with Journal(db) as j:
        watch = RampWatch(
            j, tracker, site_max_w=MAX_W, physical_min_s=lambda w: 2.0,
            scorer=RampScorer(confirm_s=3.0),
        )  # fmt: skip
        tracker.accept(dispatch(1, 1000.0, t0, ramp_s=4.0), mono, t0)
        watch.check(t0, 3e6)
        # A second dispatch scheduled to start 20 s later; the first settles before.
        tracker.accept(dispatch(2, 2000.0, t0 + 1, start_at=t0 + 20), mono + 1, t0 + 1)
        for k in range(300):  # 10 Hz for 30 s
            t = t0 + k / 10
            tracker.target_w(mono + k / 10)
            meter = 1e6 if t < t0 + 20 else 2e6
            watch.tick(t, meter if k % 50 else None)  # now and then a stale meter
        # A release takes over: the open ramp is closed as it stands.
        tracker.accept(dispatch(3, 3000.0, t0 + 30, mode="release"), mono + 30, t0 + 30)
        watch.check(t0 + 30, 2e6)
        watch.stop(t0 + 31)  # nothing open: nothing more recorded
    first, second = ramps(db, t0)
    assert (first.dispatch_id, first.outcome, first.from_w) == ("d1", "settled", 3e6)
    assert first.target_w == 1e6 and first.tol_w == tolerance_w(1e6, MAX_W)
    # In the band from the first fresh reading (the one at the start was stale).
    assert first.settle_s == pytest.approx(0.1, abs=1e-6)
    assert first.physical_min_s == 4.0  # the dispatch's own ramp_s, above the fleet's 2 s
    assert (second.dispatch_id, second.started_at) == ("d2", t0 + 20)  # at its scheduled start
    assert second.from_w is None and second.outcome == "settled"  # the meter was stale then


def test_the_ramp_open_at_shutdown_is_recorded(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite"
    t0 = float(int(time.time()))
    tracker = TargetTracker(LIMITS, FailsafeConfig(), MAX_W, now_mono=0.0)
    with Journal(db) as j:
        watch = RampWatch(j, tracker, site_max_w=MAX_W, physical_min_s=lambda w: None)
        tracker.accept(dispatch(1, 500.0, t0), 0.0, t0)
        watch.check(t0, None)  # the meter was stale: the start is unknown
        watch.tick(t0 + 1, 2e6)
        watch.stop(t0 + 2)
    (rec,) = ramps(db, t0)
    assert rec.outcome == "interrupted" and rec.from_w is None and rec.physical_min_s == 0.0
    assert rec.ended_at == t0 + 2


@pytest.mark.parametrize("step_s", [30.0, -30.0])
def test_a_wall_clock_step_during_a_ramp_changes_neither_its_timing_nor_its_outcome(
    tmp_path: Path, step_s: float
) -> None:
    db = tmp_path / "journal.sqlite"
    t0 = float(int(time.time()))
    clock = {"mono": 50.0}
    tracker = TargetTracker(LIMITS, FailsafeConfig(), MAX_W, now_mono=clock["mono"])
    with Journal(db) as j:
        watch = RampWatch(
            j, tracker, site_max_w=MAX_W, physical_min_s=lambda w: 2.0,
            scorer=RampScorer(confirm_s=3.0), mono=lambda: clock["mono"],
        )  # fmt: skip
        tracker.accept(dispatch(1, 1000.0, t0, ramp_s=4.0), clock["mono"], t0)
        watch.check(t0, 3e6)
        for k in range(1, 101):  # 10 Hz for 10 s; the wall clock steps at 2 s
            clock["mono"] = 50.0 + k / 10
            wall = t0 + k / 10 + (step_s if k >= 20 else 0.0)
            meter = 3e6 - 2e6 * min(1.0, k / 40)  # in the band from 4 s on
            watch.tick(wall, meter)
    (rec,) = ramps(db, t0)
    assert rec.outcome == "settled" and rec.started_at == t0
    # In the band 4 s after the start on the monotonic clock, not 4 s plus or minus the
    # step; confirmed 3 s later; the record's times are the start's wall clock plus those.
    assert rec.settle_s == pytest.approx(4.0)
    assert rec.settled_at == pytest.approx(t0 + 4.0) and rec.ended_at == pytest.approx(t0 + 7.0)
