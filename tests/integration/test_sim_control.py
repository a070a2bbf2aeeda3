"""The simulator's fault-injection endpoint, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.config import load_config
from drivers.sim.physics import Fault
from drivers.sim.site import SimSite

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
