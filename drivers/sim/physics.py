"""Vectorized device physics of a simulated site: one numpy row per device, no per-device loops.

Each device follows its commanded setpoint after a dead time, within its ramp-rate limits and
bounds, quantized to its power step; it sleeps (to p_idle after sleep_s) and wakes (after
wake_s) on its run command and reports its power with measurement noise. A device whose
workload varies (a GPU rack: `DeviceSpec.sim`) draws min(setpoint, demand_w), where demand_w is
piecewise constant per job; a device whose demand is its p_max (a miner) draws its setpoint.
Behind the meter sit the devices and a non-flexible load (cooling, auxiliaries) that drifts
slowly. The grid's frequency (`grid`, drivers/sim/grid.py) is stepped with the devices and
served by the meter as `hz`. Protocol servers read and write these arrays directly and consult
`fault` to misbehave on purpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from drivers.core.params import FleetParams
from drivers.core.spec import DeviceSpec
from drivers.core.state import F64, I8, Bool, DeviceState
from drivers.sim.grid import GridFrequency

Index = npt.NDArray[np.intp] | Sequence[int] | int


class Fault(IntEnum):
    """Injected communication faults, consulted by the protocol servers."""

    NONE = 0
    SILENT = 1  # no answer at all
    SLOW = 2  # answers after SLOW_S
    ERROR = 3  # protocol-level error (Modbus exception)
    GARBAGE = 4  # answers with implausible values
    REBOOT = 5  # one-shot: the device restarts and loses its setpoint (cleared by step())
    STUCK = 6  # acknowledges commands and does not act on them (a tuner that never ramps)


SLOW_S = 2.0


class SitePhysics:
    """Struct of arrays stepped by `step(dt)`; `t_s` is simulated time since start.

    `dt_s` is the nominal (smallest) step: the dead-time buffer is sized for it.
    """

    def __init__(
        self,
        specs: Sequence[DeviceSpec],
        noncontrollable_w: float = 0.0,
        *,
        seed: int = 0,
        dt_s: float = 0.02,
        initial_fraction: float = 1.0,
        drift_fraction: float = 0.03,
        drift_period_s: float = 600.0,
        meter_noise_w: float | None = None,
        nominal_hz: float = 60.0,
    ) -> None:
        def col(attr: str) -> F64:
            return np.array([getattr(s, attr) for s in specs], dtype=np.float64)

        self.n = n = len(specs)
        self.names = tuple(s.name for s in specs)
        self.p_min_w = col("p_min_w")
        self.p_max_w = col("p_max_w")
        self.p_idle_w = col("p_idle_w")
        self.ramp_up_w_s = col("ramp_up_w_s")
        self.ramp_down_w_s = col("ramp_down_w_s")
        self.dead_time_s = col("dead_time_s")
        self.wake_s = col("wake_s")
        self.sleep_s = col("sleep_s")
        self.step_w = col("step_w")
        self.services_only: Bool = np.array([s.services_only for s in specs], dtype=np.bool_)
        self.noise_w = col("noise_w")
        self._rng = np.random.default_rng(seed)
        self._all = np.arange(n)

        # Workload demand: jobs of random level in [min, max] * p_max lasting ~job_s each. Its
        # own generator, so the job draws leave the measurement-noise stream (`_rng`) as it
        # would be without them.
        self.demand_min_w = self.p_max_w * [s.sim.demand_min_frac for s in specs]
        self.demand_max_w = self.p_max_w * [s.sim.demand_max_frac for s in specs]
        self.job_s = np.array([s.sim.job_s for s in specs], dtype=np.float64)
        self._varying: Bool = self.demand_max_w > self.demand_min_w
        self.demand_w = self.demand_max_w.copy()
        self._job_left = np.full(n, np.inf)  # inf: this demand holds until changed
        self._job_rng = np.random.default_rng([seed, 1])
        self._new_jobs(self._varying)

        # What the device was told (its registers); factory default is full power, running.
        initial = np.clip(self.p_max_w * float(initial_fraction), self.p_min_w, self.p_max_w)
        self.default_setpoint_w = self.p_max_w.copy()
        self.cmd_setpoint_w = initial.copy()
        self.cmd_run = np.ones(n, dtype=np.int8)
        self._stuck_sp = np.zeros(n)
        self._stuck_run: Bool = np.ones(n, dtype=np.bool_)

        # Dead time: ring buffer of (time, command), sized for twice the largest dead time at
        # the nominal rate so a late step (larger dt) still finds an old enough entry.
        depth = 2 + 2 * math.ceil(float(self.dead_time_s.max(initial=0.0)) / dt_s)
        self._hist_t = np.full(depth, -np.inf)
        self._hist_sp = np.tile(self.cmd_setpoint_w, (depth, 1))
        self._hist_run = np.tile(self.cmd_run, (depth, 1))
        self._head = 0

        self.t_s = 0.0
        self.power_w = self._quantize(np.minimum(initial, self.demand_w))
        self.state: I8 = np.full(n, DeviceState.ON, dtype=np.int8)
        self._stopping: Bool = np.zeros(n, dtype=np.bool_)  # ON, counting down to sleep
        self._timer = np.zeros(n)
        self.reported_w = self.power_w.copy()
        self.fault: I8 = np.zeros(n, dtype=np.int8)
        self.boots = np.zeros(n, dtype=np.int64)
        """Restarts so far per device (`reboot`)."""
        self.meter_fault = Fault.NONE

        # Non-flexible load: mean, slow sinusoidal drift, and AR(1) noise with a 5 s memory.
        self.noncontrollable_mean_w = float(noncontrollable_w)
        self._drift = float(drift_fraction)
        self._drift_period = float(drift_period_s)
        self._drift_phase = float(self._rng.uniform(0.0, 2 * math.pi))
        self._ar = 0.0
        self._ar_sigma = 0.005 * self.noncontrollable_mean_w
        self.noncontrollable_w = self.noncontrollable_mean_w
        scale = float(self.p_max_w.sum()) + self.noncontrollable_mean_w
        self.meter_noise_w = 2e-4 * scale if meter_noise_w is None else float(meter_noise_w)
        self.meter_w = self.truth()
        # Its own generator: the grid's draws leave the measurement-noise stream as it was.
        self.grid = GridFrequency(nominal_hz, seed=[seed, 2])
        self.energy_wh = 0.0
        self._update_readings()

    # --- commands (from protocol servers) ---

    def command(
        self, i: Index, setpoint_w: float | F64 | None = None, run: int | None = None
    ) -> None:
        """What the device is told (its registers: what it reads back). A STUCK device takes
        it and does not act on it."""
        if setpoint_w is not None:
            self.cmd_setpoint_w[i] = setpoint_w
        if run is not None:
            self.cmd_run[i] = 1 if run else 0

    def set_fault(self, i: Index, fault: Fault) -> None:
        self.fault[i] = fault
        if fault is Fault.STUCK:  # acts on what it was doing, whatever it is told next
            self._stuck_sp[i] = self.power_w[i]
            self._stuck_run[i] = self.state[i] != DeviceState.SLEEPING

    def set_demand(self, i: Index, demand_w: float | F64, hold_s: float = math.inf) -> None:
        """Pin the workload demand of `i` for `hold_s` (then random jobs resume, if varying)."""
        self.demand_w[i] = demand_w
        self._job_left[i] = hold_s

    def reboot(self, i: Index) -> None:
        """The device restarts at the next step: its setpoint returns to the default.
        `boots` counts it at once, so a server sees the restart whatever the step does."""
        self.fault[i] = Fault.REBOOT
        np.add.at(self.boots, np.asarray(i, dtype=np.intp), 1)

    # --- stepping ---

    def _new_jobs(self, due: Bool) -> None:
        k = int(due.sum())
        if k == 0:
            return
        self.demand_w[due] = self._job_rng.uniform(self.demand_min_w[due], self.demand_max_w[due])
        self._job_left[due] = self.job_s[due] * self._job_rng.uniform(0.5, 1.5, k)

    def _quantize(self, p: F64) -> F64:
        q = self.step_w > 0
        if not q.any():
            return p
        step = np.where(q, self.step_w, 1.0)
        # Round down (a device never exceeds its target), but not below its minimum.
        return np.where(q, np.maximum(np.floor(p / step + 1e-9) * step, self.p_min_w), p)

    def _effective_command(self) -> tuple[F64, Bool]:
        """The command each device acts on now: the newest one at least dead_time old."""
        depth = len(self._hist_t)
        order = (self._head + np.arange(depth)) % depth  # oldest first
        times = self._hist_t[order]
        idx = np.searchsorted(times, self.t_s - self.dead_time_s + 1e-9, side="right") - 1
        slot = order[np.maximum(idx, 0)]
        return self._hist_sp[slot, self._all], self._hist_run[slot, self._all] > 0

    def step(self, dt: float) -> None:
        self.t_s += dt
        rebooted = self.fault == Fault.REBOOT
        if rebooted.any():
            self.cmd_setpoint_w[rebooted] = self.default_setpoint_w[rebooted]
            self.cmd_run[rebooted] = 1
            self.fault[rebooted] = Fault.NONE

        h = self._head
        self._hist_t[h] = self.t_s
        self._hist_sp[h] = self.cmd_setpoint_w
        self._hist_run[h] = self.cmd_run
        self._head = (h + 1) % len(self._hist_t)
        setpoint, run = self._effective_command()
        stuck = self.fault == Fault.STUCK
        if stuck.any():
            setpoint = np.where(stuck, self._stuck_sp, setpoint)
            run = np.where(stuck, self._stuck_run, run)
        self._job_left -= dt
        self._new_jobs(self._varying & (self._job_left <= 0.0))

        st = self.state
        on = st == DeviceState.ON
        # ON -> (sleep_s, still drawing power) -> SLEEPING at p_idle; a run command cancels.
        start = on & ~run & ~self._stopping
        self._timer[start] = self.sleep_s[start]
        self._stopping |= start
        self._stopping &= ~run
        # SLEEPING -> WAKING (wake_s at p_idle) -> ON; a sleep command aborts the wake.
        sleeping = st == DeviceState.SLEEPING
        wake = sleeping & run
        st[wake] = DeviceState.WAKING
        self._timer[wake] = self.wake_s[wake]
        st[(st == DeviceState.WAKING) & ~run] = DeviceState.SLEEPING

        counting = self._stopping | (st == DeviceState.WAKING)
        self._timer[counting] -= dt
        done = counting & (self._timer <= 1e-9)
        asleep = done & self._stopping
        st[asleep] = DeviceState.SLEEPING
        self._stopping[asleep] = False
        st[done & (st == DeviceState.WAKING)] = DeviceState.ON

        running = (st == DeviceState.ON) & ~self._stopping
        # A cap is a ceiling: the device draws what its job needs, up to the cap.
        cap = np.clip(setpoint, self.p_min_w, self.p_max_w)
        target = self._quantize(np.minimum(cap, self.demand_w))
        move = np.clip(target - self.power_w, -self.ramp_down_w_s * dt, self.ramp_up_w_s * dt)
        p = np.where(running, self.power_w + move, self.power_w)
        idle = (st == DeviceState.SLEEPING) | (st == DeviceState.WAKING)
        self.power_w = np.where(idle, self.p_idle_w, p)

        # Non-flexible load.
        rho = math.exp(-dt / 5.0)
        self._ar = rho * self._ar + self._ar_sigma * math.sqrt(1 - rho * rho) * float(
            self._rng.standard_normal()
        )
        w = 2 * math.pi * self.t_s / self._drift_period
        drift = self._drift * (math.sin(w + self._drift_phase) + 0.3 * math.sin(3.7 * w))
        self.noncontrollable_w = max(0.0, self.noncontrollable_mean_w * (1 + drift) + self._ar)

        self.energy_wh += self.truth() * dt / 3600.0
        self.grid.step(dt)
        self._update_readings()

    def _update_readings(self) -> None:
        self.reported_w = self.power_w + self.noise_w * self._rng.standard_normal(self.n)
        self.meter_w = self.truth() + self.meter_noise_w * float(self._rng.standard_normal())

    @property
    def hz(self) -> float:
        """The grid frequency now: a change of grid mode shows at the next read, not the
        next step."""
        return self.grid.hz

    # --- ground truth ---

    @property
    def wake_left_s(self) -> F64:
        """Seconds each WAKING row still waits before it runs (0 elsewhere); a copy."""
        waking = self.state == DeviceState.WAKING
        out: F64 = np.where(waking, np.maximum(self._timer, 0.0), 0.0)
        return out

    def fleet_params(self) -> FleetParams:
        """The devices' static columns as the regular control takes them (devices only the
        grid services move, feeder breakers, are not its to sleep or wake)."""
        return FleetParams.of(
            p_min_w=self.p_min_w,
            p_max_w=self.p_max_w,
            p_idle_w=self.p_idle_w,
            ramp_up_w_s=self.ramp_up_w_s,
            ramp_down_w_s=self.ramp_down_w_s,
            dead_time_s=self.dead_time_s,
            step_w=self.step_w,
            wake_s=self.wake_s,
            sleep_s=self.sleep_s,
            services_only=self.services_only,
        )

    def truth(self) -> float:
        """True site power W: every device plus the non-flexible load, without meter noise."""
        return float(self.power_w.sum()) + self.noncontrollable_w
