"""Allocation: merit order, fixed rows, quantization, reachability (controller/control)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.control import Allocator, Controller, FleetParams, Snapshot
from drivers.core.state import DeviceState

ON, FAULT, UNKNOWN, SLEEPING = (
    DeviceState.ON,
    DeviceState.FAULT,
    DeviceState.UNKNOWN,
    DeviceState.SLEEPING,
)


def snap(measured: Sequence[float] | np.ndarray, state: Sequence[int] | None = None) -> Snapshot:
    m = np.asarray(measured, dtype=np.float64)
    s = np.full(m.size, ON, dtype=np.int8) if state is None else np.asarray(state, np.int8)
    # Meter NaN: the observer stays at 0, so the flexible target is target - fixed power.
    return Snapshot(
        t=0.0, meter_w=math.nan, measured_w=m, new_reading=np.zeros(m.size, dtype=np.bool_), state=s
    )


def fast_fleet(n: int, p_max: float = 100e3, **kw: object) -> FleetParams:
    """Devices that can cross their whole range in one 0.1 s cycle."""
    args: dict[str, object] = {
        "p_min_w": [0.0] * n,
        "p_max_w": [p_max] * n,
        "ramp_up_w_s": [1e9] * n,
        "ramp_down_w_s": [1e9] * n,
    }
    args.update(kw)
    return FleetParams.of(**args)  # type: ignore[arg-type]


def test_merit_order_curtails_lowest_priority_first() -> None:
    params = fast_fleet(3, priority=[0, 2, 1])
    ctl = Controller(params, deadband_w=0.0)
    r = ctl.step(snap([100e3] * 3), 150e3, 0.1)
    assert r.saturated == 0
    np.testing.assert_allclose(r.setpoints_w, [0.0, 100e3, 50e3])
    # Lower the target: the priority-1 device goes first, the priority-2 one is untouched.
    r = ctl.step(snap(r.setpoints_w), 120e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [0.0, 100e3, 20e3])


def test_ties_fill_in_index_order() -> None:
    params = fast_fleet(3, priority=[5, 5, 5])
    r = Controller(params, deadband_w=0.0).step(snap([0.0] * 3), 130e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [100e3, 30e3, 0.0])


def test_fault_and_unknown_get_no_share_and_their_power_is_subtracted() -> None:
    params = fast_fleet(4, priority=[0, 0, 0, 0])
    ctl = Controller(params, deadband_w=0.0)
    r0 = ctl.step(snap([50e3] * 4), 200e3, 0.1)
    np.testing.assert_allclose(r0.setpoints_w.sum(), 200e3)
    # Device 1 faults at 40 kW, device 3 goes silent at 70 kW.
    state = [ON, FAULT, ON, UNKNOWN]
    measured = np.array([r0.setpoints_w[0], 40e3, r0.setpoints_w[2], 70e3])
    r = ctl.step(snap(measured, state), 200e3, 0.1)
    assert r.controllable.tolist() == [True, False, True, False]
    # Their setpoints are left as they were; their power comes off the target.
    assert r.setpoints_w[1] == r0.setpoints_w[1]
    assert r.setpoints_w[3] == r0.setpoints_w[3]
    assert r.flex_target_w == pytest.approx(200e3 - 40e3 - 70e3)
    assert r.setpoints_w[[0, 2]].sum() == pytest.approx(90e3)


def test_their_share_goes_to_others_up_to_bounds() -> None:
    params = fast_fleet(3)
    ctl = Controller(params, deadband_w=0.0)
    ctl.step(snap([100e3] * 3), 300e3, 0.1)
    # Two devices fault at 0 W: the one left can give at most its p_max.
    r = ctl.step(snap([100e3, 0.0, 0.0], [ON, FAULT, FAULT]), 300e3, 0.1)
    assert r.setpoints_w[0] == pytest.approx(100e3)
    assert r.saturated == 1


def test_sleeping_and_waking_are_fixed_at_their_measured_power() -> None:
    params = fast_fleet(3)
    ctl = Controller(params, deadband_w=0.0)
    r = ctl.step(snap([1e3, 5e3, 60e3], [SLEEPING, DeviceState.WAKING, ON]), 50e3, 0.1)
    assert r.flex_target_w == pytest.approx(50e3 - 6e3)
    assert r.setpoints_w[2] == pytest.approx(44e3)
    # Never commanded: their "previous setpoint" is where they are.
    np.testing.assert_array_equal(r.setpoints_w[:2], [1e3, 5e3])


def test_saturation_flags_and_bounds() -> None:
    params = fast_fleet(2, p_min_w=[10e3, 20e3])
    ctl = Controller(params, deadband_w=0.0)
    low = ctl.step(snap([50e3, 50e3]), 1e3, 0.1)
    assert low.saturated == -1
    np.testing.assert_allclose(low.setpoints_w, [10e3, 20e3])
    high = ctl.step(snap(low.setpoints_w), 1e9, 0.1)
    assert high.saturated == 1
    np.testing.assert_allclose(high.setpoints_w, [100e3, 100e3])


def test_quantized_devices_floor_and_continuous_ones_take_the_remainder() -> None:
    params = fast_fleet(3, step_w=[1000.0, 1000.0, 0.0], priority=[0, 0, 0])
    ctl = Controller(params, deadband_w=0.0)
    r = ctl.step(snap([0.0] * 3), 123_456.0, 0.1)
    q = r.setpoints_w[:2]
    np.testing.assert_allclose(q / 1000.0, np.round(q / 1000.0), atol=1e-9)
    assert r.setpoints_w.sum() == pytest.approx(123_456.0, abs=1e-3)


def test_quantized_only_fleet_lands_within_one_step_below() -> None:
    n = 50
    params = fast_fleet(n, step_w=[250.0] * n, p_max=3_300.0)
    ctl = Controller(params, deadband_w=0.0)
    target = 0.61 * n * 3_300.0
    r = ctl.step(snap([0.0] * n), target, 0.1)
    assert np.allclose(r.setpoints_w / 250.0, np.round(r.setpoints_w / 250.0))
    assert target - 250.0 < r.setpoints_w.sum() <= target + 1e-6
    assert np.all(r.setpoints_w <= 3_300.0)


# -- properties --------------------------------------------------------------------------


@st.composite
def fleet_and_mask(draw: st.DrawFn) -> tuple[FleetParams, np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 15))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p_max = rng.uniform(1e3, 300e3, n)
    params = FleetParams.of(
        p_min_w=p_max * rng.uniform(0.0, 0.9, n),
        p_max_w=p_max,
        ramp_up_w_s=p_max,
        ramp_down_w_s=p_max,
        dead_time_s=rng.choice([0.0, 0.1, 0.3, 2.0], n),
        priority=rng.integers(0, 4, n),
    )
    ctrl = rng.random(n) < 0.75
    delay = np.rint(params.dead_time_s / 0.1).astype(np.int64)
    return params, ctrl, delay


@given(fleet_and_mask(), st.floats(-0.2, 1.2))
@settings(max_examples=200, deadline=None)
def test_desire_is_a_merit_order_fill_of_the_controllable_rows(
    case: tuple[FleetParams, np.ndarray, np.ndarray], frac: float
) -> None:
    params, ctrl, delay = case
    alloc = Allocator(params)
    alloc.set_delays(delay)
    alloc.set_ctrl(ctrl, np.flatnonzero(~ctrl))
    lo = float(params.p_min_w[ctrl].sum())
    hi = float(params.p_max_w[ctrl].sum())
    flex = lo + frac * (hi - lo)
    d = alloc.desire(flex)
    assert np.all(d[~ctrl] == 0.0)
    assert np.all(d[ctrl] >= params.p_min_w[ctrl] - 1e-6)
    assert np.all(d[ctrl] <= params.p_max_w[ctrl] + 1e-6)
    assert d.sum() == pytest.approx(min(max(flex, lo), hi), rel=1e-9, abs=1e-6)
    # Merit order: nobody is above p_min while a higher-priority (or same priority,
    # lower index) controllable device is below p_max.
    rows = np.flatnonzero(ctrl)
    above = d[rows] > params.p_min_w[rows] + 1e-6
    below = d[rows] < params.p_max_w[rows] - 1e-6
    prio = params.priority[rows]
    for i in range(rows.size):
        for j in range(rows.size):
            first = prio[j] > prio[i] or (prio[j] == prio[i] and rows[j] < rows[i])
            assert not (above[i] and below[j] and first)
    # The fast tier's share of D, by binary search, equals the brute-force sum.
    level = alloc._level(flex - alloc.sum_p_min)
    assert alloc._fast_desire_w(level) == pytest.approx(
        float(d[ctrl & (delay == delay.min())].sum()), rel=1e-9, abs=1e-6
    )


def test_set_priorities_invalidates_the_cached_order() -> None:
    params = fast_fleet(2, priority=[0, 1])
    ctl = Controller(params, deadband_w=0.0)
    r = ctl.step(snap([0.0, 0.0]), 50e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [0.0, 50e3])
    ctl.set_priorities(np.array([1, 0], dtype=np.int32))
    r = ctl.step(snap(r.setpoints_w), 50e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [50e3, 0.0])


def test_rows_that_ramp_by_themselves_get_their_share_at_once() -> None:
    # Two child controllers (zones) at 50 kW/s: as ordinary rows the parent would ramp
    # their setpoints 5 kW per cycle, and each zone would follow that moving target a dead
    # time late; as rows that ramp by themselves they are told where to end up.
    kw = {
        "p_min_w": [0.0, 0.0],
        "p_max_w": [1e6, 1e6],
        "ramp_up_w_s": [50e3, 50e3],
        "ramp_down_w_s": [50e3, 50e3],
        "dead_time_s": [0.6, 0.6],
    }
    start = snap([500e3, 500e3])
    ramped = Controller(FleetParams.of(**kw), deadband_w=0.0).step(start, 600e3, 0.1)  # type: ignore[arg-type]
    np.testing.assert_allclose(ramped.setpoints_w.sum(), 1e6 - 2 * 5e3)
    own = Controller(FleetParams.of(**kw, ramps_itself=[True, True]), deadband_w=0.0)  # type: ignore[arg-type]
    r = own.step(start, 600e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [600e3, 0.0])  # merit order, at once
    # Next to a fast device (no dead time, 1 MW/s) the zones are the slow tier: they get
    # their steady-state share at once, and the fast device covers what they cannot do
    # before their dead time is over (here: all it can, down to 0).
    kw3 = {k: [*v, v[0]] for k, v in kw.items()}
    kw3["ramp_up_w_s"][2] = kw3["ramp_down_w_s"][2] = 1e6
    kw3["dead_time_s"][2] = 0.0
    kw3["p_max_w"][2] = 200e3
    mixed = Controller(FleetParams.of(**kw3, ramps_itself=[True, True, False]), deadband_w=0.0)  # type: ignore[arg-type]
    r = mixed.step(snap([500e3, 500e3, 100e3]), 700e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [700e3, 0.0, 0.0], atol=1.0)
