"""DSX Flex feeds of a parent's zones, end to end, as separate processes over two bridged
brokers.

Two zones, each a `rampd sim` (four Modbus loads) with its own `rampd run`, talk to the
zones' mosquitto, bridged to the parent's; one parent `rampd run` drives both as devices and
runs the DSX Flex agent with three feeds: the site, zone dz1 (`feed-a`) and zone dz2. The
test ISV publishes ES256-signed targets on the parent's broker. A target on feed-a caps dz1's
row in the parent's allocation: dz1's ground truth goes under it while the parent's site
target (a grid dispatch) stays met by dz2; a null target lifts the cap. Every status the
agent publishes (signed with its own key) is validated against dsx-flex.yaml by the ISV.

Bounds are generous: this checks what happens, not how fast.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from joserfc.jwk import ECKey

from controller.tools.broker import find_mosquitto, free_port
from controller.tools.truth import TruthTail
from controller.wire import Dispatch
from tests.dsx_isv import IsvKey, Received, agent_signing_key, feed, isv_on, kw, load_target_event
from tests.dsx_isv import target as dsx_target
from tests.e2e.harness import Site, http_get, run_site, spawn, stop
from tests.e2e.test_hierarchy_e2e import Watch, bridge_conf
from tests.helpers import Mosquitto, until

pytestmark = pytest.mark.e2e

ZONES = {"dz1": "127.77", "dz2": "127.78"}
"""Zone site id -> its loopback net (its meter, loads and metrics)."""
BROKERS = ("127.79.0.1", "127.79.0.2")
"""The parent's broker (the DSX broker too) and the zones'."""
PARENT_METRICS = "127.79.1.1"
SITE_KW = 1300.0
"""The parent's grid dispatch: dz1 (filled first) near its top, dz2 the rest."""
CAP_KW = 500.0
"""feed-a's target: dz1 under it, dz2 takes up the 500-odd kW dz1 gives up."""
TOL_KW = 30.0
"""Generous: meter noise, deadbands (5 kW a zone, 10 kW the parent), breach tolerance."""
AGENT = "dsx-flex-agent/campus-e2e"

ZONE_CONFIG = """
site_id = "{zone}"
cycle_s = 0.1
noncontrollable_kw = 40.0
[mqtt]
host = "{broker}"
port = {{broker_port}}
[site]
max_kw = 1100.0
deadband_kw = 5.0
[failsafe]
dispatch_timeout_s = 30.0
policy = "hold"
[metrics]
listen = "{net}.3.1:{{metrics_port}}"
[meter]
host = "{net}.0.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = 4
address = "{net}.1.1"
overrides = {{{{ port = 1502, poll_s = 0.5 }}}}
"""

PARENT_CONFIG = """
site_id = "campus"
cycle_s = 0.1
[mqtt]
host = "{broker}"
port = {port}
[site]
max_kw = 2200.0
deadband_kw = 10.0
[failsafe]
dispatch_timeout_s = 600
[journal]
path = "{journal}"
[metrics]
listen = "{metrics_host}:{metrics_port}"
[meter]
protocol = "none"
[dsx_flex]
agent_id = "campus-e2e"
isv_ids = ["acme"]
status_period_s = 2.0
sign_key_file = "{sign_key}"
sign_kid = "agent-1"
[dsx_flex.keys]
{kid} = "{public_pem}"
[dsx_flex.feeds]
main = "site"
feed-a = "zone:dz1"
feed-b = "zone:dz2"
[dsx_flex.breach]
tolerance_kw = 15.0
grace_s = 20.0
[[devices]]
name = "dz1"
template = "rampd-zone"
overrides = {{ p_max_kw = 1100.0 }}
[[devices]]
name = "dz2"
template = "rampd-zone"
overrides = {{ p_max_kw = 1100.0 }}
"""


@dataclass
class Campus:
    zones: dict[str, Site]
    parent: subprocess.Popen[bytes]
    parent_log: Path
    broker: Mosquitto
    journal: Path
    key: IsvKey
    agent_key: ECKey
    metrics_port: int

    def metric(self, name: str, **labels: str) -> float | None:
        text = http_get(f"http://{PARENT_METRICS}:{self.metrics_port}/metrics")
        want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return None

    def journal_texts(self, kind: str) -> list[str]:
        try:
            with sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True) as conn:
                rows = conn.execute("SELECT text FROM events WHERE kind = ? ORDER BY at", (kind,))
                return [str(r[0]) for r in rows.fetchall()]
        except sqlite3.Error:
            return []


@pytest.fixture(scope="module")
def campus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campus]:
    exe = find_mosquitto()
    if exe is None:
        pytest.fail("mosquitto not installed (apt-get install mosquitto)", pytrace=False)
    work = tmp_path_factory.mktemp("dsx-zones")
    key = IsvKey.create(work / "isv", "acme-1")
    sign_key, agent_key = agent_signing_key(work)
    with ExitStack() as stack:
        parent_broker = Mosquitto(exe, work / "parent-broker", host=BROKERS[0])
        parent_broker.workdir.mkdir()
        parent_broker.start()
        stack.callback(parent_broker.stop)
        zone_broker = Mosquitto(
            exe, work / "zone-broker", host=BROKERS[1], extra_conf=bridge_conf(parent_broker, ZONES)
        )
        zone_broker.workdir.mkdir()
        zone_broker.start()
        stack.callback(zone_broker.stop)
        zones = {}
        for zone, net in ZONES.items():
            (work / zone).mkdir()
            config = ZONE_CONFIG.format(zone=zone, net=net, broker=BROKERS[1])
            zones[zone] = stack.enter_context(
                run_site(zone_broker, work / zone, config, site_id=zone, n_devices=4)
            )
        metrics_port = free_port(PARENT_METRICS)
        cfg = work / "parent.toml"
        cfg.write_text(
            PARENT_CONFIG.format(
                broker=parent_broker.host,
                port=parent_broker.port,
                journal=work / "parent.sqlite",
                metrics_host=PARENT_METRICS,
                metrics_port=metrics_port,
                sign_key=sign_key,
                kid=key.kid,
                public_pem=key.public_pem,
            )
        )
        parent = spawn(["run", "-c", str(cfg)], work / "parent.log")
        stack.callback(stop, parent)
        yield Campus(
            zones,
            parent,
            work / "parent.log",
            parent_broker,
            work / "parent.sqlite",
            key,
            agent_key,
            metrics_port,
        )


@asynccontextmanager
async def watching(campus: Campus) -> AsyncIterator[Watch]:
    b = campus.broker
    async with aiomqtt.Client(b.host, b.port, identifier=f"qse-{time.monotonic_ns()}") as c:
        await c.subscribe("rampd/#", qos=1)
        w = Watch(c)
        task = asyncio.create_task(w.listen())
        try:
            yield w
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class Truth:
    """A zone's ground truth (its simulator's log)."""

    def __init__(self, site: Site) -> None:
        self.tail = TruthTail(site.truth)

    def level_kw(self, over_s: float = 2.0) -> float:
        self.tail.poll()
        t, p = self.tail.arrays()
        if not len(t):
            return math.nan
        return float(p[t >= t[-1] - over_s].mean())


def event_is(cid: str, event: str) -> Any:
    def pred(r: Received) -> bool:
        return bool(r.event.get("correlationid") == cid and feed(r, "feed-a")["event"] == event)

    return pred


async def _dispatch(w: Watch, target_kw: float) -> None:
    seq = time.time_ns() // 1000
    body = Dispatch(f"e2e-{seq}", seq, time.time(), "setpoint", target_kw * 1e3)
    await w.client.publish("rampd/campus/dispatch", body.encode(), qos=1)
    ack = await until(
        lambda: next((b for _, _, s, b in w.seen if s == "ack" and b.get("seq") == seq), {}),
        10.0,
        what="parent ack",
    )
    assert ack["accepted"] is True, ack


async def test_a_zone_feed_target_caps_its_zone_while_the_other_keeps_the_site_target(
    campus: Campus,
) -> None:
    a, b = Truth(campus.zones["dz1"]), Truth(campus.zones["dz2"])
    broker = campus.broker
    async with (
        watching(campus) as w,
        isv_on(broker.host, broker.port, "acme", AGENT, verify=campus.agent_key) as isv,
    ):

        def ready() -> bool:
            assert campus.parent.poll() is None, campus.parent_log.read_text()[-3000:]
            tel = w.latest("rampd/campus", "telemetry")
            zones_max = sum(
                float(w.latest(f"rampd/{z}", "telemetry").get("max_kw", 0.0)) for z in ZONES
            )
            parent_max = float(tel.get("max_kw", 0.0))
            learned = zones_max > 0 and abs(parent_max - zones_max) < 0.05 * zones_max
            return bool(tel.get("devices", {}).get("on") == 2 and learned)

        await until(ready, 45.0, interval=0.2, what="both zones on, their ranges learned")
        await _dispatch(w, SITE_KW)

        def site_at_target() -> bool:
            return abs(a.level_kw() + b.level_kw() - SITE_KW) <= TOL_KW

        await until(site_at_target, 20.0, interval=0.25, what="the site at its dispatch")
        dz1_max = float(w.latest("rampd/dz1", "telemetry")["max_kw"])
        assert a.level_kw() > CAP_KW + 300.0  # dz1 is filled first: well above the cap

        # A signed target on feed-a: dz1 goes under it, dz2 takes up the rest.
        cid = str(uuid.uuid4())
        event = load_target_event(
            "acme", [dsx_target(CAP_KW, feeds=["feed-a"])], campus.key, correlationid=cid
        )
        await isv.send(event)
        st = await isv.status_where(event_is(cid, "target_set"), 10.0, "target_set")
        (t,) = feed(st, "feed-a")["targets"]
        assert t["active"] and t["correlation_id"] == cid and kw(t["load_constraint"]) == CAP_KW
        assert feed(st, "main")["targets"] == [] and feed(st, "feed-b")["targets"] == []
        await isv.status_where(event_is(cid, "start_ramp_down"), 10.0, "start_ramp_down")

        def capped() -> bool:
            return a.level_kw() <= CAP_KW + TOL_KW / 2 and site_at_target()

        await until(capped, 30.0, interval=0.25, what="dz1 under the cap, the site at target")
        assert b.level_kw() >= SITE_KW - CAP_KW - TOL_KW  # dz2 carries the difference
        done = await isv.status_where(event_is(cid, "end_ramp_down"), 30.0, "end_ramp_down")
        fa = feed(done, "feed-a")
        assert fa["compliant"] is True and fa["in_flight"] is False
        # The zone's own power, bounds from its capability (the parent's view of dz1).
        assert abs(kw(fa["calculated_load"]) - a.level_kw()) <= TOL_KW
        assert abs(kw(fa["metadata"]["power_maximum"]) - dz1_max) <= 0.05 * dz1_max
        assert kw(fa["metadata"]["power_minimum"]) < CAP_KW
        assert kw(fa["metadata"]["default_constraint"]) == 1100.0
        assert campus.metric("rampd_dsx_flex_zone_ceiling_watts", zone="dz1") == CAP_KW * 1e3
        assert math.isnan(campus.metric("rampd_dsx_flex_zone_ceiling_watts", zone="dz2") or 0.0)
        # Held there (a periodic snapshot later): compliant, nothing breached.
        seen = len(isv.statuses)
        st = await isv.status_where(
            lambda r: feed(r, "feed-a")["event"] == "periodic", 10.0, "periodic", after=seen
        )
        assert feed(st, "feed-a")["compliant"] is True
        assert a.level_kw() <= CAP_KW + TOL_KW / 2 and site_at_target()

        # Null: the cap is lifted, dz1 is filled first again and dz2 gives back.
        up = str(uuid.uuid4())
        lift = load_target_event(
            "acme", [dsx_target(None, feeds=["feed-a"])], campus.key, correlationid=up
        )
        await isv.send(lift)
        await isv.status_where(event_is(up, "start_ramp_up"), 10.0, "start_ramp_up")

        def lifted() -> bool:
            return a.level_kw() >= dz1_max - 2 * TOL_KW and site_at_target()

        await until(lifted, 30.0, interval=0.25, what="dz1 back at its top, the site at target")
        end = await isv.status_where(event_is(up, "end_ramp_up"), 30.0, "end_ramp_up")
        fa = feed(end, "feed-a")
        assert fa["targets"] == [] and fa["compliant"] is True
        assert "power_event_start_time" not in fa
        assert math.isnan(campus.metric("rampd_dsx_flex_zone_ceiling_watts", zone="dz1") or 0.0)
        assert not isv.invalid, isv.invalid[:3]
        assert isv.breaches == [], [r.data for r in isv.breaches]
        checked = len(isv.statuses)
        print(f"\n{checked} status messages validated against dsx-flex.yaml (JWS verified)")
        assert checked >= 6

    ceilings = await until(
        lambda: campus.journal_texts("dsx_ceiling"), 10.0, what="dsx_ceiling in the journal"
    )
    assert any("feed-a (zone dz1" in c and "500 kilowatt" in c for c in ceilings), ceilings
    assert "no constraint on feed-a (zone dz1)" in ceilings[-1], ceilings
    # The parent's own site target was never touched by the zone feed: no dsx_flex rail.
    assert not any("dsx_flex" in r for r in campus.journal_texts("rail"))
