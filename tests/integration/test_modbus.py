"""Modbus TCP end to end over real sockets: simulated devices and meter, stock client, our driver.

Every device listens on its own loopback address (127.x.y.z needs no setup on Linux). Waits
poll a condition against a deadline; bounds are generous because timing is not under test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pymodbus.client import AsyncModbusTcpClient

from controller.config import DeviceSpec, MeterConfig, load_config
from drivers.base import Driver
from drivers.core.image import ProcessImage
from drivers.core.state import DeviceState
from drivers.modbus.client import ModbusLoadDriver, ModbusMeter
from drivers.modbus.registers import (
    LOAD_MAP,
    M21X_OFFSETS,
    METER_MAP,
    METER_MODEL_ADDR,
    as_f32,
    regs_to_f32,
)
from drivers.modbus.sim_server import SimServers
from drivers.sim.physics import Fault, SitePhysics
from drivers.sim.site import run_sim
from tests.helpers import (
    SIM_DT,
    CommandLog,
    DriverRig,
    cancel_and_wait,
    cmd,
    free_loopback_net,
    log_records,
    step_forever,
    until,
)


def make_specs(net: str, port: int, n: int) -> list[DeviceSpec]:
    base = DeviceSpec(
        name="x",
        kind="modbus_load",
        protocol="modbus",
        host="",
        port=port,
        unit=1,
        p_min_w=25e3,
        p_max_w=250e3,
        p_idle_w=5e3,
        ramp_up_w_s=50e3,
        ramp_down_w_s=100e3,
        dead_time_s=0.2,
        wake_s=1.0,
        sleep_s=0.5,
        step_w=0.0,
        deadband_w=500.0,
        noise_w=500.0,
        priority=0,
        poll_s=0.25,
        timeout_s=0.5,
    )
    return [replace(base, name=f"row-{i}", host=f"{net}.{i + 1}") for i in range(n)]


Rig = DriverRig[ModbusLoadDriver]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    net, port = free_loopback_net()
    specs = make_specs(net, port, 5)
    ph = SitePhysics(specs, 50e3, seed=1, dt_s=SIM_DT)
    servers = await SimServers.start(ph, specs, None)
    fleet = ProcessImage(specs)
    commands = CommandLog()
    driver = ModbusLoadDriver(fleet.port("modbus"), on_command=commands, backoff_cap_s=2.0)
    tasks = [asyncio.create_task(step_forever(ph)), asyncio.create_task(driver.run())]
    try:
        yield Rig(specs, ph, fleet, driver, commands)
    finally:
        await cancel_and_wait(*tasks)
        await servers.close()


# --- (a) the simulated meter, read by a stock client; the simulated site from a config ---


def write_site(tmp_path: Path, net: str, port: int) -> Path:
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "test-load.toml").write_text(
        'kind = "modbus_load"\nprotocol = "modbus"\np_max_kw = 250.0\np_min_kw = 25.0\n'
        "p_idle_kw = 5.0\nramp_up_kw_s = 50.0\nramp_down_kw_s = 100.0\nnoise_kw = 0.5\n"
    )
    site = tmp_path / "site.toml"
    site.write_text(
        f'site_id = "t"\nnoncontrollable_kw = 100.0\n[site]\nmax_kw = 1000.0\n'
        f'[meter]\nhost = "{net}.100"\nport = {port}\npoll_s = 0.1\ntimeout_s = 0.5\n'
        f'[[devices]]\nname = "row"\ntemplate = "test-load"\ncount = 3\n'
        f'address = "{net}.1"\noverrides = {{ port = {port} }}\n'
    )
    return site


async def test_stock_client_reads_the_sunspec_meter_of_a_simulated_site(tmp_path: Path) -> None:
    net, port = free_loopback_net()
    cfg = load_config(write_site(tmp_path, net, port))
    truth_path = tmp_path / "truth.jsonl"
    stop = asyncio.Event()
    sim = asyncio.create_task(run_sim(cfg.sim_site, truth_path, stop, seed=3))
    client = AsyncModbusTcpClient(f"{net}.100", port=port, timeout=1, retries=0)
    meter = ModbusMeter(MeterConfig(host=f"{net}.100", port=port, poll_s=0.1, timeout_s=0.5))
    meter_task: asyncio.Task[None] | None = None
    try:
        await until(lambda: truth_path.exists() and truth_path.stat().st_size > 0, 5, what="truth")
        assert await client.connect()

        rr = await client.read_holding_registers(40000, count=4, device_id=1)
        assert not rr.isError()
        marker = client.convert_from_registers(rr.registers[:2], client.DATATYPE.STRING)
        assert marker == "SunS"
        assert rr.registers[2:] == [1, 66]  # common model
        rr = await client.read_holding_registers(40004, count=16, device_id=1)
        assert client.convert_from_registers(rr.registers, client.DATATYPE.STRING) == "rampd"
        rr = await client.read_holding_registers(40070, count=2, device_id=1)
        assert rr.registers == [213, 124]
        rr = await client.read_holding_registers(40196, count=2, device_id=1)
        assert rr.registers == [0xFFFF, 0]

        rr = await client.read_holding_registers(40096, count=4, device_id=1)  # Hz, W
        hz = client.convert_from_registers(rr.registers[:2], client.DATATYPE.FLOAT32)
        w = client.convert_from_registers(rr.registers[2:], client.DATATYPE.FLOAT32)
        assert isinstance(w, float) and isinstance(hz, float)
        assert hz == pytest.approx(60.0, abs=0.1)
        # Three rows at p_max plus ~100 kW of cooling; the truth log agrees with the meter.
        assert w == pytest.approx(850e3, rel=0.05)
        last = json.loads(truth_path.read_text().splitlines()[-1])
        assert last["site_kw"] * 1e3 == pytest.approx(w, rel=0.01)
        assert abs(last["t"] - time.time()) < 5

        rr = await client.read_holding_registers(40138, count=2, device_id=1)  # TotWhImp
        e1 = client.convert_from_registers(rr.registers, client.DATATYPE.FLOAT32)
        assert isinstance(e1, float)
        await until(lambda: len(truth_path.read_text().splitlines()) >= 5, 5, what="live truth log")
        rr = await client.read_holding_registers(40138, count=2, device_id=1)
        e2 = client.convert_from_registers(rr.registers, client.DATATYPE.FLOAT32)
        assert isinstance(e2, float) and e2 > e1 > 0

        # Writes to a meter are refused with a Modbus exception, not silently taken.
        rr = await client.write_registers(40098, [0, 0], device_id=1)
        assert rr.isError()

        # Our meter client discovers model 213 by walking the chain and polls W.
        meter_task = asyncio.create_task(meter.run())
        await until(lambda: meter.ok and meter.reads >= 5, 5, what="meter polls")
        assert meter.value_w == pytest.approx(850e3, rel=0.05)
        # It goes on polling: a newer reading comes (in a sane time; no cadence judged here).
        reads, at = meter.reads, meter.at
        await until(lambda: meter.reads > reads and meter.at > at, 5, what="a newer reading")
    finally:
        client.close()
        if meter_task is not None:
            meter_task.cancel()
            await asyncio.gather(meter_task, return_exceptions=True)
        stop.set()
        await asyncio.wait_for(sim, 5)


def test_register_maps_match_the_spec() -> None:
    assert LOAD_MAP.span("setpoint_w", "p_max_w") == (0, 10)
    assert [LOAD_MAP[n].address for n in ("setpoint_w", "run", "measured_w", "state")] == [
        0,
        2,
        3,
        5,
    ]
    assert all(r.writable == (r.address < 3) for r in LOAD_MAP.regs)
    assert METER_MODEL_ADDR == 40070
    assert M21X_OFFSETS == {"Hz": 26, "W": 28, "TotWhImp": 68}
    assert METER_MAP["Evt"].address == 40070 + 2 + 122
    assert METER_MAP["End_ID"].address == 40070 + 2 + 124
    assert regs_to_f32(*METER_MAP["W"].encode(1234.5)) == 1234.5


# --- (b) our driver against simulated devices ---


async def test_polls_fill_the_fleet_arrays(rig: Rig) -> None:
    driver: Driver = rig.driver  # the protocol the control cycle relies on
    assert isinstance(driver, Driver)
    await rig.first_polls()
    await until(lambda: bool((rig.image.state == DeviceState.ON).all()), 5, what="states")
    assert np.allclose(rig.image.measured_w, 250e3, atol=5e3)
    first = rig.image.measured_at.copy()
    await until(
        lambda: bool((rig.image.measured_at > first).all()), 3, what="second round of polls"
    )
    assert rig.driver.poll_errors == 0 and rig.driver.polls_ok >= 10


async def test_a_poll_stretch_polls_every_device_that_much_less_often() -> None:
    """Two drivers over the same simulated devices, one within its poll budget, one with
    its periods stretched 4x (a host over site.max_polls_per_s): counted over the same
    window, the stretched one polls each device about a quarter as often."""
    net, port = free_loopback_net()
    specs = make_specs(net, port, 5)
    ph = SitePhysics(specs, 50e3, seed=1, dt_s=SIM_DT)
    servers = await SimServers.start(ph, specs, None)
    plain = ModbusLoadDriver(ProcessImage(specs).port("modbus"))
    stretched = ModbusLoadDriver(ProcessImage(specs).port("modbus"), poll_stretch=4.0)
    tasks = [asyncio.create_task(d.run()) for d in (plain, stretched)]
    try:
        await until(lambda: plain.polls_ok >= 40, 10, what="8 rounds of plain polls")
        assert plain.poll_errors == stretched.poll_errors == 0
        assert 1 <= stretched.polls_ok <= plain.polls_ok / 2, (stretched.polls_ok, plain.polls_ok)
    finally:
        await cancel_and_wait(*tasks)
        await servers.close()

    with pytest.raises(ValueError, match="below 1"):
        ModbusLoadDriver(ProcessImage(specs).port("modbus"), poll_stretch=0.5)


async def test_setpoint_lands_and_power_ramps_at_the_device_rate(rig: Rig) -> None:
    ph = rig.physics
    await rig.first_polls()
    rig.driver.submit(cmd(np.array([1, 3]), np.array([100e3, 50e3])))
    await until(lambda: ph.cmd_setpoint_w[1] == 100e3, 3, what="setpoint register")
    landed = ph.t_s  # the device's own clock: a loaded test machine does not stretch it
    assert ph.cmd_setpoint_w[3] == pytest.approx(50e3)
    assert ph.cmd_setpoint_w[[0, 2, 4]].tolist() == [250e3] * 3
    await until(lambda: ph.power_w[1] < 240e3, 2, what="response after the dead time")
    await until(lambda: ph.power_w[1] <= 100e3 + 1, 5, what="ramp to target")
    took = ph.t_s - landed
    # 150 kW at 100 kW/s is 1.5 s, after a 0.2 s dead time; never faster than the ramp limit.
    # Simulated seconds (the watcher sees each step within a step or two of it).
    assert 1.4 <= took <= 2.5, took
    await until(
        lambda: abs(rig.image.measured_w[1] - 100e3) < 3e3, 3, what="poll sees the new power"
    )
    ok = [c for c in rig.commands if c[2]]
    assert len(ok) >= 2 and all(name == "modbus" and 0 <= s < 1.0 for name, s, _ in ok)
    assert rig.driver.commands_ok == len(ok) and rig.driver.command_errors == 0


async def test_latest_value_wins(rig: Rig) -> None:
    ph = rig.physics
    await rig.first_polls()
    before = rig.driver.commands_ok
    for v in np.linspace(30e3, 240e3, 200):
        rig.driver.submit(cmd(np.array([2]), np.array([v])))
    rig.driver.submit(cmd(np.array([2]), np.array([123_456.7])))
    await until(lambda: ph.cmd_setpoint_w[2] == as_f32(123_456.7), 3, what="last value")
    await until(lambda: ph.power_w[2] <= 123_457.0, 5, what="device at the last value")
    assert rig.driver.commands_ok - before <= 3  # 201 submits, one or two writes


async def test_sleep_and_wake_through_the_setpoint(rig: Rig) -> None:
    ph, fleet = rig.physics, rig.image
    await rig.first_polls()
    rig.driver.submit(cmd(np.array([4]), np.array([0.0]), sleep=True))
    await until(lambda: fleet.state[4] == DeviceState.SLEEPING, 5, what="asleep")
    assert ph.cmd_run[4] == 0 and ph.power_w[4] == 5e3
    rig.driver.submit(cmd(np.array([4]), np.array([200e3])))
    await until(lambda: fleet.state[4] == DeviceState.WAKING, 3, what="waking")
    await until(lambda: fleet.state[4] == DeviceState.ON, 5, what="awake")
    await until(lambda: ph.power_w[4] >= 200e3 - 1, 8, what="ramped up")


async def test_rebooted_device_gets_its_setpoint_again(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    ph = rig.physics
    await rig.first_polls()
    rig.driver.submit(cmd(np.array([3]), np.array([60e3])))
    await until(lambda: ph.cmd_setpoint_w[3] == 60e3, 3, what="setpoint")
    resends = rig.driver.resends
    with caplog.at_level(logging.WARNING, logger="rampd.drivers.modbus"):
        ph.reboot(3)
        await until(lambda: ph.cmd_setpoint_w[3] == 250e3, 2, what="reboot to default")
        await until(lambda: ph.cmd_setpoint_w[3] == 60e3, 3, what="resent after readback")
    assert rig.driver.resends > resends and rig.driver.command_errors == 0
    assert rig.image.acked_w[3] == 60e3
    # One line for the lost setpoint (a state change), whatever its wording.
    warnings = log_records(caplog.records, "rampd.drivers.modbus", logging.WARNING)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


# --- (c) faults are isolated per device ---


@pytest.mark.parametrize(
    "fault", [Fault.SILENT, Fault.ERROR, Fault.SLOW, Fault.GARBAGE], ids=lambda f: f.name
)
async def test_faulty_device_is_isolated_and_recovers(
    rig: Rig, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    ph, fleet = rig.physics, rig.image
    others = np.array([0, 1, 3, 4])
    await rig.first_polls()
    await until(lambda: fleet.state[2] == DeviceState.ON, 3, what="device 2 on")
    caplog.set_level(logging.INFO, logger="rampd.drivers.modbus")

    ph.set_fault(2, fault)
    await until(lambda: fleet.state[2] == DeviceState.FAULT, 10, what="FAULT")
    # A command for the faulty device waits; the others' go through at once.
    rig.driver.submit(cmd(np.array([2, 0]), np.array([80e3, 90e3])))
    await until(lambda: ph.cmd_setpoint_w[0] == 90e3, 2, what="healthy device commanded")
    # While it stays broken, the others keep being polled and keep their state. (A generous
    # bound, 8 poll periods: it catches a poller held up behind the dead device's retries,
    # not a loaded test machine; the cadence itself is not judged here.)
    end = time.monotonic() + 2.5
    polled_before = fleet.measured_at[others].copy()
    while time.monotonic() < end:
        age = time.monotonic() - fleet.measured_at[others]
        assert (age < 8 * 0.25).all(), f"poll ages {age}"
        assert (fleet.state[others] == DeviceState.ON).all()
        assert fleet.state[2] == DeviceState.FAULT
        await asyncio.sleep(0.05)
    assert (fleet.measured_at[others] > polled_before).all()
    assert ph.cmd_setpoint_w[2] == 250e3  # nothing landed while broken
    assert rig.driver.errors_by_device[2] >= 3 and rig.driver.errors_by_device[others].sum() == 0
    assert rig.driver.faulted == 1

    ph.set_fault(2, Fault.NONE)
    await until(lambda: fleet.state[2] == DeviceState.ON, 10, what="recovery")
    await until(lambda: ph.cmd_setpoint_w[2] == 80e3, 5, what="pending command delivered")
    assert rig.driver.faulted == 0
    # One line per state change, not one per failed attempt (counted by logger and level,
    # whatever the wording): a WARNING for the FAULT, an INFO for the recovery.
    said = caplog.messages
    assert len(log_records(caplog.records, "rampd.drivers.modbus", logging.WARNING)) == 1, said
    assert len(log_records(caplog.records, "rampd.drivers.modbus", logging.INFO)) == 1, said


# --- verified commands ---


async def test_a_load_that_acknowledges_and_does_not_move_is_unresponsive_then_recovers(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rampd")
    await rig.first_polls()
    stuck = 2
    rig.physics.set_fault(stuck, Fault.STUCK)
    drv = rig.driver
    # Two commands a long way from where it is: both acknowledged, neither followed.
    rig.driver.submit(cmd(range(5), [60e3] * 5))
    await until(lambda: drv._strikes[stuck] >= 1 or drv.unresponsive, 10.0, what="a strike")
    await until(lambda: rig.image.state[stuck] == DeviceState.UNRESPONSIVE, 10.0, what="verdict")
    assert drv.unverified >= 2
    others = [i for i in range(5) if i != stuck]
    assert np.all(rig.image.state[others] == DeviceState.ON)  # the others followed
    assert np.all(np.abs(rig.physics.power_w[others] - 60e3) < 5e3)
    # Cleared: the retried command moves it, and it is back.
    rig.physics.set_fault(stuck, Fault.NONE)
    await until(lambda: rig.image.state[stuck] == DeviceState.ON, 20.0, what="recovery")
    assert abs(rig.physics.power_w[stuck] - 60e3) < 5e3
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("rampd")]
    assert sum("UNRESPONSIVE" in line for line in lines) == 1
    assert sum("follows commands again" in line for line in lines) == 1


async def test_a_command_that_is_followed_is_never_held_against_the_device(rig: Rig) -> None:
    await rig.first_polls()
    for target in (60e3, 240e3, 100e3):
        rig.driver.submit(cmd(range(5), [target] * 5))

        def there(t: float = target) -> bool:
            return bool(np.all(np.abs(rig.physics.power_w - t) < 5e3))

        await until(there, 10.0)
    await until(lambda: not np.isfinite(rig.driver._verify_at).any(), 10.0, what="verified")
    assert rig.driver.unverified == 0 and rig.driver.unresponsive == 0
