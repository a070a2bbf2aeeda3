"""`rampd bench fanout` at a small size, as a user runs it: simulator processes per protocol,
the real drivers in the bench process, the floor beside them. Judged on the shape of what it
prints and writes and on every device having answered, never on timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from controller.tools.bench import FANOUT_PROTOCOLS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
DEVICES = 12
PROTOCOLS = FANOUT_PROTOCOLS  # every protocol, each beside its floor


def test_fanout_bench_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "controller.cli", "bench", "fanout"),
            *("--sizes", str(DEVICES), "--bursts", "1", "--poll-s", "0.5", "--out", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("protocol"))
    assert lines[header].split() == [
        *("protocol", "devices", "rampd", "s", "floor", "s", "ratio", "first", "s", "answered"),
        *("cpu", "us/dev", "floor", "poll", "s"),
    ]
    rows = [line.split() for line in lines[header + 1 : header + 1 + len(PROTOCOLS)]]
    assert [r[0] for r in rows] == list(PROTOCOLS)
    for r in rows:
        assert int(r[1]) == DEVICES and int(r[6]) == DEVICES
        assert all(float(x) > 0 for x in r[2:6] + r[7:9])
        assert float(r[9]) == 0.5  # the devices' period: within the default poll budget

    report = json.loads((out / "results.json").read_text())
    assert report["bench"] == "fanout" and report["loop"] in ("uvloop", "asyncio")
    results = report["results"]
    assert [r["protocol"] for r in results] == list(PROTOCOLS)
    for r in results:
        assert r["devices"] == DEVICES and r["answered"] == DEVICES
        assert r["rampd_s"] > 0 and r["floor_s"] > 0 and r["first_s"] > 0
        assert r["ratio"] == pytest.approx(r["rampd_s"] / r["floor_s"], abs=0.01)
        assert len(r["floor_runs_s"]) == 1 and len(r["driver"]["runs_s"]) == 1
        assert r["driver"]["errors"] == 0
        assert r["cpu_us"] > 0 and r["floor_cpu_us"] > 0
        assert r["driver"]["poll_s"] == 0.5
    # Every simulator process was stopped: none is left serving the bench's addresses.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert str(out) not in ps.stdout
