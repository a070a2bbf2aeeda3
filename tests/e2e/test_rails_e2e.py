"""Prices, peaks, commitments and the grid dispatch on one site, end to end: mosquitto +
`rampd sim` + `rampd run` as processes. Two device classes of Modbus container loads with
different efficiencies; price messages over MQTT curtail only the class whose breakeven the
price is above (ground truth), a peak alert takes the site to `peak_kw`, a grid dispatch
during the price curtailment takes over and hands back when it expires, a commitment reduces
the site, and every curtailment event is measured into the journal.

Bounds are generous (seconds where the loads need a fraction of one): this checks which rail
governs and that the site goes where it says, not how fast.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.market.economics import Economics, breakeven_usd_per_mwh
from controller.tools.truth import TruthTail
from controller.wire.telemetry import Telemetry
from controller.wire.timestamps import rfc3339
from tests.e2e.harness import Site, SiteDispatcher, run_site
from tests.helpers import Mosquitto, until

pytestmark = pytest.mark.e2e

LOAD_KW, IDLE_KW, OTHER_KW = 250.0, 25.0, 100.0
HASHPRICE = 50.0
OLD_J_TH, NEW_J_TH = 30.0, 17.5  # breakevens ~69 and ~119 USD/MWh
PEAK_KW = 400.0
FULL_KW = 4 * LOAD_KW + OTHER_KW
PRICE_SHED_KW = 2 * (LOAD_KW - IDLE_KW)  # the old class only
TOL_KW = 40.0
RAILS = ("price", "peak", "dispatch", "commitment")


def site_config(journal: Path) -> str:
    return f"""
site_id = "rails"
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
ramp_s = 5  # an expiry hands back over this (the default 30 s is the whole settle bound)
[journal]
path = "{journal}"
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[economics]
hashprice_usd_per_ph_day = {HASHPRICE}
[price_rule]
stop_after = 1
resume_after = 1
min_stopped_s = 0
resume_stagger_s = 4
[peaks]
peak_kw = {PEAK_KW}
min_probability = 0.5
[mv]
baseline_minutes = 0.25
ramp_allowance_s = 4
[meter]
host = "127.97.2.1"
port = 1502
[[devices]]
name = "old"
template = "modbus-load"
count = 2
address = "127.97.1.1"
overrides = {{{{ port = 1502, poll_s = 0.5, kind = "s19-rows", efficiency_j_per_th = {OLD_J_TH} }}}}
[[devices]]
name = "new"
template = "modbus-load"
count = 2
address = "127.97.1.11"
overrides = {{{{ port = 1502, poll_s = 0.5, kind = "s21-rows", efficiency_j_per_th = {NEW_J_TH} }}}}
"""


@pytest.fixture(scope="module")
def site(module_mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("rails")
    with run_site(
        module_mosquitto, workdir, site_config(workdir / "journal.sqlite"), site_id="rails",
        n_devices=4,
    ) as s:  # fmt: skip
        yield s


def price(usd: float, *, interval_s: float = 300.0) -> bytes:
    start = time.time() - 1.0
    return json.dumps(
        {
            "interval_start": rfc3339(start),
            "interval_s": interval_s,
            "usd_per_mwh": usd,
            "kind": "realtime",
        }
    ).encode()


class Truth:
    def __init__(self, path: Path) -> None:
        self.tail = TruthTail(path)

    def level_kw(self, over_s: float = 1.0) -> float:
        self.tail.poll()
        t, kw = self.tail.arrays()
        recent = kw[t >= t[-1] - over_s]
        return float(recent.mean())


async def settles(truth: Truth, kw: float, within: float, what: str) -> None:
    """The truth stays within TOL_KW of `kw` over a whole second, within `within` s."""
    await until(
        lambda: abs(truth.level_kw() - kw) <= TOL_KW, within, interval=0.25, what=what
    )


def governing(d: SiteDispatcher) -> str | None:
    tel: Telemetry | None = d.latest()
    return None if tel is None or tel.rails is None else tel.rails.governing


async def test_price_peak_dispatch_and_commitment_each_govern_in_turn(site: Site) -> None:
    econ = Economics(HASHPRICE)
    old_be = breakeven_usd_per_mwh(econ, OLD_J_TH)
    new_be = breakeven_usd_per_mwh(econ, NEW_J_TH)
    between = 0.5 * (old_be + new_be)
    truth = Truth(site.truth)
    async with SiteDispatcher(site) as d:
        await d.all_devices_on(within=60.0)
        await settles(truth, FULL_KW, 30.0, "full power at rest")
        await until(lambda: governing(d) == "default", 10.0, interval=0.2, what="default")
        tel = d.latest()
        assert tel is not None and tel.rails is not None
        assert tel.rails.breakeven_usd_per_mwh["s19-rows"] == pytest.approx(old_be, abs=0.01)

        # A price between the two breakevens curtails the old class only.
        await d.publish_raw(price(between), suffix="price")
        await settles(truth, FULL_KW - PRICE_SHED_KW, 20.0, "price curtailment")
        await until(lambda: governing(d) == "price", 5.0, interval=0.2, what="price governs")
        tel = d.latest()
        assert tel is not None and tel.rails is not None
        assert tel.rails.curtailed == {"s19-rows": 1.0, "s21-rows": 0.0}
        assert tel.rails.price_usd_per_mwh == pytest.approx(between)

        # A bad price message changes nothing (and is counted).
        await d.publish_raw(b'{"usd_per_mwh": "cheap"}', suffix="price")
        await until(
            lambda: 'rampd_inputs_rejected_total{input="price"} 1.0' in _metrics(site),
            5.0,
            interval=0.2,
            what="rejected price counted",
        )

        # A peak alert above the probability threshold takes the site to peak_kw.
        now = time.time()
        alert = {"start": rfc3339(now), "end": rfc3339(now + 12.0), "probability": 0.8}
        await d.publish_raw(json.dumps(alert).encode(), suffix="peak")
        await settles(truth, PEAK_KW, 20.0, "peak")
        assert governing(d) == "peak"
        # It ends: back to the price curtailment.
        await settles(truth, FULL_KW - PRICE_SHED_KW, 30.0, "price after the peak")
        await until(lambda: governing(d) == "price", 5.0, interval=0.2, what="price again")

        # A grid dispatch during the price curtailment takes over, and hands back at expiry.
        ack, _ = await d.send_acked("setpoint", 1000.0, expires_at=time.time() + 8.0)
        assert ack.accepted, ack.reason
        await settles(truth, 1000.0, 10.0, "grid dispatch")
        assert governing(d) == "dispatch"
        tel = d.latest()
        assert tel is not None and tel.rails is not None
        # What each rail asks: the dispatch's level above the price's, which still stands.
        asks = tel.rails.wishes_w
        assert asks["dispatch"] == pytest.approx(1000e3, abs=1.0), asks
        assert asks["price"] == pytest.approx((FULL_KW - PRICE_SHED_KW) * 1e3, abs=TOL_KW * 1e3)
        assert asks["failsafe"] is None and asks["frequency"] is None, asks
        await settles(truth, FULL_KW - PRICE_SHED_KW, 30.0, "handed back to price")
        await until(lambda: governing(d) == "price", 5.0, interval=0.2, what="price after it")

        # The price falls below both breakevens: the old class comes back (staggered).
        await d.publish_raw(price(0.5 * old_be, interval_s=600.0), suffix="price")
        await settles(truth, FULL_KW, 30.0, "resumed")
        await until(lambda: governing(d) == "default", 10.0, interval=0.2, what="default")

        # A commitment: to 600 kW from in 2 s for 10 s, ramping down over 2 s (the M&V ramp-in
        # allowance, 4 s from the last drop of the target, leaves about 4 s judged).
        start = time.time() + 2.0
        sent = await d.publish(
            d.commitment(start, start + 10.0, reduce_to_kw=600.0, ramp_down_s=2.0, ramp_up_s=2.0)
        )
        ack = await d.ack_for(sent.dispatch.id)
        assert ack.accepted, ack.reason
        await settles(truth, 600.0, 15.0, "commitment")
        assert governing(d) == "commitment"
        await settles(truth, FULL_KW, 20.0, "after the commitment")

        # New economics over MQTT move every breakeven (telemetry shows them); junk does not.
        await d.publish_raw(b'{"hashprice_usd_per_ph_day": "lots"}', suffix="economics")
        await d.publish_raw(
            json.dumps({"hashprice_usd_per_ph_day": 2 * HASHPRICE}).encode(), suffix="economics"
        )

        def breakeven_doubled() -> bool:
            tel = d.latest()
            got = None if tel is None or tel.rails is None else tel.rails.breakeven_usd_per_mwh
            return got is not None and abs(got["s19-rows"] - 2 * old_be) < 0.01

        await until(breakeven_doubled, 10.0, interval=0.2, what="the new breakevens")
        assert 'rampd_inputs_rejected_total{input="economics"} 1.0' in _metrics(site)

    # Every event is measured and kept in the journal, with the rails' changes.
    events = await until(lambda: _curtailments(site, 6), 15.0, interval=0.5, what="6 events")
    assert [e["rail"] for e in events] == [
        "price", "peak", "price", "dispatch", "price", "commitment"
    ], events  # fmt: skip
    peak, commitment = events[1], events[5]
    for ev in (peak, commitment):
        assert ev["met"] == 1, ev
        assert ev["energy_curtailed_kwh"] > 0.0, ev
    # The chained events keep the baseline from before the first one (never a curtailed one).
    assert all(abs(e["baseline_w"] / 1e3 - FULL_KW) <= TOL_KW for e in events[:5]), events
    # The commitment's comes from the seconds at full power since (some of them still
    # climbing back from the price curtailment): above any curtailed level.
    assert commitment["baseline_w"] / 1e3 > FULL_KW - PRICE_SHED_KW / 2, commitment
    # Curtailed at a price above the old class's breakeven: it saved more than it gave up.
    first = events[0]
    assert first["cost_avoided_usd"] > first["revenue_forgone_usd"] > 0.0, first
    changes = _rail_events(site)
    for change in ("default -> price", "price -> peak", "peak -> price", "price -> dispatch",
                   "dispatch -> price", "price -> default", "default -> commitment"):  # fmt: skip
        assert any(t.startswith(change) for t in changes), (change, changes)

    # What settlement reads: `rampd report --events` over the daemon's journal, as a user runs
    # it (a line per event in the order above, then the summary).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.cli", "report", "--events", "--no-plot",
        "--journal", str(site.logs / "journal.sqlite"), "--from", "-1h",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out_b, err_b = await asyncio.wait_for(proc.communicate(), 60.0)
    report = out_b.decode()
    print(report)
    assert proc.returncode == 0, err_b.decode()
    lines = [x for x in report.splitlines() if " kW (" in x and "curtailed" in x]
    assert [next(r for r in RAILS if f" {r} " in x) for x in lines] == [
        e["rail"] for e in events
    ], report
    assert any(x.startswith("6 events") for x in report.splitlines()), report


def _metrics(site: Site) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{site.metrics_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _query(site: Site, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
    db = site.logs / "journal.sqlite"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            conn.row_factory = sqlite3.Row
            return list(conn.execute(sql, args).fetchall())
    except sqlite3.Error:
        return []


def _curtailments(site: Site, n: int) -> list[dict[str, object]] | None:
    rows = _query(site, "SELECT * FROM curtailments ORDER BY started_at")
    return [dict(r) for r in rows] if len(rows) >= n else None


def _rail_events(site: Site) -> list[str]:
    rows = _query(site, "SELECT text FROM events WHERE kind = 'rail' ORDER BY at")
    return [str(r["text"]) for r in rows]
