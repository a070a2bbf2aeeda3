"""`rampd demo`, the README's first command: it must start its own broker and end settled."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from controller.tools.broker import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_demo_starts_a_broker_follows_the_script_and_reports_settle_times(tmp_path: Path) -> None:
    # The shipped sim site, moved to addresses and a broker port nobody else uses.
    text = (REPO / "configs" / "sim-site.toml").read_text()
    text = text.replace("port = 1883", f"port = {free_port()}")
    for shipped, ours in (
        ("127.0.1.1", "127.62.1.1"),  # Modbus rows
        ("127.0.2.1", "127.62.2.1"),  # meter
        ("127.1.0.1", "127.62.3.1"),  # miners
        ("127.2.0.1", "127.62.4.1"),  # GPU racks
    ):
        assert shipped in text
        text = text.replace(f'"{shipped}"', f'"{ours}"')
    cfg = tmp_path / "site.toml"
    cfg.write_text(text)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "demo",
            "-c",
            str(cfg),
            "--hold-s",
            "12",
            "--regulation-s",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "started mosquitto" in out or "started amqtt" in out
    rows = re.findall(r"^setpoint (\d+)%\s+([\d.]+)\s+([\d.]+|never)", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["20", "80", "50"], out[-2000:]
    assert all(r[2] != "never" and float(r[2]) < 12 for r in rows), rows
    assert "regulation: mean |error|" in out
