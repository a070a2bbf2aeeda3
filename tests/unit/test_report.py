"""`rampd report` on a real journal and a real bench run directory: text lines and PNGs."""

from __future__ import annotations

import argparse
import json
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from controller.config import SiteLimits
from controller.journal import Journal, TelemetrySample
from controller.ramp_score import RampScorer, score_series, tolerance_w
from controller.tools.commands import add_report_parser
from controller.tools.report import (
    PlotSeries,
    ReportError,
    RunDispatch,
    RunSpec,
    load_run,
    parse_when,
    render_plot,
    report_from_journal,
    report_from_run,
    write_run,
)
from controller.tools.truth import read_truth
from controller.wire import Dispatch, DispatchRejected, rfc3339

SITE_MAX_KW = 2500.0
LIMITS = SiteLimits(min_kw=0.0, max_kw=SITE_MAX_KW)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


class Site:
    """A toy site for the figures: 0.4 s dead time, 200 kW/s ramps, 2 kW meter noise."""

    RATE_KW_S = 200.0
    DEAD_S = 0.4
    MIN_KW, MAX_KW = 300.0, 2400.0

    def __init__(self, start_kw: float, seed: int = 1) -> None:
        self.p = start_kw
        self.rng = np.random.default_rng(seed)
        self.asked: list[tuple[float, float]] = []  # (t, kW) as seen by the devices

    def step(self, t: float, dt: float, target_kw: float) -> float:
        self.asked.append((t, target_kw))
        seen = [kw for ts, kw in self.asked if ts <= t - self.DEAD_S]
        goal = seen[-1] if seen else self.p
        self.p += float(np.clip(goal - self.p, -self.RATE_KW_S * dt, self.RATE_KW_S * dt))
        if len(self.asked) > 50:
            self.asked = self.asked[-50:]
        return self.p + float(self.rng.normal(0.0, 2.0))

    def reach_kw(self, horizon_s: float) -> tuple[float, float]:
        move = self.RATE_KW_S * max(0.0, horizon_s - self.DEAD_S)
        return min(self.MAX_KW - self.p, move), min(self.p - self.MIN_KW, move)


def dispatch_payload(seq: int, at: float, **fields: object) -> bytes:
    body = {"id": f"d{seq}", "seq": seq, "issued_at": rfc3339(at), "mode": "setpoint", **fields}
    return json.dumps(body).encode()


@dataclass
class JournalRun:
    db: Path
    t0: float
    t1: float


@pytest.fixture
def site_journal(tmp_path: Path) -> JournalRun:
    """Ten minutes of a site in the journal, written the way the daemon writes it."""
    db = tmp_path / "journal.sqlite"
    t0 = math.floor(time.time()) - 700.0
    site = Site(2400.0)
    watch = RampScorer(confirm_s=10.0)
    script: dict[float, dict[str, object]] = {
        60.0: {"target_kw": 1200.0},
        180.0: {"target_kw": 600.0, "ramp_s": 30.0},
        300.0: {"target_kw": 9000.0},  # above the site maximum: rejected
        420.0: {"target_kw": 1800.0},
    }
    target = 2400.0
    last_seq: int | None = None
    mode = "normal"
    with Journal(db) as j:
        j.record_event("start", "rampd 0.1.0: 250 devices", at=t0)
        for k in range(6000):  # 10 Hz for 600 s
            t = t0 + k / 10
            rel = k / 10
            if rel in script:
                raw = dispatch_payload(len(script) + k, t, **script[rel])
                try:
                    d = Dispatch.decode(raw, now_unix=t, last_seq=last_seq, limits=LIMITS)
                except DispatchRejected as exc:
                    j.record_dispatch(t, raw, exc)
                    j.record_ack(t, exc.id, exc.seq, False, exc.reason)
                else:
                    last_seq = d.seq
                    j.record_dispatch(t, raw, d)
                    j.record_ack(t, d.id, d.seq, True, "")
                    prev = watch.start(
                        t,
                        d.id,
                        from_w=site.p * 1e3,
                        target_w=d.target_w,
                        tol_w=tolerance_w(d.target_w, SITE_MAX_KW * 1e3),
                        physical_min_s=max(
                            d.ramp_s, Site.DEAD_S + abs(d.target_w / 1e3 - site.p) / Site.RATE_KW_S
                        ),
                    )
                    if prev is not None:
                        j.record_ramp(prev)
                    ramp_from, ramp_t0, ramp_s, ramp_to = target, t, d.ramp_s, d.target_w / 1e3
            if rel == 340.0:
                mode = "failsafe"
                j.record_event("failsafe", "no dispatch or heartbeat for 40 s; policy hold", at=t)
            if rel == 400.0:
                mode = "normal"
                j.record_event("mode", "failsafe -> normal by heartbeat", at=t)
            if rel >= 60.0:
                frac = 1.0 if ramp_s <= 0 else min(1.0, (t - ramp_t0) / ramp_s)
                target = ramp_from + (ramp_to - ramp_from) * frac
            measured = site.step(t, 0.1, target)
            rec = watch.observe(t, measured * 1e3)
            if rec is not None:
                j.record_ramp(rec)
            if k % 10 == 0:
                up = [site.reach_kw(h)[0] * 1e3 for h in (1.0, 5.0, 60.0)]
                down = [site.reach_kw(h)[1] * 1e3 for h in (1.0, 5.0, 60.0)]
                j.record_telemetry(
                    TelemetrySample(
                        at=t,
                        measured_w=measured * 1e3,
                        measured_source="meter",
                        target_w=target * 1e3,
                        min_w=Site.MIN_KW * 1e3,
                        max_w=Site.MAX_KW * 1e3,
                        up_w=(up[0], up[1], up[2]),
                        down_w=(down[0], down[1], down[2]),
                        mode=mode,
                        saturated=False,
                        devices={"on": 250, "sleeping": 0, "waking": 0, "fault": 0, "unknown": 0},
                    )
                )
        rec = watch.stop(t0 + 600.0)
        if rec is not None:
            j.record_ramp(rec)
        j.record_event("stop", "SIGTERM", at=t0 + 600.0)
    return JournalRun(db, t0, t0 + 600.0)


def test_journal_report_lists_every_entry_and_renders_a_png(
    site_journal: JournalRun, tmp_path: Path
) -> None:
    out = tmp_path / "report.png"
    text = report_from_journal(site_journal.db, site_journal.t0, site_journal.t1, out)
    lines = text.splitlines()
    assert "4 dispatches (1 rejected), 4 acks, 3 ramps, 4 events, 600 telemetry samples" in lines[1]
    body = [ln for ln in lines if ln[:4].isdigit()]
    kinds = [ln.split()[1] for ln in body]
    assert kinds.count("dispatch") == 4 and kinds.count("ack") == 4
    assert kinds.count("ramp") == 3 and kinds.count("event") == 4
    assert body == sorted(body, key=lambda ln: ln.split()[0])  # oldest first
    assert any("accepted" in ln and "setpoint 1200.0 kW" in ln for ln in body)
    assert any("setpoint 600.0 kW, ramp 30 s" in ln for ln in body)
    assert any(
        "REJECTED" in ln and "above site maximum" in ln and "[out_of_range]" in ln for ln in body
    )
    assert any("event     failsafe" in ln for ln in body)
    settled = [ln for ln in body if " ramp " in f" {ln} " and "settled" in ln]
    assert len(settled) == 3
    assert all("physical min" in ln for ln in settled)
    assert f"plot: {out}" in text
    assert png_size(out) == (1280, 720)
    assert out.stat().st_size > 30_000


def test_journal_report_honours_the_window(site_journal: JournalRun, tmp_path: Path) -> None:
    t0 = site_journal.t0 + 170.0
    text = report_from_journal(site_journal.db, t0, t0 + 100.0, tmp_path / "w.png")
    assert "setpoint 1200.0 kW" not in text
    assert "setpoint 600.0 kW" in text
    assert "100 telemetry samples" in text or "101 telemetry samples" in text


def test_journal_report_without_telemetry_prints_and_skips_the_plot(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite"
    now = time.time()
    with Journal(db) as j:
        j.record_event("start", "rampd", at=now)
    out = tmp_path / "none.png"
    text = report_from_journal(db, now - 60, now + 60, out)
    assert "event     start" in text
    assert "no telemetry in this window" in text
    assert not out.exists()


def _write_bench_run(run_dir: Path) -> RunSpec:
    """A bench-like run: the simulator's truth at 10 Hz, the dispatches, daemon telemetry."""
    run_dir.mkdir()
    t_start = 1_717_243_200.0
    site = Site(2400.0, seed=3)
    steps = [(5.0, 600.0, "full range down"), (25.0, 2400.0, "full range up"),
             (45.0, 1500.0, "half range down")]  # fmt: skip
    target = 2400.0
    dispatches: list[RunDispatch] = []
    with (run_dir / "truth.jsonl").open("w") as truth, (run_dir / "tel.jsonl").open("w") as tel:
        for k in range(650):
            rel = k / 10
            t = t_start + rel
            for at, kw, label in steps:
                if rel == at:
                    dispatches.append(
                        RunDispatch(
                            t=t,
                            target_kw=kw,
                            id=f"bench-{len(dispatches) + 1}",
                            label=label,
                            physical_min_s=Site.DEAD_S + abs(kw - site.p) / Site.RATE_KW_S,
                        )
                    )
                    target = kw
            p = site.step(t, 0.1, target)
            truth.write(json.dumps({"t": round(t, 3), "site_kw": round(p, 3)}) + "\n")
            if k % 10 == 0:
                up5, down5 = site.reach_kw(5.0)
                up60, down60 = site.reach_kw(60.0)
                msg = {
                    "at": rfc3339(t),
                    "measured_kw": p,
                    "target_kw": target,
                    "min_kw": Site.MIN_KW,
                    "max_kw": Site.MAX_KW,
                    "capability": {
                        "up_kw": {"1s": 0.0, "5s": up5, "60s": up60},
                        "down_kw": {"1s": 0.0, "5s": down5, "60s": down60},
                    },
                    "mode": "normal",
                }
                tel.write(json.dumps(msg) + "\n")
        truth.write('{"t": 17172432')  # a torn last line, as a killed simulator leaves it
    spec = RunSpec(
        name="ramp bench: three steps (toy site)",
        site_max_kw=SITE_MAX_KW,
        dispatches=tuple(dispatches),
        telemetry="tel.jsonl",
    )
    write_run(run_dir, spec)
    return spec


def test_run_report_matches_the_ramp_scorer_and_renders_a_png(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    spec = _write_bench_run(run_dir)
    assert load_run(run_dir) == spec
    text = report_from_run(run_dir)
    out = run_dir / "report.png"
    assert f"plot: {out}" in text
    assert png_size(out) == (1280, 720)
    t, kw = read_truth(run_dir / "truth.jsonl")
    ds = spec.dispatches
    for i, d in enumerate(ds):
        t_end = ds[i + 1].t if i + 1 < len(ds) else float(t[-1])
        f = score_series(
            t, kw * 1e3, t0=d.t, t_end=t_end, target_w=d.target_kw * 1e3,
            tol_w=tolerance_w(d.target_kw * 1e3, SITE_MAX_KW * 1e3),
        )  # fmt: skip
        assert f.settle_s is not None and d.physical_min_s is not None
        row = next(ln for ln in text.splitlines() if ln.startswith(d.label or "?"))
        assert f"{f.settle_s:.2f}" in row
        assert f"{f.settle_s / d.physical_min_s:.2f}" in row


def test_run_directory_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"no run\.json"):
        report_from_run(tmp_path)
    (tmp_path / "run.json").write_text('{"format": "something-else"}')
    with pytest.raises(ReportError, match="not a rampd-run/1"):
        report_from_run(tmp_path)
    (tmp_path / "run.json").write_text('{"format": "rampd-run/1", "dispatches": []}')
    with pytest.raises(ReportError, match="site_max_kw"):
        report_from_run(tmp_path)
    write_run(tmp_path, RunSpec(name="x", site_max_kw=1.0, dispatches=()))
    with pytest.raises(ReportError, match="no truth log"):
        report_from_run(tmp_path)


def test_render_plot_handles_a_long_series(tmp_path: Path) -> None:
    n = 14 * 86400  # two weeks of per-second telemetry
    t = 1.7e9 + np.arange(n, dtype=np.float64)
    target = np.where((t - t[0]) % 7200 < 3600, 1000.0, 2000.0)
    measured = target + np.random.default_rng(0).normal(0, 5, n)
    series = PlotSeries(t=t, measured_kw=measured, target_kw=target)
    out = render_plot(series, tmp_path / "long.png", "two weeks")
    assert png_size(out) == (1280, 720)


def test_parse_when() -> None:
    now = 1_714_564_800.0  # 2024-05-01T12:00:00Z
    assert parse_when("now", now) == now
    assert parse_when("-1h", now) == now - 3600
    assert parse_when("-1h30m", now) == now - 5400
    assert parse_when("-90s", now) == now - 90
    assert parse_when("-2d", now) == now - 2 * 86400
    assert parse_when("15m", now) == now - 900  # the sign is optional: always "ago"
    assert parse_when("2024-05-01T12:00:00Z", now) == now
    assert parse_when("2024-05-01T14:00:00+02:00", now) == now
    assert parse_when("2024-05-01 12:00", now) == now  # no offset: UTC
    assert parse_when("2024-05-01", now) == now - 12 * 3600
    assert parse_when("1714564800", now) == now
    for bad in ("-1x", "yesterday", "-", "-1h-2m"):
        with pytest.raises(ReportError):
            parse_when(bad, now)


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rampd")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["report", *argv])


def test_cli_reports_a_journal_window_and_a_run(
    site_journal: JournalRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.png"
    args = _cli(
        ["--journal", str(site_journal.db), "--from", rfc3339(site_journal.t0),
         "--to", rfc3339(site_journal.t1), "-o", str(out)]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "REJECTED" in printed and f"plot: {out}" in printed and out.exists()

    args = _cli([str(site_journal.db), "--from", "-30d", "--no-plot"])
    assert args.func(args) == 0
    assert "plot:" not in capsys.readouterr().out

    run_dir = tmp_path / "run"
    _write_bench_run(run_dir)
    args = _cli([str(run_dir)])
    assert args.func(args) == 0
    assert "full range down" in capsys.readouterr().out
    assert (run_dir / "report.png").exists()

    args = _cli(["--journal", str(site_journal.db), "--from", "soon"])
    assert args.func(args) == 2
    assert "cannot read time 'soon'" in capsys.readouterr().err
    args = _cli(["--journal", str(tmp_path / "absent.sqlite")])
    assert args.func(args) == 2
    assert "no journal at" in capsys.readouterr().err


def test_lines_break_at_gaps_and_close_markers_share_a_label() -> None:
    from controller.tools.report import Marker, _break_gaps, _merge_markers

    t = np.array([0.0, 1.0, 2.0, 3.0, 100.0, 101.0])
    tt, (v,) = _break_gaps(t, [np.arange(6.0)])
    assert tt.size == 7 and np.isnan(v[4]) and 3.0 < tt[4] < 100.0
    merged = _merge_markers(
        [
            Marker(10.0, "resume", "event"),
            Marker(10.01, "start", "event"),
            Marker(10.02, "start", "event"),
            Marker(10.0, "d1 500 kW", "dispatch"),
            Marker(50.0, "stop", "event"),
        ],
        eps_s=1.0,
    )
    assert [(m.kind, m.label) for m in merged] == [
        ("dispatch", "d1 500 kW"),
        ("event", "resume, start"),
        ("event", "stop"),
    ]
