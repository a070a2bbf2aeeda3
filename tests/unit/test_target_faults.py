"""The tracker around faults: why the failsafe is on (for the status), and a dispatch resumed
from the journal after a restart keeping its ramp's original end."""

from __future__ import annotations

import pytest

from controller.target import resumed
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
