"""The failsafe survives a restart, and a corrupt journal does not stop one: real processes.

mosquitto + `rampd sim` + `rampd run` on one state directory (STATE_DIRECTORY, as systemd
sets it), SIGTERM and a new daemon. Policy `min` after a short silence, so whether the
failsafe is on is plain in the status, the telemetry's target and the journal.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.journal.reader import JournalReader
from controller.wire.status import Status
from tests.e2e.harness import Site, SiteDispatcher, run_site, spawn, wire_kw
from tests.helpers import Mosquitto, until

pytestmark = pytest.mark.e2e

N_LOADS = 10
SITE_MIN_KW = 1000.0


def config(timeout_s: float) -> str:
    return f"""
site_id = "survive"
cycle_s = 0.1
noncontrollable_kw = 300.0
[mqtt]
host = "127.0.0.1"
port = {{broker_port}}
[site]
min_kw = {SITE_MIN_KW}
max_kw = 5000.0
deadband_kw = 20.0
[failsafe]
dispatch_timeout_s = {timeout_s}
policy = "min"
ramp_s = 0
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[meter]
host = "127.70.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = {N_LOADS}
address = "127.70.1.1"
overrides = {{{{ port = 1502 }}}}
"""


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("STATE_DIRECTORY", str(state))  # inherited by the daemon processes
    return state


@pytest.fixture
def corrupt_state(state: Path) -> Path:
    """A state directory whose journal is random bytes (a disk that failed under it)."""
    (state / "journal.sqlite").write_bytes(os.urandom(64 * 1024))
    return state


def site_with(mosquitto: Mosquitto, tmp_path: Path, timeout_s: float) -> Iterator[Site]:
    with run_site(
        mosquitto, tmp_path, config(timeout_s), site_id="survive", n_devices=N_LOADS
    ) as s:
        yield s


async def status_where(d: SiteDispatcher, ok: Callable[[Status], bool], within: float) -> Status:
    await until(lambda: bool(d.status) and ok(d.status[-1]), within, interval=0.02, what="status")
    return d.status[-1]


async def restart(site: Site, tmp_path: Path, log_name: str) -> None:
    site.daemon.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(site.daemon.wait, 15) == 0
    site.daemon = spawn(["run", "-c", str(tmp_path / "site.toml")], tmp_path / log_name)


def events(state: Path, kind: str) -> list[str]:
    with JournalReader(state / "journal.sqlite") as j:
        return [e.text for e in j.events_between(0.0, time.time() + 60.0) if e.kind == kind]


@pytest.fixture
def quick_site(mosquitto: Mosquitto, tmp_path: Path, corrupt_state: Path) -> Iterator[Site]:
    yield from site_with(mosquitto, tmp_path, timeout_s=3.0)


async def test_on_a_corrupt_journal_control_goes_on_and_a_failsafe_outlives_a_restart(
    quick_site: Site, tmp_path: Path, corrupt_state: Path
) -> None:
    site = quick_site
    async with SiteDispatcher(site) as d:
        await d.all_devices_on()
        # The corrupt journal was moved aside and a fresh one begun: nothing stopped.
        aside = await asyncio.to_thread(
            lambda: [p.name for p in corrupt_state.iterdir() if ".corrupt-" in p.name]
        )
        assert len(aside) == 1, aside
        metrics = await site.metrics()
        assert "rampd_journal_moved_aside_total 1.0" in metrics
        assert "rampd_journal_healthy 1.0" in metrics
        ack, _ = await d.send_acked(target_kw=4000.0)
        assert ack.accepted
        # Silent: the failsafe takes the site to its minimum.
        st = await status_where(d, lambda s: s.mode == "failsafe", within=10)
        assert "since before the restart" not in st.detail

    await restart(site, tmp_path, "rampd-2.log")

    async with SiteDispatcher(site) as d:
        st = await status_where(
            d, lambda s: s.online and s.mode == "failsafe", within=30
        )  # the new daemon's first word: still in the failsafe
        # (the meter may still be stale then: the detail goes on to say so)
        assert st.detail.startswith(
            "no dispatch or heartbeat for 3 s (since before the restart); policy min"
        )
        tel = await d.all_devices_on()
        assert tel.mode == "failsafe" and wire_kw(tel.target_w) == SITE_MIN_KW
        # A dispatch ends it, as it would have before the restart.
        ack, _ = await d.send_acked(target_kw=3000.0)
        assert ack.accepted
        await status_where(d, lambda s: s.mode == "normal", within=5)
    (kept,) = events(corrupt_state, "failsafe")
    assert "on since before the restart" in kept
    (fresh,) = events(corrupt_state, "journal")
    assert "file is not a database" in fresh and aside[0] in fresh


@pytest.fixture
def slow_site(mosquitto: Mosquitto, tmp_path: Path, state: Path) -> Iterator[Site]:
    yield from site_with(mosquitto, tmp_path, timeout_s=8.0)


async def test_a_dispatcher_silent_across_a_restart_longer_than_its_timeout_trips_it_at_start(
    slow_site: Site, tmp_path: Path, state: Path
) -> None:
    site = slow_site
    async with SiteDispatcher(site) as d:
        await d.all_devices_on()
        ack, _ = await d.send_acked(target_kw=4000.0)
        assert ack.accepted
        heard = time.time()
    site.daemon.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(site.daemon.wait, 15) == 0
    # The scenario: the daemon stays down past the dispatcher's timeout (8 s since heard).
    await asyncio.sleep(max(0.0, heard + 9.0 - time.time()))
    site.daemon = spawn(["run", "-c", str(tmp_path / "site.toml")], tmp_path / "rampd-2.log")

    async with SiteDispatcher(site) as d:
        st = await status_where(d, lambda s: s.online and s.mode == "failsafe", within=30)
        assert st.detail.startswith(
            "no dispatch or heartbeat for 8 s (across the restart); policy min"
        )
        tel = await d.all_devices_on()
        assert tel.mode == "failsafe" and wire_kw(tel.target_w) == SITE_MIN_KW
    (tripped,) = events(state, "failsafe")
    assert "before the restart" in tripped and "last heard" in tripped
