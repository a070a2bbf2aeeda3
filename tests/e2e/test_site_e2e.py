"""End to end: mosquitto + `rampd sim` + `rampd run` as separate processes, over real sockets.

Site power is judged from the simulator's ground truth, never from the daemon's telemetry.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from controller.broker import free_port
from controller.ramp_metrics import TruthTail, ramp_figures, tolerance_kw
from tests.helpers import Mosquitto

pytestmark = pytest.mark.e2e

N_LOADS = 50
SITE_MAX_KW = 14000.0


@dataclass
class Site:
    root: str
    broker: tuple[str, int]
    truth: Path
    sim: subprocess.Popen[bytes]
    daemon: subprocess.Popen[bytes]
    metrics_port: int
    logs: Path


def _config(broker_port: int, metrics_port: int) -> str:
    return f"""
site_id = "e2e"
cycle_s = 0.1
noncontrollable_kw = 800.0
[mqtt]
host = "127.0.0.1"
port = {broker_port}
[site]
max_kw = {SITE_MAX_KW}
deadband_kw = 20.0
[failsafe]
dispatch_timeout_s = 600
[metrics]
listen = "127.0.0.1:{metrics_port}"
[meter]
host = "127.61.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = {N_LOADS}
address = "127.61.1.1"
overrides = {{ port = 1502 }}
"""


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "controller.cli", *args], stdout=fh, stderr=subprocess.STDOUT
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def site(module_mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    d = tmp_path_factory.mktemp("site")
    metrics_port = free_port()
    cfg = d / "site.toml"
    cfg.write_text(_config(module_mosquitto.port, metrics_port))
    truth = d / "truth.jsonl"
    sim = _spawn(["sim", "-c", str(cfg), "--truth", str(truth)], d / "sim.log")
    daemon = _spawn(["run", "-c", str(cfg)], d / "rampd.log")
    broker = (module_mosquitto.host, module_mosquitto.port)
    s = Site("rampd/e2e", broker, truth, sim, daemon, metrics_port, d)
    try:
        yield s
    finally:
        _stop(daemon)
        _stop(sim)


@dataclass
class Dispatcher:
    client: aiomqtt.Client
    root: str
    acks: list[dict[str, Any]] = field(default_factory=list)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    status: list[dict[str, Any]] = field(default_factory=list)

    async def listen(self) -> None:
        async for msg in self.client.messages:
            body = json.loads(bytes(msg.payload))  # type: ignore[arg-type]
            suffix = str(msg.topic).rsplit("/", 1)[-1]
            {"ack": self.acks, "telemetry": self.telemetry, "status": self.status}[suffix].append(
                body
            )

    async def publish(self, payload: bytes | str) -> None:
        await self.client.publish(f"{self.root}/dispatch", payload, qos=1)

    async def ack_for(self, dispatch_id: str, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for a in self.acks:
                    if a.get("id") == dispatch_id:
                        return a
                await asyncio.sleep(0.02)

    async def fresh_telemetry(self, timeout: float = 5.0) -> dict[str, Any]:
        n = len(self.telemetry)
        async with asyncio.timeout(timeout):
            while len(self.telemetry) <= n:
                await asyncio.sleep(0.05)
        return self.telemetry[-1]


class _Session:
    def __init__(self, site: Site) -> None:
        self.site = site
        self.client = aiomqtt.Client(*site.broker, identifier=f"e2e-{time.monotonic_ns()}")

    async def __aenter__(self) -> Dispatcher:
        await self.client.__aenter__()
        for t in ("ack", "telemetry", "status"):
            await self.client.subscribe(f"{self.site.root}/{t}", qos=1)
        self.d = Dispatcher(self.client, self.site.root)
        self.task = asyncio.create_task(self.d.listen())
        return self.d

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.__aexit__(None, None, None)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def _dispatch(seq: int, **fields: Any) -> dict[str, Any]:
    body = {
        "id": f"e2e-{seq}",
        "seq": seq,
        "issued_at": _iso(datetime.now(UTC)),
        "mode": "setpoint",
        "ramp_s": 0,
    }
    body.update(fields)
    return body


async def _all_devices_on(d: Dispatcher, site: Site, timeout: float = 60.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            assert site.daemon.poll() is None, (site.logs / "rampd.log").read_text()[-3000:]
            if d.telemetry and d.telemetry[-1].get("devices", {}).get("on") == N_LOADS:
                return d.telemetry[-1]
            await asyncio.sleep(0.1)


async def _truth_until(tail: TruthTail, t_end: float, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not tail.t or tail.t[-1] < t_end:
            tail.poll()
            await asyncio.sleep(0.1)


async def test_setpoint_settles_on_ground_truth_with_ack_and_telemetry(site: Site) -> None:
    async with _Session(site) as d:
        tel = await _all_devices_on(d, site)
        lo, hi = tel["min_kw"], tel["max_kw"]
        assert 0 < lo < hi <= SITE_MAX_KW
        target = round(lo + 0.3 * (hi - lo), 1)
        seq = int(time.time() * 1000)
        tail = TruthTail(site.truth)
        t0 = time.time()
        await d.publish(json.dumps(_dispatch(seq, target_kw=target)))
        ack = await d.ack_for(f"e2e-{seq}")
        assert ack == {**ack, "id": f"e2e-{seq}", "seq": seq, "accepted": True}

        window = 14.0
        await _truth_until(tail, t0 + window, timeout=window + 15)
        t, kw = tail.arrays()
        fig = ramp_figures(
            t,
            kw,
            t0=t0,
            t_end=t0 + window,
            target_kw=target,
            tol_kw=tolerance_kw(target, SITE_MAX_KW),
        )
        assert fig.start_kw > target + 1000, "the step should start well above the target"
        assert fig.settle_s is not None and fig.settle_s <= 10.0, fig

        tel = await d.fresh_telemetry()
        assert tel["target_kw"] == pytest.approx(target)
        assert tel["measured_kw"] == pytest.approx(target, abs=tolerance_kw(target, SITE_MAX_KW))
        assert set(tel["capability"]["up_kw"]) == {"1s", "5s", "60s"}
        assert tel["capability"]["up_kw"]["5s"] > 0
        assert tel["mode"] == "normal"
        assert d.status and d.status[-1]["state"] == "online"

        body = await asyncio.to_thread(_get, f"http://127.0.0.1:{site.metrics_port}/metrics")
        for name in (
            "rampd_site_power_watts",
            "rampd_site_target_watts",
            "rampd_cycle_duration_seconds_bucket",
            "rampd_command_duration_seconds_bucket",
            'rampd_devices{state="on"} 50.0',
            'rampd_dispatches_total{reason="",result="accepted"}',
        ):
            assert name in body, name


def _bad(next_seq: int, **fields: Any) -> bytes:
    body = _dispatch(next_seq, target_kw=1000.0)
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


# Each builds a payload from the next free seq; every one must be rejected.
BAD_DISPATCHES: list[tuple[str, Any]] = [
    ("not json", lambda seq: b"{this is not json"),
    ("not an object", lambda seq: b"[1, 2, 3]"),
    ("missing target", lambda seq: _bad(seq, target_kw=None)),
    ("missing seq", lambda seq: _bad(seq, seq=None)),
    ("wrong type", lambda seq: _bad(seq, target_kw="lots")),
    ("bool as number", lambda seq: _bad(seq, target_kw=True)),
    ("negative", lambda seq: _bad(seq, target_kw=-100.0)),
    ("nan", lambda seq: _bad(seq, target_kw=float("nan"))),
    ("above site max", lambda seq: _bad(seq, target_kw=SITE_MAX_KW + 1)),
    ("unknown mode", lambda seq: _bad(seq, mode="turbo")),
    ("older seq", lambda seq: _bad(seq - 100)),
    ("expired", lambda seq: _bad(seq, expires_at=_iso(datetime.now(UTC) - timedelta(seconds=5)))),
    ("stale", lambda seq: _bad(seq, issued_at=_iso(datetime.now(UTC) - timedelta(hours=1)))),
]


async def test_bad_dispatches_are_rejected_with_a_reason_and_change_nothing(site: Site) -> None:
    async with _Session(site) as d:
        tel = await _all_devices_on(d, site)
        lo, hi = tel["min_kw"], tel["max_kw"]
        good = round(lo + 0.6 * (hi - lo), 1)
        seq = int(time.time() * 1000)
        await d.publish(json.dumps(_dispatch(seq, target_kw=good)))
        assert (await d.ack_for(f"e2e-{seq}"))["accepted"] is True

        for i, (name, build) in enumerate(BAD_DISPATCHES, start=1):
            n_acks = len(d.acks)
            await d.publish(build(seq + i))
            async with asyncio.timeout(5):
                while len(d.acks) == n_acks:
                    await asyncio.sleep(0.02)
            ack = d.acks[-1]
            assert ack["accepted"] is False, (name, ack)
            assert isinstance(ack["reason"], str) and len(ack["reason"]) > 3, (name, ack)
        assert len(d.acks) == len(BAD_DISPATCHES) + 1  # exactly one ack each

        assert site.daemon.poll() is None
        tel = await d.fresh_telemetry()
        assert tel["target_kw"] == pytest.approx(good)


async def test_sigterm_publishes_offline_and_exits_cleanly(site: Site) -> None:
    async with _Session(site) as d:
        await _all_devices_on(d, site)
        site.daemon.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            while not (d.status and d.status[-1]["state"] == "offline"):
                await asyncio.sleep(0.05)
        assert site.daemon.wait(10) == 0
