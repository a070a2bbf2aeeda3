"""End to end: mosquitto + `rampd sim` + `rampd run` as separate processes, over real sockets.

Site power is judged from the simulator's ground truth, never from the daemon's telemetry.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.ramp_score import score_series
from controller.tools.truth import TruthTail, tolerance_kw
from controller.wire.telemetry import SleepReport
from tests.e2e.harness import Site, SiteDispatcher, dispatch, iso, run_site, truth_until, wire_kw
from tests.helpers import Mosquitto

pytestmark = pytest.mark.e2e

N_LOADS = 50
SITE_MAX_KW = 14000.0

CONFIG = f"""
site_id = "e2e"
cycle_s = 0.1
noncontrollable_kw = 800.0
[mqtt]
host = "127.0.0.1"
port = {{broker_port}}
[site]
max_kw = {SITE_MAX_KW}
deadband_kw = 20.0
[failsafe]
dispatch_timeout_s = 600
[reserve]
up_kw_5s = 500.0
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[meter]
host = "127.61.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = {N_LOADS}
address = "127.61.1.1"
overrides = {{{{ port = 1502 }}}}
"""


@pytest.fixture(scope="module")
def site(module_mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with run_site(
        module_mosquitto, tmp_path_factory.mktemp("site"), CONFIG, site_id="e2e", n_devices=N_LOADS
    ) as s:
        yield s


async def test_setpoint_settles_on_ground_truth_with_ack_and_telemetry(site: Site) -> None:
    async with SiteDispatcher(site) as d:
        tel = await d.all_devices_on()
        lo, hi = wire_kw(tel.min_w), wire_kw(tel.max_w)
        assert 0 < lo < hi <= SITE_MAX_KW
        target = round(lo + 0.3 * (hi - lo), 1)
        tail = TruthTail(site.truth)
        ack, t0 = await d.send_acked(target_kw=target)
        assert ack.accepted is True and ack.reason == ""

        window = 14.0
        await truth_until(tail, t0 + window, within=window + 15)
        t, kw = tail.arrays()
        tol = tolerance_kw(target, SITE_MAX_KW)
        fig = score_series(
            t, kw * 1e3, t0=t0, t_end=t0 + window, target_w=target * 1e3, tol_w=tol * 1e3
        )
        start_kw = (fig.from_w or 0.0) / 1e3
        assert start_kw > target + 1000, "the step should start well above the target"
        assert fig.settle_s is not None and fig.settle_s <= 10.0, fig

        tel = await d.fresh_telemetry()
        assert wire_kw(tel.target_w) == pytest.approx(target)
        assert wire_kw(tel.measured_w) == pytest.approx(target, abs=tol)
        assert tel.capability is not None and tel.capability.horizons_s == (1.0, 5.0, 60.0)
        assert (tel.capability.within(5.0)[0] or 0.0) > 0
        # The fast reserve asked for is held (and reported); the site sits in its band, so
        # the physical minimum to the target is nothing; no device sleeps.
        assert tel.reserve is not None and tel.reserve.up_kw_5s == 500.0
        assert (wire_kw(tel.reserve.up_held_w) or 0.0) >= 500.0
        assert tel.physical_min_s is not None and tel.physical_min_s <= 1.0
        assert tel.sleep == SleepReport(parked=0, waking=0)
        assert tel.mode == "normal"
        assert d.status and d.status[-1].online

        body = await site.metrics()
        for name in (
            "rampd_site_power_watts",
            "rampd_site_target_watts",
            "rampd_cycle_duration_seconds_bucket",
            "rampd_command_duration_seconds_bucket",
            'rampd_devices{state="on"} 50.0',
            'rampd_dispatches_total{reason="",result="accepted"}',
        ):
            assert name in body, name


def _bad(next_seq: int, **fields: Any) -> bytes:
    body = dispatch(next_seq, target_kw=1000.0)
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def _ago(**delta: float) -> str:
    return iso(datetime.now(UTC) - timedelta(**delta))


# Each builds a payload from the next free seq; every one must be rejected.
BAD_DISPATCHES: list[tuple[str, Any]] = [
    ("not json", lambda seq: b"{this is not json"),
    ("not an object", lambda seq: b"[1, 2, 3]"),
    ("missing target", lambda seq: _bad(seq, target_kw=None)),
    ("missing seq", lambda seq: _bad(seq, seq=None)),
    ("wrong type", lambda seq: _bad(seq, target_kw="lots")),
    ("bool as number", lambda seq: _bad(seq, target_kw=True)),
    ("negative", lambda seq: _bad(seq, target_kw=-100.0)),
    ("nan", lambda seq: _bad(seq, target_kw=float("nan"))),
    ("above site max", lambda seq: _bad(seq, target_kw=SITE_MAX_KW + 1)),
    ("unknown mode", lambda seq: _bad(seq, mode="turbo")),
    ("older seq", lambda seq: _bad(seq - 100)),
    ("expired", lambda seq: _bad(seq, expires_at=_ago(seconds=5))),
    ("stale", lambda seq: _bad(seq, issued_at=_ago(hours=1))),
]


async def test_bad_dispatches_are_rejected_with_a_reason_and_change_nothing(site: Site) -> None:
    async with SiteDispatcher(site) as d:
        tel = await d.all_devices_on()
        lo, hi = wire_kw(tel.min_w), wire_kw(tel.max_w)
        good = round(lo + 0.6 * (hi - lo), 1)
        ack, _ = await d.send_acked(target_kw=good)
        assert ack.accepted is True
        seq = int(ack.seq)

        for i, (name, build) in enumerate(BAD_DISPATCHES, start=1):
            n_acks = len(d.acks)
            await d.publish_raw(build(seq + i))
            async with asyncio.timeout(5):
                while len(d.acks) == n_acks:
                    await asyncio.sleep(0.02)
            ack = d.acks[-1]
            assert ack.accepted is False, (name, ack)
            assert isinstance(ack.reason, str) and len(ack.reason) > 3, (name, ack)
        assert len(d.acks) == len(BAD_DISPATCHES) + 1  # exactly one ack each

        assert site.daemon.poll() is None
        tel = await d.fresh_telemetry()
        assert wire_kw(tel.target_w) == pytest.approx(good)
        body = await site.metrics()
        assert 'rampd_dispatches_total{reason="replay",result="rejected"} 1.0' in body


async def test_sigterm_publishes_offline_and_exits_cleanly(site: Site) -> None:
    async with SiteDispatcher(site) as d:
        await d.all_devices_on()
        site.daemon.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            while not (d.status and not d.status[-1].online):
                await asyncio.sleep(0.05)
        assert site.daemon.wait(10) == 0
