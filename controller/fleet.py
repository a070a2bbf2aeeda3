"""Struct-of-arrays state of every device, one row per device, SI units (W, s, monotonic clock).

Static columns come from the config; dynamic columns are written by drivers (telemetry)
and by the control cycle (setpoints). Nothing here loops per device. A driver whose devices
report their own limits (a child rampd: its capability) updates bounds and ramp rates with
`update_dynamics`; `dynamics_version` tells the daemon to hand them to the control math.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from controller.config import DeviceSpec

F64 = npt.NDArray[np.float64]
I8 = npt.NDArray[np.int8]
I32 = npt.NDArray[np.int32]
Bool = npt.NDArray[np.bool_]


class DeviceState(IntEnum):
    ON = 0
    SLEEPING = 1
    WAKING = 2
    FAULT = 3
    UNKNOWN = 4


STATE_NAMES: tuple[str, ...] = tuple(s.name.lower() for s in DeviceState)


@dataclass(slots=True)
class Fleet:
    names: tuple[str, ...]
    kinds: tuple[str, ...]
    """Distinct device kinds; `kind_id` indexes into this."""
    kind_id: I32
    p_min_w: F64
    p_max_w: F64
    p_idle_w: F64
    ramp_up_w_s: F64
    ramp_down_w_s: F64
    dead_time_s: F64
    wake_s: F64
    sleep_s: F64
    step_w: F64
    deadband_w: F64
    priority: I32
    driver_id: I32
    capped: Bool
    """The setpoint is a ceiling (`DeviceSpec.setpoint_is_cap`)."""
    ramps_itself: Bool
    """A controller of its own, given its steady-state share at once (`DeviceSpec`)."""
    measured_w: F64 = field(init=False)
    measured_at: F64 = field(init=False)
    """Monotonic time of the last good reading; NaN when never read."""
    setpoint_w: F64 = field(init=False)
    """Last setpoint the control cycle decided (not necessarily sent yet)."""
    delivered_w: F64 = field(init=False)
    """Last setpoint the device acknowledged (written by its driver); NaN: none yet."""
    state: I8 = field(init=False)
    dynamics_version: int = field(init=False)
    """Counts `update_dynamics` calls that changed something."""

    def __post_init__(self) -> None:
        n = len(self.names)
        self.measured_w = np.zeros(n)
        self.measured_at = np.full(n, np.nan)
        self.setpoint_w = self.p_max_w.copy()
        self.delivered_w = np.full(n, np.nan)
        self.state = np.full(n, DeviceState.UNKNOWN, dtype=np.int8)
        self.dynamics_version = 0

    @property
    def n(self) -> int:
        return len(self.names)

    @classmethod
    def from_specs(cls, specs: Sequence[DeviceSpec], driver_ids: Sequence[int]) -> Fleet:
        kinds = tuple(dict.fromkeys(s.kind for s in specs))
        kind_index = {k: i for i, k in enumerate(kinds)}

        def col(attr: str) -> F64:
            return np.array([getattr(s, attr) for s in specs], dtype=np.float64)

        return cls(
            names=tuple(s.name for s in specs),
            kinds=kinds,
            kind_id=np.array([kind_index[s.kind] for s in specs], dtype=np.int32),
            p_min_w=col("p_min_w"),
            p_max_w=col("p_max_w"),
            p_idle_w=col("p_idle_w"),
            ramp_up_w_s=col("ramp_up_w_s"),
            ramp_down_w_s=col("ramp_down_w_s"),
            dead_time_s=col("dead_time_s"),
            wake_s=col("wake_s"),
            sleep_s=col("sleep_s"),
            step_w=col("step_w"),
            deadband_w=col("deadband_w"),
            priority=np.array([s.priority for s in specs], dtype=np.int32),
            driver_id=np.asarray(driver_ids, dtype=np.int32),
            capped=np.array([s.setpoint_is_cap for s in specs], dtype=np.bool_),
            ramps_itself=np.array([s.ramps_itself for s in specs], dtype=np.bool_),
        )

    def update_dynamics(
        self,
        rows: npt.ArrayLike,
        *,
        p_min_w: npt.ArrayLike,
        p_max_w: npt.ArrayLike,
        ramp_up_w_s: npt.ArrayLike,
        ramp_down_w_s: npt.ArrayLike,
    ) -> bool:
        """New bounds and ramp rates for ``rows``, written in place (the command funnel holds
        these arrays, so its clamp follows at once). Returns whether anything changed.

        Raises ValueError, changing nothing, unless every value is finite, ``0 <= p_min <=
        p_max`` and the ramp rates are above 0 (a device that cannot move is not a device
        with a zero ramp rate: its driver marks it FAULT instead).
        """
        idx = np.asarray(rows, dtype=np.intp)
        lo, hi = np.broadcast_arrays(
            np.asarray(p_min_w, dtype=np.float64), np.asarray(p_max_w, dtype=np.float64)
        )
        up = np.asarray(ramp_up_w_s, dtype=np.float64)
        down = np.asarray(ramp_down_w_s, dtype=np.float64)
        values = np.broadcast_arrays(lo, hi, up, down, idx)[:4]
        if not all(np.isfinite(v).all() for v in values):
            raise ValueError("update_dynamics: values must be finite")
        if not ((values[0] >= 0) & (values[0] <= values[1])).all():
            raise ValueError("update_dynamics: need 0 <= p_min_w <= p_max_w")
        if not ((values[2] > 0) & (values[3] > 0)).all():
            raise ValueError("update_dynamics: ramp rates must be above 0")
        columns = (self.p_min_w, self.p_max_w, self.ramp_up_w_s, self.ramp_down_w_s)
        if all(np.array_equal(col[idx], v) for col, v in zip(columns, values, strict=True)):
            return False
        for col, v in zip(columns, values, strict=True):
            col[idx] = v
        self.dynamics_version += 1
        return True

    def mark_stale(self, now: float, max_age_s: float) -> None:
        """Telemetry older than max_age_s (or never read) makes a device UNKNOWN."""
        stale = ~(now - self.measured_at <= max_age_s)  # NaN compares False -> stale
        stale &= self.state != DeviceState.FAULT
        self.state[stale] = DeviceState.UNKNOWN

    def counts_by_state(self) -> dict[str, int]:
        counts = np.bincount(self.state.astype(np.intp), minlength=len(DeviceState))
        return {name: int(c) for name, c in zip(STATE_NAMES, counts, strict=True)}
