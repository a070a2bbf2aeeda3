"""Modbus TCP driver for flexible loads (LOAD_MAP) and the SunSpec site meter (METER_MAP).

Every device gets its own task and connection: it polls telemetry on a staggered schedule and
sends the latest queued setpoint, one transaction at a time, so a dead device only ever costs
its own task time. pymodbus is used without its own retries and reconnects (retries=0,
reconnect_delay=0): we retry at most once, drop the connection after any transport failure so a
late reply can never be matched to the next request, and back off with jitter per device.

A command is one FC16 transaction of the whole writable block: the power in `setpoint_w` and
the intent in `run` (0 for SLEEP, 1 for RUN), so a device never gets one without the other.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Unpack

import numpy as np
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from drivers.base import Backoff, CommandObserver, DeviceTimeout, DriverError, ProtocolError
from drivers.core.cancellation import stop_if_cancelled
from drivers.core.command import Intent
from drivers.core.image import DevicePort
from drivers.core.registry import DriverContext, register
from drivers.core.spec import MeterConfig
from drivers.core.state import DeviceState
from drivers.device_driver import FAULT_AFTER as FAULT_AFTER
from drivers.device_driver import DriverOptions, PerDeviceDriver, Reading
from drivers.modbus.registers import (
    FLOAT_METER_MODELS,
    LOAD_MAP,
    LOAD_TELEMETRY,
    M21X_OFFSETS,
    RUN,
    SLEEP,
    STATE_MAX,
    SUNSPEC_BASE,
    SUNSPEC_END,
    SUNSPEC_MARKER,
    as_f32,
    regs_to_f32,
    regs_to_u32,
)

Op = Callable[[AsyncModbusTcpClient], Awaitable[ModbusPDU]]

log = logging.getLogger("rampd.drivers.modbus")

_GRACE_S = 0.25
"""Outer bound beyond the per-call timeout, in case the library itself hangs."""
_TELEMETRY_ADDR, _TELEMETRY_COUNT = LOAD_MAP.span("setpoint_w", "p_max_w")
_MAX_MODELS = 64  # SunSpec chain walk bound: a broken chain must not loop forever


def quiet_pymodbus() -> None:
    """pymodbus logs every timeout and refused connection; we log once per state change.

    Applied only while nobody has set the "pymodbus" logger's level explicitly.
    """
    lib = logging.getLogger("pymodbus")
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.CRITICAL)


def fail_fast(client: AsyncModbusTcpClient) -> None:
    """End a transaction at once, as a ModbusException, when the device hangs up or sends a
    frame pymodbus cannot decode.

    pymodbus (3.x) leaves the request waiting for its full timeout when the connection
    closes, and lets a decode error escape from `data_received`, where asyncio logs a
    traceback for every garbage reply. This hooks the client's protocol instance.
    """
    ctx = client.ctx
    on_data, on_disconnected = ctx.callback_data, ctx.callback_disconnected

    def fail(exc: ModbusException) -> None:
        if not ctx.response_future.done():
            ctx.response_future.set_exception(exc)

    def callback_data(data: bytes, addr: tuple[str, int] | None = None) -> int:
        try:
            return on_data(data, addr)
        except ModbusException as exc:
            fail(exc)
            if ctx.transport:
                ctx.transport.close()  # the stream is out of step: never read it again
            return len(data)

    def callback_disconnected(exc: Exception | None) -> None:
        on_disconnected(exc)
        fail(ConnectionException(f"connection closed by the device ({exc or 'EOF'})"))

    ctx.callback_data = callback_data  # type: ignore[method-assign]
    ctx.callback_disconnected = callback_disconnected  # type: ignore[method-assign]


class ModbusLink:
    """One Modbus TCP endpoint: lazy connect, per-call timeout, at most one retry."""

    def __init__(self, name: str, host: str, port: int, unit: int, timeout_s: float) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.unit = unit
        self.timeout_s = timeout_s
        self._client: AsyncModbusTcpClient | None = None
        quiet_pymodbus()

    async def _connected(self) -> AsyncModbusTcpClient:
        if self._client is not None and self._client.connected:
            return self._client
        self.close()
        client = AsyncModbusTcpClient(
            self.host,
            port=self.port,
            name=self.name,
            timeout=self.timeout_s,
            retries=0,
            reconnect_delay=0,  # reconnects are ours, with backoff
        )
        fail_fast(client)
        try:
            async with asyncio.timeout(self.timeout_s + _GRACE_S):
                ok = await client.connect()
        except BaseException:
            client.close()
            raise
        if not ok:
            client.close()
            raise ConnectionException(f"cannot connect to {self.host}:{self.port}")
        self._client = client
        return client

    async def call(self, op: Op, attempts: int = 2) -> ModbusPDU:
        """Run one transaction; a transport failure closes the link and retries once."""
        last: BaseException | None = None
        for _ in range(attempts):
            try:
                client = await self._connected()
                async with asyncio.timeout(self.timeout_s + _GRACE_S):
                    reply = await op(client)
            except (ModbusException, OSError, TimeoutError) as exc:
                self.close()
                last = exc
                continue
            if reply.isError():
                raise ProtocolError(f"Modbus exception code {reply.exception_code}")
            return reply
        if isinstance(last, TimeoutError | ModbusIOException):
            raise DeviceTimeout(f"no answer within {self.timeout_s:g} s") from last
        raise DriverError(str(last) or type(last).__name__) from last

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


@dataclass(frozen=True, slots=True)
class _LoadReading(Reading):
    """Telemetry plus the setpoint and run registers read back: what the device obeys."""

    setpoint_w: float
    run: int


class ModbusLoadDriver(PerDeviceDriver[_LoadReading]):
    """Drives the LOAD_MAP devices of its port."""

    protocol = "modbus"
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
        self._last_register_w = np.full(n, np.nan)  # last setpoint, as its float32 register
        self._last_run = np.full(n, -1, dtype=np.int8)

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

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        run = SLEEP if intent == Intent.SLEEP else RUN
        setpoint = max(power_w, 0.0)
        address, regs = LOAD_MAP.encode({"setpoint_w": setpoint, "run": run})
        unit = self._specs[local].unit
        reply = await self._transact(
            local, lambda c: c.write_registers(address, regs, device_id=unit)
        )
        # pymodbus hands back whatever PDU came with our transaction id: only the echo of
        # this write (FC16, same address and count) says the registers were written.
        if reply.function_code != 16 or (reply.address, reply.count) != (address, len(regs)):
            raise ProtocolError(
                f"write answered with function {reply.function_code}, "
                f"address {reply.address}, count {reply.count}"
            )
        self._last_register_w[local] = as_f32(setpoint)
        self._last_run[local] = run

    async def _read(self, local: int) -> _LoadReading:
        unit = self._specs[local].unit
        reply = await self._transact(
            local,
            lambda c: c.read_holding_registers(
                _TELEMETRY_ADDR, count=_TELEMETRY_COUNT, device_id=unit
            ),
        )
        registers = reply.registers
        if len(registers) != _TELEMETRY_COUNT:
            raise ProtocolError(f"{len(registers)} registers, expected {_TELEMETRY_COUNT}")
        v = LOAD_MAP.decode(registers, _TELEMETRY_ADDR, LOAD_TELEMETRY)
        measured = self._check_power(local, float(v["measured_w"]))
        state = int(v["state"])
        if not 0 <= state <= STATE_MAX:
            raise ProtocolError(f"unknown state code {state}")
        return _LoadReading(measured, DeviceState(state), float(v["setpoint_w"]), int(v["run"]))

    def _polled(self, local: int, reading: _LoadReading) -> None:
        """A device that lost our command (reboot, local override) gets it again."""
        expected, run = self._last_register_w[local], self._last_run[local]
        if not self._readback_due(local) or (reading.setpoint_w == expected and reading.run == run):
            return
        self._resend(
            local,
            "readback %.0f W run=%d differs from sent %.0f W run=%d",
            reading.setpoint_w,
            reading.run,
            expected,
            run,
        )


@register("modbus")
def _modbus(port: DevicePort, ctx: DriverContext) -> ModbusLoadDriver:
    return ModbusLoadDriver(
        port, ctx.on_command, poll_stretch=ctx.poll_stretch, max_concurrency=ctx.max_concurrency
    )


class ModbusMeter:
    """Polls a SunSpec float meter (models 211-214) for total real power W at cfg.poll_s.

    `value_w` is the last good reading, `at` its monotonic time (NaN until the first one),
    `ok` whether the last attempt succeeded.
    """

    def __init__(
        self,
        cfg: MeterConfig,
        name: str = "meter",
        on_read: Callable[[float, float, float], None] | None = None,
    ) -> None:
        """`on_read(hz, w, at)` after every good reading (the frequency fast path reacts
        to the sample at once); it must be quick and not raise."""
        self.cfg = cfg
        self.name = name
        self._on_read = on_read
        self.value_w = math.nan
        self.hz = math.nan
        self.at = math.nan
        self.ok = False
        self.reads = 0
        self.errors = 0
        self._link = ModbusLink(name, cfg.host, cfg.port, cfg.unit, cfg.timeout_s)
        self._model_addr: int | None = None
        self._backoff = Backoff(1, base_s=0.2, cap_s=2.0)  # the fast signal: retry soon
        self._logged_ok: bool | None = None

    async def run(self) -> None:
        period = self.cfg.poll_s
        next_t = time.monotonic()
        try:
            while True:
                stop_if_cancelled()  # pymodbus's wait_for may have swallowed it
                backoff = 0.0
                try:
                    await self._read()
                except DriverError as exc:
                    backoff = self._failed(exc)
                else:
                    self._succeeded()
                now = time.monotonic()
                next_t += period
                if next_t < now:  # a slow read: skip missed samples instead of bursting
                    next_t = now
                next_t = max(next_t, now + backoff)
                await asyncio.sleep(next_t - now)
        finally:
            self._link.close()

    async def _read(self) -> None:
        unit = self.cfg.unit

        def read(address: int, count: int) -> Op:
            return lambda c: c.read_holding_registers(address, count=count, device_id=unit)

        try:
            if self._model_addr is None:
                self._model_addr = await self._discover(read)
            hz_off, w_off = M21X_OFFSETS["Hz"], M21X_OFFSETS["W"]
            # One attempt per sample: at 10 Hz the next sample is the retry.
            reply = await self._link.call(read(self._model_addr + hz_off, 4), attempts=1)
        except DriverError:
            self._model_addr = None  # re-discover after a reconnect
            raise
        regs = reply.registers
        if len(regs) != 4:
            raise ProtocolError(f"{len(regs)} registers, expected 4")
        w = regs_to_f32(regs[w_off - hz_off], regs[w_off - hz_off + 1])
        if not math.isfinite(w):
            raise ProtocolError(f"implausible meter reading {w!r} W")
        self.value_w = w
        self.hz = regs_to_f32(regs[0], regs[1])
        self.at = time.monotonic()
        if self._on_read is not None:
            self._on_read(self.hz, w, self.at)

    async def _discover(self, read: Callable[[int, int], Op]) -> int:
        """Walk the SunSpec model chain from 40000 to the first float meter model."""
        reply = await self._link.call(read(SUNSPEC_BASE, 2))
        if regs_to_u32(*reply.registers[:2]) != SUNSPEC_MARKER:
            raise ProtocolError(f"no SunSpec marker at {SUNSPEC_BASE}")
        address = SUNSPEC_BASE + 2
        for _ in range(_MAX_MODELS):
            header = (await self._link.call(read(address, 2))).registers
            model_id, length = header[0], header[1]
            if model_id in FLOAT_METER_MODELS:
                return address
            if model_id == SUNSPEC_END:
                break
            address += 2 + length
        raise ProtocolError("no SunSpec float meter model (211-214) found")

    def _failed(self, exc: DriverError) -> float:
        """Count and log (once per outage) a failed read; returns the backoff delay."""
        self.errors += 1
        self.ok = False
        if self._logged_ok is not False:
            self._logged_ok = False
            log.warning("modbus %s: reading failed: %s", self.name, exc)
        return self._backoff.failed(0, time.monotonic())

    def _succeeded(self) -> None:
        self.reads += 1
        self.ok = True
        self._backoff.succeeded(0)
        if self._logged_ok is not True:
            self._logged_ok = True
            log.info("modbus %s: reading %.1f kW", self.name, self.value_w / 1e3)
