"""The phased control cycle: snapshot -> step -> hand commands to drivers -> metrics/watchdog.

The cycle never awaits device I/O and never writes the process image: drivers write
telemetry into it through their ports on their own tasks and send their pending commands on
their own tasks, so a slow device cannot stall it. Staleness is the cycle's verdict, made
in its snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from controller.control import Capability, Controller, Snapshot, StepResult
from controller.metrics import Metrics
from controller.row_ceilings import RowCeilings
from controller.target import TargetTracker
from drivers.base import Driver
from drivers.core.command import CommandShaper, Intent
from drivers.core.image import ProcessImage
from drivers.core.state import F64, Bool, DeviceState, counts_by_state

log = logging.getLogger("rampd.cycle")


class MeterSource(Protocol):
    """What the cycle needs of a site meter: its last value and when it was read."""

    @property
    def value_w(self) -> float: ...

    @property
    def at(self) -> float: ...


@dataclass(slots=True)
class CycleOutput:
    """The latest cycle's outcome, read by telemetry and status publishers."""

    t: float
    target_w: float
    meter_w: float
    meter_fresh: bool
    result: StepResult
    capability: Capability
    snapshot: Snapshot

    def counts_by_state(self) -> dict[str, int]:
        """Devices by state as this cycle saw them (staleness included)."""
        return counts_by_state(self.snapshot.state)


class Services(Protocol):
    """What the cycle asks of the grid services (controller.grid.services.GridServices)."""

    @property
    def held(self) -> Bool: ...

    def offset_w(self, now: float) -> float: ...

    def tick(self, now: float, dt: float) -> None: ...


class ControlCycle:
    def __init__(
        self,
        *,
        image: ProcessImage,
        controller: Controller,
        shaper: CommandShaper,
        drivers: Sequence[Driver],
        meter: MeterSource,
        tracker: TargetTracker,
        metrics: Metrics,
        period_s: float,
        telemetry_max_age_s: float,
        meter_max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
        has_meter: bool = True,
        services: Services | None = None,
        ceilings: RowCeilings | None = None,
    ) -> None:
        """``drivers[i]`` owns the rows of ``image.protocols[i]`` (its port's);
        ``ceilings``: caps on single devices set from outside (a zone feed's target)."""
        if [d.port.protocol for d in drivers] != list(image.protocols):
            raise ValueError("drivers must be given in the order of image.protocols")
        self.image = image
        self.controller = controller
        self.shaper = shaper
        self.drivers = tuple(drivers)
        self.meter = meter
        self.tracker = tracker
        self.metrics = metrics
        self.period_s = period_s
        self.telemetry_max_age_s = telemetry_max_age_s
        self.meter_max_age_s = meter_max_age_s
        self.has_meter = has_meter
        self.services = services
        """Grid services: the rows they hold, and what they add to the target."""
        """False: no site meter by design (a parent of zones); its absence is not news."""
        self.ceilings = ceilings
        self.clock = clock
        self.cycles = 0
        self.overruns = 0
        self.last: CycleOutput | None = None
        self._seen_at = np.full(image.n, -np.inf)
        self._last_t: float | None = None
        self._on_tick: list[Callable[[CycleOutput], None]] = []
        self._meter_was_fresh: bool | None = None
        self._sleep_counts = (0, 0)
        self._poke = asyncio.Event()
        self._seen_all = False

    def rebind(
        self,
        *,
        image: ProcessImage,
        controller: Controller,
        shaper: CommandShaper,
        drivers: Sequence[Driver],
    ) -> None:
        """Control a new fleet (a reloaded site file) from the next tick on; the target,
        the meter and the schedule go on. Until every new device has reported, the meter
        residual waits (as at start)."""
        if [d.port.protocol for d in drivers] != list(image.protocols):
            raise ValueError("drivers must be given in the order of image.protocols")
        self.image = image
        self.controller = controller
        self.shaper = shaper
        self.drivers = tuple(drivers)
        self.last = None
        self._seen_at = np.full(image.n, -np.inf)
        self._seen_all = False

    def on_tick(self, callback: Callable[[CycleOutput], None]) -> None:
        """Run after every cycle (watchdog kick, readiness); must be quick and not raise."""
        self._on_tick.append(callback)

    @property
    def all_seen(self) -> bool:
        """Every live device has reported at least once."""
        return self._seen_all

    def _all_seen(self) -> bool:
        if self._seen_all:
            return True
        unseen = np.isnan(self.image.measured_at) & (self.image.state != DeviceState.FAULT)
        self._seen_all = not unseen.any()
        return self._seen_all

    @property
    def planned_w(self) -> F64:
        """The latest cycle's setpoints (p_max before the first)."""
        return self.image.p_max_w if self.last is None else self.last.result.setpoints_w

    def counts_by_state(self) -> dict[str, int]:
        """Devices by state as the latest cycle saw them (the drivers' view before one)."""
        return counts_by_state(self.image.state if self.last is None else self.last.snapshot.state)

    def poke(self) -> None:
        """Run the next cycle now (a new dispatch): saves up to a period of latency."""
        self._poke.set()

    def tick(self, *, early: bool = False) -> CycleOutput:
        now = self.clock()
        dt = self.period_s if self._last_t is None else max(now - self._last_t, 1e-3)
        if early:
            # The device model counts dead times in cycles of about the period; a poked
            # cycle is short, and a short dt would re-derive those counts for one cycle.
            dt = self.period_s
        self._last_t = now
        image = self.image

        # 1. Freeze a snapshot of telemetry and the target; telemetry older than
        # telemetry_max_age_s (or none) makes a device UNKNOWN in the snapshot only.
        state = image.state.copy()
        state[image.stale(now, self.telemetry_max_age_s)] = DeviceState.UNKNOWN
        new_reading = image.measured_at > self._seen_at  # NaN -> False
        self._seen_at[new_reading] = image.measured_at[new_reading]
        meter_fresh = bool(now - self.meter.at <= self.meter_max_age_s)
        meter_w = float(self.meter.value_w) if meter_fresh else float("nan")
        # Until every live device has reported once, the meter residual would count their
        # unknown power as non-flexible load; hold the observer back until then.
        observed_w = meter_w if self._all_seen() else float("nan")
        if self.has_meter and meter_fresh != self._meter_was_fresh:
            log.log(
                logging.INFO if meter_fresh else logging.WARNING,
                "site meter %s",
                "fresh" if meter_fresh else "stale: controlling on device telemetry",
            )
            self._meter_was_fresh = meter_fresh
        snap = Snapshot(
            t=now,
            meter_w=observed_w,
            measured_w=image.measured_w.copy(),
            new_reading=new_reading,
            state=state,
            meter_age_s=max(0.0, now - self.meter.at) if meter_fresh else 0.0,
            delivered_w=image.acked_w.copy(),
            acked_sleep=image.acked_intent == Intent.SLEEP,
            held=None if self.services is None else self.services.held,
            row_ceiling_w=None if self.ceilings is None else self.ceilings.array(image.names),
        )
        target_w = self.tracker.target_w(now)
        if self.services is not None:
            self.services.tick(now, dt)
            target_w += self.services.offset_w(now)

        # 2. Pure control step.
        result = self.controller.step(snap, target_w, dt)
        counts = (result.parked, result.waking)
        # A decision (more or fewer asleep, new wakes), not wakes completing one by one.
        if counts[0] != self._sleep_counts[0] or counts[1] > self._sleep_counts[1]:
            log.info("sleep plan: %d devices told to sleep, %d waking", *counts)
        self._sleep_counts = counts

        # 3. Hand changed commands of the rows the controller decides to their drivers.
        commanded = result.controllable if result.commanded is None else result.commanded
        if snap.held is not None:  # the grid services' rows: never commanded from here
            commanded = commanded & ~snap.held
        ctl = np.flatnonzero(commanded)
        if ctl.size:
            sleep = None if result.sleep is None else result.sleep[ctl]
            changed = self.shaper.changed(ctl, result.setpoints_w[ctl], sleep)
            for owner, commands in image.route(changed):
                self.drivers[owner].submit(commands)

        # 4. Metrics, then the tick callbacks (watchdog).
        capability = self.controller.capability()
        out = CycleOutput(
            t=now,
            target_w=target_w,
            meter_w=meter_w,
            meter_fresh=meter_fresh,
            result=result,
            capability=capability,
            snapshot=snap,
        )
        self.last = out
        m = self.metrics
        m.site_target.set(target_w)
        m.set_site_power(
            meter_w if meter_fresh else result.predicted_site_w, dt, meter_fresh=meter_fresh
        )
        m.noncontrollable.set(result.noncontrollable_w)
        self.cycles += 1
        for cb in self._on_tick:
            cb(out)
        m.cycle_duration.observe(self.clock() - now)
        return out

    async def run(self) -> None:
        """Tick on a fixed monotonic schedule; an overrun skips ahead instead of bunching.
        A poke (new dispatch) ticks at once and restarts the schedule from there."""
        next_t = self.clock()
        early = False
        while True:
            self.tick(early=early)
            next_t += self.period_s
            now = self.clock()
            if now > next_t:
                self.overruns += 1
                self.metrics.cycle_overruns.inc()
                missed = int((now - next_t) / self.period_s) + 1
                next_t += missed * self.period_s
            self._poke.clear()
            try:
                async with asyncio.timeout(next_t - now):
                    await self._poke.wait()
            except TimeoutError:
                early = False
                # Starvation shows here, not in the cycle's work time: a busy loop runs the
                # tick late, however quick the tick itself is.
                self.metrics.cycle_lateness.observe(max(0.0, self.clock() - next_t))
            else:
                early = True
                next_t = self.clock()
