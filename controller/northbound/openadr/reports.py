"""Reports the VTN asks for in an event's reportDescriptors, from measured site power. Pure.

Supported: DEMAND (power over each report interval: MEAN by default, PEAK, or DIRECT_READ,
the last reading) and USAGE (energy: mean power x duration), historical only (a forecast,
`historical: false`, is not something rampd measures). Each report covers whole report
slots: an event interval each, or `report_period_s` pieces of it when the interval is
indefinite or `reportIntervals` is SUB_INTERVALS. `startInterval`/`numIntervals` choose the
event intervals; `frequency` slots go in a report (-1: `numIntervals`; -1 again: every slot,
sent once the last one ends, or one slot a report when the event never ends); `repeat`
bounds the number of reports (-1: no bound). Values come only from what the meter measured:
a slot with no sample is not reported, a partly covered one says so in `confidence`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from controller.northbound.openadr.model import Event, ReportDescriptor, format_duration
from controller.northbound.openadr.schedule import Span
from controller.wire.timestamps import rfc3339

SUPPORTED: Final = ("DEMAND", "USAGE")
DEMAND_UNITS: Final = {"W": 1.0, "KW": 1e3, "MW": 1e6}
USAGE_UNITS: Final = {"WH": 1.0, "KWH": 1e3, "MWH": 1e6}
_DEMAND_READINGS: Final = ("MEAN", "AVERAGE", "PEAK", "DIRECT_READ")


@dataclass(frozen=True, slots=True)
class Slot:
    interval_id: int
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Measure:
    mean_w: float
    peak_w: float
    last_w: float
    count: int
    coverage: float
    """Share of the slot the samples cover (0..1)."""


class Samples:
    """Measured site power (unix s, W), kept for `keep_s`."""

    def __init__(self, keep_s: float, period_s: float = 1.0) -> None:
        self.keep_s = keep_s
        self.period_s = period_s
        self._t: list[float] = []
        self._w: list[float] = []

    def add(self, t: float, w: float) -> None:
        if self._t and t <= self._t[-1]:
            return  # a repeated or backwards reading adds nothing
        self._t.append(t)
        self._w.append(w)
        if self._t[0] < t - self.keep_s - 3600.0:  # trim in chunks, not per sample
            cut = bisect.bisect_left(self._t, t - self.keep_s)
            del self._t[:cut], self._w[:cut]

    def __len__(self) -> int:
        return len(self._t)

    def measure(self, t0: float, t1: float) -> Measure | None:
        lo, hi = bisect.bisect_left(self._t, t0), bisect.bisect_left(self._t, t1)
        if hi <= lo:
            return None
        w = self._w[lo:hi]
        coverage = min(1.0, len(w) * self.period_s / (t1 - t0)) if t1 > t0 else 1.0
        return Measure(sum(w) / len(w), max(w), w[-1], len(w), coverage)


def _slots(spans: Sequence[Span], sub: bool, period_s: float) -> Iterator[Slot]:
    for s in spans:
        if math.isfinite(s.end) and not sub:
            yield Slot(s.interval_id, s.start, s.end)
            continue
        t = s.start
        while t < s.end:
            yield Slot(s.interval_id, t, min(t + period_s, s.end))
            t += period_s


@dataclass
class ReportPlan:
    """One reportDescriptor of one event: which slots are due and batched into reports."""

    event: Event
    descriptor: ReportDescriptor
    spans: Sequence[Span]
    period_s: float
    sent: int = 0
    reported_until: float = -math.inf
    pending: list[Slot] = field(default_factory=list)
    _iter: Iterator[Slot] = field(init=False, repr=False)
    _next: Slot | None = field(init=False, repr=False)
    batch: float = field(init=False)

    def __post_init__(self) -> None:
        d = self.descriptor
        chosen = [
            s
            for s in self.spans
            if (d.start_interval < 0 or s.index >= d.start_interval)
            and (d.num_intervals < 0 or s.index < max(d.start_interval, 0) + d.num_intervals)
        ]
        sub = d.report_intervals == "SUB_INTERVALS"
        self._iter = (s for s in _slots(chosen, sub, self.period_s) if s.end > self.reported_until)
        self._next = next(self._iter, None)
        bounded = all(math.isfinite(s.end) for s in chosen)
        batch = d.frequency if d.frequency > 0 else d.num_intervals
        self.batch = float(batch) if batch > 0 else (math.inf if bounded else 1.0)

    @property
    def done(self) -> bool:
        repeats_left = self.descriptor.repeat < 0 or self.sent < self.descriptor.repeat
        return not repeats_left or (self._next is None and not self.pending)

    def rebased(self, event: Event, spans: Sequence[Span]) -> ReportPlan:
        """The same descriptor after an update of the event: reported slots stay reported."""
        return ReportPlan(
            event, self.descriptor, spans, self.period_s, self.sent, self.reported_until
        )

    def next_due(self) -> float:
        """When the next slot ends (inf: none left)."""
        return math.inf if self._next is None or self.done else self._next.end

    def due(self, now: float) -> list[list[Slot]]:
        """Batches of slots to report now, each one report."""
        while self._next is not None and self._next.end <= now:
            self.pending.append(self._next)
            self._next = next(self._iter, None)
        out: list[list[Slot]] = []
        while self.pending and not self.done:
            if len(self.pending) < self.batch and self._next is not None:
                break
            n = len(self.pending) if math.isinf(self.batch) else int(self.batch)
            batch, self.pending = self.pending[:n], self.pending[n:]
            out.append(batch)
            self.sent += 1
            self.reported_until = batch[-1].end
        if self.done:
            self.pending.clear()
        return out


def supported(d: ReportDescriptor) -> str | None:
    """None if the VEN can make this report, else why not."""
    if d.payload_type not in SUPPORTED:
        return f"payloadType {d.payload_type} not reported (only {', '.join(SUPPORTED)})"
    if not d.historical:
        return f"{d.payload_type} forecasts (historical false) not reported"
    return None


def report_body(
    event: Event,
    d: ReportDescriptor,
    slots: Sequence[Slot],
    samples: Samples,
    *,
    client_name: str,
    resource_name: str,
    seq: int,
) -> dict[str, Any] | None:
    """The reportRequest for these slots, or None when none of them was measured."""
    demand = d.payload_type == "DEMAND"
    table = DEMAND_UNITS if demand else USAGE_UNITS
    units = (d.units or "").upper()
    if units not in table:  # say what the values are in, rather than guess a scale
        units = "KW" if demand else "KWH"
    scale = table[units]
    reading = (d.reading_type or "").upper()
    if demand and reading not in _DEMAND_READINGS:
        reading = "MEAN"
    intervals: list[dict[str, Any]] = []
    coverage = 1.0
    for slot in slots:
        m = samples.measure(slot.start, slot.end)
        if m is None:
            continue
        if demand:
            w = {"PEAK": m.peak_w, "DIRECT_READ": m.last_w}.get(reading, m.mean_w)
            value = max(w, 0.0) / scale  # the enumeration's minimum is 0 (an import site)
        else:
            value = max(m.mean_w, 0.0) * (slot.end - slot.start) / 3600.0 / scale
        coverage = min(coverage, m.coverage)
        intervals.append(
            {
                "id": slot.interval_id,
                "intervalPeriod": {
                    "start": rfc3339(slot.start),
                    "duration": format_duration(slot.end - slot.start),
                },
                "payloads": [{"type": d.payload_type, "values": [round(value, 6)]}],
            }
        )
    if not intervals:
        return None
    if not demand:
        reading = "DIRECT_READ" if coverage >= 0.99 else "ESTIMATED"
    return {
        "eventID": event.id,
        "clientName": client_name,
        "reportName": f"{client_name} {d.payload_type} {event.id} #{seq}",
        "payloadDescriptors": [
            {
                "objectType": "REPORT_PAYLOAD_DESCRIPTOR",
                "payloadType": d.payload_type,
                "readingType": reading,
                "units": units,
                "confidence": round(100 * coverage),
            }
        ],
        "resources": [{"resourceName": resource_name, "intervals": intervals}],
    }
