"""DSX Flex end to end: mosquitto + `rampd sim` + `rampd run` as processes, and the test ISV.

The ISV publishes an ES256-signed load target; the simulator's ground truth goes to it, the
DSX Flex rail governs, and the status snapshots tell the story (target_set echoing the
correlation id, start and end of the ramp down, compliant). A target signed with the wrong
key and one from an ISV nobody configured are refused (counted, journalled) and never
applied. A target below what the site can reach is breached: the alert goes active, then
escalated, with shed hints, and resolves when the ISV lifts the constraint (null), after
which the site ramps back up. Every status and breach message is validated against
dsx-flex.yaml's schemas as it arrives.

Bounds are generous: this checks what happens, not how fast.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.tools.truth import TruthTail
from tests.dsx_isv import IsvKey, Received, feed, isv_on, kw, load_target_event, target
from tests.e2e.harness import Site, SiteDispatcher, http_get, run_site
from tests.helpers import Mosquitto, until

pytestmark = pytest.mark.e2e

LOAD_KW, OTHER_KW = 250.0, 100.0
FULL_KW = 4 * LOAD_KW + OTHER_KW
TARGET_KW = 600.0
UNREACHABLE_KW = 50.0  # below the non-flexible load alone
TOL_KW = 25.0
FEED = "main-a"
AGENT = "dsx-flex-agent/factory-e2e"


def site_config(journal: Path, key: IsvKey) -> str:
    return f"""
site_id = "dsx"
cycle_s = 0.1
noncontrollable_kw = {OTHER_KW}
[mqtt]
host = "127.0.0.1"
port = {{broker_port}}
[site]
min_kw = 0.0
max_kw = 2000.0
deadband_kw = 5.0
[failsafe]
dispatch_timeout_s = 600
[journal]
path = "{journal}"
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[meter]
host = "127.98.2.1"
port = 1502
[dsx_flex]
agent_id = "factory-e2e"
isv_ids = ["acme"]
status_period_s = 2.0
[dsx_flex.keys]
{key.kid} = "{key.public_pem}"
[dsx_flex.feeds]
{FEED} = "site"
[dsx_flex.breach]
tolerance_kw = 10.0
grace_s = 3.0
escalate_after_s = 6.0
resolve_after_s = 2.0
[[devices]]
name = "row"
template = "modbus-load"
count = 4
address = "127.98.1.1"
overrides = {{{{ port = 1502, poll_s = 0.5 }}}}
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[IsvKey, IsvKey]:
    d = tmp_path_factory.mktemp("keys")
    return IsvKey.create(d, "acme-1"), IsvKey.create(d / "other", "acme-1")  # same kid, other key


@pytest.fixture(scope="module")
def site(
    module_mosquitto: Mosquitto,
    tmp_path_factory: pytest.TempPathFactory,
    keys: tuple[IsvKey, IsvKey],
) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("dsx")
    config = site_config(workdir / "journal.sqlite", keys[0])
    with run_site(module_mosquitto, workdir, config, site_id="dsx", n_devices=4) as s:
        yield s


class Truth:
    def __init__(self, path: Path) -> None:
        self.tail = TruthTail(path)

    def level_kw(self, over_s: float = 1.0) -> float:
        self.tail.poll()
        t, p = self.tail.arrays()
        return float(p[t >= t[-1] - over_s].mean())


def governing(d: SiteDispatcher) -> str | None:
    tel = d.latest()
    return None if tel is None or tel.rails is None else tel.rails.governing


def metric(site: Site, name: str, **labels: str) -> float:
    text = http_get(f"http://127.0.0.1:{site.metrics_port}/metrics")
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def journal(site: Site, kind: str) -> list[str]:
    db = site.logs / "journal.sqlite"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT text FROM events WHERE kind = ? ORDER BY at", (kind,))
            return [str(r[0]) for r in rows.fetchall()]
    except sqlite3.Error:
        return []


def event_is(cid: str, event: str) -> Any:
    def pred(r: Received) -> bool:
        return bool(r.event.get("correlationid") == cid and feed(r, FEED)["event"] == event)

    return pred


async def test_a_signed_target_is_applied_bad_ones_refused_and_a_breach_alerted(
    site: Site, module_mosquitto: Mosquitto, keys: tuple[IsvKey, IsvKey]
) -> None:
    key, impostor = keys
    truth = Truth(site.truth)
    broker = module_mosquitto
    async with SiteDispatcher(site) as d, isv_on(broker.host, broker.port, "acme", AGENT) as isv:
        await d.all_devices_on(within=60.0)
        await until(
            lambda: abs(truth.level_kw() - FULL_KW) <= TOL_KW,
            30.0,
            interval=0.25,
            what="full power at rest",
        )
        first = await isv.status_where(
            lambda r: True, 10.0, "a status at full power", after=len(isv.statuses)
        )
        f = feed(first, FEED)
        assert f["targets"] == [] and f["compliant"] is True
        assert kw(f["metadata"]["power_maximum"]) >= FULL_KW - TOL_KW

        # An ES256-signed target: applied, echoed, reached on ground truth.
        cid = str(uuid.uuid4())
        await isv.send(
            load_target_event("acme", [target(TARGET_KW, feeds=[FEED])], key, correlationid=cid)
        )
        st = await isv.status_where(event_is(cid, "target_set"), 10.0, "target_set")
        (t,) = feed(st, FEED)["targets"]
        assert t["active"] and t["correlation_id"] == cid
        await isv.status_where(event_is(cid, "start_ramp_down"), 10.0, "start_ramp_down")
        # Settled there: two seconds of ground truth at the target (meter noise aside).
        await until(
            lambda: abs(truth.level_kw(over_s=2.0) - TARGET_KW) <= TOL_KW / 2,
            30.0,
            interval=0.25,
            what="ground truth at the target",
        )
        done = await isv.status_where(event_is(cid, "end_ramp_down"), 30.0, "end_ramp_down")
        fd = feed(done, FEED)
        assert fd["compliant"] is True and fd["in_flight"] is False
        assert kw(fd["calculated_load"]) == pytest.approx(TARGET_KW)
        assert "power_event_start_time" in fd
        await until(lambda: governing(d) == "dsx_flex", 10.0, interval=0.2, what="dsx governs")

        # The wrong key and an unknown ISV: refused, counted, journalled, never applied.
        await isv.send(load_target_event("acme", [target(200.0)], impostor))
        await isv.send(load_target_event("mallory", [target(200.0)], key), isv="mallory")
        await until(
            lambda: (
                metric(site, "rampd_dsx_flex_targets_total", result="signature") == 1
                and metric(site, "rampd_dsx_flex_targets_total", result="unknown_isv") == 1
            ),
            10.0,
            interval=0.25,
            what="both refusals counted",
        )
        seen = len(isv.statuses)
        await isv.status_where(lambda r: True, 10.0, "a status after the refusals", after=seen)
        assert abs(truth.level_kw(over_s=2.0) - TARGET_KW) <= TOL_KW
        assert all(
            [x["correlation_id"] for x in feed(s, FEED)["targets"]] == [cid]
            for s in isv.statuses[seen:]
        )
        refused = journal(site, "dsx_refused")
        assert len(refused) == 2 and any("mallory" in r for r in refused), refused

        # Below what the site can reach: a breach, active then escalated, critical.
        low = str(uuid.uuid4())
        await isv.send(load_target_event("acme", [target(UNREACHABLE_KW)], key, correlationid=low))
        active = await isv.breach_where(lambda r: r.data["status"] == "active", 30.0, "active")
        a = active.data
        assert a["severity"] == "critical" and a["feed_tag"] == FEED
        assert a["target"]["correlation_id"] == low
        assert kw(a["measured_load"]) > UNREACHABLE_KW * 1.2
        assert a["shed_hints"] and a["infrastructure_actions"] == ["SHUTDOWN_NODES"]
        bid = a["breach"]["breach_id"]
        esc = await isv.breach_where(lambda r: r.data["status"] == "escalated", 30.0, "escalated")
        assert esc.data["breach"]["breach_id"] == bid
        assert esc.data["infrastructure_actions"][:2] == ["SHUTDOWN_NODES", "SHUTDOWN_RACKS"]
        st = await isv.status_where(
            lambda r: feed(r, FEED)["event"] == "periodic",
            10.0,
            "periodic while breached",
            after=len(isv.statuses),
        )
        assert feed(st, FEED)["compliant"] is False  # the site cannot get that low

        # Lifted (null): the breach resolves with the same id, the site ramps back up.
        up = str(uuid.uuid4())
        await isv.send(load_target_event("acme", [target(None)], key, correlationid=up))
        await isv.status_where(event_is(up, "start_ramp_up"), 10.0, "start_ramp_up")
        res = await isv.breach_where(lambda r: r.data["status"] == "resolved", 10.0, "resolved")
        assert res.data["breach"]["breach_id"] == bid and "resolved_at" in res.data["breach"]
        assert "shed_hints" not in res.data and res.data["infrastructure_actions"] == []
        await until(
            lambda: abs(truth.level_kw() - FULL_KW) <= TOL_KW,
            30.0,
            interval=0.25,
            what="back at full power",
        )
        end = await isv.status_where(event_is(up, "end_ramp_up"), 30.0, "end_ramp_up")
        assert "power_event_start_time" not in feed(end, FEED)
        await until(lambda: governing(d) == "default", 10.0, interval=0.2, what="default")
        assert not isv.invalid, isv.invalid[:3]
        assert len(isv.breaches) == 3, [b.data["status"] for b in isv.breaches]

    assert metric(site, "rampd_dsx_flex_targets_total", result="applied") == 3
    breaches = journal(site, "dsx_breach")
    assert [b.split()[0] for b in breaches] == ["active", "escalated", "resolved"], breaches
    rails = " ".join(journal(site, "rail"))
    assert "dsx_flex" in rails, rails
