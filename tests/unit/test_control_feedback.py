"""Feedback pieces: residual observer (anti-windup), site deadband, ramp window."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.control import ResidualObserver, TargetDeadband, ramp_window


def test_observer_starts_at_the_first_valid_residual() -> None:
    obs = ResidualObserver(1.0, -1e6, 1e6)
    assert obs.update(math.nan, 100.0, 0.1) == 0.0  # nothing known yet
    assert not obs.initialised
    assert obs.update(700.0, 200.0, 0.1) == 500.0  # no slow start from zero
    assert obs.initialised


def test_observer_low_pass_is_exact_first_order() -> None:
    obs = ResidualObserver(2.0, -1e6, 1e6)
    obs.update(0.0, 0.0, 0.1)
    for _ in range(20):  # 2 s = one time constant
        est = obs.update(1000.0, 0.0, 0.1)
    assert est == pytest.approx(1000.0 * (1 - math.exp(-1.0)))
    # dt-independent: one 2 s step lands at the same place.
    obs2 = ResidualObserver(2.0, -1e6, 1e6)
    obs2.update(0.0, 0.0, 0.1)
    assert obs2.update(1000.0, 0.0, 2.0) == pytest.approx(est)


def test_observer_freezes_on_stale_meter_and_clamps() -> None:
    obs = ResidualObserver(1.0, -50.0, 300.0)
    obs.update(100.0, 0.0, 0.1)
    for _ in range(50):
        assert obs.update(math.nan, 0.0, 0.1) == 100.0
    assert obs.update(1e9, 0.0, 0.1) == 300.0  # a wrong meter cannot wind it up
    obs2 = ResidualObserver(1.0, -50.0, 300.0)
    assert obs2.update(-1e9, 0.0, 0.1) == -50.0


def test_observer_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        ResidualObserver(0.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        ResidualObserver(1.0, 2.0, 1.0)


def test_target_deadband_holds_within_half() -> None:
    hold = TargetDeadband(10.0)
    assert hold.apply(100.0) == 100.0
    assert hold.apply(104.9) == 100.0
    assert hold.apply(95.1) == 100.0
    assert hold.apply(105.1) == 105.1
    assert TargetDeadband(0.0).apply(1.0) == 1.0


def test_ramp_window() -> None:
    prev = np.array([50.0, 95.0, 5.0])
    lo, hi = np.empty(3), np.empty(3)
    ramp_window(
        prev,
        np.array([10.0, 10.0, 10.0]),
        np.array([-20.0, -20.0, -20.0]),
        np.array([0.0, 0.0, 0.0]),
        np.array([100.0, 100.0, 100.0]),
        lo,
        hi,
    )
    assert lo.tolist() == [30.0, 75.0, 0.0]
    assert hi.tolist() == [60.0, 100.0, 15.0]
