"""TargetTracker.restore: the failsafe and its silence timer carried over a restart.

The restarted tracker lives on a new monotonic axis (the clock does not survive a restart);
what crosses the restart is how long ago, on the wall clock, the dispatcher was last heard
and how long the failsafe has been on.
"""

from __future__ import annotations

from typing import Any

import pytest

from controller.config import FailsafeConfig, RampLimitsConfig, SiteLimits
from controller.target import TargetTracker
from controller.wire import Dispatch

LIMITS = SiteLimits(min_kw=1000.0, max_kw=14000.0)
MAX_W, MIN_W = 14e6, 1e6
T0 = 7.0  # the restarted process's monotonic clock: small, unrelated to the last run
U0 = 1_714_564_800.0


def fs(**kw: Any) -> FailsafeConfig:
    return FailsafeConfig(**{"dispatch_timeout_s": 60.0, "policy": "hold", "ramp_s": 30.0, **kw})


def disp(seq: int, target_kw: float = 5000.0, **kw: Any) -> Dispatch:
    fields: dict[str, Any] = {
        "id": f"d{seq}", "seq": seq, "issued_at": U0, "mode": "setpoint",
        "target_w": target_kw * 1e3, "ramp_s": 0.0, **kw,
    }  # fmt: skip
    return Dispatch(**fields)


def restarted(initial_w: float = 8e6, **fs_kw: Any) -> TargetTracker:
    return TargetTracker(LIMITS, fs(**fs_kw), initial_w, now_mono=T0)


def test_the_silence_timer_goes_on_from_the_last_time_heard() -> None:
    t = restarted(policy="min", ramp_s=0.0)
    t.restore(T0, last_heard_ago_s=45.0)  # 45 s of the 60 s gone before and during the outage
    assert t.mode == "normal" and t.failsafe_at() == pytest.approx(T0 + 15.0)
    assert t.last_heard == pytest.approx(T0 - 45.0)
    assert t.target_w(T0 + 14.9) == 8e6 and t.mode == "normal"
    assert t.target_w(T0 + 15.0) == MIN_W and t.mode == "failsafe"
    assert t.failsafe_since == pytest.approx(T0 + 15.0)
    assert t.failsafe_reason == "no dispatch or heartbeat for 60 s; policy min"


def test_a_heartbeat_after_the_restart_restarts_the_timer_as_usual() -> None:
    t = restarted(policy="min")
    t.restore(T0, last_heard_ago_s=45.0)
    t.heartbeat(T0 + 10.0)
    assert t.failsafe_at() == T0 + 70.0


def test_a_timer_that_ran_out_during_the_outage_trips_at_start_without_a_jump() -> None:
    t = restarted(initial_w=8e6, policy="min", ramp_s=30.0)
    t.restore(T0, last_heard_ago_s=600.0)
    assert t.mode == "failsafe" and t.failsafe_since == T0
    # From the target in force at the start, over the whole failsafe ramp (it starts now).
    assert t.target_w(T0) == 8e6
    assert t.target_w(T0 + 15.0) == pytest.approx(8e6 - 7e6 * 0.5)
    assert t.target_w(T0 + 30.0) == MIN_W
    assert t.failsafe_reason == (
        "no dispatch or heartbeat for 60 s (across the restart); policy min"
    )


@pytest.mark.parametrize("policy", ["baseline", "min"])
def test_a_failsafe_on_at_the_stop_stays_on_and_its_ramp_ends_when_it_would_have(
    policy: str,
) -> None:
    t = restarted(initial_w=6e6, policy=policy, baseline_kw=2000.0, ramp_s=30.0)
    t.restore(T0, last_heard_ago_s=80.0, failsafe_for_s=20.0)
    goal = 2e6 if policy == "baseline" else MIN_W
    assert t.mode == "failsafe" and t.failsafe_since == pytest.approx(T0 - 20.0)
    assert t.failsafe_at() is None  # latched: only a dispatch ends it
    # The 30 s ramp began 20 s before: its last 10 s, from where the target stands now.
    assert t.target_w(T0) == 6e6
    assert t.target_w(T0 + 5.0) == pytest.approx(6e6 + (goal - 6e6) * 0.5)
    assert t.target_w(T0 + 10.0) == goal
    assert "(since before the restart)" in t.failsafe_reason
    t.heartbeat(T0 + 20.0)  # under baseline / min a heartbeat alone does not end it
    assert t.mode == "failsafe"
    t.accept(disp(1, 9000.0), T0 + 30.0, U0 + 30.0)
    assert t.mode == "normal" and t.failsafe_reason == "" and t.failsafe_since is None
    assert t.target_w(T0 + 30.0) == 9e6


def test_a_failsafe_past_its_ramp_is_at_its_target_at_once() -> None:
    t = restarted(initial_w=MIN_W, policy="min", ramp_s=30.0)
    t.restore(T0, last_heard_ago_s=3600.0, failsafe_for_s=3000.0)
    assert t.target_w(T0) == MIN_W and t.mode == "failsafe"


def test_a_hold_failsafe_keeps_the_resumed_dispatch_and_a_heartbeat_ends_it() -> None:
    t = restarted(policy="hold")
    d = disp(1, 4000.0, expires_at=U0 + 100.0)
    t.accept(d, T0, U0)  # the resume puts the dispatch back first
    t.restore(T0, last_heard_ago_s=90.0, failsafe_for_s=30.0)
    assert t.mode == "failsafe" and t.active is d and t.target_w(T0 + 1.0) == 4e6
    # Its expiry still releases to the rails (over failsafe.ramp_s).
    assert t.target_w(T0 + 130.0) == MAX_W and t.active is None
    t.heartbeat(T0 + 131.0)
    assert t.mode == "released" and t.failsafe_at() == T0 + 191.0


def test_the_resumed_dispatch_does_not_restart_the_silence_timer() -> None:
    # Accepting the journal's dispatch at start is not the dispatcher speaking.
    t = restarted(policy="min", ramp_s=0.0)
    t.accept(disp(1, 4000.0), T0, U0)
    assert t.failsafe_at() == T0 + 60.0
    t.restore(T0, last_heard_ago_s=50.0)
    assert t.failsafe_at() == pytest.approx(T0 + 10.0)
    assert t.target_w(T0 + 10.0) == MIN_W and t.active is None


def test_the_wall_clock_set_back_across_the_restart_counts_as_no_time() -> None:
    t = restarted(policy="min")
    t.restore(T0, last_heard_ago_s=-40.0, failsafe_for_s=None)
    assert t.failsafe_at() == T0 + 60.0
    t2 = restarted(policy="min", ramp_s=30.0)
    t2.restore(T0, last_heard_ago_s=-40.0, failsafe_for_s=-40.0)
    assert t2.failsafe_since == T0 and t2.target_w(T0 + 30.0) == MIN_W


def test_nothing_known_changes_nothing() -> None:
    t = restarted(policy="min")
    t.restore(T0, last_heard_ago_s=None)
    assert t.mode == "normal" and t.failsafe_at() == T0 + 60.0


def test_the_restored_failsafe_target_is_outside_the_ramp_limits() -> None:
    limits = RampLimitsConfig(down_kw_per_min=60.0)  # 1 kW/s: 100 min for 6 MW
    t = TargetTracker(LIMITS, fs(policy="min", ramp_s=0.0), 7e6, now_mono=T0, ramp_limits=limits)
    t.target_w(T0)
    t.restore(T0, last_heard_ago_s=100.0, failsafe_for_s=40.0)
    assert t.target_w(T0 + 0.1) == MIN_W  # as a live failsafe's: exempt
