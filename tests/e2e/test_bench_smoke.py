"""Both benches in their --quick form, end to end, as a user runs them: `rampd bench ramp` and
`rampd bench regulation` each start a broker, the simulated site and the daemon. Judged on the
shape of what they print and write (results.json, run directories, plots), never on timing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.tools.report import load_run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
QUICK_DEVICES = {
    "modbus_load": 10,
    "antminer-s21-luxos": 100,
    "antminer-s21-braiins": 25,
    "whatsminer-m60s": 25,
    "antminer-s21-stock": 25,
    "gpu_rack": 4,
    "feeder-breaker": 6,
}
RAMP_SCENARIOS = ["half range down", "reserve up", "reserve down", "half range up", "random 1"]


@dataclass
class Run:
    out: Path
    proc: subprocess.Popen[bytes]
    log: Path
    returncode: int = -1

    @property
    def stdout(self) -> str:
        return self.log.read_text(errors="replace")

    def results(self) -> dict[str, object]:
        body = json.loads((self.out / "results.json").read_text())
        assert isinstance(body, dict)
        return body


def _config(workdir: Path, first: int) -> Path:
    """The reference site moved from its 127.80-89 to 127.<first>..<first+9>: the benches'
    own addresses stay free for a developer's run, and two runs never share one."""
    text = (REPO / "configs" / "bench-site.toml").read_text()
    for k in range(3):
        assert f'"127.{80 + k}.' in text
    for k in range(10):
        text = text.replace(f'"127.{80 + k}.', f'"127.{first + k}.')
    workdir.mkdir(parents=True)
    path = workdir / "bench-site.toml"
    path.write_text(text)
    return path


def _start(workdir: Path, bench: str, first: int, *extra: str) -> Run:
    cfg = _config(workdir, first)
    out = workdir / "out"
    log = workdir / "stdout.txt"
    args = ["bench", bench, "-c", str(cfg), "--quick", "--out", str(out), *extra]
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Run(out, proc, log)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Both benches at once (each on its own site and broker), waited for together."""
    root = tmp_path_factory.mktemp("bench")
    started = {
        "ramp": _start(root / "ramp", "ramp", 40),
        # One 60 s block of the signal at x5 instead of --quick's two.
        "regulation": _start(root / "regulation", "regulation", 50, "--minutes", "1"),
    }
    try:
        for run in started.values():
            run.returncode = run.proc.wait(timeout=240)
        yield started
    finally:
        for run in started.values():
            if run.proc.poll() is None:
                run.proc.terminate()  # the bench stops its own processes on SIGTERM
                try:
                    run.proc.wait(30)
                except subprocess.TimeoutExpired:
                    run.proc.kill()
                    run.proc.wait(10)


def _png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000, path


def _truth_lines(path: Path) -> int:
    lines = path.read_text().splitlines()
    for line in lines:
        rec = json.loads(line)
        assert isinstance(rec["t"], float) and isinstance(rec["site_kw"], float)
    return len(lines)


def test_ramp_bench_quick_prints_its_table_and_writes_a_run_per_scenario(
    runs: dict[str, Run],
) -> None:
    run = runs["ramp"]
    out = run.stdout
    assert run.returncode == 0, out[-4000:]
    assert re.search(r"^scenario\s+target kW\s+step kW\s+settle s\s+phys min s", out, re.M), out
    assert re.search(r"^\d+/5 scenarios within 1\.2x", out, re.M), out[-2000:]
    assert "reproduce: rampd bench ramp" in out

    res = run.results()
    assert res["format"] == "rampd-bench-ramp/1"
    assert isinstance(res["command"], str) and "--quick" in res["command"]
    config = res["config"]
    assert isinstance(config, dict) and config["quick"] is True
    assert config["devices"] == QUICK_DEVICES
    lo, hi = config["site_min_kw"], config["site_max_kw"]
    scenarios = res["scenarios"]
    assert isinstance(scenarios, list)
    assert [s["name"] for s in scenarios] == RAMP_SCENARIOS
    for s in scenarios:
        assert s["accepted"] is True, s
        assert lo <= s["target_kw"] <= hi
        assert s["settle_s"] is None or s["settle_s"] >= 0
        assert s["physical_min_s"] is None or s["physical_min_s"] > 0
        assert s["iae_kws"] >= 0 and s["overshoot_kw"] >= 0
        assert s["t0"] < s["t_end"] and isinstance(s["verdict"], str)
        run_dir = Path(s["run_dir"])
        spec = load_run(run_dir)
        assert [d.target_kw for d in spec.dispatches] == [s["target_kw"]]
        assert _truth_lines(run_dir / "truth.jsonl") > 10
        _png(run_dir / "report.png")
    summary = res["summary"]
    assert isinstance(summary, dict) and summary["total"] == len(RAMP_SCENARIOS)
    assert summary["within"] == sum(s["within"] for s in scenarios)
    # The whole run is a run directory too (`rampd report OUT`).
    assert len(load_run(run.out).dispatches) == len(RAMP_SCENARIOS)
    assert (run.out / "site.toml").is_file() and (run.out / "telemetry.jsonl").stat().st_size


def test_regulation_bench_quick_scores_blocks_and_plots_the_run(runs: dict[str, Run]) -> None:
    run = runs["regulation"]
    out = run.stdout
    assert run.returncode == 0, out[-4000:]
    assert re.search(r"^block\s+from s\s+accuracy\s+delay\s+precision\s+score", out, re.M), out
    assert re.search(r"^PJM performance score \d\.\d{3}: ", out, re.M), out[-2000:]

    res = run.results()
    assert res["format"] == "rampd-bench-regulation/1"
    scoring = res["scoring"]
    assert isinstance(scoring, dict)
    assert (scoring["sample_s"], scoring["block_s"], scoring["max_delay_s"]) == (2.0, 60.0, 60.0)
    blocks = res["blocks"]
    assert isinstance(blocks, list) and len(blocks) == 1
    overall = res["overall"]
    assert isinstance(overall, dict)
    for fig in (*blocks, overall):
        for key in ("accuracy", "delay", "precision", "score"):
            assert 0.0 <= fig[key] <= 1.0, fig
    offer, config = res["offer"], res["config"]
    assert isinstance(offer, dict) and isinstance(config, dict)
    assert config["devices"] == QUICK_DEVICES
    assert offer["band_kw"] > 0
    assert config["site_min_kw"] <= offer["base_kw"] - offer["band_kw"]
    assert offer["base_kw"] + offer["band_kw"] <= config["site_max_kw"]
    # 60 s of wall time, a dispatch every 2 s / 5.
    assert res["dispatches"] == 150 and res["rejected"] == 0
    spec = load_run(run.out)
    assert len(spec.dispatches) == 150 and {d.mode for d in spec.dispatches} == {"regulation"}
    _png(run.out / "report.png")
