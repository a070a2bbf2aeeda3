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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from controller.dispatcher import DispatcherClient
from controller.tools.broker import free_port
from controller.tools.truth import TruthTail
from controller.wire import Telemetry, rfc3339
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
    return rfc3339(dt.timestamp())


def wire_kw(w: float | None) -> float | None:
    """A model's W as the wire's kW (the same float the daemon published)."""
    return None if w is None else round(w / 1e3, 3)


def dispatch(seq: int, **fields: Any) -> dict[str, Any]:
    """A dispatch as a plain JSON object, for tests that send what no encoder would."""
    body: dict[str, Any] = {
        "id": f"e2e-{seq}",
        "seq": seq,
        "issued_at": rfc3339(time.time()),
        "mode": "setpoint",
        "ramp_s": 0,
    }
    body.update(fields)
    return body


class SiteDispatcher(DispatcherClient):
    """`async with SiteDispatcher(site) as d:` the one dispatcher client, on a test site."""

    def __init__(self, site: Site, *, key: bytes | None = None) -> None:
        super().__init__(*site.broker, site.root, key=key, id_prefix="e2e")
        self.site = site

    async def all_devices_on(self, within: float = 60.0) -> Telemetry:
        async with asyncio.timeout(within):
            while True:
                assert self.site.daemon.poll() is None, self.site.daemon_log[-3000:]
                tel = self.latest()
                if tel is not None and tel.devices.on == self.site.n_devices:
                    return tel
                await asyncio.sleep(0.1)


async def truth_until(tail: TruthTail, t_end: float, within: float) -> None:
    """Read the truth log until it covers `t_end` (unix s)."""
    async with asyncio.timeout(within):
        while not tail.t or tail.t[-1] < t_end:
            tail.poll()
            await asyncio.sleep(0.1)
