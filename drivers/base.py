"""The driver contract: what every protocol driver offers the control cycle.

A driver owns a set of fleet rows. It polls telemetry into the fleet arrays on its own
schedule, accepts setpoints through `submit()` without blocking, keeps one mailbox slot per
device (a newer setpoint replaces an unsent one), and isolates failures per device.
`drivers.device_driver.PerDeviceDriver` implements all of that once, on top of the pieces here.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
Rows = npt.NDArray[np.intp]


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
    rows: Rows

    def submit(self, rows: Rows, setpoints_w: F64) -> None:
        """Queue setpoints for some of this driver's rows; never blocks, never raises I/O."""
        ...

    async def run(self) -> None:
        """Poll and send until cancelled. Must not raise for device failures."""
        ...


class CommandMailbox:
    """One slot per device, latest value wins; `wait()` wakes the sender when work arrives.

    Indexed by the device's local index within its driver (0..n-1).
    """

    def __init__(self, n: int) -> None:
        self._pending = np.full(n, np.nan)
        self._event = asyncio.Event()
        self._count = 0

    def put(self, local: Rows, values_w: F64) -> None:
        self._count += int(np.count_nonzero(np.isnan(self._pending[local])))
        self._pending[local] = values_w
        if len(local):
            self._event.set()

    def put_back(self, local: int, value_w: float) -> None:
        """Re-queue a failed send unless a newer value arrived meanwhile."""
        if np.isnan(self._pending[local]):
            self._count += 1
            self._pending[local] = value_w
            self._event.set()

    def take(self) -> tuple[Rows, F64]:
        """All pending (local index, value) pairs, clearing them."""
        local = np.flatnonzero(~np.isnan(self._pending))
        values = self._pending[local].copy()
        self._pending[local] = np.nan
        self._count = 0
        self._event.clear()
        return local, values

    async def wait(self, timeout_s: float) -> bool:
        """True when work is pending; False on timeout."""
        if not np.isnan(self._pending).all():
            return True
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
        # arrives as the event is set, and the sender task then never stops.
        try:
            async with asyncio.timeout(timeout_s):
                await self._event.wait()
        except TimeoutError:
            return False
        return True

    @property
    def pending(self) -> int:
        """Devices with a value waiting (O(1))."""
        return self._count


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


class CommandFunnel:
    """Clamp to device bounds, quantize, skip what is within the deadband of the last sent.

    Vectorized over the whole fleet; returns the rows whose command must go out.
    ``sleep_w``: per row, the power asleep (p_idle) of a device that can sleep, NaN where it
    cannot; a setpoint below such a device's p_min becomes exactly that (its driver sleeps it).
    """

    def __init__(
        self,
        p_min_w: F64,
        p_max_w: F64,
        step_w: F64,
        deadband_w: F64,
        sleep_w: F64 | None = None,
    ) -> None:
        self._lo = p_min_w
        self._hi = p_max_w
        self._step = step_w
        self._deadband = deadband_w
        self._sleep_w = sleep_w if sleep_w is not None and np.isfinite(sleep_w).any() else None
        self.last_sent_w = np.full(len(p_min_w), np.nan)

    def shape(self, rows: Rows, setpoints_w: F64) -> F64:
        """Bounds and quantization for `rows`, without deciding what to send."""
        lo, step = self._lo[rows], self._step[rows]
        sp = np.clip(setpoints_w, lo, self._hi[rows])
        quantized = step > 0
        if quantized.any():
            safe = np.where(quantized, step, 1.0)
            # Round down so a quantized device never exceeds the share it was given.
            sp = np.where(quantized, np.maximum(np.floor(sp / safe + 1e-9) * safe, lo), sp)
        if self._sleep_w is not None:
            asleep = self._sleep_w[rows]
            sp = np.where(
                setpoints_w < lo - 1e-9 * np.abs(lo), np.where(np.isnan(asleep), sp, asleep), sp
            )
        return sp

    def changed_rows(self, rows: Rows, setpoints_w: F64) -> tuple[Rows, F64]:
        """Of `rows` with their new setpoints, those whose command must go out, and the values."""
        sp = self.shape(rows, setpoints_w)
        delta = np.abs(sp - self.last_sent_w[rows])
        send = ~(delta <= self._deadband[rows])  # NaN last_sent -> send
        out_rows = rows[send]
        self.last_sent_w[out_rows] = sp[send]
        return out_rows, sp[send]

    def forget(self, rows: Rows) -> None:
        """Force a resend (a device rebooted or reconnected and lost its setpoint)."""
        self.last_sent_w[rows] = np.nan
