"""Value types of the control step: the per-tick snapshot and results (the static fleet
parameters, `FleetParams`, live in the neutral core: the simulator models devices with them).

All arrays are indexed by fleet row 0..N-1 and carry SI units (W, W/s, s).
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.core.params import FleetParams
from drivers.core.state import F64, I8, I32, Bool, DeviceState, Rows

ON = int(DeviceState.ON)
"""Every state but ON is fixed for the allocator."""

__all__ = ["F64", "I8", "I32", "ON", "Bool", "FleetParams", "Rows"]


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
    """`drivers.core.state.DeviceState` values, staleness applied (UNKNOWN)."""
    meter_age_s: float = 0.0
    """How long before `t` the meter value was taken (poll age plus the meter's own lag)."""
    delivered_w: F64 | None = None
    """Per device, the last setpoint the device acknowledged (NaN: none yet). The model
    follows these, not the decisions still queued in a driver: at 2,000 miners a fleet-wide
    command takes seconds to go out, and a model that assumed otherwise would hunt."""
    acked_sleep: Bool | None = None
    """Per device, whether the last acknowledged command was a sleep (None: no
    acknowledgements; a sleep's countdown then starts at the decision)."""
    held: Bool | None = None
    """Rows a grid service holds (feeders kept closed for the armed response, loads a
    deployment shed): fixed at their power, out of control, like FAULT rows (None: none)."""
    row_ceiling_w: F64 | None = None
    """Per device, a ceiling on its setpoint from outside the control law (a zone capped by
    its own DSX Flex feed's target; +inf: none), or None: no row capped. The row is brought
    under it at its own ramp rate, never below its p_min; the others take up what it cannot
    (`controller.row_ceilings`)."""


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
    sleep: Bool | None = None
    """Rows told to sleep (their setpoint is their power asleep); None: none can sleep."""


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
