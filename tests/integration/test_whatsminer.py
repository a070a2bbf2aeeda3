"""Whatsminer API v2 over real sockets: simulated miners on 127.x.y.z:4028, pyasic and our
driver as clients.

pyasic (a client nobody here wrote) must identify a simulated miner as a Whatsminer with its
model, read its power and move it with its own token and AES code; the driver must poll, adopt
(capabilities through the port), set power percents, sleep and wake, handle tokens, and isolate
faults; the simulator must answer handshake failures as the firmware does. Physics is stepped in
the background on the monotonic clock; waits poll a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from controller.config import DeviceAccess, DeviceSpec
from drivers.base import Driver
from drivers.cgminer.client import exchange
from drivers.core.capability import Control
from drivers.core.image import ProcessImage
from drivers.core.state import DeviceState
from drivers.sim.physics import Fault, SitePhysics
from drivers.whatsminer import crypto
from drivers.whatsminer import messages as m
from drivers.whatsminer.client import WhatsminerDriver
from drivers.whatsminer.sim_server import WhatsminerServers, start_whatsminer_servers
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

P_MAX, P_MIN, P_IDLE = 3441.0, 1720.0, 15.0  # M60S template
STEP = P_MAX / 100
M60S_THS_PER_W = 1 / 18.5
pytestmark = pytest.mark.usefixtures("quiet_pyasic")

MINER: dict[str, Any] = {
    "kind": "whatsminer-m60s",
    "protocol": "whatsminer",
    "port": m.PORT,
    "p_min_w": P_MIN,
    "p_max_w": P_MAX,
    "p_idle_w": P_IDLE,
    "step_w": STEP,
    "access": DeviceAccess(model="M60S_VK30", password="s3cret"),
}


def make_specs(net: str, n: int, **overrides: Any) -> list[DeviceSpec]:
    """M60S-like miners, with dynamics sped up so tests take seconds."""
    return miner_specs(net, n, name="wm", **(MINER | overrides))


def pct_of(power_w: float) -> int:
    """The percent a RUN at `power_w` should send: the whole percent at or below, but not
    below the one that reaches p_min."""
    return max(math.floor(power_w / P_MAX * 100 + 1e-6), math.ceil(P_MIN / P_MAX * 100 - 1e-9))


def pct_w(power_w: float) -> float:
    """Where set_power_pct puts a RUN at `power_w`."""
    return pct_of(power_w) / 100 * P_MAX


Site = MinerSite[WhatsminerServers]


async def start_site(n: int, sim: dict[str, Any] | None = None, **overrides: Any) -> Site:
    specs = make_specs(free_loopback_net(m.PORT)[0], n, **overrides)

    def serve(ph: SitePhysics) -> Awaitable[WhatsminerServers]:
        return start_whatsminer_servers(ph, range(n), specs, **(sim or {}))

    return await start_site_of(specs, serve, seed=5)


# --- (a) pyasic identifies and drives a simulated miner ---


@pytest.mark.parametrize(
    ("model", "p_max", "cls_name", "pyasic_model"),
    [
        ("M60S_VK30", 3441.0, "BTMinerM60SVK30", "M60S VK30"),
        ("M50S_VH30", 3276.0, "BTMinerM50SVH30", "M50S VH30"),
    ],
)
async def test_pyasic_identifies_reads_and_controls(
    model: str, p_max: float, cls_name: str, pyasic_model: str
) -> None:
    import pyasic  # type: ignore[import-untyped]
    from pyasic.miners.backends.btminer import BTMinerV2  # type: ignore[import-untyped]

    # pyasic's default password for the privileged API is "admin".
    site = await start_site(1, p_max_w=p_max, step_w=p_max / 100, access=DeviceAccess(model=model))
    ph, ip, sim = site.physics, site.specs[0].host, site.servers.sim
    try:
        miner = await pyasic.get_miner(ip)
        print(f"pyasic.get_miner({ip!r}) -> {type(miner).__name__}: {miner}")
        assert isinstance(miner, BTMinerV2)
        assert type(miner).__name__ == cls_name
        assert miner.model == f"{pyasic_model} (Stock)"

        data = await miner.get_data()
        print(f"get_data: wattage={data.wattage} W, limit={data.wattage_limit} W, fw={data.fw_ver}")
        assert data.wattage == round(float(ph.reported_w[0]))  # noise 0: exact
        assert data.wattage_limit == p_max and data.is_mining
        assert await miner.get_wattage() == round(float(ph.reported_w[0]))

        # The fast path our driver uses, through pyasic's own token and AES code.
        reply = await miner.rpc.set_power_pct(60)
        assert reply["Msg"] == m.MSG_OK
        assert ph.cmd_setpoint_w[0] == pytest.approx(0.6 * p_max)
        await until(lambda: ph.power_w[0] < 0.61 * p_max, 5, what="power at 60 %")

        # pyasic's set_power_limit is adjust_power_limit (a real miner restarts for it).
        assert await miner.set_power_limit(3000) is True
        assert ph.cmd_setpoint_w[0] == pytest.approx(min(0.6 * p_max, 3000.0))
        assert sim.limit_w[0] == 3000.0
        assert await miner.get_wattage_limit() == 3000

        assert await miner.stop_mining() is True
        await until(
            lambda: ph.state[0] == DeviceState.SLEEPING and ph.power_w[0] == P_IDLE,
            5,
            what="asleep",
        )
        assert await miner.get_wattage() == round(P_IDLE)
        assert await miner.is_mining() is False

        assert await miner.resume_mining() is True
        await until(lambda: ph.state[0] == DeviceState.ON, 5, what="awake")
        assert await miner.is_mining() is True
        # pyasic keeps one token for all of that (30 minutes): the firmware takes it again.
        assert sim.counts[0, "get_token"] == 1
    finally:
        await stop_site(site)


# --- (c) the simulator's protocol details ---


async def _send(host: str, payload: bytes | dict[str, Any]) -> m.Json:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return await exchange(host, m.PORT, raw, 1.0)


def refusal(reply: m.Json) -> m.CommandError:
    """The refusal `reply` carries (its CommandError subclass says which kind)."""
    try:
        m.check(reply, "x")
    except m.CommandError as exc:
        return exc
    raise AssertionError(f"not refused: {reply}")


async def test_handshake_and_its_failure_answers() -> None:
    site = await start_site(1, sim={"max_tokens": 4})
    host, sim, ph = site.specs[0].host, site.servers.sim, site.physics
    try:
        # A real exchange: the miner closes after one reply.
        reader, writer = await asyncio.open_connection(host, m.PORT)
        writer.write(m.encode_command("devdetails"))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 2.0)
        writer.close()
        assert m.parse_devdetails(m.decode_object(raw)) == ["M60S_VK30"] * 3
        assert "btminer" in raw.decode() and "bitmicro" in raw.decode()

        info = m.parse_token(await _send(host, m.encode_command("get_token")))
        assert len(info.salt) == 8 and len(info.newsalt) == 8 and len(info.time_s) == 4
        token = crypto.Token.derive("s3cret", info.salt, info.time_s, info.newsalt)

        # Success is encrypted; the same token works again (pyasic relies on it).
        for pct in ("70", "80"):
            reply = await _send(host, m.encode_privileged(token, "set_power_pct", percent=pct))
            assert set(reply) == {"enc"}
            opened = m.check(m.open_reply(reply, token.key), "set_power_pct")
            assert opened["Code"] == m.Code.OK and opened["Msg"] == m.MSG_OK
        assert ph.cmd_setpoint_w[0] == pytest.approx(0.8 * P_MAX)

        # A command out of range is refused, encrypted.
        bad = await _send(host, m.encode_privileged(token, "set_power_pct", percent="101"))
        assert "enc" in bad
        assert refusal(m.open_reply(bad, token.key)).code == m.Code.COMMAND_ERROR

        # Wrong admin password: the miner cannot decrypt; a plain answer says so.
        wrong = crypto.Token.derive("admin", info.salt, info.time_s, info.newsalt)
        reply = await _send(host, m.encode_privileged(wrong, "power_off", respbefore="true"))
        assert "enc" not in reply and reply["STATUS"] == "E"
        assert isinstance(refusal(m.open_reply(reply, wrong.key)), m.CryptFailure)
        assert ph.cmd_run[0] == 1

        # A sign the miner never handed out; then an expired one.
        forged = crypto.Token("AAAAAAAAAAAAAAAAAAAAAA", token.key)
        exc = refusal(await _send(host, m.encode_privileged(forged, "power_off")))
        assert isinstance(exc, m.TokenError)
        assert exc.code == m.Code.TOKEN_CHECK and exc.msg == m.MSG_TOKEN_INVALID
        sim.tokens[0][token.sign] -= sim.token_ttl_s + 1  # 30 minutes later
        exc = refusal(await _send(host, m.encode_privileged(token, "power_off")))
        assert isinstance(exc, m.TokenError) and exc.msg == m.MSG_TOKEN_EXPIRED
        assert ph.cmd_run[0] == 1  # nothing refused was done

        # Unknown commands, plain and privileged; a write command in the clear.
        exc = refusal(await _send(host, m.encode_command("bogus")))
        assert exc.code == m.Code.INVALID_COMMAND and exc.msg == m.MSG_INVALID_COMMAND
        info = m.parse_token(await _send(host, m.encode_command("get_token")))
        token = crypto.Token.derive("s3cret", info.salt, info.time_s, info.newsalt)
        reply = await _send(host, m.encode_privileged(token, "bogus"))
        assert refusal(m.open_reply(reply, token.key)).code == m.Code.INVALID_COMMAND
        exc = refusal(await _send(host, {"cmd": "power_off"}))
        assert exc.code == m.Code.PERMISSION_DENIED

        # Framing failures: not base64, not JSON.
        exc = refusal(await _send(host, {"enc": 1, "data": "%%% not base64"}))
        assert isinstance(exc, m.CryptFailure) and exc.code == m.Code.BASE64
        assert refusal(await _send(host, b"{not json}")).code == m.Code.INVALID_JSON

        # Tokens are rationed: past max_tokens alive, get_token answers 136.
        for _ in range(sim.max_tokens - len(sim.tokens[0])):
            m.parse_token(await _send(host, m.encode_command("get_token")))
        assert refusal(await _send(host, m.encode_command("get_token"))).code == m.Code.TOKEN_MAX

        # cgminer-style multi-commands for the read commands.
        parts = m.split_multi(
            await _send(host, m.encode_command("summary+devs")), ["summary", "devs"]
        )
        assert m.parse_summary(parts["summary"]).power_w == round(float(ph.reported_w[0]))
        assert m.check(parts["devs"], "devs")[m.DEVS]
    finally:
        await stop_site(site)


def test_md5_crypt_matches_an_independent_implementation() -> None:
    """Our md5-crypt against passlib's (pyasic's dependency): the key derivation rests on it."""
    from passlib.hash import md5_crypt  # type: ignore[import-untyped]

    for pw in ("admin", "", "s3cret", "päss", "x" * 40):
        for salt in ("BQ5hoXV9", "ab", "saltsalt1234"):
            assert crypto.md5_crypt(pw, salt) == md5_crypt.using(salt=salt[:8]).hash(pw)


# --- (b) the driver against 20 simulated miners ---


Rig = MinerRig[WhatsminerDriver, WhatsminerServers]


@pytest.fixture
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    opts: dict[str, Any] = getattr(request, "param", {})
    site = await start_site(20, sim=opts.get("sim"), **opts.get("spec", {}))
    driver_specs = [replace(s, **opts.get("driver_spec", {})) for s in site.specs]

    def driver(image: ProcessImage, commands: CommandLog) -> WhatsminerDriver:
        return WhatsminerDriver(
            image.port("whatsminer"), on_command=commands, status_every=3, backoff_cap_s=1.0
        )

    async with driving(site, driver, driver_specs) as rig:
        yield rig


async def test_polls_fill_the_image_and_adoption_reports_capabilities(rig: Rig) -> None:
    assert isinstance(rig.driver, Driver)
    await rig.first_polls()
    ph, fleet, drv, sim = rig.physics, rig.image, rig.driver, rig.site.servers.sim
    await until(lambda: bool((fleet.state == DeviceState.ON).all()), 5, what="all ON")
    np.testing.assert_allclose(fleet.measured_w, ph.reported_w, atol=1.0)
    await until(lambda: bool(np.isfinite(drv.hashrate_ths).all()), 5, what="hashrates")
    np.testing.assert_allclose(drv.hashrate_ths, P_MAX * M60S_THS_PER_W, rtol=1e-3)
    await until(lambda: drv.adopting == 0, 5, what="miners adopted")
    for caps in fleet.capabilities:
        assert caps is not None and caps.control is Control.CONTINUOUS
        assert (caps.p_min_w, caps.p_max_w) == (P_MIN, P_MAX)
        assert caps.step_w == pytest.approx(STEP)
        assert caps.can_sleep and caps.reports_power
    n = len(rig.specs)
    assert all(sim.counts[k, "get_token"] == 1 for k in range(n)) and drv.tokens == n
    # Polls go on, on cadence (poll_s 0.3 s).
    t0 = time.monotonic()
    await until(lambda: bool((fleet.measured_at > t0 + 0.5).all()), 3, what="polls go on")

    # A power limit set by another tool (pyasic's set_power_limit) lowers p_max.
    sim.limit_w[4] = 3000.0
    await until(
        lambda: fleet.capabilities[4] is not None and fleet.capabilities[4].p_max_w == 3000.0,
        3,
        what="new p_max",
    )
    assert fleet.p_max_w[4] == 3000.0


async def test_run_commands_set_the_percent_in_one_exchange(rig: Rig) -> None:
    await rig.first_polls()
    ph, drv, sim, n = rig.physics, rig.driver, rig.site.servers.sim, len(rig.specs)
    await until(lambda: drv.adopting == 0, 5, what="miners adopted")
    before = sim.counts.copy()
    setpoints = np.random.default_rng(7).uniform(P_MIN, P_MAX, n)
    setpoints[0], setpoints[1] = P_MAX, P_MIN
    drv.submit(cmd(np.arange(n), setpoints))
    expected = np.array([pct_w(s) for s in setpoints])
    await until(lambda: drv.commands_ok == n, 5, what="all acknowledged")
    np.testing.assert_allclose(ph.cmd_setpoint_w, expected)
    assert all(sim.pct[k] == pct_of(setpoints[k]) for k in range(n))
    await until(
        lambda: bool(np.allclose(rig.image.measured_w, expected, atol=1.0)), 5, what="measured"
    )
    # One exchange per miner: the token held since adoption, no power_on for running miners.
    for k in range(n):
        assert sim.counts[k, "set_power_pct"] - before[k, "set_power_pct"] == 1
        for c in ("get_token", "power_on", "adjust_power_limit"):
            assert sim.counts[k, c] == before[k, c], c
    assert drv.command_errors == 0 and len(rig.commands) == n
    assert all(ok and name == "whatsminer" for name, _, ok in rig.commands)


async def test_sleep_and_wake(rig: Rig) -> None:
    await rig.first_polls()
    ph, fleet, sim = rig.physics, rig.image, rig.site.servers.sim
    sleepers = np.array([2, 5, 11])
    rig.driver.submit(cmd(sleepers, np.full(3, P_IDLE), sleep=True))
    await until(
        lambda: bool((fleet.state[sleepers] == DeviceState.SLEEPING).all()), 5, what="asleep"
    )
    assert (ph.cmd_run[sleepers] == 0).all()
    np.testing.assert_allclose(fleet.measured_w[sleepers], P_IDLE, atol=1.0)
    assert all(sim.counts[k, "power_off"] == 1 for k in sleepers)
    others = np.setdiff1d(np.arange(len(rig.specs)), sleepers)
    assert (fleet.state[others] == DeviceState.ON).all()

    seen_waking = np.zeros(len(sleepers), dtype=bool)

    def woke() -> bool:
        seen_waking[:] |= fleet.state[sleepers] == DeviceState.WAKING
        return bool((fleet.state[sleepers] == DeviceState.ON).all())

    targets = np.array([2600.0, P_MAX, P_MIN])
    rig.driver.submit(cmd(sleepers, targets))
    await until(woke, 5, interval=0.005, what="awake and hashing")
    assert seen_waking.all(), "WAKING between power_on and the first hashes"
    expected = [pct_w(t) for t in targets]
    await until(lambda: bool(np.allclose(ph.power_w[sleepers], expected)), 3, what="powers")
    assert all(sim.counts[k, "power_on"] == 1 for k in sleepers)


async def test_latest_command_wins(rig: Rig) -> None:
    await rig.first_polls()
    ph, sim = rig.physics, rig.site.servers.sim
    rows = np.array([4])
    for value in (2000.0, 2600.0, 3000.0, 2250.0):  # without yielding: one slot, last wins
        rig.driver.submit(cmd(rows, np.array([value])))
    await until(lambda: ph.cmd_setpoint_w[4] == pytest.approx(pct_w(2250.0)), 3, what="last")
    await until(lambda: rig.driver.pending == 0, 2, what="drained")
    assert sim.counts[4, "set_power_pct"] == 1


@pytest.mark.parametrize("fault", [Fault.SILENT, Fault.ERROR, Fault.GARBAGE, Fault.SLOW])
async def test_fault_is_isolated_and_recovers(rig: Rig, fault: Fault) -> None:
    await rig.first_polls()
    ph, fleet, k = rig.physics, rig.image, 3
    others = np.setdiff1d(np.arange(len(rig.specs)), [k])
    await until(lambda: bool((fleet.state == DeviceState.ON).all()), 5, what="all ON")
    ph.set_fault(k, fault)
    await until(lambda: fleet.state[k] == DeviceState.FAULT, 5, what=f"{fault.name} -> FAULT")
    assert rig.driver.faulted == 1
    t0 = time.monotonic()
    await until(
        lambda: bool((fleet.measured_at[others] > t0 + 0.6).all()), 3, what="others on cadence"
    )
    assert (fleet.state[others] == DeviceState.ON).all()
    rig.driver.submit(cmd(np.array([k, 7]), np.array([2500.0, 2500.0])))
    await until(lambda: ph.cmd_setpoint_w[7] == pytest.approx(pct_w(2500.0)), 3, what="healthy")
    assert ph.cmd_setpoint_w[k] == pytest.approx(P_MAX)

    ph.set_fault(k, Fault.NONE)
    await until(lambda: fleet.state[k] == DeviceState.ON, 6, what="recovered")
    assert rig.driver.faulted == 0
    await until(lambda: ph.cmd_setpoint_w[k] == pytest.approx(pct_w(2500.0)), 6, what="delivered")


async def _up_for(sim: Any, k: int, seconds: float) -> None:
    """Until miner k's btminer has run `seconds` (a restart shows as its uptime going back)."""
    await until(lambda: time.monotonic() - sim.boot_t[k] > seconds, seconds + 3, what="uptime")


async def test_reboot_forgets_the_percent_and_the_driver_resends(rig: Rig) -> None:
    await rig.first_polls()
    ph, drv, sim, k = rig.physics, rig.driver, rig.site.servers.sim, 6
    drv.submit(cmd(np.array([k]), np.array([2500.0])))
    await until(lambda: ph.cmd_setpoint_w[k] == pytest.approx(pct_w(2500.0)), 3, what="set")
    await _up_for(sim, k, 3.0)  # a restart within 2.5 s of boot may pass unseen
    tokens = drv.tokens
    ph.reboot(k)  # back to 100 %, tokens gone
    await until(lambda: sim.reboots[k] == 1, 3, what="miner noticed its restart")
    await until(
        lambda: drv.resends >= 1 and ph.cmd_setpoint_w[k] == pytest.approx(pct_w(2500.0)),
        5,
        what="resent after reboot",
    )
    assert drv.tokens == tokens + 1  # the restarted miner's tokens were gone: a new one
    await until(lambda: ph.power_w[k] == pytest.approx(pct_w(2500.0)), 3, what="back")
    assert rig.image.state[k] == DeviceState.ON and drv.command_errors == 0


async def test_reboot_of_a_sleeping_miner_puts_it_back_to_sleep(rig: Rig) -> None:
    await rig.first_polls()
    ph, fleet, k = rig.physics, rig.image, 8
    rig.driver.submit(cmd(np.array([k]), np.array([P_IDLE]), sleep=True))
    await until(lambda: fleet.state[k] == DeviceState.SLEEPING, 5, what="asleep")
    ph.reboot(k)  # the physics restarts it mining
    await until(lambda: ph.cmd_run[k] == 1, 2, what="restarted mining")
    await until(lambda: ph.cmd_run[k] == 0, 5, what="powered off again")
    await until(lambda: fleet.state[k] == DeviceState.SLEEPING, 5, what="asleep again")


async def test_stuck_miner_becomes_unresponsive_and_recovers(rig: Rig) -> None:
    await rig.first_polls()
    ph, fleet, drv, k = rig.physics, rig.image, rig.driver, 9
    await until(lambda: drv.adopting == 0, 5, what="miners adopted")
    ph.set_fault(k, Fault.STUCK)  # takes commands, reads them back, does not move
    drv.submit(cmd(np.array([k, 10]), np.array([2000.0, 2000.0])))
    await until(lambda: fleet.state[k] == DeviceState.UNRESPONSIVE, 8, what="UNRESPONSIVE")
    assert drv.unresponsive == 1 and fleet.state[10] == DeviceState.ON
    assert ph.cmd_setpoint_w[k] == pytest.approx(pct_w(2000.0))  # acknowledged...
    assert ph.power_w[k] == pytest.approx(P_MAX)  # ...not acted on

    ph.set_fault(k, Fault.NONE)
    drv.submit(cmd(np.array([k]), np.array([2200.0])))
    await until(lambda: fleet.state[k] == DeviceState.ON, 8, what="follows again")
    assert drv.unresponsive == 0
    await until(lambda: ph.power_w[k] == pytest.approx(pct_w(2200.0)), 3, what="moved")


# --- (c) token handshake failures, through the driver ---


async def test_token_the_miner_forgot_is_replaced_and_the_command_retried(rig: Rig) -> None:
    await rig.first_polls()
    ph, drv, sim, k = rig.physics, rig.driver, rig.site.servers.sim, 12
    await until(lambda: drv.adopting == 0, 5, what="miners adopted")
    sim.tokens[k].clear()  # e.g. btminer restarted its API: the held token is unknown now
    drv.submit(cmd(np.array([k]), np.array([2400.0])))
    await until(lambda: ph.cmd_setpoint_w[k] == pytest.approx(pct_w(2400.0)), 3, what="applied")
    assert sim.counts[k, f"!{int(m.Code.TOKEN_CHECK)}"] == 1  # refused once...
    assert sim.counts[k, "get_token"] == 2  # ...a new token, and the retry took it
    assert drv.command_errors == 0 and not drv.single_use_tokens(k)

    sim.tokens[k] = {s: t - sim.token_ttl_s - 1 for s, t in sim.tokens[k].items()}  # expired
    drv.submit(cmd(np.array([k]), np.array([2800.0])))
    await until(lambda: ph.cmd_setpoint_w[k] == pytest.approx(pct_w(2800.0)), 3, what="again")
    assert sim.counts[k, f"!{int(m.Code.TOKEN_CHECK)}"] == 2 and drv.command_errors == 0


def _setpoint_is(ph: SitePhysics, k: int, want_w: float) -> Callable[[], bool]:
    return lambda: bool(ph.cmd_setpoint_w[k] == pytest.approx(want_w))


@pytest.mark.parametrize("rig", [{"sim": {"single_use_tokens": True}}], indirect=True)
async def test_single_use_token_firmware_is_learned(rig: Rig) -> None:
    await rig.first_polls()
    ph, drv, sim, k = rig.physics, rig.driver, rig.site.servers.sim, 1
    await until(lambda: drv.adopting == 0, 5, what="miners adopted")
    for value in (2000.0, 2500.0, 3000.0):
        drv.submit(cmd(np.array([k]), np.array([value])))
        await until(_setpoint_is(ph, k, pct_w(value)), 3, what="set")
        # A poll fetches the next token, so the next command is one exchange again.
        await until(lambda: drv.holds_token(k), 3, what="token ahead")
    assert drv.single_use_tokens(k) and drv.command_errors == 0
    assert sim.counts[k, f"!{int(m.Code.TOKEN_CHECK)}"] == 1  # learned at the second command


@pytest.mark.parametrize(
    "rig", [{"driver_spec": {"access": DeviceAccess(model="M60S_VK30")}}], indirect=True
)
async def test_wrong_password_is_refused(rig: Rig) -> None:
    """The driver holds the factory password, the miners another one: commands are refused
    (the miner cannot decrypt them), nothing moves, the other miners go on."""
    await rig.first_polls()
    ph, drv, fleet = rig.physics, rig.driver, rig.image
    await until(lambda: drv.adopting == 0, 5, what="adopted: get_token needs no password")
    drv.submit(cmd(np.array([0]), np.array([2000.0])))
    await until(lambda: drv.command_errors >= 3, 8, what="refused, retried")
    assert ph.cmd_setpoint_w[0] == pytest.approx(P_MAX)
    assert rig.site.servers.sim.counts[0, f"!{int(m.Code.INVALID_JSON)}"] >= 3
    assert fleet.state[5] == DeviceState.ON and drv.commands_ok == 0
