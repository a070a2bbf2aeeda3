"""Redfish end to end over real sockets: simulated BMCs, DMTF's client and validator, our driver.

Every rack's BMC listens on its own loopback address (127.x.y.z needs no setup on Linux). The
physics is stepped in the background at 50 Hz; waits poll a condition against a deadline, and
bounds are generous because timing is not under test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redfish  # type: ignore[import-untyped]

from controller.config import DeviceSpec, load_config
from drivers.base import Driver
from drivers.core.image import ProcessImage
from drivers.core.state import DeviceState
from drivers.redfish import resources as rf
from drivers.redfish.client import RedfishDriver
from drivers.redfish.resources import Mechanism
from drivers.redfish.sim_server import Bmc, RedfishServers, start_redfish_servers
from drivers.sim.physics import Fault, SitePhysics
from tests.helpers import (
    SIM_DT,
    CommandLog,
    DriverRig,
    cancel_and_wait,
    cmd,
    free_loopback_net,
    log_records,
    step_forever,
    tls_material,
    until,
)

P = rf.chassis_paths("1")
USER, PASSWORD = "admin", "rampd-sim"  # the shipped template's simulator credentials


def gpu_specs(tmp_path: Path, n: int, **overrides: Any) -> list[DeviceSpec]:
    """n racks from the shipped gpu-rack-redfish template, through the real config loader."""
    net, port = free_loopback_net()
    site = tmp_path / f"site-{net}.toml"
    site.write_text(
        'site_id = "t"\n[site]\nmax_kw = 10000.0\n'
        f'[meter]\nhost = "{net}.250"\nport = {port}\n'
        f'[[devices]]\nname = "gpu"\ntemplate = "gpu-rack-redfish"\ncount = {n}\n'
        f'address = "{net}.1"\n'
        f"overrides = {{ port = {port}, poll_s = 0.2, timeout_s = 0.5, dead_time_s = 0.1 }}\n"
    )
    specs = list(load_config(site).devices)
    return [replace(s, **overrides) for s in specs] if overrides else specs


def with_access(spec: DeviceSpec, **kw: Any) -> DeviceSpec:
    return replace(spec, access=spec.access.model_copy(update=kw))


@dataclass
class Rig(DriverRig[RedfishDriver]):
    servers: list[RedfishServers]
    driver_task: asyncio.Task[None]

    def bmc(self, i: int) -> Bmc:
        return next(s.bmcs[i] for s in self.servers if i in s.bmcs)

    def state(self, i: int) -> DeviceState:
        return DeviceState(int(self.image.state[i]))


@asynccontextmanager
async def rig(
    specs: list[DeviceSpec],
    *,
    legacy: Sequence[int] = (),
    ssl_context: ssl.SSLContext | None = None,
    demand_frac: float = 0.8,
    driver_specs: list[DeviceSpec] | None = None,
    **driver_kw: Any,
) -> AsyncIterator[Rig]:
    """Simulated BMCs for `specs` (legacy ones without PowerLimitWatts) and a running driver
    (configured with `driver_specs`, default the same)."""
    n = len(specs)
    ph = SitePhysics(specs, 0.0, seed=1, dt_s=SIM_DT)
    ph.set_demand(np.arange(n), ph.p_max_w * demand_frac)  # pinned: caps are what moves power
    for _ in range(round(2.0 / SIM_DT)):  # settle at that demand before anything is measured
        ph.step(SIM_DT)
    servers: list[RedfishServers] = []
    modern = [i for i in range(n) if i not in legacy]
    try:
        for idx, legacy_only in ((modern, False), (list(legacy), True)):
            if idx:
                sub = [specs[i] for i in idx]
                servers.append(
                    await start_redfish_servers(
                        ph, idx, sub, ssl_context=ssl_context, legacy_only=legacy_only
                    )
                )
        fleet = ProcessImage(driver_specs or specs)
        commands = CommandLog()
        driver = RedfishDriver(
            fleet.port("redfish"),
            on_command=commands,
            backoff_cap_s=1.0,
            **driver_kw,
        )
        stepper = asyncio.create_task(step_forever(ph))
        task = asyncio.create_task(driver.run())
        try:
            yield Rig(specs, ph, fleet, driver, commands, servers, task)
        finally:
            await cancel_and_wait(task, stepper)
    finally:
        for s in servers:
            await s.close()


# --- (a) a Redfish client nobody here wrote: DMTF's python-redfish-library ---


async def test_dmtf_client_reads_and_caps_a_simulated_rack(tmp_path: Path) -> None:
    specs = gpu_specs(tmp_path, 1)
    ph = SitePhysics(specs, 0.0, seed=3, dt_s=SIM_DT)
    demand = 60_000.0
    ph.set_demand(0, demand)
    servers = await start_redfish_servers(ph, [0], specs)
    stepper = asyncio.create_task(step_forever(ph))
    bmc, url = servers.bmcs[0], servers.url(0)
    noise = 6 * specs[0].noise_w
    try:
        await until(lambda: abs(ph.power_w[0] - demand) < 1.0, 5.0, what="at demand")
        # The library is synchronous (requests): it runs in a thread, the BMC on this loop.
        client = await asyncio.to_thread(
            redfish.redfish_client, base_url=url, username=USER, password=PASSWORD, timeout=5
        )
        await asyncio.to_thread(client.login, auth="session")
        assert len(bmc.sessions) == 1
        env = await asyncio.to_thread(client.get, P.environment_metrics)
        assert env.status == 200
        print(
            "DMTF client GET EnvironmentMetrics:",
            env.dict["PowerWatts"],
            env.dict["PowerLimitWatts"],
        )
        assert env.dict["PowerWatts"]["Reading"] == pytest.approx(demand, abs=noise)
        assert env.dict["PowerLimitWatts"]["AllowableMin"] == specs[0].p_min_w

        # A cap below the job's demand binds ...
        patch = await asyncio.to_thread(
            client.patch, P.environment_metrics, body={"PowerLimitWatts": {"SetPoint": 45_000}}
        )
        assert patch.status == 200, patch.text
        print("DMTF client PATCH SetPoint 45000 ->", patch.status, patch.dict["PowerLimitWatts"])
        await until(lambda: abs(ph.power_w[0] - 45_000.0) < 1.0, 5.0, what="capped")
        env = await asyncio.to_thread(client.get, P.environment_metrics)
        assert env.dict["PowerWatts"]["Reading"] == pytest.approx(45_000.0, abs=noise)
        # ... one above it does not: the rack draws what its job needs.
        await asyncio.to_thread(client.patch, P.power_limit_control, body={"SetPoint": 75_000})
        await until(lambda: abs(ph.power_w[0] - demand) < 1.0, 5.0, what="demand binds")
        ctrl = await asyncio.to_thread(client.get, P.power_limit_control)
        assert ctrl.dict["SetPoint"] == 75_000 and ctrl.dict["ControlType"] == "Power"
        legacy = await asyncio.to_thread(client.get, P.power)
        consumed = legacy.dict["PowerControl"][0]["PowerConsumedWatts"]
        assert consumed == pytest.approx(demand, abs=noise)
        assert legacy.dict["PowerControl"][0]["PowerLimit"]["LimitInWatts"] == 75_000
        print("DMTF client GET Power: PowerConsumedWatts", consumed)

        # Out of range: a Redfish error, and nothing changes.
        bad = await asyncio.to_thread(
            client.patch, P.environment_metrics, body={"PowerLimitWatts": {"SetPoint": 5}}
        )
        assert bad.status == 400
        assert bad.dict["error"]["code"].endswith("PropertyValueOutOfRange")
        assert ph.cmd_setpoint_w[0] == 75_000.0
        await asyncio.to_thread(client.logout)
        assert bmc.sessions == {}

        # HTTP Basic works as well (the library validates it on the Sessions collection).
        basic = await asyncio.to_thread(
            redfish.redfish_client, base_url=url, username=USER, password=PASSWORD, timeout=5
        )
        await asyncio.to_thread(basic.login, auth="basic")
        chassis = await asyncio.to_thread(basic.get, P.chassis)
        assert chassis.dict["EnvironmentMetrics"]["@odata.id"] == P.environment_metrics
        assert bmc.sessions == {}
        with pytest.raises(redfish.rest.v1.InvalidCredentialsError):
            wrong = await asyncio.to_thread(
                redfish.redfish_client, base_url=url, username=USER, password="x", timeout=5
            )
            await asyncio.to_thread(wrong.login, auth="session")
    finally:
        await cancel_and_wait(stepper)
        await servers.close()


# --- (b) DMTF's Redfish Service Validator against one simulated BMC ---

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUMMARY = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*$", re.M)
_VALIDATOR = (
    "import sys\n"
    "from redfish_service_validator.console_scripts import main\n"
    "sys.argv[0] = 'rf_service_validator'\n"
    "main()\n"
)


async def test_dmtf_service_validator_finds_no_failure(tmp_path: Path) -> None:
    specs = gpu_specs(tmp_path, 1)
    ph = SitePhysics(specs, 0.0, seed=1, dt_s=SIM_DT)
    servers = await start_redfish_servers(ph, [0], specs)
    # No schema can be downloaded here: point the validator's external proxy at a closed local
    # port so each fetch fails at once (never leaving the host). It still logs in, reads
    # $metadata, walks every link and checks each resource; schema checks degrade to warnings.
    closed = "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = "*"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _VALIDATOR,
        "--rhost",
        servers.url(0),
        "--user",
        USER,
        "--password",
        PASSWORD,
        "--authtype",
        "Session",
        "--timeout",
        "5",
        "--logdir",
        str(tmp_path / "logs"),
        "--schema_directory",
        str(tmp_path / "schemas"),
        "--config",
        str(tmp_path / "none.ini"),
        "--ext_http_proxy",
        closed,
        "--ext_https_proxy",
        closed,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 180.0)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    finally:
        bmc = servers.bmcs[0]
        await servers.close()
    text = _ANSI.sub("", out.decode(errors="replace"))
    match = _SUMMARY.search(text)
    assert match, text[-3000:]
    passed, warned, failed, skipped = map(int, match.groups())
    print(f"validator summary: PASS {passed}, WARN {warned}, FAIL {failed}, NOT TESTED {skipped}")
    validated = re.findall(r"^Validating (\S+)\.\.\.$", text, re.M)
    print("validated:", " ".join(validated))
    assert failed == 0, text[-3000:]
    assert proc.returncode == 0
    assert "Could not access /redfish/v1/$metadata" not in text
    expected = {
        "/redfish/v1/",
        rf.CHASSIS,
        P.chassis,
        P.environment_metrics,
        P.power,
        P.power_subsystem,
        P.controls,
        P.power_limit_control,
        rf.SESSION_SERVICE,
        rf.SESSIONS,
    }
    assert expected <= set(validated)
    assert bmc.logins >= 1 and bmc.sessions == {}  # it logged in and out again


# --- (c) our driver against ten racks ---


async def test_driver_discovers_polls_and_caps_ten_racks(tmp_path: Path) -> None:
    specs = gpu_specs(tmp_path, 10)
    basic = {3, 4, 8}
    specs = [with_access(s, session_auth=False) if i in basic else s for i, s in enumerate(specs)]
    legacy = [6, 7, 8, 9]
    async with rig(specs, legacy=legacy) as r:
        assert isinstance(r.driver, Driver)
        await r.first_polls()
        for i in range(10):
            expected = Mechanism.LEGACY_POWER if i in legacy else Mechanism.ENVIRONMENT_METRICS
            assert r.driver.mechanism(i) is expected, i
            assert r.state(i) == DeviceState.ON
            assert r.image.measured_w[i] == pytest.approx(r.physics.power_w[i], abs=2_000.0)
            bmc = r.bmc(i)
            assert len(bmc.sessions) == (0 if i in basic else 1), i
            assert bmc.logins == (0 if i in basic else 1), i

        caps = np.linspace(40_000.0, 49_000.0, 10)  # all below the racks' demand (65 kW)
        r.driver.submit(cmd(np.arange(10), caps))
        await until(
            lambda: bool((r.physics.cmd_setpoint_w == np.round(caps)).all()), 5.0, what="caps"
        )
        await until(
            lambda: bool(np.allclose(r.image.measured_w, caps, atol=1_500.0)), 5.0, what="telemetry"
        )
        assert len(r.commands) >= 10 and all(ok for _, _, ok in r.commands)
        assert r.driver.commands_ok == 10 and r.driver.command_errors == 0

        # Session hygiene: many polls later, still one session per session-auth rack.
        polls = r.driver.polls_ok
        await until(lambda: r.driver.polls_ok >= polls + 30, 5.0, what="more polls")
        assert [len(r.bmc(i).sessions) for i in range(10)] == [
            0 if i in basic else 1 for i in range(10)
        ]
        r.driver_task.cancel()
        await asyncio.gather(r.driver_task, return_exceptions=True)
        assert all(r.bmc(i).sessions == {} for i in range(10))  # logged out on stop


async def test_latest_value_wins(tmp_path: Path) -> None:
    specs = gpu_specs(tmp_path, 2)
    async with rig(specs) as r:
        await until(lambda: r.polled([0, 1]), 5.0, what="first polls")
        patches = r.bmc(0).patches
        for k in range(50):  # a burst faster than any BMC round trip
            r.driver.submit(cmd(np.array([0]), np.array([40_000.0 + 100.0 * k])))
        r.driver.submit(cmd(np.array([1]), np.array([50_000.0])))
        await until(lambda: r.physics.cmd_setpoint_w[0] == 44_900.0, 5.0, what="last value")
        await until(lambda: r.physics.cmd_setpoint_w[1] == 50_000.0, 5.0, what="rack 1")
        assert r.bmc(0).patches - patches <= 2
        # Below the BMC's allowable minimum: clamped to it rather than refused.
        r.driver.submit(cmd(np.array([0]), np.array([1_000.0])))
        floor = r.specs[0].p_min_w
        await until(lambda: r.physics.cmd_setpoint_w[0] == floor, 5.0, what="clamped")
        assert r.driver.command_errors == 0
        # A rack has no sleep: a SLEEP command caps it at the power given; it runs on.
        r.driver.submit(cmd(np.array([1]), np.array([43_000.0]), sleep=True))
        await until(lambda: r.physics.cmd_setpoint_w[1] == 43_000.0, 5.0, what="sleep as cap")
        assert r.state(1) == DeviceState.ON
        # Stopping right after a submit stops promptly (no cancellation lost in the mailbox).
        r.driver.submit(cmd(np.array([0, 1]), np.array([41_000.0, 42_000.0])))
        r.driver_task.cancel()
        async with asyncio.timeout(3.0):
            await asyncio.gather(r.driver_task, return_exceptions=True)


async def test_https_with_a_test_ca(tmp_path: Path) -> None:
    specs = gpu_specs(tmp_path, 3)
    ca, cert, key = tls_material(tmp_path, [s.host for s in specs], "site")
    other_ca, _, _ = tls_material(tmp_path, ["127.0.0.1"], "other")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    specs = [
        with_access(s, https=True, ca_file=other_ca if i == 2 else ca) for i, s in enumerate(specs)
    ]
    specs[1] = with_access(specs[1], session_auth=False)
    async with rig(specs, ssl_context=server_ctx) as r:
        await until(lambda: r.polled([0, 1]), 5.0, what="polls over TLS")
        r.driver.submit(cmd(np.array([0, 1]), np.array([45_000.0, 46_000.0])))
        await until(
            lambda: list(r.physics.cmd_setpoint_w[:2]) == [45_000.0, 46_000.0], 5.0, what="caps"
        )
        # A BMC whose certificate our CA did not sign is never trusted.
        await until(lambda: r.state(2) == DeviceState.FAULT, 5.0, what="untrusted BMC")
        assert r.bmc(2).requests.total() == 0
        assert r.bmc(2).logins == 0


async def test_password_file_and_wrong_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rampd.drivers.redfish")
    specs = gpu_specs(tmp_path, 2)
    pw = tmp_path / "bmc-password"
    pw.write_text(PASSWORD + "\n")
    # Rack 0 reads its password from a file; rack 1's driver has the wrong one (its BMC keeps
    # the right one: the simulator is started with the correct specs).
    good = with_access(specs[0], password=None, password_file=pw)
    driver_specs = [good, with_access(specs[1], password="wrong")]
    async with rig(specs, driver_specs=driver_specs) as r:
        await until(lambda: r.state(1) == DeviceState.FAULT, 5.0, what="FAULT")
        await until(lambda: r.polled([0]), 5.0, what="password file works")
        errors = int(r.driver.errors_by_device[1])
        await until(lambda: r.driver.errors_by_device[1] >= errors + 2, 5.0, what="retries")
        assert r.state(0) == DeviceState.ON and r.driver.faulted == 1
        assert r.driver.errors_by_device[0] == 0
    # Retried, but said once (counted by logger and level): one WARNING, naming the rack
    # and the BMC's answer (what an operator needs to fix the password).
    warnings = [
        m.getMessage()
        for m in log_records(caplog.records, "rampd.drivers.redfish", logging.WARNING)
    ]
    assert len(warnings) == 1 and "gpu-0001" in warnings[0] and "401" in warnings[0], warnings


async def test_oversized_bodies_are_refused(tmp_path: Path) -> None:
    specs = gpu_specs(tmp_path, 1)
    async with rig(specs, max_body_bytes=300) as r:
        await until(lambda: r.state(0) == DeviceState.FAULT, 5.0, what="FAULT")
        assert not r.polled([0])


# --- (d) faults: isolated per rack, detected, recovered ---


async def test_faults_are_isolated_and_recover(tmp_path: Path) -> None:
    specs = gpu_specs(tmp_path, 8)
    faults = {0: Fault.SILENT, 1: Fault.ERROR, 2: Fault.GARBAGE, 3: Fault.SLOW}
    healthy = [4, 5, 6, 7]
    async with rig(specs, legacy=[3, 7]) as r:
        await r.first_polls()
        for i, f in faults.items():
            r.physics.set_fault(i, f)
        worst_age = 0.0

        def all_faulted() -> bool:
            nonlocal worst_age
            age = time.monotonic() - r.image.measured_at[healthy]
            worst_age = max(worst_age, float(age.max()))
            return all(r.state(i) == DeviceState.FAULT for i in faults)

        gets = [r.bmc(i).requests["GET"] for i in healthy]
        await until(all_faulted, 10.0, what="all four faults detected")
        # The others were polled meanwhile (every 0.2 s nominally), never held up by the dead
        # ones. Generous bounds: they catch a poller stuck behind the dead racks' timeouts
        # and retries, not a loaded test machine (the cadence is not judged here).
        assert all(r.state(i) == DeviceState.ON for i in healthy)
        assert worst_age < 2.0, worst_age
        polls = [r.bmc(i).requests["GET"] - g for i, g in zip(healthy, gets, strict=True)]
        assert min(polls) >= 2, polls
        # Commands to healthy racks still land while the others are dead.
        r.driver.submit(cmd(np.arange(8), np.full(8, 50_000.0)))
        await until(
            lambda: bool((r.physics.cmd_setpoint_w[healthy] == 50_000.0).all()), 5.0, what="caps"
        )
        assert (r.physics.cmd_setpoint_w[[0, 1, 2, 3]] != 50_000.0).all()

        for i in faults:
            r.physics.set_fault(i, Fault.NONE)
        await until(
            lambda: all(r.state(i) == DeviceState.ON for i in faults), 10.0, what="recovery"
        )
        # The caps they missed are sent once they answer again.
        await until(
            lambda: bool((r.physics.cmd_setpoint_w == 50_000.0).all()), 10.0, what="late caps"
        )


async def test_reboot_drops_sessions_and_the_cap_is_resent(tmp_path: Path) -> None:
    specs = gpu_specs(tmp_path, 3)
    async with rig(specs, legacy=[2]) as r:
        await r.first_polls()
        r.driver.submit(cmd(np.arange(3), np.array([45_000.0, 46_000.0, 47_000.0])))
        caps = [45_000.0, 46_000.0, 47_000.0]
        await until(lambda: list(r.physics.cmd_setpoint_w) == caps, 5.0, what="caps")
        relogins = r.driver.relogins
        r.physics.reboot([0, 2])
        # The BMC restarts: sessions gone, cap back at the factory default (p_max) ...
        await until(lambda: r.bmc(0).reboots >= 1 and r.bmc(2).reboots >= 1, 5.0, what="reboot")
        # ... the driver logs in again and puts its cap back.
        await until(lambda: list(r.physics.cmd_setpoint_w) == caps, 5.0, what="cap resent")
        assert r.driver.relogins >= relogins + 2
        assert r.driver.resends >= 2
        assert [len(r.bmc(i).sessions) for i in range(3)] == [1, 1, 1]
        assert r.bmc(1).reboots == 0

        # An expired session (the BMC forgot it) costs one re-login, not a FAULT.
        errors = int(r.driver.errors_by_device[1])
        r.bmc(1).sessions.clear()
        await until(lambda: len(r.bmc(1).sessions) == 1, 5.0, what="re-login")
        assert r.driver.errors_by_device[1] == errors
        assert r.state(1) == DeviceState.ON


async def test_many_racks_in_one_process(tmp_path: Path) -> None:
    specs = gpu_specs(tmp_path, 24)
    specs = [with_access(s, model="8x DGX H100") for s in specs]
    async with rig(specs, legacy=list(range(0, 24, 4))) as r:
        await r.first_polls(10.0)
        r.driver.submit(cmd(np.arange(24), np.full(24, 40_000.0)))
        await until(
            lambda: bool((r.physics.cmd_setpoint_w == 40_000.0).all()), 10.0, what="24 caps"
        )
