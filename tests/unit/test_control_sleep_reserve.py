"""Sleep planning and the fast reserve, in closed loop with the simulator's own physics.

The plant is `drivers.sim.physics.SitePhysics` (what `rampd sim` serves); the "driver" here
does what the LuxOS driver does on the wire: a setpoint below a sleepable device's p_min
sleeps it, any other wakes it and sets its power. Polls are every `POLL_S`, the meter is read
every cycle.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from controller.config import DeviceSpec
from controller.control import Controller, FleetParams, Snapshot, StepResult
from drivers.core.command import Commands, CommandShaper, Intent
from drivers.core.state import DeviceState
from drivers.sim.physics import SitePhysics
from tests.helpers import device_spec

DT = 0.1
SUB = 5  # physics steps per control cycle
POLL_S = 1.0


def miner(i: int) -> DeviceSpec:
    return device_spec(
        name=f"m{i}",
        kind="miner",
        p_min_w=1750.0,
        p_max_w=3500.0,
        p_idle_w=20.0,
        ramp_up_w_s=50.0,
        ramp_down_w_s=100.0,
        dead_time_s=1.0,
        wake_s=8.0,
        sleep_s=2.0,
        step_w=250.0,
    )


def load(i: int) -> DeviceSpec:
    return device_spec(
        name=f"l{i}",
        kind="load",
        p_min_w=25e3,
        p_max_w=250e3,
        p_idle_w=5e3,
        ramp_up_w_s=50e3,
        ramp_down_w_s=100e3,
        dead_time_s=0.2,
    )


class Loop:
    """Controller + command shaper + a LuxOS-like driver + the simulator's physics."""

    def __init__(
        self,
        specs: list[DeviceSpec],
        *,
        reserve_up_w: float = 0.0,
        reserve_down_w: float = 0.0,
        per_cycle: int | None = None,
    ) -> None:
        """``per_cycle``: the driver delivers at most this many commands a cycle (sleeps
        first, as the real drivers do) and the controller learns of each at delivery."""
        self.ph = SitePhysics(specs, 50e3, dt_s=DT / SUB, meter_noise_w=0.0, drift_fraction=0.0)
        self.p = self.ph.fleet_params()
        self.ctl = Controller(
            self.p, deadband_w=2e3, reserve_up_w=reserve_up_w, reserve_down_w=reserve_down_w
        )
        self.shaper = CommandShaper(self.p.p_idle_w, np.zeros(self.p.n))
        self.per_cycle = per_cycle
        self.mailbox: dict[int, tuple[float, int]] = {}
        self.delivered = np.full(self.p.n, np.nan)
        self.delivered_sleep = np.zeros(self.p.n, dtype=np.bool_)
        self.results: list[StepResult] = []
        self.sent: list[Commands] = []
        self.t = 0.0
        self.measured = self.ph.reported_w.copy()
        self.state = self.ph.state.copy()
        self.truth: list[float] = []

    def run(self, target_w: float, seconds: float) -> None:
        for _ in range(round(seconds / DT)):
            polled = (
                np.ones(self.p.n, dtype=np.bool_)
                if math.isclose(self.t % POLL_S, 0.0, abs_tol=1e-6)
                else np.zeros(self.p.n, dtype=np.bool_)
            )
            self.measured[polled] = self.ph.reported_w[polled]
            self.state[polled] = self.ph.state[polled]
            snap = Snapshot(
                t=self.t,
                meter_w=self.ph.meter_w,
                measured_w=self.measured.copy(),
                new_reading=polled,
                state=self.state.copy(),
                delivered_w=None if self.per_cycle is None else self.delivered.copy(),
                acked_sleep=None if self.per_cycle is None else self.delivered_sleep.copy(),
            )
            r = self.ctl.step(snap, target_w, DT)
            self.results.append(r)
            assert r.commanded is not None
            rows = np.flatnonzero(r.commanded)
            sleep = None if r.sleep is None else r.sleep[rows]
            cmds = self.shaper.changed(rows, r.setpoints_w[rows], sleep)
            if self.per_cycle is not None:
                cmds = self._deliver(cmds, self.per_cycle)
            self.sent.append(cmds)
            asleep = cmds.intent == Intent.SLEEP
            rows, values = cmds.rows, cmds.power_w
            self.ph.command(rows[asleep], run=0)
            self.ph.command(rows[~asleep], setpoint_w=values[~asleep], run=1)
            for _ in range(SUB):
                self.ph.step(DT / SUB)
            self.t = round(self.t + DT, 9)
            self.truth.append(self.ph.truth())

    def _deliver(self, cmds: Commands, k: int) -> Commands:
        """Queue the new commands (latest wins); deliver the first k, sleeps first."""
        new = zip(cmds.power_w.tolist(), cmds.intent.tolist(), strict=True)
        self.mailbox.update(zip(cmds.rows.tolist(), new, strict=True))
        queued = sorted(self.mailbox, key=lambda r: self.mailbox[r][1] != Intent.SLEEP)
        out = np.array(queued[:k], dtype=np.intp)
        taken = [self.mailbox.pop(r) for r in out.tolist()]
        vals = np.array([v for v, _ in taken], dtype=np.float64)
        intent = np.array([i for _, i in taken], dtype=np.int8)
        self.delivered[out] = vals
        self.delivered_sleep[out] = intent == Intent.SLEEP
        return Commands(out, vals, intent)

    def settle_s(self, target_w: float, tol_w: float, since: int) -> float | None:
        err = np.abs(np.array(self.truth[since:]) - target_w) > tol_w
        if err[-1]:
            return None
        bad = np.flatnonzero(err)
        return 0.0 if bad.size == 0 else float(bad[-1] + 1) * DT


def fleet(n_miners: int = 40, n_loads: int = 2) -> list[DeviceSpec]:
    return [load(i) for i in range(n_loads)] + [miner(i) for i in range(n_miners)]


def test_a_target_below_the_awake_floor_sleeps_just_enough_miners_and_settles_fast() -> None:
    loop = Loop(fleet())
    loop.run(loop.ph.truth(), 3.0)
    # Floor with every miner at its lowest profile: 2 x 25 kW + 40 x 1.75 kW + 50 kW = 170 kW.
    target = 130e3  # 40 kW below it
    start = len(loop.truth)
    loop.run(target, 30.0)
    # Profiles alone cannot get there at all. Sleep lands after dead + sleep_s = 3 s, when
    # the awake miners have ramped down only 0.2 kW each (to 3.3 kW): with the loads at
    # their floor, 130 - 50 - 50 = 30 kW is left for the miners, so 32 must sleep
    # ((40 - k) * 3.3 + k * 0.02 <= 30), not the 23 the steady-state floor would suggest.
    asleep = int(np.count_nonzero(loop.ph.state == DeviceState.SLEEPING))
    assert 30 <= asleep <= 34, asleep
    settle = loop.settle_s(target, 3e3, start)
    assert settle is not None and settle <= 5.0, settle
    # No chatter: the same miners stay asleep, nobody is woken.
    before = loop.ph.state.copy()
    loop.run(target, 10.0)
    assert np.array_equal(before == DeviceState.SLEEPING, loop.ph.state == DeviceState.SLEEPING)


def test_a_target_profiles_reach_only_slowly_is_reached_by_sleep_at_its_speed() -> None:
    loop = Loop(fleet())
    loop.run(loop.ph.truth(), 3.0)
    # Above the 170 kW floor, so profiles could get there: loads to 50 kW and the miners
    # from 3.5 kW to 2.5 kW each, at 100 W/s, in 11 s. Ten miners asleep get there when
    # the sleep lands (dead 1 s + sleep 2 s): (40 - 10) x 3.3 kW (ramped 2 s) <= 100 kW.
    target = 200e3
    start = len(loop.truth)
    loop.run(target, 20.0)
    assert 8 <= np.count_nonzero(loop.ph.state == DeviceState.SLEEPING) <= 14
    settle = loop.settle_s(target, 0.02 * target, start)
    assert settle is not None and settle <= 4.0, settle


def test_sleep_hands_the_down_reserve_back_in_steps_that_stay_inside_the_band() -> None:
    loop = Loop(fleet(), reserve_down_w=100e3)
    loop.run(loop.ph.truth(), 3.0)
    # The loads alone get there in 2 s; holding 100 kW of down reserve then needs them
    # higher, where only the miners' sleep makes room fast: one or two at a time, each
    # landing a step the loads meet by ramping, small enough to keep the site in its band.
    target = 300e3
    start = len(loop.truth)
    loop.run(target, 30.0)
    tol = 0.02 * target
    settle = loop.settle_s(target, tol, start)
    assert settle is not None and settle <= 2.5, settle
    assert np.count_nonzero(loop.ph.state == DeviceState.SLEEPING) >= 8
    assert loop.ctl.capability((5.0,)).down_w[0] >= 100e3


def test_sleeps_acknowledged_over_a_burst_settle_without_undershoot() -> None:
    # 400 miners, commands delivered 40 a cycle: the sleeps are acknowledged over about a
    # second and land as a staircase 3 s later; the controller learns of each sleep only at
    # its acknowledgement. Once in its band the site must stay there. (This small loop does
    # not need the fast tier to climb back after the landings, so it does not tell how early
    # the fast tier starts rising; the ramp bench's deep steps do.)
    loop = Loop(fleet(n_miners=400, n_loads=2), per_cycle=40)
    loop.run(loop.ph.truth(), 3.0)
    target = 400e3  # from about 1.5 MW: most miners asleep, the loads carry the rest
    start = len(loop.truth)
    loop.run(target, 15.0)
    asleep = np.count_nonzero(loop.ph.state == DeviceState.SLEEPING)
    assert asleep >= 250, asleep
    after = np.array(loop.truth[start:]) - target
    tol = 0.02 * target
    settle = loop.settle_s(target, tol, start)
    assert settle is not None and settle <= 5.0, settle
    # Once in the band, never below it: no undershoot after the staircase.
    first_in = int(np.flatnonzero(np.abs(after) <= tol)[0])
    assert after[first_in:].min() >= -tol, after[first_in:].min()


def test_a_target_above_the_awake_range_wakes_sleepers_at_once() -> None:
    loop = Loop(fleet())
    loop.run(loop.ph.truth(), 3.0)
    loop.run(80e3, 20.0)  # far below the floor: every miner sleeps
    assert np.count_nonzero(loop.ph.state == DeviceState.SLEEPING) == 40
    top = 2 * 250e3 + 40 * 3500.0 + 50e3
    start = len(loop.truth)
    loop.run(top, 90.0)
    # Woken at once (wake 8 s + dead 1 s), then profiles ramp up 1.75 kW at 50 W/s.
    assert np.count_nonzero(loop.ph.state == DeviceState.ON) == 42
    settle = loop.settle_s(top, 0.02 * top, start)
    assert settle is not None and settle <= 9.0 + 3500.0 / 50.0 + 5.0, settle


def test_fast_reserve_keeps_headroom_on_the_fast_devices() -> None:
    specs = fleet(n_miners=60, n_loads=2)
    # At 640 kW the merit order (ties by index) puts both loads near full power (485 kW,
    # the miners at their 105 kW floor) and leaves the miners' slow profiles as the only
    # way up. Holding 100 kW (+10 % spare) moves 110 kW of it onto the miners (200 kW).
    target = 640e3
    plain = Loop(specs)
    plain.run(target, 60.0)
    held = Loop(specs, reserve_up_w=100e3)
    held.run(target, 60.0)
    up_plain = plain.ctl.capability((5.0,)).up_w[0]
    up_held = held.ctl.capability((5.0,)).up_w[0]
    assert up_plain < 50e3, up_plain
    assert up_held >= 100e3, up_held
    # Both still deliver the target; the reserve moved power from the loads to the miners.
    for loop in (plain, held):
        assert abs(loop.truth[-1] - target) <= 5e3
    assert held.ph.power_w[:2].sum() < plain.ph.power_w[:2].sum() - 80e3


def test_capability_counts_sleep_as_a_fast_way_down_and_sleepers_in_the_maximum() -> None:
    loop = Loop(fleet(n_miners=10, n_loads=0))
    loop.run(loop.ph.truth(), 3.0)
    cap = loop.ctl.capability((1.0, 5.0))
    # Within 1 s nothing moves (dead time 1 s); within 5 s every miner can be asleep.
    assert cap.down_w[0] == pytest.approx(0.0, abs=1.0)
    assert cap.down_w[1] == pytest.approx(10 * (3500.0 - 20.0), rel=0.01)
    assert cap.min_w == pytest.approx(10 * 20.0 + 50e3, rel=0.01)
    loop.run(50e3, 10.0)  # all asleep
    cap = loop.ctl.capability((5.0,))
    assert cap.max_w == pytest.approx(10 * 3500.0 + 50e3, rel=0.01)
    assert cap.up_w[0] == pytest.approx(0.0, abs=1.0)  # nothing awake to ramp


def test_commands_go_out_as_planned_sleep_typed_only_where_a_device_can_sleep() -> None:
    # Miners (quantized, sleepable) beside containers (continuous, no sleep): down to where
    # most miners sleep and back up, commands checked as they leave the shaper.
    loop = Loop(fleet(n_miners=40, n_loads=1), per_cycle=10)
    loop.run(60e3, 20.0)
    loop.run(150e3, 20.0)
    p = loop.p
    slept = np.zeros(p.n, dtype=np.bool_)
    for c in loop.sent:
        sleep = c.intent == Intent.SLEEP
        slept[c.rows[sleep]] = True
        np.testing.assert_array_equal(c.power_w[sleep], p.p_idle_w[c.rows[sleep]])
        run, w = c.rows[~sleep], c.power_w[~sleep]
        # In bounds and on the grid as planned: nothing clamps or quantizes on the way out.
        assert (w >= p.p_min_w[run] - 1e-6).all() and (w <= p.p_max_w[run] + 1e-6).all()
        q = p.step_w[run] > 0
        steps = (w[q] - 0.0) / p.step_w[run][q]
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-6)
    assert slept.any() and not (slept & ~p.sleepable).any()
    assert all(r.sleep is None or not (r.sleep & ~p.sleepable).any() for r in loop.results)


def test_a_mixed_fleet_sleeps_its_quickest_sleepers_and_wakes_its_quickest_wakers_first() -> None:
    from controller.control.allocate import merit_order
    from controller.control.sleep import SleepPlanner

    # Rows 0-1 sleep in 3 s (LuxOS-like), rows 2-3 in 5 s and wake later (Braiins-like): the
    # same priority, so only speed tells them apart (index order alone would pick 2-3).
    params = FleetParams.of(
        p_min_w=[1750.0] * 4,
        p_max_w=[3500.0] * 4,
        p_idle_w=[20.0] * 4,
        ramp_up_w_s=[50.0] * 4,
        ramp_down_w_s=[100.0] * 4,
        dead_time_s=[1.0, 1.0, 2.0, 2.0],
        sleep_s=[2.0, 2.0, 3.0, 3.0],
        wake_s=[120.0, 120.0, 90.0, 90.0],
    )
    planner = SleepPlanner(params, merit_order(params.priority))
    ctrl = np.ones(4, dtype=np.bool_)
    gain = np.full(4, 3480.0)
    rows = planner.park(5000.0, ctrl, 0.0, np.full(4, 3500.0), gain)
    assert sorted(rows.tolist()) == [0, 1]
    state = np.full(4, DeviceState.SLEEPING, dtype=np.int8)
    planner.parked[:] = True
    woken = planner.unpark(3000.0, state)
    assert woken.tolist() == [2]  # the 90 s wakers come back first


def test_the_planner_weighs_each_sleep_latency_and_parks_only_what_lands_in_time() -> None:
    from controller.control.allocate import merit_order
    from controller.control.sleep import MAX_LANDINGS, SleepPlanner

    # Rows 0-1 land 3 s out, rows 2-3 5 s, row 4 120 s (stock firmware); row 5 cannot sleep.
    params = FleetParams.of(
        p_min_w=[1750.0] * 6,
        p_max_w=[3500.0] * 6,
        p_idle_w=[20.0] * 5 + [1750.0],
        ramp_up_w_s=[50.0] * 6,
        ramp_down_w_s=[100.0] * 6,
        dead_time_s=[1.0, 1.0, 2.0, 2.0, 60.0, 1.0],
        sleep_s=[2.0, 2.0, 3.0, 3.0, 60.0, 0.0],
        wake_s=[120.0] * 5 + [0.0],
    )
    planner = SleepPlanner(params, merit_order(params.priority))
    assert planner.landings.tolist() == [3.0, 5.0, 120.0]
    ctrl = np.ones(6, dtype=np.bool_)
    gain = np.full(6, 3480.0)
    assert planner.covers(2 * 3480.0, ctrl, gain, 3.0)
    assert not planner.covers(3 * 3480.0, ctrl, gain, 3.0)
    assert planner.covers(5 * 3480.0, ctrl, gain, 120.0)
    assert not planner.covers(6 * 3480.0, ctrl, gain, 1e9)  # row 5 never sleeps
    # More than it can cover by 3 s: it parks what lands by then, nothing slower.
    rows = planner.park(4 * 3480.0, ctrl, 0.0, np.full(6, 3500.0), gain, 3.0)
    assert sorted(rows.tolist()) == [0, 1]
    # A fleet with a latency per device weighs a few of them, the slowest always.
    many = FleetParams.of(
        p_min_w=[1.0] * 50,
        p_max_w=[2.0] * 50,
        p_idle_w=[0.0] * 50,
        ramp_up_w_s=[1.0] * 50,
        ramp_down_w_s=[1.0] * 50,
        dead_time_s=np.linspace(1.0, 50.0, 50),
        sleep_s=[1.0] * 50,
        wake_s=[10.0] * 50,
    )
    landings = SleepPlanner(many, merit_order(many.priority)).landings
    assert 2 <= landings.size <= MAX_LANDINGS
    assert landings[0] == 2.0 and landings[-1] == 51.0
    assert np.all(np.diff(landings) > 0)


def test_wakes_the_target_no_longer_needs_are_called_off() -> None:
    loop = Loop(fleet())
    loop.run(loop.ph.truth(), 3.0)
    loop.run(80e3, 20.0)  # every miner asleep
    top = 2 * 250e3 + 40 * 3500.0 + 50e3
    loop.run(top, 2.0)  # the sleepers are woken at once (a wake takes 8 s)
    assert np.count_nonzero(loop.ph.state == DeviceState.WAKING) == 40
    # Back down to what the loads alone hold: none of the wakes is needed any more, and a
    # miner let finish its wake would come up above the target and have to sleep again.
    start = len(loop.truth)
    loop.run(300e3, 20.0)
    assert np.count_nonzero(loop.ph.state == DeviceState.ON) == 2  # the loads only
    settle = loop.settle_s(300e3, 0.02 * 300e3, start)
    assert settle is not None and settle <= 5.0, settle


def slow_miner(i: int) -> DeviceSpec:
    """Braiins-like: the pause lands 5 s after the command (a LuxOS-like one: 3 s)."""
    return dataclasses.replace(miner(i), name=f"s{i}", dead_time_s=2.0, sleep_s=3.0, wake_s=90.0)


def test_a_deep_step_is_not_held_back_for_slower_sleepers_to_keep_the_reserve() -> None:
    # Reaching 175 kW needs the loads at their floor and the quick miners asleep (3 s); with
    # the loads kept out of their down-reserve slice it would also need the slow miners
    # (5 s). The step goes at the quick miners' speed; the slice comes back after.
    specs = fleet(n_miners=40, n_loads=2) + [slow_miner(i) for i in range(20)]
    loop = Loop(specs, reserve_down_w=150e3)
    loop.run(loop.ph.truth(), 3.0)
    start = len(loop.truth)
    target = 175e3
    loop.run(target, 30.0)
    settle = loop.settle_s(target, 10e3, start)
    assert settle is not None and settle <= 4.0, settle
    # The slice is handed back in the end: the slow miners sleep too, and the loads hold
    # all they can above their floor as the down reserve.
    slow = np.arange(42, 62)
    assert np.all(loop.ph.state[slow] == DeviceState.SLEEPING)
    room = float(loop.ph.power_w[:2].sum()) - 2 * 25e3
    assert room > 50e3
    assert loop.ctl.capability((5.0,)).down_w[0] >= 0.9 * room


def stock_miner(i: int) -> DeviceSpec:
    """Stock-firmware-like: presets only (normal and low power), and a mode change takes a
    minute before power moves and another before the boards stop (asleep 120 s out)."""
    return dataclasses.replace(
        miner(i),
        name=f"st{i}",
        p_min_w=2625.0,
        step_w=875.0,
        dead_time_s=60.0,
        sleep_s=60.0,
        wake_s=120.0,
    )


def test_a_deep_step_sizes_its_quick_sleepers_against_where_the_rest_is_when_they_land() -> None:
    # 40 quick miners (asleep 3 s after the command) and 10 stock ones (120 s). At 150 kW the
    # loads are at their floor (50 kW) and the stock miners still at 3.5 kW when the quick
    # ones land, so at most 4 quick miners may stay awake:
    # 50 + 50 (non-flexible) + 35 + k x 3.3 <= 150 + 3 (the band). Sized against where
    # everyone could be when the stock miners land (each at its floor), 27 would sleep and
    # the site would sit ~28 kW above the band until feedback slept more, 3 s later.
    specs = fleet(n_miners=40, n_loads=2) + [stock_miner(i) for i in range(10)]
    loop = Loop(specs)
    loop.run(loop.ph.truth(), 3.0)
    start = len(loop.truth)
    target = 150e3
    loop.run(target, 10.0)
    in_band = np.abs(np.array(loop.truth[start:]) - target) <= 0.02 * target
    assert in_band.any(), f"never in the band; at {loop.truth[-1] / 1e3:.1f} kW"
    first = int(np.argmax(in_band))
    assert (first + 1) * DT <= 4.0, (first + 1) * DT
    assert in_band[first:].all()  # and it stays there
    quick = np.arange(2, 42)
    assert np.count_nonzero(loop.ph.state[quick] == DeviceState.SLEEPING) >= 36
