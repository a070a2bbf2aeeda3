"""Value types of the control step: static fleet parameters, the per-tick snapshot, results.

All arrays are indexed by fleet row 0..N-1 and carry SI units (W, W/s, s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # the control package stays importable without the daemon's config stack
    from controller.fleet import Fleet

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I8 = npt.NDArray[np.int8]
Bool = npt.NDArray[np.bool_]
Rows = npt.NDArray[np.intp]

ON = 0
"""`controller.fleet.DeviceState.ON`; every other state is fixed for the allocator."""


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
        """Rows that can be put to sleep (a miner's curtail): below p_min there is p_idle."""
        out: Bool = ((self.wake_s > 0) | (self.sleep_s > 0)) & (self.p_idle_w < self.p_min_w)
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
        )

    @classmethod
    def from_fleet(cls, fleet: Fleet) -> FleetParams:
        return cls(
            p_min_w=_f64(fleet.p_min_w),
            p_max_w=_f64(fleet.p_max_w),
            p_idle_w=_f64(fleet.p_idle_w),
            ramp_up_w_s=_f64(fleet.ramp_up_w_s),
            ramp_down_w_s=_f64(fleet.ramp_down_w_s),
            dead_time_s=_f64(fleet.dead_time_s),
            step_w=_f64(fleet.step_w),
            priority=np.array(fleet.priority, dtype=np.int32, copy=True),
            wake_s=_f64(fleet.wake_s),
            sleep_s=_f64(fleet.sleep_s),
            capped=np.array(fleet.capped, dtype=np.bool_, copy=True),
            ramps_itself=np.array(fleet.ramps_itself, dtype=np.bool_, copy=True),
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Frozen copy of the latest telemetry, taken by the cycle each tick."""

    t: float
    """Monotonic seconds."""
    meter_w: float
    """Site meter (all devices + non-flexible load); NaN when stale or missing."""
    measured_w: F64
    """Per device, last polled power."""
    new_reading: Bool
    """Rows whose poll arrived since the previous snapshot."""
    state: I8
    """`controller.fleet.DeviceState` values."""
    meter_age_s: float = 0.0
    """How long before `t` the meter value was taken (poll age plus the meter's own lag)."""
    delivered_w: F64 | None = None
    """Per device, the last setpoint the device acknowledged (NaN: none yet). The model
    follows these, not the decisions still queued in a driver: at 2,000 miners a fleet-wide
    command takes seconds to go out, and a model that assumed otherwise would hunt."""


@dataclass(frozen=True, slots=True)
class StepResult:
    setpoints_w: F64
    """One per device; rows not controllable keep their previous setpoint."""
    flex_target_w: float
    """Total asked of the controllable devices (after the site deadband)."""
    predicted_site_w: float
    """sum(predicted device power) + non-flexible estimate."""
    noncontrollable_w: float
    """Observer estimate of meter - sum(predicted)."""
    saturated: int
    """-1 target below what is reachable this cycle, +1 above, 0 reachable."""
    controllable: Bool
    commanded: Bool | None = None
    """Rows whose setpoint the controller decides: the controllable ones plus those it puts
    to sleep or wakes (None: the controllable ones)."""
    parked: int = 0
    """Devices told to sleep (asleep or on their way)."""
    waking: int = 0
    """Devices told to wake, not running yet."""


@dataclass(frozen=True, slots=True)
class Capability:
    horizons_s: tuple[float, ...]
    up_w: tuple[float, ...]
    """Extra site power reachable within each horizon (>= 0)."""
    down_w: tuple[float, ...]
    """Power that can be shed within each horizon (>= 0)."""
    min_w: float
    """Site power range in steady state, incl. fixed devices and the non-flexible estimate."""
    max_w: float
