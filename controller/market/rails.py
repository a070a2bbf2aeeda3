"""Arbitration of everything that sets the site's target: the rails.

Precedence, highest first: the failsafe (its own target), frequency deployments (an offset
on top of whatever governs), the grid dispatch (setpoint, regulation), the northbound
standards' targets (DSX Flex, OpenADR), commitments, peaks, price, and the default: full
power. The upper three set the target outright and are judged by
the daemon (`TargetTracker`, `FrequencyServices`); this module decides among the lower ones.

The lower rails all ask the site to stay *at or below* a level: a commitment to reduce to 5 MW
is kept by any power under 5 MW, a peak by any power under `peak_kw`, and a price curtailment
by at least its shed. So the lowest of their levels is in force, and the rail that asked for it
governs (precedence breaks a tie): one rail never lifts the site above another's level, and a
commitment never makes the site run through a price it loses money at. Each wish is reached
through the tracker under the ramp limits.

Pure: no I/O, no clock; callers pass unix time. Evaluated about once a second.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol, get_args

from controller.market.peaks import Peaks
from controller.wire.dispatch import Dispatch

RailName = Literal[
    "failsafe",
    "frequency",
    "dispatch",
    "dsx_flex",
    "openadr",
    "commitment",
    "peak",
    "price",
    "default",
]
RAILS: Final[tuple[RailName, ...]] = get_args(RailName)
"""Every rail, in precedence order (highest first)."""
LOWER: Final[tuple[RailName, ...]] = RAILS[RAILS.index("dsx_flex") :]
"""The rails below the grid dispatch: levels the site stays at or below."""
CEILINGS: Final[tuple[RailName, ...]] = ("dsx_flex", "openadr")
"""Rails whose level a northbound interface sets (`Rails.set_ceiling`): a DSX Flex load
target, an OpenADR event's capacity limit or setpoint."""
MAX_COMMITMENTS: Final = 256
FULL_HOLD_S: Final = 60.0
"""How long the site's highest power at full is held for the price rule's level."""


class PriceSource(Protocol):
    """What the rails need of the price rule (`controller.market.price_rule.PriceRule`)."""

    def shed_w(self) -> float: ...


class SteadyFull:
    """The site's power at full as the price rule's level takes it: the highest reported
    over the last `window_s` (a sliding maximum). The instantaneous figure dips while devices
    go to sleep or wake (the non-flexible estimate takes up their motion for a few cycles);
    a price level following it would fall below a peak's or a commitment's and take the
    rail over for seconds. A device lost for good lowers it after `window_s`."""

    def __init__(self, window_s: float = FULL_HOLD_S) -> None:
        if not window_s > 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._q: deque[tuple[float, float]] = deque()  # (t, W), W decreasing

    def update(self, t: float, full_w: float | None) -> float | None:
        """Add the figure at `t` (None or NaN: none now); the held maximum (None: none yet)."""
        if full_w is not None and math.isfinite(full_w):
            while self._q and self._q[-1][1] <= full_w:
                self._q.pop()
            self._q.append((t, full_w))
        while self._q and self._q[0][0] <= t - self.window_s:
            self._q.popleft()
        return self._q[0][1] if self._q else None


@dataclass(slots=True)
class _Commitment:
    d: Dispatch
    baseline_w: float | None = None
    """Fixed when it starts (a `reduce_by` is relative to the site before it)."""

    @property
    def start(self) -> float:
        assert self.d.start_at is not None
        return self.d.start_at

    @property
    def end(self) -> float:
        assert self.d.end_at is not None
        return self.d.end_at

    @property
    def over(self) -> float:
        return self.end + self.d.ramp_up_s

    def level_w(self) -> float:
        if self.d.reduce_by_w is None:
            return self.d.target_w
        base = self.baseline_w if self.baseline_w is not None else math.nan
        return max(base - self.d.reduce_by_w, 0.0)

    def wish_w(self, t: float, below_w: float) -> float | None:
        """Its level at `t`, ramping from and back to what the rails below ask."""
        if t < self.start or t >= self.over:
            return None
        level = self.level_w()
        if math.isnan(level):
            return None
        down = self.d.ramp_s
        if t < self.start + down:
            frac = (t - self.start) / down
            return below_w + (min(level, below_w) - below_w) * frac
        if t < self.end:
            return level
        frac = (t - self.end) / self.d.ramp_up_s
        return level + (max(below_w, level) - level) * frac


@dataclass(frozen=True, slots=True)
class Decision:
    """What the lower rails ask at an instant."""

    rail: RailName
    """The rail whose level is in force."""
    wish_w: float
    wishes: dict[RailName, float | None] = field(default_factory=dict)
    """Each lower rail's level now (None: not active)."""
    reason: str = ""


class Rails:
    """The lower rails: commitments, peaks, price and the default (full power)."""

    def __init__(self, *, full_w: float, peaks: Peaks, price: PriceSource | None) -> None:
        """`full_w`: the default rail's level (the site maximum; the tracker clamps)."""
        self.full_w = full_w
        self.peaks = peaks
        self.price = price
        self._commitments: list[_Commitment] = []
        self._ceilings: dict[RailName, tuple[float, str]] = {}
        self.fixed: list[tuple[str, float]] = []
        """(id, baseline W) of `reduce_by` commitments whose baseline was fixed, for the
        caller to journal (a restart puts them back with `set_baseline`); it empties it."""

    # -- inputs ---------------------------------------------------------------------------

    def add_commitment(self, d: Dispatch) -> None:
        """A commitment dispatch (accepted, or resumed from the journal)."""
        if d.mode != "commitment" or d.start_at is None or d.end_at is None:
            raise ValueError("not a commitment")
        self._commitments = [*self._commitments, _Commitment(d)][-MAX_COMMITMENTS:]

    def set_baseline(self, d_id: str, baseline_w: float) -> None:
        """A resumed `reduce_by` commitment's baseline, from the journal."""
        for c in self._commitments:
            if c.d.id == d_id:
                c.baseline_w = baseline_w

    def set_ceiling(self, rail: RailName, level_w: float | None, reason: str = "") -> None:
        """A northbound interface's level for its rail (None: it asks nothing now)."""
        if rail not in CEILINGS:
            raise ValueError(f"{rail} is not a northbound rail ({', '.join(CEILINGS)})")
        if level_w is None:
            self._ceilings.pop(rail, None)
        elif not math.isfinite(level_w):
            raise ValueError(f"{rail} level must be finite, got {level_w!r}")
        else:
            self._ceilings[rail] = (max(level_w, 0.0), reason)

    @property
    def commitments(self) -> Iterable[Dispatch]:
        return (c.d for c in self._commitments)

    # -- the decision ---------------------------------------------------------------------

    def decide(
        self, t: float, *, baseline_w: float | None, full_w: float | None = None
    ) -> Decision:
        """The lower rails at `t`. `baseline_w`: the site's recent power before any
        curtailment (fixes a starting `reduce_by` commitment; None: not known yet, the
        commitment waits for it). `full_w`: the site's power at full, what the price
        rule's shed is taken from (default: the default rail's level)."""
        top = self.full_w if full_w is None else min(full_w, self.full_w)
        wishes: dict[RailName, float | None] = {"default": self.full_w}
        reasons: dict[RailName, str] = {"default": "full power"}
        shed = self.price.shed_w() if self.price is not None else 0.0
        wishes["price"] = top - shed if shed > 0.0 else None
        if shed > 0.0:
            reasons["price"] = f"price curtails {shed / 1e3:.0f} kW of {top / 1e3:.0f} kW"
        peak = self.peaks.active(t)
        wishes["peak"] = self.peaks.target_w if peak is not None else None
        if peak is not None:
            reasons["peak"] = peak
        for rail in CEILINGS:
            level = self._ceilings.get(rail)
            wishes[rail] = None if level is None else level[0]
            if level is not None:
                reasons[rail] = level[1] or rail
        below = min(w for w in wishes.values() if w is not None)
        self._commitments = [c for c in self._commitments if c.over > t]
        best: tuple[float, _Commitment] | None = None
        for c in self._commitments:
            if c.start <= t and c.baseline_w is None and c.d.reduce_by_w is not None:
                c.baseline_w = baseline_w
                if baseline_w is not None:
                    self.fixed.append((c.d.id, baseline_w))
            w = c.wish_w(t, below)
            if w is not None and (best is None or w < best[0]):
                best = (w, c)
        wishes["commitment"] = None if best is None else best[0]
        if best is not None:
            d = best[1].d
            how = (
                f"by {d.reduce_by_w / 1e3:.0f} kW"
                if d.reduce_by_w is not None
                else f"to {d.target_w / 1e3:.0f} kW"
            )
            reasons["commitment"] = f"commitment {d.id} (seq {d.seq}) {how}"
        active = [(w, LOWER.index(r), r) for r in LOWER if (w := wishes.get(r)) is not None]
        wish, _, rail = min(active)
        return Decision(rail, wish, wishes, reasons[rail])
