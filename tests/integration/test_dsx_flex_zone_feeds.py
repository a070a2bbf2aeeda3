"""DSX Flex feeds of a parent's zones, over a real broker, inside a parent daemon built from a
site file (its control loop and zone links not running): a zone feed's target becomes the
ceiling of that zone's row (what the control cycle reads), never the site's rail; a target
naming no feed applies to every feed; null lifts; a restart puts the ceiling back from the
journal. Every status is validated against dsx-flex.yaml by the test ISV."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.app import Daemon
from controller.config import load_config
from controller.northbound.dsx_flex.agent import DsxFlexAgent
from tests.dsx_isv import Isv, IsvKey, Received, feed, isv_on, kw, load_target_event, target
from tests.helpers import Mosquitto, cancel_and_wait, until

AGENT = "dsx-flex-agent/parent-1"


def parent_toml(broker: Mosquitto, workdir: Path, key: IsvKey) -> str:
    return f"""
site_id = "parent-it"
[mqtt]
host = "{broker.host}"
port = {broker.port}
[site]
max_kw = 3000
[journal]
path = "{workdir / "journal.sqlite"}"
[meter]
protocol = "none"
[dsx_flex]
agent_id = "parent-1"
isv_ids = ["acme"]
status_period_s = 1.0
[dsx_flex.keys]
{key.kid} = "{key.public_pem}"
[dsx_flex.feeds]
main = "site"
feed-a = "zone:za"
feed-b = "zone:zb"
[[devices]]
name = "za"
template = "rampd-zone"
overrides = {{ p_max_kw = 1200.0 }}
[[devices]]
name = "zb"
template = "rampd-zone"
"""


@dataclass
class Rig:
    daemon: Daemon
    agent: DsxFlexAgent
    isv: Isv
    key: IsvKey

    def zone_ceilings_kw(self) -> dict[str, float]:
        c = self.daemon.ceilings
        return {z: w / 1e3 for z in ("za", "zb") if (w := c.get(z)) is not None}

    def rail_kw(self) -> float | None:
        w = self.daemon.governor.rails.decide(time.time(), baseline_w=None).wishes.get("dsx_flex")
        return None if w is None else w / 1e3


@asynccontextmanager
async def rig(broker: Mosquitto, workdir: Path, key: IsvKey) -> AsyncIterator[Rig]:
    path = workdir / "site.toml"
    path.write_text(parent_toml(broker, workdir, key))
    daemon = Daemon(load_config(path))
    (agent,) = daemon.northbound
    assert isinstance(agent, DsxFlexAgent)
    async with isv_on(broker.host, broker.port, "acme", AGENT) as isv:
        task = asyncio.create_task(agent.run())
        try:
            await until(lambda: agent.link.connected, 10.0, what="agent connected")
            await isv.status_where(lambda r: True, 5.0, "first status")
            yield Rig(daemon, agent, isv, key)
            assert not isv.invalid, isv.invalid[:3]
            assert not task.done(), task
        finally:
            await cancel_and_wait(task)
            if daemon.journal is not None:
                daemon.journal.close(timeout_s=5.0)


def on(tag: str, cid: str, event: str) -> Any:
    def pred(r: Received) -> bool:
        return bool(r.event.get("correlationid") == cid and feed(r, tag)["event"] == event)

    return pred


async def test_a_zone_feed_caps_its_zone_row_and_never_the_site(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    key = IsvKey.create(tmp_path, "acme-1")
    async with rig(mosquitto, tmp_path, key) as r:
        cid = str(uuid.uuid4())
        await r.isv.send(
            load_target_event("acme", [target(400.0, feeds=["feed-a"])], key, correlationid=cid)
        )
        st = await r.isv.status_where(on("feed-a", cid, "target_set"), 5.0, "target_set")
        down = await r.isv.status_where(on("feed-a", cid, "start_ramp_down"), 5.0, "ramp down")
        assert r.zone_ceilings_kw() == {"za": 400.0} and r.rail_kw() is None
        # What the control cycle reads: one array over the image, za's row capped.
        rows = r.daemon.ceilings.array(r.daemon.image.names)
        assert rows is not None and rows.tolist() == [400e3, float("inf")]
        fa, fb = feed(st, "feed-a"), feed(st, "feed-b")
        assert [t["correlation_id"] for t in fa["targets"]] == [cid] and fb["targets"] == []
        # No reading from the zone yet: where it is heading (its setpoint under the cap).
        fa = feed(down, "feed-a")
        assert kw(fa["calculated_load"]) == 400.0 and fa["compliant"] is True
        assert kw(fa["metadata"]["default_constraint"]) == 1200.0
        assert kw(fb["metadata"]["default_constraint"]) == 1000.0
        ceiling = r.daemon.metrics.registry.get_sample_value(
            "rampd_dsx_flex_zone_ceiling_watts", {"zone": "za"}
        )
        assert ceiling == 400e3

        # No feed named: every feed, the site's rail and both zones.
        every = str(uuid.uuid4())
        await r.isv.send(
            load_target_event("acme", [target(0.9, "megawatt")], key, correlationid=every)
        )
        await r.isv.status_where(on("main", every, "target_set"), 5.0, "target_set on all")
        await until(
            lambda: r.zone_ceilings_kw() == {"za": 900.0, "zb": 900.0} and r.rail_kw() == 900.0,
            5.0,
            what="every feed at 900 kW",
        )

        # Null on feed-b only: zb is free again, za and the site keep theirs.
        free = str(uuid.uuid4())
        await r.isv.send(
            load_target_event("acme", [target(None, feeds=["feed-b"])], key, correlationid=free)
        )
        await r.isv.status_where(on("feed-b", free, "start_ramp_up"), 5.0, "ramp up")
        assert r.zone_ceilings_kw() == {"za": 900.0} and r.rail_kw() == 900.0
        texts = [e.text for e in _events(r.daemon, "dsx_ceiling")]
        assert any("on feed-a (zone za, correlation" in t for t in texts), texts
        assert "no constraint on feed-b (zone zb)" in texts[-1], texts


async def test_a_restart_puts_a_zone_ceiling_back(mosquitto: Mosquitto, tmp_path: Path) -> None:
    key = IsvKey.create(tmp_path, "acme-1")
    async with rig(mosquitto, tmp_path, key) as r:
        await r.isv.send(
            load_target_event("acme", [target(300.0, feeds=["feed-b"], end=time.time() + 600)], key)
        )
        await until(lambda: r.zone_ceilings_kw() == {"zb": 300.0}, 5.0, what="zb capped")
    async with rig(mosquitto, tmp_path, key) as again:
        await until(lambda: again.zone_ceilings_kw() == {"zb": 300.0}, 5.0, what="zb again")
        st = await again.isv.status_where(
            lambda x: bool(feed(x, "feed-b")["targets"]), 5.0, "feed-b's target listed"
        )
        (t,) = feed(st, "feed-b")["targets"]
        assert t["active"] and kw(t["load_constraint"]) == 300.0
        assert again.rail_kw() is None


def _events(daemon: Daemon, kind: str) -> list[Any]:
    j = daemon.journal
    assert j is not None and j.flush(5.0)
    return [e for e in j.events_between(0, time.time() + 1) if e.kind == kind]
