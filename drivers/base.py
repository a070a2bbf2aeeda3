"""The driver contract: what every protocol driver offers the control cycle.

A driver is built with a port over its own rows of the process image
(`drivers.core.image.DevicePort`). It writes readings, faults and acknowledged commands
through that port on its own schedule, accepts typed commands through `submit()` without
blocking, keeps one pending slot per device (a newer command replaces an unsent one), and
isolates failures per device. `drivers.device_driver.PerDeviceDriver` implements all of that
once, on top of the pieces here.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from drivers.core.command import Commands
from drivers.core.image import DevicePort


class DriverError(Exception):
    """A device answered wrongly or not at all; the device is isolated, the cycle goes on."""


class DeviceTimeout(DriverError):
    pass


class PollPreempted(Exception):
    """A poll gave way to a command for its device (not a failure of anything)."""


class ProtocolError(DriverError):
    """The device answered, but not in a way its protocol allows (exception code, garbage)."""


# Called by drivers for every command: (driver name, seconds, ok).
CommandObserver = Callable[[str, float, bool], None]


@runtime_checkable
class Driver(Protocol):
    name: str
    port: DevicePort

    def submit(self, commands: Commands) -> None:
        """Queue commands, by local index; never blocks, never raises I/O."""
        ...

    async def run(self) -> None:
        """Poll and send until cancelled. Must not raise for device failures."""
        ...


class Backoff:
    """Capped exponential backoff with full jitter, per device."""

    def __init__(
        self, n: int, base_s: float = 0.5, cap_s: float = 30.0, rng: random.Random | None = None
    ) -> None:
        self._failures = np.zeros(n, dtype=np.int32)
        self._not_before = np.zeros(n)
        self._base = base_s
        self._cap = cap_s
        self._rng = rng or random.Random()

    def failed(self, local: int, now: float) -> float:
        self._failures[local] += 1
        ceiling = min(self._cap, self._base * 2.0 ** min(int(self._failures[local]) - 1, 30))
        delay = self._rng.uniform(ceiling / 2, ceiling)
        self._not_before[local] = now + delay
        return delay

    def succeeded(self, local: int) -> None:
        self._failures[local] = 0
        self._not_before[local] = 0.0

    def ready(self, local: int, now: float) -> bool:
        return bool(now >= self._not_before[local])

    def failures(self, local: int) -> int:
        return int(self._failures[local])
