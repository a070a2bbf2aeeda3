"""End-to-end harness: `rampd sim` and `rampd run` as real processes, and a dispatcher client.

Site power is judged from the simulator's ground truth (its --truth log), never from the
daemon's telemetry.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt

from controller.tools.broker import free_port
from controller.tools.truth import TruthTail
from tests.helpers import Mosquitto


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "controller.cli", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env},
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Site:
    root: str
    broker: tuple[str, int]
    truth: Path
    sim: subprocess.Popen[bytes]
    daemon: subprocess.Popen[bytes]
    metrics_port: int
    control_port: int
    logs: Path
    n_devices: int

    @property
    def daemon_log(self) -> str:
        return (self.logs / "rampd.log").read_text(errors="replace")

    async def metrics(self) -> str:
        return await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.metrics_port}/metrics")

    async def sim_control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"http://127.0.0.1:{self.control_port}{path}"
        return json.loads(await asyncio.to_thread(http_get, url, body))


@contextmanager
def run_site(
    broker: Mosquitto,
    workdir: Path,
    config: str,
    *,
    site_id: str,
    n_devices: int,
    daemon_env: dict[str, str] | None = None,
) -> Iterator[Site]:
    """Write `config` (with {broker_port} and {metrics_port} filled in) and start both
    processes; stop them afterwards."""
    metrics_port, control_port = free_port(), free_port()
    cfg = workdir / "site.toml"
    cfg.write_text(config.format(broker_port=broker.port, metrics_port=metrics_port))
    truth = workdir / "truth.jsonl"
    sim = spawn(
        ["sim", "-c", str(cfg), "--truth", str(truth), "--control", f"127.0.0.1:{control_port}"],
        workdir / "sim.log",
    )
    daemon = spawn(["run", "-c", str(cfg)], workdir / "rampd.log", daemon_env)
    site = Site(
        f"rampd/{site_id}",
        (broker.host, broker.port),
        truth,
        sim,
        daemon,
        metrics_port,
        control_port,
        workdir,
        n_devices,
    )
    try:
        yield site
    finally:
        stop(site.daemon)  # a test may have restarted it
        stop(sim)


def http_get(url: str, body: dict[str, Any] | None = None) -> str:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.read().decode())


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def dispatch(seq: int, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"e2e-{seq}",
        "seq": seq,
        "issued_at": iso(datetime.now(UTC)),
        "mode": "setpoint",
        "ramp_s": 0,
    }
    body.update(fields)
    return body


@dataclass
class Dispatcher:
    """What a grid dispatcher sees: acks, telemetry and status, as they arrive."""

    client: aiomqtt.Client
    site: Site
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
        await self.client.publish(f"{self.site.root}/dispatch", payload, qos=1)

    async def send(self, **fields: Any) -> tuple[dict[str, Any], float]:
        """Publish a setpoint (or other mode) dispatch; return its ack and the publish time."""
        seq = time.time_ns() // 1000
        t0 = time.time()
        await self.publish(json.dumps(dispatch(seq, **fields)))
        return await self.ack_for(f"e2e-{seq}"), t0

    async def ack_for(self, dispatch_id: str, within: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(within):
            while True:
                for a in self.acks:
                    if a.get("id") == dispatch_id:
                        return a
                await asyncio.sleep(0.02)

    async def fresh_telemetry(self, within: float = 5.0) -> dict[str, Any]:
        n = len(self.telemetry)
        async with asyncio.timeout(within):
            while len(self.telemetry) <= n:
                await asyncio.sleep(0.05)
        return self.telemetry[-1]

    async def all_devices_on(self, within: float = 60.0) -> dict[str, Any]:
        async with asyncio.timeout(within):
            while True:
                assert self.site.daemon.poll() is None, self.site.daemon_log[-3000:]
                tel = self.telemetry[-1] if self.telemetry else {}
                if tel.get("devices", {}).get("on") == self.site.n_devices:
                    return tel
                await asyncio.sleep(0.1)


class Session:
    """`async with Session(site) as d:` a connected, subscribed dispatcher."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.client = aiomqtt.Client(*site.broker, identifier=f"e2e-{time.monotonic_ns()}")

    async def __aenter__(self) -> Dispatcher:
        await self.client.__aenter__()
        for t in ("ack", "telemetry", "status"):
            await self.client.subscribe(f"{self.site.root}/{t}", qos=1)
        self.d = Dispatcher(self.client, self.site)
        self.task = asyncio.create_task(self.d.listen())
        return self.d

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.__aexit__(None, None, None)


async def truth_until(tail: TruthTail, t_end: float, within: float) -> None:
    """Read the truth log until it covers `t_end` (unix s)."""
    async with asyncio.timeout(within):
        while not tail.t or tail.t[-1] < t_end:
            tail.poll()
            await asyncio.sleep(0.1)
