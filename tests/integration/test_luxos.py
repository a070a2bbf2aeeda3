"""LuxOS over real sockets: simulated miners on 127.x.y.z:4028, pyasic and our driver as clients.

pyasic (a client nobody here wrote) must identify a simulated miner as LuxOS with its model,
read its power and move it; the driver must poll, set profiles, sleep and wake, manage the
session, and isolate faults. Physics is stepped in the background on the monotonic clock;
waits poll a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from controller.config import DeviceAccess, DeviceSpec
from drivers.base import Driver
from drivers.cgminer.client import exchange
from drivers.core.image import ProcessImage
from drivers.core.state import DeviceState
from drivers.luxos import messages as m
from drivers.luxos.client import LuxosDriver
from drivers.luxos.sim_server import LuxosServers, start_luxos_servers
from drivers.sim.physics import Fault, SitePhysics
from tests.helpers import (
    SIM_DT,
    CommandLog,
    MinerRig,
    MinerSite,
    cancel_and_wait,
    cmd,
    driving,
    free_loopback_net,
    miner_specs,
    start_site_of,
    stop_site,
    until,
)

P_MIN, P_MAX, STEP, P_IDLE = 1750.0, 3500.0, 250.0, 20.0
S21_THS_PER_W = 1 / 17.5
pytestmark = pytest.mark.usefixtures("quiet_pyasic")

MINER: dict[str, Any] = {
    "kind": "antminer-s21-luxos",
    "protocol": "luxos",
    "port": m.PORT,
    "p_min_w": P_MIN,
    "p_max_w": P_MAX,
    "p_idle_w": P_IDLE,
    "step_w": STEP,
    "access": DeviceAccess(model="S21"),
}


def make_specs(net: str, n: int, **overrides: Any) -> list[DeviceSpec]:
    """S21-like miners on the LuxOS ladder, with dynamics sped up so tests take seconds."""
    return miner_specs(net, n, **(MINER | overrides))


Site = MinerSite[LuxosServers]


async def start_site(n: int, session_ttl_s: float = 60.0, **overrides: Any) -> Site:
    specs = make_specs(free_loopback_net(m.PORT)[0], n, **overrides)

    def serve(ph: SitePhysics) -> Awaitable[LuxosServers]:
        return start_luxos_servers(ph, range(n), specs, session_ttl_s=session_ttl_s)

    return await start_site_of(specs, serve, seed=3)


# --- (a) pyasic identifies and drives a simulated miner ---


@pytest.mark.parametrize(
    ("model", "cls_name", "pyasic_model"),
    [("S21", "LUXMinerS21", "S21"), ("S19j Pro", "LUXMinerS19jPro", "S19j Pro")],
)
async def test_pyasic_identifies_reads_and_controls(
    model: str, cls_name: str, pyasic_model: str
) -> None:
    import pyasic  # type: ignore[import-untyped]
    from pyasic.miners.backends.luxminer import LUXMiner  # type: ignore[import-untyped]

    site = await start_site(1, access=DeviceAccess(model=model))
    ph, ip = site.physics, site.specs[0].host
    try:
        miner = await pyasic.get_miner(ip)
        print(f"pyasic.get_miner({ip!r}) -> {type(miner).__name__}: {miner}")
        assert isinstance(miner, LUXMiner)
        assert type(miner).__name__ == cls_name
        assert miner.model == f"{pyasic_model} (LuxOS)"

        data = await miner.get_data()
        print(
            f"get_data: wattage={data.wattage} W, limit={data.wattage_limit} W, "
            f"hashrate={data.hashrate}, fw={data.fw_ver}"
        )
        assert data.wattage == round(float(ph.reported_w[0]))  # noise 0: exact
        assert data.wattage_limit == P_MAX  # the "default" profile
        assert await miner.get_wattage() == round(float(ph.reported_w[0]))

        # set_power_limit picks the highest profile at or below the limit (3000 W here).
        assert await miner.set_power_limit(3100) is True
        assert ph.cmd_setpoint_w[0] == 3000.0
        await until(lambda: ph.power_w[0] == 3000.0, 5, what="power at the 3000 W profile")
        assert site.servers.sim.current_profile(0).watts == 3000.0
        # pyasic switches ATM off around profileset and back on after it.
        assert site.servers.sim.counts[0, "atmset"] == 2 and site.servers.sim.atm_enabled[0]

        assert await miner.stop_mining() is True
        await until(
            lambda: ph.state[0] == DeviceState.SLEEPING and ph.power_w[0] == P_IDLE,
            5,
            what="asleep",
        )
        assert await miner.get_wattage() == round(P_IDLE)

        assert await miner.resume_mining() is True
        await until(
            lambda: ph.state[0] == DeviceState.ON and ph.power_w[0] == 3000.0,
            5,
            what="awake at its profile",
        )
    finally:
        await stop_site(site)


async def test_pyasic_web_probe_finds_luxor_firmware() -> None:
    """pyasic also probes http://<ip>/ for "Luxor Firmware"; the optional page answers it."""
    from pyasic.miners.factory import MinerFactory, MinerTypes  # type: ignore[import-untyped]

    specs = make_specs(free_loopback_net(m.PORT)[0], 1)
    ph = SitePhysics(specs, 0.0, dt_s=SIM_DT)
    try:
        servers = await start_luxos_servers(ph, [0], specs, http_port=80)
    except OSError as exc:  # port 80 needs root (or CAP_NET_BIND_SERVICE)
        pytest.skip(f"cannot bind port 80: {exc}")
    try:
        assert await MinerFactory()._get_miner_web(specs[0].host) == MinerTypes.LUX_OS
    finally:
        await servers.close()


async def test_wire_framing_of_a_real_exchange() -> None:
    """Replies end with NUL and the miner closes; an unknown command is a STATUS E."""
    site = await start_site(1)
    host = site.specs[0].host
    try:
        reader, writer = await asyncio.open_connection(host, m.PORT)
        writer.write(m.encode_request("version"))  # no terminator, no half-close
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 2.0)  # to EOF: the miner closes
        writer.close()
        assert raw.endswith(b"\x00")
        assert m.parse_version(m.decode_reply(raw)).type_name == "Antminer S21"

        with pytest.raises(m.CommandError):
            m.check(await exchange(host, m.PORT, m.encode_request("bogus"), 1.0), "bogus")
        multi = await exchange(host, m.PORT, m.encode_request("power+summary"), 1.0)
        assert m.parse_power(multi["power"][0]).watts == P_MAX
        # One session at a time; privileged commands need it.
        sid = m.parse_session(await exchange(host, m.PORT, m.encode_request("logon"), 1.0))
        with pytest.raises(m.SessionBusy):
            m.check(await exchange(host, m.PORT, m.encode_request("logon"), 1.0), "logon")
        with pytest.raises(m.InvalidSession):
            req = m.encode_request("curtail", "nope", "sleep")
            m.check(await exchange(host, m.PORT, req, 1.0), "curtail")
        req = m.encode_request("session")
        assert m.parse_session(await exchange(host, m.PORT, req, 1.0), "session") == sid
    finally:
        await stop_site(site)


# --- (b) the driver against 20 simulated miners ---


Rig = MinerRig[LuxosDriver, LuxosServers]


@pytest.fixture
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    opts: dict[str, Any] = getattr(request, "param", {})
    site = await start_site(
        20, session_ttl_s=opts.get("session_ttl_s", 60.0), **opts.get("spec", {})
    )

    def driver(image: ProcessImage, commands: CommandLog) -> LuxosDriver:
        return LuxosDriver(
            image.port("luxos"),
            on_command=commands,
            summary_every=3,
            config_every=2,
            session_ttl_s=opts.get("session_ttl_s", 60.0),
            backoff_cap_s=1.0,
        )

    async with driving(site, driver) as rig:
        yield rig


def profile_w(setpoint_w: float) -> float:
    return min(P_MAX, P_MIN + STEP * math.floor((setpoint_w - P_MIN) / STEP + 1e-9))


async def test_driver_satisfies_the_protocol_and_polls_fill_the_fleet(rig: Rig) -> None:
    assert isinstance(rig.driver, Driver)
    other = LuxosDriver(ProcessImage(rig.site.specs[:1]).port("luxos"))
    with pytest.raises(IndexError):  # its port has one row: local 1.. name nothing of its own
        other.submit(cmd(np.arange(len(rig.site.specs)), np.full(len(rig.site.specs), 3000.0)))
    assert other.pending == 0
    await rig.first_polls()
    ph, fleet = rig.physics, rig.image
    await until(lambda: bool((fleet.state == DeviceState.ON).all()), 5, what="all ON")
    np.testing.assert_allclose(fleet.measured_w, ph.reported_w, atol=1.0)
    await until(lambda: bool(np.isfinite(rig.driver.hashrate_ths).all()), 5, what="hashrates")
    np.testing.assert_allclose(rig.driver.hashrate_ths, P_MAX * S21_THS_PER_W, rtol=1e-3)
    # Polls keep coming on cadence (poll_s 0.3 s).
    t0 = time.monotonic()
    await until(lambda: bool((fleet.measured_at > t0 + 0.5).all()), 3, what="polls go on")


async def test_submit_selects_the_profile_at_or_below(rig: Rig) -> None:
    await rig.first_polls()
    ph, n = rig.physics, len(rig.site.specs)
    rows = np.arange(n)
    setpoints = np.random.default_rng(7).uniform(P_MIN, P_MAX, n)
    setpoints[0] = P_MAX
    setpoints[1] = P_MIN
    rig.driver.submit(cmd(rows, setpoints))
    expected = np.array([profile_w(s) for s in setpoints])
    await until(lambda: bool((ph.cmd_setpoint_w == expected).all()), 5, what="profiles set")
    await until(
        lambda: bool(np.allclose(rig.image.measured_w, expected, atol=1.0)), 5, what="measured"
    )
    sim = rig.site.servers.sim
    assert all(sim.current_profile(k).watts == expected[k] for k in range(n))
    assert rig.driver.commands_ok == n and rig.driver.command_errors == 0
    assert len(rig.commands) == n and all(ok and name == "luxos" for name, _, ok in rig.commands)
    # The ladder was fetched once per miner and cached; every miner was adopted (one logon,
    # ATM off), miner 0 too though it already ran its profile and got no command.
    assert all(sim.counts[k, "profiles"] == 1 for k in range(n))
    await until(lambda: rig.driver.adopting == 0, 5, what="miners adopted")
    assert not sim.atm_enabled.any()
    assert all(sim.counts[k, "logon"] == 1 for k in range(n))
    assert sim.counts[0, "profileset"] == 0
    rig.driver.submit(cmd(rows, expected + 10.0))  # same profiles: nothing to send
    await until(lambda: rig.driver.pending == 0, 2, what="drained")
    await until(lambda: rig.driver.commands_ok == 2 * n, 2, what="no-op commands done")
    assert sum(sim.counts[k, "profileset"] for k in range(n)) <= n


async def test_sleep_below_the_lowest_profile_and_wake_on_demand(rig: Rig) -> None:
    await rig.first_polls()
    ph, fleet = rig.physics, rig.image
    sleepers = np.array([2, 5, 11])
    rig.driver.submit(cmd(sleepers, np.full(3, P_IDLE), sleep=True))
    await until(
        lambda: bool((fleet.state[sleepers] == DeviceState.SLEEPING).all()), 5, what="asleep"
    )
    assert (ph.cmd_run[sleepers] == 0).all()
    np.testing.assert_allclose(fleet.measured_w[sleepers], P_IDLE, atol=1.0)
    others = np.setdiff1d(np.arange(len(rig.site.specs)), sleepers)
    assert (fleet.state[others] == DeviceState.ON).all()

    seen_waking = np.zeros(len(sleepers), dtype=bool)

    def woke() -> bool:
        seen_waking[:] |= fleet.state[sleepers] == DeviceState.WAKING
        return bool((fleet.state[sleepers] == DeviceState.ON).all())

    rig.driver.submit(cmd(sleepers, np.array([2600.0, P_MAX, P_MIN])))
    await until(woke, 5, interval=0.005, what="awake and hashing")
    assert seen_waking.all(), "WAKING between wakeup and the first hashes"
    await until(
        lambda: bool((ph.power_w[sleepers] == [2500.0, P_MAX, P_MIN]).all()), 3, what="profiles"
    )


@pytest.mark.parametrize("rig", [{"session_ttl_s": 1.0}], indirect=True)
async def test_session_is_held_renewed_and_replaced_when_lost(rig: Rig) -> None:
    ph, drv, sim = rig.physics, rig.driver, rig.site.servers.sim
    await until(lambda: drv.adopting == 0, 5, what="miners adopted")
    first = drv.session_id(0)
    assert first and sim.active_session(0) == first and sim.counts[0, "logon"] == 1
    # Polls renew it (0.5 s idle of a 1 s life): it outlives its lifetime several times.
    await until(lambda: sim.counts[0, "atmset"] >= 4, 5, what="renewals")
    assert sim.active_session(0) == first and drv.session_id(0) == first

    rows = np.array([0])
    drv.submit(cmd(rows, np.array([3000.0])))  # the held session: the command is one exchange
    await until(lambda: ph.cmd_setpoint_w[0] == 3000.0, 3, what="first command")
    assert sim.counts[0, "logon"] == 1 and drv.session_id(0) == first

    sim.session[0] = ""  # the miner forgot it (its API restarted): refused, logged on again
    drv.submit(cmd(rows, np.array([2500.0])))
    await until(lambda: ph.cmd_setpoint_w[0] == 2500.0, 3, what="command after the loss")
    await until(lambda: drv.session_id(0) not in ("", first), 3, what="a new session")
    assert sim.counts[0, "logon"] == 2 and sim.active_session(0) == drv.session_id(0)
    assert drv.command_errors == 0  # a lost session is handled, not an error


@pytest.mark.parametrize("rig", [{"session_ttl_s": 1.0}], indirect=True)
async def test_another_actors_session_delays_but_does_not_fault(rig: Rig) -> None:
    await until(lambda: rig.driver.adopting == 0, 5, what="miners adopted")
    ph, spec, sim = rig.physics, rig.site.specs[9], rig.site.servers.sim
    # Someone else (an operator's script) took the miner's only session: ours is gone.
    sim.session[9] = ""
    m.parse_session(await exchange(spec.host, spec.port, m.encode_request("logon"), 1.0))
    rig.driver.submit(cmd(np.array([9]), np.array([2000.0])))
    await until(lambda: rig.driver.command_errors >= 1, 3, what="refused: session busy")
    assert rig.image.state[9] == DeviceState.ON and rig.driver.faulted == 0
    await until(lambda: ph.cmd_setpoint_w[9] == 2000.0, 20, what="applied once it expired")


async def test_latest_value_wins(rig: Rig) -> None:
    await rig.first_polls()
    ph, sim = rig.physics, rig.site.servers.sim
    rows = np.array([4])
    for value in (2000.0, 2600.0, 3000.0, 2250.0):  # without yielding: one slot, last wins
        rig.driver.submit(cmd(rows, np.array([value])))
    await until(lambda: ph.cmd_setpoint_w[4] == 2250.0, 3, what="last value applied")
    await until(lambda: rig.driver.pending == 0, 2, what="drained")
    assert sim.counts[4, "profileset"] == 1


@pytest.mark.parametrize("rig", [{"spec": {"timeout_s": 2.0}}], indirect=True)
async def test_logoff_on_shutdown(rig: Rig) -> None:
    """Best effort, one attempt per miner: a generous timeout keeps a loaded CI host out of it."""
    await rig.first_polls()
    sim = rig.site.servers.sim
    rig.driver.submit(cmd(np.array([0, 1]), np.array([3000.0, 3000.0])))
    await until(lambda: bool(sim.active_session(0) and sim.active_session(1)), 3, what="sessions")
    task = rig.site.tasks.pop()  # the driver
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sim.active_session(0) == "" and sim.active_session(1) == ""
    assert sim.counts[0, "logoff"] == 1


# --- (c) faults: isolated per miner, FAULT after two failures, recovery ---


@pytest.mark.parametrize("fault", [Fault.SILENT, Fault.ERROR, Fault.GARBAGE, Fault.SLOW])
async def test_fault_is_isolated_and_recovers(rig: Rig, fault: Fault) -> None:
    await rig.first_polls()
    ph, fleet, k = rig.physics, rig.image, 3
    others = np.setdiff1d(np.arange(len(rig.site.specs)), [k])
    await until(lambda: bool((fleet.state == DeviceState.ON).all()), 5, what="all ON")
    ph.set_fault(k, fault)
    await until(lambda: fleet.state[k] == DeviceState.FAULT, 5, what=f"{fault.name} -> FAULT")
    assert rig.driver.faulted == 1
    t0 = time.monotonic()
    await until(
        lambda: bool((fleet.measured_at[others] > t0 + 0.6).all()), 3, what="others on cadence"
    )
    assert (fleet.state[others] == DeviceState.ON).all()
    # A command to the faulted miner fails without touching the others.
    rig.driver.submit(cmd(np.array([k, 7]), np.array([2500.0, 2500.0])))
    await until(lambda: ph.cmd_setpoint_w[7] == 2500.0, 3, what="healthy miner commanded")
    assert ph.cmd_setpoint_w[k] == P_MAX

    ph.set_fault(k, Fault.NONE)
    await until(lambda: fleet.state[k] == DeviceState.ON, 6, what="recovered")
    assert rig.driver.faulted == 0
    await until(lambda: ph.cmd_setpoint_w[k] == 2500.0, 6, what="queued command delivered")


async def test_reboot_loses_the_profile_and_session_and_the_driver_resends(rig: Rig) -> None:
    await rig.first_polls()
    ph, drv, sim, k = rig.physics, rig.driver, rig.site.servers.sim, 6
    drv.submit(cmd(np.array([k]), np.array([2500.0])))
    await until(lambda: ph.cmd_setpoint_w[k] == 2500.0, 3, what="profile set")
    logons = drv.logons
    ph.reboot(k)  # back to the default profile, session gone
    await until(lambda: sim.reboots[k] == 1, 3, what="miner noticed its restart")
    await until(
        lambda: drv.resends >= 1 and ph.cmd_setpoint_w[k] == 2500.0, 5, what="resent after reboot"
    )
    assert drv.logons == logons + 1  # the old session was refused; a new one was made
    await until(lambda: ph.power_w[k] == 2500.0, 3, what="back at its profile")
    assert rig.image.state[k] == DeviceState.ON


async def test_reboot_of_a_sleeping_miner_puts_it_back_to_sleep(rig: Rig) -> None:
    await rig.first_polls()
    ph, fleet, k = rig.physics, rig.image, 8
    rig.driver.submit(cmd(np.array([k]), np.array([P_IDLE]), sleep=True))
    await until(lambda: fleet.state[k] == DeviceState.SLEEPING, 5, what="asleep")
    ph.reboot(k)  # the physics restarts it running
    await until(lambda: ph.cmd_run[k] == 1, 2, what="restarted running")
    await until(lambda: ph.cmd_run[k] == 0, 5, what="curtailed again")
    await until(lambda: fleet.state[k] == DeviceState.SLEEPING, 5, what="asleep again")


async def test_adoption_at_first_poll_so_a_fleet_command_costs_one_exchange(rig: Rig) -> None:
    sim, drv = rig.site.servers.sim, rig.driver
    sim.atm_enabled[4] = False  # an operator switched it off already
    await until(lambda: drv.adopting == 0, 5, what="miners adopted")
    # Adopted from the config the first poll read: no `atm` reads; ATM off where it was on.
    n = len(rig.site.specs)
    assert sim.counts[4, "atmset"] == 0 and sim.counts[5, "atmset"] == 1
    assert not sim.atm_enabled.any() and sum(sim.counts[k, "atm"] for k in range(n)) == 0
    assert all(sim.counts[k, "logon"] == 1 and sim.counts[k, "profiles"] == 1 for k in range(n))
    # ATM switched on again by an operator is noticed by a config poll and switched off.
    sim.atm_enabled[6] = True
    await until(lambda: not sim.atm_enabled[6], 5, what="ATM off again")
    before = sim.counts.copy()

    drv.submit(cmd(np.arange(n), np.full(n, 3000.0)))  # the fleet-wide burst
    await until(lambda: drv.commands_ok == n, 3, what="all acknowledged")
    assert (rig.physics.cmd_setpoint_w == 3000.0).all()
    # The command was one exchange per miner: no logon, ladder or ATM exchange on its way.
    assert all(sim.counts[k, "profileset"] - before[k, "profileset"] == 1 for k in range(n))
    for command in ("logon", "profiles", "atm"):
        assert all(sim.counts[k, command] == before[k, command] for k in range(n)), command


async def test_firmware_without_multi_commands_is_polled_one_by_one() -> None:
    """An older firmware answers "Invalid command" to "power+summary": the driver notices once
    and polls that miner with one command per exchange, without a failed poll or a FAULT."""
    site = await start_site(1)
    real = site.specs[0]
    old = replace(real, host=f"{free_loopback_net(m.PORT)[0]}.1")
    refused: list[str] = []

    async def old_firmware(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(4096)  # a request is one small object
        req = m.decode_request(data)
        if "+" in req.command:
            refused.append(req.command)
            reply = m.error_reply(m.Code.INVALID_COMMAND, f"Invalid command '{req.command}'")
        else:  # the real simulated miner answers everything else
            reply = await exchange(real.host, real.port, data, 1.0)
        writer.write(m.encode_reply(reply))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(old_firmware, old.host, old.port)
    fleet = ProcessImage([old])
    driver = LuxosDriver(fleet.port("luxos"))
    task = asyncio.create_task(driver.run())
    try:
        await until(lambda: driver.polls_ok >= 4, 5, what="polls one by one")
        assert len(refused) == 1 and driver.poll_errors == 0 and driver.faulted == 0
        assert fleet.state[0] == DeviceState.ON and driver.adopting == 0
        assert site.servers.sim.counts[0, "power"] >= 4
    finally:
        await cancel_and_wait(task)
        server.close()
        await stop_site(site)
