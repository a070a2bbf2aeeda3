"""The price rule over a price series: what it would have saved, against running flat out.

Fleet model only (no devices, no control loop): each class draws `full_w` while running and
`idle_w + (1 - f) * shed_w` while a fraction `f` of it is curtailed or coming back. The rule is
the daemon's own `PriceRule`: each quote is fed at its interval's start, `update` is called
every `step_s` while a timer runs (a deferred resume, a staggered resumption).

Money: energy is paid at the interval's price (negative prices pay the site); a class earns
`revenue_usd_per_mwh` (its strike) for every MWh it draws, so a class with no economics
(a Modbus container with no efficiency, `modbus_load`) costs energy and earns nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from controller.config import PriceRuleConfig
from controller.market.economics import DeviceClass, Economics
from controller.market.price_rule import PriceRule, RuleEvent
from controller.market.prices import PriceQuote
from drivers.core.state import F64

W_S_PER_MWH = 3.6e9


@dataclass(frozen=True, slots=True)
class BacktestResult:
    classes: tuple[DeviceClass, ...]
    strikes: dict[str, float]
    t: F64
    """Interval starts (unix s)."""
    dt_s: F64
    """Interval lengths counted (s)."""
    price: F64
    fraction: F64
    """(classes, intervals): each class's mean curtailed fraction over each interval."""
    class_w: F64
    """(classes, intervals): each class's mean power (W) with the rule."""
    site_w: F64
    """Mean site power (W) with the rule, other_w included."""
    flat_w: float
    """Site power flat out (W)."""
    events: tuple[RuleEvent, ...]
    curtailed_hours: dict[str, float]
    """Per class, curtailed hours weighted by the fraction curtailed."""
    class_energy_mwh: dict[str, float]
    class_revenue_usd: dict[str, float]
    class_cost_usd: dict[str, float]
    energy_mwh: float
    curtailed_mwh: float
    energy_cost_usd: float
    mining_revenue_usd: float
    net_usd: float
    flat_out_energy_mwh: float
    flat_out_cost_usd: float
    flat_out_revenue_usd: float
    flat_out_net_usd: float

    @property
    def hours(self) -> float:
        return float(self.dt_s.sum()) / 3600.0

    @property
    def gain_usd(self) -> float:
        """What the rule earned over running flat out."""
        return self.net_usd - self.flat_out_net_usd


def _curtailed_means(
    quotes: Sequence[PriceQuote], rule: PriceRule, kinds: Sequence[str], step_s: float
) -> tuple[F64, F64, list[RuleEvent]]:
    """Each class's mean curtailed fraction per interval, and the intervals' lengths."""
    n = len(quotes)
    frac = np.zeros((len(kinds), n))
    dt_s = np.zeros(n)
    events: list[RuleEvent] = []

    def fractions() -> F64:
        f = rule.curtailed_fraction()
        return np.array([f[k] for k in kinds])

    for i, q in enumerate(quotes):
        t0 = q.interval_start
        # An interval ends at its end or where the next one starts, whichever is first.
        t1 = q.end if i + 1 == n else min(q.end, quotes[i + 1].interval_start)
        events += rule.on_price(q, t0)
        acc = np.zeros(len(kinds))
        t = t0
        while t < t1:
            if t > t0:
                events += rule.update(t)
            if rule.settled:  # nothing moves until the next price
                acc += fractions() * (t1 - t)
                break
            dt = min(step_s, t1 - t)
            acc += fractions() * dt
            t += dt
        dt_s[i] = t1 - t0
        frac[:, i] = acc / dt_s[i]
    return frac, dt_s, events


def backtest(
    quotes: Sequence[PriceQuote],
    classes: Sequence[DeviceClass],
    rule: PriceRuleConfig,
    econ: Economics | None,
    *,
    other_w: float = 0.0,
    step_s: float = 60.0,
) -> BacktestResult:
    """Run the price rule over `quotes` (realtime, in time order) for a fleet of `classes`
    plus `other_w` of load the rule never moves (energy and cost, no revenue)."""
    if not quotes:
        raise ValueError("no prices to backtest")
    if step_s <= 0:
        raise ValueError("step_s must be positive")
    starts = [q.interval_start for q in quotes]
    if any(b <= a for a, b in itertools.pairwise(starts)):
        raise ValueError("quotes must be in strictly increasing time")
    cls = tuple(classes)
    kinds = [c.kind for c in cls]
    pr = PriceRule(cls, rule, econ)
    frac, dt_s, events = _curtailed_means(quotes, pr, kinds, step_s)

    price = np.array([q.usd_per_mwh for q in quotes])
    full = np.array([c.full_w for c in cls])
    shed = np.array([c.shed_w for c in cls])
    rate = np.array([c.revenue_usd_per_mwh(econ) for c in cls])
    class_w = full[:, None] - frac * shed[:, None]
    class_mwh = class_w * dt_s / W_S_PER_MWH  # (classes, intervals)
    class_cost = class_mwh * price
    other_mwh = other_w * dt_s / W_S_PER_MWH
    flat_mwh = full[:, None] * dt_s / W_S_PER_MWH

    energy = float(class_mwh.sum() + other_mwh.sum())
    cost = float(class_cost.sum() + (other_mwh * price).sum())
    revenue = float((class_mwh.sum(axis=1) * rate).sum())
    flat_energy = float(flat_mwh.sum() + other_mwh.sum())
    flat_cost = float((flat_mwh * price).sum() + (other_mwh * price).sum())
    flat_revenue = float((flat_mwh.sum(axis=1) * rate).sum())
    return BacktestResult(
        classes=cls,
        strikes={c.kind: c.strike_usd_per_mwh(econ) for c in cls},
        t=np.array(starts, dtype=float),
        dt_s=dt_s,
        price=price,
        fraction=frac,
        class_w=class_w,
        site_w=class_w.sum(axis=0) + other_w,
        flat_w=float(full.sum() + other_w),
        events=tuple(events),
        curtailed_hours={k: float((frac[j] * dt_s).sum() / 3600.0) for j, k in enumerate(kinds)},
        class_energy_mwh={k: float(class_mwh[j].sum()) for j, k in enumerate(kinds)},
        class_revenue_usd={k: float(class_mwh[j].sum() * rate[j]) for j, k in enumerate(kinds)},
        class_cost_usd={k: float(class_cost[j].sum()) for j, k in enumerate(kinds)},
        energy_mwh=energy,
        curtailed_mwh=float(((frac * shed[:, None]) * dt_s).sum() / W_S_PER_MWH),
        energy_cost_usd=cost,
        mining_revenue_usd=revenue,
        net_usd=revenue - cost,
        flat_out_energy_mwh=flat_energy,
        flat_out_cost_usd=flat_cost,
        flat_out_revenue_usd=flat_revenue,
        flat_out_net_usd=flat_revenue - flat_cost,
    )
