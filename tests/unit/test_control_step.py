"""Controller.step: bounds, ramp limits, reachability, fixed rows, feedback wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.control import Controller, FleetParams, Snapshot, StepResult
from controller.control.step import effective_params
from drivers.core.state import DeviceState

ON, FAULT, UNKNOWN = DeviceState.ON, DeviceState.FAULT, DeviceState.UNKNOWN


def snap(
    measured: np.ndarray | list[float],
    state: np.ndarray | list[int] | None = None,
    meter: float = math.nan,
    new: np.ndarray | None = None,
    t: float = 0.0,
) -> Snapshot:
    m = np.asarray(measured, dtype=np.float64)
    s = np.full(m.size, ON, dtype=np.int8) if state is None else np.asarray(state, np.int8)
    nr = np.zeros(m.size, dtype=np.bool_) if new is None else new
    return Snapshot(t=t, meter_w=meter, measured_w=m, new_reading=nr, state=s)


def random_params(
    rng: np.random.Generator,
    n: int,
    *,
    quantized: bool,
    dead: tuple[float, ...] = (0.0, 0.1, 0.2, 0.5, 2.0),
) -> FleetParams:
    p_max = rng.uniform(1e3, 300e3, n)
    step = np.where(rng.random(n) < 0.4, rng.choice([100.0, 1e3, 5e3], n), 0.0)
    return FleetParams.of(
        p_min_w=p_max * rng.uniform(0.0, 0.9, n),
        p_max_w=p_max,
        ramp_up_w_s=p_max * rng.uniform(0.01, 5.0, n),
        ramp_down_w_s=p_max * rng.uniform(0.01, 5.0, n),
        dead_time_s=rng.choice(list(dead), n),
        step_w=step if quantized else np.zeros(n),
        priority=rng.integers(0, 3, n),
    )


@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 12),
    quantized=st.booleans(),
    steps=st.integers(2, 25),
)
@settings(max_examples=150, deadline=None)
def test_setpoints_respect_bounds_and_ramp_limits(
    seed: int, n: int, quantized: bool, steps: int
) -> None:
    rng = np.random.default_rng(seed)
    params = random_params(rng, n, quantized=quantized)
    ctl = Controller(params, deadband_w=float(rng.choice([0.0, 1e3])))
    lo, hi = params.p_min_w, params.p_max_w
    # Tolerance: rounding, plus two grid steps for quantized rows (their internal setpoint
    # is ramp limited, the floored command moves in whole steps).
    tol = 1e-6 * hi + 1e-5 + 2.0 * params.step_w
    measured = rng.uniform(0.0, 1.1, n) * hi
    prev: StepResult | None = None
    for _ in range(steps):
        dt = float(rng.choice([0.05, 0.1, 0.1, 0.25]))
        state = np.where(rng.random(n) < 0.8, ON, rng.choice([1, 2, 3, 4], n)).astype(np.int8)
        meter = math.nan if rng.random() < 0.3 else float(rng.uniform(0, 2) * hi.sum())
        new = rng.random(n) < 0.3
        target = float(rng.uniform(-0.2, 1.4) * hi.sum())
        r = ctl.step(snap(measured, state, meter, new), target, dt)
        ctrl = state == ON
        assert r.controllable.tolist() == ctrl.tolist()
        assert np.all(np.isfinite(r.setpoints_w))
        assert np.all(r.setpoints_w[ctrl] >= lo[ctrl] - tol[ctrl])
        assert np.all(r.setpoints_w[ctrl] <= hi[ctrl] + tol[ctrl])
        if prev is not None:
            # Not controllable: the previous setpoint, exactly.
            np.testing.assert_array_equal(r.setpoints_w[~ctrl], prev.setpoints_w[~ctrl])
            start = prev.setpoints_w
            was = prev.controllable
        else:
            start = measured
            was = np.zeros(n, dtype=np.bool_)
        # Rows that just became controllable start from their measured power (clipped).
        start = np.where(was, start, np.clip(measured, lo, hi))
        up = params.ramp_up_w_s * dt + tol
        down = params.ramp_down_w_s * dt + tol
        moved = r.setpoints_w - start
        # Ramp limits bind the fast tier (the shortest dead time, in cycles); slow devices
        # get their steady state at once and ramp by themselves.
        delay = np.rint(np.minimum(params.dead_time_s, 3.0) / dt)
        fast = ctrl & (delay == delay.min())
        assert np.all(moved[fast] <= up[fast]), (moved[fast], up[fast])
        assert np.all(moved[fast] >= -down[fast]), (moved[fast], down[fast])
        measured = np.clip(r.setpoints_w + rng.normal(0, 100.0, n), 0.0, None)
        prev = r


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), frac=st.floats(0.0, 1.0))
@settings(max_examples=150, deadline=None)
def test_reachable_target_is_met_in_one_step_when_ramps_allow(
    seed: int, n: int, frac: float
) -> None:
    rng = np.random.default_rng(seed)
    params = random_params(rng, n, quantized=True, dead=(0.2,))
    # Ramps that cross the whole range within one cycle.
    big = FleetParams.of(
        p_min_w=params.p_min_w,
        p_max_w=params.p_max_w,
        ramp_up_w_s=params.p_max_w * 20,
        ramp_down_w_s=params.p_max_w * 20,
        dead_time_s=params.dead_time_s,
        step_w=params.step_w,
        priority=params.priority,
    )
    deadband = 2e3
    state = np.where(rng.random(n) < 0.8, ON, FAULT).astype(np.int8)
    ctrl = state == ON
    measured = rng.uniform(0, 1, n) * params.p_max_w
    fixed_w = float(measured[~ctrl].sum())
    # Reachable: a quantized device tops out at its highest grid point.
    top = effective_params(params).p_max_w
    assert np.all(top <= params.p_max_w)
    lo, hi = float(params.p_min_w[ctrl].sum()), float(top[ctrl].sum())
    flex = lo + frac * (hi - lo)
    r = Controller(big, deadband_w=deadband).step(snap(measured, state), flex + fixed_w, 0.1)
    assert r.flex_target_w == pytest.approx(flex)
    assert r.saturated == 0
    total = float(r.setpoints_w[ctrl].sum())
    slack = float(params.step_w.max()) + deadband
    assert abs(total - flex) <= slack + 1e-6


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10), frac=st.floats(0.0, 1.0))
@settings(max_examples=60, deadline=None)
def test_reachable_target_is_met_after_enough_steps(seed: int, n: int, frac: float) -> None:
    rng = np.random.default_rng(seed)
    params = random_params(rng, n, quantized=True)  # slow ramps, mixed dead times
    dt, deadband = 0.1, 1e3
    ctl = Controller(params, deadband_w=deadband)
    top = effective_params(params).p_max_w  # quantized: highest grid point
    flex = float(params.p_min_w.sum() + frac * (top.sum() - params.p_min_w.sum()))
    # Long enough for the slowest device to cross its range (its setpoint, then its power,
    # which the fast tier covers meanwhile) and for every dead time.
    ramp = np.minimum(params.ramp_up_w_s, params.ramp_down_w_s)
    cycles = int(2 * np.max((params.p_max_w - params.p_min_w) / ramp) / dt) + 40
    measured = params.p_min_w + rng.uniform(0, 1, n) * (params.p_max_w - params.p_min_w)
    r = ctl.step(snap(measured), flex, dt)
    for _ in range(cycles):
        r = ctl.step(snap(measured), flex, dt)
    assert abs(float(r.setpoints_w.sum()) - flex) <= float(params.step_w.max()) + deadband


def test_newly_controllable_row_ramps_from_its_measured_power() -> None:
    params = FleetParams.of(
        p_min_w=[0.0, 0.0],
        p_max_w=[100e3, 100e3],
        ramp_up_w_s=[10e3, 10e3],
        ramp_down_w_s=[10e3, 10e3],
    )
    ctl = Controller(params, deadband_w=0.0)
    r = ctl.step(snap([20e3, 80e3], [ON, UNKNOWN]), 200e3, 0.1)
    assert r.setpoints_w[0] == pytest.approx(21e3)
    assert r.setpoints_w[1] == 80e3  # never commanded, fixed: where it is
    r = ctl.step(snap([21e3, 55e3], [ON, ON]), 200e3, 0.1)
    # Row 1 starts at its measured 55 kW, not at its old 80 kW setpoint.
    assert r.setpoints_w[1] == pytest.approx(56e3)
    assert r.setpoints_w[0] == pytest.approx(22e3)


def test_stale_meter_runs_open_loop_on_predictions() -> None:
    params = FleetParams.of(p_min_w=[0.0], p_max_w=[100e3], ramp_up_w_s=[1e9], ramp_down_w_s=[1e9])
    ctl = Controller(params, deadband_w=0.0)
    r = ctl.step(snap([50e3], meter=80e3), 80e3, 0.1)
    # First valid residual initialises the estimate: 80 - 50 kW of non-flexible load.
    assert r.noncontrollable_w == pytest.approx(30e3)
    assert r.setpoints_w[0] == pytest.approx(50e3)
    r = ctl.step(snap([50e3], meter=math.nan), 90e3, 0.1)
    assert r.noncontrollable_w == pytest.approx(30e3)  # frozen
    assert r.setpoints_w[0] == pytest.approx(60e3)
    assert r.predicted_site_w == pytest.approx(50e3 + 30e3)


def test_meter_residual_closes_the_loop_gradually() -> None:
    params = FleetParams.of(p_min_w=[0.0], p_max_w=[1e6], ramp_up_w_s=[1e9], ramp_down_w_s=[1e9])
    ctl = Controller(params, deadband_w=0.0, observer_tau_s=1.0)
    ctl.step(snap([500e3], meter=600e3), 600e3, 0.1)  # 100 kW non-flexible
    # The non-flexible load jumps to 150 kW: the estimate moves by 1 - exp(-dt/tau).
    r = ctl.step(snap([500e3], meter=650e3), 600e3, 0.1)
    alpha = -math.expm1(-0.1)
    assert r.noncontrollable_w == pytest.approx(100e3 + alpha * 50e3)
    for _ in range(100):
        p = r.setpoints_w[0]
        r = ctl.step(snap([p], meter=p + 150e3), 600e3, 0.1)
    assert r.noncontrollable_w == pytest.approx(150e3, rel=1e-3)
    assert r.setpoints_w[0] == pytest.approx(450e3, rel=1e-3)


def test_site_deadband_holds_small_target_changes() -> None:
    params = FleetParams.of(p_min_w=[0.0], p_max_w=[1e6], ramp_up_w_s=[1e9], ramp_down_w_s=[1e9])
    ctl = Controller(params, deadband_w=10e3)
    r1 = ctl.step(snap([0.0]), 500e3, 0.1)
    r2 = ctl.step(snap([500e3]), 504e3, 0.1)  # within deadband / 2: held
    assert r2.flex_target_w == r1.flex_target_w == 500e3
    r3 = ctl.step(snap([500e3]), 506e3, 0.1)
    assert r3.flex_target_w == 506e3


def test_poll_offset_is_kept_and_comes_off_the_setpoints() -> None:
    params = FleetParams.of(p_min_w=[0.0], p_max_w=[100e3], ramp_up_w_s=[1e9], ramp_down_w_s=[1e9])
    ctl = Controller(params, deadband_w=0.0)
    r = ctl.step(snap([50e3], meter=50e3), 50e3, 0.1)
    assert r.setpoints_w[0] == pytest.approx(50e3)
    # A poll finds the device 5 kW above its setpoint: the prediction takes the poll and
    # keeps the offset (no residual is left for the observer); the setpoint makes room.
    r = ctl.step(snap([55e3], meter=55e3, new=np.array([True])), 50e3, 0.1)
    np.testing.assert_allclose(ctl.predicted_w, [55e3])
    assert r.noncontrollable_w == pytest.approx(0.0, abs=1e-6)
    assert r.setpoints_w[0] == pytest.approx(45e3)
    # Later cycles without a poll keep the offset on top of the model.
    r = ctl.step(snap([55e3], meter=50e3), 50e3, 0.1)
    np.testing.assert_allclose(ctl.predicted_w, [50e3])


def test_deterministic() -> None:
    rng = np.random.default_rng(7)
    params = random_params(rng, 30, quantized=True)
    inputs = [
        (
            snap(
                rng.uniform(0, 1, 30) * params.p_max_w,
                meter=float(rng.uniform(1e6, 3e6)),
                new=rng.random(30) < 0.2,
            ),
            float(rng.uniform(1e6, 4e6)),
        )
        for _ in range(20)
    ]
    runs = []
    for _ in range(2):
        ctl = Controller(params, deadband_w=500.0)
        runs.append([ctl.step(s, t, 0.1).setpoints_w for s, t in inputs])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_are_rejected() -> None:
    params = FleetParams.of(p_min_w=[0.0], p_max_w=[1.0], ramp_up_w_s=[1.0], ramp_down_w_s=[1.0])
    ctl = Controller(params, deadband_w=0.0)
    with pytest.raises(ValueError, match="dt"):
        ctl.step(snap([0.0]), 1.0, 0.0)
    with pytest.raises(ValueError, match="target"):
        ctl.step(snap([0.0]), math.nan, 0.1)
    with pytest.raises(ValueError, match="fleet size"):
        ctl.step(snap([0.0, 0.0]), 1.0, 0.1)
    with pytest.raises(ValueError, match="p_min_w must not exceed"):
        FleetParams.of(p_min_w=[2.0], p_max_w=[1.0], ramp_up_w_s=[1.0], ramp_down_w_s=[1.0])


def test_nan_reading_is_not_propagated() -> None:
    params = FleetParams.of(
        p_min_w=[0.0, 0.0], p_max_w=[100e3, 100e3], ramp_up_w_s=[1e9, 1e9], ramp_down_w_s=[1e9, 1e9]
    )
    ctl = Controller(params, deadband_w=0.0)
    ctl.step(snap([50e3, 50e3]), 100e3, 0.1)
    r = ctl.step(snap([math.nan, 50e3], state=[FAULT, ON], new=np.array([True, True])), 100e3, 0.1)
    assert np.all(np.isfinite(r.setpoints_w))
    assert math.isfinite(r.flex_target_w)


def test_params_from_the_image_copy_the_static_columns() -> None:
    from drivers.core.image import ProcessImage
    from tests.helpers import device_spec

    fleet = ProcessImage(
        [
            device_spec(name="a", p_max_w=250e3, priority=3, ramps_itself=True),
            device_spec(name="b", p_max_w=250e3, priority=1, setpoint_is_cap=True),
        ]
    )
    params = FleetParams.from_image(fleet)
    assert params.n == 2
    assert params.p_max_w.tolist() == [250e3, 250e3]
    assert params.priority.tolist() == [3, 1]
    assert params.priority.dtype == np.int32
    assert params.ramps_itself is not None and params.ramps_itself.tolist() == [True, False]
    fleet.p_max_w[0] = 1.0  # later edits of the fleet do not leak in
    assert params.p_max_w[0] == 250e3
