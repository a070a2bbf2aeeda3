"""Modbus TCP driver for flexible loads (LOAD_MAP) and the SunSpec site meter (METER_MAP).

Every device gets its own task and connection: it polls telemetry on a staggered schedule and
sends the latest queued setpoint, one transaction at a time, so a dead device only ever costs
its own task time. pymodbus is used without its own retries and reconnects (retries=0,
reconnect_delay=0): we retry at most once, drop the connection after any transport failure so a
late reply can never be matched to the next request, and back off with jitter per device.

Sleep is part of the setpoint: a setpoint below the device's p_min_w (e.g. 0 or p_idle_w)
writes run=0; anything else writes run=1 with the setpoint, in one FC16 transaction.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress

import numpy as np
import numpy.typing as npt
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from controller.config import DeviceSpec, MeterConfig
from controller.fleet import DeviceState, Fleet
from drivers.base import (
    Backoff,
    CommandMailbox,
    CommandObserver,
    DeviceTimeout,
    DriverError,
    ProtocolError,
    Rows,
)
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

F64 = npt.NDArray[np.float64]
Op = Callable[[AsyncModbusTcpClient], Awaitable[ModbusPDU]]

log = logging.getLogger("rampd.drivers.modbus")

FAULT_AFTER = 2
"""Consecutive failed transactions before a device is declared FAULT."""
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


class ModbusLoadDriver:
    """Drives the LOAD_MAP devices owned by this driver (global fleet `rows`, parallel `specs`)."""

    def __init__(
        self,
        name: str,
        fleet: Fleet,
        rows: npt.ArrayLike,
        specs: Sequence[DeviceSpec],
        on_command: CommandObserver | None = None,
        *,
        max_concurrency: int = 32,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.rows: Rows = np.asarray(rows, dtype=np.intp)
        if len(self.rows) != len(specs):
            raise ValueError(f"{name}: {len(self.rows)} rows but {len(specs)} specs")
        n = len(specs)
        self._fleet = fleet
        self._specs = tuple(specs)
        self._on_command = on_command
        self._local_of = np.full(fleet.n, -1, dtype=np.intp)
        self._local_of[self.rows] = np.arange(n)
        self._links = [
            ModbusLink(s.name, s.host, s.port, s.unit, s.timeout_s) for s in self._specs
        ]
        self._mailbox = CommandMailbox(n)
        self._outbox = np.full(n, np.nan)  # per-device slot the device task sends from
        self._wake = [asyncio.Event() for _ in range(n)]
        self._backoff = Backoff(n, backoff_base_s, backoff_cap_s, rng)
        self._retry_at = np.zeros(n)
        self._poll_soon = np.zeros(n, dtype=np.bool_)
        self._sem = asyncio.Semaphore(max_concurrency)
        self._faulted = np.zeros(n, dtype=np.bool_)
        self._readback_warned = np.zeros(n, dtype=np.bool_)
        self._last_value_w = np.full(n, np.nan)  # last setpoint the device accepted
        self._last_register_w = np.full(n, np.nan)  # ... as its float32 register holds it
        self._last_run = np.full(n, -1, dtype=np.int8)
        # Counters, public for metrics.
        self.polls_ok = 0
        self.poll_errors = 0
        self.commands_ok = 0
        self.command_errors = 0
        self.resends = 0
        self.errors_by_device = np.zeros(n, dtype=np.int64)

    # --- the control cycle's side: never blocks ---

    def submit(self, rows: Rows, setpoints_w: npt.NDArray[np.float64]) -> None:
        local = self._local_of[np.asarray(rows, dtype=np.intp)]
        mine = local >= 0  # rows of other drivers are ignored, never an error here
        self._mailbox.put(local[mine], np.asarray(setpoints_w, dtype=np.float64)[mine])

    @property
    def pending(self) -> int:
        return self._mailbox.pending + int((~np.isnan(self._outbox)).sum())

    @property
    def faulted(self) -> int:
        return int(self._faulted.sum())

    # --- tasks ---

    async def run(self) -> None:
        """Poll and send until cancelled; device failures are isolated and never raise."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._dispatch(), name=f"{self.name}:dispatch")
                for local, spec in enumerate(self._specs):
                    tg.create_task(self._device(local), name=f"{self.name}:{spec.name}")
        finally:
            for link in self._links:
                link.close()

    async def _dispatch(self) -> None:
        """Fan the mailbox out to per-device slots: latest value wins in both."""
        while True:
            if not await self._mailbox.wait(1.0):
                continue
            local, values = self._mailbox.take()
            self._outbox[local] = values
            for i in local.tolist():
                self._wake[i].set()

    async def _device(self, local: int) -> None:
        spec = self._specs[local]
        n = len(self._specs)
        # Stagger first polls over one period so N devices do not poll in lockstep.
        next_poll = time.monotonic() + spec.poll_s * local / max(n, 1)
        while True:
            now = time.monotonic()
            if now < self._retry_at[local]:
                await asyncio.sleep(self._retry_at[local] - now)
                continue
            overdue = now - next_poll > spec.poll_s  # a command stream must not starve polls
            if not np.isnan(self._outbox[local]) and not overdue:
                await self._send(local)
                continue
            if now >= next_poll or self._poll_soon[local]:
                self._poll_soon[local] = False
                await self._poll(local)
                next_poll = max(next_poll + spec.poll_s, time.monotonic())
                continue
            self._wake[local].clear()
            with suppress(TimeoutError):
                async with asyncio.timeout(next_poll - now):
                    await self._wake[local].wait()

    # --- transactions ---

    async def _transact(self, local: int, op: Op) -> ModbusPDU:
        async with self._sem:
            return await self._links[local].call(op)

    async def _send(self, local: int) -> None:
        value = float(self._outbox[local])
        self._outbox[local] = np.nan
        row = int(self.rows[local])
        run = RUN if value >= self._fleet.p_min_w[row] else SLEEP
        setpoint = max(value, 0.0)
        address, regs = LOAD_MAP.encode({"setpoint_w": setpoint, "run": run})
        unit = self._specs[local].unit
        t0 = time.monotonic()
        try:
            await self._transact(
                local, lambda c: c.write_registers(address, regs, device_id=unit)
            )
        except DriverError as exc:
            self._report(time.monotonic() - t0, ok=False)
            self.command_errors += 1
            if np.isnan(self._outbox[local]):  # retry later unless a newer value came
                self._outbox[local] = value
            self._failed(local, exc)
            return
        self._report(time.monotonic() - t0, ok=True)
        self.commands_ok += 1
        self._last_value_w[local] = value
        self._last_register_w[local] = as_f32(setpoint)
        self._last_run[local] = run
        self._readback_warned[local] = False
        self._backoff.succeeded(local)
        if self._faulted[local]:
            self._poll_soon[local] = True  # confirm recovery with telemetry

    async def _poll(self, local: int) -> None:
        unit = self._specs[local].unit
        try:
            reply = await self._transact(
                local,
                lambda c: c.read_holding_registers(
                    _TELEMETRY_ADDR, count=_TELEMETRY_COUNT, device_id=unit
                ),
            )
            measured, state, sp_rb, run_rb = self._decode(local, reply.registers)
        except DriverError as exc:
            self.poll_errors += 1
            self._failed(local, exc)
            return
        row = int(self.rows[local])
        fleet = self._fleet
        fleet.measured_w[row] = measured
        fleet.measured_at[row] = time.monotonic()
        fleet.state[row] = state
        self.polls_ok += 1
        self._backoff.succeeded(local)
        if self._faulted[local]:
            self._faulted[local] = False
            log.info(
                "modbus %s: recovered, state %s", self._specs[local].name, DeviceState(state).name
            )
        self._check_readback(local, sp_rb, run_rb)

    def _decode(self, local: int, registers: Sequence[int]) -> tuple[float, int, float, int]:
        if len(registers) != _TELEMETRY_COUNT:
            raise ProtocolError(f"{len(registers)} registers, expected {_TELEMETRY_COUNT}")
        v = LOAD_MAP.decode(registers, _TELEMETRY_ADDR, LOAD_TELEMETRY)
        measured, state = float(v["measured_w"]), int(v["state"])
        p_max = float(self._fleet.p_max_w[self.rows[local]])
        if not (math.isfinite(measured) and -0.1 * p_max <= measured <= 2.0 * p_max):
            raise ProtocolError(f"implausible power reading {measured!r} W")
        if not 0 <= state <= STATE_MAX:
            raise ProtocolError(f"unknown state code {state}")
        return measured, state, float(v["setpoint_w"]), int(v["run"])

    def _check_readback(self, local: int, setpoint_w: float, run: int) -> None:
        """A device that lost our command (reboot, local override) gets it again."""
        expected = self._last_register_w[local]
        if np.isnan(expected) or not np.isnan(self._outbox[local]):
            return
        if setpoint_w == expected and run == self._last_run[local]:
            return
        self._outbox[local] = self._last_value_w[local]
        self._last_register_w[local] = np.nan  # one resend per mismatch, until it lands
        self.resends += 1
        if not self._readback_warned[local]:
            self._readback_warned[local] = True
            log.warning(
                "modbus %s: readback %.0f W run=%d differs from sent %.0f W run=%d; resending",
                self._specs[local].name,
                setpoint_w,
                run,
                expected,
                self._last_run[local],
            )

    # --- bookkeeping ---

    def _report(self, seconds: float, ok: bool) -> None:
        if self._on_command is not None:
            self._on_command(self.name, seconds, ok)

    def _failed(self, local: int, exc: DriverError) -> None:
        now = time.monotonic()
        self.errors_by_device[local] += 1
        self._retry_at[local] = now + self._backoff.failed(local, now)
        if self._backoff.failures(local) < FAULT_AFTER:
            return
        self._fleet.state[self.rows[local]] = DeviceState.FAULT
        if not self._faulted[local]:
            self._faulted[local] = True
            log.warning(
                "modbus %s: FAULT after %d failed transactions: %s",
                self._specs[local].name,
                self._backoff.failures(local),
                exc,
            )


class ModbusMeter:
    """Polls a SunSpec float meter (models 211-214) for total real power W at cfg.poll_s.

    `value_w` is the last good reading, `at` its monotonic time (NaN until the first one),
    `ok` whether the last attempt succeeded.
    """

    def __init__(self, cfg: MeterConfig, name: str = "meter") -> None:
        self.cfg = cfg
        self.name = name
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
