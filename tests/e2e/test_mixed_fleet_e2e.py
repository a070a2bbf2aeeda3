"""A mixed mining fleet end to end: mosquitto + `rampd sim` + `rampd run` as processes, the
site's miners on all four firmwares (LuxOS, Braiins OS+ gRPC, Whatsminer API v2, stock
Antminer web interface) on their real ports beside Modbus loads. The daemon adopts every
miner, follows a dispatch on the meter, and every firmware acknowledges commands through its
own API and moves its miners (as far as its dynamics allow within the test)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from controller.tools.truth import TruthTail, tolerance_kw
from tests.e2e.harness import Site, SiteDispatcher, run_site, truth_until, wire_kw
from tests.helpers import Mosquitto, until

pytestmark = pytest.mark.e2e

N_LOADS = 4
MINERS = {  # group -> (template, count, protocol)
    "lux": ("antminer-s21-luxos", 3, "luxos"),
    "bos": ("antminer-s21-braiins", 3, "braiins"),
    "wm": ("whatsminer-m60s", 3, "whatsminer"),
    "stock": ("antminer-s21-stock", 3, "antminer"),
}
N_DEVICES = N_LOADS + sum(c for _, c, _ in MINERS.values())
SITE_MAX_KW = 1200.0


def site_config() -> str:
    groups = "".join(
        f"""
[[devices]]
name = "{name}"
template = "{template}"
count = {count}
address = "127.94.{k + 10}.1"
overrides = {{{{ poll_s = 1.0 }}}}
"""
        for k, (name, (template, count, _)) in enumerate(MINERS.items())
    )
    return f"""
site_id = "mixed"
cycle_s = 0.1
noncontrollable_kw = 100.0
[mqtt]
host = "127.0.0.1"
port = {{broker_port}}
[site]
min_kw = 0.0
max_kw = {SITE_MAX_KW}
deadband_kw = 5.0
telemetry_max_age_s = 10.0
[failsafe]
dispatch_timeout_s = 600
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[meter]
host = "127.94.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = {N_LOADS}
address = "127.94.1.1"
overrides = {{{{ port = 1502, poll_s = 0.5, timeout_s = 0.5 }}}}
{groups}"""


@pytest.fixture(scope="module")
def site(module_mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("mixed")
    with run_site(
        module_mosquitto, workdir, site_config(), site_id="mixed", n_devices=N_DEVICES
    ) as s:
        yield s


def acked_commands(page: str, driver: str) -> float:
    m = re.search(
        rf'^rampd_command_duration_seconds_count{{driver="{driver}",result="ok"}} (\S+)$',
        page,
        re.MULTILINE,
    )
    return float(m.group(1)) if m else 0.0


async def test_the_daemon_adopts_a_four_firmware_fleet_and_follows_a_dispatch(site: Site) -> None:
    async with SiteDispatcher(site) as d:
        tel = await d.all_devices_on(within=90.0)
        assert tel.devices.total == N_DEVICES
        before = {r["name"]: r["power_w"] for r in await site.sim_control("/devices")}
        lo, hi = wire_kw(tel.min_w), wire_kw(tel.max_w)
        assert lo is not None and hi is not None
        target = round(lo + 0.35 * (hi - lo), 1)
        ack, t0 = await d.send_acked(target_kw=target)
        assert ack.accepted, ack.reason

        # The site follows on the meter (the loads carry the transient).
        tail = TruthTail(site.truth)
        tol = tolerance_kw(target, SITE_MAX_KW)
        await truth_until(tail, t0 + 15.0, within=40.0)
        t, kw = tail.arrays()
        settled = kw[(t >= t0 + 10.0) & (t <= t0 + 15.0)]
        assert settled.size > 10 and abs(settled.mean() - target) <= tol, (target, tol, settled)

        # Every firmware took commands through its own API...
        page = await site.metrics()
        for _, _, protocol in MINERS.values():
            assert acked_commands(page, protocol) >= 1, protocol

        # ... and the miners whose firmware moves within seconds moved (a stock Antminer
        # restarts its mining process first: a minute's dead time).
        async def moved(protocol: str) -> bool:
            rows = await site.sim_control(f"/devices?protocol={protocol}")
            return any(abs(r["power_w"] - before[r["name"]]) > 100.0 for r in rows)

        for protocol in ("luxos", "braiins", "whatsminer"):
            await until(lambda p=protocol: moved(p), 45.0, interval=0.5, what=f"{protocol} moved")
        tel = d.latest()
        assert tel is not None and tel.devices.fault == 0 and tel.devices.unresponsive == 0
