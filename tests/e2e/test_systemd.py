"""The systemd unit verifies clean and is hardened; the daemon speaks sd_notify correctly.

The notify tests bind a datagram socket as systemd would and start the real daemon against a
real simulator with NOTIFY_SOCKET pointing at it.
"""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import run_site
from tests.helpers import Mosquitto

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "rampd.service"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def _unit_for_this_machine(tmp_path: Path) -> Path:
    # verify checks that ExecStart exists: point it at this environment's rampd.
    rampd = Path(sys.executable).parent / "rampd"
    unit = tmp_path / "rampd.service"
    unit.write_text(UNIT.read_text().replace("/opt/rampd/bin/rampd", str(rampd)))
    return unit


@needs_systemd_analyze
def test_unit_verifies_without_any_output(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(_unit_for_this_machine(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Warnings exit 0: any output at all is a finding.
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc


@needs_systemd_analyze
def test_unit_exposure_is_at_most_two() -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for rampd.service: ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    assert float(m.group(1)) <= 2.0


CONFIG = """
site_id = "notify"
noncontrollable_kw = 100.0
[mqtt]
host = "127.0.0.1"
port = {broker_port}
[site]
max_kw = 3000
[metrics]
listen = "127.0.0.1:{metrics_port}"
[meter]
host = "127.67.2.1"
port = 1502
[[devices]]
name = "row"
template = "modbus-load"
count = 10
address = "127.67.1.1"
overrides = {{ port = 1502 }}
"""


class NotifySocket:
    """What systemd listens on: a datagram socket; collects (monotonic time, message)."""

    def __init__(self, path: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"\0rampd-test-{time.monotonic_ns()}" if abstract else str(path)
        self.sock.bind(name)
        self.sock.settimeout(0.05)
        self.env_value = "@" + name[1:] if abstract else name
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def times_of(self, line: str) -> list[float]:
        return [t for t, m in self.messages if line in m.splitlines()]


@pytest.fixture(params=[False, True], ids=["path", "abstract"])
def notify(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock", abstract=request.param)
    yield s
    s.sock.close()


@pytest.mark.e2e
def test_ready_then_watchdog_at_half_the_interval_and_none_while_stalled(
    mosquitto: Mosquitto, tmp_path: Path, notify: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "1000000"}
    with run_site(
        mosquitto, tmp_path, CONFIG, site_id="notify", n_devices=10, daemon_env=env
    ) as site:
        deadline = time.monotonic() + 30
        while not notify.times_of("READY=1") and time.monotonic() < deadline:
            notify.collect(0.2)
        ready = notify.times_of("READY=1")
        assert ready, notify.messages
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for _, m in notify.messages)
        status = [m for _, m in notify.messages if "STATUS=mode " in m]
        assert status and "devices on" in status[-1], notify.messages
        # The meter is stale for the first cycle (a warning): STATUS= carries the last one.
        assert any("last error: site meter stale" in m for m in status), status
        notify.collect(3.0)
        kicks = [t for t in notify.times_of("WATCHDOG=1") if t > ready[0]]
        gaps = [b - a for a, b in itertools.pairwise(kicks)]
        # About every half WATCHDOG_USEC (0.5 s): never so late that systemd would kill it,
        # never a flood.
        assert len(kicks) >= 4 and all(0.25 <= g < 1.0 for g in gaps), gaps

        # Stall the daemon: no kicks while it is stopped, they resume when it continues.
        site.daemon.send_signal(signal.SIGSTOP)
        notify.messages.clear()
        notify.collect(2.0)
        assert notify.times_of("WATCHDOG=1") == []
        site.daemon.send_signal(signal.SIGCONT)
        notify.collect(1.5)
        assert notify.times_of("WATCHDOG=1")

        site.daemon.send_signal(signal.SIGTERM)
        site.daemon.wait(15)
        notify.collect(0.3)
        assert any("STOPPING=1" in m for _, m in notify.messages)


@pytest.mark.e2e
def test_no_watchdog_when_watchdog_pid_is_another_process(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock", abstract=False)
    env = {"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    with run_site(mosquitto, tmp_path, CONFIG, site_id="notify", n_devices=10, daemon_env=env):
        deadline = time.monotonic() + 30
        while not notify.times_of("READY=1") and time.monotonic() < deadline:
            notify.collect(0.2)
        assert notify.times_of("READY=1")
        notify.collect(1.0)
        assert notify.times_of("WATCHDOG=1") == []
    notify.sock.close()
