"""The price rule: which device classes to curtail at the current power price.

Each class has a strike (`DeviceClass.strike_usd_per_mwh`: a miner's breakeven, a GPU rack's
work value). Per class, counted over realtime intervals:

* at or above the strike for `stop_after` consecutive intervals: curtailed;
* at or above `high_strike_usd_per_mwh`: every class whose strike the price reaches is
  curtailed at once, without waiting for `stop_after`;
* below the strike for `resume_after` consecutive intervals: resumed, but never before
  `min_stopped_s` since it stopped (a deferred resume happens in `update` when due), and
  linearly over `resume_stagger_s`, so the site comes back under its ramp limits;
* a class with an infinite strike (no economics) is never curtailed.

A class's decision compares the price with its own strike only, so classes fall in merit
order by themselves: a price between two breakevens curtails the less efficient class (the
lower strike) and leaves the other running.

Counting: each distinct `interval_start` is one interval, whatever its length. A quote for
the interval already counted is a revision: it replaces that interval's price and is judged
again, never counted twice. A quote for an older interval is ignored. A gap (an interval
missing from the feed) breaks "consecutive": counting restarts. Forecasts, and stale quotes
(past their interval plus `grace_s`), count for nothing.

Pure: no I/O, no clock. Callers pass unix time, and get back the decisions as `RuleEvent`s to
log and journal.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from controller.config import PriceRuleConfig
from controller.market.economics import DeviceClass, Economics, merit_order
from controller.market.prices import PriceQuote

Action = Literal["curtail", "defer", "resume", "resumed"]
_GAP_TOLERANCE_S = 1e-3  # float noise on interval boundaries is no gap


class Mode(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    RESUMING = "resuming"


@dataclass(frozen=True, slots=True)
class RuleEvent:
    """One decision on one class, with the reason an operator reads in the log."""

    at: float
    device_class: str
    action: Action
    """curtail; defer (a resume waits for min_stopped_s); resume (starts coming back);
    resumed (fully back)."""
    reason: str


@dataclass(slots=True)
class _State:
    cls: DeviceClass
    strike: float
    above: int = 0
    below: int = 0
    before: tuple[int, int] = (0, 0)
    """(above, below) before the current interval was counted: what a revision restarts from."""
    mode: Mode = Mode.RUNNING
    stopped_at: float = -math.inf
    resume_due: float | None = None
    """A resume waiting for min_stopped_s (the price has been low long enough)."""
    resume_start: float = 0.0
    fraction: float = 0.0


class PriceRule:
    def __init__(
        self,
        classes: Sequence[DeviceClass],
        rule: PriceRuleConfig,
        econ: Economics | None,
        *,
        grace_s: float = 60.0,
    ) -> None:
        kinds = [c.kind for c in classes]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"device classes must be unique by kind: {kinds}")
        self._rule = rule
        self._grace_s = grace_s
        self._econ = econ
        self._states = [_State(c, c.strike_usd_per_mwh(econ)) for c in merit_order(classes, econ)]
        self._last: PriceQuote | None = None

    # --- inputs ----------------------------------------------------------------------------

    def set_economics(self, econ: Economics | None) -> None:
        """New hashprice or pool fee: strikes recomputed. Counts so far stand; the next price
        (or a revision of the current one) is judged against the new strikes."""
        self._econ = econ
        for s in self._states:
            s.strike = s.cls.strike_usd_per_mwh(econ)
        self._states.sort(key=lambda s: s.strike)  # merit order, for the events' order

    def on_price(self, q: PriceQuote, now: float) -> list[RuleEvent]:
        """Count a quote and decide; then advance the timers to `now`."""
        # What fell due before this quote happens first, as if update had been called then.
        events = self._timers(now, inclusive=False)
        if q.kind == "realtime" and not q.is_stale(now, self._grace_s):
            last = self._last
            if last is None or q.interval_start >= last.interval_start:
                revision = last is not None and q.interval_start == last.interval_start
                gap = last is not None and q.interval_start > last.end + _GAP_TOLERANCE_S
                self._last = q
                if self._rule.enabled:
                    for s in self._states:
                        events += self._count(s, q, now, revision=revision, gap=gap)
        # A resume falling due right now is judged with this price first: a price back above
        # the strike calls it off rather than resume-then-curtail.
        return events + self.update(now)

    def update(self, now: float) -> list[RuleEvent]:
        """Advance timers: deferred resumes that fall due, staggered resumption.

        No new decision is taken here. Without a fresh price the rule holds what it decided:
        a silent feed says nothing about the price, and guessing either way would run the
        fleet into a spike or shed revenue for nothing; the stale flag raises the alarm.
        """
        return self._timers(now, inclusive=True)

    def _timers(self, now: float, *, inclusive: bool) -> list[RuleEvent]:
        events: list[RuleEvent] = []
        for s in self._states:
            due = s.resume_due
            if (
                s.mode is Mode.STOPPED
                and due is not None
                and (now >= due if inclusive else now > due)
            ):
                # The stagger starts when due, not when noticed: the outcome does not depend
                # on how often update is called.
                why = (
                    f"min stopped {self._rule.min_stopped_s:g} s over, price below strike "
                    f"{s.strike:.2f} for {s.below} interval(s)"
                )
                events.append(self._resume(s, due, why))
            if s.mode is Mode.RESUMING:
                stagger = self._rule.resume_stagger_s
                left = 1.0 - (now - s.resume_start) / stagger
                if left <= 0.0:
                    s.mode, s.fraction = Mode.RUNNING, 0.0
                    at = s.resume_start + stagger
                    why = f"{s.cls.kind} back at full power (resumed over {stagger:g} s)"
                    events.append(RuleEvent(at, s.cls.kind, "resumed", why))
                else:
                    s.fraction = min(1.0, left)
        return events

    # --- outputs ---------------------------------------------------------------------------

    def curtailed_fraction(self) -> dict[str, float]:
        """Per class (by kind), how much of its sheddable power is curtailed: 0..1."""
        return {s.cls.kind: s.fraction for s in self._states}

    def shed_w(self) -> float:
        """What the rule takes off the site now (W)."""
        return sum(s.fraction * s.cls.shed_w for s in self._states)

    def strikes(self) -> dict[str, float]:
        """Per class (by kind), in merit order, its strike (USD/MWh; inf: never curtailed)."""
        return {s.cls.kind: s.strike for s in self._states}

    def modes(self) -> dict[str, Mode]:
        return {s.cls.kind: s.mode for s in self._states}

    @property
    def settled(self) -> bool:
        """No timer running: nothing changes until the next price."""
        return all(
            s.mode is not Mode.RESUMING and (s.mode is not Mode.STOPPED or s.resume_due is None)
            for s in self._states
        )

    @property
    def last_quote(self) -> PriceQuote | None:
        """The last realtime quote counted."""
        return self._last

    def price_fresh(self, now: float) -> bool:
        return self._last is not None and not self._last.is_stale(now, self._grace_s)

    # --- the rule ----------------------------------------------------------------------------

    def _count(
        self, s: _State, q: PriceQuote, now: float, *, revision: bool, gap: bool
    ) -> list[RuleEvent]:
        if revision:
            s.above, s.below = s.before
        elif gap:
            s.above = s.below = 0
            s.before = (0, 0)
        else:
            s.before = (s.above, s.below)
        p = q.usd_per_mwh
        if p >= s.strike:
            s.above, s.below = s.above + 1, 0
        else:
            s.above, s.below = 0, s.below + 1
        r = self._rule
        k = s.cls.kind
        if s.mode is not Mode.STOPPED:
            hs = r.high_strike_usd_per_mwh
            if hs is not None and p >= hs and p >= s.strike:
                return [self._stop(s, now, f"{p:.2f} USD/MWh >= high strike {hs:g}, at once")]
            if s.above >= r.stop_after:
                return [
                    self._stop(
                        s,
                        now,
                        f"{p:.2f} USD/MWh >= strike {s.strike:.2f} for {s.above} interval(s)",
                    )
                ]
            return []
        if s.below < r.resume_after:
            s.resume_due = None  # back at or above the strike: a waiting resume is off
            return []
        why = f"{p:.2f} USD/MWh < strike {s.strike:.2f} for {s.below} interval(s)"
        due = s.stopped_at + r.min_stopped_s
        if now >= due:
            return [self._resume(s, now, why)]
        if s.resume_due is None:
            s.resume_due = due
            return [
                RuleEvent(
                    now,
                    k,
                    "defer",
                    f"{k} stays curtailed {due - now:.0f} s more (min stopped "
                    f"{r.min_stopped_s:g} s): {why}",
                )
            ]
        return []

    def _stop(self, s: _State, now: float, why: str) -> RuleEvent:
        s.mode, s.stopped_at, s.resume_due, s.fraction = Mode.STOPPED, now, None, 1.0
        return RuleEvent(now, s.cls.kind, "curtail", f"{s.cls.kind} curtailed: {why}")

    def _resume(self, s: _State, at: float, why: str) -> RuleEvent:
        s.resume_due = None
        stagger = self._rule.resume_stagger_s
        if stagger <= 0.0:
            s.mode, s.fraction = Mode.RUNNING, 0.0
            return RuleEvent(at, s.cls.kind, "resume", f"{s.cls.kind} resumed at once: {why}")
        s.mode, s.resume_start = Mode.RESUMING, at
        return RuleEvent(
            at, s.cls.kind, "resume", f"{s.cls.kind} resuming over {stagger:g} s: {why}"
        )
