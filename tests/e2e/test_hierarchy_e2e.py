"""A campus of zones, as separate processes over two bridged brokers.

Three zones, each a `rampd sim` (Modbus loads and LuxOS miners) with its own `rampd run`, talk
to the zones' mosquitto; a bridge carries their status, telemetry and acks to the parent's
mosquitto and dispatches and heartbeats back. One parent `rampd run` drives the three zones as
devices through the same dispatch protocol a grid dispatcher uses (one zone's dispatches
signed). Site power is the sum of the three simulators' ground truth.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from controller.ramp_score import RampRecord, score_series
from controller.tools.broker import find_mosquitto, free_port
from controller.tools.truth import TruthTail, tolerance_kw
from controller.wire import Dispatch
from tests.e2e.harness import Site, run_site, spawn, stop, truth_until
from tests.helpers import Mosquitto, daemon_log_messages, until

pytestmark = pytest.mark.e2e

ZONES = {"hz1": ("127.71", 3), "hz2": ("127.72", 2), "hz3": ("127.73", 4)}
"""Zone site id -> (its loopback net, Modbus loads); each also has 4 miners (that never sleep:
a sleeping miner takes two minutes to wake, and this test is about the parent)."""
SIGNED = "hz2"
PARENT_MAX_KW = 3000.0
BROKERS = ("127.74.0.1", "127.74.0.2")
"""The parent's broker and the zones' (devices and servers of this test live in 127.71-74)."""
CYCLE_S = 0.1

ZONE_CONFIG = """
site_id = "{zone}"
cycle_s = {cycle}
noncontrollable_kw = 40.0
[mqtt]
host = "{broker_host}"
port = {{broker_port}}
[site]
max_kw = 1000.0
deadband_kw = 5.0
[failsafe]
dispatch_timeout_s = 3.0
policy = "hold"
[metrics]
listen = "{metrics_host}:{{metrics_port}}"
{dispatch}
[meter]
host = "{net}.0.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = {loads}
address = "{net}.1.1"
overrides = {{{{ port = 1502 }}}}
[[devices]]
name = "s21"
template = "antminer-s21-luxos"
count = 4
address = "{net}.2.1"
overrides = {{{{ poll_s = 2.0, wake_s = 0.0, sleep_s = 0.0 }}}}
"""

PARENT_CONFIG = """
site_id = "campus"
cycle_s = {cycle}
[mqtt]
host = "{broker_host}"
port = {broker_port}
[site]
max_kw = {max_kw}
deadband_kw = 10.0
[failsafe]
dispatch_timeout_s = 600
[metrics]
listen = "{metrics_host}:{metrics_port}"
[meter]
protocol = "none"
{devices}
"""


def bridge_conf(parent: Mosquitto, zones: Iterable[str] = ZONES) -> list[str]:
    """The zones' broker bridged to the parent's: zone news out, dispatches in, per zone."""
    lines = [
        "connection zones-to-parent",
        f"address {parent.host}:{parent.port}",
        "cleansession true",
        "restart_timeout 1 2",
    ]
    for zone in zones:
        lines += [f"topic rampd/{zone}/{t} out 1" for t in ("status", "telemetry", "ack")]
        lines += [f"topic rampd/{zone}/{t} in 1" for t in ("dispatch", "heartbeat")]
    return lines


@dataclass
class Watch:
    """Everything under rampd/ on the parent's broker: the parent's and the zones' news."""

    client: aiomqtt.Client
    seen: list[tuple[float, str, str, dict[str, Any]]] = field(default_factory=list)
    """(unix time received, root, suffix, body)."""

    async def listen(self) -> None:
        async for msg in self.client.messages:
            root, _, suffix = str(msg.topic).rpartition("/")
            body = json.loads(msg.payload if isinstance(msg.payload, bytes) else b"{}")
            self.seen.append((time.time(), root, suffix, body))

    def latest(self, root: str, suffix: str) -> dict[str, Any]:
        return next((b for _, r, s, b in reversed(self.seen) if (r, s) == (root, suffix)), {})

    def since(self, t0: float, root: str, suffix: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, b) for t, r, s, b in self.seen if t >= t0 and (r, s) == (root, suffix)]


@dataclass
class Campus:
    zones: dict[str, Site]
    parent: subprocess.Popen[bytes]
    parent_log: Path
    parent_broker: Mosquitto


def _zone_config(zone: str, key_file: Path) -> str:
    net, loads = ZONES[zone]
    signed = f'[dispatch]\nhmac_key_file = "{key_file}"' if zone == SIGNED else ""
    return ZONE_CONFIG.format(
        zone=zone,
        cycle=CYCLE_S,
        net=net,
        loads=loads,
        dispatch=signed,
        broker_host=BROKERS[1],
        metrics_host=f"{net}.3.1",
    )


def _parent_config(broker_port: int, key_file: Path) -> str:
    devices = []
    for zone in ZONES:
        access = f'overrides = {{ access = {{ hmac_key_file = "{key_file}" }} }}'
        devices.append(
            f'[[devices]]\nname = "{zone}"\ntemplate = "rampd-zone"\n'
            + (access if zone == SIGNED else "")
        )
    return PARENT_CONFIG.format(
        cycle=CYCLE_S,
        broker_host=BROKERS[0],
        broker_port=broker_port,
        max_kw=PARENT_MAX_KW,
        metrics_host="127.74.1.1",
        metrics_port=free_port("127.74.1.1"),
        devices="\n".join(devices),
    )


@pytest.fixture(scope="module")
def campus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campus]:
    exe = find_mosquitto()
    if exe is None:
        pytest.fail("mosquitto not installed (apt-get install mosquitto)", pytrace=False)
    work = tmp_path_factory.mktemp("hierarchy")
    key_file = work / "hz2.key"
    key_file.write_bytes(os.urandom(32).hex().encode() + b"\n")
    with ExitStack() as stack:
        parent_broker = Mosquitto(exe, work / "parent-broker", host=BROKERS[0])
        parent_broker.workdir.mkdir()
        parent_broker.start()
        stack.callback(parent_broker.stop)
        zone_broker = Mosquitto(
            exe, work / "zone-broker", host=BROKERS[1], extra_conf=bridge_conf(parent_broker)
        )
        zone_broker.workdir.mkdir()
        zone_broker.start()
        stack.callback(zone_broker.stop)
        zones = {}
        for zone in ZONES:
            (work / zone).mkdir()
            zones[zone] = stack.enter_context(
                run_site(
                    zone_broker,
                    work / zone,
                    _zone_config(zone, key_file),
                    site_id=zone,
                    n_devices=ZONES[zone][1] + 4,
                )
            )
        cfg = work / "parent.toml"
        cfg.write_text(_parent_config(parent_broker.port, key_file))
        parent = spawn(["run", "-c", str(cfg)], work / "parent.log")
        stack.callback(stop, parent)
        yield Campus(zones, parent, work / "parent.log", parent_broker)


class Session:
    """A subscriber to everything under rampd/ on the parent's broker, and a dispatcher."""

    def __init__(self, campus: Campus) -> None:
        b = campus.parent_broker
        self.client = aiomqtt.Client(b.host, b.port, identifier=f"qse-{time.monotonic_ns()}")

    async def __aenter__(self) -> Watch:
        await self.client.__aenter__()
        await self.client.subscribe("rampd/#", qos=1)
        self.watch = Watch(self.client)
        self.task = asyncio.create_task(self.watch.listen())
        return self.watch

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.__aexit__(None, None, None)


async def _send(w: Watch, target_kw: float) -> float:
    """A setpoint dispatch to the parent; its publication time once it is accepted."""
    seq = time.time_ns() // 1000
    t0 = time.time()
    body = Dispatch(f"e2e-{seq}", seq, time.time(), "setpoint", target_kw * 1e3)
    await w.client.publish("rampd/campus/dispatch", body.encode())
    ack = await until(
        lambda: next((b for _, _, s, b in w.seen if s == "ack" and b.get("seq") == seq), {}),
        5.0,
        what="parent ack",
    )
    assert ack["accepted"] is True, ack
    return t0


def _campus_truth(tails: list[TruthTail]) -> tuple[np.ndarray, np.ndarray]:
    """The sum of the zones' ground truth, on the first zone's sample times."""
    for tail in tails:
        tail.poll()
    t, kw = tails[0].arrays()
    total = kw.copy()
    for tail in tails[1:]:
        ti, ki = tail.arrays()
        total += np.interp(t, ti, ki)
    return t, total


async def _settle(w: Watch, campus: Campus, target_kw: float, window: float) -> RampRecord:
    """Publish a step to the parent; its figures on the summed ground truth."""
    tails = [TruthTail(site.truth) for site in campus.zones.values()]
    t0 = await _send(w, target_kw)
    for tail in tails:
        await truth_until(tail, t0 + window, within=window + 20)
    t, kw = _campus_truth(tails)
    tol = tolerance_kw(target_kw, PARENT_MAX_KW)
    return score_series(
        t, kw * 1e3, t0=t0, t_end=t0 + window, target_w=target_kw * 1e3, tol_w=tol * 1e3
    )


def _zone_physical_min(w: Watch, t0: float, zone: str, before_kw: float) -> float:
    """From the step's publication: the zone's physical minimum to the target it was given,
    from its first telemetry with that target (time elapsed + what it still needed then).
    Only a target given with the step counts: later ones are the parent's
    trims, and taking one would stretch the goal."""
    for t, tel in w.since(t0, f"rampd/{zone}", "telemetry"):
        if t - t0 > 1.5:  # telemetry comes once a second
            break
        if abs(tel["target_kw"] - before_kw) > 5.0 and tel["physical_min_s"] is not None:
            return (t - t0) + float(tel["physical_min_s"])
    return 0.0  # its target did not move: the step asked nothing of it


def _zones_after(w: Watch, t0: float) -> str:
    """What each zone said of itself after the step (target, measured, physical minimum),
    and its acks: the story of a step that did not settle."""
    lines = []
    for z in ZONES:
        tel = [
            (round(t - t0, 1), b["target_kw"], b["measured_kw"], b["physical_min_s"])
            for t, b in w.since(t0, f"rampd/{z}", "telemetry")
        ]
        acks = [(round(t - t0, 2), b.get("accepted")) for t, b in w.since(t0, f"rampd/{z}", "ack")]
        lines.append(f"{z}: telemetry (s, target, measured, physical min) {tel}; acks {acks}")
    return "\n".join(lines)


async def _all_on(w: Watch, campus: Campus) -> dict[str, Any]:
    def ready() -> dict[str, Any]:
        assert campus.parent.poll() is None, campus.parent_log.read_text()[-3000:]
        # Every device of every zone reported; the parent has every zone, and their ranges
        # from their capability (below the 3 x 1,000 kW the zone template starts from).
        zones_on = all(
            w.latest(f"rampd/{z}", "telemetry").get("devices", {}).get("unknown") == 0
            for z in campus.zones
        )
        tel = w.latest("rampd/campus", "telemetry")
        parent_on = tel.get("devices", {}).get("on") == len(ZONES)
        # The parent has taken every zone's range (each learned from its capability).
        zones_max = sum(w.latest(f"rampd/{z}", "telemetry").get("max_kw", 0.0) for z in ZONES)
        learned = abs(tel.get("max_kw", 3000.0) - zones_max) < 0.05 * zones_max
        return tel if zones_on and parent_on and learned else {}

    return await until(ready, 40.0, interval=0.2, what="every zone and device on")


async def test_a_site_step_settles_across_three_bridged_zones(campus: Campus) -> None:
    async with Session(campus) as w:
        tel = await _all_on(w, campus)
        lo, hi = tel["min_kw"], tel["max_kw"]
        # The parent learned each zone's range from its capability (3, 2 and 4 loads).
        assert 1500.0 < hi < 2600.0 and lo < 700.0, tel
        before = {z: w.latest(f"rampd/{z}", "telemetry")["target_kw"] for z in ZONES}
        # Zones of equal priority are curtailed in reverse index order, like any devices:
        # this step takes all of hz3 and part of hz2 (the zone that checks signatures).
        target = round(hi - 0.7 * (hi - lo), 1)
        fig = await _settle(w, campus, target, window=9.0)
        t0, settle = fig.started_at, fig.settle_s
        pm = max(_zone_physical_min(w, t0, z, before[z]) for z in ZONES)
        parent_pm = next(b for _, b in w.since(t0, "rampd/campus", "telemetry"))
        bound = 1.2 * pm + 2 * CYCLE_S
        print(
            f"\nhierarchy step {hi:.0f} -> {target:.0f} kW: settled in {settle} s "
            f"(overshoot {fig.overshoot_w / 1e3:.1f} kW); slowest zone's physical minimum "
            f"{pm:.2f} s (the parent's own estimate for the campus "
            f"{parent_pm['physical_min_s']} s); "
            f"goal 1.2 x that + 2 cycles = {bound:.2f} s; ratio to the goal "
            f"{'-' if settle is None else f'{settle / bound:.2f}'}"
        )
        assert settle is not None, f"the campus never settled: {fig}; {_zones_after(w, t0)}"
        # Generous (2 cores shared by 9 processes and other tests); the ratio is printed.
        assert settle <= 2.0 * bound + 1.0, (settle, bound)
        # A parent without a meter of its own does not call its absence stale: its status
        # (where a stale meter is said, and retained) never says so.
        parent_said = [b.get("detail", "") for _, b in w.since(0.0, "rampd/campus", "status")]
        assert parent_said and not any("meter" in d for d in parent_said), parent_said
        # The zones the step moved (which ones depends on where each stood) were dispatched
        # over the bridge and acknowledged; the signed zone's dispatches were accepted too.
        moved = {z for z in ZONES if _zone_physical_min(w, t0, z, before[z]) > 0.0}
        assert len(moved) >= 2, moved
        for zone in ZONES:
            acks = [b for _, b in w.since(t0, f"rampd/{zone}", "ack")]
            assert bool(acks) or zone not in moved, zone
            assert all(a["accepted"] for a in acks), (zone, acks[-3:])
        signed = [b for _, b in w.since(0.0, f"rampd/{SIGNED}", "ack")]
        assert signed and all(a["accepted"] for a in signed), signed[-3:]


async def test_a_killed_zone_is_faulted_and_the_others_carry_the_site(campus: Campus) -> None:
    async with Session(campus) as w:
        await _all_on(w, campus)
        dead = campus.zones["hz1"]
        log_before = len(campus.parent_log.read_text())
        dead.daemon.send_signal(signal.SIGKILL)
        dead.daemon.wait(5)
        await until(
            lambda: w.latest("rampd/campus", "telemetry").get("devices", {}).get("fault") == 1,
            15.0,
            interval=0.2,
            what="parent marks the killed zone faulted",
        )
        assert w.latest("rampd/hz1", "status")["state"] == "offline"  # its will, bridged
        # hz1's devices hold their last setpoints; the others move the campus.
        tel = w.latest("rampd/campus", "telemetry")
        live = [w.latest(f"rampd/{z}", "telemetry") for z in ("hz2", "hz3")]
        up = sum(t["max_kw"] - t["measured_kw"] for t in live)
        down = sum(t["min_kw"] - t["measured_kw"] for t in live)
        move = 0.6 * (up if up > -down else down)
        assert abs(move) > 200.0, live
        target = round(tel["measured_kw"] + move, 1)
        fig = await _settle(w, campus, target, window=10.0)
        start_kw = (fig.from_w or 0.0) / 1e3
        print(
            f"\nwith hz1 dead, step {start_kw:.0f} -> {target:.0f} kW: settled in "
            f"{fig.settle_s} s (overshoot {fig.overshoot_w / 1e3:.1f} kW)"
        )
        assert fig.settle_s is not None and fig.settle_s <= 8.0, fig
        # Still one zone faulted (the telemetry's count, from the parent's process image)...
        assert w.latest("rampd/campus", "telemetry").get("devices", {}).get("fault") == 1
        # ... and said once, not once a poll: one WARNING of the zone driver's logger naming
        # hz1 since the kill (counted by level and logger, whatever the wording).
        log = campus.parent_log.read_text()[log_before:]
        said = daemon_log_messages(log, "rampd.zone", logging.WARNING)
        assert len([m for m in said if re.search(r"\bhz1\b", m)]) == 1, said

        # The parent goes silent: a zone's own failsafe takes over (hold, 3 s here).
        assert w.latest("rampd/hz2", "status").get("mode") == "normal"
        campus.parent.send_signal(signal.SIGKILL)
        campus.parent.wait(5)
        status = await until(
            lambda: w.latest("rampd/hz2", "status").get("mode") == "failsafe",
            10.0,
            interval=0.2,
            what="zone enters its failsafe when its parent goes silent",
        )
        assert status
