"""Coincident-peak avoidance: alerts (`<prefix>/<site>/peak`) and configured windows.

Transmission charges follow a site's load in the grid's few system peaks (ERCOT 4CP: the four
15-minute peaks of June-September; a 12CP variant counts one a month). A site avoids them by
going to `peak_kw` when an alert says a peak is likely, and, where configured, through the
hours the peaks fall in. Pure: callers pass unix time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

from controller.config import PeaksConfig
from controller.wire.codec import WireError, decode_object, optional_number, optional_time

MONTHS: Final = {"none": (), "4cp": (6, 7, 8, 9), "12cp": tuple(range(1, 13))}
MAX_ALERTS: Final = 64
"""Alerts kept at once (a flood of them must not grow without bound)."""


@dataclass(frozen=True, slots=True)
class PeakAlert:
    start: float
    end: float
    probability: float


def parse_alert(payload: bytes) -> PeakAlert:
    """`{"start", "end", "probability"}` (RFC 3339 times; probability 0..1);
    ValueError with the reason otherwise."""
    try:
        obj: dict[str, Any] = decode_object(payload)
        start = optional_time(obj, "start")
        end = optional_time(obj, "end")
        prob = optional_number(obj, "probability")
    except WireError as exc:
        raise ValueError(exc.reason) from None
    if start is None or end is None or prob is None:
        raise ValueError("start, end and probability are required")
    if end <= start:
        raise ValueError("end not after start")
    if not 0.0 <= prob <= 1.0:
        raise ValueError("probability outside 0..1")
    return PeakAlert(start, end, prob)


class Peaks:
    """Whether the site is in a peak now, and why."""

    def __init__(self, cfg: PeaksConfig) -> None:
        self.cfg = cfg
        self.target_w = math.nan if cfg.peak_kw is None else cfg.peak_kw * 1e3
        self._tz = ZoneInfo(cfg.timezone)
        self._months = MONTHS[cfg.variant]
        self.alerts: list[PeakAlert] = []

    @property
    def enabled(self) -> bool:
        return self.cfg.peak_kw is not None

    def on_alert(self, a: PeakAlert, now: float) -> None:
        """Keep the alert (one for the same window replaces the earlier one: a forecast's
        probability is revised as the day goes on); ended ones are dropped."""
        kept = [x for x in self.alerts if x.end > now and (x.start, x.end) != (a.start, a.end)]
        self.alerts = [*kept, a][-MAX_ALERTS:]

    def active(self, t: float) -> str | None:
        """The reason the site is in a peak at `t`, or None."""
        if not self.enabled:
            return None
        for a in self.alerts:
            if a.start <= t < a.end and a.probability >= self.cfg.min_probability:
                return f"peak alert {a.probability:.0%} until {_hhmm(a.end, self._tz)}"
        if self._months and self.cfg.hours:
            local = datetime.fromtimestamp(t, self._tz)
            weekday_ok = self.cfg.weekends or local.weekday() < 5
            if weekday_ok and local.month in self._months and local.hour in self.cfg.hours:
                return f"{self.cfg.variant.upper()} window {local.hour:02d}:00 {self.cfg.timezone}"
        return None


def _hhmm(t: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(t, tz).strftime("%H:%M")
