"""The frequency's fast path over real sockets: the simulated meter (and a relay-style source
reading the same register) polled at 20 Hz or more; every sample judged and handed on at
once; held and replayed grid frequency seen within a sample; an implausible value flagged,
never passed as plausible."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from pymodbus.server import ModbusTcpServer

from controller.config import FrequencySource, GridConfig, MeterConfig
from controller.grid.frequency import FrequencyMonitor, Sample
from drivers.modbus.registers import METER_MAP
from drivers.modbus.sim_server import start_meter_server
from drivers.sim.physics import SitePhysics
from tests.helpers import cancel_and_wait, device_spec, free_loopback_net, step_forever, until


@pytest.fixture
async def meter() -> AsyncIterator[tuple[SitePhysics, str, int]]:
    net, port = free_loopback_net()
    physics = SitePhysics([device_spec(name="d")], 1e6, seed=1, dt_s=0.02)
    server: ModbusTcpServer = await start_meter_server(physics, f"{net}.1", port)
    stepper = asyncio.create_task(step_forever(physics))
    try:
        yield physics, f"{net}.1", port
    finally:
        await cancel_and_wait(stepper)
        await server.shutdown()


@pytest.mark.parametrize("relay", [False, True])
async def test_twenty_samples_a_second_that_follow_the_grid(
    meter: tuple[SitePhysics, str, int], relay: bool
) -> None:
    physics, host, port = meter
    samples: list[Sample] = []
    source = (
        FrequencySource(host=host, port=port, address=METER_MAP["Hz"].address) if relay else None
    )
    grid = GridConfig(poll_s=0.05, source=source)
    monitor = FrequencyMonitor(grid, MeterConfig(host=host, port=port), samples.append)
    physics.grid.hold(59.80)
    task = asyncio.create_task(monitor.run())
    try:
        await until(lambda: len(samples) >= 3, 5.0, what="first samples")
        t0, n0 = time.monotonic(), len(samples)
        await until(lambda: len(samples) >= n0 + 40, 5.0, what="40 more samples")
        rate = 40 / (time.monotonic() - t0)
        assert rate >= 17.0, rate  # 20 a second, with some slack for a busy machine
        assert all(s.plausible for s in samples)
        assert abs(samples[-1].hz - 59.80) < 1e-3
        physics.grid.hold(59.60)  # a change shows within a couple of samples
        n1 = len(samples)
        await until(lambda: abs(samples[-1].hz - 59.60) < 1e-3, 1.0, what="the new value")
        assert len(samples) - n1 <= 4
        assert monitor.fresh(time.monotonic())
    finally:
        await cancel_and_wait(task)


def test_implausible_and_jumping_readings_are_flagged() -> None:
    samples: list[Sample] = []
    monitor = FrequencyMonitor(GridConfig(), MeterConfig(), samples.append)
    monitor.sample(60.01, 10.00)
    monitor.sample(71.0, 10.05)  # out of band
    monitor.sample(58.0, 10.10)  # 2 Hz in 0.1 s: 20 Hz/s, no grid does that
    monitor.sample(float("nan"), 10.15)
    monitor.sample(59.99, 10.20)
    assert [s.plausible for s in samples] == [True, False, False, False, True]
    assert monitor.implausible == 3 and monitor.hz == 59.99
    assert not monitor.fresh(10.20 + 1.0)
