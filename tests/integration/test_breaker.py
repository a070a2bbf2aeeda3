"""Feeder breakers over Modbus TCP, end to end on real sockets: pymodbus's own client reads and
trips a simulated breaker; our driver polls, adopts, trips within the fast-frequency deadline
(judged on the physics' power), re-closes, isolates faults, and finds a stuck one out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pymodbus.client import AsyncModbusTcpClient

from controller.config import DeviceSpec, load_config
from drivers.breaker.client import BreakerDriver
from drivers.breaker.registers import BREAKER_MAP, TELEMETRY_COUNT
from drivers.breaker.sim_server import start_breaker_servers
from drivers.core.capability import Control
from drivers.core.command import Intent
from drivers.core.image import ProcessImage
from drivers.core.state import DeviceState
from drivers.modbus.sim_server import SimServers
from drivers.sim.physics import Fault, SitePhysics
from drivers.sim.site import SimSite
from tests.helpers import (
    SIM_DT,
    CommandLog,
    DriverRig,
    cancel_and_wait,
    cmd,
    free_loopback_net,
    step_forever,
    until,
)

FEEDER_W = 500e3
FFR_DEADLINE_S = 0.25
"""ERCOT FFR: full response within 15 cycles at 60 Hz."""
WAKE_S = 1.0  # the template's 120 s boot, shortened so a re-close is seen within a test


def make_specs(net: str, port: int, n: int) -> list[DeviceSpec]:
    base = DeviceSpec(
        name="x",
        kind="feeder-breaker",
        protocol="breaker",
        host="",
        port=port,
        unit=1,
        p_min_w=FEEDER_W,
        p_max_w=FEEDER_W,
        p_idle_w=0.0,
        ramp_up_w_s=FEEDER_W,
        ramp_down_w_s=1e7,
        dead_time_s=0.015,
        wake_s=WAKE_S,
        sleep_s=0.067,
        step_w=0.0,
        deadband_w=0.0,
        noise_w=1e3,
        priority=100,
        poll_s=0.25,
        timeout_s=0.3,
    )
    return [replace(base, name=f"feeder-{i}", host=f"{net}.{i + 1}") for i in range(n)]


Rig = DriverRig[BreakerDriver]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    net, port = free_loopback_net()
    specs = make_specs(net, port, 4)
    ph = SitePhysics(specs, 0.0, seed=1, dt_s=SIM_DT)
    servers = await start_breaker_servers(ph, range(len(specs)), specs)
    image = ProcessImage(specs)
    commands = CommandLog()
    driver = BreakerDriver(image.port("breaker"), on_command=commands, backoff_cap_s=1.0)
    tasks = [asyncio.create_task(step_forever(ph)), asyncio.create_task(driver.run())]
    try:
        yield Rig(specs, ph, image, driver, commands)
    finally:
        await cancel_and_wait(*tasks)
        await servers.close()


# --- the simulated breaker, read and tripped by pymodbus's own client ---


async def test_stock_client_reads_trips_and_recloses_a_simulated_breaker() -> None:
    net, port = free_loopback_net()
    specs = make_specs(net, port, 2)
    ph = SitePhysics(specs, 0.0, seed=2, dt_s=SIM_DT)
    servers = await start_breaker_servers(ph, [0, 1], specs)
    client = AsyncModbusTcpClient(f"{net}.1", port=port, timeout=1, retries=0)

    async def state() -> dict[str, float]:
        rr = await client.read_input_registers(0, count=TELEMETRY_COUNT, device_id=1)
        assert not rr.isError()
        v = BREAKER_MAP.decode(rr.registers, 0, ("measured_w", "close", "closed", "trips"))
        return {k: float(x) for k, x in v.items()}

    def step(seconds: float) -> None:
        for _ in range(round(seconds / SIM_DT)):
            ph.step(SIM_DT)

    try:
        assert await client.connect()
        assert (await client.read_coils(0, count=1, device_id=1)).bits[0] is True
        assert (await client.read_discrete_inputs(0, count=1, device_id=1)).bits[0] is True
        s = await state()
        assert s["measured_w"] == pytest.approx(FEEDER_W, abs=5e3)
        assert (s["close"], s["closed"], s["trips"]) == (1, 1, 0)
        # The same block as holding registers (FC3), read-only.
        rr = await client.read_holding_registers(0, count=TELEMETRY_COUNT, device_id=1)
        assert not rr.isError() and rr.registers[2:4] == [1, 1]
        assert (await client.write_register(2, 0, device_id=1)).isError()
        assert (await client.read_coils(100, count=1, device_id=1)).isError()

        # Trip: the coil takes it at once (echo), the contacts open after dead time + opening.
        rr = await client.write_coil(0, False, device_id=1)
        assert not rr.isError() and rr.address == 0 and rr.bits[0] is False
        s = await state()
        assert (s["close"], s["closed"], s["trips"]) == (0, 1, 1)
        step(0.2)
        s = await state()
        assert (s["close"], s["closed"]) == (0, 0) and s["measured_w"] == 0.0
        assert (await client.read_discrete_inputs(0, count=1, device_id=1)).bits[0] is False
        assert ph.power_w[1] == FEEDER_W  # its neighbour runs on

        # Re-close: contacts closed at once, the load back after the wake and its ramp.
        assert not (await client.write_coil(0, True, device_id=1)).isError()
        step(0.1)
        s = await state()
        assert (s["close"], s["closed"], s["trips"]) == (1, 1, 1)
        assert s["measured_w"] < 0.1 * FEEDER_W  # the miners behind it are booting
        step(WAKE_S + 1.5)
        assert (await state())["measured_w"] == pytest.approx(FEEDER_W, abs=5e3)
    finally:
        client.close()
        await servers.close()


# --- our driver against simulated breakers ---


async def test_adopted_as_on_off_and_polled(rig: Rig) -> None:
    await rig.first_polls()
    await until(lambda: bool((rig.image.state == DeviceState.ON).all()), 3, what="ON")
    assert np.allclose(rig.image.measured_w, FEEDER_W, atol=5e3)
    for caps in rig.image.capabilities:
        assert caps is not None and caps.control is Control.PRESETS
        assert caps.presets_w == (FEEDER_W,) and caps.p_min_w == caps.p_max_w == FEEDER_W
        assert caps.can_sleep and caps.sleep_s == 0.067 and caps.wake_s == WAKE_S
    assert rig.image.p_min_w.tolist() == rig.image.p_max_w.tolist() == [FEEDER_W] * 4
    assert rig.driver.poll_errors == 0


async def test_trips_within_the_ffr_deadline_and_recloses(rig: Rig) -> None:
    ph, image = rig.physics, rig.image
    await rig.first_polls()
    t0 = ph.t_s  # the breaker's own clock: physics steps follow the monotonic clock
    rig.driver.submit(cmd([0, 2], [0.0, 0.0], sleep=True))
    await until(lambda: ph.power_w[0] == 0.0 and ph.power_w[2] == 0.0, 1.0, what="tripped")
    took = ph.t_s - t0
    # Exchange + 15 ms dead time + 67 ms opening, each rounded up to a 20 ms physics step.
    assert 0.08 <= took <= FFR_DEADLINE_S, took
    assert ph.power_w[[1, 3]].tolist() == [FEEDER_W, FEEDER_W]
    await until(lambda: image.state[0] == image.state[2] == DeviceState.SLEEPING, 2, what="open")
    assert image.acked_intent[[0, 2]].tolist() == [Intent.SLEEP, Intent.SLEEP]
    assert rig.driver.trips[[0, 1, 2]].tolist() == [1, 0, 1]
    assert not rig.driver.closed[0] and rig.driver.closed[1]

    rig.driver.submit(cmd([0], [FEEDER_W]))
    await until(lambda: ph.state[0] == DeviceState.WAKING, 1.0, what="re-closed")
    await until(lambda: image.state[0] == DeviceState.WAKING, 2, what="driver sees the boot")
    await until(lambda: ph.power_w[0] == FEEDER_W, WAKE_S + 3, what="load back")
    await until(lambda: image.state[0] == DeviceState.ON, 2, what="driver sees it ON")
    assert image.state[2] == DeviceState.SLEEPING  # the other stays open
    # Every command took and was verified: nothing resent, nothing unresponsive.
    await until(lambda: not np.isfinite(rig.driver._verify_at[0]), 3, what="trip verified")
    assert rig.driver.unverified == 0 and rig.driver.unresponsive == 0
    assert rig.driver.command_errors == 0 and rig.driver.commands_ok == 3


async def test_faults_stay_with_their_breaker(rig: Rig) -> None:
    ph, image = rig.physics, rig.image
    await rig.first_polls()
    ph.set_fault(1, Fault.SILENT)
    ph.set_fault(3, Fault.GARBAGE)
    await until(lambda: image.state[1] == image.state[3] == DeviceState.FAULT, 5, what="FAULT")
    # A healthy neighbour still trips within the deadline.
    t0 = ph.t_s
    rig.driver.submit(cmd([0], [0.0], sleep=True))
    await until(lambda: ph.power_w[0] == 0.0, 1.0, what="tripped")
    assert ph.t_s - t0 <= FFR_DEADLINE_S
    # A trip sent to the silent one never lands; it stays closed.
    rig.driver.submit(cmd([1], [0.0], sleep=True))
    ph.set_fault(3, Fault.NONE)
    await until(lambda: image.state[3] == DeviceState.ON, 5, what="recovered")
    assert ph.power_w[1] == FEEDER_W and ph.cmd_run[1] == 1
    assert image.state[2] == DeviceState.ON
    # Once it answers again, the trip held for it goes out and takes.
    ph.set_fault(1, Fault.NONE)
    await until(lambda: ph.power_w[1] == 0.0, 5, what="held trip lands")
    await until(lambda: image.state[1] == DeviceState.SLEEPING, 3, what="seen open")


async def test_a_stuck_breaker_becomes_unresponsive(rig: Rig) -> None:
    ph, image = rig.physics, rig.image
    await rig.first_polls()
    ph.set_fault(2, Fault.STUCK)  # takes the trip, contacts welded / mechanism jammed
    rig.driver.submit(cmd([2], [0.0], sleep=True))
    await until(lambda: image.state[2] == DeviceState.UNRESPONSIVE, 10, what="UNRESPONSIVE")
    assert ph.power_w[2] == FEEDER_W and ph.cmd_run[2] == 0  # the coil says open, it is not
    assert rig.driver.unverified >= 2 and rig.driver.resends >= 1
    assert (image.state[[0, 1, 3]] == DeviceState.ON).all()
    # Freed, the retry (with backoff) opens it and it follows commands again.
    ph.set_fault(2, Fault.NONE)
    # Bounds are generous: the retry waits out a 2.5-5 s backoff; timing is not under test.
    await until(lambda: ph.power_w[2] == 0.0, 15, what="retry lands")
    await until(lambda: image.state[2] == DeviceState.SLEEPING, 10, what="follows again")
    assert rig.driver.unresponsive == 0


async def test_a_breaker_opened_at_the_breaker_is_not_reclosed_remotely(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    ph, image = rig.physics, rig.image
    await rig.first_polls()
    rig.driver.submit(cmd([1], [FEEDER_W]))  # closed by rampd: acknowledged RUN
    await until(lambda: rig.driver.commands_ok == 1, 2, what="close acknowledged")
    await until(lambda: not np.isfinite(rig.driver._verify_at[1]), 3, what="close verified")
    ph.command(1, run=0)  # an operator opens it at the switchboard
    await until(lambda: image.state[1] == DeviceState.SLEEPING, 3, what="seen open")
    polls = rig.driver.polls_ok
    await until(lambda: rig.driver.polls_ok >= polls + 8, 3, what="two more rounds of polls")
    assert ph.cmd_run[1] == 0 and rig.driver.commands_ok == 1
    warned = [r for r in caplog.records if "opened at the breaker" in r.getMessage()]
    assert len(warned) == 1


# --- the simulated site serves breakers from the shipped template ---


async def test_a_site_serves_feeder_breakers_from_the_template(tmp_path: Path) -> None:
    net, port = free_loopback_net()
    site = tmp_path / "site.toml"
    site.write_text(
        f'site_id = "b"\n[site]\nmax_kw = 2000.0\n[meter]\nhost = "{net}.100"\nport = {port}\n'
        f'[[devices]]\nname = "feeder"\ntemplate = "feeder-breaker"\ncount = 2\n'
        f'address = "{net}.1"\noverrides = {{ port = {port} }}\n'
    )
    cfg = load_config(site)
    spec = cfg.devices[0]
    assert (spec.protocol, spec.p_min_w, spec.p_max_w, spec.p_idle_w) == (
        "breaker",
        FEEDER_W,
        FEEDER_W,
        0.0,
    )
    assert 0.05 <= spec.sleep_s <= 0.084 and 60.0 <= spec.wake_s <= 120.0
    assert 0.01 <= spec.dead_time_s <= 0.02 and spec.priority == 100
    sim = SimSite(cfg.sim_site)
    await sim.start()
    client = AsyncModbusTcpClient(f"{net}.2", port=port, timeout=1, retries=0)
    try:
        assert isinstance(sim.served["breaker"], SimServers)
        assert await client.connect()
        rr = await client.read_input_registers(0, count=TELEMETRY_COUNT, device_id=1)
        assert not rr.isError()
        w = BREAKER_MAP.decode(rr.registers, 0, ("measured_w",))["measured_w"]
        assert w == pytest.approx(FEEDER_W, abs=5e3)
    finally:
        client.close()
        await sim.close()
