"""The simulator's fault-injection endpoint, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller.config import load_config
from drivers.sim.physics import Fault
from drivers.sim.site import SimSite

SITE = """
site_id = "ctl"
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
    site = SimSite(load_config(cfg_path))
    await site.start(control=("127.0.0.1", 0))
    try:
        yield site, f"http://127.0.0.1:{site.control_port}"
    finally:
        await site.close()


def _call(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def call(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
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
