"""Wall-clock steps: noticed, logged once each with their size, counted.

Everything that measures a duration in rampd runs on the monotonic clock (the control cycle,
the target tracker's ramps, scheduled starts and expiries, placed on the monotonic axis at
acceptance, the failsafe's silence timer, the ramp records' settle times), so NTP stepping
the wall clock does not expire a valid dispatch or stall a ramp. What does follow the wall
clock, by nature: a dispatch's `issued_at` freshness and `expires_at` at acceptance, price
intervals and commitments' windows, the journal's timestamps. A step explains what these do
around it, so the operator sees it: one log line (WARNING) per step, with its size, a counter
and a journal event.

A step is the wall clock moving by more than `threshold_s` more (or less) than the monotonic
clock between two checks a second apart; NTP's slewing (at most 0.5 ms/s) never comes near.
A suspended machine looks the same (the monotonic clock stops while suspended) and is
reported the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger("rampd")

THRESHOLD_S: Final = 1.0
EVERY_S: Final = 1.0


class ClockWatch:
    """Compares the wall clock's progress with the monotonic clock's; `check` as often as
    convenient (every control cycle): it compares at most every `every_s`."""

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        threshold_s: float = THRESHOLD_S,
        every_s: float = EVERY_S,
        on_step: Callable[[float, float], None] | None = None,
    ) -> None:
        """`on_step(step_s, now_unix)`: after each step is logged (metrics, journal)."""
        self._wall = wall
        self._mono = mono
        self._threshold_s = threshold_s
        self._every_s = every_s
        self._on_step = on_step
        self._w = wall()
        self._m = mono()
        self.steps = 0
        """Steps seen so far."""
        self.last_step_s = 0.0
        """The latest step's size (positive: the wall clock jumped ahead); 0 before any."""

    def check(self) -> float | None:
        """The step since the last comparison, if the wall clock stepped; else None."""
        m = self._mono()
        if m - self._m < self._every_s:
            return None
        w = self._wall()
        step = (w - self._w) - (m - self._m)
        self._w, self._m = w, m
        if abs(step) <= self._threshold_s:
            return None
        self.steps += 1
        self.last_step_s = step
        log.warning(
            "wall clock stepped %+.3f s (now %s UTC); timers, ramps and expiries run on the "
            "monotonic clock and are unaffected; dispatch issued_at checks, price intervals "
            "and journal times follow the new wall clock",
            step,
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(w)),
        )
        if self._on_step is not None:
            self._on_step(step, w)
        return step
