"""Capability: power reachable within 1 / 5 / 60 s, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from controller.control import Controller, FleetParams, Snapshot
from drivers.core.state import DeviceState


def three_devices() -> tuple[Controller, Snapshot]:
    params = FleetParams.of(
        p_min_w=[0.0, 10e3, 0.0],
        p_max_w=[100e3, 50e3, 60e3],
        ramp_up_w_s=[10e3, 1e3, 5e3],
        ramp_down_w_s=[20e3, 1e3, 5e3],
        dead_time_s=[0.5, 2.0, 0.0],
    )
    # Device 2 is faulted at 30 kW; 100 kW of non-flexible load behind the meter.
    snap = Snapshot(
        t=0.0,
        meter_w=50e3 + 40e3 + 30e3 + 100e3,
        measured_w=np.array([50e3, 40e3, 30e3]),
        new_reading=np.zeros(3, dtype=np.bool_),
        state=np.array([DeviceState.ON, DeviceState.ON, DeviceState.FAULT], dtype=np.int8),
    )
    return Controller(params, deadband_w=0.0), snap


def test_capability_matches_hand_computation() -> None:
    ctl, snap = three_devices()
    ctl.step(snap, 220e3, 0.1)
    cap = ctl.capability()
    assert cap.horizons_s == (1.0, 5.0, 60.0)
    # 1 s: device 0 ramps 0.5 s after its dead time (+5 kW / -10 kW); device 1 is still
    # in its 2 s dead time; device 2 is fixed.
    # 5 s: device 0 +45 kW / -50 kW (floor 0); device 1 ramps 3 s: +3 kW / -3 kW.
    # 60 s: device 0 to its bounds (+50 / -50 kW), device 1 too (+10 / -30 kW).
    assert cap.up_w == pytest.approx((5e3, 48e3, 60e3))
    assert cap.down_w == pytest.approx((10e3, 53e3, 80e3))
    # Steady-state range: controllable bounds + fixed 30 kW + non-flexible 100 kW.
    assert cap.min_w == pytest.approx(0.0 + 10e3 + 30e3 + 100e3)
    assert cap.max_w == pytest.approx(100e3 + 50e3 + 30e3 + 100e3)


def test_custom_horizons_and_monotonic() -> None:
    ctl, snap = three_devices()
    ctl.step(snap, 220e3, 0.1)
    cap = ctl.capability((0.1, 0.5, 2.0, 3.0, 30.0))
    assert cap.horizons_s == (0.1, 0.5, 2.0, 3.0, 30.0)
    assert cap.up_w[:2] == (0.0, 0.0)  # nothing moves within device 0's dead time
    assert all(a <= b for a, b in zip(cap.up_w, cap.up_w[1:], strict=False))
    assert all(a <= b for a, b in zip(cap.down_w, cap.down_w[1:], strict=False))
    assert cap.up_w[-1] <= cap.max_w - (50e3 + 40e3 + 30e3 + 100e3) + 1e-6


def test_nothing_offered_before_the_first_step() -> None:
    ctl, _ = three_devices()
    cap = ctl.capability()
    assert cap.up_w == (0.0, 0.0, 0.0)
    assert cap.down_w == (0.0, 0.0, 0.0)


def test_a_learned_demand_below_the_cap_bounds_what_is_offered_up() -> None:
    # A GPU rack capped at 80 kW whose job needs 60 kW cannot add anything by raising its
    # cap; at 50 kW it can add 10 kW, not 30.
    from controller.control import FleetParams, capability

    params = FleetParams.of(p_min_w=[30e3], p_max_w=[80e3], ramp_up_w_s=[1e6], ramp_down_w_s=[1e6])
    ctrl = np.ones(1, dtype=np.bool_)
    hi = np.array([60e3])
    at_cap = capability(params, np.array([60e3]), ctrl, 0.0, 0.0, (1.0,), p_hi_w=hi)
    assert at_cap.up_w == (0.0,) and at_cap.max_w == 60e3
    below = capability(params, np.array([50e3]), ctrl, 0.0, 0.0, (1.0,), p_hi_w=hi)
    assert below.up_w == (10e3,) and below.down_w == (20e3,)
    unknown = capability(params, np.array([50e3]), ctrl, 0.0, 0.0, (1.0,))
    assert unknown.up_w == (30e3,) and unknown.max_w == 80e3
