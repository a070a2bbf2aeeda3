"""TargetTracker: ramps, scheduled starts, expiry, regulation and failsafe on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.config import FailsafeConfig, SiteLimits
from controller.target import TargetTracker
from controller.wire import Dispatch

LIMITS = SiteLimits(min_kw=1000.0, max_kw=14000.0)
MAX_W, MIN_W = 14e6, 1e6
# Deliberately different axes: the tracker must place unix times on the monotonic axis.
T0 = 500.0  # monotonic
U0 = 1_714_564_800.0  # unix at T0


def fs(**kw: Any) -> FailsafeConfig:
    return FailsafeConfig(**{"dispatch_timeout_s": 60.0, "policy": "hold", "ramp_s": 30.0, **kw})


class Clock:
    """Fake time: monotonic and unix move together unless told otherwise."""

    def __init__(self) -> None:
        self.mono = T0
        self.unix = U0

    def advance(self, dt: float) -> None:
        self.mono += dt
        self.unix += dt


def disp(
    seq: int,
    target_kw: float = 5000.0,
    *,
    mode: str = "setpoint",
    ramp_s: float = 0.0,
    start_at: float | None = None,
    expires_at: float | None = None,
    signal: float | None = None,
    band_kw: float | None = None,
) -> Dispatch:
    return Dispatch(
        id=f"d{seq}",
        seq=seq,
        issued_at=U0,
        mode=mode,  # type: ignore[arg-type]
        target_w=MAX_W if mode == "release" else target_kw * 1e3,
        ramp_s=ramp_s,
        start_at=start_at,
        expires_at=expires_at,
        signal=signal,
        band_w=None if band_kw is None else band_kw * 1e3,
    )


def tracker(initial_w: float = 10e6, **fs_kw: Any) -> tuple[TargetTracker, Clock]:
    c = Clock()
    return TargetTracker(LIMITS, fs(**fs_kw), initial_w, now_mono=c.mono), c


def at(t: TargetTracker, c: Clock, dt: float) -> float:
    """Target dt seconds after the clock's current instant (the clock is not moved)."""
    return t.target_w(c.mono + dt)


# --- start and ramps -----------------------------------------------------------------------


def test_holds_initial_target_until_first_dispatch() -> None:
    t, c = tracker(initial_w=8e6)
    assert t.target_w(c.mono) == 8e6
    assert at(t, c, 59.0) == 8e6
    assert t.mode == "normal" and t.active is None and t.last_seq is None


def test_initial_target_bounded_to_limits() -> None:
    assert tracker(initial_w=20e6)[0].target_w(T0) == MAX_W
    assert tracker(initial_w=0.0)[0].target_w(T0) == MIN_W


def test_setpoint_ramps_linearly_from_target_in_force() -> None:
    t, c = tracker(initial_w=10e6)
    t.accept(disp(1, 5000, ramp_s=10.0), c.mono, c.unix)
    assert t.active is not None and t.active.seq == 1 and t.last_seq == 1
    assert at(t, c, 0.0) == 10e6
    assert at(t, c, 2.5) == pytest.approx(8.75e6)
    assert at(t, c, 5.0) == pytest.approx(7.5e6)
    assert at(t, c, 10.0) == 5e6
    assert at(t, c, 30.0) == 5e6
    assert t.ramp_end_w == 5e6 and t.mode == "normal"


def test_zero_ramp_is_a_step() -> None:
    t, c = tracker()
    t.accept(disp(1, 3000), c.mono, c.unix)
    assert at(t, c, 0.0) == 3e6


def test_new_dispatch_mid_ramp_starts_from_current_value() -> None:
    t, c = tracker(initial_w=10e6)
    t.accept(disp(1, 2000, ramp_s=10.0), c.mono, c.unix)  # -0.8 MW/s
    c.advance(5.0)
    assert t.target_w(c.mono) == pytest.approx(6e6)
    t.accept(disp(2, 8000, ramp_s=4.0), c.mono, c.unix)  # 6 -> 8 MW in 4 s
    assert at(t, c, 0.0) == pytest.approx(6e6)
    assert at(t, c, 2.0) == pytest.approx(7e6)
    assert at(t, c, 4.0) == 8e6


def test_accepting_an_old_seq_is_a_programming_error() -> None:
    t, c = tracker()
    t.accept(disp(5), c.mono, c.unix)
    with pytest.raises(ValueError):
        t.accept(disp(5), c.mono, c.unix)


def test_time_never_runs_backwards() -> None:
    t, c = tracker(initial_w=10e6)
    t.accept(disp(1, 2000, ramp_s=10.0), c.mono, c.unix)
    v = at(t, c, 5.0)
    assert at(t, c, 1.0) == v  # an earlier instant reads as the latest seen


# --- scheduled start and expiry ------------------------------------------------------------


def test_start_at_waits_then_ramps_from_value_at_start() -> None:
    t, c = tracker(initial_w=10e6)
    t.accept(disp(1, 6000, ramp_s=8.0), c.mono, c.unix)  # 10 -> 6 MW over 8 s
    # Scheduled 4 s ahead (unix), 4 MW over 2 s from whatever is in force then (8 MW).
    t.accept(disp(2, 4000, ramp_s=2.0, start_at=c.unix + 4.0), c.mono, c.unix)
    assert t.pending is not None and t.active is not None and t.active.seq == 1
    assert at(t, c, 2.0) == pytest.approx(9e6)  # still the first ramp
    assert at(t, c, 5.0) == pytest.approx(6e6)  # halfway from 8 to 4 MW
    assert t.pending is None and t.active is not None and t.active.seq == 2
    assert at(t, c, 6.0) == 4e6


def test_start_at_in_the_past_starts_now() -> None:
    t, c = tracker(initial_w=10e6)
    t.accept(disp(1, 4000, start_at=c.unix - 5.0), c.mono, c.unix)
    assert at(t, c, 0.0) == 4e6 and t.pending is None


def test_latest_dispatch_supersedes_a_pending_one() -> None:
    t, c = tracker(initial_w=10e6)
    t.accept(disp(1, 4000, start_at=c.unix + 10.0), c.mono, c.unix)
    t.accept(disp(2, 7000), c.mono, c.unix)
    assert t.pending is None
    assert at(t, c, 20.0) == 7e6


def test_expiry_releases_to_site_maximum_over_failsafe_ramp() -> None:
    t, c = tracker(initial_w=10e6, ramp_s=20.0)
    t.accept(disp(1, 4000, expires_at=c.unix + 30.0), c.mono, c.unix)
    assert at(t, c, 29.9) == 4e6 and t.mode == "normal"
    # Sampled late on purpose: the release ramp starts at the expiry instant, not at the poll.
    assert at(t, c, 40.0) == pytest.approx(4e6 + (MAX_W - 4e6) * 10.0 / 20.0)
    assert t.mode == "released" and t.active is None
    assert at(t, c, 50.0) == MAX_W


def test_expiry_is_placed_on_the_monotonic_axis_at_acceptance() -> None:
    t, c = tracker(initial_w=10e6, ramp_s=0.0)
    c.unix += 1000.0  # the wall clock is off; only the difference at acceptance counts
    t.accept(disp(1, 4000, expires_at=c.unix + 30.0), c.mono, c.unix)
    assert at(t, c, 29.0) == 4e6
    assert at(t, c, 30.0) == MAX_W


def test_scheduled_dispatch_carries_its_own_expiry() -> None:
    t, c = tracker(initial_w=10e6, ramp_s=0.0)
    t.accept(disp(1, 4000, start_at=c.unix + 10.0, expires_at=c.unix + 20.0), c.mono, c.unix)
    assert at(t, c, 5.0) == 10e6
    assert at(t, c, 15.0) == 4e6
    assert at(t, c, 25.0) == MAX_W and t.mode == "released"


def test_release_ramps_to_maximum_then_setpoint_returns_to_normal() -> None:
    t, c = tracker(initial_w=4e6)
    t.accept(disp(1, mode="release", ramp_s=10.0), c.mono, c.unix)
    assert t.mode == "released" and t.active is None
    assert at(t, c, 5.0) == pytest.approx(9e6)
    assert at(t, c, 10.0) == MAX_W
    c.advance(10.0)
    t.accept(disp(2, 6000), c.mono, c.unix)
    assert t.mode == "normal" and at(t, c, 0.0) == 6e6


# --- regulation ----------------------------------------------------------------------------


def test_regulation_follows_base_plus_signal_times_band() -> None:
    t, c = tracker(initial_w=7e6)
    t.accept(disp(1, 7000, mode="regulation", band_kw=2000, signal=0.5), c.mono, c.unix)
    assert at(t, c, 0.0) == 8e6
    c.advance(2.0)
    t.accept(disp(2, 7000, mode="regulation", band_kw=2000, signal=-1.0), c.mono, c.unix)
    assert at(t, c, 0.0) == 5e6
    c.advance(2.0)
    t.accept(disp(3, 7000, mode="regulation", band_kw=2000, signal=0.0, ramp_s=2.0), c.mono, c.unix)
    assert at(t, c, 1.0) == pytest.approx(6e6)
    assert at(t, c, 2.0) == 7e6


def test_regulation_bounded_to_limits() -> None:
    t, c = tracker()
    # Not producible by parse_dispatch (it checks the band), but the tracker bounds anyway.
    t.accept(disp(1, 13500, mode="regulation", band_kw=2000, signal=1.0), c.mono, c.unix)
    assert at(t, c, 0.0) == MAX_W


# --- failsafe ------------------------------------------------------------------------------


def test_failsafe_hold_keeps_target_until_expiry_then_maximum() -> None:
    t, c = tracker(initial_w=10e6, policy="hold", ramp_s=0.0)
    t.accept(disp(1, 4000, ramp_s=100.0, expires_at=c.unix + 200.0), c.mono, c.unix)
    assert t.failsafe_at() == c.mono + 60.0
    assert at(t, c, 59.9) == pytest.approx(10e6 - 6e6 * 0.599) and t.mode == "normal"
    assert at(t, c, 60.0) == pytest.approx(10e6 - 6e6 * 0.6)
    assert t.mode == "failsafe" and t.failsafe_at() is None
    assert at(t, c, 150.0) == 4e6  # the ramp in force completes
    assert at(t, c, 200.0) == MAX_W and t.mode == "failsafe"


def test_failsafe_counts_from_construction_without_any_message() -> None:
    t, c = tracker(initial_w=8e6, policy="min", ramp_s=10.0)
    assert at(t, c, 59.0) == 8e6 and t.mode == "normal"
    assert at(t, c, 65.0) == pytest.approx(8e6 - 7e6 * 0.5)
    assert t.mode == "failsafe"
    assert at(t, c, 70.0) == MIN_W


def test_heartbeats_keep_failsafe_away() -> None:
    t, c = tracker(policy="min")
    t.accept(disp(1, 6000), c.mono, c.unix)
    for _ in range(10):
        c.advance(50.0)
        t.heartbeat(c.mono)
        assert t.target_w(c.mono) == 6e6 and t.mode == "normal"
    assert at(t, c, 90.0) == MIN_W and t.mode == "failsafe"  # +60 s, then a 30 s ramp


def test_failsafe_baseline_ramps_to_baseline_and_drops_dispatches() -> None:
    t, c = tracker(policy="baseline", baseline_kw=3000.0, ramp_s=30.0)
    t.accept(disp(1, 9000, expires_at=c.unix + 1000.0), c.mono, c.unix)
    t.accept(disp(2, 5000, start_at=c.unix + 100.0), c.mono, c.unix)
    # Failsafe at +60 s; polled late: the ramp still starts at +60 s.
    assert at(t, c, 75.0) == pytest.approx(9e6 - 6e6 * 0.5)
    assert t.mode == "failsafe" and t.active is None and t.pending is None
    assert at(t, c, 150.0) == 3e6  # the scheduled dispatch was dropped


def test_heartbeat_alone_does_not_end_baseline_or_min_failsafe() -> None:
    t, c = tracker(policy="min", ramp_s=0.0)
    t.accept(disp(1, 9000), c.mono, c.unix)
    c.advance(61.0)
    assert t.target_w(c.mono) == MIN_W and t.mode == "failsafe"
    t.heartbeat(c.mono)
    assert t.mode == "failsafe" and at(t, c, 1.0) == MIN_W
    assert at(t, c, 500.0) == MIN_W  # no re-entry, no change
    c.advance(500.0)
    t.accept(disp(2, 8000, ramp_s=10.0), c.mono, c.unix)
    assert t.mode == "normal"
    assert at(t, c, 5.0) == pytest.approx(MIN_W + 7e6 * 0.5)


def test_heartbeat_ends_hold_failsafe_and_release_counts_as_dispatch() -> None:
    t, c = tracker(policy="hold")
    t.accept(disp(1, 6000), c.mono, c.unix)
    c.advance(61.0)
    assert t.target_w(c.mono) == 6e6 and t.mode == "failsafe"
    t.heartbeat(c.mono)
    assert t.mode == "normal" and t.failsafe_at() == c.mono + 60.0

    t2, c2 = tracker(policy="baseline", baseline_kw=2000.0, ramp_s=0.0)
    c2.advance(61.0)
    assert t2.target_w(c2.mono) == 2e6 and t2.mode == "failsafe"
    t2.accept(disp(1, mode="release"), c2.mono, c2.unix)
    assert t2.mode == "released" and t2.target_w(c2.mono) == MAX_W


def test_hold_failsafe_still_starts_a_scheduled_dispatch() -> None:
    t, c = tracker(initial_w=10e6, policy="hold")
    t.accept(disp(1, 4000, start_at=c.unix + 90.0), c.mono, c.unix)
    assert at(t, c, 80.0) == 10e6 and t.mode == "failsafe"
    assert at(t, c, 90.0) == 4e6 and t.mode == "failsafe"


# --- properties ----------------------------------------------------------------------------

events = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=90.0),  # gap before the event
        st.sampled_from(["setpoint", "regulation", "release", "heartbeat", "sample"]),
        st.floats(min_value=0.0, max_value=20000.0),  # target kW (may exceed limits)
        st.floats(min_value=0.0, max_value=30.0),  # ramp_s
        st.one_of(st.none(), st.floats(min_value=-10.0, max_value=60.0)),  # start_at offset
        st.one_of(st.none(), st.floats(min_value=1.0, max_value=200.0)),  # expiry offset
        st.floats(min_value=-1.0, max_value=1.0),  # signal
    ),
    max_size=25,
)


@settings(max_examples=200)
@given(events, st.sampled_from(["hold", "baseline", "min"]), st.floats(0, 1000))
def test_trajectory_bounded_and_independent_of_sampling(
    evs: list[tuple[float, str, float, float, float | None, float | None, float]],
    policy: str,
    step: float,
) -> None:
    """Two trackers see the same messages; one is sampled often, the other only at messages.
    They agree at every message instant, and every value is within the site's limits."""
    kw: dict[str, Any] = {"policy": policy, "ramp_s": 15.0}
    if policy == "baseline":
        kw["baseline_kw"] = 2000.0 + step
    dense, c = tracker(initial_w=9e6, **kw)
    sparse, _ = tracker(initial_w=9e6, **kw)
    seq = 0
    for gap, kind, target, ramp, start, expiry, signal in evs:
        for i in range(1, 5):  # dense sampling inside the gap
            v = dense.target_w(c.mono + gap * i / 5)
            assert MIN_W <= v <= MAX_W
        c.advance(gap)
        assert dense.target_w(c.mono) == pytest.approx(sparse.target_w(c.mono), abs=1e-3)
        assert dense.mode == sparse.mode
        if kind == "heartbeat":
            dense.heartbeat(c.mono)
            sparse.heartbeat(c.mono)
        elif kind != "sample":
            seq += 1
            band = min(target - 1000.0, 14000.0 - target) if kind == "regulation" else None
            if band is not None and band <= 0:
                continue
            start_at = None if start is None else c.unix + start
            expires_at = None if expiry is None else c.unix + max(start or 0.0, 0.0) + expiry
            d = disp(
                seq,
                target,
                mode=kind,
                ramp_s=ramp,
                start_at=start_at,
                expires_at=expires_at,
                signal=signal if kind == "regulation" else None,
                band_kw=band,
            )
            dense.accept(d, c.mono, c.unix)
            sparse.accept(d, c.mono, c.unix)


def test_in_force_names_the_active_dispatch_or_the_release() -> None:
    t, c = tracker()
    assert t.in_force is None
    a = disp(1, expires_at=U0 + 10)
    t.accept(a, c.mono, c.unix)
    assert t.in_force is a and t.active is a
    at(t, c, 11)  # expired: released, by no dispatch
    assert t.mode == "released" and t.in_force is None and t.active is None
    c.advance(12)
    r = disp(2, mode="release", expires_at=c.unix + 1)
    t.accept(r, c.mono, c.unix)
    at(t, c, 50)  # a release has no expiry
    assert t.mode == "released" and t.in_force is r and t.active is None


@pytest.mark.parametrize("policy", ["hold", "min"])
def test_start_failsafe_applies_the_policy_at_that_instant(policy: str) -> None:
    t, c = tracker(policy=policy)
    a = disp(1)
    p = disp(2, 8000.0, start_at=U0 + 100)
    t.accept(a, c.mono, c.unix)
    t.accept(p, c.mono + 1, c.unix + 1)
    t.start_failsafe(c.mono + 20)
    assert t.mode == "failsafe"
    if policy == "hold":
        assert t.in_force is a and t.pending is p
        assert at(t, c, 101) == 8e6  # the scheduled start still starts
    else:
        assert t.in_force is None and t.pending is None and t.active is None
        assert at(t, c, 20 + 30) == MIN_W  # over failsafe.ramp_s to the minimum
    t.start_failsafe(c.mono + 200)  # already in it: nothing changes
    assert t.mode == "failsafe"
