"""Stock Antminer firmware over real sockets: simulated miners' web interfaces (digest auth) on
127.x.y.z, pyasic and our driver as clients.

pyasic (a client nobody here wrote) must identify a simulated miner as a stock Antminer
(AntminerModern, BMMinerS21) with its model and move it between modes; the driver must poll,
adopt the miner as a presets-only device that reports no power, set modes with the whole
configuration, verify by mode and hashrate, and isolate faults. Physics is stepped in the
background on the monotonic clock; waits poll a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import numpy as np
import pytest

from controller.config import DeviceAccess, DeviceSpec
from drivers.antminer import web as w
from drivers.antminer.client import AntminerDriver
from drivers.antminer.sim_server import AntminerServers, start_antminer_servers
from drivers.base import Driver, ProtocolError
from drivers.core.capability import Control
from drivers.core.image import ProcessImage
from drivers.core.state import DeviceState
from drivers.sim.physics import Fault, SitePhysics
from tests.helpers import (
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

P_MIN, P_MAX, STEP, P_IDLE = 2625.0, 3500.0, 875.0, 40.0
S21_THS_PER_W = 1 / 17.5
pytestmark = pytest.mark.usefixtures("quiet_pyasic")

MINER: dict[str, Any] = {
    "kind": "antminer-s21-stock",
    "protocol": "antminer",
    "p_min_w": P_MIN,
    "p_max_w": P_MAX,
    "p_idle_w": P_IDLE,
    "step_w": STEP,
    "access": DeviceAccess(model="S21"),
}


def make_specs(net: str, n: int, port: int, **overrides: Any) -> list[DeviceSpec]:
    """S21s on stock firmware (normal and low-power presets), dynamics sped up for tests."""
    return miner_specs(net, n, **(MINER | {"port": port} | overrides))


Site = MinerSite[AntminerServers]


async def start_site(n: int, *, port: int = 0, rpc_port: int | None = None, **kw: Any) -> Site:
    net, free = free_loopback_net(port)
    specs = make_specs(net, n, free, **kw)

    def serve(ph: SitePhysics) -> Awaitable[AntminerServers]:
        return start_antminer_servers(ph, range(n), specs, rpc_port=rpc_port)

    return await start_site_of(specs, serve, seed=5)


def url(spec: DeviceSpec, path: str) -> str:
    return f"http://{spec.host}:{spec.port}{path}"


# --- (a) pyasic identifies and drives a simulated miner ---


async def test_pyasic_identifies_reads_and_switches_modes() -> None:
    import pyasic  # type: ignore[import-untyped]
    from pyasic.config import MiningModeConfig  # type: ignore[import-untyped]
    from pyasic.miners.backends.antminer import AntminerModern  # type: ignore[import-untyped]

    try:  # pyasic probes http://<ip>/ (port 80) and the RPC on 4028
        site = await start_site(1, port=80, rpc_port=w.RPC_PORT)
    except OSError as exc:
        pytest.skip(f"cannot bind port 80 or 4028: {exc}")
    ph, ip, sim = site.physics, site.specs[0].host, site.servers.sim
    try:
        miner = await pyasic.get_miner(ip)
        print(f"pyasic.get_miner({ip!r}) -> {type(miner).__name__}: {miner}")
        assert isinstance(miner, AntminerModern)
        assert type(miner).__name__ == "BMMinerS21"
        assert miner.model == "S21 (Stock)"

        data = await miner.get_data()
        print(
            f"get_data: wattage={data.wattage}, hashrate={data.hashrate}, "
            f"expected={data.expected_hashrate}, fw={data.fw_ver}, mining={data.is_mining}"
        )
        assert float(data.hashrate) == pytest.approx(P_MAX * S21_THS_PER_W, rel=1e-3)
        assert float(data.expected_hashrate) == pytest.approx(P_MAX * S21_THS_PER_W, rel=1e-3)
        assert data.is_mining is True
        # Stock firmware reports no power, and pyasic reads none from it (as on real miners).
        assert data.wattage is None and await miner.get_wattage() is None
        # pyasic 0.79 has no power limit for stock firmware: refused, nothing moves.
        assert await miner.set_power_limit(3000) is False
        assert ph.cmd_setpoint_w[0] == P_MAX and not sim.sets

        assert await miner.stop_mining() is True
        await until(
            lambda: ph.state[0] == DeviceState.SLEEPING and ph.power_w[0] == P_IDLE,
            5,
            what="asleep",
        )
        assert sim.mode(0) == w.Mode.SLEEP and (await miner.get_data()).is_mining is False
        assert await miner.resume_mining() is True
        await until(
            lambda: ph.state[0] == DeviceState.ON and ph.power_w[0] == P_MAX, 5, what="awake"
        )
        # Low power mode through pyasic's config.
        config = await miner.get_config()
        config.mining_mode = MiningModeConfig.low()
        await miner.send_config(config)
        await until(lambda: ph.power_w[0] == P_MIN, 5, what="low power preset")
        # pyasic sent the whole configuration back each time: the pool survived.
        assert [b["miner-mode"] for _, b in sim.sets] == [1, 0, 3]
        assert sim.stored_conf(0)["pools"][0]["user"] == "rampd.miner-00"
    finally:
        await stop_site(site)


# --- (c) the simulator's protocol: digest auth as the firmware's lighttpd does it ---


async def test_digest_auth_as_the_firmware_answers() -> None:
    site = await start_site(1, rpc_port=None)
    spec, sim = site.specs[0], site.servers.sim
    try:
        async with aiohttp.ClientSession() as http:
            # No credentials: 401, a digest challenge naming the antMiner realm, HTML body.
            async with http.get(url(spec, "/")) as resp:
                assert resp.status == 401
                challenge = resp.headers["WWW-Authenticate"]
                assert challenge.startswith('Digest realm="antMiner Configuration"')
                assert 'qop="auth"' in challenge and "algorithm=MD5" in challenge
                with pytest.raises(ValueError):
                    json.loads(await resp.text())
            # Wrong password: answered challenge, still 401.
            bad = aiohttp.DigestAuthMiddleware("root", "toor")
            async with http.get(url(spec, w.STATS), middlewares=(bad,)) as resp:
                assert resp.status == 401
            assert sim.auth_failures[0] == 1
            # Right password: JSON, and later requests authenticate preemptively.
            good = aiohttp.DigestAuthMiddleware("root", "root")
            async with http.get(url(spec, w.SYSTEM_INFO), middlewares=(good,)) as resp:
                assert resp.status == 200
                assert w.parse_system_info(await resp.json()).minertype == "Antminer S21"
            async with http.get(url(spec, "/kaonsu/v1/brief"), middlewares=(good,)) as resp:
                assert resp.status == 404  # no Marathon API here (pyasic checks it is not JSON)
                with pytest.raises(ValueError):
                    json.loads(await resp.text())

            # A nonce from before a reboot is stale: 401 with stale=true, then accepted.
            async with http.get(url(spec, w.GET_CONF)) as resp:
                nonce = w.nonce_of(resp.headers["WWW-Authenticate"])
            header = w.authorization("root", "root", "GET", w.GET_CONF, nonce, 1, "abcdef")
            async with http.get(url(spec, w.GET_CONF), headers={"Authorization": header}) as resp:
                assert resp.status == 200 and w.parse_conf(await resp.json()).mode == w.Mode.NORMAL
            site.physics.reboot(0)
            async with http.get(url(spec, w.GET_CONF), headers={"Authorization": header}) as resp:
                assert resp.status == 401 and "stale=true" in resp.headers["WWW-Authenticate"]
            assert sim.reboots[0] == 1 and sim.auth_failures[0] == 1  # stale is not a failure
            await until(lambda: site.physics.fault[0] == Fault.NONE, 2, what="restart done")

            # A set rewrites the stored configuration from its body: pools left out are lost.
            body = {"miner-mode": 3}
            async with http.post(url(spec, w.SET_CONF), json=body, middlewares=(good,)) as resp:
                w.check_set_reply(await resp.json())
            await until(lambda: site.physics.power_w[0] == P_MIN, 3, what="low power")
            assert sim.stored_conf(0)["pools"][0]["url"] == ""
            async with http.post(
                url(spec, w.SET_CONF), json={"miner-mode": 2}, middlewares=(good,)
            ) as resp:
                with pytest.raises(ProtocolError):
                    w.check_set_reply(await resp.json())
    finally:
        await stop_site(site)


async def test_rpc_answers_like_bmminer() -> None:
    site = await start_site(1, rpc_port=w.RPC_PORT)
    host = site.specs[0].host

    async def rpc(command: str) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(host, w.RPC_PORT)
        writer.write(json.dumps({"command": command}).encode())
        raw = await asyncio.wait_for(reader.read(), 2.0)  # the miner closes after its reply
        writer.close()
        assert raw.endswith(b"\x00")
        reply: dict[str, Any] = json.loads(raw[:-1])
        return reply

    try:
        assert (await rpc("version"))["VERSION"][0]["Type"] == "Antminer S21"
        stats = await rpc("stats")
        assert stats["STATS"][1]["total_rateideal"] == pytest.approx(P_MAX * S21_THS_PER_W * 1e3)
        # Stock bmminer takes no multi-commands (pyasic then sends them one by one).
        assert (await rpc("summary+stats"))["STATUS"][0]["STATUS"] == "E"
    finally:
        await stop_site(site)


# --- (b) the driver against simulated miners ---


Rig = MinerRig[AntminerDriver, AntminerServers]


N = 12


@pytest.fixture
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    opts: dict[str, Any] = getattr(request, "param", {})
    site = await start_site(N, **opts)

    def driver(image: ProcessImage, commands: CommandLog) -> AntminerDriver:
        return AntminerDriver(
            image.port("antminer"),
            on_command=commands,
            summary_every=3,
            config_every=2,
            set_timeout_s=0.5,
            backoff_cap_s=1.0,
        )

    async with driving(site, driver) as rig:
        yield rig


async def test_polls_fill_the_image_and_adoption_reports_presets(rig: Rig) -> None:
    assert isinstance(rig.driver, Driver)
    fleet, drv = rig.image, rig.driver
    await rig.first_polls()
    await until(lambda: bool((fleet.state == DeviceState.ON).all()), 5, what="all ON")
    await until(lambda: drv.adopting == 0, 5, what="adopted")
    # No power from the firmware: the estimate is the normal preset.
    np.testing.assert_array_equal(fleet.measured_w, P_MAX)
    np.testing.assert_allclose(drv.hashrate_ths, P_MAX * S21_THS_PER_W, rtol=1e-3)
    assert drv.models == ["Antminer S21"] * N
    for k in range(N):
        caps = fleet.capabilities[k]
        assert caps is not None and caps.control is Control.PRESETS
        assert caps.presets_w == (P_MIN, P_MAX) and caps.can_sleep and not caps.reports_power
    assert not fleet.reports_power.any()
    np.testing.assert_array_equal(fleet.step_w, STEP)
    t0 = time.monotonic()
    await until(lambda: bool((fleet.measured_at > t0 + 0.5).all()), 3, what="polls go on")
    assert drv.poll_errors == 0 and drv.auth_failures == 0


async def test_run_commands_pick_the_preset_at_or_below(rig: Rig) -> None:
    await rig.first_polls()
    await until(lambda: rig.driver.adopting == 0, 5, what="adopted")
    ph, sim = rig.physics, rig.site.servers.sim
    rows = np.arange(N)
    setpoints = np.random.default_rng(3).uniform(P_MIN, P_MAX, N)
    setpoints[0], setpoints[1], setpoints[2] = P_MAX, P_MIN, 3499.0
    expected = np.where(setpoints >= P_MAX, P_MAX, P_MIN)
    rig.driver.submit(cmd(rows, setpoints))
    await until(lambda: bool((ph.cmd_setpoint_w == expected).all()), 5, what="modes set")
    await until(lambda: bool((rig.image.measured_w == expected).all()), 5, what="estimates follow")
    await until(lambda: bool((ph.power_w == expected).all()), 3, what="power moved")
    assert rig.driver.commands_ok == N and rig.driver.command_errors == 0
    # One set per miner that changed mode (miner 0 already ran normal), the whole
    # configuration sent back: its pools survived, the mode went out as the web UI sends it.
    changed = int((expected != P_MAX).sum())
    assert len(sim.sets) == changed == rig.driver.sets
    for k, body in sim.sets:
        assert body["miner-mode"] == 3 and isinstance(body["pools"], list)
        assert sim.stored_conf(k)["pools"][0]["user"] == f"rampd.{rig.specs[k].name}"
    assert all(
        sim.mode(k) == (w.Mode.NORMAL if expected[k] == P_MAX else w.Mode.LOW) for k in range(N)
    )


async def test_sleep_and_wake(rig: Rig) -> None:
    await rig.first_polls()
    ph, fleet = rig.physics, rig.image
    sleepers = np.array([2, 5, 9])
    rig.driver.submit(cmd(sleepers, np.full(3, P_IDLE), sleep=True))
    await until(
        lambda: bool((fleet.state[sleepers] == DeviceState.SLEEPING).all()), 5, what="asleep"
    )
    assert (ph.cmd_run[sleepers] == 0).all() and (fleet.measured_w[sleepers] == P_IDLE).all()
    others = np.setdiff1d(np.arange(N), sleepers)
    assert (fleet.state[others] == DeviceState.ON).all()

    seen_waking = np.zeros(len(sleepers), dtype=bool)

    def woke() -> bool:
        seen_waking[:] |= fleet.state[sleepers] == DeviceState.WAKING
        return bool((fleet.state[sleepers] == DeviceState.ON).all())

    rig.driver.submit(cmd(sleepers, np.array([3000.0, P_MAX, P_MIN])))
    await until(woke, 5, interval=0.005, what="awake and hashing")
    assert seen_waking.all(), "WAKING between the mode change and the first hashes"
    await until(
        lambda: bool((ph.power_w[sleepers] == [P_MIN, P_MAX, P_MIN]).all()), 3, what="presets"
    )
    await until(lambda: rig.driver.unverified == 0 and rig.driver.unresponsive == 0, 1)


async def test_latest_command_wins(rig: Rig) -> None:
    await rig.first_polls()
    ph, sim = rig.physics, rig.site.servers.sim
    rows = np.array([4])
    for value in (P_MIN, P_MAX, P_IDLE, 2700.0):  # without yielding: one slot, the last wins
        rig.driver.submit(cmd(rows, np.array([value]), sleep=value == P_IDLE))
    await until(lambda: ph.cmd_setpoint_w[4] == P_MIN, 3, what="last value applied")
    await until(lambda: rig.driver.pending == 0, 2, what="drained")
    assert [k for k, _ in sim.sets] == [4] and ph.cmd_run[4] == 1


@pytest.mark.parametrize("fault", [Fault.SILENT, Fault.ERROR, Fault.GARBAGE, Fault.SLOW])
async def test_fault_is_isolated_and_recovers(rig: Rig, fault: Fault) -> None:
    await rig.first_polls()
    ph, fleet, k = rig.physics, rig.image, 3
    others = np.setdiff1d(np.arange(N), [k])
    await until(lambda: bool((fleet.state == DeviceState.ON).all()), 5, what="all ON")
    ph.set_fault(k, fault)
    await until(lambda: fleet.state[k] == DeviceState.FAULT, 5, what=f"{fault.name} -> FAULT")
    assert rig.driver.faulted == 1
    t0 = time.monotonic()
    await until(
        lambda: bool((fleet.measured_at[others] > t0 + 0.6).all()), 3, what="others on cadence"
    )
    assert (fleet.state[others] == DeviceState.ON).all()
    rig.driver.submit(cmd(np.array([k, 7]), np.array([P_MIN, P_MIN])))
    await until(lambda: ph.cmd_setpoint_w[7] == P_MIN, 3, what="healthy miner commanded")
    assert ph.cmd_setpoint_w[k] == P_MAX

    ph.set_fault(k, Fault.NONE)
    await until(lambda: fleet.state[k] == DeviceState.ON, 6, what="recovered")
    assert rig.driver.faulted == 0
    await until(lambda: ph.cmd_setpoint_w[k] == P_MIN, 6, what="queued command delivered")


async def test_wrong_password_is_a_fault_of_that_miner_only(rig: Rig) -> None:
    await rig.first_polls()
    fleet, sim, k = rig.image, rig.site.servers.sim, 6
    sim.credentials = tuple(
        ("root", "changed") if j == k else c for j, c in enumerate(sim.credentials)
    )
    await until(lambda: fleet.state[k] == DeviceState.FAULT, 5, what="auth failure -> FAULT")
    assert rig.driver.auth_failures >= 2 and sim.auth_failures[k] >= 2
    others = np.setdiff1d(np.arange(N), [k])
    assert (fleet.state[others] == DeviceState.ON).all() and rig.driver.faulted == 1
    sim.credentials = tuple(("root", "root") for _ in sim.credentials)  # password restored
    await until(lambda: fleet.state[k] == DeviceState.ON, 6, what="recovered")


async def test_reboot_loses_the_mode_and_the_driver_resends(rig: Rig) -> None:
    await rig.first_polls()
    ph, drv, sim, k = rig.physics, rig.driver, rig.site.servers.sim, 8
    drv.submit(cmd(np.array([k]), np.array([P_MIN])))
    await until(lambda: ph.cmd_setpoint_w[k] == P_MIN, 3, what="low power set")
    # Past the command's verification (dead time, ramp, two polls): only the readback of the
    # stored mode can notice what the reboot undoes.
    t0 = time.monotonic()
    await until(lambda: rig.image.measured_at[k] > t0 + 1.5, 3, what="verified")
    ph.reboot(k)  # back to normal mode; its nonces are stale now
    await until(lambda: sim.reboots[k] == 1, 3, what="miner noticed its restart")
    await until(
        lambda: drv.resends >= 1 and ph.cmd_setpoint_w[k] == P_MIN, 5, what="resent after reboot"
    )
    await until(lambda: ph.power_w[k] == P_MIN, 3, what="back at low power")
    # The stale nonce was answered inside the digest exchange: nothing failed.
    assert drv.unverified == 0 and drv.poll_errors == 0 and drv.command_errors == 0
    assert drv.auth_failures == 0


async def test_stuck_miner_becomes_unresponsive_and_recovers(rig: Rig) -> None:
    await rig.first_polls()
    await until(lambda: rig.driver.adopting == 0, 5, what="adopted")
    ph, fleet, drv, k = rig.physics, rig.image, rig.driver, 10
    ph.set_fault(k, Fault.STUCK)  # takes the mode, keeps hashing at normal
    drv.submit(cmd(np.array([k]), np.array([P_MIN])))
    await until(lambda: fleet.state[k] == DeviceState.UNRESPONSIVE, 8, what="UNRESPONSIVE")
    sets = [j for j, _ in rig.site.servers.sim.sets]
    assert sets.count(k) >= 2, "the set went out again before the verdict"
    assert drv.unresponsive == 1 and drv.unverified >= 2
    others = np.setdiff1d(np.arange(N), [k])
    assert (fleet.state[others] == DeviceState.ON).all()
    ph.set_fault(k, Fault.NONE)
    await until(lambda: fleet.state[k] == DeviceState.ON, 12, what="follows again")
    assert drv.unresponsive == 0 and ph.power_w[k] == P_MIN
