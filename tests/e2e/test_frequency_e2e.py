"""Autonomous frequency response end to end: mosquitto + `rampd sim` + `rampd run` as
processes, a site with feeder breakers beside Modbus loads. FFR and UFR are armed by a
dispatch; the simulator replays the real GB 2019-08-09 event mapped onto 60 Hz; on the
simulator's ground truth the armed FFR load is gone within 0.25 s of the frequency crossing
59.85 Hz and the UFR load within 0.5 s of 59.70 Hz; the deployments hold, a recall restores
them one feeder at a time, and the daemon's journal keeps the evidence.

Timing bounds here are the services' own deadlines (what the site sells), measured on the
simulator's clock; the bench (`rampd bench frequency`) prints the figures.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pymodbus.client import AsyncModbusTcpClient

from controller.tools.truth import TruthTail
from drivers.breaker.registers import CLOSE_COIL
from tests.e2e.harness import Site, SiteDispatcher, run_site, truth_until
from tests.helpers import Mosquitto, until

pytestmark = pytest.mark.e2e

TRACE = (
    Path(__file__).resolve().parents[2] / "bench" / "data" / "grid_frequency_gb_2019-08-09_1s.csv"
)
N_LOADS = 4
N_FEEDERS = 4
FEEDER_KW = 500.0
FFR_KW = 900.0  # two feeders
UFR_KW = 400.0  # one more


def site_config(journal: Path) -> str:
    return f"""
site_id = "freq"
cycle_s = 0.1
noncontrollable_kw = 100.0
[mqtt]
host = "127.0.0.1"
port = {{broker_port}}
[site]
min_kw = 0.0
max_kw = 4000.0
deadband_kw = 5.0
[failsafe]
dispatch_timeout_s = 600
[journal]
path = "{journal}"
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[meter]
host = "127.95.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = {N_LOADS}
address = "127.95.1.1"
overrides = {{{{ port = 1502, poll_s = 0.5, timeout_s = 0.5 }}}}
[[devices]]
name = "feeder"
template = "feeder-breaker"
count = {N_FEEDERS}
address = "127.95.3.1"
overrides = {{{{ port = 1502 }}}}
"""


@pytest.fixture(scope="module")
def site(module_mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("freq")
    config = site_config(workdir / "journal.sqlite")
    with run_site(
        module_mosquitto, workdir, config, site_id="freq", n_devices=N_LOADS + N_FEEDERS
    ) as s:
        yield s


def crossing(t: np.ndarray, hz: np.ndarray, trigger: float, after: float) -> float:
    i = np.flatnonzero((t >= after) & (hz <= trigger))
    assert i.size, f"the truth's frequency never reached {trigger} Hz"
    return float(t[i[0]])


def shed_at(t: np.ndarray, kw: np.ndarray, t0: float, amount_kw: float) -> float:
    """When the truth first stood `amount_kw` (less 5%) below its level in the second before
    `t0`."""
    before = float(np.mean(kw[(t >= t0 - 1.0) & (t < t0)]))
    i = np.flatnonzero((t >= t0) & (kw <= before - 0.95 * amount_kw))
    assert i.size, f"{amount_kw} kW never shed after {t0}"
    return float(t[i[0]])


async def test_ffr_and_ufr_shed_within_their_deadlines_on_a_real_event(site: Site) -> None:
    async with SiteDispatcher(site) as d:
        await d.all_devices_on(within=60.0)
        ack, _ = await d.send_acked(mode="release", services_kw={"ffr": FFR_KW, "ufr": UFR_KW})
        assert ack.accepted, ack.reason
        armed = 'rampd_service_armed_watts{service="ffr"} 900000.0'

        async def armed_in_metrics() -> bool:
            return armed in await site.metrics()

        await until(armed_in_metrics, 5.0, interval=0.2, what="armed in the metrics")
        tail = TruthTail(site.truth)
        replay_at = time.time()
        state = await site.sim_control("/grid", {"trace": str(TRACE), "trace_nominal_hz": 50})
        assert state["mode"] == "trace"
        # The recording crosses 49.875 Hz (59.85 mapped) 46 s in; UFR follows a second later.
        await truth_until(tail, replay_at + 52.0, within=90.0)
        t, kw = tail.arrays()
        hz = np.asarray(tail.hz)
        t_ffr = crossing(t, hz, 59.85, replay_at)
        t_ufr = crossing(t, hz, 59.70, replay_at)
        ffr_s = shed_at(t, kw, t_ffr, FFR_KW) - t_ffr
        assert ffr_s <= 0.25, ffr_s
        # UFR's amount comes off the level after FFR's shed.
        ufr_s = shed_at(t, kw, t_ufr, UFR_KW) - t_ufr if t_ufr - t_ffr >= 1.0 else None
        if ufr_s is not None:
            assert ufr_s <= 0.5, ufr_s
        states = {
            r["name"]: r["power_w"] for r in await site.sim_control("/devices?protocol=breaker")
        }
        assert sum(1 for w in states.values() if w < 1.0) == 3  # two for FFR, one for UFR

        async def deployed_in_metrics() -> bool:
            page = await site.metrics()
            return all(
                f'rampd_service_deployed{{service="{s}"}} 1.0' in page for s in ("ffr", "ufr")
            )

        await until(deployed_in_metrics, 5.0, interval=0.2, what="deployed in the metrics")

        # Recalled: the feeders close again one at a time (staggered: without ramp limits
        # the shed load comes back over 30 s), never all at once.
        await d.send_acked(mode="recall")
        t_recall = time.monotonic()
        closes: list[float] = []
        while len(closes) < 3:
            n = sum(await asyncio.gather(*(_closed(k) for k in range(N_FEEDERS))))
            while len(closes) < n - 1:  # one feeder never tripped
                closes.append(time.monotonic() - t_recall)
            assert time.monotonic() - t_recall < 60.0, closes
            await asyncio.sleep(0.1)
        assert closes[0] < 2.0 and closes[-1] - closes[0] >= 5.0, closes

    # The journal keeps each deployment with its measured response.
    await until(lambda: _deployments(site) >= 2, 15.0, interval=0.5, what="journalled")


def _deployments(site: Site) -> int:
    db = site.logs / "journal.sqlite"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT count(*) FROM deployments").fetchone()[0])
    except sqlite3.Error:
        return 0


async def _closed(k: int) -> int:
    """Feeder k's coil as pymodbus's own client reads it (1 closed)."""
    client = AsyncModbusTcpClient(f"127.95.3.{k + 1}", port=1502, timeout=1, retries=0)
    try:
        assert await client.connect()
        reply = await client.read_coils(CLOSE_COIL, count=1, device_id=1)
        assert not reply.isError(), reply
        return int(bool(reply.bits[0]))
    finally:
        client.close()
