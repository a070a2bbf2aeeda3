"""Driver for feeder breakers and contactors over Modbus TCP (BREAKER_MAP), protocol "breaker".

A breaker is an on/off device: its feeder's load runs in full (closed) or not at all (open).
At adoption (its first good poll) it is reported as one preset at the template's feeder load
with a sleep command: `Capabilities.presets((p_max,), can_sleep=True, sleep_s=<opening
time>, wake_s=<the load's restart>)`, so p_min = p_max and the only move is to trip it. A
SLEEP command opens it (coil 0 written 0: a trip), RUN closes it (coil 0 written 1); each is
one FC5 exchange on the per-device connection (drivers.modbus.client.ModbusLink), verified
by its echo. A poll is one FC4 read of the whole state.

State from what a breaker knows: contacts open -> SLEEPING; closed with less than
WAKING_FRACTION of its feeder load flowing -> WAKING (the load behind restarting after a
re-close); closed -> ON.

Readback: a coil read closed after an acknowledged trip is opened again (the safe direction).
A coil read open after an acknowledged close is NOT closed again: someone opened it at the
breaker (maintenance, lockout) and a remote re-close onto that is unsafe; it is logged once
and the breaker stays open until an operator closes it or rampd sends a new close.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Unpack

import numpy as np
from pymodbus.pdu import ModbusPDU

from drivers.base import CommandObserver, ProtocolError
from drivers.breaker.registers import (
    BREAKER_MAP,
    BREAKER_TELEMETRY,
    CLOSE_COIL,
    TELEMETRY_ADDR,
    TELEMETRY_COUNT,
)
from drivers.core.capability import Capabilities
from drivers.core.command import Intent
from drivers.core.image import DevicePort
from drivers.core.registry import DriverContext, register
from drivers.core.state import DeviceState
from drivers.device_driver import DriverOptions, PerDeviceDriver, Reading
from drivers.modbus.client import ModbusLink, Op

log = logging.getLogger("rampd.drivers.breaker")

WAKING_FRACTION = 0.5
"""Closed with less than this share of the feeder load flowing: the load is restarting."""


@dataclass(frozen=True, slots=True)
class _BreakerReading(Reading):
    close: int
    """The coil as read back (1 close, 0 open)."""
    closed: bool
    """The auxiliary contact."""
    trips: int


class BreakerDriver(PerDeviceDriver[_BreakerReading]):
    """Drives the feeder breakers of its port."""

    protocol = "breaker"
    default_concurrency = 32
    _log = log

    def __init__(
        self,
        port: DevicePort,
        on_command: CommandObserver | None = None,
        **options: Unpack[DriverOptions],
    ) -> None:
        super().__init__(port, on_command, **options)
        n = len(self._specs)
        self._links = [ModbusLink(s.name, s.host, s.port, s.unit, s.timeout_s) for s in self._specs]
        self._adopted = np.zeros(n, dtype=np.bool_)
        self._opened_warned = np.zeros(n, dtype=np.bool_)
        # Telemetry beyond the process image, by local index (public for metrics and tests).
        self.trips = np.zeros(n, dtype=np.int64)
        """The breaker's own count of trips by command, as last read."""
        self.closed = np.ones(n, dtype=np.bool_)
        """The auxiliary contact, as last read."""

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for link in self._links:
                link.close()

    async def _transact(self, local: int, op: Op) -> ModbusPDU:
        await self._take_slot(local)
        try:
            return await self._links[local].call(op)
        finally:
            self._slots.release()

    def capabilities(self, local: int) -> Capabilities:
        """On/off: the feeder load as the one preset, tripped as sleep."""
        spec = self._specs[local]
        return Capabilities.presets(
            (spec.p_max_w,), can_sleep=True, sleep_s=spec.sleep_s, wake_s=spec.wake_s
        )

    # --- sending ---

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        close = intent != Intent.SLEEP
        unit = self._specs[local].unit
        reply = await self._transact(
            local, lambda c: c.write_coil(CLOSE_COIL, close, device_id=unit)
        )
        # Only the echo of this write (FC5, same coil, same value) says the coil took it.
        bits = list(getattr(reply, "bits", []) or [])
        if reply.function_code != 5 or reply.address != CLOSE_COIL or bits[:1] != [close]:
            raise ProtocolError(
                f"trip/close answered with function {reply.function_code}, "
                f"address {reply.address}, bits {bits[:1]}"
            )
        self._opened_warned[local] = False
        if close:
            self._poll_soon[local] = True  # follow the re-close

    # --- polling ---

    async def _read(self, local: int) -> _BreakerReading:
        unit = self._specs[local].unit
        reply = await self._transact(
            local,
            lambda c: c.read_input_registers(TELEMETRY_ADDR, count=TELEMETRY_COUNT, device_id=unit),
        )
        registers = reply.registers
        if len(registers) != TELEMETRY_COUNT:
            raise ProtocolError(f"{len(registers)} registers, expected {TELEMETRY_COUNT}")
        v = BREAKER_MAP.decode(registers, TELEMETRY_ADDR, BREAKER_TELEMETRY)
        measured = self._check_power(local, float(v["measured_w"]))
        close, closed = int(v["close"]), int(v["closed"])
        if close not in (0, 1) or closed not in (0, 1):
            raise ProtocolError(f"coil {close} / contact {closed}: not a breaker's state")
        if not closed:
            state = DeviceState.SLEEPING
        elif measured < WAKING_FRACTION * float(self._p_max_w[local]):
            state = DeviceState.WAKING
        else:
            state = DeviceState.ON
        return _BreakerReading(measured, state, close, bool(closed), int(v["trips"]))

    def _polled(self, local: int, reading: _BreakerReading) -> None:
        self.trips[local] = reading.trips
        self.closed[local] = reading.closed
        if not self._adopted[local]:
            self.port.adopted(local, self.capabilities(local))
            self._adopted[local] = True
        if not self._readback_due(local):
            return
        _, intent = self._acked(local)
        if intent == Intent.SLEEP and reading.close:
            self._resend(local, "coil reads closed after a trip")
        elif intent == Intent.RUN and not reading.close and not self._opened_warned[local]:
            self._opened_warned[local] = True
            log.warning(
                "breaker %s: opened at the breaker after rampd closed it; left open "
                "(a remote re-close is not safe)",
                self._name(local),
            )


@register("breaker")
def _breaker(port: DevicePort, ctx: DriverContext) -> BreakerDriver:
    return BreakerDriver(
        port, ctx.on_command, poll_stretch=ctx.poll_stretch, max_concurrency=ctx.max_concurrency
    )
