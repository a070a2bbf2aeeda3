"""`rampd report --events` on a real journal file: the printed M&V figures and a PNG per event."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from controller.journal import Journal
from controller.market.mv import CurtailmentEvent, EventMeter
from controller.tools.commands import add_report_parser
from controller.wire import rfc3339

T0 = 1_717_243_200.0  # 2024-06-01T12:00:00Z
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rampd")
    add_report_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["report", *argv])


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = cli(argv)
    rc = int(args.func(args))
    out, err = capsys.readouterr()
    return rc, out, err


def measured_events() -> list[CurtailmentEvent]:
    """Three events from the meter, 1 Hz: a price curtailment chained into a commitment that
    misses its target for a while, then later a peak that holds it."""
    m = EventMeter(baseline_minutes=15, tol_w=20e3, ramp_allowance_s=60)
    events: list[CurtailmentEvent] = []
    t = T0 - 900.0

    def feed(seconds: int, kw: float, rail: str, target_kw: float, price: float | None) -> None:
        nonlocal t
        for _ in range(seconds):
            ev = m.sample(
                t, kw * 1e3, rail, target_kw * 1e3, price_usd_per_mwh=price,
                revenue_usd_per_mwh=40.0, detail=f"{rail} reason",
            )  # fmt: skip
            if ev is not None:
                events.append(ev)
            t += 1.0

    feed(900, 2000.0, "default", 2500.0, 30.0)
    # Price: 1500 kW for 1 h at 100 USD/MWh -> 500 kWh, 50 USD avoided, 20 USD forgone.
    feed(3600, 1500.0, "price", 1500.0, 100.0)
    # Commitment to 1000 kW: 60 s allowance, 540 s at 1000 kW, 600 s at 1100 kW (missed);
    # no price: 1000 kW x 600 s + 900 kW x 600 s from the 2000 kW baseline.
    feed(600, 1000.0, "commitment", 1000.0, None)
    feed(600, 1100.0, "commitment", 1000.0, None)
    feed(1800, 2000.0, "default", 2500.0, 30.0)
    # Peak to 800 kW for 30 min: 1200 kW x 0.5 h = 600 kWh at 50 USD/MWh.
    feed(1800, 800.0, "peak", 800.0, 50.0)
    feed(10, 2000.0, "default", 2500.0, 30.0)
    assert [e.rail for e in events] == ["price", "commitment", "peak"]
    return events


@pytest.fixture
def journal_file(tmp_path: Path) -> Path:
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    try:
        for ev in measured_events():
            j.record_curtailment(ev)
        assert j.flush()
    finally:
        j.close()
    return path


def test_events_are_printed_with_their_figures_and_plotted(
    journal_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "plots"
    rc, out, err = run(
        ["--events", "--journal", str(journal_file), "--from", rfc3339(T0 - 60),
         "--to", rfc3339(T0 + 86400), "--out", str(out_dir)],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    lines = out.splitlines()
    price = next(x for x in lines if x.startswith(rfc3339(T0)))
    commitment = next(x for x in lines if x.startswith(rfc3339(T0 + 3600)))
    peak = next(x for x in lines if x.startswith(rfc3339(T0 + 3600 + 1200 + 1800)))

    assert " price " in price and "1h00m00s" in price
    assert "baseline 2000.0 kW (recent)" in price
    assert "target 1500.0 kW" in price
    assert "curtailed 500.0 kWh" in price
    assert "reduction avg 500.0 / min 500.0 kW" in price
    assert "met -" in price
    assert "cost avoided $50.00" in price and "revenue forgone $20.00" in price
    assert price.endswith("price reason")

    assert " commitment " in commitment and "20m00s" in commitment
    assert "curtailed 316.7 kWh" in commitment  # (1000 x 600 + 900 x 600) kW s / 3600
    assert "min 900.0 kW" in commitment
    assert "met NO (47.4%)" in commitment  # 540 of the 1140 judged seconds
    assert "cost avoided $0.00 (priced 0%)" in commitment
    assert "revenue forgone $12.67" in commitment

    assert "met yes (100.0%)" in peak and "curtailed 600.0 kWh" in peak
    assert "cost avoided $30.00" in peak and "revenue forgone $24.00" in peak

    summary = next(x for x in lines if x.startswith("3 events"))
    assert "1416.7 kWh curtailed" in summary
    assert "cost avoided $80.00" in summary and "revenue forgone $56.67" in summary
    assert "net $23.33" in summary
    assert "1 of 2 commitments and peaks met" in summary

    pngs = sorted(out_dir.glob("*.png"))
    assert [p.name for p in pngs] == [
        "event-20240601T120000Z-price.png",
        "event-20240601T130000Z-commitment.png",
        "event-20240601T135000Z-peak.png",
    ]
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert f"plot: {p}" in out


def test_the_window_selects_events_and_no_plot_writes_nothing(
    journal_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run(
        [str(journal_file), "--events", "--no-plot", "--from", rfc3339(T0 + 3000),
         "--to", rfc3339(T0 + 3700)],
        capsys,
    )  # fmt: skip
    assert rc == 0
    rails = re.findall(r"Z  (\w+) ", out)
    assert rails == ["price", "commitment"]  # overlapping the window, not the peak
    assert not (tmp_path / "rampd-events").exists()
    rc, out, _ = run(
        [str(journal_file), "--events", "--from", rfc3339(T0 - 7200), "--to", rfc3339(T0 - 3600)],
        capsys,
    )  # fmt: skip
    assert rc == 0 and "no curtailment events in this window" in out
    # Default plot directory, relative to where the report runs.
    rc, out, _ = run(
        [str(journal_file), "--events", "--from", rfc3339(T0 + 6000), "--to", rfc3339(T0 + 7000)],
        capsys,
    )  # fmt: skip
    assert rc == 0
    assert [p.name for p in (tmp_path / "rampd-events").iterdir()] == [
        "event-20240601T135000Z-peak.png"
    ]


def test_bad_input_is_an_error_not_a_traceback(
    journal_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(["--events", "--journal", str(tmp_path / "nope.sqlite")], capsys)
    assert rc == 2 and "no journal at" in err
    rc, _, err = run([str(tmp_path), "--events"], capsys)
    assert rc == 2 and "not a bench run directory" in err
    rc, _, err = run([str(journal_file), "--events", "--from", "-1h", "--to", "-2h"], capsys)
    assert rc == 2 and "is not after" in err
