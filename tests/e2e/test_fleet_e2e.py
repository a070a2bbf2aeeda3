"""A fleet that changes under a running daemon: mosquitto + `rampd sim` + `rampd run` as
processes. A device that acknowledges commands and does not move is found UNRESPONSIVE and
comes back once it follows again; SIGHUP reloads the site file, removing and adding devices
while control goes on, and a bad file changes nothing.

One site serves the module; the tests run in file order and each leaves the site working.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator

import pytest

from controller.wire import Telemetry
from tests.e2e.harness import Site, SiteDispatcher, run_site, wire_kw
from tests.helpers import Mosquitto, until

pytestmark = pytest.mark.e2e

N_KEPT = 8
N_SPARE = 4
SITE_MAX_KW = 4000.0


def site_config(spare: bool) -> str:
    """The site's TOML ({broker_port}, {metrics_port} for run_site), with the spare group or
    without it."""
    spare_group = f"""
[[devices]]
name = "spare"
template = "modbus-load"
count = {N_SPARE}
address = "127.93.3.1"
overrides = {{{{ port = 1502, poll_s = 0.5, timeout_s = 0.5 }}}}
"""
    return f"""
site_id = "fleet"
cycle_s = 0.1
noncontrollable_kw = 200.0
[mqtt]
host = "127.0.0.1"
port = {{broker_port}}
[site]
min_kw = 0.0
max_kw = {SITE_MAX_KW}
deadband_kw = 10.0
telemetry_max_age_s = 5.0
[failsafe]
dispatch_timeout_s = 600
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[meter]
host = "127.93.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = {N_KEPT}
address = "127.93.1.1"
overrides = {{{{ port = 1502, poll_s = 0.5, timeout_s = 0.5 }}}}
{spare_group if spare else ""}"""


@pytest.fixture(scope="module")
def site(module_mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("fleet")
    with run_site(
        module_mosquitto,
        workdir,
        site_config(spare=True),
        site_id="fleet",
        n_devices=N_KEPT + N_SPARE,
    ) as s:
        yield s


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text page (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def telemetry_where(
    d: SiteDispatcher, ok: Callable[[Telemetry], bool], within: float
) -> Telemetry:
    """The latest telemetry, once it passes `ok`."""
    await until(lambda: (t := d.latest()) is not None and ok(t), within, what="telemetry")
    tel = d.latest()
    assert tel is not None
    return tel


async def test_a_device_that_does_not_move_is_unresponsive_until_it_follows_again(
    site: Site,
) -> None:
    async with SiteDispatcher(site) as d:
        tel = await d.all_devices_on()
        lo, hi = wire_kw(tel.min_w), wire_kw(tel.max_w)
        assert lo is not None and hi is not None
        applied = await site.sim_control("/faults", {"fault": "stuck", "devices": ["row-0003"]})
        assert applied["applied"] == ["row-0003"]
        # Move the site far both ways: every device is told to move a long way, again and
        # again, until the stuck one has ignored two commands in a row.
        for frac in (0.3, 0.9, 0.3, 0.9, 0.3, 0.9):
            await d.send_acked(target_kw=round(lo + frac * (hi - lo), 1))
            try:
                await telemetry_where(d, lambda t: t.devices.unresponsive == 1, 10.0)
                break
            except AssertionError:  # not yet: move again
                continue
        tel = await telemetry_where(d, lambda t: t.devices.unresponsive == 1, 5.0)
        assert tel.devices.on == N_KEPT + N_SPARE - 1
        page = await site.metrics()
        assert metric(page, "rampd_devices", state="unresponsive") == 1.0
        assert metric(page, "rampd_device_errors_total", driver="modbus", op="unverified") >= 2
        # Cleared, the device follows its retried command and is back in control.
        await site.sim_control("/faults", {"fault": "none", "devices": ["row-0003"]})
        await telemetry_where(
            d, lambda t: t.devices.unresponsive == 0 and t.devices.on == N_KEPT + N_SPARE, 40.0
        )
        lines = site.daemon_log.splitlines()
        # One line per change of the stuck device's state (another device's own changes,
        # if a busy machine made one miss a check, are not its).
        assert sum("row-0003: UNRESPONSIVE" in ln for ln in lines) == 1
        assert any("row-0003: follows commands again" in ln for ln in lines)


async def test_sighup_reloads_the_site_file_removing_and_adding_devices(site: Site) -> None:
    cfg = site.logs / "site.toml"
    original = cfg.read_text()
    async with SiteDispatcher(site) as d:
        await d.all_devices_on()
        cycles_before = (await telemetry_where(d, lambda t: t.cycle is not None, 5.0)).cycle
        # Without the spare group: those devices leave the fleet, control goes on.
        cfg.write_text(original.split('[[devices]]\nname = "spare"')[0])
        site.daemon.send_signal(signal.SIGHUP)
        tel = await telemetry_where(d, lambda t: t.devices.total == N_KEPT, 30.0)
        assert tel.devices.on == N_KEPT
        assert site.daemon.poll() is None
        page = await site.metrics()
        assert metric(page, "rampd_config_reloads_total", result="applied") == 1.0

        # A bad file: refused, nothing changes.
        cfg.write_text(original.replace('template = "modbus-load"', 'template = "no-such"', 1))
        site.daemon.send_signal(signal.SIGHUP)
        await until(
            lambda: "reload refused" in site.daemon_log, 15.0, what="the refusal in the log"
        )
        page = await site.metrics()
        assert metric(page, "rampd_config_reloads_total", result="rejected") == 1.0
        tel = await telemetry_where(d, lambda t: t.devices.total == N_KEPT, 5.0)

        # Back with the spare group: adopted at their first answer, all on.
        cfg.write_text(original)
        site.daemon.send_signal(signal.SIGHUP)
        tel = await telemetry_where(d, lambda t: t.devices.on == N_KEPT + N_SPARE, 30.0)
        # Control never stopped: cycles kept counting through the reloads.
        assert tel.cycle is not None and cycles_before is not None
        assert tel.cycle.count > cycles_before.count
        lo, hi = wire_kw(tel.min_w), wire_kw(tel.max_w)
        assert lo is not None and hi is not None
        target = round(lo + 0.5 * (hi - lo), 1)
        await d.send_acked(target_kw=target)
        await telemetry_where(
            d,
            lambda t: (m := wire_kw(t.measured_w)) is not None and abs(m - target) < 0.05 * hi,
            30.0,
        )
