"""Braiins OS+ over real sockets: simulated miners serving gRPC on 127.x.y.z:50051, pyasic and our
driver as clients.

pyasic (a client nobody here wrote) must identify a simulated miner as Braiins OS+ with its
model, read its power and move it through the gRPC API; the driver must log in, adopt (the
power target's bounds from the miner's constraints), poll, set power targets, pause and resume,
keep its token, resend what a miner lost, and isolate faults. Physics is stepped in the
background on the monotonic clock; waits poll a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import numpy as np
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from controller.config import DeviceAccess, DeviceSpec
from drivers.base import Driver
from drivers.braiins import api
from drivers.braiins.api import pb
from drivers.braiins.client import BraiinsDriver, LoginRefused
from drivers.braiins.proto import bos_v1_grpc as grpc
from drivers.braiins.sim_server import BraiinsServers, start_braiins_servers
from drivers.core.capability import Control
from drivers.core.image import ProcessImage
from drivers.core.state import DeviceState
from drivers.sim.physics import Fault, SitePhysics
from tests.helpers import (
    SIM_DT,
    CommandLog,
    MinerRig,
    MinerSite,
    cmd,
    driving,
    free_loopback_net,
    miner_specs,
    start_site_of,
    stop_site,
    until,
)

P_MIN, P_MAX, P_IDLE = 1400.0, 3500.0, 30.0
pytestmark = pytest.mark.usefixtures("quiet_pyasic")

MINER: dict[str, Any] = {
    "kind": "antminer-s21-braiins",
    "protocol": "braiins",
    "port": api.PORT,
    "p_min_w": P_MIN,
    "p_max_w": P_MAX,
    "p_idle_w": P_IDLE,
    "step_w": 0.0,
    "access": DeviceAccess(model="S21", username="root"),
}


def make_specs(net: str, n: int, **overrides: Any) -> list[DeviceSpec]:
    """S21s on Braiins OS+, with the tuner's dynamics sped up so tests take seconds."""
    return miner_specs(net, n, **(MINER | overrides))


Site = MinerSite[BraiinsServers]


async def start_site(n: int, *, token_ttl_s: float = 3600.0, **overrides: Any) -> Site:
    specs = make_specs(free_loopback_net(api.PORT)[0], n, **overrides)

    def serve(ph: SitePhysics) -> Awaitable[BraiinsServers]:
        return start_braiins_servers(ph, range(n), specs, token_ttl_s=token_ttl_s)

    return await start_site_of(specs, serve, seed=5)


# --- (a) pyasic identifies and drives a simulated miner ---


async def test_pyasic_identifies_reads_and_controls() -> None:
    import pyasic  # type: ignore[import-untyped]
    from pyasic.miners.backends.braiins_os import BOSer  # type: ignore[import-untyped]

    # pyasic logs in as root with its default password "root": the miner is configured so.
    specs = make_specs(
        free_loopback_net(api.PORT)[0], 1, access=DeviceAccess(model="S21", password="root")
    )
    site = await start_site_of(
        specs,
        lambda ph: start_braiins_servers(ph, [0], specs, api_port=api.CGMINER_PORT),
        seed=5,
    )
    ph, servers, ip = site.physics, site.servers, specs[0].host
    try:
        miner = await pyasic.get_miner(ip)
        print(f"pyasic.get_miner({ip!r}) -> {type(miner).__name__}: {miner}")
        assert isinstance(miner, BOSer) and type(miner).__name__ == "BOSMinerS21"
        assert miner.model == "S21 (BOS+)"

        assert await miner.get_wattage() == round(float(ph.reported_w[0]))  # noise 0: exact
        data = await miner.get_data()
        print(
            f"get_data: wattage={data.wattage} W, limit={data.wattage_limit} W, "
            f"hashrate={data.hashrate}, fw={data.fw_ver}, hostname={data.hostname}"
        )
        assert data.wattage == round(P_MAX) and data.wattage_limit == round(P_MAX)
        assert data.fw_ver == "24.08" and data.hostname == specs[0].name

        assert await miner.set_power_limit(2600) is True
        assert ph.cmd_setpoint_w[0] == 2600.0
        await until(lambda: ph.power_w[0] == 2600.0, 5, what="power at the 2600 W target")
        assert await miner.get_wattage() == 2600

        assert await miner.stop_mining() is True
        await until(
            lambda: ph.state[0] == DeviceState.SLEEPING and ph.power_w[0] == P_IDLE,
            5,
            what="paused",
        )
        assert await miner.get_wattage() == round(P_IDLE)

        assert await miner.resume_mining() is True
        await until(
            lambda: ph.state[0] == DeviceState.ON and ph.power_w[0] == 2600.0,
            5,
            what="mining again at its target",
        )
        # pyasic logged in once and reused its token for every call.
        assert servers.sim.counts[0, "Login"] == 1
    finally:
        await stop_site(site)


async def test_pyasic_web_probe_finds_braiins_os() -> None:
    """pyasic also probes http://<ip>/ for "Braiins OS"; the optional page answers it."""
    from pyasic.miners.factory import MinerFactory, MinerTypes  # type: ignore[import-untyped]

    specs = make_specs(free_loopback_net(api.PORT)[0], 1)
    ph = SitePhysics(specs, 0.0, dt_s=SIM_DT)
    try:
        servers = await start_braiins_servers(ph, [0], specs, http_port=80)
    except OSError as exc:  # port 80 needs root (or CAP_NET_BIND_SERVICE)
        pytest.skip(f"cannot bind port 80: {exc}")
    try:
        assert await MinerFactory()._get_miner_web(specs[0].host) == MinerTypes.BRAIINS_OS
    finally:
        await servers.close()


# --- (c) the simulator's wire: authentication as the firmware answers it ---


async def test_login_token_and_refusals_on_the_wire() -> None:
    site = await start_site(1, token_ttl_s=0.5)
    spec, sim = site.specs[0], site.servers.sim
    channel = Channel(spec.host, spec.port)
    auth = grpc.AuthenticationServiceStub(channel)
    miner = grpc.MinerServiceStub(channel)
    perf = grpc.PerformanceServiceStub(channel)
    try:
        with pytest.raises(GRPCError) as refused:
            await auth.Login(pb.LoginRequest(username="root", password="nope"), timeout=1.0)
        assert refused.value.status == Status.UNAUTHENTICATED
        with pytest.raises(GRPCError) as anonymous:
            await miner.GetMinerStats(pb.GetMinerStatsRequest(), timeout=1.0)
        assert anonymous.value.status == Status.UNAUTHENTICATED

        # The default credentials: root, no password. The token comes in the reply and in the
        # initial metadata (where pyasic reads it), with its lifetime.
        async with auth.Login.open(timeout=1.0) as stream:
            await stream.send_message(pb.LoginRequest(username="root", password=""), end=True)
            reply = await stream.recv_message()
            assert reply is not None and stream.initial_metadata is not None
            assert stream.initial_metadata[api.AUTH_METADATA] == reply.token != ""
        assert reply.timeout_s == 1  # whole seconds, at least one
        meta = {api.AUTH_METADATA: reply.token}
        stats = await miner.GetMinerStats(pb.GetMinerStatsRequest(), timeout=1.0, metadata=meta)
        assert stats.power_stats.approximated_consumption.watt == round(P_MAX)

        with pytest.raises(GRPCError) as bad_target:  # outside the constraints: refused
            await perf.SetPowerTarget(api.set_power_target_request(50_000), metadata=meta)
        assert bad_target.value.status == Status.INVALID_ARGUMENT
        assert site.physics.cmd_setpoint_w[0] == P_MAX

        async def lapsed() -> bool:
            try:
                await miner.GetMinerStats(pb.GetMinerStatsRequest(), timeout=1.0, metadata=meta)
            except GRPCError as exc:
                return exc.status == Status.UNAUTHENTICATED
            return False

        deadline = time.monotonic() + 3.0  # the token lives 0.5 s (whole seconds: 1 s said)
        while not await lapsed():
            assert time.monotonic() < deadline, "token never lapsed"
            await asyncio.sleep(0.1)
        assert sim.counts[0, "Login"] == 2
    finally:
        channel.close()
        await stop_site(site)


async def test_cgminer_api_names_boser_and_the_model() -> None:
    specs = make_specs(free_loopback_net(api.CGMINER_PORT)[0], 1)
    ph = SitePhysics(specs, 0.0, dt_s=SIM_DT)
    servers = await start_braiins_servers(ph, [0], specs, api_port=api.CGMINER_PORT)
    try:
        replies = {}
        for command in ("version", "devdetails", "bogus"):
            reader, writer = await asyncio.open_connection(specs[0].host, api.CGMINER_PORT)
            writer.write(f'{{"command": "{command}"}}'.encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 2.0)  # to EOF: the miner closes
            writer.close()
            assert raw.endswith(b"\x00")
            replies[command] = json.loads(raw[:-1])
        assert "BOSer" in replies["version"]["VERSION"][0]
        assert replies["devdetails"]["DEVDETAILS"][0]["Model"] == "Antminer S21"
        assert replies["bogus"]["STATUS"][0]["STATUS"] == "E"
    finally:
        await servers.close()


def test_messages_pyasic_calls_do_not_cover_agree_with_its_definitions() -> None:
    """Tuner state and constraints (which pyasic's calls above never exchange): our messages'
    bytes decode to the same values with pyasic's independently written definitions."""
    from pyasic.web.braiins_os.proto.braiins.bos import v1  # type: ignore[import-untyped]

    ours = pb.GetTunerStateResponse(
        overall_tuner_state=pb.TUNER_STATE_TUNING,
        power_target_mode_state=pb.PowerTargetModeState(
            profile=pb.PowerTargetProfile(
                target=pb.Power(watt=2600), estimated_power_consumption=pb.Power(watt=2590)
            ),
            current_target=pb.Power(watt=2600),
        ),
    )
    theirs = v1.GetTunerStateResponse().parse(ours.SerializeToString())
    assert theirs.overall_tuner_state == v1.TunerState.TUNING
    assert theirs.power_target_mode_state.current_target.watt == 2600
    assert theirs.power_target_mode_state.profile.estimated_power_consumption.watt == 2590

    limits = pb.GetConstraintsResponse(
        tuner_constraints=pb.TunerConstraints(
            power_target=pb.PowerConstraints(
                default=pb.Power(watt=3500), min=pb.Power(watt=1400), max=pb.Power(watt=3500)
            ),
            default_mode=pb.TUNER_MODE_POWER_TARGET,
        )
    )
    got = v1.GetConstraintsResponse().parse(limits.SerializeToString()).tuner_constraints
    assert (got.power_target.min.watt, got.power_target.max.watt) == (1400, 3500)
    assert got.default_mode == v1.TunerMode.POWER_TARGET
    # And back: what pyasic would send as a power target, as our simulator reads it.
    req = v1.SetPowerTargetRequest(
        save_action=v1.SaveAction.SAVE_AND_APPLY, power_target=v1.Power(watt=3100)
    )
    assert pb.SetPowerTargetRequest.FromString(bytes(req)) == api.set_power_target_request(3100)


# --- (b) the driver against 20 simulated miners ---


Rig = MinerRig[BraiinsDriver, BraiinsServers]


@pytest.fixture
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    opts: dict[str, Any] = getattr(request, "param", {})
    site = await start_site(20, token_ttl_s=opts.get("token_ttl_s", 3600.0), **opts.get("spec", {}))

    def driver(image: ProcessImage, commands: CommandLog) -> BraiinsDriver:
        return BraiinsDriver(
            image.port("braiins"), on_command=commands, readback_every=2, backoff_cap_s=1.0
        )

    async with driving(site, driver) as rig:
        yield rig


async def test_polls_fill_the_image_and_adoption_reports_capabilities(rig: Rig) -> None:
    assert isinstance(rig.driver, Driver)
    await rig.first_polls()
    ph, fleet, drv = rig.physics, rig.image, rig.driver
    await until(lambda: bool((fleet.state == DeviceState.ON).all()), 5, what="all ON")
    np.testing.assert_allclose(fleet.measured_w, ph.reported_w, atol=1.0)
    await until(lambda: drv.adopting == 0, 5, what="miners adopted")
    # Capabilities from each miner's GetConstraints: a continuous power target with sleep.
    for caps in fleet.capabilities:
        assert caps is not None and caps.control is Control.CONTINUOUS
        assert (caps.p_min_w, caps.p_max_w, caps.step_w, caps.can_sleep) == (P_MIN, P_MAX, 0, True)
    assert (fleet.p_min_w == P_MIN).all() and (fleet.p_max_w == P_MAX).all()
    assert drv.models == ["Antminer S21"] * 20
    np.testing.assert_allclose(drv.hashrate_ths, P_MAX / 17.5, rtol=1e-3)
    # One login per miner, its channel held: polls go on without new logins.
    t0 = time.monotonic()
    await until(lambda: bool((fleet.measured_at > t0 + 0.5).all()), 3, what="polls go on")
    assert drv.logins == 20 and drv.relogins == 0
    assert (rig.site.servers.accepted == 1).all()  # one held HTTP/2 channel per miner
    sim = rig.site.servers.sim
    assert all(sim.counts[k, "GetConstraints"] == 1 for k in range(20))


async def test_run_commands_set_power_targets(rig: Rig) -> None:
    await rig.first_polls()
    ph, n, drv = rig.physics, len(rig.site.specs), rig.driver
    rows = np.arange(n)
    setpoints = np.random.default_rng(7).uniform(P_MIN, P_MAX, n)
    setpoints[0], setpoints[1] = P_MAX + 500.0, 100.0  # beyond the constraints: clamped
    drv.submit(cmd(rows, setpoints))
    expected = np.clip(np.round(setpoints), P_MIN, P_MAX)
    await until(lambda: bool((ph.cmd_setpoint_w == expected).all()), 5, what="targets set")
    await until(lambda: bool(np.allclose(rig.image.measured_w, expected, atol=1.0)), 5)
    assert drv.commands_ok == n and drv.command_errors == 0
    assert len(rig.commands) == n and all(ok and name == "braiins" for name, _, ok in rig.commands)
    # One call per command: adopted miners have their token and know they are not paused.
    sim = rig.site.servers.sim
    assert all(sim.counts[k, "SetPowerTarget"] == 1 for k in range(n))
    assert all(sim.counts[k, "ResumeMining"] == 0 for k in range(n))


async def test_sleep_pauses_and_run_resumes(rig: Rig) -> None:
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
    await until(woke, 5, interval=0.005, what="resumed and hashing")
    assert seen_waking.all(), "WAKING between the resume and the first hashes"
    await until(
        lambda: bool((ph.power_w[sleepers] == [2600.0, P_MAX, P_MIN]).all()), 3, what="targets"
    )
    sim = rig.site.servers.sim
    assert all(sim.counts[int(k), "ResumeMining"] == 1 for k in sleepers)


async def test_latest_command_wins(rig: Rig) -> None:
    await rig.first_polls()
    ph, sim = rig.physics, rig.site.servers.sim
    rows = np.array([4])
    for value in (2000.0, 2600.0, 3000.0, 2250.0):  # without yielding: one slot, last wins
        rig.driver.submit(cmd(rows, np.array([value])))
    await until(lambda: ph.cmd_setpoint_w[4] == 2250.0, 3, what="last value applied")
    await until(lambda: rig.driver.pending == 0, 2, what="drained")
    assert sim.counts[4, "SetPowerTarget"] == 1


# --- authentication: refused credentials fault the miner, lapsed tokens do not ---


async def test_refused_login_is_a_fault_of_that_miner_and_recovers(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rampd.drivers.braiins")
    await until(lambda: rig.driver.adopting == 0, 5, what="miners adopted")
    fleet, drv, sim, k = rig.image, rig.driver, rig.site.servers.sim, 7
    # An operator set a password on the miner, and its API restarted (tokens gone).
    sim.credentials[k] = ("root", "changed")
    sim.forget_tokens(k)
    await until(lambda: fleet.state[k] == DeviceState.FAULT, 5, what="refused -> FAULT")
    faults = [r for r in caplog.records if r.levelno == logging.WARNING and r.args]
    assert len(faults) == 1 and isinstance(faults[0].args[-1], LoginRefused)  # type: ignore[index]
    others = np.setdiff1d(np.arange(20), [k])
    assert (fleet.state[others] == DeviceState.ON).all() and drv.faulted == 1
    rig.driver.submit(cmd(np.array([k]), np.array([2000.0])))  # waits for the miner

    sim.credentials[k] = ("root", "")  # the template's credentials are right again
    await until(lambda: fleet.state[k] == DeviceState.ON, 6, what="recovered")
    await until(lambda: rig.physics.cmd_setpoint_w[k] == 2000.0, 6, what="command delivered")


@pytest.mark.parametrize("rig", [{"token_ttl_s": 1.0}], indirect=True)
async def test_tokens_are_renewed_before_they_lapse(rig: Rig) -> None:
    drv, sim, ph = rig.driver, rig.site.servers.sim, rig.physics
    await until(lambda: drv.adopting == 0, 5, what="miners adopted")
    # A token lives 1 s: the driver logs in again before it lapses, never with an error.
    await until(lambda: all(sim.counts[k, "Login"] >= 3 for k in range(20)), 5, what="renewals")
    drv.submit(cmd(np.arange(20), np.full(20, 2500.0)))
    await until(lambda: bool((ph.cmd_setpoint_w == 2500.0).all()), 3, what="commands")
    assert drv.poll_errors == 0 and drv.command_errors == 0 and drv.faulted == 0
    assert drv.relogins == 0  # renewed ahead, never refused


async def test_a_refused_token_is_replaced_once(rig: Rig) -> None:
    drv, sim, ph = rig.driver, rig.site.servers.sim, rig.physics
    await until(lambda: drv.adopting == 0, 5, what="miners adopted")
    first = drv.token(3)
    sim.forget_tokens(3)  # the miner's API restarted: our token is unknown
    drv.submit(cmd(np.array([3]), np.array([2500.0])))
    await until(lambda: ph.cmd_setpoint_w[3] == 2500.0, 3, what="command after the loss")
    assert drv.relogins == 1 and drv.token(3) not in ("", first)
    assert sim.counts[3, "Login"] == 2
    assert drv.command_errors == 0 and drv.poll_errors == 0  # handled, not an error


# --- faults: isolated per miner, FAULT after two failures, recovery ---


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
    if fault in (Fault.SILENT, Fault.ERROR):  # these never act on a call
        assert ph.cmd_setpoint_w[k] == P_MAX

    ph.set_fault(k, Fault.NONE)
    await until(lambda: fleet.state[k] == DeviceState.ON, 6, what="recovered")
    assert rig.driver.faulted == 0
    await until(lambda: ph.cmd_setpoint_w[k] == 2500.0, 6, what="queued command delivered")


async def test_reboot_loses_target_and_token_and_the_driver_resends(rig: Rig) -> None:
    await rig.first_polls()
    ph, drv, sim, k = rig.physics, rig.driver, rig.site.servers.sim, 6
    drv.submit(cmd(np.array([k]), np.array([2500.0])))
    await until(lambda: ph.cmd_setpoint_w[k] == 2500.0, 3, what="target set")
    logins = drv.logins
    ph.reboot(k)  # back to the default target, tokens gone
    await until(lambda: sim.reboots[k] == 1, 3, what="miner noticed its restart")
    await until(
        lambda: drv.resends >= 1 and ph.cmd_setpoint_w[k] == 2500.0, 5, what="resent after reboot"
    )
    assert drv.logins == logins + 1 and drv.relogins == 1  # the old token was refused
    await until(lambda: ph.power_w[k] == 2500.0, 3, what="back at its target")
    assert rig.image.state[k] == DeviceState.ON and drv.faulted == 0


async def test_reboot_of_a_paused_miner_pauses_it_again(rig: Rig) -> None:
    await rig.first_polls()
    ph, fleet, k = rig.physics, rig.image, 8
    rig.driver.submit(cmd(np.array([k]), np.array([P_IDLE]), sleep=True))
    await until(lambda: fleet.state[k] == DeviceState.SLEEPING, 5, what="asleep")
    ph.reboot(k)  # the physics restarts it mining
    await until(lambda: ph.cmd_run[k] == 1, 2, what="restarted mining")
    await until(lambda: ph.cmd_run[k] == 0, 5, what="paused again")
    await until(lambda: fleet.state[k] == DeviceState.SLEEPING, 5, what="asleep again")


async def test_stuck_miner_becomes_unresponsive_and_recovers(rig: Rig) -> None:
    await rig.first_polls()
    ph, fleet, drv, k = rig.physics, rig.image, rig.driver, 9
    await until(lambda: bool((fleet.state == DeviceState.ON).all()), 5, what="all ON")
    ph.set_fault(k, Fault.STUCK)  # takes targets, the tuner never moves
    drv.submit(cmd(np.array([k, 10]), np.array([2000.0, 2000.0])))
    await until(lambda: fleet.state[k] == DeviceState.UNRESPONSIVE, 8, what="UNRESPONSIVE")
    assert drv.unresponsive == 1 and drv.unverified >= 2 and drv.faulted == 0
    assert ph.cmd_setpoint_w[k] == 2000.0 and ph.power_w[k] == P_MAX  # acknowledged, not moved
    assert fleet.state[10] == DeviceState.ON and ph.power_w[10] == 2000.0

    ph.set_fault(k, Fault.NONE)
    await until(lambda: fleet.state[k] == DeviceState.ON, 15, what="follows again")
    assert drv.unresponsive == 0 and ph.power_w[k] == 2000.0


async def test_channels_reconnect_after_the_miners_api_restarts(rig: Rig) -> None:
    """Every miner's API goes down and comes back (new tokens): the held channels reconnect."""
    ph, fleet, drv, site = rig.physics, rig.image, rig.driver, rig.site
    await until(lambda: drv.adopting == 0, 5, what="miners adopted")
    await site.servers.close()
    await until(lambda: bool((fleet.state == DeviceState.FAULT).all()), 5, what="all FAULT")
    site.servers = await start_braiins_servers(ph, range(20), site.specs)
    await until(lambda: bool((fleet.state == DeviceState.ON).all()), 8, what="all back ON")
    assert drv.relogins == 20  # the new API knew none of the tokens
    drv.submit(cmd(np.arange(20), np.full(20, 2200.0)))
    await until(lambda: bool((ph.cmd_setpoint_w == 2200.0).all()), 3, what="commands")


async def test_channels_are_renewed_after_their_calls_and_the_old_ones_closed() -> None:
    """A held channel is replaced after `channel_max_calls` (h2 keeps every closed stream of
    a connection): polls and commands go on across the renewals with the same tokens, and
    the replaced connections are closed, not left open beside the new ones."""
    site = await start_site(20, token_ttl_s=3600.0)

    def driver(image: ProcessImage, commands: CommandLog) -> BraiinsDriver:
        return BraiinsDriver(
            image.port("braiins"), on_command=commands, readback_every=2, backoff_cap_s=1.0,
            channel_max_calls=4,
        )  # fmt: skip

    async with driving(site, driver) as rig:
        fleet, drv, servers = rig.image, rig.driver, rig.site.servers
        await until(lambda: drv.adopting == 0, 5, what="miners adopted")
        await until(lambda: bool((servers.accepted >= 4).all()), 20, what="channels renewed")
        assert bool((fleet.state == DeviceState.ON).all())
        assert drv.channel_renewals >= 3 * 20
        assert drv.logins == 20 and drv.relogins == 0  # a token outlives its channel
        # Replaced channels are closed once their calls are over: most of them already.
        await until(
            lambda: len(servers.transports) < int(servers.accepted.sum()) // 2,
            10,
            what="old connections closed",
        )
        drv.submit(cmd(np.arange(20), np.full(20, 2300.0)))
        ph = rig.physics
        await until(lambda: bool((ph.cmd_setpoint_w == 2300.0).all()), 3, what="commands")
