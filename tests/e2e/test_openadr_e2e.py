"""OpenADR 3.1 end to end: mosquitto + `rampd sim` + `rampd run` as processes, the test VTN
(tests/openadr_vtn.py) in this process. An event created on the VTN by its business logic
moves the simulated site (ground truth) below the event's import limit, the VEN's DEMAND
reports carry the power the site measured, and deleting the event hands the site back.

Every request and answer between the daemon's VEN and the VTN, every MQTT notification and
every report payload is validated against openadr3.yaml and its enumerations by the VTN;
the test fails on any conformance error.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.dispatcher import DispatcherClient
from controller.tools.truth import TruthTail
from controller.wire.timestamps import parse_rfc3339
from tests.e2e.harness import Site, SiteDispatcher, run_site
from tests.helpers import Mosquitto, until
from tests.openadr_vtn import (
    IGNORE_OAUTH2_WARNING,
    VEN_CLIENT,
    BlClient,
    Vtn,
    iter_report_values,
    limit_event,
)

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings(IGNORE_OAUTH2_WARNING)]

LOAD_KW, OTHER_KW = 250.0, 100.0
FULL_KW = 4 * LOAD_KW + OTHER_KW
LIMIT_KW = 600.0
TOL_KW = 40.0


def site_config(workdir: Path, vtn_url: str) -> str:
    (workdir / "ven.secret").write_text(VEN_CLIENT[1] + "\n")
    return f"""
site_id = "oadr"
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
path = "{workdir / "journal.sqlite"}"
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[openadr]
vtn_url = "{vtn_url}"
client_id = "{VEN_CLIENT[0]}"
client_secret_file = "ven.secret"
programs = ["capacity"]
poll_s = 30
report_period_s = 2
timeout_s = 5
[meter]
host = "127.99.2.1"
port = 1502
[[devices]]
name = "load"
template = "modbus-load"
count = 4
address = "127.99.1.1"
overrides = {{{{ port = 1502, poll_s = 0.5 }}}}
"""


async def _create_program(vtn: Vtn) -> str:
    async with BlClient(vtn) as bl:
        p = await bl.create_program("capacity")
    return str(p["id"])


@pytest.fixture(scope="module")
def vtn(module_mosquitto: Mosquitto) -> Iterator[Vtn]:
    with Vtn(mqtt=(module_mosquitto.host, module_mosquitto.port)) as v:
        yield v
    assert v.errors == [], "\n".join(v.errors)


@pytest.fixture(scope="module")
def program_id(vtn: Vtn) -> str:
    """The program the site's VEN obeys, created before the daemon starts."""
    return asyncio.run(_create_program(vtn))


@pytest.fixture(scope="module")
def site(
    module_mosquitto: Mosquitto,
    vtn: Vtn,
    program_id: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("oadr")
    with run_site(
        module_mosquitto, workdir, site_config(workdir, vtn.url), site_id="oadr", n_devices=4
    ) as s:
        yield s


def truth_kw(tail: TruthTail, t0: float, t1: float) -> float | None:
    tail.poll()
    t, kw = tail.arrays()
    sel = (t >= t0) & (t < t1)
    return float(kw[sel].mean()) if sel.any() else None


def governing(d: DispatcherClient) -> str | None:
    tel = d.latest()
    return None if tel is None or tel.rails is None else tel.rails.governing


def demand_reports(vtn: Vtn, event_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in vtn.reports()
        if r["eventID"] == event_id and r["payloadDescriptors"][0]["payloadType"] == "DEMAND"
    ]


async def test_event_moves_the_site_and_reports_come_back(
    site: Site, vtn: Vtn, program_id: str
) -> None:
    tail = TruthTail(site.truth)
    pid = program_id
    async with SiteDispatcher(site) as d, BlClient(vtn) as bl:
        await d.all_devices_on(within=60.0)
        await until(
            lambda: (
                (k := truth_kw(tail, time.time() - 1.0, time.time())) is not None
                and abs(k - FULL_KW) <= TOL_KW
            ),
            30.0,
            interval=0.25,
            what="full power at rest",
        )
        await until(
            lambda: "rampd_openadr_notifier_connected 1.0" in _metrics(site),
            30.0,
            interval=0.25,
            what="VEN registered, notifier up",
        )
        assert [v["venName"] for v in vtn.vens()] == ["oadr"]

        reports = [
            {
                "payloadType": "DEMAND",
                "readingType": "MEAN",
                "units": "KW",
                "frequency": 1,
                "repeat": -1,
            }
        ]
        created = time.time()
        ev = await bl.create_event(limit_event(pid, LIMIT_KW, reports=reports, name="peak"))
        await until(
            lambda: (
                (k := truth_kw(tail, time.time() - 1.0, time.time())) is not None
                and abs(k - LIMIT_KW) <= TOL_KW
            ),
            30.0,
            interval=0.25,
            what="site at the limit (ground truth)",
        )
        settled = time.time()
        assert governing(d) == "openadr"
        tel = d.latest()
        assert tel is not None and tel.rails is not None
        assert tel.rails.wishes_w["openadr"] == pytest.approx(LIMIT_KW * 1e3)
        assert ev["id"] in tel.rails.reason

        # A DEMAND report over a slot after the site settled, against ground truth.
        def settled_report() -> dict[str, Any] | None:
            for r in demand_reports(vtn, ev["id"]):
                iv = r["resources"][0]["intervals"][0]
                if parse_rfc3339(iv["intervalPeriod"]["start"]) >= settled:
                    return r
            return None

        found = await until(settled_report, 20.0, interval=0.25, what="a settled report")
        assert found is not None
        report: dict[str, Any] = found
        iv = report["resources"][0]["intervals"][0]
        start = parse_rfc3339(iv["intervalPeriod"]["start"])
        truth = truth_kw(tail, start, start + 2.0)
        assert truth is not None
        ((kind, value),) = list(iter_report_values(report))
        assert kind == "DEMAND" and value == pytest.approx(truth, abs=TOL_KW), (report, truth)
        assert value <= LIMIT_KW + TOL_KW
        assert report["clientID"] == VEN_CLIENT[0] and report["clientName"] == "oadr"
        # Reports started with the event, not before it.
        firsts = [
            parse_rfc3339(r["resources"][0]["intervals"][0]["intervalPeriod"]["start"])
            for r in demand_reports(vtn, ev["id"])
        ]
        assert min(firsts) >= created - 1.0

        # The VTN ends the event: the site goes back to full power.
        await bl.delete_event(ev["id"])
        await until(
            lambda: (
                (k := truth_kw(tail, time.time() - 1.0, time.time())) is not None
                and abs(k - FULL_KW) <= TOL_KW
            ),
            30.0,
            interval=0.25,
            what="full power after the event",
        )
        await until(lambda: governing(d) == "default", 10.0, interval=0.2, what="default")

    # The journal tells the story: registration, the event, its level, its end, reports.
    texts = _openadr_events(site)
    assert any("registered" in t for t in texts), texts
    assert any(ev["id"] in t and "level 600.0 kW" in t for t in texts), texts
    assert any(t.startswith("report ") and ev["id"] in t for t in texts), texts
    assert any("deleted" in t for t in texts), texts
    assert "-> openadr" in _rail_changes(site)


def _metrics(site: Site) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{site.metrics_port}/metrics", timeout=5
        ) as r:
            return str(r.read().decode())
    except OSError:
        return ""


def _query(site: Site, sql: str) -> list[sqlite3.Row]:
    db = site.logs / "journal.sqlite"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return list(conn.execute(sql).fetchall())


def _openadr_events(site: Site) -> list[str]:
    return [str(r["text"]) for r in _query(site, "SELECT text FROM events WHERE kind = 'openadr'")]


def _rail_changes(site: Site) -> str:
    return " | ".join(
        str(r["text"]) for r in _query(site, "SELECT text FROM events WHERE kind = 'rail'")
    )
