"""The VEN against the test VTN (tests/openadr_vtn.py) over real sockets and a real mosquitto.

Every request the VEN sends and every answer the VTN gives is validated against openadr3.yaml
by the VTN; each test ends by asserting the VTN recorded no conformance error. The site is the
daemon's real `Rails`; its measured power is a value the test sets (what the meter says).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from controller.config import load_config
from controller.market.peaks import Peaks
from controller.market.rails import Rails
from controller.metrics import Metrics
from controller.northbound.context import NorthboundContext
from controller.northbound.openadr.schedule import randomize_offset
from controller.northbound.openadr.ven import Ven
from controller.tools.broker import free_port
from controller.wire.telemetry import Telemetry
from controller.wire.timestamps import parse_rfc3339, rfc3339
from tests.helpers import Mosquitto, until
from tests.openadr_vtn import (
    IGNORE_OAUTH2_WARNING,
    VEN_CLIENT,
    BlClient,
    Vtn,
    iter_report_values,
    limit_event,
)

pytestmark = pytest.mark.filterwarnings(IGNORE_OAUTH2_WARNING)

FULL_W = 2e6


@dataclass
class Site:
    """The VEN's view of the site: the rails it sets and the power the meter measures."""

    rails: Rails
    measured_w: float = 1.5e6

    def telemetry(self) -> Telemetry:
        return Telemetry(at=time.time(), mode="normal", measured_w=self.measured_w)

    def openadr(self) -> tuple[str, float | None]:
        d = self.rails.decide(time.time(), baseline_w=None)
        return d.reason, d.wishes.get("openadr")

    def level_w(self) -> float | None:
        return self.openadr()[1]


def site_file(tmp: Path, vtn_url: str, **openadr: Any) -> Path:
    (tmp / "ven.secret").write_text(VEN_CLIENT[1] + "\n")
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in openadr.items())
    path = tmp / "site.toml"
    path.write_text(
        f"""
site_id = "oadr-test"
[mqtt]
host = "127.0.0.1"
[site]
max_kw = {FULL_W / 1e3}
[meter]
host = "127.99.9.1"
[[devices]]
name = "load"
template = "modbus-load"
count = 1
address = "127.99.9.2"
[openadr]
vtn_url = "{vtn_url}"
client_id = "{VEN_CLIENT[0]}"
client_secret_file = "ven.secret"
programs = ["capacity"]
timeout_s = 2.0
{extra}"""
    )
    return path


def make_ven(tmp: Path, vtn: Vtn, **openadr: Any) -> tuple[Ven, Site]:
    from controller.config import PeaksConfig

    cfg = load_config(site_file(tmp, vtn.url, **openadr))
    site = Site(Rails(full_w=FULL_W, peaks=Peaks(PeaksConfig()), price=None))
    ctx = NorthboundContext(
        cfg=cfg, rails=site.rails, telemetry=site.telemetry, journal=None, metrics=Metrics("t")
    )
    return Ven(ctx), site


@asynccontextmanager
async def running(ven: Ven) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(ven.run(), name="ven")
    try:
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10.0)
        # The VEN never gives up on its own: its task ends only when cancelled.
        assert task.cancelled(), task


@pytest.fixture
def vtn(mosquitto: Mosquitto) -> Iterator[Vtn]:
    with Vtn(mqtt=(mosquitto.host, mosquitto.port)) as v:
        yield v
        assert v.errors == [], "\n".join(v.errors)


async def program(vtn: Vtn, name: str = "capacity") -> str:
    async with BlClient(vtn) as bl:
        p = await bl.create_program(
            name,
            payloadDescriptors=[
                {
                    "objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                    "payloadType": "IMPORT_CAPACITY_LIMIT",
                    "units": "KW",
                }
            ],
        )
    return str(p["id"])


def events_reads(vtn: Vtn, since: float = 0.0) -> int:
    return len(vtn.requests("GET", "/events", since))


async def test_event_over_mqtt_sets_the_rail_and_reports_come_back(
    vtn: Vtn, tmp_path: Path
) -> None:
    pid = await program(vtn)
    ven, site = make_ven(tmp_path, vtn, poll_s=3600.0, resync_s=3600.0, report_period_s=1.0)
    async with running(ven), BlClient(vtn) as bl:
        # Registered, notifier up, and the re-read after its connect done.
        await until(lambda: ven.notifier_up and events_reads(vtn) >= 2, 10.0, what="ready")
        assert [v["venName"] for v in vtn.vens()] == ["oadr-test"]
        reads = events_reads(vtn)
        site.measured_w = 395e3
        reports = [
            {
                "payloadType": "DEMAND",
                "readingType": "MEAN",
                "units": "KW",
                "frequency": 1,
                "repeat": -1,
            },
            {"payloadType": "USAGE", "units": "KWH", "frequency": 1, "repeat": 2},
        ]
        ev = await bl.create_event(limit_event(pid, 400.0, reports=reports))
        await until(lambda: site.level_w() == 400e3, 5.0, what="limit applied")
        reason, _ = site.openadr()
        assert ev["id"] in reason and "IMPORT_CAPACITY_LIMIT 400 KW" in reason, reason
        assert site.rails.decide(time.time(), baseline_w=None).rail == "openadr"
        assert events_reads(vtn) == reads, "applied from the notification, not a REST read"

        # Reports: DEMAND each second of the indefinite interval, USAGE twice only.
        def got() -> list[dict[str, Any]]:
            return [r for r in vtn.reports() if r["eventID"] == ev["id"]]

        await until(
            lambda: sum(r["payloadDescriptors"][0]["payloadType"] == "DEMAND" for r in got()) >= 3,
            10.0,
            what="3 DEMAND reports",
        )
        for r in got():
            assert r["clientName"] == "oadr-test" and r["clientID"] == VEN_CLIENT[0]
            assert r["resources"][0]["resourceName"] == "AGGREGATED_REPORT"
            for kind, value in iter_report_values(r):
                if kind == "DEMAND":
                    assert value == pytest.approx(395.0), r
                else:  # one second at 395 kW
                    assert kind == "USAGE" and value == pytest.approx(395.0 / 3600, rel=0.05), r
        usage = [r for r in got() if r["payloadDescriptors"][0]["payloadType"] == "USAGE"]
        assert len(usage) <= 2
        seen = await bl.reports(ev["id"])
        assert {r["id"] for r in seen} >= {r["id"] for r in got()}

        # An update moves the level; a delete ends it.
        await bl.update_event(ev["id"], limit_event(pid, 0.6, units="MW", reports=reports))
        await until(lambda: site.level_w() == 600e3, 5.0, what="updated in MW")
        await bl.delete_event(ev["id"])
        await until(lambda: site.level_w() is None, 5.0, what="deleted")
        assert events_reads(vtn) == reads
    assert vtn.unauthorized == 0


async def test_priority_decides_between_two_events(vtn: Vtn, tmp_path: Path) -> None:
    pid = await program(vtn)
    ven, site = make_ven(tmp_path, vtn, poll_s=3600.0, resync_s=3600.0)
    async with running(ven), BlClient(vtn) as bl:
        await until(lambda: ven.notifier_up and events_reads(vtn) >= 2, 10.0, what="ready")
        low = await bl.create_event(limit_event(pid, 300.0, priority=1, name="low"))
        await until(lambda: site.level_w() == 300e3, 5.0, what="first event")
        # More important (0), though higher: a setpoint in MW.
        high = await bl.create_event(
            limit_event(pid, 0.5, priority=0, payload_type="DISPATCH_SETPOINT", units="MW")
        )
        await until(lambda: site.level_w() == 500e3, 5.0, what="priority 0 wins")
        assert "DISPATCH_SETPOINT" in site.openadr()[0]
        await bl.delete_event(high["id"])
        await until(lambda: site.level_w() == 300e3, 5.0, what="back to the other")
        await bl.delete_event(low["id"])
        await until(lambda: site.level_w() is None, 5.0, what="none")


async def test_reconnect_rereads_events_over_rest(
    vtn: Vtn, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    pid = await program(vtn)
    ven, site = make_ven(tmp_path, vtn, poll_s=3600.0, resync_s=3600.0)
    async with running(ven), BlClient(vtn) as bl:
        await until(lambda: ven.notifier_up and events_reads(vtn) >= 2, 10.0, what="ready")
        reads = events_reads(vtn)
        mosquitto.stop()
        await until(lambda: not ven.notifier_up, 10.0, what="notifier down")
        # Its loss asks for one re-read (then polling, here hourly).
        await until(lambda: events_reads(vtn) == reads + 1, 5.0, what="re-read at the loss")
        ev = await bl.create_event(limit_event(pid, 250.0))
        assert vtn.publish_failures, "the VTN could not notify: the broker is down"
        restarted = time.monotonic()
        mosquitto.start()
        await until(lambda: site.level_w() == 250e3, 30.0, what="event after the reconnect")
        assert ven.notifier_up
        assert events_reads(vtn, since=restarted) >= 1
        assert ev["id"] in site.openadr()[0]


@pytest.mark.parametrize("mqtt", ["none", "dead broker"])
async def test_polling_is_the_fallback(mqtt: str, mosquitto: Mosquitto, tmp_path: Path) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    with Vtn(
        mqtt=None if mqtt == "none" else (mosquitto.host, mosquitto.port),
        advertise_uri=dead if mqtt == "dead broker" else None,
    ) as vtn:
        pid = await program(vtn)
        ven, site = make_ven(tmp_path, vtn, poll_s=0.3, resync_s=3600.0)
        async with running(ven), BlClient(vtn) as bl:
            await until(lambda: events_reads(vtn) >= 2, 10.0, what="polling")
            ev = await bl.create_event(limit_event(pid, 700.0))
            await until(lambda: site.level_w() == 700e3, 5.0, what="polled event")
            assert not ven.notifier_up
            await bl.delete_event(ev["id"])
            await until(lambda: site.level_w() is None, 5.0, what="polled delete")
        assert vtn.errors == [], "\n".join(vtn.errors)


async def test_token_is_renewed_before_it_expires(mosquitto: Mosquitto, tmp_path: Path) -> None:
    with Vtn(mqtt=None, token_lifetime_s=2) as vtn:
        await program(vtn)
        ven, _ = make_ven(tmp_path, vtn, poll_s=0.2, token_refresh_margin_s=1.0)
        async with running(ven):
            await until(lambda: vtn.tokens_issued.get(VEN_CLIENT[0], 0) >= 4, 15.0, what="4 tokens")
            assert events_reads(vtn) >= 10
        # Every request carried a valid token: none was answered 401.
        assert vtn.unauthorized == 0
        assert vtn.errors == [], "\n".join(vtn.errors)


async def test_a_misbehaving_vtn_is_retried(vtn: Vtn, tmp_path: Path) -> None:
    pid = await program(vtn)
    ven, site = make_ven(
        tmp_path, vtn, poll_s=0.2, resync_s=0.5, backoff_max_s=0.5, report_period_s=1.0
    )
    async with running(ven) as task, BlClient(vtn) as bl:
        await until(lambda: ven.ven_id is not None, 10.0, what="registered")
        vtn.fail("GET", "/events", 2, "500")
        vtn.fail("GET", "/events", 2, "garbage")
        vtn.fail("GET", "/events", 1, "slow", delay_s=3.0)  # past the VEN's 2 s timeout
        vtn.fail("POST", "/reports", 2, "500")
        reports = [{"payloadType": "DEMAND", "frequency": 1, "repeat": 1}]
        ev = await bl.create_event(limit_event(pid, 450.0, reports=reports))
        await until(lambda: site.level_w() == 450e3, 20.0, what="applied despite the faults")
        await until(
            lambda: any(r["eventID"] == ev["id"] for r in vtn.reports()),
            20.0,
            what="report delivered after two 500s",
        )
        # The VEN kept polling through every fault (the slow one timed out) and on.
        await until(lambda: all(f.count == 0 for f in vtn.faults), 20.0, what="faults met")
        await until(
            lambda: vtn.requests("GET", "/events")[-1].status == 200, 10.0, what="polling again"
        )
        assert not task.done()
        statuses = {x.status for x in vtn.requests("GET", "/events")}
        assert {500, 200} <= statuses


async def test_registration_finds_its_ven_again(vtn: Vtn, tmp_path: Path) -> None:
    await program(vtn)
    for _ in range(2):
        ven, _site = make_ven(tmp_path, vtn, poll_s=3600.0)
        async with running(ven):
            await until(lambda v=ven: v.ven_id is not None, 10.0, what="registered")  # type: ignore[misc]
    assert len(vtn.vens()) == 1
    assert len(vtn.requests("POST", "/vens")) == 1


def notification(pid: str, eid: str) -> bytes:
    """A CREATE notification of an event the VTN does not hold (published by the test)."""
    now = rfc3339(time.time())
    obj = {**limit_event(pid, 1.0), "id": eid, "objectType": "EVENT",
           "createdDateTime": now, "modificationDateTime": now}  # fmt: skip
    return json.dumps({"objectType": "EVENT", "operation": "CREATE", "object": obj}).encode()


async def test_randomize_start_and_retained_notifications(
    vtn: Vtn, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    pid = await program(vtn)
    first, _ = make_ven(tmp_path, vtn, poll_s=3600.0)
    async with running(first):
        await until(lambda: first.ven_id is not None, 10.0, what="registered")
    topic = f"openadr/events/vens/{first.ven_id}/create"
    # A retained (stale) notification waits on the VEN's topic before it connects: the VEN
    # must not act on it (the binding: recover state by GET, not from retained messages).
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
        await c.publish(topic, notification(pid, "ghost"), qos=1, retain=True)

    since = time.monotonic()
    ven, site = make_ven(tmp_path, vtn, poll_s=3600.0, resync_s=3600.0, randomize_seed=42)
    async with running(ven), BlClient(vtn) as bl:
        await until(lambda: ven.notifier_up and events_reads(vtn, since) >= 2, 10.0, what="ready")
        assert ven.ven_id == first.ven_id

        start = time.time() + 3600.0
        body = limit_event(pid, 100.0, start=rfc3339(start), duration="PT1H")
        body["intervalPeriod"]["randomizeStart"] = "PT10M"
        ev = await bl.create_event(body)
        await until(lambda: ev["id"] in ven.events, 5.0, what="event held")
        span = ven.events[ev["id"]].spans[0]
        offset = randomize_offset("42", ev["id"], None, 600.0)
        assert 0.0 < offset <= 600.0
        assert span.start == pytest.approx(parse_rfc3339(rfc3339(start)) + offset, abs=1e-6)
        assert span.end - span.start == pytest.approx(3600.0)
        assert site.level_w() is None  # an hour from now

        # The same message live (not retained) is taken: only retention kept the ghost out.
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
            await c.publish(topic, notification(pid, "live"), qos=1)
        await until(lambda: "live" in ven.events, 5.0, what="live notification taken")
        assert "ghost" not in ven.events
