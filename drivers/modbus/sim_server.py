"""Simulated Modbus TCP devices: pymodbus servers whose registers are the physics arrays.

One server per device on its own (loopback) address. pymodbus (3.16 and later) has no
subclassable datablocks; its SimDevice takes an `action` hook that runs on every register
access, and ours fills the requested registers from the physics arrays on reads and pushes
writes into them, so nothing copies registers per physics tick. Faults are applied per request from
`physics.fault`: SILENT suppresses the reply (the frame is dropped on its way out), SLOW
delays it, ERROR answers with a Modbus exception, GARBAGE answers with implausible values.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from contextlib import suppress
from typing import ClassVar, Protocol

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.core.spec import DeviceSpec
from drivers.modbus.client import quiet_pymodbus
from drivers.modbus.registers import (
    COMMON_ID,
    COMMON_LEN,
    LOAD_MAP,
    METER_MAP,
    METER_MODEL_ID,
    METER_MODEL_LEN,
    SUNSPEC_BASE,
    SUNSPEC_END,
    SUNSPEC_MARKER,
    Value,
)
from drivers.sim.physics import SLOW_S, Fault, SitePhysics

log = logging.getLogger("rampd.sim")

_BIT_FUNCTIONS = frozenset({1, 2, 5, 15})  # coils and discrete inputs
_V_LN = 277.0  # 480 V wye
_PF = 0.99


class FaultyDevice:
    """Fault handling shared by the simulated Modbus devices' hooks (loads, meter, breakers).

    `serves_bits`: whether the device has coils and discrete inputs (a breaker); the
    register-only maps answer those functions with ILLEGAL_FUNCTION."""

    serves_bits: ClassVar[bool] = False

    def _fault(self) -> Fault:
        raise NotImplementedError

    def trace_packet(self, sending: bool, data: bytes) -> bytes:
        # SILENT: the request is processed but no reply leaves the device.
        if sending and self._fault() == Fault.SILENT:
            return b""
        return data

    async def _gate(self, func_code: int) -> tuple[Fault, ExcCodes | None]:
        if func_code in _BIT_FUNCTIONS and not self.serves_bits:
            return Fault.NONE, ExcCodes.ILLEGAL_FUNCTION
        fault = self._fault()
        if fault == Fault.SLOW:
            await asyncio.sleep(SLOW_S)
            fault = self._fault()
        if fault == Fault.ERROR:
            return fault, ExcCodes.DEVICE_FAILURE
        return fault, None


class LoadDevice(FaultyDevice):
    """LOAD_MAP of physics row `i`."""

    def __init__(self, physics: SitePhysics, i: int) -> None:
        self.physics = physics
        self.i = i

    def _fault(self) -> Fault:
        return Fault(int(self.physics.fault[self.i]))

    def simdevice(self) -> SimDevice:
        data = [
            SimData(
                r.address,
                count=r.size,
                values=0,
                datatype=DataType.REGISTERS,
                readonly=not r.writable,
            )
            for r in LOAD_MAP.regs
        ]
        return SimDevice(0, simdata=data, action=self.action)  # id 0: answer any unit id

    def image(self, garbage: bool = False) -> dict[str, Value]:
        ph, i = self.physics, self.i
        return {
            "setpoint_w": float(ph.cmd_setpoint_w[i]),
            "run": int(ph.cmd_run[i]),
            "measured_w": math.nan if garbage else float(ph.reported_w[i]),
            "state": 0xBEEF if garbage else int(ph.state[i]),
            "p_min_w": float(ph.p_min_w[i]),
            "p_max_w": float(ph.p_max_w[i]),
        }

    async def action(
        self,
        func_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        fault, exc = await self._gate(func_code)
        if exc is not None:
            return exc
        if values is None:
            LOAD_MAP.encode_into(registers, start_address, self.image(fault == Fault.GARBAGE))
            return None
        if fault == Fault.SILENT:
            return None  # the device is unreachable: the write never lands
        # Merge the written words into the current command so a half float is handled too.
        LOAD_MAP.encode_into(registers, start_address, self.image())
        merged = list(registers)
        lo = address - start_address
        merged[lo : lo + len(values)] = [int(v) for v in values]
        cmd = LOAD_MAP.decode(merged, start_address, ("setpoint_w", "run"))
        setpoint, run = float(cmd["setpoint_w"]), int(cmd["run"])
        if not math.isfinite(setpoint) or setpoint < 0 or run not in (0, 1):
            return ExcCodes.ILLEGAL_VALUE
        self.physics.command(self.i, setpoint_w=setpoint, run=run)
        return None


class MeterDevice(FaultyDevice):
    """METER_MAP: the site meter reading physics.meter_w."""

    def __init__(self, physics: SitePhysics, unit: int = 1) -> None:
        self.physics = physics
        self.unit = unit

    def _fault(self) -> Fault:
        return Fault(int(self.physics.meter_fault))

    def static_image(self) -> list[int]:
        block = [0] * METER_MAP.count
        nan = math.nan
        static: dict[str, Value] = {name: nan for name in _float_points()}
        static.update(
            SunS=SUNSPEC_MARKER,
            C_ID=COMMON_ID,
            C_L=COMMON_LEN,
            Mn="rampd",
            Md="sim-meter-213",
            Opt="",
            Vr="0.1.0",
            SN="SIM0001",
            DA=self.unit,
            Pad=0x8000,
            ID=METER_MODEL_ID,
            L=METER_MODEL_LEN,
            Evt=0,
            End_ID=SUNSPEC_END,
            End_L=0,
        )
        METER_MAP.encode_into(block, SUNSPEC_BASE, static)
        return block

    def dynamic(self, garbage: bool = False) -> dict[str, Value]:
        ph = self.physics
        w = math.nan if garbage else ph.meter_w
        va = abs(w) / _PF
        var = math.sqrt(max(va * va - w * w, 0.0))
        amps = va / (3 * _V_LN)
        v_ll = _V_LN * math.sqrt(3)
        out: dict[str, Value] = {"Hz": ph.hz, "W": w, "VA": va, "VAR": var, "PF": _PF}
        out["A"] = 3 * amps
        out["PhV"] = _V_LN
        out["PPV"] = v_ll
        for ph_name in ("A", "B", "C"):
            out[f"Aph{ph_name}"] = amps
            out[f"PhVph{ph_name}"] = _V_LN
            out[f"Wph{ph_name}"] = w / 3
            out[f"VAph{ph_name}"] = va / 3
            out[f"VARph{ph_name}"] = var / 3
            out[f"PFph{ph_name}"] = _PF
        for pair in ("AB", "BC", "CA"):
            out[f"PPVph{pair}"] = v_ll
        out["TotWhImp"] = ph.energy_wh
        out["TotWhExp"] = 0.0
        return out

    def simdevice(self) -> SimDevice:
        data = SimData(
            SUNSPEC_BASE, values=self.static_image(), datatype=DataType.REGISTERS, readonly=True
        )
        return SimDevice(0, simdata=[data], action=self.action)

    async def action(
        self,
        func_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        fault, exc = await self._gate(func_code)
        if exc is not None:
            return exc
        if values is None:
            METER_MAP.encode_into(registers, start_address, self.dynamic(fault == Fault.GARBAGE))
        return None


def _float_points() -> list[str]:
    return [r.name for r in METER_MAP.regs if r.type == "f32"]


class ServedDevice(Protocol):
    def simdevice(self) -> SimDevice: ...

    def trace_packet(self, sending: bool, data: bytes) -> bytes: ...


async def serve(device: ServedDevice, host: str, port: int, what: str) -> ModbusTcpServer:
    """A Modbus TCP server for one simulated device on `host:port`."""
    quiet_pymodbus()  # a server per device: no "Server listening." line per device
    server = ModbusTcpServer(
        device.simdevice(), address=(host, port), trace_packet=device.trace_packet
    )
    try:
        await server.serve_forever(background=True)
    except RuntimeError:
        raise OSError(f"sim: cannot listen on {host}:{port} for {what}") from None
    return server


async def start_load_server(physics: SitePhysics, i: int, host: str, port: int) -> ModbusTcpServer:
    return await serve(LoadDevice(physics, i), host, port, physics.names[i])


async def start_meter_server(
    physics: SitePhysics, host: str, port: int, unit: int = 1
) -> ModbusTcpServer:
    return await serve(MeterDevice(physics, unit), host, port, "the meter")


class SimServers:
    """Every Modbus server of a simulated site; `close()` stops them all."""

    def __init__(self) -> None:
        self.servers: list[ModbusTcpServer] = []

    @classmethod
    async def start(
        cls,
        physics: SitePhysics,
        specs: Sequence[DeviceSpec],
        meter: tuple[str, int, int] | None,
    ) -> SimServers:
        """Serve physics row i as specs[i] (Modbus ones only), plus the meter (host, port, unit)."""
        self = cls()
        try:
            for i, spec in enumerate(specs):
                if spec.protocol == "modbus":
                    self.servers.append(await start_load_server(physics, i, spec.host, spec.port))
            if meter is not None:
                host, port, unit = meter
                self.servers.append(await start_meter_server(physics, host, port, unit))
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        for server in self.servers:
            with suppress(Exception):
                await asyncio.wait_for(server.shutdown(), 2.0)  # type: ignore[no-untyped-call]
        self.servers.clear()


__all__ = [
    "FaultyDevice",
    "LoadDevice",
    "MeterDevice",
    "ServedDevice",
    "SimServers",
    "serve",
    "start_load_server",
    "start_meter_server",
]
