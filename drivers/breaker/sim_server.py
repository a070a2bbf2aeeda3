"""Simulated feeder breakers: a pymodbus server per breaker, its tables the physics row.

The row behaves as an on/off device: p_min = p_max = the feeder's load, p_idle = 0. Writing
coil 0 is the physics' run command (1 close, 0 open); the physics applies it after the row's
dead time (the Modbus exchange), opens the contacts after its sleep_s (the breaker's opening
time) and, once re-closed, brings the load back after its wake_s (what the load behind needs
to restart). The auxiliary contact reads closed unless the row is asleep (open).

Faults come from `physics.fault` as for the Modbus loads (drivers.modbus.sim_server): SILENT
drops replies (and writes), SLOW delays them, ERROR answers a Modbus exception, GARBAGE reads
an implausible power. STUCK is the physics' own: the coil takes the write and reads it back,
the contacts do not move.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pymodbus.constants import ExcCodes
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.breaker.registers import BREAKER_MAP, TELEMETRY_ADDR, TELEMETRY_COUNT
from drivers.core.spec import DeviceSpec
from drivers.core.state import DeviceState
from drivers.modbus.registers import Value
from drivers.modbus.sim_server import FaultyDevice, SimServers, serve
from drivers.sim.physics import Fault, SitePhysics

_READ_BITS = frozenset({1, 2})
_WRITE_COIL = frozenset({5, 15})


class BreakerDevice(FaultyDevice):
    """BREAKER_MAP of physics row `i`."""

    serves_bits = True

    def __init__(self, physics: SitePhysics, i: int) -> None:
        self.physics = physics
        self.i = i
        self.trips = 0

    def _fault(self) -> Fault:
        return Fault(int(self.physics.fault[self.i]))

    def closed(self) -> bool:
        """The contacts: closed unless the row is asleep (open)."""
        return int(self.physics.state[self.i]) != DeviceState.SLEEPING

    def image(self, garbage: bool = False) -> dict[str, Value]:
        ph, i = self.physics, self.i
        closed = self.closed()
        # Open contacts carry no current: the meter's noise is on a flowing current only.
        power = max(float(ph.reported_w[i]), 0.0) if closed else 0.0
        return {
            "measured_w": math.nan if garbage else power,
            "close": int(ph.cmd_run[i]),
            "closed": int(closed),
            "trips": self.trips,
        }

    def simdevice(self) -> SimDevice:
        def bit() -> list[SimData]:
            return [SimData(0, values=False, datatype=DataType.BITS)]

        def regs(readonly: bool) -> list[SimData]:
            return [
                SimData(
                    TELEMETRY_ADDR,
                    count=TELEMETRY_COUNT,
                    values=0,
                    datatype=DataType.REGISTERS,
                    readonly=readonly,
                )
            ]

        # Separate tables (coils, discrete inputs, holding, input), bit-addressed coils.
        tables = (bit(), bit(), regs(True), regs(True))
        return SimDevice(0, simdata=tables, action=self.action)  # id 0: answer any unit id

    async def action(
        self,
        func_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if func_code in _WRITE_COIL and values is None:
            # pymodbus reads the coil back after a write to build the echo: that read is
            # part of the same request, already gated.
            registers[0] = int(self.physics.cmd_run[self.i])
            return None
        fault, exc = await self._gate(func_code)
        if exc is not None:
            return exc
        if func_code in _WRITE_COIL:
            if fault == Fault.SILENT:
                return None  # unreachable: the write never lands
            if values is None or len(values) != 1 or address != 0:
                return ExcCodes.ILLEGAL_ADDRESS
            close = bool(values[0])
            if not close and int(self.physics.cmd_run[self.i]):
                self.trips += 1
            self.physics.command(self.i, run=int(close))
            return None
        if func_code in _READ_BITS:
            # Bit 0 is the LSB of the word pymodbus reads the bits from.
            bit = int(self.physics.cmd_run[self.i]) if func_code == 1 else int(self.closed())
            registers[0] = bit
            return None
        BREAKER_MAP.encode_into(registers, start_address, self.image(fault == Fault.GARBAGE))
        return None


async def start_breaker_servers(
    physics: SitePhysics, rows: Sequence[int], specs: Sequence[DeviceSpec]
) -> SimServers:
    """Serve physics row i as the breaker specs[i], for each i of `rows`."""
    servers = SimServers()
    try:
        for i in rows:
            spec = specs[i]
            servers.servers.append(
                await serve(BreakerDevice(physics, i), spec.host, spec.port, spec.name)
            )
    except BaseException:
        await servers.close()
        raise
    return servers


__all__ = ["BreakerDevice", "start_breaker_servers"]
