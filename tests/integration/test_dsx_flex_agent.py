"""The DSX Flex agent over a real broker, inside a daemon built from a site file (the daemon's
own context: its rails, telemetry, journal and metrics), its control loop not running: what
arrives, what is applied to the rails, what is refused, and what goes out, every message
validated against dsx-flex.yaml by the test ISV.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey

from controller.app import Daemon
from controller.config import load_config
from controller.northbound.dsx_flex.agent import DsxFlexAgent
from controller.wire.timestamps import rfc3339
from tests.dsx_isv import (
    Isv,
    IsvKey,
    agent_signing_key,
    enforcement_event,
    feed,
    isv_on,
    kw,
    load_target_event,
    target,
)
from tests.helpers import Mosquitto, cancel_and_wait, until

AGENT = "dsx-flex-agent/factory-1"
FEED = "main-a"
MAX_KW = 1000.0


@dataclass
class Rig:
    daemon: Daemon
    agent: DsxFlexAgent
    isv: Isv
    key: IsvKey
    rsa: IsvKey
    workdir: Path

    def ceiling_kw(self) -> float | None:
        d = self.daemon.governor.rails.decide(time.time(), baseline_w=None)
        w = d.wishes.get("dsx_flex")
        return None if w is None else w / 1e3

    def events(self, kind: str) -> list[str]:
        j = self.daemon.journal
        assert j is not None
        assert j.flush(5.0)
        return [e.text for e in j.events_between(0, time.time() + 1) if e.kind == kind]

    def metric(self, name: str, **labels: str) -> float:
        v = self.daemon.metrics.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v


def site_toml(broker: Mosquitto, workdir: Path, key: IsvKey, rsa: IsvKey, extra: str) -> str:
    return f"""
site_id = "dsx-it"
[mqtt]
host = "{broker.host}"
port = {broker.port}
[site]
max_kw = {MAX_KW}
[journal]
path = "{workdir / "journal.sqlite"}"
[meter]
host = "127.98.9.250"
port = 1502
[dsx_flex]
agent_id = "factory-1"
isv_ids = ["acme"]
status_period_s = 1.0
{extra}
[dsx_flex.keys]
{key.kid} = "{key.public_pem}"
{rsa.kid} = "{rsa.public_pem}"
[dsx_flex.feeds]
{FEED} = "site"
[[devices]]
name = "row"
template = "modbus-load"
address = "127.98.9.10"
overrides = {{ port = 1502, p_max_kw = {MAX_KW} }}
"""


@asynccontextmanager
async def rig(
    broker: Mosquitto, workdir: Path, extra: str = "", verify: ECKey | None = None
) -> AsyncIterator[Rig]:
    key = IsvKey.create(workdir, "isv-es", "ES256")
    rsa = IsvKey.create(workdir, "isv-rs", "RS256")
    path = workdir / "site.toml"
    path.write_text(site_toml(broker, workdir, key, rsa, extra))
    daemon = Daemon(load_config(path))
    (agent,) = daemon.northbound
    assert isinstance(agent, DsxFlexAgent)
    async with isv_on(broker.host, broker.port, "acme", AGENT, verify=verify) as isv:
        task = asyncio.create_task(agent.run())
        try:
            await until(lambda: agent.link.connected, 10.0, what="agent connected")
            # The first periodic snapshot: the agent is subscribed by then.
            await isv.status_where(lambda r: True, 5.0, "first status")
            yield Rig(daemon, agent, isv, key, rsa, workdir)
            assert not isv.invalid, isv.invalid[:3]
            assert not task.done(), task
        finally:
            await cancel_and_wait(task)
            if daemon.journal is not None:
                daemon.journal.close(timeout_s=5.0)


def cid_status(r: Rig, cid: str, event: str) -> Any:
    def pred(x: Any) -> bool:
        return bool(x.event.get("correlationid") == cid and feed(x, FEED)["event"] == event)

    return pred


async def test_signed_targets_es256_and_rs256_are_applied_and_echoed(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with rig(mosquitto, tmp_path) as r:
        cid = str(uuid.uuid4())
        sent = load_target_event("acme", [target(600.0)], r.key, correlationid=cid)
        await r.isv.send(sent)
        st = await r.isv.status_where(cid_status(r, cid, "target_set"), 5.0, "target_set")
        f = feed(st, FEED)
        (t,) = f["targets"]
        assert t["active"] and t["correlation_id"] == cid
        assert t["load_constraint"] == {"value": 600.0, "unit": "kilowatt"}
        assert "end_time" not in t["interval"]
        assert kw(f["metadata"]["default_constraint"]) == MAX_KW
        # The trace goes on: the status carries the target's trace id.
        assert st.event["traceparent"].split("-")[1] == sent["traceparent"].split("-")[1]
        await r.isv.status_where(cid_status(r, cid, "start_ramp_down"), 5.0, "ramp down")
        assert r.ceiling_kw() == pytest.approx(600.0)
        # RS256, in megawatts: converted to W for the rail.
        cid2 = str(uuid.uuid4())
        await r.isv.send(
            load_target_event("acme", [target(0.45, "megawatt")], r.rsa, correlationid=cid2)
        )
        await r.isv.status_where(cid_status(r, cid2, "target_set"), 5.0, "rs256 target_set")
        await until(lambda: r.ceiling_kw() == pytest.approx(450.0), 5.0, what="450 kW")
        # Null restores the default: the rail asks nothing.
        cid3 = str(uuid.uuid4())
        await r.isv.send(load_target_event("acme", [target(None)], r.key, correlationid=cid3))
        st = await r.isv.status_where(cid_status(r, cid3, "start_ramp_up"), 5.0, "ramp up")
        assert r.ceiling_kw() is None
        assert feed(st, FEED)["compliant"] is True
        assert r.metric("rampd_dsx_flex_targets_total", result="applied") == 3
        assert len(r.events("dsx_target")) == 3
        ceilings = r.events("dsx_ceiling")
        assert any("600 kilowatt" in c for c in ceilings) and "no constraint" in ceilings[-1]


async def test_refused_targets_are_counted_journalled_and_never_applied(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with rig(mosquitto, tmp_path) as r:
        stranger = IsvKey.create(tmp_path, "isv-es", "ES256")  # same kid, other key
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("signature", load_target_event("acme", [target(100.0)], stranger), "acme"),
            ("unknown_isv", load_target_event("mallory", [target(100.0)], r.key), "mallory"),
            ("signature", load_target_event("acme", [target(100.0)], None), "acme"),
            (
                "envelope",
                load_target_event("acme", [target(100.0)], r.key, specversion="1.0"),
                "acme",
            ),
            ("envelope", load_target_event("other", [target(100.0)], r.key), "acme"),
            (
                "stale",
                load_target_event("acme", [target(100.0)], r.key, at=time.time() - 3600),
                "acme",
            ),
            ("feed", load_target_event("acme", [target(100.0, feeds=["main-z"])], r.key), "acme"),
            (
                "payload",
                load_target_event(
                    "acme", [target(100.0, start=time.time() + 60, end=time.time() + 30)], r.key
                ),
                "acme",
            ),
        ]
        # A signature over other content: the payload swapped under a valid header and sig.
        good = load_target_event("acme", [target(100.0)], r.key)
        h, _, s = good["data"].split(".")
        other = load_target_event("acme", [target(999.0)], r.key)["data"].split(".")[1]
        cases.append(("signature", {**good, "data": f"{h}.{other}.{s}"}, "acme"))
        for _, event, isv in cases:
            await r.isv.send(event, isv=isv)
        await r.isv.send_raw("grid/v1/isv/acme/loadtarget/set", b"\xff not json")
        want: dict[str, int] = {}
        for result, _, _ in cases:
            want[result] = want.get(result, 0) + 1
        want["envelope"] += 1

        def counted() -> bool:
            return all(
                r.metric("rampd_dsx_flex_targets_total", result=k) == n for k, n in want.items()
            )

        await until(counted, 10.0, what=f"refusals counted {want}")
        assert r.ceiling_kw() is None
        assert r.metric("rampd_dsx_flex_targets_total", result="applied") == 0
        refused = r.events("dsx_refused")
        assert len(refused) == len(cases) + 1, refused
        assert any("mallory" in t and "unknown_isv" in t for t in refused)
        assert not r.events("dsx_target")
        # Nothing refused shows up as a target in the snapshots.
        assert all(not feed(s, FEED)["targets"] for s in r.isv.statuses)


async def test_a_scheduled_window_over_a_standing_target_hands_back(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with rig(mosquitto, tmp_path) as r:
        standing = str(uuid.uuid4())
        await r.isv.send(load_target_event("acme", [target(800.0)], r.key, correlationid=standing))
        await until(lambda: r.ceiling_kw() == pytest.approx(800.0), 5.0, what="standing")
        now = time.time()
        window = str(uuid.uuid4())
        await r.isv.send(
            load_target_event(
                "acme", [target(300.0, start=now + 2.0, end=now + 4.0)], r.key, correlationid=window
            )
        )
        st = await r.isv.status_where(cid_status(r, window, "target_set"), 5.0, "window set")
        listed = {t["correlation_id"]: t for t in feed(st, FEED)["targets"]}
        assert listed[standing]["active"] and not listed[window]["active"]
        assert r.ceiling_kw() == pytest.approx(800.0)
        await until(lambda: r.ceiling_kw() == pytest.approx(300.0), 5.0, what="window on")
        assert time.time() >= now + 2.0
        await until(lambda: r.ceiling_kw() == pytest.approx(800.0), 5.0, what="handed back")
        assert time.time() >= now + 4.0
        st = await r.isv.status_where(
            lambda x: x.at >= now + 4.0 and feed(x, FEED)["event"] == "start_ramp_up", 5.0, "up"
        )
        (only,) = feed(st, FEED)["targets"]  # the window is over and gone
        assert only["correlation_id"] == standing and only["active"]


async def test_enforcement_events_are_journalled(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async with rig(mosquitto, tmp_path, 'infra_ids = ["ima-prod"]') as r:
        breach_id = str(uuid.uuid4())
        data = {
            "breach_id": breach_id,
            "feed_tag": FEED,
            "action": "applied",
            "code": "partial",
            "diag_msg": "one BMC unreachable",
            "results": [
                {
                    "resource_id": "row",
                    "resource_type": "chassis",
                    "requested_action": "power_cap",
                    "code": "applied",
                },
                {
                    "resource_id": "rack-2",
                    "resource_type": "chassis",
                    "requested_action": "power_cap",
                    "code": "failed",
                    "message": "BMC unreachable after 3 retries",
                },
            ],
            "timestamp": rfc3339(time.time()),
        }
        topic = "grid/v1/infra/ima-prod/powerbreach/enforcement"
        await r.isv.send_raw(
            topic, json.dumps(enforcement_event("ima-prod", data, r.key)).encode(), 2
        )
        other = "grid/v1/infra/rogue/powerbreach/enforcement"
        await r.isv.send_raw(other, json.dumps(enforcement_event("rogue", data, r.key)).encode(), 2)
        await until(
            lambda: r.metric("rampd_dsx_flex_enforcements_total", result="journalled") == 1,
            10.0,
            what="journalled",
        )
        (text,) = r.events("dsx_enforcement")
        assert breach_id in text and "partial" in text and "1 applied, 1 failed" in text
        assert "not a breach of this agent" in text
        # rogue's topic is not subscribed at all: infra_ids names the one listened to.
        assert r.metric("rampd_dsx_flex_enforcements_total", result="unknown_infra") == 0


async def test_status_data_is_signed_when_the_agent_has_a_key(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    path, public = agent_signing_key(tmp_path)
    extra = f'sign_key_file = "{path}"\nsign_kid = "agent-1"'
    async with rig(mosquitto, tmp_path, extra, verify=public) as r:
        st = await r.isv.status_where(lambda x: True, 5.0, "a status")
        assert isinstance(st.event["data"], str)  # a JWS, verified and validated by the ISV
        assert FEED in st.data["feeds"]


async def test_targets_survive_a_restart(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cid = str(uuid.uuid4())
    async with rig(mosquitto, tmp_path) as r:
        now = time.time()
        await r.isv.send(
            load_target_event(
                "acme",
                [target(500.0, end=now + 120.0), target(200.0, start=now + 0.5, end=now + 1.0)],
                r.key,
                correlationid=cid,
            )
        )
        await until(lambda: r.ceiling_kw() == pytest.approx(200.0), 5.0, what="window")
        await until(lambda: r.ceiling_kw() == pytest.approx(500.0), 5.0, what="after it")
    async with rig(mosquitto, tmp_path) as r2:
        await until(lambda: r2.ceiling_kw() == pytest.approx(500.0), 5.0, what="resumed")
        (t,) = feed(r2.isv.statuses[-1], FEED)["targets"]  # the window is over
        assert t["correlation_id"] == cid and t["active"]
        assert r2.events("dsx_resumed") == ["resumed 1 of 2 journalled target(s) not over yet"]


async def test_the_agent_reconnects_after_the_broker_restarts(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with rig(mosquitto, tmp_path) as r:
        mosquitto.stop()
        await until(lambda: not r.agent.link.connected, 10.0, what="agent noticed")
        mosquitto.start()
        await until(lambda: r.agent.link.connected, 20.0, what="agent back")
        # The ISV's own client died with the broker; a new one sees the agent working.
        async with isv_on(mosquitto.host, mosquitto.port, "acme", AGENT) as isv:
            cid = str(uuid.uuid4())
            await isv.send(load_target_event("acme", [target(700.0)], r.key, correlationid=cid))
            await isv.status_where(
                lambda x: x.event.get("correlationid") == cid, 5.0, "after reconnect"
            )
            assert r.ceiling_kw() == pytest.approx(700.0)
        r.isv.invalid.clear()


async def test_a_redelivered_event_counts_once_and_a_forgery_cannot_take_its_id(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    async with rig(mosquitto, tmp_path) as r:
        genuine = load_target_event("acme", [target(650.0)], r.key)
        forged = {
            **genuine,
            "data": IsvKey.create(tmp_path / "other", "isv-es").sign({"targets": []}),
        }
        await r.isv.send(forged)  # the same id first, under a key nobody configured
        await r.isv.send(genuine)
        await r.isv.send(genuine)  # QoS 1 may deliver twice
        await until(
            lambda: r.metric("rampd_dsx_flex_targets_total", result="duplicate") == 1,
            10.0,
            what="the duplicate counted",
        )
        assert r.metric("rampd_dsx_flex_targets_total", result="signature") == 1
        assert r.metric("rampd_dsx_flex_targets_total", result="applied") == 1
        assert r.ceiling_kw() == pytest.approx(650.0)
