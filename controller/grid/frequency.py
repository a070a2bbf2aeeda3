"""The grid's frequency on its own fast path: at least 20 samples a second, each judged
(fresh, plausible) and handed at once to the grid services, not at the next control cycle.

The source is the site meter's SunSpec `Hz` (a second connection to it, so the 10 Hz power
path is not slowed), or a protective relay / PMU over Modbus TCP (`[grid.source]`: a float32
in two holding registers). A sample outside nominal +-10%, or one that moved faster than
MAX_ROCOF_HZ_S from the last, is implausible: counted, logged once per episode, and never a
trigger; neither is a stale one (older than `max_age_s`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from controller.config import FrequencySource, GridConfig
from drivers.base import Backoff, DriverError, ProtocolError
from drivers.core.cancellation import stop_if_cancelled
from drivers.core.spec import MeterConfig
from drivers.modbus.client import ModbusLink, ModbusMeter
from drivers.modbus.registers import regs_to_f32

log = logging.getLogger("rampd.grid")

PLAUSIBLE_FRACTION = 0.10
"""A grid far outside +-10% of nominal has collapsed or the reading is garbage."""
MAX_ROCOF_HZ_S = 10.0
"""Real grids move at most a few Hz/s even in a loss of a large infeed (GB 2019-08-09: under
0.2 Hz/s); faster is a bad reading, not the grid."""


@dataclass(frozen=True, slots=True)
class Sample:
    hz: float
    at: float
    """Monotonic time it was read."""
    plausible: bool


class FrequencyMonitor:
    """Reads the frequency until cancelled; `on_sample` gets every reading (plausible or
    not) on the event loop, at once; it must be quick and not raise."""

    def __init__(
        self,
        grid: GridConfig,
        meter: MeterConfig,
        on_sample: Callable[[Sample], None],
    ) -> None:
        self.nominal_hz = float(grid.nominal_hz)
        self.max_age_s = grid.max_age_s
        self._on_sample = on_sample
        self.hz = math.nan
        self.at = math.nan
        self.samples = 0
        self.implausible = 0
        self._last_plausible: Sample | None = None
        self._flagged = False
        self._reader: ModbusMeter | RelayFrequency
        if grid.source is None:
            cfg = meter.model_copy(update={"poll_s": grid.poll_s, "timeout_s": 0.5})
            self._reader = ModbusMeter(cfg, name="frequency", on_read=self._meter_read)
        else:
            self._reader = RelayFrequency(grid.source, grid.poll_s, self.sample)
        self.name = "frequency"

    @property
    def reads(self) -> int:
        return self._reader.reads

    @property
    def errors(self) -> int:
        return self._reader.errors

    def fresh(self, now: float) -> bool:
        return bool(now - self.at <= self.max_age_s)

    async def run(self) -> None:
        await self._reader.run()

    def _meter_read(self, hz: float, _w: float, at: float) -> None:
        self.sample(hz, at)

    def sample(self, hz: float, at: float) -> None:
        """Judge one reading and hand it on."""
        self.samples += 1
        ok = math.isfinite(hz) and abs(hz - self.nominal_hz) <= PLAUSIBLE_FRACTION * self.nominal_hz
        last = self._last_plausible
        if ok and last is not None and at > last.at:
            ok = abs(hz - last.hz) / (at - last.at) <= MAX_ROCOF_HZ_S
        s = Sample(hz, at, ok)
        if ok:
            self.hz, self.at = hz, at
            self._last_plausible = s
            if self._flagged:
                self._flagged = False
                log.info("frequency plausible again: %.3f Hz", hz)
        else:
            self.implausible += 1
            if not self._flagged:
                self._flagged = True
                log.warning("implausible frequency reading %r Hz: ignored", hz)
        self._on_sample(s)


class RelayFrequency:
    """A dedicated frequency source: a float32 in two holding registers, polled at poll_s."""

    def __init__(
        self, src: FrequencySource, poll_s: float, on_read: Callable[[float, float], None]
    ) -> None:
        self.src = src
        self.poll_s = poll_s
        self.reads = 0
        self.errors = 0
        self._on_read = on_read
        self._link = ModbusLink("frequency", src.host, src.port, src.unit, 0.5)
        self._backoff = Backoff(1, base_s=0.1, cap_s=2.0)
        self._logged_ok: bool | None = None

    async def run(self) -> None:
        next_t = time.monotonic()
        try:
            while True:
                stop_if_cancelled()
                delay = 0.0
                try:
                    hz = await self._read()
                except DriverError as exc:
                    self.errors += 1
                    delay = self._backoff.failed(0, time.monotonic())
                    if self._logged_ok is not False:
                        self._logged_ok = False
                        log.warning("frequency source %s: reading failed: %s", self.src.host, exc)
                else:
                    self.reads += 1
                    self._backoff.succeeded(0)
                    if self._logged_ok is not True:
                        self._logged_ok = True
                        log.info("frequency source %s: %.3f Hz", self.src.host, hz)
                    self._on_read(hz, time.monotonic())
                now = time.monotonic()
                next_t = max(next_t + self.poll_s, now + delay)
                await asyncio.sleep(next_t - now)
        finally:
            self._link.close()

    async def _read(self) -> float:
        src = self.src
        reply = await self._link.call(
            lambda c: c.read_holding_registers(src.address, count=2, device_id=src.unit),
            attempts=1,
        )
        regs = reply.registers
        if len(regs) != 2:
            raise ProtocolError(f"{len(regs)} registers, expected 2")
        return regs_to_f32(regs[0], regs[1])
