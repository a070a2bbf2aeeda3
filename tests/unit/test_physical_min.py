"""The physical minimum: hand-computed cases, then the simulator's physics must never beat it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from controller.config import DeviceSpec, SimParams
from controller.control.types import FleetParams
from drivers.core.physical_min import physical_min_s, reachable_w
from drivers.core.state import DeviceState
from drivers.sim.physics import SitePhysics
from tests.helpers import device_spec

ON, SLEEPING, WAKING, FAULT = (
    DeviceState.ON,
    DeviceState.SLEEPING,
    DeviceState.WAKING,
    DeviceState.FAULT,
)
RES = 1e-3
"""Default resolution: the answer lies in (exact - RES, exact]."""


def states(*s: DeviceState) -> np.ndarray[Any, np.dtype[np.int8]]:
    return np.array(s, dtype=np.int8)


def lower_bound_of(exact: float, t: float) -> bool:
    """`t` is what bisection should return for an exact answer `exact`."""
    return exact - RES - 1e-9 <= t <= exact + 1e-9


def miner(n: int = 1, **kw: Any) -> FleetParams:
    """An S21-like miner: 3.5 kW, floor 1.75 kW, sleeps to 20 W after 2 s, wakes in 120 s."""
    base: dict[str, Any] = dict(
        p_min_w=1750.0,
        p_max_w=3500.0,
        p_idle_w=20.0,
        ramp_up_w_s=50.0,
        ramp_down_w_s=100.0,
        dead_time_s=1.0,
        wake_s=120.0,
        sleep_s=2.0,
    )
    base.update(kw)
    return FleetParams.of(**{k: [v] * n for k, v in base.items()})


def concat(*ps: FleetParams) -> FleetParams:
    optional = ("capped", "ramps_itself", "services_only")
    fields = [f for f in FleetParams.__dataclass_fields__ if f not in optional]
    return FleetParams(**{f: np.concatenate([getattr(p, f) for p in ps]) for f in fields})


# --- hand-computed cases ---


def test_one_ramping_device_waits_its_dead_time_then_ramps() -> None:
    params = FleetParams.of(
        p_min_w=[0.0], p_max_w=[3000.0], ramp_up_w_s=[100.0], ramp_down_w_s=[100.0],
        dead_time_s=[0.5],
    )  # fmt: skip
    # 1000 W to go at 100 W/s after 0.5 s of dead time, either way.
    down = physical_min_s(params, [2000.0], states(ON), 1000.0, 0.0)
    up = physical_min_s(params, [1000.0], states(ON), 2000.0, 0.0)
    assert lower_bound_of(10.5, down) and lower_bound_of(10.5, up)
    # The band's near edge is what counts: 50 W of tolerance saves 0.5 s.
    assert lower_bound_of(10.0, physical_min_s(params, [2000.0], states(ON), 1000.0, 50.0))
    # The non-flexible load shifts the site, not the devices' reach.
    assert lower_bound_of(
        10.5, physical_min_s(params, [2000.0], states(ON), 6000.0, 0.0, other_w=5000.0)
    )
    assert reachable_w(params, [2000.0], states(ON), 0.5) == (2000.0, 2000.0)
    assert reachable_w(params, [2000.0], states(ON), 5.5) == (1500.0, 2500.0)
    assert reachable_w(params, [2000.0], states(ON), 60.0) == (0.0, 3000.0)


def test_bisection_resolution_is_a_parameter_and_never_overshoots() -> None:
    params = FleetParams.of(
        p_min_w=[0.0], p_max_w=[3000.0], ramp_up_w_s=[100.0], ramp_down_w_s=[100.0],
        dead_time_s=[0.5],
    )  # fmt: skip
    fine = physical_min_s(params, [2000.0], states(ON), 1000.0, 0.0, resolution_s=1e-9)
    assert 10.5 - 1e-9 <= fine <= 10.5
    coarse = physical_min_s(params, [2000.0], states(ON), 1000.0, 0.0, resolution_s=1.0)
    assert 9.5 <= coarse <= 10.5


def test_a_sleepable_miner_beats_its_ramp_by_sleeping() -> None:
    two = miner(2)
    p = [3500.0, 3500.0]
    # One miner asleep (20 W) and one still at 3.5 kW: a sleep takes dead 1 s + sleep_s 2 s.
    t = physical_min_s(two, p, states(ON, ON), 3520.0, 50.0)
    assert lower_bound_of(3.0, t)
    # Without sleep (no sleep/wake latency: not sleepable) both must ramp down 3430 W at
    # 2 x 100 W/s after the dead time.
    ramp_only = miner(2, wake_s=0.0, sleep_s=0.0)
    assert not ramp_only.sleepable.any()
    t_ramp = physical_min_s(ramp_only, p, states(ON, ON), 3520.0, 50.0)
    assert lower_bound_of(1.0 + (7000.0 - 3570.0) / 200.0, t_ramp)
    # Both asleep: 40 W is only reachable by sleeping; never by ramping (floor 3.5 kW).
    assert lower_bound_of(3.0, physical_min_s(two, p, states(ON, ON), 40.0, 1.0))
    assert physical_min_s(ramp_only, p, states(ON, ON), 40.0, 1.0) == math.inf
    # Before its sleep lands the miner's floor is its ramp; from dead + sleep_s, p_idle.
    assert reachable_w(miner(), [3500.0], states(ON), 2.0) == (3400.0, 3500.0)
    assert reachable_w(miner(), [3500.0], states(ON), 3.0) == (20.0, 3500.0)


def test_a_sleeping_device_wakes_then_ramps_from_idle() -> None:
    m = miner()
    # Run command: dead 1 s + wake 120 s at 20 W, then 3480 W at 50 W/s.
    exact = 1.0 + 120.0 + 3480.0 / 50.0
    assert lower_bound_of(exact, physical_min_s(m, [20.0], states(SLEEPING), 3500.0, 0.0))
    # Already waking (its command acted on): only the remaining wake time counts.
    t = physical_min_s(m, [20.0], states(WAKING), 3500.0, 0.0, wake_left_s=[30.0])
    assert lower_bound_of(30.0 + 3480.0 / 50.0, t)
    # Remaining wake time unknown: assume it ends now (still a bound).
    assert lower_bound_of(3480.0 / 50.0, physical_min_s(m, [20.0], states(WAKING), 3500.0, 0.0))
    # A sleeping row cannot go below idle, and before it wakes it cannot go up.
    assert reachable_w(m, [20.0], states(SLEEPING), 100.0) == (20.0, 20.0)
    assert reachable_w(m, [20.0], states(SLEEPING), 131.0) == (20.0, 520.0)
    # wake_left_s of rows that are not WAKING is ignored (the simulator's timer is stale there).
    assert reachable_w(m, [20.0], states(SLEEPING), 131.0, wake_left_s=[np.nan]) == (20.0, 520.0)


def test_a_fault_row_cannot_move_so_the_target_is_out_of_reach() -> None:
    params = FleetParams.of(
        p_min_w=[0.0, 0.0], p_max_w=[5000.0, 5000.0], ramp_up_w_s=[1e3, 1e3],
        ramp_down_w_s=[1e3, 1e3],
    )  # fmt: skip
    p = [5000.0, 1000.0]
    assert physical_min_s(params, p, states(FAULT, ON), 100.0, 50.0) == math.inf
    assert reachable_w(params, p, states(FAULT, ON), 1e6) == (5000.0, 10_000.0)
    assert reachable_w(params, p, states(DeviceState.UNKNOWN, ON), 1e6) == (5000.0, 10_000.0)
    assert lower_bound_of(1.0, physical_min_s(params, p, states(FAULT, ON), 5000.0, 0.0))
    # Reachable, but not within the horizon: inf too.
    assert physical_min_s(params, p, states(FAULT, ON), 5000.0, 0.0, horizon_s=0.5) == math.inf


def test_already_inside_the_band_is_zero() -> None:
    m = miner(3)
    p = [3500.0, 3000.0, 20.0]
    st = states(ON, ON, SLEEPING)
    assert physical_min_s(m, p, st, 6520.0, 0.0) == 0.0
    assert physical_min_s(m, p, st, 6600.0, 100.0) == 0.0
    assert physical_min_s(m, p, st, 7520.0, 0.0, other_w=1000.0) == 0.0
    assert physical_min_s(m, p, st, 6621.0, 100.0) > 0.0


def test_a_mixed_fleet_needs_the_slowest_class_it_uses() -> None:
    gpu = FleetParams.of(
        p_min_w=[40e3], p_max_w=[80e3], p_idle_w=[20e3], ramp_up_w_s=[40e3],
        ramp_down_w_s=[80e3], dead_time_s=[0.5],
    )  # fmt: skip
    load = FleetParams.of(
        p_min_w=[25e3], p_max_w=[250e3], p_idle_w=[5e3], ramp_up_w_s=[50e3],
        ramp_down_w_s=[100e3], dead_time_s=[0.2],
    )  # fmt: skip
    fleet = concat(gpu, load, miner(10))
    p = np.array([80e3, 250e3, *[3500.0] * 10])
    st = np.zeros(12, dtype=np.int8)
    now = float(p.sum())
    # Every class to its floor: GPU at 1.0 s, load at 0.2 + 2.25 = 2.45 s, miners asleep at
    # 3.0 s: the answer is the slowest of them.
    floor = 40e3 + 25e3 + 10 * 20.0
    assert lower_bound_of(3.0, physical_min_s(fleet, p, st, floor, 1.0))
    # 40 kW down: GPU and load share it, faster than either alone (80k (t - 0.5) and
    # 100k (t - 0.2) sum to 40k at t = 100/180 s); the miners are still in their dead time.
    assert lower_bound_of(100.0 / 180.0, physical_min_s(fleet, p, st, now - 40e3, 0.0))
    # A cap (a GPU job needing 60 kW) bounds the way up: 20 kW at 40 kW/s after 0.5 s ...
    p_low = p.copy()
    p_low[0] = 40e3
    cap = np.full(12, np.nan)
    cap[0] = 60e3
    t = physical_min_s(fleet, p_low, st, float(p_low.sum()) + 20e3, 0.0, p_hi_w=cap)
    assert lower_bound_of(1.0, t)
    # ... and nothing above it is reachable (the others are at p_max already).
    up = physical_min_s(fleet, p_low, st, float(p_low.sum()) + 20e3 + 1.0, 0.0, p_hi_w=cap)
    assert up == math.inf


def test_a_row_outside_its_bounds_keeps_its_power_as_that_edge() -> None:
    params = FleetParams.of(
        p_min_w=[1000.0], p_max_w=[10e3], ramp_up_w_s=[1e3], ramp_down_w_s=[1e3]
    )
    # Above its cap (the job shrank): it can only come down, from where it is.
    assert reachable_w(params, [8000.0], states(ON), 2.0, p_hi_w=[5000.0]) == (6000.0, 8000.0)
    assert reachable_w(params, [8000.0], states(ON), 10.0, p_hi_w=[5000.0]) == (1000.0, 8000.0)
    # Below its floor: it can go up but no lower than it is.
    assert reachable_w(params, [500.0], states(ON), 2.0) == (500.0, 2500.0)
    # A cap below p_min cannot hold a running row below p_min.
    assert reachable_w(params, [1000.0], states(ON), 9.0, p_hi_w=[300.0]) == (1000.0, 1000.0)


def test_bad_input_is_refused() -> None:
    m = miner(2)
    with pytest.raises(ValueError, match="shape"):
        physical_min_s(m, [1.0], states(ON, ON), 0.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        physical_min_s(m, [np.nan, 1.0], states(ON, ON), 0.0, 0.0)
    with pytest.raises(ValueError, match="tol_w"):
        physical_min_s(m, [1.0, 1.0], states(ON, ON), 0.0, -1.0)
    with pytest.raises(ValueError, match="wake_left_s"):
        physical_min_s(m, [20.0, 20.0], states(WAKING, ON), 0.0, 0.0, wake_left_s=[np.nan, 0])
    with pytest.raises(ValueError, match="p_hi_w"):
        reachable_w(m, [1.0, 1.0], states(ON, ON), 1.0, p_hi_w=[1.0])


# --- the simulator never beats the bound ---

DT = 0.02


def site_specs() -> list[DeviceSpec]:
    """Three quantized S21-like miners (short wake), two Modbus rows, one GPU rack whose job
    needs 75 % of its 81.6 kW (fixed, so the cap holds for the whole run)."""
    s21: dict[str, Any] = dict(
        p_min_w=1750.0, p_max_w=3500.0, p_idle_w=20.0, step_w=250.0, ramp_up_w_s=50.0,
        ramp_down_w_s=100.0, dead_time_s=1.0, wake_s=6.0, sleep_s=2.0,
    )  # fmt: skip
    row: dict[str, Any] = dict(
        p_min_w=25e3, p_max_w=250e3, p_idle_w=5e3, ramp_up_w_s=50e3, ramp_down_w_s=100e3,
        dead_time_s=0.2,
    )  # fmt: skip
    rack: dict[str, Any] = dict(
        p_min_w=36.8e3, p_max_w=81.6e3, p_idle_w=20e3, ramp_up_w_s=40e3, ramp_down_w_s=80e3,
        dead_time_s=0.5, sim=SimParams(demand_min_frac=0.75, demand_max_frac=0.75),
    )  # fmt: skip
    return [
        *(device_spec(name=f"m{i}", **s21) for i in range(3)),
        *(device_spec(name=f"r{i}", **row) for i in range(2)),
        device_spec(name="g", **rack),
    ]


def settled_site() -> SitePhysics:
    """A site at rest in a mixed state: miners at 3.5 kW, 2.5 kW and asleep; the Modbus
    rows at 150 and 250 kW; the rack capped at 50 kW below its job's 61.2 kW."""
    ph = SitePhysics(site_specs(), 0.0, dt_s=DT)
    ph.command([1], setpoint_w=2500.0)
    ph.command([2], run=0)
    ph.command([3], setpoint_w=150e3)
    ph.command([5], setpoint_w=50e3)
    for _ in range(round(15.0 / DT)):
        ph.step(DT)
    assert ph.state.tolist() == [ON, ON, SLEEPING, ON, ON, ON]
    assert ph.power_w.tolist() == [3500.0, 2500.0, 20.0, 150e3, 250e3, 50e3]
    return ph


def first_inside(ph: SitePhysics, lo: float, hi: float, limit_s: float) -> float | None:
    """Step `ph` until its true power is inside [lo, hi]; the time that took, or None."""
    for k in range(round(limit_s / DT) + 1):
        if lo <= ph.truth() <= hi:
            return k * DT
        ph.step(DT)
    return None


@pytest.mark.parametrize("direction", ["down", "up"])
def test_the_simulator_never_enters_the_band_before_the_bound(direction: str) -> None:
    """Every device is driven flat out toward the band (setpoints at p_min, sleepable rows
    told to sleep; or at p_max, sleeping rows woken): the fastest a controller could try."""
    tol = 5e3  # wider than a miner's sleep step, so no trajectory can jump over the band
    probe = settled_site()
    params = probe.fleet_params()
    far = reachable_w(params, probe.power_w, probe.state, 1e3, p_hi_w=probe.demand_w)
    now = probe.truth()
    checked = 0
    for frac in (0.05, 0.2, 0.5, 0.8, 0.95, 0.999, 1.0):
        edge = far[0] if direction == "down" else far[1]
        target = now + frac * (edge - now)
        ph = settled_site()
        bound = physical_min_s(
            params, ph.power_w, ph.state, target, tol, p_hi_w=ph.demand_w,
            wake_left_s=ph.wake_left_s,
        )  # fmt: skip
        assert 0.0 < bound < math.inf
        if direction == "down":
            ph.command(np.arange(ph.n), setpoint_w=ph.p_min_w, run=0)
            ph.command([3, 4, 5], run=1)  # not sleepable: a controller would not sleep them
        else:
            ph.command(np.arange(ph.n), setpoint_w=ph.p_max_w, run=1)
        seen = first_inside(ph, target - tol, target + tol, bound + 200.0)
        assert seen is not None, f"target {target:.0f} W never reached"
        # Down: the physics matches the model step for step. Up: the woken miner also ramps
        # in the step its wake completes, one step ahead of the continuous model.
        slack = 1e-9 if direction == "down" else DT
        assert seen >= bound - slack, f"{direction} to {target:.0f} W: {seen} < {bound}"
        # And the bound is not vacuous: flat out, the site gets there within ~a second of it
        # (the miners' sleep freezes their power for sleep_s, which the bound's hull skips).
        assert seen <= bound + 1.5
        checked += 1
    assert checked == 7


def random_site(seed: int) -> tuple[SitePhysics, FleetParams, np.ndarray[Any, Any]]:
    """24 random devices (half sleepable, some quantized, some with a job below p_max),
    settled at random setpoints, some asleep, a few of those WAKING at the snapshot."""
    rng = np.random.default_rng(seed)
    n = 24
    p_max = rng.uniform(2e3, 100e3, n)
    p_min = p_max * rng.uniform(0.1, 0.6, n)
    sleepy = rng.random(n) < 0.5
    demand = np.where(rng.random(n) < 0.5, 1.0, rng.uniform(0.65, 1.0, n))
    specs = [
        device_spec(
            name=f"d{i}",
            p_min_w=float(p_min[i]),
            p_max_w=float(p_max[i]),
            p_idle_w=float(0.02 * p_max[i]),
            ramp_up_w_s=float(rng.uniform(0.1, 1.0) * (p_max[i] - p_min[i])),
            ramp_down_w_s=float(rng.uniform(0.1, 1.0) * (p_max[i] - p_min[i])),
            dead_time_s=float(rng.uniform(0.0, 1.5)),
            wake_s=float(rng.uniform(0.5, 5.0)) if sleepy[i] else 0.0,
            sleep_s=float(rng.uniform(0.0, 3.0)) if sleepy[i] else 0.0,
            step_w=float(p_max[i] / 16) if rng.random() < 0.3 else 0.0,
            sim=SimParams(demand_min_frac=demand[i], demand_max_frac=demand[i]),
        )
        for i in range(n)
    ]
    ph = SitePhysics(specs, 0.0, dt_s=DT)
    params = ph.fleet_params()
    assert (params.sleepable == sleepy).all()
    # Settle (every move takes < 15 s); then wake sleepers whose command lands within 1.6 s
    # but whose wake lasts beyond it: at the snapshot they are WAKING, nothing else moves.
    ph.command(np.arange(n), setpoint_w=rng.uniform(p_min, p_max))
    ph.command(np.flatnonzero(sleepy & (rng.random(n) < 0.7)), run=0)
    for _ in range(round(20.0 / DT)):
        ph.step(DT)
    slow = (ph.dead_time_s < 1.5) & (ph.dead_time_s + ph.wake_s > 1.7)
    ph.command(np.flatnonzero((ph.state == SLEEPING) & slow)[::2], run=1)
    for _ in range(round(1.6 / DT)):
        ph.step(DT)
    assert (ph.state == WAKING).any() and (ph.state == SLEEPING).any()
    return ph, params, sleepy


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("controller", ["down", "up", "random"])
def test_no_controller_leaves_the_reachable_range(seed: int, controller: str) -> None:
    """Stronger than the band check: at every step the true total lies within
    [LO(t), HI(t)] computed once from the snapshot, whatever is commanded meanwhile: flat out
    down (p_min, sleepers to sleep), flat out up (p_max, all awake), or a random controller
    that moves a random third of the rows every 0.2 s."""
    ph, params, sleepy = random_site(seed)
    rng = np.random.default_rng([seed, 7])
    n = ph.n
    power, state, left = ph.power_w.copy(), ph.state.copy(), ph.wake_left_s
    # A woken row may run one physics step ahead of the model (see the module docstring).
    slack_hi = DT * float(params.ramp_up_w_s[state != ON].sum()) + 1e-6
    if controller == "down":
        ph.command(np.arange(n), setpoint_w=ph.p_min_w)
        ph.command(np.flatnonzero(sleepy), run=0)
    elif controller == "up":
        ph.command(np.arange(n), setpoint_w=ph.p_max_w, run=1)
    for k in range(1, round(15.0 / DT) + 1):
        if controller == "random" and k % 10 == 1:
            pick = rng.random(n) < 0.33
            ph.command(np.flatnonzero(pick), setpoint_w=rng.uniform(0, 1.2 * ph.p_max_w)[pick])
            stop = rng.random(n) < 0.5
            ph.command(np.flatnonzero(pick & sleepy & stop), run=0)
            ph.command(np.flatnonzero(pick & sleepy & ~stop), run=1)
        ph.step(DT)
        lo, hi = reachable_w(params, power, state, k * DT, p_hi_w=ph.demand_w, wake_left_s=left)
        truth = float(ph.power_w.sum())
        assert lo - 1e-6 <= truth <= hi + slack_hi, (k * DT, lo, truth, hi)
    # Flat out, the site ends at the edge of the range (up: less what quantization rounds
    # off the jobs' demand), so the range is not vacuous.
    if controller == "down":
        assert truth == pytest.approx(lo, abs=1e-6)
    elif controller == "up":
        assert hi - float(ph.step_w.sum()) - 1e-6 <= truth
