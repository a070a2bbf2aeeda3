"""What each device class earns per MWh it draws, and so the power price above which it loses.

A miner class earns hashprice per PH/s per day; at ``e`` J/TH a PH/s draws ``e`` kW, or
``0.024 e`` MWh a day, so its breakeven is ``hashprice * (1 - pool_fee) / (0.024 e)`` USD/MWh.
A class that does other work (a GPU rack) states what that work is worth per MWh. Classes
with neither are not curtailed by price.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from drivers.core.spec import DeviceSpec

MWH_PER_PH_DAY_PER_J_TH = 0.024
"""MWh one PH/s draws in a day per J/TH of efficiency (1 PH/s at e J/TH = e kW, 24 h)."""


@dataclass(frozen=True, slots=True)
class Economics:
    hashprice_usd_per_ph_day: float
    pool_fee: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.hashprice_usd_per_ph_day) and self.hashprice_usd_per_ph_day > 0):
            raise ValueError("hashprice_usd_per_ph_day must be a positive number")
        if not 0.0 <= self.pool_fee < 1.0:
            raise ValueError("pool_fee must be in [0, 1)")


def breakeven_usd_per_mwh(econ: Economics, efficiency_j_per_th: float) -> float:
    """The power price at which a miner of this efficiency earns what its power costs."""
    net = econ.hashprice_usd_per_ph_day * (1.0 - econ.pool_fee)
    return net / (MWH_PER_PH_DAY_PER_J_TH * efficiency_j_per_th)


@dataclass(frozen=True, slots=True)
class DeviceClass:
    """One device class (a template's kind) of the site, as the price rule sees it."""

    kind: str
    count: int
    full_w: float
    """All its devices at p_max."""
    idle_w: float
    """All its devices curtailed (asleep, or at p_min where they cannot sleep)."""
    efficiency_j_per_th: float | None = None
    value_usd_per_mwh: float | None = None

    @property
    def shed_w(self) -> float:
        """What curtailing the whole class takes off the site."""
        return self.full_w - self.idle_w

    def strike_usd_per_mwh(self, econ: Economics | None) -> float:
        """The price at or above which the class loses money running (inf: never)."""
        if self.value_usd_per_mwh is not None:
            return self.value_usd_per_mwh
        if self.efficiency_j_per_th is not None and econ is not None:
            return breakeven_usd_per_mwh(econ, self.efficiency_j_per_th)
        return math.inf

    def revenue_usd_per_mwh(self, econ: Economics | None) -> float:
        """What a MWh drawn by the class earns (its strike: earnings and strike are one
        figure per MWh); 0 for a class with no economics."""
        s = self.strike_usd_per_mwh(econ)
        return 0.0 if math.isinf(s) else s


def device_classes(
    devices: Sequence[DeviceSpec],
    efficiency: Mapping[str, float | None],
    value: Mapping[str, float | None],
) -> list[DeviceClass]:
    """The classes of a fleet by kind, in first-seen order. Devices only the grid services
    move (feeder breakers) are not a class: no rule but the services moves them."""
    acc: dict[str, list[float]] = {}
    for d in devices:
        if d.services_only:
            continue
        row = acc.setdefault(d.kind, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += d.p_max_w
        sleeps = (d.wake_s > 0.0 or d.sleep_s > 0.0) and d.p_idle_w < d.p_min_w
        row[2] += d.p_idle_w if sleeps else d.p_min_w
    return [
        DeviceClass(
            kind=k,
            count=int(c),
            full_w=full,
            idle_w=idle,
            efficiency_j_per_th=efficiency.get(k),
            value_usd_per_mwh=value.get(k),
        )
        for k, (c, full, idle) in acc.items()
    ]


def merit_order(classes: Sequence[DeviceClass], econ: Economics | None) -> list[DeviceClass]:
    """Classes a price curtails first come first: the lowest strike (least efficient)
    first; classes never curtailed by price last."""
    return sorted(classes, key=lambda c: c.strike_usd_per_mwh(econ))
