"""Pure control math: numpy only, no asyncio, no I/O, deterministic.

The control cycle calls `Controller.step(snapshot, target_w, dt)` each tick and
`Controller.capability()` for what the site can offer.
"""

from controller.control.allocate import Allocator, merit_order
from controller.control.capability import capability
from controller.control.feedback import ResidualObserver, TargetDeadband, ramp_window
from controller.control.predict import DelayModel
from controller.control.step import Controller
from controller.control.types import (
    F64,
    ON,
    Capability,
    FleetParams,
    Snapshot,
    StepResult,
)

__all__ = [
    "F64",
    "ON",
    "Allocator",
    "Capability",
    "Controller",
    "DelayModel",
    "FleetParams",
    "ResidualObserver",
    "Snapshot",
    "StepResult",
    "TargetDeadband",
    "capability",
    "merit_order",
    "ramp_window",
]
