"""Faults end to end: mosquitto + `rampd sim` + `rampd run` as separate processes, and each
fault made real (the broker SIGKILLed, the dispatcher silent, the meter and devices silent
through the simulator's control endpoint, the daemon SIGKILLed).

One site serves the whole module; the tests run in file order and each leaves the site
working. Site power is judged from the simulator's ground truth.

Covered elsewhere, not repeated here: MqttLink's reconnect and status restore against a
restarted broker (tests/integration/test_mqtt_link.py), resume after a clean SIGTERM restart
(tests/e2e/test_journal_restart.py), the hold and baseline failsafe trajectories
(tests/unit/test_target.py), mixed-protocol misbehaving devices (test_campus_e2e.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.journal.reader import JournalReader
from controller.journal.schema import Event
from controller.tools.truth import TruthTail, tolerance_kw
from controller.wire import Status, Telemetry
from tests.e2e.harness import Site, SiteDispatcher, run_site, spawn, truth_until, wire_kw
from tests.helpers import Mosquitto, until

pytestmark = pytest.mark.e2e

N_LOADS = 20
SITE_MAX_KW = 6000.0
RECONNECT_CAP_S = 1.0
FAILSAFE_TIMEOUT_S = 2.5
SITE_MIN_KW = 1000.0  # the failsafe `min` target: inside what the fleet can reach

CONNACK_SERVER_UNAVAILABLE = bytes([0x20, 0x02, 0x00, 0x03])  # MQTT 3.1.1, return code 3

HOLD = "dispatch_timeout_s = 600"
MIN_AFTER_SILENCE = f'dispatch_timeout_s = {FAILSAFE_TIMEOUT_S}\npolicy = "min"\nramp_s = 0'


def site_config(journal: Path, failsafe: str) -> str:
    """The site's TOML, {broker_port} and {metrics_port} left for run_site to fill in."""
    return f"""
site_id = "faults"
cycle_s = 0.1
noncontrollable_kw = 300.0
[mqtt]
host = "127.0.0.1"
port = {{broker_port}}
keepalive_s = 5
reconnect_max_s = {RECONNECT_CAP_S}
[site]
min_kw = {SITE_MIN_KW}
max_kw = {SITE_MAX_KW}
deadband_kw = 20.0
telemetry_max_age_s = 5.0
[failsafe]
{failsafe}
[journal]
path = "{journal}"
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[meter]
host = "127.91.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = {N_LOADS}
address = "127.91.1.1"
overrides = {{{{ port = 1502, poll_s = 0.5, timeout_s = 0.5 }}}}
"""


@pytest.fixture(scope="module")
def site(module_mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("faults")
    config = site_config(workdir / "journal.sqlite", HOLD)
    with run_site(module_mosquitto, workdir, config, site_id="faults", n_devices=N_LOADS) as s:
        yield s


def resume_events(journal: Path, since: float) -> list[Event]:
    """The journal's "resume" events since `since` (Unix time), read as `rampd report` does."""
    with JournalReader(journal) as j:
        return [e for e in j.events_between(since, time.time() + 60.0) if e.kind == "resume"]


def truth_between(tail: TruthTail, t_from: float, t_to: float) -> np.ndarray[Any, Any]:
    t, kw = tail.arrays()
    return kw[(t >= t_from) & (t <= t_to)]


async def settled(tail: TruthTail, target: float, t_from: float, t_to: float) -> None:
    """Ground truth within the ramp tolerance of `target` over [t_from, t_to]."""
    await truth_until(tail, t_to, within=t_to - time.time() + 15)
    kw = truth_between(tail, t_from, t_to)
    tol = tolerance_kw(target, SITE_MAX_KW)
    assert kw.size >= 5 and np.all(np.abs(kw - target) <= tol), (target, tol, kw)


async def status_where(
    d: SiteDispatcher, ok: Callable[[Status], bool], within: float = 10.0
) -> Status:
    """The latest status, once it passes `ok`."""
    await until(lambda: bool(d.status) and ok(d.status[-1]), within, interval=0.02, what="status")
    return d.status[-1]


async def telemetry_where(
    d: SiteDispatcher, ok: Callable[[Telemetry], bool], within: float = 15.0
) -> Telemetry:
    """The first fresh telemetry that passes `ok`."""
    async with asyncio.timeout(within):
        while not ok(tel := await d.fresh_telemetry()):
            pass
    return tel


# --- the broker killed mid-ramp ---------------------------------------------------------


async def test_broker_killed_mid_ramp_control_goes_on_and_the_link_comes_back(
    site: Site, module_mosquitto: Mosquitto
) -> None:
    broker = module_mosquitto
    ramp_s = 3.0
    async with SiteDispatcher(site) as d:
        tel = await d.all_devices_on()
        lo, hi = wire_kw(tel.min_w), wire_kw(tel.max_w)
        start = wire_kw(tel.measured_w)
        target = round(lo + 0.3 * (hi - lo), 1)
        assert start - target > 1000, (start, target)
        tail = TruthTail(site.truth)
        ack, t0 = await d.send_acked(target_kw=target, ramp_s=ramp_s)
        assert ack.accepted is True
    await truth_until(tail, t0 + 1.0, within=10)

    # SIGKILL: no goodbye from the broker, the retained status is gone with it (no
    # persistence). While it is away a stand-in on its port records the daemon's reconnect
    # attempts, answering each CONNECT with "server unavailable" (a peer that just hangs up
    # would cost the client its whole connect timeout per attempt).
    attempts: list[float] = []

    async def unavailable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(time.monotonic())
        writer.write(CONNACK_SERVER_UNAVAILABLE)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(5.0):
                while await reader.read(1024):  # until the client hangs up
                    pass
        writer.close()

    broker.kill()
    t_kill = time.time()
    try:
        stand_in = await asyncio.start_server(unavailable, broker.host, broker.port)
        async with stand_in:
            await until(lambda: len(attempts) >= 7, 20.0, what="7 reconnect attempts")
            await truth_until(tail, t0 + ramp_s + 3.0, within=15)
            t_back = time.time()
    finally:
        await asyncio.to_thread(broker.start)

    # While the broker was away the site went on down the ramp to the target and held it.
    assert float(truth_between(tail, t_kill - 0.5, t_kill)[-1]) > target + 300
    await settled(tail, target, t0 + ramp_s + 2.0, t_back)

    # Capped exponential backoff with jitter: short gaps first, then at most the cap,
    # and not one fixed period.
    gaps = np.diff(attempts)
    capped = gaps[-4:]
    assert gaps[0] < 0.65 and np.all(gaps <= RECONNECT_CAP_S + 0.4), gaps
    assert np.all(capped >= 0.4) and np.ptp(capped) > 0.02, gaps
    assert "mqtt lost" in site.daemon_log

    # Status and telemetry resume; a newcomer then finds the status retained (the daemon
    # republished it: the restarted broker kept nothing).
    async with SiteDispatcher(site) as d:
        status = await status_where(d, lambda s: s.state == "online")
        assert status.mode == "normal" and status.detail == "", status
        # Telemetry queued while the broker was away arrives first, dated when it was made.
        tel = await telemetry_where(d, lambda t: t.at >= t_back, within=10)
        assert wire_kw(tel.target_w) == pytest.approx(target), tel
        assert tel.measured_source == "meter"
    async with SiteDispatcher(site) as d:
        status = await status_where(d, lambda s: True, within=2.0)
        assert status.state == "online", status
    print(
        f"reconnect gaps {np.round(gaps, 3)} s, mean of the capped {statistics.fmean(capped):.3f} s"
    )


# --- the meter silent -------------------------------------------------------------------


async def test_meter_silent_control_goes_on_on_device_telemetry_and_status_says_so(
    site: Site,
) -> None:
    async with SiteDispatcher(site) as d:
        tel = await d.all_devices_on()
        assert "meter" not in (await status_where(d, lambda s: True)).detail
        lo, hi = wire_kw(tel.min_w), wire_kw(tel.max_w)
        await site.sim_control("/meter", {"fault": "silent"})
        try:
            status = await status_where(d, lambda s: "meter stale" in s.detail)
            assert status.state == "online" and status.mode == "normal", status
            await telemetry_where(d, lambda t: t.measured_source == "estimate")
            # A new target, reached on device telemetry alone.
            target = round(lo + 0.7 * (hi - lo), 1)
            tail = TruthTail(site.truth)
            ack, t0 = await d.send_acked(target_kw=target)
            assert ack.accepted is True
            await settled(tail, target, t0 + 3.0, t0 + 4.0)
            tel = await d.fresh_telemetry()
            assert tel.measured_source == "estimate" and wire_kw(tel.target_w) == target
        finally:
            await site.sim_control("/meter", {"fault": "none"})
        await status_where(d, lambda s: "meter" not in s.detail)
        await telemetry_where(d, lambda t: t.measured_source == "meter")
    assert "site meter stale: controlling on device telemetry" in site.daemon_log


# --- kill -9 of the daemon mid-ramp -----------------------------------------------------


def restart_daemon(site: Site, config: Path, log_name: str) -> Path:
    """Start a new `rampd run` on `config` (the old one must be gone); return its log."""
    assert site.daemon.poll() is not None
    log = site.logs / log_name
    site.daemon = spawn(["run", "-c", str(config)], log)
    return log


async def test_sigkill_mid_ramp_and_restart_resumes_the_dispatch_from_the_journal(
    site: Site,
) -> None:
    ramp_s = 6.0  # long enough that the new daemon usually comes up mid-ramp
    async with SiteDispatcher(site) as d:
        tel = await d.all_devices_on()
        lo, hi = wire_kw(tel.min_w), wire_kw(tel.max_w)
        start = wire_kw(tel.measured_w)
        target = round(lo + (0.2 if start > (lo + hi) / 2 else 0.8) * (hi - lo), 1)
        tail = TruthTail(site.truth)
        ack, t0 = await d.send_acked(target_kw=target, ramp_s=ramp_s)
        assert ack.accepted is True
        await truth_until(tail, t0 + 1.5, within=10)

        site.daemon.send_signal(signal.SIGKILL)  # no goodbye, no journal close
        assert await asyncio.to_thread(site.daemon.wait, 10) == -signal.SIGKILL
        t_kill = time.time()
        status = await status_where(d, lambda s: s.state == "offline")  # the will
        assert status.detail == "connection lost"
        restart_daemon(site, site.logs / "site.toml", "rampd-2.log")
        await status_where(d, lambda s: s.state == "online", within=20)
        # No new dispatch: the target comes back from the journal, its ramp ending when it
        # would have without the kill, not ramp_s after the restart (the new daemon may come
        # up before or after that end).
        tel = await telemetry_where(
            d, lambda t: t.devices.on == N_LOADS and wire_kw(t.target_w) == target, within=20
        )
        t_up = time.time()
        assert tel.mode == "normal", tel
        after_kill = [t for t in d.telemetry if t.at > t_kill]
        first = after_kill[0]
        reached = next(t for t in after_kill if wire_kw(t.target_w) == target)
        ramp_end = t0 + ramp_s
        if first.at >= ramp_end + 0.5:  # telemetry carries the last cycle's target
            assert first is reached, (first, reached)
        else:  # mid-ramp: on the way to the target, not back at the start, and on time
            lo_kw, hi_kw = sorted((start, target))
            assert lo_kw <= wire_kw(first.target_w) <= hi_kw, (start, first, target)
            # Within a telemetry period (1 s) of the ramp's end; a ramp begun over at the
            # restart would end ramp_s after it, 1.5 s or more later.
            assert reached.at < ramp_end + 1.3, (ramp_end, reached)
    # The new daemon journalled what it put back in force: that dispatch, once.
    journal = site.logs / "journal.sqlite"
    resumed = await until(lambda: resume_events(journal, t_kill), 10.0, what="resume journalled")
    assert len(resumed) == 1 and f"{ack.id} seq {ack.seq}" in resumed[0].text, resumed

    # Mid-ramp at the kill; devices held their setpoints while no daemon ran; the new one
    # carried on to the target without first bumping back towards where the ramp began.
    at_kill = float(truth_between(tail, t_kill - 0.5, t_kill)[-1])
    assert abs(at_kill - target) > 300 and abs(at_kill - start) > 100, (start, at_kill, target)
    await settled(tail, target, t_up + 2.0, t_up + 3.0)
    after = truth_between(tail, t_kill, t_up + 3.0)
    tol = tolerance_kw(target, SITE_MAX_KW)
    if target < start:
        assert after.max() <= at_kill + tol, (at_kill, after.max())
    else:
        assert after.min() >= at_kill - tol, (at_kill, after.min())


# --- devices silent ---------------------------------------------------------------------


async def silence(site: Site, d: SiteDispatcher, names: list[str]) -> Telemetry:
    """Silence `names` (cumulative); return telemetry from after all of them went to fault."""
    picked = await site.sim_control("/faults", {"fault": "silent", "devices": names})
    assert picked["applied"] == names
    await telemetry_where(d, lambda t: t.devices.fault == len(names), within=30)
    # Counts are read at publication, capability at the cycle before: one more for both.
    return await d.fresh_telemetry()


async def test_silent_devices_the_rest_carry_the_target_and_capability_drops(
    site: Site,
) -> None:
    rows = await site.sim_control("/devices")
    names = [r["name"] for r in rows]
    per_device_kw = 225.0  # modbus-load: 25..250 kW
    async with SiteDispatcher(site) as d:
        tel = await d.all_devices_on()
        span0 = wire_kw(tel.max_w) - wire_kw(tel.min_w)
        try:
            # 10% silent: 2 of 20. Their span leaves the capability; a target inside what
            # the rest can do is still met.
            tel = await silence(site, d, names[:2])
            span = wire_kw(tel.max_w) - wire_kw(tel.min_w)
            assert span == pytest.approx(span0 - 2 * per_device_kw, abs=60), (span0, span)
            assert tel.devices.on == N_LOADS - 2
            target = round(wire_kw(tel.min_w) + 0.4 * span, 1)
            tail = TruthTail(site.truth)
            ack, t0 = await d.send_acked(target_kw=target)
            assert ack.accepted is True
            await settled(tail, target, t0 + 2.5, t0 + 3.5)

            # 50% silent: 10 of 20. Asked for less than the rest can shed, every one that
            # still answers goes to its minimum and the site sits at the reduced floor.
            tel = await silence(site, d, names[:10])
            span = wire_kw(tel.max_w) - wire_kw(tel.min_w)
            assert span == pytest.approx(span0 - 10 * per_device_kw, abs=150), (span0, span)
            target = round(max(wire_kw(tel.min_w) - 500.0, SITE_MIN_KW), 1)
            assert wire_kw(tel.min_w) - target >= 300, tel
            tail = TruthTail(site.truth)
            ack, t0 = await d.send_acked(target_kw=target)
            assert ack.accepted is True
            await truth_until(tail, t0 + 3.0, within=10)
            rows = await site.sim_control("/devices")
            rest = [r["power_w"] for r in rows if r["name"] not in names[:10]]
            assert max(rest) <= 25e3 + 1e3, rest  # modbus-load minimum: 25 kW
            tel = await d.fresh_telemetry()
            assert tel.saturated == -1 and wire_kw(tel.target_w) == target, tel  # at the floor
            # The floor reported (silent rows' power now counted as fixed load) is the true one.
            await truth_until(tail, time.time(), within=5)
            now_kw = float(tail.arrays()[1][-1])
            tol = tolerance_kw(now_kw, SITE_MAX_KW)
            assert wire_kw(tel.min_w) == pytest.approx(now_kw, abs=tol)
        finally:
            await site.sim_control("/faults", {"fault": "none", "fraction": 1.0})


# --- the dispatcher silent past failsafe.dispatch_timeout_s -----------------------------


@contextlib.asynccontextmanager
async def heartbeats(d: SiteDispatcher, period_s: float = 0.5) -> AsyncIterator[None]:
    """The dispatcher's heartbeat while the block runs: it keeps the failsafe away."""

    async def beat() -> None:
        while True:
            await d.heartbeat()
            await asyncio.sleep(period_s)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_dispatcher_silent_failsafe_min_applies_within_a_second_until_a_new_dispatch(
    site: Site,
) -> None:
    # The same site, restarted on a config whose dispatcher timeout is short (policy min).
    config = site.logs / "failsafe.toml"
    text = site_config(site.logs / "journal.sqlite", MIN_AFTER_SILENCE)
    config.write_text(text.format(broker_port=site.broker[1], metrics_port=site.metrics_port))
    async with SiteDispatcher(site) as d:
        await d.all_devices_on()  # up and handling SIGTERM (when this test runs alone)
    site.daemon.terminate()
    assert await asyncio.to_thread(site.daemon.wait, 15) == 0
    restart_daemon(site, config, "rampd-3.log")

    async with SiteDispatcher(site) as d:
        tel = await d.all_devices_on()
        lo, hi = wire_kw(tel.min_w), wire_kw(tel.max_w)
        high, mid = round(lo + 0.8 * (hi - lo), 1), round(lo + 0.5 * (hi - lo), 1)
        async with heartbeats(d):
            ack, t0 = await d.send_acked(target_kw=high)
            assert ack.accepted is True
            tail = TruthTail(site.truth)
            await settled(tail, high, t0 + 3.5, t0 + 4.0)
        # Silence from a last dispatch (the same target again): the failsafe starts
        # dispatch_timeout_s after it was accepted (between t0 and t_ack) and the status
        # says so within a second.
        ack, t0 = await d.send_acked(target_kw=high)
        t_ack = time.time()
        assert ack.accepted is True
        status = await status_where(d, lambda s: s.mode == "failsafe", within=10)
        t_fs = time.time()
        early, late = t_fs - t_ack - FAILSAFE_TIMEOUT_S, t_fs - t0 - FAILSAFE_TIMEOUT_S
        print(f"failsafe status {early:.3f}..{late:.3f} s after the timeout")
        assert late >= 0 and early <= 1.0, (early, late)
        assert status.state == "online"
        assert status.detail == (
            f"no dispatch or heartbeat for {FAILSAFE_TIMEOUT_S:g} s; policy min"
        )
        tel = await telemetry_where(d, lambda t: t.mode == "failsafe")
        assert wire_kw(tel.target_w) == SITE_MIN_KW
        # The site leaves `high` at once (dead time and ramp rates allowing) and settles on
        # the policy's target.
        await truth_until(tail, t_fs + 1.0, within=10)
        kw = truth_between(tail, t_fs - 0.5, t_fs + 1.0)
        assert abs(kw[0] - high) <= tolerance_kw(high, SITE_MAX_KW) and kw[-1] < high - 500, kw
        await settled(tail, SITE_MIN_KW, t_fs + 3.0, t_fs + 4.0)

        # A new valid dispatch ends it.
        async with heartbeats(d):
            ack, t1 = await d.send_acked(target_kw=mid)
            assert ack.accepted is True
            status = await status_where(d, lambda s: s.mode == "normal")
            assert status.detail == ""
            await settled(tail, mid, t1 + 5.0, t1 + 6.0)
            tel = await d.fresh_telemetry()
            assert tel.mode == "normal" and wire_kw(tel.target_w) == mid
