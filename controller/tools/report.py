"""`rampd report`: what the site did, as text and a PNG, from the journal or from a bench run.

* Journal: `rampd report [--journal FILE] --from -1h --to now` prints every dispatch, ack, ramp
  and event of the window, one line each, and plots target, measured power and capability.
* Curtailment events: `rampd report --events [--from --to] [--journal FILE]` prints each
  curtailment event's measurement and verification (baseline, energy curtailed, reductions,
  target met, value) and writes a PNG per event into `--out DIR` (default ./rampd-events/).
* Bench run: `rampd report RUN_DIR` plots a run directory: the simulator's ground truth
  (`truth.jsonl`, `{"t": unix s, "site_kw": kW}` per line) against the dispatches listed in
  `run.json` (format below, written with `write_run`), with each step's figures.

run.json (format "rampd-run/1"):

    {"format": "rampd-run/1", "name": "full range down", "site_max_kw": 2400.0,
     "truth": "truth.jsonl",               # relative to the run directory (default)
     "telemetry": "telemetry.jsonl",       # optional: the daemon's telemetry messages as
                                           #   published (one JSON object a line)
     "t_start": null, "t_end": null,       # optional plot window, unix s
     "dispatches": [{"t": 1717243200.25,   # unix s, when the dispatch was published
                     "target_kw": 600.0,   # the requested power (regulation: base + s * band)
                     "mode": "setpoint", "ramp_s": 0.0, "id": "bench-1",
                     "label": "full range down",   # optional, names the step
                     "t_end": null,                # optional end of the step's window
                     "physical_min_s": 2.9}]}      # optional: the fleet's physical minimum

Matplotlib is imported only when a plot is drawn (Agg, no display; no pyplot state).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from controller.journal import (
    AckRow,
    CurtailmentEvent,
    DispatchRow,
    Event,
    JournalError,
    JournalReader,
    RampRecord,
    TelemetrySample,
    TelemetrySeries,
    default_journal_path,
)
from controller.ramp_score import score_series, tolerance_w
from controller.tools.truth import read_truth
from controller.wire.telemetry import Telemetry
from controller.wire.timestamps import rfc3339
from drivers.core.state import F64

RUN_FORMAT: Final = "rampd-run/1"
MAX_PLOT_POINTS: Final = 4000
_LABEL_BOX: Final = {"facecolor": "white", "alpha": 0.75, "lw": 0, "pad": 0.5}
_MAX_LABELLED: Final = 24  # dispatch and step labels drawn on the plot


class ReportError(Exception):
    """Input the report cannot use (bad time, bad run directory); the message says why."""


# --- what a plot shows ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Band:
    """A power range over time (kW): shaded, or drawn as two dotted edges."""

    t: F64
    lo_kw: F64
    hi_kw: F64
    label: str
    style: Literal["5s", "60s", "range"]


@dataclass(frozen=True, slots=True)
class Marker:
    t: float
    label: str
    kind: Literal["dispatch", "rejected", "event"]


@dataclass(frozen=True, slots=True)
class StepFigure:
    """One ramp's figures, from the journal (online) or from a truth series (offline)."""

    name: str
    t0: float
    from_kw: float | None
    target_kw: float
    tol_kw: float
    settle_s: float | None
    overshoot_kw: float
    iae_kwh: float
    physical_min_s: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.settle_s is None or not self.physical_min_s:
            return None
        return self.settle_s / self.physical_min_s


@dataclass(slots=True)
class PlotSeries:
    """Everything `render_plot` draws; times in unix seconds, power in kW."""

    t: F64
    measured_kw: F64
    target_kw: F64
    bands: list[Band] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    steps: list[StepFigure] = field(default_factory=list)
    failsafe: list[tuple[float, float]] = field(default_factory=list)
    t_ref: float | None = None
    """Plot seconds after this instant instead of clock time (short runs)."""
    measured_label: str = "measured"


# --- text helpers --------------------------------------------------------------------------

_REL = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_when(text: str, now: float) -> float:
    """'now', a time ago ('-1h', '-1h30m', '-90s', '-2d'; the '-' is optional), RFC3339 or a
    date, or unix seconds. Times without an offset are UTC.
    """
    s = text.strip()
    if s.lower() == "now":
        return now
    rel = s[1:] if s.startswith("-") else s
    parts = _REL.findall(rel)
    if parts and "".join(n + u for n, u in parts) == rel:
        return now - sum(float(n) * _UNIT_S[u] for n, u in parts)
    if s.startswith("-"):
        raise ReportError(f"cannot read relative time {text!r} (e.g. -1h, -1h30m, -90s, -2d)")
    try:
        return float(s)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s.replace("z", "Z"))
    except ValueError:
        raise ReportError(
            f"cannot read time {text!r} (RFC3339 like 2024-05-01T12:00:00Z, or -1h, or now)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _kw(w: float | None, fmt: str = ".1f") -> str:
    return "?" if w is None or math.isnan(w) else f"{w / 1e3:{fmt}}"


def _name(id: str | None, seq: int | None) -> str:
    return f"{id if id is not None else '?'} seq {seq if seq is not None else '?'}"


def _dispatch_line(d: DispatchRow) -> str:
    head = f"{rfc3339(d.received_at)}  dispatch  "
    if d.decision == "rejected":
        return f"{head}REJECTED  {_name(d.id, d.seq)}: {d.reason} [{d.code}]"
    if d.mode == "release":
        what = "release to site maximum"
    elif d.mode == "regulation":
        signal = d.signal or 0.0
        band = d.band_w or 0.0
        what = (
            f"regulation base {_kw(d.target_w)} kW band +-{_kw(band)} kW signal {signal:+.3f} "
            f"(-> {_kw((d.target_w or 0.0) + signal * band)} kW)"
        )
    else:
        what = f"setpoint {_kw(d.target_w)} kW"
    if d.ramp_s:
        what += f", ramp {d.ramp_s:g} s"
    if d.start_at is not None and d.start_at > d.received_at:
        what += f", starts {rfc3339(d.start_at)}"
    if d.expires_at is not None:
        what += f", expires {rfc3339(d.expires_at)}"
    return f"{head}accepted  {_name(d.id, d.seq)}: {what}"


def _ack_line(a: AckRow) -> str:
    verdict = "accepted" if a.accepted else "rejected"
    tail = f": {a.reason}" if a.reason else ""
    return f"{rfc3339(a.at)}  ack       {verdict:<9} {_name(a.id, a.seq)}{tail}"


def _ramp_line(r: RampRecord) -> str:
    move = f"{_kw(r.from_w)} -> {_kw(r.target_w)} kW"
    if r.settle_s is not None:
        how = f"in {r.settle_s:.2f} s"
        if r.physical_min_s:
            how += f" (physical min {r.physical_min_s:.2f} s, x{r.settle_s / r.physical_min_s:.2f})"
    else:
        how = f"not settled after {r.ended_at - r.started_at:.1f} s"
    return (
        f"{rfc3339(r.started_at)}  ramp      {r.outcome:<9} {r.dispatch_id or '?'}: {move} {how}; "
        f"overshoot {r.overshoot_w / 1e3:.1f} kW; IAE {r.iae_j / 3.6e6:.3f} kWh"
    )


def _event_line(e: Event) -> str:
    return f"{rfc3339(e.at)}  event     {e.kind:<9} {e.text}"


def figures_title(figs: Sequence[StepFigure]) -> str:
    """The figures line of a plot's title: one ramp in full, many as a summary."""
    if not figs:
        return "no ramps in this window"
    if len(figs) == 1:
        f = figs[0]
        start = "" if f.from_kw is None else f"{f.from_kw:.0f} -> "
        if f.settle_s is None:
            head = f"{f.name}: {start}{f.target_kw:.0f} kW NOT settled"
        else:
            head = f"{f.name}: {start}{f.target_kw:.0f} kW settled in {f.settle_s:.2f} s"
            if f.physical_min_s:
                head += f" (physical min {f.physical_min_s:.2f} s, x{f.ratio:.2f})"
        return f"{head} | overshoot {f.overshoot_kw:.1f} kW | IAE {f.iae_kwh:.3f} kWh"
    settled = [f for f in figs if f.settle_s is not None]
    parts = [f"{len(figs)} ramps"]
    if settled:
        worst = max(settled, key=lambda f: f.settle_s or 0.0)
        median = statistics.median(f.settle_s or 0.0 for f in settled)
        parts.append(f"settle median {median:.2f} s, worst {worst.settle_s:.2f} s ({worst.name})")
    if len(settled) < len(figs):
        parts.append(f"{len(figs) - len(settled)} NOT settled")
    ratios = [r for f in figs if (r := f.ratio) is not None]
    if ratios:
        parts.append(f"worst x{max(ratios):.2f} physical min")
    parts.append(f"max overshoot {max(f.overshoot_kw for f in figs):.1f} kW")
    parts.append(f"IAE {sum(f.iae_kwh for f in figs):.3f} kWh")
    return " | ".join(parts)


def figures_table(figs: Sequence[StepFigure]) -> str:
    head = (
        f"{'step':<26} {'from kW':>9} {'target kW':>10} {'settle s':>9} {'phys min s':>10} "
        f"{'ratio':>6} {'overshoot kW':>13} {'IAE kWh':>8}"
    )
    rows = [head]
    for f in figs:
        settle = "never" if f.settle_s is None else f"{f.settle_s:.2f}"
        phys = "-" if f.physical_min_s is None else f"{f.physical_min_s:.2f}"
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}"
        start = "?" if f.from_kw is None else f"{f.from_kw:.1f}"
        rows.append(
            f"{f.name[:26]:<26} {start:>9} {f.target_kw:>10.1f} {settle:>9} {phys:>10} "
            f"{ratio:>6} {f.overshoot_kw:>13.1f} {f.iae_kwh:>8.3f}"
        )
    return "\n".join(rows)


# --- the plot ------------------------------------------------------------------------------


def _break_gaps(t: F64, cols: Sequence[F64], gap_s: float | None = None) -> tuple[F64, list[F64]]:
    """Insert a NaN row inside every gap (daemon down, journal paused) so lines do not bridge it.

    A gap is a step longer than `gap_s` (default: 5 s or 5 median steps, whichever is longer).
    """
    if t.size < 3:
        return t, list(cols)
    dt = np.diff(t)
    limit = gap_s if gap_s is not None else max(5.0, 5.0 * float(np.median(dt)))
    idx = np.flatnonzero(dt > limit) + 1
    if idx.size == 0:
        return t, list(cols)
    mid = (t[idx - 1] + t[idx]) / 2
    return np.insert(t, idx, mid), [np.insert(c, idx, np.nan) for c in cols]


def _merge_markers(markers: Sequence[Marker], eps_s: float) -> list[Marker]:
    """Markers of one kind closer than `eps_s` share one line and one label ('a, b')."""
    out: list[Marker] = []
    for m in sorted(markers, key=lambda m: (m.kind, m.t)):
        last = out[-1] if out else None
        if last is not None and last.kind == m.kind and m.t - last.t < eps_s:
            if m.label not in last.label.split(", "):
                out[-1] = Marker(last.t, f"{last.label}, {m.label}", last.kind)
            continue
        out.append(m)
    return out


def _decimate(
    t: F64, cols: Sequence[F64], how: Sequence[str], max_points: int
) -> tuple[F64, list[F64]]:
    """At most `max_points` buckets: per bucket 'mean', 'min', 'max' or 'last' of each column."""
    n = t.size
    if n <= max_points:
        return t, list(cols)
    edges = np.linspace(0, n, max_points + 1).astype(np.intp)
    starts = edges[:-1]
    out: list[F64] = []
    for col, h in zip(cols, how, strict=True):
        if h == "last":
            out.append(col[edges[1:] - 1])
            continue
        finite = np.where(np.isnan(col), 0.0, col)
        if h == "mean":
            sums = np.add.reduceat(finite, starts)
            counts = np.add.reduceat((~np.isnan(col)).astype(np.float64), starts)
            with np.errstate(invalid="ignore", divide="ignore"):
                out.append(sums / counts)
        else:
            fill = np.inf if h == "min" else -np.inf
            ufunc = np.minimum if h == "min" else np.maximum
            red = ufunc.reduceat(np.where(np.isnan(col), fill, col), starts)
            out.append(np.where(np.isinf(red), np.nan, red))
    return t[starts], out


def render_plot(series: PlotSeries, out_png: Path, title: str) -> Path:
    """Draw target, measured power, capability bands and the tracking error; write a PNG."""
    from matplotlib import dates as mdates
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    out_png = Path(out_png)
    t_full, (measured_full, target_full) = _break_gaps(
        series.t, [series.measured_kw, series.target_kw]
    )
    err_full = measured_full - target_full
    t, (measured, measured_lo, measured_hi, target, err, err_lo, err_hi) = _decimate(
        t_full,
        [measured_full] * 3 + [target_full] + [err_full] * 3,
        ["mean", "min", "max", "last", "mean", "min", "max"],
        MAX_PLOT_POINTS,
    )
    decimated = t.size < t_full.size
    t_ref = series.t_ref

    def xs(u: F64) -> Any:
        if t_ref is not None:
            return u - t_ref
        return (u * 1e3).astype("datetime64[ms]")

    def x1(u: float) -> Any:
        return xs(np.asarray([u], dtype=np.float64))[0]

    fig = Figure(figsize=(12.8, 7.2), dpi=100, layout="constrained")
    ax, ax_err = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top = blended_transform_factory(ax.transData, ax.transAxes)

    for b in series.bands:
        bt, (lo, hi) = _break_gaps(b.t, [b.lo_kw, b.hi_kw])
        bt, (lo, hi) = _decimate(bt, [lo, hi], ["min", "max"], MAX_PLOT_POINTS)
        if b.style == "range":
            ax.plot(xs(bt), lo, color="0.45", lw=0.9, ls=(0, (2, 2)), label=b.label)
            ax.plot(xs(bt), hi, color="0.45", lw=0.9, ls=(0, (2, 2)))
        else:
            alpha = 0.22 if b.style == "5s" else 0.09
            ax.fill_between(
                xs(bt), lo, hi, color="tab:green", alpha=alpha, lw=0, step="post", label=b.label
            )
    for t0, t1 in series.failsafe:
        ax.axvspan(x1(t0), x1(t1), color="tab:red", alpha=0.08, lw=0)
    if series.failsafe:
        ax.fill_between([], [], [], color="tab:red", alpha=0.08, label="failsafe")
    if decimated:
        ax.fill_between(
            xs(t), measured_lo, measured_hi, color="tab:blue", alpha=0.25, lw=0, step="post"
        )
    ax.plot(xs(t), measured, color="tab:blue", lw=1.5, label=series.measured_label)
    ax.plot(xs(t), target, color="black", lw=1.3, ls="--", drawstyle="steps-post", label="target")

    span = float(series.t[-1] - series.t[0]) if series.t.size > 1 else 1.0
    markers = _merge_markers(series.markers, eps_s=0.012 * span)
    dispatches = [m for m in markers if m.kind == "dispatch"]
    label_dispatches = len(dispatches) <= _MAX_LABELLED
    for m in markers:
        if m.kind == "rejected":
            ax.plot(x1(m.t), 0.985, marker="v", color="tab:red", ms=7, transform=top, clip_on=False)
            continue
        if m.kind == "dispatch" and len(dispatches) > 300:
            continue
        color = "0.35" if m.kind == "dispatch" else "tab:purple"
        ax.axvline(x1(m.t), color=color, lw=0.8, ls=":", alpha=0.8)
        if m.kind == "event" or label_dispatches:
            ax.text(
                x1(m.t), 0.99, f" {m.label}", transform=top, rotation=90, va="top", ha="left",
                fontsize=7.5, color=color, bbox=_LABEL_BOX,
            )  # fmt: skip
    if any(m.kind == "rejected" for m in series.markers):
        ax.plot([], [], marker="v", ls="", color="tab:red", label="rejected dispatch")

    if len(series.steps) <= _MAX_LABELLED:
        for f in series.steps:
            if f.settle_s is None:
                ax.annotate(
                    "not settled", (x1(f.t0), f.target_kw), xytext=(4, 6),
                    textcoords="offset points", fontsize=8, color="tab:red",
                )  # fmt: skip
                continue
            ts = f.t0 + f.settle_s
            ax.plot(x1(ts), f.target_kw, marker="o", ms=5, color="tab:orange", zorder=5)
            ax.annotate(
                f"{f.settle_s:.1f} s", (x1(ts), f.target_kw), xytext=(5, 6),
                textcoords="offset points", fontsize=8.5, color="tab:orange", weight="bold",
            )  # fmt: skip
        if series.steps:
            ax.plot([], [], marker="o", ls="", color="tab:orange", label="settled (time to settle)")

    ax.set_ylabel("site power (kW)")
    ax.grid(True, color="0.9", lw=0.8)
    # Outside the axes: it never hides the data or the dispatch labels.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    headline, _, figures = title.partition("\n")
    fig.suptitle(headline, x=0.01, ha="left", fontsize=12.5, weight="bold")
    if figures:
        ax.set_title(figures, fontsize=10, loc="left")

    # Tracking error, zoomed to the tolerance: the transient is in the top panel.
    ax_err.axhline(0.0, color="black", lw=0.8)
    tols = [f.tol_kw for f in series.steps]
    if tols:
        tol = float(np.median(tols))
        ax_err.axhspan(
            -tol, tol, color="tab:green", alpha=0.15, lw=0, label=f"±{tol:.0f} kW\n(settle band)"
        )
        ax_err.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    else:
        tol = 0.0
    finite = np.abs(err_full[np.isfinite(err_full)])
    if finite.size:
        # Zoomed on tracking, not on the transients (the top panel shows those).
        lim = max(4.0 * tol, 6.0 * float(np.median(finite)), 1.0)
        ax_err.set_ylim(-lim, lim)
        if float(finite.max()) > lim:
            ax_err.text(
                0.005, 0.04, "transients clipped", transform=ax_err.transAxes, fontsize=7.5,
                color="0.4",
            )  # fmt: skip
    if decimated:
        ax_err.fill_between(xs(t), err_lo, err_hi, color="tab:blue", alpha=0.25, lw=0, step="post")
    ax_err.plot(xs(t), err, color="tab:blue", lw=1.0)
    ax_err.set_ylabel("measured - target\n(kW)")
    ax_err.grid(True, color="0.9", lw=0.8)

    if t_ref is not None:
        ax_err.set_xlabel(f"seconds after {rfc3339(t_ref)}")
    else:
        locator = mdates.AutoDateLocator(minticks=6, maxticks=14)  # type: ignore[no-untyped-call]
        ax_err.xaxis.set_major_locator(locator)
        formatter = mdates.ConciseDateFormatter(locator)  # type: ignore[no-untyped-call]
        ax_err.xaxis.set_major_formatter(formatter)
        ax_err.set_xlabel("time (UTC)")

    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


# --- from the journal ----------------------------------------------------------------------


def _runs(mask: Sequence[bool], t: F64) -> list[tuple[float, float]]:
    spans: list[tuple[float, float]] = []
    start: float | None = None
    for i, on in enumerate(mask):
        if on and start is None:
            start = float(t[i])
        elif not on and start is not None:
            spans.append((start, float(t[i])))
            start = None
    if start is not None:
        spans.append((start, float(t[-1])))
    return spans


def _journal_series(
    tel: TelemetrySeries,
    dispatches: Sequence[DispatchRow],
    events: Sequence[Event],
    figs: Sequence[StepFigure],
) -> PlotSeries:
    measured = tel.measured_w / 1e3
    bands = []
    if np.isfinite(tel.min_w).any():
        bands.append(Band(tel.at, tel.min_w / 1e3, tel.max_w / 1e3, "fleet range", "range"))
    for k, h in ((2, "60s"), (1, "5s")):
        up, down = tel.up_w[k] / 1e3, tel.down_w[k] / 1e3
        if np.isfinite(up).any():
            label = f"reachable within {h[:-1]} s"
            bands.append(Band(tel.at, measured - down, measured + up, label, h))  # type: ignore[arg-type]
    markers: list[Marker] = []
    for d in dispatches:
        if d.decision == "rejected":
            markers.append(Marker(d.received_at, d.code, "rejected"))
        elif d.mode != "regulation":
            markers.append(Marker(d.received_at, f"{d.id} {_kw(d.target_w, '.0f')} kW", "dispatch"))
    markers += [Marker(e.at, e.kind, "event") for e in events]
    return PlotSeries(
        t=tel.at,
        measured_kw=measured,
        target_kw=tel.target_w / 1e3,
        bands=bands,
        markers=markers,
        steps=list(figs),
        failsafe=_runs([m == "failsafe" for m in tel.mode], tel.at),
    )


def _figure_of(r: RampRecord, name: str | None = None) -> StepFigure:
    """A scored ramp (W, J) as the report shows it (kW, kWh)."""
    return StepFigure(
        name=name or r.dispatch_id or "ramp",
        t0=r.started_at,
        from_kw=None if r.from_w is None else r.from_w / 1e3,
        target_kw=r.target_w / 1e3,
        tol_kw=r.tol_w / 1e3,
        settle_s=r.settle_s,
        overshoot_kw=r.overshoot_w / 1e3,
        iae_kwh=r.iae_j / 3.6e6,
        physical_min_s=r.physical_min_s,
    )


def report_from_journal(
    db: Path | JournalReader, t0: float, t1: float, out_png: Path | None
) -> str:
    """The window's dispatches, acks, ramps and events, one line each, oldest first; and a
    PNG at `out_png` (unless None or the window has no telemetry). Returns the text."""
    reader = db if isinstance(db, JournalReader) else JournalReader(db)
    try:
        dispatches = reader.dispatches_between(t0, t1)
        acks = reader.acks_between(t0, t1)
        ramps = reader.ramps_between(t0, t1)
        events = reader.events_between(t0, t1)
        tel = reader.telemetry_between(t0, t1)
    finally:
        if reader is not db:
            reader.close()
    # (time, order) keeps a dispatch before its ack and ramp at equal times.
    entries: list[tuple[float, int, str]] = []
    entries += [(d.received_at, 0, _dispatch_line(d)) for d in dispatches]
    entries += [(a.at, 1, _ack_line(a)) for a in acks]
    entries += [(r.started_at, 2, _ramp_line(r)) for r in ramps]
    entries += [(e.at, 3, _event_line(e)) for e in events]
    entries.sort(key=lambda e: (e[0], e[1]))
    rejected = sum(d.decision == "rejected" for d in dispatches)
    lines = [
        f"journal {reader.path}: {rfc3339(t0)} .. {rfc3339(t1)}",
        f"{len(dispatches)} dispatches ({rejected} rejected), {len(acks)} acks, "
        f"{len(ramps)} ramps, {len(events)} events, {len(tel)} telemetry samples",
        "",
        *(text for _, _, text in entries),
    ]
    figs = [_figure_of(r) for r in ramps]
    if figs:
        lines += ["", figures_table(figs)]
    if out_png is not None:
        lines.append("")
        if len(tel):
            title = f"rampd {rfc3339(t0)} .. {rfc3339(t1)}\n{figures_title(figs)}"
            series = _journal_series(tel, dispatches, events, figs)
            lines.append(f"plot: {render_plot(series, out_png, title)}")
        else:
            lines.append("no telemetry in this window: no plot")
    return "\n".join(lines)


# --- curtailment events (measurement and verification) ----------------------------------


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def _usd(x: float) -> str:
    return "?" if math.isnan(x) else f"{'-' if x < 0 else ''}${abs(x):,.2f}"


def _met(ev: CurtailmentEvent) -> str:
    if ev.met is None:
        return "-"
    share = "" if ev.met_fraction is None else f" ({ev.met_fraction:.1%})"
    return f"{'yes' if ev.met else 'NO'}{share}"


def curtailment_line(ev: CurtailmentEvent) -> str:
    """One event's M&V figures on one line."""
    target = "-" if ev.target_w is None else f"{_kw(ev.target_w)} kW"
    priced = ev.priced_fraction
    unpriced = "" if priced is None or priced >= 0.9995 else f" (priced {priced:.0%})"
    line = (
        f"{rfc3339(ev.started_at)}  {ev.rail:<10} {_duration(ev.duration_s):>9}  "
        f"baseline {_kw(ev.baseline_w)} kW ({ev.baseline_method})  target {target}  "
        f"curtailed {ev.energy_curtailed_kwh:.1f} kWh  "
        f"reduction avg {ev.avg_reduction_kw:.1f} / min {ev.min_reduction_kw:.1f} kW  "
        f"met {_met(ev)}  cost avoided {_usd(ev.cost_avoided_usd)}{unpriced}  "
        f"revenue forgone {_usd(ev.revenue_forgone_usd)}"
    )
    return f"{line}  {ev.detail}" if ev.detail else line


def render_event_plot(ev: CurtailmentEvent, out_png: Path) -> Path:
    """Site power, the rail's target and the baseline over one event; the curtailed energy
    shaded. Writes a PNG."""
    from matplotlib import dates as mdates
    from matplotlib.figure import Figure

    pts = np.array(ev.samples, dtype=np.float64).reshape(-1, 3)
    t = np.append(pts[:, 0], ev.ended_at)
    site = np.append(pts[:, 1], np.nan)
    target = np.append(pts[:, 2], pts[-1, 2] if len(pts) else np.nan)
    x = (t * 1e3).astype("datetime64[ms]")
    base_kw = ev.baseline_w / 1e3

    fig = Figure(figsize=(12.8, 6.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    if np.isfinite(base_kw):
        ax.axhline(
            base_kw, color="tab:orange", lw=1.3, ls="--", label=f"baseline ({ev.baseline_method})"
        )
        below = np.isfinite(site) & (site < base_kw)
        ax.fill_between(
            x, site, base_kw, where=below, step="post", color="tab:green", alpha=0.2, lw=0,
            label="curtailed",
        )  # fmt: skip
    ax.plot(x, site, color="tab:blue", lw=1.5, drawstyle="steps-post", label="site", zorder=3)
    if np.isfinite(target).any():
        ax.plot(x, target, color="black", lw=1.2, ls="--", drawstyle="steps-post", label="target")
    if len(pts) == 1:
        ax.plot(x[:1], site[:1], marker="o", color="tab:blue")
    if not (site < 0).any() and not (target < 0).any():
        ax.set_ylim(bottom=0.0)  # the reduction at its true size against the whole load
    ax.set_ylabel("site power (kW)")
    ax.grid(True, color="0.9", lw=0.8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    locator = mdates.AutoDateLocator(minticks=5, maxticks=12)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    ax.set_xlabel("time (UTC)")
    target_txt = "" if ev.target_w is None else f", target {_kw(ev.target_w)} kW"
    fig.suptitle(
        f"{ev.rail} curtailment {rfc3339(ev.started_at)} ({_duration(ev.duration_s)})"
        f"{target_txt}",
        x=0.01, ha="left", fontsize=12.5, weight="bold",
    )  # fmt: skip
    figures = (
        f"{ev.energy_curtailed_kwh:.1f} kWh curtailed | reduction avg "
        f"{ev.avg_reduction_kw:.1f} kW, min {ev.min_reduction_kw:.1f} kW | met {_met(ev)} | "
        f"cost avoided {_usd(ev.cost_avoided_usd)}, revenue forgone "
        f"{_usd(ev.revenue_forgone_usd)}"
    )
    if ev.detail:
        figures += f"\n{ev.detail}"
    # A bare "$" starts matplotlib's mathtext.
    ax.set_title(figures.replace("$", r"\$"), fontsize=10, loc="left")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


def report_events(db: Path | JournalReader, t0: float, t1: float, out_dir: Path | None) -> str:
    """The curtailment events overlapping the window, one line each, with totals; a PNG per
    event into `out_dir` (unless None). Returns the text."""
    reader = db if isinstance(db, JournalReader) else JournalReader(db)
    try:
        events = reader.curtailments(t0, t1)
    finally:
        if reader is not db:
            reader.close()
    lines = [f"journal {reader.path}: curtailment events {rfc3339(t0)} .. {rfc3339(t1)}"]
    if not events:
        lines.append("no curtailment events in this window")
        return "\n".join(lines)
    kwh = math.fsum(e.energy_curtailed_kwh for e in events if math.isfinite(e.energy_curtailed_kwh))
    cost = math.fsum(e.cost_avoided_usd for e in events if math.isfinite(e.cost_avoided_usd))
    rev = math.fsum(e.revenue_forgone_usd for e in events if math.isfinite(e.revenue_forgone_usd))
    judged = [e for e in events if e.met is not None]
    missed = sum(not e.met for e in judged)
    lines += [
        f"{len(events)} events: {kwh:.1f} kWh curtailed, cost avoided {_usd(cost)}, revenue "
        f"forgone {_usd(rev)}, net {_usd(cost - rev)}; "
        f"{len(judged) - missed} of {len(judged)} commitments and peaks met",
        "",
        *(curtailment_line(e) for e in events),
    ]
    if out_dir is not None:
        lines.append("")
        taken: set[str] = set()
        for e in events:
            stamp = datetime.fromtimestamp(e.started_at, UTC).strftime("%Y%m%dT%H%M%SZ")
            name = f"event-{stamp}-{e.rail}"
            k = 2
            while name in taken:
                name = f"event-{stamp}-{e.rail}-{k}"
                k += 1
            taken.add(name)
            if not e.samples:
                lines.append(f"{name}: no samples, no plot")
                continue
            lines.append(f"plot: {render_event_plot(e, Path(out_dir) / f'{name}.png')}")
    return "\n".join(lines)


# --- from a bench run ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunDispatch:
    t: float
    """Unix s when the dispatch was published (the bench's clock starts here)."""
    target_kw: float
    """The requested power; for regulation base + signal * band."""
    mode: str = "setpoint"
    ramp_s: float = 0.0
    id: str | None = None
    label: str | None = None
    t_end: float | None = None
    """End of this step's window (default: the next dispatch, or the end of the truth)."""
    physical_min_s: float | None = None


@dataclass(frozen=True, slots=True)
class RunSpec:
    name: str
    site_max_kw: float
    dispatches: tuple[RunDispatch, ...]
    truth: str = "truth.jsonl"
    telemetry: str | None = None
    t_start: float | None = None
    t_end: float | None = None

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["dispatches"] = [asdict(d) for d in self.dispatches]
        return {"format": RUN_FORMAT, **body}

    @classmethod
    def from_json(cls, obj: Any, where: str = "run.json") -> RunSpec:
        if not isinstance(obj, dict) or obj.get("format") != RUN_FORMAT:
            raise ReportError(f"{where}: not a {RUN_FORMAT} file (see controller/tools/report.py)")
        try:
            dispatches = tuple(
                RunDispatch(
                    t=float(d["t"]),
                    target_kw=float(d["target_kw"]),
                    mode=str(d.get("mode", "setpoint")),
                    ramp_s=float(d.get("ramp_s") or 0.0),
                    id=None if d.get("id") is None else str(d["id"]),
                    label=None if d.get("label") is None else str(d["label"]),
                    t_end=None if d.get("t_end") is None else float(d["t_end"]),
                    physical_min_s=(
                        None if d.get("physical_min_s") is None else float(d["physical_min_s"])
                    ),
                )
                for d in obj.get("dispatches", [])
            )
            return cls(
                name=str(obj.get("name", "run")),
                site_max_kw=float(obj["site_max_kw"]),
                dispatches=tuple(sorted(dispatches, key=lambda d: d.t)),
                truth=str(obj.get("truth") or "truth.jsonl"),
                telemetry=None if obj.get("telemetry") is None else str(obj["telemetry"]),
                t_start=None if obj.get("t_start") is None else float(obj["t_start"]),
                t_end=None if obj.get("t_end") is None else float(obj["t_end"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{where}: bad or missing field {exc}") from None


def write_run(run_dir: Path, spec: RunSpec) -> Path:
    """Write `run.json` into `run_dir` (the bench calls this; truth.jsonl is the sim's)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.json"
    path.write_text(json.dumps(spec.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def load_run(run_dir: Path) -> RunSpec:
    path = Path(run_dir) / "run.json"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{run_dir}: no run.json (not a bench run directory)") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: {exc}") from None
    return RunSpec.from_json(obj, str(path))


def _target_on(t: F64, kw: F64, dispatches: Sequence[RunDispatch]) -> F64:
    """The requested trajectory at times t: linear over each ramp_s from the previous target
    (or the power at the dispatch, for the first), NaN before the first dispatch."""
    target = np.full(t.shape, np.nan)
    prev: float | None = None
    for i, d in enumerate(dispatches):
        t_next = dispatches[i + 1].t if i + 1 < len(dispatches) else np.inf
        sel = (t >= d.t) & (t < t_next)
        if prev is None:
            before = kw[t <= d.t]
            prev = float(before[-1]) if before.size else d.target_kw
        if d.ramp_s > 0:
            target[sel] = np.interp(t[sel], [d.t, d.t + d.ramp_s], [prev, d.target_kw])
        else:
            target[sel] = d.target_kw
        prev = (
            float(np.interp(t_next, [d.t, d.t + d.ramp_s], [prev, d.target_kw]))
            if d.ramp_s > 0 and math.isfinite(t_next)
            else d.target_kw
        )
    return target


def _read_telemetry(path: Path) -> list[TelemetrySample]:
    out: list[TelemetrySample] = []
    with path.open("rb") as fh:
        for line in fh:
            try:
                tel = Telemetry.decode(line)
            except ValueError:
                continue  # a torn last line, or not a telemetry message
            out.append(TelemetrySample.from_telemetry(tel))
    return out


def _run_bands(samples: Sequence[TelemetrySample], t0: float, t1: float) -> list[Band]:
    samples = [s for s in samples if t0 <= s.at <= t1]
    if not samples:
        return []

    def col(get: Any) -> F64:
        return np.array([get(s) for s in samples], dtype=np.float64) / 1e3

    t = np.array([s.at for s in samples])
    measured = col(lambda s: s.measured_w)
    bands = [Band(t, col(lambda s: s.min_w), col(lambda s: s.max_w), "fleet range", "range")]
    for k, h in ((2, "60s"), (1, "5s")):
        up = col(lambda s, k=k: s.up_w[k])
        down = col(lambda s, k=k: s.down_w[k])
        if np.isfinite(up).any():
            label = f"reachable within {h[:-1]} s"
            bands.append(Band(t, measured - down, measured + up, label, h))  # type: ignore[arg-type]
    return bands


def report_from_run(run_dir: Path, out_png: Path | None = None) -> str:
    """Plot a bench run (default `RUN_DIR/report.png`) and return its figures as text."""
    run_dir = Path(run_dir)
    spec = load_run(run_dir)
    truth = run_dir / spec.truth
    if not truth.is_file():
        raise ReportError(f"{run_dir}: no truth log {spec.truth}")
    t, kw = read_truth(truth)
    if t.size == 0:
        raise ReportError(f"{truth}: no samples")
    order = np.argsort(t, kind="stable")
    t, kw = t[order], kw[order]
    t_lo = spec.t_start if spec.t_start is not None else float(t[0])
    t_hi = spec.t_end if spec.t_end is not None else float(t[-1])
    sel = (t >= t_lo) & (t <= t_hi)
    t, kw = t[sel], kw[sel]
    if t.size == 0:
        raise ReportError(f"{run_dir}: no truth samples between t_start and t_end")
    ds = spec.dispatches
    figs: list[StepFigure] = []
    for i, d in enumerate(ds):
        if d.mode != "setpoint":
            continue
        t_end = d.t_end or (ds[i + 1].t if i + 1 < len(ds) else float(t[-1]))
        target_w = d.target_kw * 1e3
        r = score_series(
            t,
            kw * 1e3,
            t0=d.t,
            t_end=t_end,
            target_w=target_w,
            tol_w=tolerance_w(target_w, spec.site_max_kw * 1e3),
            physical_min_s=d.physical_min_s,
        )
        figs.append(_figure_of(r, d.label or d.id or f"step {i + 1}"))
    lines = [
        f"run {spec.name} ({run_dir}): {t.size} truth samples, "
        f"{rfc3339(float(t[0]))} .. {rfc3339(float(t[-1]))}",
        f"{len(ds)} dispatches; settle = ground truth enters and stays within +-2% of the "
        f"target (or +-0.5% of the site maximum {spec.site_max_kw:g} kW)",
        "",
        figures_table(figs) if figs else "no setpoint steps",
    ]
    if out_png is None:
        out_png = run_dir / "report.png"
    bands: list[Band] = []
    if spec.telemetry:
        tel_path = run_dir / spec.telemetry
        if tel_path.is_file():
            bands = _run_bands(_read_telemetry(tel_path), float(t[0]), float(t[-1]))
        else:
            lines.append(f"(no telemetry file {spec.telemetry}: plotting without capability)")
    markers = [
        Marker(d.t, f"{d.label or d.id or ''} {d.target_kw:.0f} kW".strip(), "dispatch")
        for d in ds
        if d.mode != "regulation"
    ]
    series = PlotSeries(
        t=t,
        measured_kw=kw,
        target_kw=_target_on(t, kw, ds),
        bands=bands,
        markers=markers,
        steps=figs,
        t_ref=ds[0].t if ds else float(t[0]),
        measured_label="measured (simulator truth)",
    )
    title = f"{spec.name}\n{figures_title(figs)}"
    lines += ["", f"plot: {render_plot(series, out_png, title)}"]
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------


def run_cli(args: argparse.Namespace) -> int:
    try:
        source = Path(args.source) if args.source else None
        if getattr(args, "events", False):
            if source is not None and source.is_dir():
                raise ReportError("--events reads a journal file, not a bench run directory")
            db = source or (Path(args.journal) if args.journal else default_journal_path())
            now = time.time()
            t0, t1 = parse_when(args.t_from, now), parse_when(args.t_to, now)
            if t1 <= t0:
                raise ReportError(f"--to ({rfc3339(t1)}) is not after --from ({rfc3339(t0)})")
            out_dir = None if args.no_plot else Path(args.out or "rampd-events")
            print(report_events(db, t0, t1, out_dir))
            return 0
        if source is not None and source.is_dir():
            out = None if args.no_plot else Path(args.out or source / "report.png")
            if out is None:
                raise ReportError("--no-plot: a bench run report is its plot")
            print(report_from_run(source, out))
            return 0
        db = source or (Path(args.journal) if args.journal else default_journal_path())
        now = time.time()
        t0, t1 = parse_when(args.t_from, now), parse_when(args.t_to, now)
        if t1 <= t0:
            raise ReportError(f"--to ({rfc3339(t1)}) is not after --from ({rfc3339(t0)})")
        stamp = datetime.fromtimestamp(t0, UTC).strftime("%Y%m%dT%H%M%SZ")
        out_png = None if args.no_plot else Path(args.out or f"rampd-report-{stamp}.png")
        print(report_from_journal(db, t0, t1, out_png))
        return 0
    except (ReportError, JournalError) as exc:
        print(f"rampd report: {exc}", file=sys.stderr)
        return 2
