"""The daemon's price sources as the governor runs them: a CSV schedule fed at each interval's
start, and an HTTP source polled over a real socket (aiohttp's server), whose bad or stale
answers are rejected, counted and change nothing; the stale flag in telemetry's report."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web

from controller.governor import Governor
from controller.metrics import Metrics
from controller.tools.broker import free_port
from controller.wire.timestamps import rfc3339
from tests.helpers import until
from tests.unit.test_governor import governor as site_governor


def governor(tmp_path: Path, prices: str) -> tuple[Governor, Metrics]:
    """The governor tests' site (one priced class, "old") with this `[prices]` section."""
    gov, _, metrics = site_governor(tmp_path, None, f"\n[prices]\n{prices}\n")
    return gov, metrics


def rejected(metrics: Metrics) -> float:
    v = metrics.registry.get_sample_value("rampd_inputs_rejected_total", {"input": "price"})
    return v or 0.0


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")


async def run_until(gov: Governor, predicate: object, what: str) -> None:
    task = asyncio.create_task(gov.run_sources())
    try:
        await until(predicate, 10.0, interval=0.05, what=what)  # type: ignore[arg-type]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_csv_schedule_feeds_the_interval_in_force(tmp_path: Path) -> None:
    now = time.time()
    start = now - now % 60.0
    # Three one-minute rows: the one before now, the one in force, the next.
    rows = [(start - 60.0, 10.0), (start, 999.0), (start + 60.0, 20.0)]
    (tmp_path / "p.csv").write_text(
        "interval_start_utc,price_usd_per_mwh\n" + "".join(f"{iso(t)},{p}\n" for t, p in rows)
    )
    gov, metrics = governor(tmp_path, 'csv = "p.csv"\ninterval_s = 60\npoll_s = 0.1')
    await run_until(gov, lambda: gov.rule.last_quote is not None, "the schedule's quote fed")
    q = gov.rule.last_quote
    assert q is not None and (q.interval_start, q.usd_per_mwh) == (start, 999.0)
    assert gov.rule.curtailed_fraction()["old"] == 1.0  # 999 is above the class's strike
    assert rejected(metrics) == 0
    report = gov.report(time.time())
    assert report.price_usd_per_mwh == 999.0 and report.price_stale is False
    # Past its interval plus the grace the same quote is flagged stale, and stays unused.
    later = gov.report(start + 60.0 + 61.0)
    assert later.price_stale is True


@pytest.fixture
async def http_source() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An HTTP price source answering, each request, the first of `answers` (kept when it is
    the last one)."""
    answers: list[bytes] = []

    async def handle(_: web.Request) -> web.Response:
        body = answers.pop(0) if len(answers) > 1 else answers[0]
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/price", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}/price", answers
    finally:
        await runner.cleanup()


def quote(start: float, price: float, interval_s: float = 300.0) -> dict[str, object]:
    return {"interval_start": rfc3339(start), "interval_s": interval_s, "usd_per_mwh": price}


async def test_the_http_source_is_polled_and_bad_answers_change_nothing(
    tmp_path: Path, http_source: tuple[str, list[bytes]]
) -> None:
    url, answers = http_source
    now = time.time()
    answers += [
        b"not json",
        json.dumps([quote(now - 7200.0, 5000.0), quote(now - 3600.0, 5000.0)]).encode(),
        json.dumps([quote(now - 400.0, 5000.0), quote(now - 10.0, 42.0)]).encode(),
    ]
    gov, metrics = governor(tmp_path, f'http = "{url}"\npoll_s = 0.1\ntimeout_s = 2')
    await run_until(gov, lambda: gov.rule.last_quote is not None, "a fresh HTTP quote taken")
    # Garbage, then a list of stale quotes: each rejected once, neither taken.
    assert rejected(metrics) == 2
    q = gov.rule.last_quote
    assert q is not None and q.usd_per_mwh == 42.0  # the stale 5,000 never counted
    assert gov.rule.curtailed_fraction()["old"] == 0.0
    assert gov.report(time.time()).price_stale is False


async def test_an_http_source_that_does_not_answer_in_time_is_rejected(
    tmp_path: Path,
) -> None:
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    async with silent:
        gov, metrics = governor(
            tmp_path, f'http = "http://127.0.0.1:{port}/"\npoll_s = 0.1\ntimeout_s = 0.3'
        )
        await run_until(gov, lambda: rejected(metrics) >= 1, "a timed-out poll rejected")
    assert gov.rule.last_quote is None
