"""When each event interval is in force, and which event sets the `openadr` rail now. Pure.

Interval timing (OpenADR 3 User Guide): an interval's own `intervalPeriod` overrides the
event's; an interval without a start follows the one before it (the first starts at the
event's start); a start of "0001-01-01" is the moment the VEN first saw the event; a duration
of P9999Y never ends. `randomizeStart` delays a start by a draw in [0, randomizeStart]: one
draw for the whole event when the event gives it (its intervals stay back to back), one per
interval when the interval does. Draws are keyed by (seed, event, interval), so re-reading an
event never draws again.

Arbitration: among the intervals in force whose payload types the site obeys, the event of
the highest priority (lowest number; none ranks last) wins; among equals, the lowest level.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from controller.northbound.openadr.config import PayloadMapping
from controller.northbound.openadr.model import (
    ZERO,
    Duration,
    Event,
    IntervalPeriod,
    Payload,
    Program,
)

UNIT_W: Final[Mapping[str, float]] = {"W": 1.0, "KW": 1e3, "MW": 1e6}


@dataclass(frozen=True, slots=True)
class Span:
    """One event interval, placed in time (unix s; randomizeStart applied)."""

    interval_id: int
    index: int
    """Position in the event's interval list (what reportDescriptors count)."""
    start: float
    end: float
    """inf: indefinite."""
    payloads: tuple[Payload, ...]

    def active(self, now: float) -> bool:
        return self.start <= now < self.end


def randomize_offset(seed: str, event_id: str, interval_id: int | None, max_s: float) -> float:
    """A delay in [0, max_s], the same for the same (seed, event, interval)."""
    if max_s <= 0.0:
        return 0.0
    return random.Random(f"{seed}/{event_id}/{interval_id}").uniform(0.0, max_s)


def _range_s(d: Duration, start: float) -> float:
    return abs(d.seconds_from(start)) if d.negative else d.seconds_from(start)


def spans(event: Event, first_seen: float, seed: str) -> tuple[list[Span], list[str]]:
    """The event's intervals in time, and what could not be placed (for the log)."""
    problems: list[str] = []
    ep = event.period or IntervalPeriod()
    cursor: float | None = first_seen if ep.start_now else ep.start
    event_offset: float | None = None
    out: list[Span] = []
    for index, iv in enumerate(event.intervals):
        ip = iv.period or IntervalPeriod()
        start = first_seen if ip.start_now else ip.start if ip.start is not None else cursor
        if start is None:
            problems.append(f"interval {iv.id}: no start in the interval or the event")
            continue
        duration = ip.duration or ep.duration or ZERO  # the schema's default: PT0S
        end = duration.after(start)
        cursor = end  # the next interval follows the unshifted one
        offset = 0.0
        if ip.randomize is not None:
            offset = randomize_offset(seed, event.id, iv.id, _range_s(ip.randomize, start))
        elif ep.randomize is not None:
            if event_offset is None:
                event_offset = randomize_offset(seed, event.id, None, _range_s(ep.randomize, start))
            offset = event_offset
        if not math.isfinite(offset):
            problems.append(f"interval {iv.id}: randomizeStart without end ignored")
            offset = 0.0
        if end <= start:
            problems.append(f"interval {iv.id}: zero duration, never in force")
            continue
        out.append(Span(iv.id, index, start + offset, end + offset, iv.payloads))
    return out, problems


@dataclass(frozen=True, slots=True)
class Candidate:
    """A level one payload of an interval in force asks for."""

    event: Event
    span: Span
    payload_type: str
    maps_to: str
    value: float
    units: str
    level_w: float

    @property
    def rank(self) -> tuple[float, float, str]:
        p = self.event.priority
        return (math.inf if p is None else float(p), self.level_w, self.event.id)

    @property
    def reason(self) -> str:
        p = "none" if self.event.priority is None else str(self.event.priority)
        return (
            f"OpenADR event {self.event.label} interval {self.span.interval_id}: "
            f"{self.payload_type} {self.value:g} {self.units} ({self.maps_to}, priority {p})"
        )


@dataclass(frozen=True, slots=True)
class Decision:
    level_w: float | None
    """None: no event asks anything now."""
    winner: Candidate | None
    next_change: float
    """The next start or end of an interval (unix s); inf: none scheduled."""
    problems: tuple[tuple[str, str], ...] = ()
    """(event id, what was ignored) for payloads in force the VEN could not read."""

    @property
    def reason(self) -> str:
        return "" if self.winner is None else self.winner.reason


def units_for(payload_type: str, event: Event, program: Program | None, default: str) -> str:
    """The event's descriptor, else the program's, else the configured default."""
    for d in event.payload_descriptors:
        if d.payload_type == payload_type and d.units:
            return d.units
    for d in program.payload_descriptors if program is not None else ():
        if d.payload_type == payload_type and d.units:
            return d.units
    return default


def decide(
    tracked: Iterable[tuple[Event, Sequence[Span]]],
    programs: Mapping[str, Program],
    payloads: Mapping[str, PayloadMapping],
    now: float,
) -> Decision:
    best: Candidate | None = None
    next_change = math.inf
    problems: list[tuple[str, str]] = []
    for event, event_spans in tracked:
        for span in event_spans:
            if span.start > now:
                next_change = min(next_change, span.start)
                continue
            if span.end <= now:
                continue
            next_change = min(next_change, span.end)
            for p in span.payloads:
                mapping = payloads.get(p.type)
                if mapping is None:
                    continue
                where = f"interval {span.interval_id} {p.type}"
                value = p.values[0] if len(p.values) == 1 else None
                if isinstance(value, bool) or not isinstance(value, int | float):
                    problems.append((event.id, f"{where}: values must be one number"))
                    continue
                if not math.isfinite(value) or value < 0:
                    problems.append((event.id, f"{where}: {value!r} is not a level"))
                    continue
                units = units_for(p.type, event, programs.get(event.program_id), mapping.units)
                factor = UNIT_W.get(units.upper())
                if factor is None:
                    problems.append((event.id, f"{where}: units {units!r} not W, KW or MW"))
                    continue
                c = Candidate(event, span, p.type, mapping.maps_to, value, units, value * factor)
                if best is None or c.rank < best.rank:
                    best = c
    return Decision(None if best is None else best.level_w, best, next_change, tuple(problems))
