"""The power state a feed reports (`grid.powerstate.status.v1`'s `FeedState`) and the ramp
events that publish it.

A feed's *level* is its winning target's constraint (None: the default). A change of level
starts a ramp: down when a constraint comes or tightens, up when it relaxes or goes. The ramp
ends when the measured load has arrived within tolerance of the *calculated load*: where the
site is heading, which is the lowest of the lower rails (this level included) unless a rail
above them (grid dispatch, failsafe, frequency) sets the target, held to what the fleet can
reach (telemetry's minimum and maximum). `compliant`: the calculated load is within the
active constraint (true without one). A *power event* runs from the first constraint until
the ramp up after the last one ends.

A zone feed (a zone of this parent) reports the zone: its bounds from its reported
capability, its measured power as the calculated load (where the zone is heading, the
parent's setpoint for it under the feed's level, before a fresh reading), and its ramps end
when its measured power arrives there.

Pure: no I/O, no clock (callers pass unix time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from controller.market.rails import LOWER
from controller.northbound.dsx_flex.power import kilowatts
from controller.northbound.dsx_flex.schedule import Target
from controller.wire.telemetry import Telemetry
from controller.wire.timestamps import rfc3339

Event = Literal[
    "target_set", "start_ramp_down", "end_ramp_down", "start_ramp_up", "end_ramp_up", "periodic"
]


@dataclass(slots=True)
class RampTracker:
    level_w: float | None = None
    phase: Literal["down", "up"] | None = None
    event_start: float | None = None
    """When the current power event began (None: none)."""

    @property
    def in_flight(self) -> bool:
        return self.phase is not None

    def change(self, level_w: float | None, now: float) -> Event:
        """The level moved: the ramp it starts."""
        down = level_w is not None and (self.level_w is None or level_w < self.level_w)
        self.level_w = level_w
        if down and self.event_start is None:
            self.event_start = now
        self.phase = "down" if down else "up"
        return "start_ramp_down" if down else "start_ramp_up"

    def judge(self, measured_w: float | None, calculated_w: float, tol_w: float) -> Event | None:
        """The ramp's end, when the measured load has arrived."""
        if self.phase is None or measured_w is None:
            return None
        if self.phase == "down" and measured_w <= calculated_w + tol_w:
            self.phase = None
            return "end_ramp_down"
        if self.phase == "up" and measured_w >= calculated_w - tol_w:
            self.phase = None
            if self.level_w is None:
                self.event_start = None
            return "end_ramp_up"
        return None


@dataclass(frozen=True, slots=True)
class Bounds:
    """What the fleet can reach now (telemetry's minimum and maximum; the site's configured
    range before the first control cycle) and the feed's default constraint."""

    min_w: float
    max_w: float
    default_w: float

    @classmethod
    def of(cls, tel: Telemetry, site_min_w: float, site_max_w: float) -> Bounds:
        lo = site_min_w if tel.min_w is None else tel.min_w
        hi = site_max_w if tel.max_w is None else tel.max_w
        return cls(min(lo, hi), hi, site_max_w)


@dataclass(frozen=True, slots=True)
class FeedPower:
    """A feed's place now: its measured power (None: no fresh reading), its bounds, where
    it is heading with the feed's level in force (ramp ends are judged against it), and the
    calculated load its status reports."""

    measured_w: float | None
    bounds: Bounds
    heading_w: float
    calculated_w: float


def site_power(
    tel: Telemetry, level_w: float | None, site_min_w: float, site_max_w: float
) -> FeedPower:
    bounds = Bounds.of(tel, site_min_w, site_max_w)
    heading = calculated_load_w(tel, level_w, bounds)
    return FeedPower(tel.measured_w, bounds, heading, heading)


def zone_power(
    measured_w: float | None,
    planned_w: float,
    min_w: float,
    max_w: float,
    rated_w: float,
    level_w: float | None,
) -> FeedPower:
    """A zone of this parent: `planned_w` its parent's latest setpoint for it, `min_w` and
    `max_w` its bounds as its capability says, `rated_w` its configured maximum (the
    feed's default constraint)."""
    bounds = Bounds(min(min_w, max_w), max_w, rated_w)
    heading = planned_w if level_w is None else min(planned_w, level_w)
    heading = min(max(heading, bounds.min_w), bounds.max_w)
    return FeedPower(measured_w, bounds, heading, heading if measured_w is None else measured_w)


def calculated_load_w(tel: Telemetry, level_w: float | None, bounds: Bounds) -> float:
    """Where the site is heading with `level_w` in force on the DSX Flex rail."""
    rails = tel.rails
    if rails is not None and rails.governing not in LOWER and tel.target_w is not None:
        dest = tel.target_w  # a rail above the lower ones sets the target outright
    else:
        wishes = [] if rails is None else list(rails.wishes_w.items())
        levels = [w for k, w in wishes if k != "dsx_flex" and k in LOWER and w is not None]
        if level_w is not None:
            levels.append(level_w)
        dest = min(levels, default=bounds.default_w)
    return min(max(dest, bounds.min_w), bounds.max_w)


def tolerance_w(level_w: float, pct: float, floor_w: float) -> float:
    return max(floor_w, level_w * pct / 100.0)


def feed_target(t: Target, active: bool) -> dict[str, Any]:
    """A `FeedTarget` (only targets with a constraint are listed: the schema requires one)."""
    assert t.constraint is not None
    interval = {"start_time": rfc3339(t.start)}
    if t.end is not None:
        interval["end_time"] = rfc3339(t.end)
    return {
        "active": active,
        "load_constraint": t.constraint.to_wire(),
        "interval": interval,
        "strategy": {"best_effort": t.best_effort},
        "correlation_id": t.correlation_id,
    }


@dataclass(frozen=True, slots=True)
class FeedState:
    targets: list[Target]
    """Newest first; the active one among them."""
    active: Target | None
    bounds: Bounds
    calculated_w: float
    in_flight: bool
    event: Event
    event_start: float | None
    compliant: bool

    def to_wire(self) -> dict[str, Any]:
        listed = sorted(
            (t for t in self.targets if t.constraint is not None), key=lambda t: (t.start, t.key)
        )
        out: dict[str, Any] = {
            "metadata": {
                "power_minimum": kilowatts(self.bounds.min_w),
                "power_maximum": kilowatts(self.bounds.max_w),
                "default_constraint": kilowatts(self.bounds.default_w),
            },
            "targets": [feed_target(t, t is self.active) for t in listed],
            "calculated_load": kilowatts(self.calculated_w),
            "in_flight": self.in_flight,
            "event": self.event,
            "compliant": self.compliant,
        }
        # The schema types it a date-time string: no power event, no field (not null).
        if self.event_start is not None:
            out["power_event_start_time"] = rfc3339(self.event_start)
        return out


def status_data(feeds: dict[str, FeedState], now: float) -> dict[str, Any]:
    """`PowerStateStatusData`: a full snapshot of every feed."""
    return {
        "snapshot_time": rfc3339(now),
        "feeds": {tag: state.to_wire() for tag, state in feeds.items()},
    }
