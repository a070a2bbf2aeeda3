"""`rampd backtest` as a process, on the real ERCOT summer 2024 prices and the bench site."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controller.config import load_config
from controller.market.prices import read_price_csv

ROOT = Path(__file__).resolve().parents[2]
PRICES = ROOT / "bench" / "data" / "ercot_rt_spp_hb_west_2024-06_08.csv"
SITE = ROOT / "configs" / "bench-site.toml"
KEYS = {
    "curtailed_hours",
    "energy_mwh",
    "curtailed_mwh",
    "energy_cost_usd",
    "mining_revenue_usd",
    "net_usd",
    "flat_out_net_usd",
    "flat_out_energy_mwh",
    "strikes",
    "classes",
    "period",
}


def rampd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", "backtest", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=cwd or ROOT,
    )


def backtest_json(*args: str) -> dict[str, Any]:
    done = rampd("--prices", str(PRICES), "--site", str(SITE), "--json", *args)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)  # one JSON object, nothing else
    return out


@pytest.fixture(scope="module")
def at_50() -> dict[str, Any]:
    """Summer 2024 hashprice (~45-55 USD/PH/day), curtailing at the first interval above."""
    return backtest_json("--hashprice", "50", "--stop-after", "1")


def test_the_ercot_summer_on_the_bench_site(at_50: dict[str, Any]) -> None:
    s = at_50
    assert s.keys() >= KEYS
    quotes = read_price_csv(PRICES)
    assert s["period"]["intervals"] == len(quotes)
    assert s["period"]["hours"] == pytest.approx(len(quotes) * 0.25)
    assert s["rule"]["stop_after"] == 1
    # Energy adds up, and curtailing when the price is above the strike pays.
    assert s["energy_mwh"] + s["curtailed_mwh"] == pytest.approx(s["flat_out_energy_mwh"], abs=0.01)
    assert s["curtailed_mwh"] > 0
    assert s["net_usd"] >= s["flat_out_net_usd"]
    assert s["net_usd"] == pytest.approx(s["mining_revenue_usd"] - s["energy_cost_usd"], abs=0.02)
    # Every class of the site file is there; the containers have no economics.
    kinds = {c.kind for c in load_config(SITE).device_classes()}
    assert set(s["curtailed_hours"]) == kinds == {c["kind"] for c in s["classes"]}
    assert s["strikes"]["modbus_load"] is None
    assert s["curtailed_hours"]["modbus_load"] == 0.0
    # Merit order: the less efficient M60S (18.5 J/TH) has the lower strike and is curtailed
    # at least as long as the S21s (17.5 J/TH).
    assert s["strikes"]["whatsminer-m60s"] < s["strikes"]["antminer-s21-luxos"]
    assert s["curtailed_hours"]["whatsminer-m60s"] >= s["curtailed_hours"]["antminer-s21-luxos"]
    # Prices at or above the S21 strike bound its curtailed hours from below.
    strike = s["strikes"]["antminer-s21-luxos"]
    above_h = sum(q.interval_s for q in quotes if q.usd_per_mwh >= strike) / 3600.0
    assert s["curtailed_hours"]["antminer-s21-luxos"] >= above_h - 1e-6


def test_a_higher_hashprice_curtails_fewer_hours(at_50: dict[str, Any]) -> None:
    low = at_50
    high = backtest_json("--hashprice", "100")
    miners = [k for k, v in low["strikes"].items() if v is not None and k != "gpu_rack"]
    assert miners
    for k in miners:
        assert high["strikes"][k] == pytest.approx(2 * low["strikes"][k], abs=0.01)
        assert high["curtailed_hours"][k] < low["curtailed_hours"][k]
    assert high["curtailed_mwh"] < low["curtailed_mwh"]


def test_a_site_without_economics_needs_a_hashprice() -> None:
    done = rampd("--prices", str(PRICES), "--site", str(SITE), "--json")
    assert done.returncode == 2
    assert "--hashprice" in done.stderr and "[economics]" in done.stderr
    assert done.stdout == ""


def test_a_bad_price_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "prices.csv"
    bad.write_text("interval_start_utc,price_usd_per_mwh\n2024-06-01T05:00:00Z,oops\n")
    done = rampd("--prices", str(bad), "--site", str(SITE), "--hashprice", "50")
    assert done.returncode == 2
    assert f"{bad}:2:" in done.stderr


def test_the_table_and_the_plot(tmp_path: Path) -> None:
    png = tmp_path / "bt.png"
    done = rampd(
        "--prices", str(PRICES), "--site", str(SITE), "--hashprice", "50", "--plot", str(png)
    )
    assert done.returncode == 0, done.stderr
    assert "net USD" in done.stdout and "antminer-s21-luxos" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000
