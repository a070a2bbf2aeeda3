"""Row ceilings: a cap on single devices' setpoints from outside the control law (a zone
capped by its own DSX Flex feed), applied by the allocation, and the store the cycle reads
them from (controller/control, controller/row_ceilings.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.config import DeviceSpec
from controller.control import Allocator, Controller, FleetParams, Snapshot, StepResult
from controller.row_ceilings import RowCeilings
from drivers.core.command import CommandShaper, Intent
from drivers.core.state import F64, DeviceState
from drivers.sim.physics import SitePhysics
from tests.helpers import device_spec
from tests.unit.test_control_allocate import fast_fleet as fleet

ON = DeviceState.ON
INF = math.inf


def snap(measured: F64 | list[float], ceiling: F64 | list[float] | None = None) -> Snapshot:
    m = np.asarray(measured, dtype=np.float64)
    return Snapshot(
        t=0.0,
        meter_w=math.nan,  # the observer stays at 0: flexible target = target
        measured_w=m,
        new_reading=np.zeros(m.size, dtype=np.bool_),
        state=np.full(m.size, ON, dtype=np.int8),
        row_ceiling_w=None if ceiling is None else np.asarray(ceiling, dtype=np.float64),
    )


# -- the allocation ----------------------------------------------------------------------------


def test_a_capped_row_is_held_under_its_ceiling_and_the_others_take_up_the_rest() -> None:
    ctl = Controller(fleet(3), deadband_w=0.0)
    r = ctl.step(snap([100e3, 100e3, 0.0]), 200e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [100e3, 100e3, 0.0])  # merit: index order
    r = ctl.step(snap(r.setpoints_w, [20e3, INF, INF]), 200e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [20e3, 100e3, 80e3])
    assert r.saturated == 0
    # Lifted (no ceilings at all): back to the merit order.
    r = ctl.step(snap(r.setpoints_w), 200e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [100e3, 100e3, 0.0])


def test_an_infinite_ceiling_caps_nothing() -> None:
    free = Controller(fleet(3), deadband_w=0.0).step(snap([50e3] * 3), 170e3, 0.1)
    capped = Controller(fleet(3), deadband_w=0.0).step(snap([50e3] * 3, [INF] * 3), 170e3, 0.1)
    np.testing.assert_array_equal(free.setpoints_w, capped.setpoints_w)


def test_what_the_others_cannot_take_saturates_the_step() -> None:
    ctl = Controller(fleet(3), deadband_w=0.0)
    r = ctl.step(snap([100e3] * 3, [20e3, INF, INF]), 250e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [20e3, 100e3, 100e3])
    assert r.saturated == 1


def test_a_ceiling_below_p_min_holds_the_row_at_p_min() -> None:
    ctl = Controller(fleet(2, p_min_w=[10e3, 10e3]), deadband_w=0.0)
    r = ctl.step(snap([100e3, 100e3], [0.0, INF]), 150e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [10e3, 100e3])


def test_a_ramp_limited_row_comes_down_to_its_ceiling_at_its_own_rate() -> None:
    # Row 0 sheds 10 kW/s (1 kW a cycle); row 1 is fast and holds the site target meanwhile.
    params = fleet(2, ramp_down_w_s=[10e3, 1e9])
    ctl = Controller(params, deadband_w=0.0)
    r = ctl.step(snap([100e3, 20e3]), 120e3, 0.1)
    prev = r.setpoints_w
    for k in range(1, 6):
        r = ctl.step(snap(prev, [50e3, INF]), 120e3, 0.1)
        assert r.setpoints_w[0] == pytest.approx(100e3 - k * 1e3)
        assert r.setpoints_w.sum() == pytest.approx(120e3)
        prev = r.setpoints_w


def test_a_quantized_row_is_never_bumped_over_its_ceiling() -> None:
    # Desire [50, 100, 15, 0] kW floors to 20 kW steps [40, 100, 0, 0]: 25 kW short, which
    # bumps rows a step in index order while it fits. Row 0's next step (60) is over its
    # ceiling: row 2 gets the step.
    ctl = Controller(fleet(4, step_w=[20e3] * 4), deadband_w=0.0)
    r = ctl.step(snap([0.0] * 4, [50e3, INF, INF, INF]), 165e3, 0.1)
    np.testing.assert_allclose(r.setpoints_w, [40e3, 100e3, 20e3, 0.0])


def test_slow_rows_that_ramp_themselves_are_capped_at_once() -> None:
    # Two zones (slow: they ramp by themselves) and a fast load: the capped zone gets its
    # ceiling in one step, the other zone its share of the rest.
    params = fleet(
        3,
        ramp_up_w_s=[50e3, 50e3, 1e6],
        ramp_down_w_s=[100e3, 100e3, 1e6],
        dead_time_s=[0.6, 0.6, 0.2],
        ramps_itself=[True, True, False],
    )
    ctl = Controller(params, deadband_w=0.0)
    r = ctl.step(snap([100e3, 20e3, 0.0]), 120e3, 0.1)
    r = ctl.step(snap(r.setpoints_w, [40e3, INF, INF]), 120e3, 0.1)
    assert r.setpoints_w[0] == pytest.approx(40e3)
    assert r.setpoints_w[1] == pytest.approx(80e3)


def test_the_size_of_the_ceilings_is_checked() -> None:
    ctl = Controller(fleet(3), deadband_w=0.0)
    with pytest.raises(ValueError, match="row ceilings"):
        ctl.step(snap([0.0] * 3, [1.0, 2.0]), 1.0, 0.1)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10), steps=st.integers(2, 20))
@settings(max_examples=150, deadline=None)
def test_no_row_is_planned_over_its_ceiling_beyond_what_its_ramp_and_p_min_allow(
    seed: int, n: int, steps: int
) -> None:
    rng = np.random.default_rng(seed)
    p_max = rng.uniform(1e3, 300e3, n)
    params = FleetParams.of(
        p_min_w=p_max * rng.uniform(0.0, 0.9, n),
        p_max_w=p_max,
        ramp_up_w_s=p_max * rng.uniform(0.01, 5.0, n),
        ramp_down_w_s=p_max * rng.uniform(0.01, 5.0, n),
        dead_time_s=rng.choice([0.0, 0.2, 0.6], n),
        priority=rng.integers(0, 3, n),
        ramps_itself=rng.random(n) < 0.3,
    )
    ctl = Controller(params, deadband_w=0.0)
    tol = 1e-6 * p_max + 1e-5
    measured = rng.uniform(0.0, 1.0, n) * p_max
    prev: StepResult | None = None
    for _ in range(steps):
        ceiling = np.where(rng.random(n) < 0.4, rng.uniform(0.0, 1.0, n) * p_max, np.inf)
        target = float(rng.uniform(0.0, 1.2) * p_max.sum())
        r = ctl.step(snap(measured, ceiling), target, 0.1)
        start = np.clip(measured, params.p_min_w, p_max) if prev is None else prev.setpoints_w
        # Down to the ceiling no faster than the row's ramp, never below its p_min.
        allowed = np.maximum(
            np.maximum(ceiling, params.p_min_w), start - params.ramp_down_w_s * 0.1
        )
        assert np.all(r.setpoints_w <= allowed + tol), (r.setpoints_w, allowed)
        assert np.all(r.setpoints_w >= params.p_min_w - tol)
        measured = r.setpoints_w.copy()
        prev = r


def test_capability_offers_a_capped_row_up_to_its_ceiling_only() -> None:
    ctl = Controller(fleet(3), deadband_w=0.0)
    ctl.step(snap([50e3] * 3, [20e3, INF, INF]), 150e3, 0.1)
    assert ctl.capability().max_w == pytest.approx(220e3)
    ctl.step(snap([50e3] * 3), 150e3, 0.1)
    assert ctl.capability().max_w == pytest.approx(300e3)


def test_the_desire_fills_past_a_capped_row_in_merit_order() -> None:
    params = fleet(3, p_min_w=[10e3] * 3, priority=[0, 2, 1])  # filled: row 1, 2, then 0
    alloc = Allocator(params)
    alloc.set_ctrl(np.ones(3, dtype=np.bool_), np.array([], dtype=np.intp))
    assert alloc.sum_d_max == pytest.approx(300e3)
    np.testing.assert_allclose(alloc.desire(150e3), [10e3, 100e3, 40e3])
    alloc.set_row_ceilings(np.array([INF, 30e3, 0.0]))  # below p_min: at p_min
    assert alloc.sum_d_max == pytest.approx(100e3 + 30e3 + 10e3)  # what the awake rows hold
    np.testing.assert_allclose(alloc.desire(150e3), [100e3, 30e3, 10e3])
    alloc.set_row_ceilings(None)
    np.testing.assert_allclose(alloc.desire(150e3), [10e3, 100e3, 40e3])


def _loop_specs() -> list[DeviceSpec]:
    load = {"p_min_w": 25e3, "p_max_w": 250e3, "p_idle_w": 5e3, "dead_time_s": 0.2}
    loads = [
        device_spec(name=f"l{i}", kind="load", ramp_up_w_s=50e3, ramp_down_w_s=100e3, **load)
        for i in range(2)
    ]
    miners = [
        device_spec(
            name=f"m{i}",
            kind="miner",
            p_min_w=1750.0,
            p_max_w=3500.0,
            p_idle_w=20.0,
            ramp_up_w_s=2000.0,
            ramp_down_w_s=2000.0,
            dead_time_s=0.5,
            wake_s=2.0,
            sleep_s=1.0,
        )
        for i in range(40)
    ]
    return loads + miners


def _run(
    ph: SitePhysics,
    ctl: Controller,
    shaper: CommandShaper,
    target_w: float,
    seconds: float,
    ceiling: F64 | None,
) -> list[float]:
    """The controller on the simulator's physics (polled every cycle); ground truth out."""
    truth = []
    for _ in range(round(seconds / 0.1)):
        s = Snapshot(
            t=ph.t_s,
            meter_w=ph.meter_w,
            measured_w=ph.reported_w.copy(),
            new_reading=np.ones(ph.n, dtype=np.bool_),
            state=ph.state.copy(),
            row_ceiling_w=ceiling,
        )
        r = ctl.step(s, target_w, 0.1)
        assert r.commanded is not None
        rows = np.flatnonzero(r.commanded)
        cmds = shaper.changed(rows, r.setpoints_w[rows], None if r.sleep is None else r.sleep[rows])
        asleep = cmds.intent == Intent.SLEEP
        ph.command(cmds.rows[asleep], run=0)
        ph.command(cmds.rows[~asleep], setpoint_w=cmds.power_w[~asleep], run=1)
        for _ in range(5):
            ph.step(0.02)
        truth.append(ph.truth())
    return truth


def test_sleepers_are_woken_for_what_a_capped_row_may_not_take() -> None:
    ph = SitePhysics(_loop_specs(), 50e3, dt_s=0.02, meter_noise_w=0.0, drift_fraction=0.0)
    p = ph.fleet_params()
    ctl = Controller(p, deadband_w=2e3)
    shaper = CommandShaper(p.p_idle_w, np.zeros(p.n))
    _run(ph, ctl, shaper, ph.truth(), 2.0, None)
    _run(ph, ctl, shaper, 120e3, 15.0, None)  # below the awake floor: the miners sleep
    assert np.count_nonzero(ph.state == DeviceState.SLEEPING) == 40
    # 450 kW: the two loads alone reach it (500 kW + 50 kW other load), but load 0 is capped
    # at 100 kW, so miners must wake for the last 50 kW.
    ceiling = np.full(p.n, np.inf)
    ceiling[0] = 100e3
    truth = _run(ph, ctl, shaper, 450e3, 25.0, ceiling)
    assert ph.reported_w[0] <= 100e3 + 1e3
    assert np.count_nonzero(ph.state == DeviceState.ON) > 2  # some miners woke
    assert abs(np.mean(truth[-10:]) - 450e3) <= 5e3, truth[-10:]


# -- the store the cycle reads ------------------------------------------------------------------


def test_row_ceilings_by_name_as_one_array_per_image() -> None:
    names = ("za", "zb", "row")
    c = RowCeilings()
    assert c.array(names) is None  # nothing capped: no array at all
    c.set("zb", 400e3)
    a = c.array(names)
    assert a is not None and a.tolist() == [INF, 400e3, INF]
    assert c.array(names) is a  # unchanged: the same array, nothing rebuilt
    assert not a.flags.writeable
    c.set("zb", 400e3)
    assert c.array(names) is a  # the same value is no change
    c.set("za", 0.0)
    b = c.array(names)
    assert b is not None and b is not a and b.tolist() == [0.0, 400e3, INF]
    # Another image (a reload): rows found by name; a name it lacks caps nothing.
    other = ("row", "zb")
    a = c.array(other)
    assert a is not None and a.tolist() == [INF, 400e3]
    c.set("zb", None)
    assert c.array(other) is None and c.get("zb") is None and c.get("za") == 0.0


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_a_ceiling_that_is_not_a_power_is_refused_and_changes_nothing(bad: float) -> None:
    c = RowCeilings()
    c.set("za", 10e3)
    with pytest.raises(ValueError, match="za"):
        c.set("za", bad)
    assert c.get("za") == 10e3
