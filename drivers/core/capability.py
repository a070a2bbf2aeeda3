"""What a device can do, as its driver learns it at adoption (from the device's own API).

A device either takes a continuous power target (in watts or a percentage, with its own
resolution) or only a few presets (a stock Antminer's normal and low-power modes); it may or
may not have a sleep command, and may or may not report its own power. The control model
takes presets as quanta on a grid from the lowest to the highest, and never tells a device
without a sleep command to sleep.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from enum import StrEnum


class Control(StrEnum):
    CONTINUOUS = "continuous"
    PRESETS = "presets"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """One device's capabilities. Build with `continuous` or `presets`; both validate."""

    control: Control
    p_min_w: float
    p_max_w: float
    step_w: float = 0.0
    """The grid the device's power moves on (0: any value); for presets, their spacing."""
    presets_w: tuple[float, ...] = field(default=())
    """Presets only: the powers the device runs at, ascending."""
    can_sleep: bool = True
    sleep_s: float | None = None
    """Running -> asleep, when the device says (None: the template's figure)."""
    wake_s: float | None = None
    """Asleep -> running, when the device says (None: the template's figure)."""
    reports_power: bool = True
    """False: the device's power is the driver's estimate (its preset's nominal power), and
    a command is verified by the mode it reads back, not by the power."""

    def __post_init__(self) -> None:
        values = (self.p_min_w, self.p_max_w, self.step_w, *self.presets_w)
        if not all(math.isfinite(v) for v in values):
            raise ValueError("capabilities must be finite")
        if not 0 <= self.p_min_w <= self.p_max_w:
            raise ValueError(f"need 0 <= p_min_w <= p_max_w, got {self.p_min_w}, {self.p_max_w}")
        if self.step_w < 0:
            raise ValueError("step_w must be >= 0")
        for t in (self.sleep_s, self.wake_s):
            if t is not None and not (math.isfinite(t) and t >= 0):
                raise ValueError("sleep_s and wake_s must be finite and >= 0")
        if self.control is Control.PRESETS:
            if not self.presets_w or list(self.presets_w) != sorted(set(self.presets_w)):
                raise ValueError("presets must be distinct and ascending")
            if (self.presets_w[0], self.presets_w[-1]) != (self.p_min_w, self.p_max_w):
                raise ValueError("presets must span p_min_w..p_max_w")
        elif self.presets_w:
            raise ValueError("a continuous device has no presets")

    @classmethod
    def continuous(
        cls,
        p_min_w: float,
        p_max_w: float,
        *,
        step_w: float = 0.0,
        can_sleep: bool = True,
        sleep_s: float | None = None,
        wake_s: float | None = None,
        reports_power: bool = True,
    ) -> Capabilities:
        return cls(
            Control.CONTINUOUS,
            float(p_min_w),
            float(p_max_w),
            float(step_w),
            (),
            can_sleep,
            sleep_s,
            wake_s,
            reports_power,
        )

    @classmethod
    def presets(
        cls,
        powers_w: tuple[float, ...] | list[float],
        *,
        can_sleep: bool = True,
        sleep_s: float | None = None,
        wake_s: float | None = None,
        reports_power: bool = True,
    ) -> Capabilities:
        """Presets at `powers_w` (any order). The grid's step is their smallest spacing: a
        planned power between two presets runs the one below (`preset_at_or_below`)."""
        p = tuple(sorted({float(x) for x in powers_w}))
        if not p:
            raise ValueError("presets must not be empty")
        step = min((b - a for a, b in itertools.pairwise(p)), default=0.0)
        return cls(Control.PRESETS, p[0], p[-1], step, p, can_sleep, sleep_s, wake_s, reports_power)

    def preset_at_or_below(self, power_w: float) -> float:
        """The highest preset at or below `power_w` (the lowest when none is)."""
        best = self.presets_w[0]
        for p in self.presets_w:
            if p <= power_w + 1e-6:
                best = p
        return best
