"""The tracker around faults: why the failsafe is on (for the status), and a dispatch resumed
from the journal after a restart keeping its ramp's original end."""

from __future__ import annotations

import pytest

from controller.target import resume_from_w, resumed
from tests.unit.test_target import MIN_W, U0, at, disp, tracker


def test_failsafe_reason_is_given_only_while_the_failsafe_is_on() -> None:
    t, c = tracker(policy="min", ramp_s=0.0)
    t.accept(disp(1, 6000), c.mono, c.unix)
    assert t.failsafe_reason == ""
    c.advance(60.0)
    assert t.target_w(c.mono) == MIN_W and t.mode == "failsafe"
    assert t.failsafe_reason == "no dispatch or heartbeat for 60 s; policy min"
    t.accept(disp(2, 6000), c.mono, c.unix)
    assert str(t.mode) == "normal" and t.failsafe_reason == ""


def test_resumed_ramp_keeps_its_original_end() -> None:
    d = disp(1, 4000, ramp_s=10.0)  # issued at U0
    assert resumed(d, U0 + 4.0).ramp_s == pytest.approx(6.0)
    assert resumed(d, U0 + 30.0).ramp_s == 0.0  # over while the daemon was down: a step
    assert resumed(d, U0 - 1.0) == d  # (clock skew) not begun: all of it ahead
    # A ramp from a later start_at counts from there; one still to start is left alone.
    late = disp(2, 4000, ramp_s=10.0, start_at=U0 + 5.0)
    assert resumed(late, U0 + 7.0).ramp_s == pytest.approx(8.0)
    assert resumed(late, U0 + 2.0) == late
    assert resumed(disp(3, 4000), U0 + 1.0).ramp_s == 0.0  # a step stays a step


def test_a_resumed_dispatch_reaches_its_target_on_the_original_schedule() -> None:
    t, c = tracker(initial_w=10e6)
    c.advance(6.0)  # restarted 6 s into a 10 s ramp, from the last journaled target
    t.accept(resumed(disp(1, 4000, ramp_s=10.0), c.unix), c.mono, c.unix)
    assert at(t, c, 0.0) == 10e6
    assert at(t, c, 2.0) == pytest.approx(10e6 - 6e6 * 0.5)
    assert at(t, c, 4.0) == 4e6


def test_a_restart_mid_ramp_resumes_from_where_the_ramp_stands_not_from_the_stale_sample() -> None:
    # A 10 s ramp from 10 MW to 4 MW (-0.6 MW/s); the last journaled target is 0.8 s old.
    d = disp(1, 4000, ramp_s=10.0)  # issued at U0
    on_ramp = 10e6 - 0.6e6 * 3.0
    assert resume_from_w(d, U0 + 3.0, on_ramp, U0 + 3.8) == pytest.approx(10e6 - 0.6e6 * 3.8)
    # Sampled before the dispatch arrived (the target then in force): the ramp's start.
    assert resume_from_w(d, U0 - 0.5, 10e6, U0 + 5.0) == pytest.approx(7e6)
    # Nothing to extrapolate: over, not begun, a step, a release.
    assert resume_from_w(d, U0 + 3.0, on_ramp, U0 + 12.0) == on_ramp
    assert resume_from_w(d, U0 - 3.0, 9e6, U0 - 1.0) == 9e6
    assert resume_from_w(disp(2, 4000), U0, 9e6, U0 + 1.0) == 9e6
    assert resume_from_w(disp(3, mode="release", ramp_s=10.0), U0, 9e6, U0 + 1.0) == 9e6
    # Regulation ramps to its base plus the signal's share of the band.
    reg = disp(4, 4000, mode="regulation", ramp_s=10.0, signal=0.5, band_kw=2000)
    assert resume_from_w(reg, U0, 10e6, U0 + 5.0) == pytest.approx((10e6 + 5e6) / 2)


def test_resumed_from_where_the_ramp_stands_the_trajectory_is_the_uninterrupted_one() -> None:
    d = disp(1, 4000, ramp_s=10.0)  # 10 MW -> 4 MW over 10 s
    whole, c = tracker(initial_w=10e6)
    whole.accept(d, c.mono, c.unix)
    c.advance(6.0)  # the restart, 6 s in; the journal's last row is 0.8 s older
    sampled_at = U0 + 5.2
    sampled = whole.target_w(c.mono - 0.8)
    restarted, c2 = tracker(initial_w=resume_from_w(d, sampled_at, sampled, c.unix))
    c2.advance(6.0)
    restarted.accept(resumed(d, c2.unix), c2.mono, c2.unix)
    expected = [at(whole, c, dt) for dt in (0.0, 1.0, 2.5, 4.0, 6.0)]
    got = [at(restarted, c2, dt) for dt in (0.0, 1.0, 2.5, 4.0, 6.0)]
    assert got == pytest.approx(expected)
    # From the stale sample instead, the target would first step back up by 0.48 MW.
    assert sampled - expected[0] == pytest.approx(0.48e6)
