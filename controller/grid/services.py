"""Autonomous grid services: fast frequency response (FFR), load on under-frequency relays
(UFR) and droop (primary frequency response, PFR).

FFR and UFR act on their own, on the frequency's event path: every sample comes here at once
(`on_sample`); CONFIRM_SAMPLES plausible samples in a row at or below a service's trigger
deploy it there and then, without waiting for the control cycle. A deployment sheds the armed
amount on devices that can physically do it within the service's deadline (feeder breakers
first, then other devices whose dead time plus sleep fits), holds them out of regular control
and lowers the control target by what they drew, so the rest of the site does not make up for
it. It ends after `sustain_s` or when recalled; restoration is staggered under the ramp limits
(one feeder at a time, the target offset handed back at the limited rate): no step back to
full load.

Only such fast devices count toward what can be armed (`armable_w`); feeders that only the
services move (`services_only`) are kept closed while nothing is deployed, so the armed load
keeps running. Droop moves the target with frequency outside its deadband, up to `band_kw`
each way, every cycle.

Frequency within ride-through (58.8-61.2 Hz on a 60 Hz grid) never makes rampd trip anything
by itself: only these armed services act.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from controller.config import RampLimitsConfig, ServicesConfig
from controller.grid.frequency import Sample
from drivers.core.command import Commands, Intent
from drivers.core.image import ProcessImage
from drivers.core.state import Bool, DeviceState, Rows

log = logging.getLogger("rampd.grid")

CONFIRM_SAMPLES = 2
"""Plausible samples in a row at or below a trigger before a deployment: one noisy sample
never sheds load (at 20 samples a second this costs at most 50 ms of the deadline)."""
RESPONSE_AFTER_S = (0.25, 0.5, 1.0)
"""When the site's response is sampled for the deployment's record."""
DEFAULT_RESTORE_S = 30.0
"""Without ramp limits, a deployment's load comes back spread over this long."""
REARM_MARGIN_HZ = 0.05
"""After a deployment ends, the service arms again only once frequency has recovered this far
above its trigger: a recall during the event must not deploy it again at the next sample."""
KEEP_CLOSED_EVERY_S = 5.0
"""How often a services-only device found open (not deployed) is told to close again."""


@dataclass
class Deployment:
    """One deployment and the evidence a site gives its QSE: the meter before, after
    0.25 s, 0.5 s and 1 s, and at the end."""

    service: str
    at: float
    """Monotonic time of the first sample at or below the trigger."""
    unix: float
    hz: float
    armed_w: float
    rows: Rows
    expected_w: float
    """What the shed devices drew when they were told (the target is lowered by this)."""
    before_w: float
    response_w: dict[float, float] = field(default_factory=dict)
    ends_at: float = math.inf
    ended_at: float | None = None
    end_w: float | None = None
    ended_by: str = ""


@dataclass
class Service:
    name: str
    armed_w: float
    trigger_hz: float
    deadline_s: float
    sustain_s: float
    below: int = 0
    first_below_at: float = math.nan
    deployment: Deployment | None = None
    deployments: int = 0
    rearm_pending: bool = False


class GridServices:
    """FFR, UFR and droop for one site. `submit` hands commands (by fleet row) to the
    drivers at once; `meter_w()` is the site meter now (NaN when stale)."""

    def __init__(
        self,
        cfg: ServicesConfig,
        ramp: RampLimitsConfig,
        *,
        nominal_hz: float,
        site_max_w: float,
        image: ProcessImage,
        submit: Callable[[Commands], None],
        meter_w: Callable[[], float],
        on_end: Callable[[Deployment], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.services = {
            "ffr": Service(
                "ffr", cfg.ffr.armed_kw * 1e3, cfg.ffr.trigger_hz, cfg.ffr.deadline_s,
                cfg.ffr.sustain_s,
            ),
            "ufr": Service(
                "ufr", cfg.ufr.armed_kw * 1e3, cfg.ufr.trigger_hz, cfg.ufr.deadline_s,
                cfg.ufr.sustain_s,
            ),
        }  # fmt: skip
        self.pfr = cfg.pfr
        self.nominal_hz = nominal_hz
        self.site_max_w = site_max_w
        self.image = image
        self._submit = submit
        self._meter_w = meter_w
        self._on_end = on_end
        self._clock = clock
        self._restore_w_s = _restore_rate_w_s(ramp)
        self._held_by_deployment = np.zeros(image.n, dtype=np.bool_)
        self._restore_at = np.full(image.n, np.inf)  # when a shed device is told to run again
        self._offset_w = 0.0  # target offset of deployments, handed back at the limited rate
        self._restoring_w = 0.0
        self._rate_w_s = 0.0
        self._closed_told_at = np.full(image.n, -np.inf)
        self.hz = math.nan
        self.hz_at = math.nan

    # --- the event path ---

    def on_sample(self, s: Sample) -> None:
        """One frequency sample: deploy a service whose trigger it confirms."""
        if s.plausible:
            self.hz, self.hz_at = s.hz, s.at
        for svc in self.services.values():  # FFR first: the stricter deadline
            if svc.rearm_pending and s.plausible and s.hz >= svc.trigger_hz + REARM_MARGIN_HZ:
                svc.rearm_pending = False
            if svc.deployment is not None or svc.armed_w <= 0.0 or svc.rearm_pending:
                svc.below = 0
                continue
            if not (s.plausible and s.hz <= svc.trigger_hz):
                svc.below = 0
                continue
            if svc.below == 0:
                svc.first_below_at = s.at
            svc.below += 1
            if svc.below >= CONFIRM_SAMPLES:
                self._deploy(svc, s)

    def _deploy(self, svc: Service, s: Sample) -> None:
        img = self.image
        rows = self._pick(svc)
        expected = float(img.measured_w[rows].sum())
        now = self._clock()
        d = Deployment(
            service=svc.name,
            at=svc.first_below_at,
            unix=time.time() - (now - svc.first_below_at),
            hz=s.hz,
            armed_w=svc.armed_w,
            rows=rows,
            expected_w=expected,
            before_w=self._meter_w(),
            ends_at=svc.first_below_at + svc.sustain_s,
        )
        svc.deployment, svc.below = d, 0
        svc.deployments += 1
        if rows.size:
            self._submit(
                Commands(rows, img.p_idle_w[rows].copy(), np.full(rows.size, Intent.SLEEP, np.int8))
            )
        self._held_by_deployment[rows] = True
        self._restore_at[rows] = np.inf
        self._offset_w -= expected
        level = logging.WARNING if expected < svc.armed_w else logging.INFO
        log.log(
            level,
            "%s deployed at %.3f Hz: %d devices shed (%.1f kW of %.1f kW armed)",
            svc.name.upper(),
            s.hz,
            rows.size,
            expected / 1e3,
            svc.armed_w / 1e3,
        )

    def _pick(self, svc: Service) -> Rows:
        """Devices to shed for `svc`: feeders only the services move first, then the other
        fast ones, largest first, until the armed amount is covered."""
        img = self.image
        cand = self.fast_rows(svc.deadline_s) & ~self._held_by_deployment
        cand &= img.state == DeviceState.ON
        rows = np.flatnonzero(cand)
        if not rows.size:
            return rows
        order = np.lexsort((-img.measured_w[rows], ~img.services_only[rows]))
        rows = rows[order]
        covered = np.cumsum(img.measured_w[rows])
        k = int(np.searchsorted(covered, svc.armed_w - 1e-6)) + 1
        return np.sort(rows[:k])

    # --- what can be armed ---

    def fast_rows(self, deadline_s: float) -> Bool:
        """Devices that can shed all they draw within `deadline_s`: a sleep (a breaker's
        trip) that lands within it, dead time included."""
        img = self.image
        fast: Bool = (img.dead_time_s + img.sleep_s <= deadline_s) & (img.sleep_s > 0)
        fast &= img.p_idle_w < img.p_min_w
        return fast

    def armable_w(self) -> dict[str, float]:
        """Per service, what it could shed now within its deadline (FFR's share taken out
        of UFR's: one device answers for one service)."""
        img = self.image
        on = (img.state == DeviceState.ON) & ~self._held_by_deployment
        out: dict[str, float] = {}
        taken = 0.0
        for svc in self.services.values():
            pool = float(img.measured_w[self.fast_rows(svc.deadline_s) & on].sum())
            out[svc.name] = max(pool - taken, 0.0)
            taken += min(svc.armed_w, out[svc.name])
        return out

    def set_armed(self, name: str, armed_w: float) -> None:
        self.services[name].armed_w = max(float(armed_w), 0.0)

    # --- the cycle's side ---

    @property
    def held(self) -> Bool:
        """Rows regular control must leave alone: services-only devices and shed ones."""
        out: Bool = self.image.services_only | self._held_by_deployment
        return out

    def recall(self) -> int:
        """End every deployment now (a dispatch's recall); returns how many."""
        ended = 0
        for svc in self.services.values():
            if svc.deployment is not None:
                self._end(svc, "recall", self._clock())
                ended += 1
        return ended

    def offset_w(self, now: float) -> float:
        """What the services add to the control target now: the deployments' shed load
        (negative) being handed back, plus droop."""
        return self._offset_w + self.droop_w(now)

    def droop_w(self, now: float) -> float:
        """Droop: the load follows frequency outside the deadband (low frequency, less load),
        `band_kw` at most each way; 0 without a fresh frequency."""
        band = self.pfr.band_kw * 1e3
        if band <= 0.0 or not (now - self.hz_at <= 1.0):
            return 0.0
        dev = self.hz - self.nominal_hz
        db = self.pfr.deadband_hz
        if abs(dev) <= db:
            return 0.0
        dev -= math.copysign(db, dev)
        w = dev / (self.pfr.droop * self.nominal_hz) * self.site_max_w
        return float(np.clip(w, -band, band))

    def tick(self, now: float, dt: float) -> None:
        """Once per control cycle: the deployments' evidence, their end, the staggered
        restoration, and services-only devices kept closed."""
        meter = self._meter_w()
        for svc in self.services.values():
            d = svc.deployment
            if d is None:
                continue
            for after in RESPONSE_AFTER_S:
                if after not in d.response_w and now - d.at >= after:
                    d.response_w[after] = meter
            if now >= d.ends_at:
                self._end(svc, "sustain", now)
        if self._offset_w < 0.0 and self._restoring_w > 0.0:
            step = min(self._rate_w_s * dt, self._restoring_w, -self._offset_w)
            self._offset_w += step
            self._restoring_w -= step
        self._run_again(now)

    def _end(self, svc: Service, why: str, now: float) -> None:
        d = svc.deployment
        assert d is not None
        svc.deployment = None
        svc.rearm_pending = True
        d.ended_at, d.end_w, d.ended_by = now, self._meter_w(), why
        # Staggered: each shed device runs again once the load before it is back, at the
        # limited rate.
        rate = self._restore_w_s or max(d.expected_w / DEFAULT_RESTORE_S, 1.0)
        self._rate_w_s = max(self._rate_w_s, rate) if self._restoring_w > 0 else rate
        rows = d.rows[np.argsort(-self.image.measured_w[d.rows])]
        ahead_w = np.concatenate(([0.0], np.cumsum(self.image.p_max_w[rows])[:-1]))
        self._restore_at[rows] = now + ahead_w / rate
        self._restoring_w += d.expected_w
        log.info(
            "%s ended (%s) after %.1f s; restoring %.1f kW at %.1f kW/s",
            svc.name.upper(),
            why,
            now - d.at,
            d.expected_w / 1e3,
            rate / 1e3,
        )
        if self._on_end is not None:
            self._on_end(d)

    def _run_again(self, now: float) -> None:
        img = self.image
        due = self._held_by_deployment & (self._restore_at <= now)
        if due.any():
            self._held_by_deployment[due] = False
            self._restore_at[due] = np.inf
        # Services-only devices not held by a deployment run (closed), so what is armed runs.
        idle = img.services_only & ~self._held_by_deployment & (img.state == DeviceState.SLEEPING)
        idle &= now - self._closed_told_at >= KEEP_CLOSED_EVERY_S
        wake = np.flatnonzero(due | idle)
        if wake.size:
            self._closed_told_at[wake] = now
            self._submit(Commands.run(wake, img.p_max_w[wake].copy()))


def _restore_rate_w_s(ramp: RampLimitsConfig) -> float:
    """The fastest restoration the ramp limits allow (W/s); 0: none given (then each
    deployment spreads over DEFAULT_RESTORE_S)."""
    rates = []
    if ramp.up_kw_per_min is not None:
        rates.append(ramp.up_kw_per_min * 1e3 / 60.0)
    if ramp.max_change_kw_per_5s is not None:
        rates.append(ramp.max_change_kw_per_5s * 1e3 / 5.0)
    return min(rates) if rates else 0.0
