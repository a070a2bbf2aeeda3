"""The simulator's fault-injection endpoint, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pymodbus.client import AsyncModbusTcpClient

from controller.config import load_config
from drivers.modbus.registers import METER_MAP, regs_to_f32
from drivers.sim.physics import Fault
from drivers.sim.site import SimSite
from tests.helpers import until

SITE = """
site_id = "ctl"
noncontrollable_kw = 100
[site]
max_kw = 2000
[meter]
host = "127.63.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = 10
address = "127.63.1.1"
overrides = { port = 1502 }
"""


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[tuple[SimSite, str]]:
    cfg_path = tmp_path / "site.toml"
    cfg_path.write_text(SITE)
    site = SimSite(load_config(cfg_path).sim_site)
    await site.start(control=("127.0.0.1", 0))
    try:
        yield site, f"http://127.0.0.1:{site.control_port}"
    finally:
        await site.close()


def _call(url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def call(url: str, body: Any = None) -> tuple[int, Any]:
    return await asyncio.to_thread(_call, url, body)


async def test_faults_by_name_and_by_fraction(sim: tuple[SimSite, str]) -> None:
    site, base = sim
    status, body = await call(f"{base}/faults", {"fault": "silent", "devices": ["row-0003"]})
    assert status == 200 and body == {"applied": ["row-0003"]}
    assert site.physics.fault[3] == Fault.SILENT
    status, body = await call(f"{base}/faults", {"fault": "error", "fraction": 0.3, "seed": 7})
    assert status == 200 and len(body["applied"]) == 3
    hit = [int(n.split("-")[1]) for n in body["applied"]]
    assert all(site.physics.fault[i] == Fault.ERROR for i in hit)
    status, rows = await call(f"{base}/devices")
    assert status == 200 and len(rows) == 10
    assert {r["name"] for r in rows if r["fault"] == "error"} == set(body["applied"])
    status, _ = await call(f"{base}/faults", {"fault": "none", "fraction": 1.0})
    assert status == 200 and not site.physics.fault.any()
    status, truth = await call(f"{base}/truth")
    assert status == 200 and truth["site_kw"] > 0


@pytest.mark.parametrize(
    "body",
    [
        {"fault": "melt", "devices": ["row-0001"]},
        {"fault": "silent", "devices": ["nope"]},
        {"fault": "silent", "fraction": 2},
        {"fault": "silent"},
    ],
)
async def test_bad_requests_are_refused_and_change_nothing(
    sim: tuple[SimSite, str], body: dict[str, Any]
) -> None:
    site, base = sim
    status, text = await call(f"{base}/faults", body)
    assert status == 400 and isinstance(text, str) and text
    assert not site.physics.fault.any()


async def test_physical_min_from_the_true_state(sim: tuple[SimSite, str]) -> None:
    """Ten 250 kW Modbus rows at p_max (floor 25 kW, 100 kW/s down and 50 kW/s up after
    0.2 s) and 100 kW of non-flexible load; the physics is not stepped unless we step it."""
    site, base = sim
    url = f"{base}/physical_min"
    status, body = await call(url, {"target_kw": 1600.0, "tol_kw": 0.0})
    assert status == 200
    assert body["now_kw"] == pytest.approx(2600.0)
    # 1000 kW down, 100 kW per row: 0.2 s dead time + 1.0 s of ramp (to within 1 ms below).
    assert 1.2 - 1e-3 <= body["physical_min_s"] <= 1.2
    # At 5 s every row can be at its 25 kW floor, and none can rise above p_max.
    assert body["lo_5s_kw"] == pytest.approx(10 * 25.0 + 100.0)
    assert body["hi_5s_kw"] == pytest.approx(2600.0)
    status, body = await call(url, {"target_kw": 2605, "tol_kw": 10})
    assert status == 200 and body["physical_min_s"] == 0.0
    status, body = await call(url, {"target_kw": 300.0, "tol_kw": 10.0})
    assert status == 200 and body["physical_min_s"] is None  # below every floor
    # Bring the rows to rest at their floor, then ask for everything back: 225 kW per row
    # at 50 kW/s after the dead time.
    ph = site.physics
    ph.command(np.arange(ph.n), setpoint_w=0.0)
    for _ in range(round(5.0 / site.dt_s)):
        ph.step(site.dt_s)
    assert ph.power_w.tolist() == [25e3] * 10
    now_kw = ph.truth() / 1e3  # the non-flexible load has drifted while we stepped
    status, body = await call(url, {"target_kw": now_kw + 2250.0, "tol_kw": 0.5})
    assert status == 200 and body["now_kw"] == pytest.approx(now_kw, abs=1e-3)
    assert 4.7 - 0.5 / 500 - 1e-3 <= body["physical_min_s"] <= 4.7 - 0.5 / 500
    assert body["lo_5s_kw"] == pytest.approx(now_kw, abs=1e-3)
    assert body["hi_5s_kw"] == pytest.approx(now_kw + 2250.0, abs=1e-3)


@pytest.mark.parametrize(
    "body",
    [
        {"target_kw": "1000", "tol_kw": 1.0},
        {"target_kw": 1000.0},
        {"target_kw": 1000.0, "tol_kw": -1.0},
        {"target_kw": True, "tol_kw": 1.0},
        {"target_kw": float("inf"), "tol_kw": 1.0},
        [1000.0, 1.0],
        b"target_kw=1000",
    ],
)
async def test_physical_min_refuses_bad_bodies(sim: tuple[SimSite, str], body: Any) -> None:
    _, base = sim
    status, text = await call(f"{base}/physical_min", body)
    assert status == 400 and isinstance(text, str) and text


# --- the grid: POST /grid and GET /grid ---

TRACE_2023 = Path(__file__).resolve().parents[2] / "bench/data/grid_frequency_gb_2023-12-22_1s.csv"
"""Real GB frequency, 50 Hz nominal: 49.905 Hz at its start (59.886 Hz per unit on 60)."""


async def meter_hz(client: AsyncModbusTcpClient) -> float:
    rr = await client.read_holding_registers(METER_MAP["Hz"].address, count=2, device_id=1)
    assert not rr.isError()
    return regs_to_f32(*rr.registers)


async def test_a_trace_replay_reaches_the_meter_at_once_and_the_truth_log(
    sim: tuple[SimSite, str], tmp_path: Path
) -> None:
    site, base = sim
    truth_path = tmp_path / "truth.jsonl"
    stop = asyncio.Event()
    with truth_path.open("a", buffering=1, encoding="utf-8") as truth:
        run = asyncio.create_task(site.run(stop, truth))
        client = AsyncModbusTcpClient("127.63.2.1", port=1502, timeout=1, retries=0)
        try:
            assert await client.connect()
            status, body = await call(f"{base}/grid")
            assert status == 200 and body["mode"] == "noise" and body["nominal_hz"] == 60.0
            assert body["trace"] is None and abs(body["hz"] - 60.0) < 0.1
            assert abs(await meter_hz(client) - 60.0) < 0.1

            status, body = await call(f"{base}/grid", {"hz": 59.8})
            assert status == 200 and body["mode"] == "hold" and body["hz"] == 59.8
            assert await meter_hz(client) == pytest.approx(59.8, abs=1e-5)  # float32
            await until(lambda: _last(truth_path).get("hz") == 59.8, 2, what="hz in the truth")

            status, body = await call(
                f"{base}/grid", {"trace": str(TRACE_2023), "trace_nominal_hz": 50}
            )
            assert status == 200 and body["mode"] == "trace"
            assert body["trace"] == TRACE_2023.name and body["remaining_s"] > 358.0
            first = 60.0 * (1 + (49.905 - 50.0) / 50.0)

            async def replayed() -> bool:
                return abs(await meter_hz(client) - first) < 0.003

            # Within 100 ms of the answer, what a Modbus client reads is the trace.
            await until_async(replayed, 0.1, "meter Hz follows the trace")
            # It goes on with the physics (the first two samples: 49.905 -> 49.907 Hz).
            await until_async(lambda: _moving(base), 1, "the replay moving")
            status, body = await call(f"{base}/grid")
            assert status == 200 and body["mode"] == "trace" and body["position_s"] > 0
            assert body["remaining_s"] == pytest.approx(359.0 - body["position_s"], abs=0.01)
            assert first - 0.001 < body["hz"] < 60.0 * (1 + (49.907 - 50.0) / 50.0) + 0.001
            await until(
                lambda: abs(_last(truth_path).get("hz", 0.0) - first) < 0.003, 2, what="truth hz"
            )
            lines = [json.loads(x) for x in truth_path.read_text().splitlines()]
            assert all("hz" in line and "site_kw" in line for line in lines)

            status, body = await call(f"{base}/grid", {"mode": "noise"})
            assert status == 200 and body["mode"] == "noise" and body["trace"] is None
            assert abs(await meter_hz(client) - 60.0) < 0.1
        finally:
            client.close()
            stop.set()
            await asyncio.wait_for(run, 5)


def _last(path: Path) -> dict[str, Any]:
    lines = path.read_text().splitlines()
    if not lines:
        return {}
    try:
        last = json.loads(lines[-1])
    except ValueError:  # a line being written
        return {}
    assert isinstance(last, dict)
    return last


async def _moving(base: str) -> bool:
    status, body = await call(f"{base}/grid")
    return status == 200 and bool(body["position_s"])


async def until_async(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """`until` for an async predicate that does I/O (typed for mypy): poll it every 5 ms until
    it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"condition {what} not met within {timeout} s"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"hz": "59.8"}, "finite number"),
        ({"hz": 30.0}, "nominal"),
        ({"hz": 59.8, "trace": str(TRACE_2023)}, "give"),
        ({"hz": 59.8, "trace_nominal_hz": 50}, "give"),
        ({"mode": "storm"}, "give"),
        ({"mode": "noise", "hz": 59.0}, "give"),
        ({"gust": 1}, "unknown keys"),
        ({"trace": "/nonexistent/f.csv"}, "not found"),
        ({"trace": ""}, "file path"),
        ({"trace": str(TRACE_2023), "trace_nominal_hz": "50"}, "finite number"),
        ({"trace": str(TRACE_2023), "trace_nominal_hz": 60}, "not a 60 Hz grid"),
        ([59.8], "JSON object"),
        (b"hz=59.8", "not JSON"),
    ],
)
async def test_bad_grid_bodies_are_refused_with_a_reason_and_change_nothing(
    sim: tuple[SimSite, str], body: Any, why: str
) -> None:
    site, base = sim
    status, text = await call(f"{base}/grid", body)
    assert status == 400 and isinstance(text, str) and why in text, text
    assert site.physics.grid.status()["mode"] == "noise"


async def test_a_trace_without_a_frequency_column_is_refused(
    sim: tuple[SimSite, str], tmp_path: Path
) -> None:
    site, base = sim
    path = tmp_path / "power.csv"
    path.write_text("t_s,power_kw\n0,100\n1,101\n")
    status, text = await call(f"{base}/grid", {"trace": str(path)})
    assert status == 400 and "no frequency column" in text and "power_kw" in text
    assert site.physics.grid.status()["mode"] == "noise"
