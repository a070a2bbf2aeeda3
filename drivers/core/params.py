"""Static per-device parameters of the device-dynamics model that the control math and the
simulator share (bounds, ramp rates, dead time, sleep/wake latency, quantum, merit order)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from drivers.core.state import F64, I32, Bool

if TYPE_CHECKING:
    from drivers.core.image import ProcessImage


def _f64(a: npt.ArrayLike) -> F64:
    return np.array(a, dtype=np.float64, copy=True)


@dataclass(frozen=True, slots=True)
class FleetParams:
    """Static per-device arrays (copied, so later edits of the fleet cannot leak in)."""

    p_min_w: F64
    p_max_w: F64
    p_idle_w: F64
    ramp_up_w_s: F64
    ramp_down_w_s: F64
    dead_time_s: F64
    step_w: F64
    priority: I32
    wake_s: F64
    """Sleep -> running latency; 0 with ``sleep_s`` 0: the device cannot sleep."""
    sleep_s: F64
    """Running -> asleep latency (the device draws its power until then)."""
    capped: Bool | None = None
    """Rows whose setpoint is a ceiling (they draw min(setpoint, demand)); None: none."""
    ramps_itself: Bool | None = None
    """Rows that ramp to a new setpoint by themselves (child controllers): always in the
    slow tier, which gets its steady-state share at once; None: none."""
    services_only: Bool | None = None
    """Rows only the grid services move (feeder breakers): never in a tier, never slept or
    woken by regular control; None: none."""

    def __post_init__(self) -> None:
        n = self.p_min_w.shape
        for name in (
            "p_max_w",
            "p_idle_w",
            "ramp_up_w_s",
            "ramp_down_w_s",
            "dead_time_s",
            "step_w",
            "priority",
            "wake_s",
            "sleep_s",
        ):
            if getattr(self, name).shape != n:
                raise ValueError(f"FleetParams.{name}: shape {getattr(self, name).shape} != {n}")
        if len(n) != 1:
            raise ValueError("FleetParams arrays must be one-dimensional")
        checks = (
            (np.isfinite(self.p_min_w) & np.isfinite(self.p_max_w), "bounds must be finite"),
            (self.p_min_w <= self.p_max_w, "p_min_w must not exceed p_max_w"),
            (self.ramp_up_w_s >= 0, "ramp_up_w_s must be >= 0"),
            (self.ramp_down_w_s >= 0, "ramp_down_w_s must be >= 0"),
            (self.dead_time_s >= 0, "dead_time_s must be >= 0"),
            (self.step_w >= 0, "step_w must be >= 0"),
            (self.wake_s >= 0, "wake_s must be >= 0"),
            (self.sleep_s >= 0, "sleep_s must be >= 0"),
        )
        for ok, msg in checks:
            if not bool(np.all(ok)):
                raise ValueError(f"FleetParams: {msg} (row {int(np.argmin(ok))})")

    @property
    def n(self) -> int:
        return int(self.p_min_w.shape[0])

    @property
    def sleepable(self) -> Bool:
        """Rows that can be put to sleep (a miner's curtail): below p_min there is p_idle
        (never a row only the grid services move)."""
        out: Bool = ((self.wake_s > 0) | (self.sleep_s > 0)) & (self.p_idle_w < self.p_min_w)
        if self.services_only is not None:
            out &= ~self.services_only
        return out

    @classmethod
    def of(
        cls,
        *,
        p_min_w: npt.ArrayLike,
        p_max_w: npt.ArrayLike,
        ramp_up_w_s: npt.ArrayLike,
        ramp_down_w_s: npt.ArrayLike,
        p_idle_w: npt.ArrayLike | None = None,
        dead_time_s: npt.ArrayLike | None = None,
        step_w: npt.ArrayLike | None = None,
        priority: npt.ArrayLike | None = None,
        wake_s: npt.ArrayLike | None = None,
        sleep_s: npt.ArrayLike | None = None,
        capped: npt.ArrayLike | None = None,
        ramps_itself: npt.ArrayLike | None = None,
        services_only: npt.ArrayLike | None = None,
    ) -> FleetParams:
        """Convenience constructor for tests and tools: lists or arrays, optional zeros."""
        lo = _f64(p_min_w)
        zeros = np.zeros_like(lo)
        return cls(
            p_min_w=lo,
            p_max_w=_f64(p_max_w),
            p_idle_w=zeros.copy() if p_idle_w is None else _f64(p_idle_w),
            ramp_up_w_s=_f64(ramp_up_w_s),
            ramp_down_w_s=_f64(ramp_down_w_s),
            dead_time_s=zeros.copy() if dead_time_s is None else _f64(dead_time_s),
            step_w=zeros.copy() if step_w is None else _f64(step_w),
            priority=(
                np.zeros(lo.shape, dtype=np.int32)
                if priority is None
                else np.array(priority, dtype=np.int32, copy=True)
            ),
            wake_s=zeros.copy() if wake_s is None else _f64(wake_s),
            sleep_s=zeros.copy() if sleep_s is None else _f64(sleep_s),
            capped=None if capped is None else np.array(capped, dtype=np.bool_, copy=True),
            ramps_itself=(
                None if ramps_itself is None else np.array(ramps_itself, dtype=np.bool_, copy=True)
            ),
            services_only=(
                None
                if services_only is None
                else np.array(services_only, dtype=np.bool_, copy=True)
            ),
        )

    @classmethod
    def from_image(cls, image: ProcessImage) -> FleetParams:
        """The image's static columns as they are now (learned limits included)."""
        return cls(
            p_min_w=_f64(image.p_min_w),
            p_max_w=_f64(image.p_max_w),
            p_idle_w=_f64(image.p_idle_w),
            ramp_up_w_s=_f64(image.ramp_up_w_s),
            ramp_down_w_s=_f64(image.ramp_down_w_s),
            dead_time_s=_f64(image.dead_time_s),
            step_w=_f64(image.step_w),
            priority=np.array(image.priority, dtype=np.int32, copy=True),
            wake_s=_f64(image.wake_s),
            sleep_s=_f64(image.sleep_s),
            capped=np.array(image.capped, dtype=np.bool_, copy=True),
            ramps_itself=np.array(image.ramps_itself, dtype=np.bool_, copy=True),
            services_only=np.array(image.services_only, dtype=np.bool_, copy=True),
        )
