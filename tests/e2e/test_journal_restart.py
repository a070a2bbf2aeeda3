"""A restart resumes from the journal: `rampd run` twice on one state directory, real processes.

mosquitto + `rampd sim` + `rampd run` (STATE_DIRECTORY set as systemd would), a dispatch, a
SIGTERM, a new daemon: it must hold the dispatched target without being told again, keep
refusing the old seq, and `rampd report` must show all of it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.journal.reader import JournalReader
from tests.e2e.harness import Site, SiteDispatcher, dispatch, run_site, spawn, wire_kw
from tests.helpers import Mosquitto

pytestmark = pytest.mark.e2e

N_LOADS = 20
TARGET_KW = 5200.0

CONFIG = f"""
site_id = "journal"
cycle_s = 0.1
noncontrollable_kw = 300.0
[mqtt]
host = "127.0.0.1"
port = {{broker_port}}
[site]
max_kw = 8000.0
deadband_kw = 20.0
[failsafe]
dispatch_timeout_s = 600
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[meter]
host = "127.69.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = {N_LOADS}
address = "127.69.1.1"
overrides = {{{{ port = 1502 }}}}
"""


@pytest.fixture
def site(mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("STATE_DIRECTORY", str(state))  # inherited by the daemon processes
    with run_site(mosquitto, tmp_path, CONFIG, site_id="journal", n_devices=N_LOADS) as s:
        yield s


async def test_restart_resumes_the_last_dispatch_and_refuses_its_replay(
    site: Site, tmp_path: Path
) -> None:
    seq = time.time_ns() // 1000
    async with SiteDispatcher(site) as d:
        await d.all_devices_on()
        await d.publish_raw(json.dumps(dispatch(seq, target_kw=TARGET_KW)))
        ack = await d.ack_for(f"e2e-{seq}")
        assert ack.accepted, ack
        tel = await d.fresh_telemetry()
        assert wire_kw(tel.target_w) == TARGET_KW

    site.daemon.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(site.daemon.wait, 15) == 0
    site.daemon = spawn(["run", "-c", str(tmp_path / "site.toml")], tmp_path / "rampd-2.log")

    async with SiteDispatcher(site) as d:
        # No new dispatch: the target comes from the journal.
        tel = await d.all_devices_on()
        tel = await d.fresh_telemetry()
        assert wire_kw(tel.target_w) == TARGET_KW and tel.mode == "normal", tel
        # The same seq again, freshly issued: still a replay.
        await d.publish_raw(json.dumps(dispatch(seq, target_kw=1000.0)))
        ack = await d.ack_for(f"e2e-{seq}")
        assert not ack.accepted and "replay" in ack.reason, ack

    # The new daemon journalled what it put back in force (its report shows it below).
    with JournalReader(tmp_path / "state" / "journal.sqlite") as j:
        resumed = [e for e in j.events_between(0.0, time.time() + 60.0) if e.kind == "resume"]
    assert len(resumed) == 1 and f"e2e-{seq} seq {seq}" in resumed[0].text, resumed

    out = tmp_path / "report.png"
    journal = tmp_path / "state" / "journal.sqlite"
    report = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "controller.cli", "report", "--journal", str(journal),
         "--from", "-10m", "-o", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    text = report.stdout
    assert f"accepted  e2e-{seq} seq {seq}: setpoint {TARGET_KW:.1f} kW" in text
    assert f"REJECTED  e2e-{seq} seq {seq}" in text
    assert "event     resume" in text and "event     start" in text and "event     stop" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
