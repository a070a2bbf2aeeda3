"""The chaos bench's judgement, after the run: scores per block, what telemetry said around each
fault, the dispatch tally, the journal's rows, and the goals. Pure but for the journal's
read-only query (see controller/tools/bench/chaos.py for the definitions)."""

from __future__ import annotations

import itertools
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from controller.ramp_score import tolerance_w
from controller.tools.bench.chaos_faults import OUTAGES, FaultRecord, describe
from controller.tools.bench.chaos_link import ACK_WAIT_S, Attempt
from controller.tools.pjm_score import PjmScore, normalize, pjm_score, resample
from controller.wire import Status, Telemetry
from drivers.core.state import F64

OVERALL_GOAL: Final = 0.90
BLOCK_GOAL: Final = 0.75
JOURNAL_GOAL: Final = 0.90
ANNOUNCE_LEAD_S: Final = 10.0
SILENCE_S: Final = 5.0
AFTER_S: Final = 5.0
HORIZON_S: Final = 5.0
JOURNAL_TABLES: Final = ("telemetry", "dispatches", "acks", "events")


# --- scores --------------------------------------------------------------------------------


def score_replay(
    t0: float,
    sig_wall_s: F64,
    sig: F64,
    truth_t: F64,
    truth_kw: F64,
    *,
    base_kw: float,
    band_kw: float,
    sample_s: float,
    block_s: float,
    max_delay_s: float,
    n_samples: int,
) -> PjmScore:
    """The signal as the grid sent it (each sample due at t0 + its wall offset, whether or not
    the dispatcher could deliver it) against the ground truth."""
    signal = resample(t0 + sig_wall_s, sig, t0, sample_s, n_samples, mode="hold")
    response = normalize(
        resample(truth_t, truth_kw, t0, sample_s, n_samples, mode="mean"), base_kw, band_kw
    )
    return pjm_score(signal, response, sample_s=sample_s, block_s=block_s, max_delay_s=max_delay_s)


# --- what telemetry announced --------------------------------------------------------------


def reach5(tel: Telemetry) -> tuple[float | None, float | None]:
    return tel.capability.within(HORIZON_S) if tel.capability else (None, None)


def needs_w(measured_w: float, base_kw: float, band_kw: float) -> tuple[float, float]:
    """What the offer asks the site to reach within 5 s from `measured_w`, (up, down): the
    band's width in each direction, or less where the band's edge is nearer."""
    lo_w, hi_w, band_w = (base_kw - band_kw) * 1e3, (base_kw + band_kw) * 1e3, band_kw * 1e3
    return (
        min(band_w, max(0.0, hi_w - measured_w)),
        min(band_w, max(0.0, measured_w - lo_w)),
    )


def announcements(
    telemetry: Sequence[Telemetry],
    status: Sequence[tuple[float, Status]],
    base_kw: float,
    band_kw: float,
    site_max_kw: float,
) -> list[tuple[float, str]]:
    """Reduced capability as the dispatcher heard it, (unix time, what) in time order: a 5 s
    capability short of what the offer asks from where the site is (`needs_w`) in either
    direction by more than the settle band (`tolerance_w`: meter noise and the reach's own
    rounding are no announcement), an offline status, or telemetry silent for more than
    SILENCE_S (from the last message + SILENCE_S)."""
    out: list[tuple[float, str]] = []
    tels = sorted(telemetry, key=lambda x: x.at)
    for tel in tels:
        up, down = reach5(tel)
        if tel.measured_w is None or up is None or down is None:
            continue
        need_up, need_down = needs_w(tel.measured_w, base_kw, band_kw)
        tol = tolerance_w(tel.measured_w, site_max_kw * 1e3)
        if up + tol < need_up or down + tol < need_down:
            out.append(
                (
                    tel.at,
                    f"5 s capability {_kw(up)}/{_kw(down)} kW short of "
                    f"{_kw(need_up)}/{_kw(need_down)} at {_kw(tel.measured_w)} kW",
                )
            )
    for a, b in itertools.pairwise(tels):
        if b.at - a.at > SILENCE_S:
            out.append((a.at + SILENCE_S, f"no telemetry for {b.at - a.at:.0f} s"))
    out += [(t, f"status offline ({s.detail})") for t, s in status if not s.online]
    return sorted(out)


@dataclass(frozen=True, slots=True)
class BlockView:
    n: int
    start: float
    end: float
    score: float
    faults: tuple[int, ...]
    announced: str | None
    """The first announcement from ANNOUNCE_LEAD_S before the block to its end."""
    announcements: int
    """How many there were (telemetry says reduced once a second while it is)."""

    @property
    def missed(self) -> bool:
        return self.score < BLOCK_GOAL

    @property
    def promise(self) -> str:
        if not self.missed:
            return "-"
        return "kept" if self.announced is not None else "BROKEN"


def block_views(
    score: PjmScore,
    t0: float,
    block_s: float,
    faults: Sequence[FaultRecord],
    said: Sequence[tuple[float, str]],
) -> list[BlockView]:
    views = []
    for i, b in enumerate(score.blocks):
        lo, hi = t0 + i * block_s, t0 + (i + 1) * block_s
        hit = tuple(f.plan.n for f in faults if not f.skipped and f.start < hi and f.end >= lo)
        inside = [what for t, what in said if lo - ANNOUNCE_LEAD_S <= t <= hi]
        views.append(BlockView(i + 1, lo, hi, b.score, hit, next(iter(inside), None), len(inside)))
    return views


# --- faults as telemetry saw them ----------------------------------------------------------


def _kw(w: float | None) -> str:
    return "-" if w is None else f"{w / 1e3:.0f}"


def cap_text(tel: Telemetry | None) -> str:
    if tel is None:
        return "no telemetry"
    up, down = reach5(tel)
    d = tel.devices
    off = [
        f"{n} {k}"
        for k, n in (("fault", d.fault), ("unknown", d.unknown), ("unresponsive", d.unresponsive))
        if n
    ]
    return f"{_kw(up)}/{_kw(down)} kW, {d.on} on" + (f", {', '.join(off)}" if off else "")


def fault_view(rec: FaultRecord, telemetry: Sequence[Telemetry], t0: float) -> dict[str, Any]:
    """The fault with the 5 s capability (up/down) just before, at its lowest during, and
    AFTER_S after it ended (an outage: after telemetry came back)."""
    started = sorted((x for x in telemetry if x.started), key=lambda x: x.at)
    before = next((x for x in reversed(started) if x.at <= rec.start), None)
    during = [x for x in started if rec.start <= x.at <= rec.end]
    resume = next((x for x in started if x.at > rec.end), None)
    settle = (rec.back_at or rec.end) + AFTER_S
    after = next((x for x in started if x.at >= settle), None)
    ups = [u for u, _ in map(reach5, during) if u is not None]
    downs = [d for _, d in map(reach5, during) if d is not None]
    return {
        "n": rec.plan.n,
        "kind": rec.plan.kind,
        "what": describe(rec.plan),
        "skipped": rec.skipped,
        "start_s": round(rec.start - t0, 1),
        "duration_s": round(rec.end - rec.start, 1),
        "planned": {"at_s": rec.plan.at_s, "duration_s": rec.plan.duration_s},
        "detail": rec.detail,
        "devices": rec.devices,
        "before": cap_text(before),
        "during_min": f"{_kw(min(ups, default=None))}/{_kw(min(downs, default=None))} kW",
        "meter_estimated": any(x.measured_source == "estimate" for x in during),
        "after": cap_text(after),
        "telemetry_resumed_s": None if resume is None else round(resume.at - rec.end, 1),
        "back_s": None if rec.back_at is None else round(rec.back_at - rec.end, 1),
    }


def outage_windows(
    faults: Sequence[FaultRecord], attempts: Sequence[Attempt]
) -> list[tuple[float, float]]:
    """Broker and daemon outages: from the kill until the first dispatch published after it
    was acked (an ack of an earlier one, flushed late, does not say the daemon hears again)."""
    out = []
    for f in faults:
        if f.plan.kind in OUTAGES and not f.skipped:
            back = min(
                (a.ack_at for a in attempts if a.t >= f.start and a.ack_at), default=math.inf
            )
            out.append((f.start, back))
    return out


def down_windows(faults: Sequence[FaultRecord]) -> list[tuple[float, float]]:
    """The daemon's down time: from each kill to its first telemetry after the restart."""
    return [
        (f.start, f.back_at if f.back_at is not None else f.end)
        for f in faults
        if f.plan.kind == "daemon" and not f.skipped
    ]


# --- dispatches ----------------------------------------------------------------------------


def dispatch_tally(
    attempts: Sequence[Attempt], outages: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """Every publish acked, except those made during an outage (from ACK_WAIT_S before it
    began), which must have been followed by an acked re-send: the run ends with its last
    dispatch acked."""
    sent = [a for a in attempts if not a.failed]
    unacked = [a for a in sent if a.ack_at is None]
    lost = [a for a in unacked if not any(lo - ACK_WAIT_S <= a.t <= hi for lo, hi in outages)]
    acked = [a for a in attempts if a.ack_at is not None]
    latency = np.asarray([a.ack_at - a.t for a in acked if a.ack_at is not None])
    reasons: dict[str, int] = {}
    for a in acked:
        if not a.accepted:
            reasons[a.reason] = reasons.get(a.reason, 0) + 1
    return {
        "sent": sum(not a.resend for a in sent),
        "resent": sum(a.resend for a in sent),
        "publish_failed": len(attempts) - len(sent),
        "acked": len(acked),
        "rejected": sum(reasons.values()),
        "reject_reasons": reasons,
        "unacked_in_outages": len(unacked) - len(lost),
        "lost": len(lost),
        "lost_ids": [a.id for a in lost][:20],
        "last_acked": bool(attempts) and attempts[-1].ack_at is not None,
        "ack_latency_p50_s": round(float(np.median(latency)), 2) if latency.size else None,
        "ack_latency_max_s": round(float(latency.max()), 2) if latency.size else None,
    }


# --- the journal ---------------------------------------------------------------------------


def journal_figures(
    path: Path, t_lo: float, t_hi: float, down: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """Rows per table, and the share of the replay's whole seconds outside the daemon's down
    time that have a telemetry row (read-only; the daemon has stopped)."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        return {"error": f"{path}: {exc}", "coverage": 0.0}
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        rows = {
            t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
            for t in JOURNAL_TABLES
            if t in names
        }
        secs = {
            int(at)
            for (at,) in conn.execute(
                "SELECT at FROM telemetry WHERE at >= ? AND at < ?", (t_lo, t_hi)
            )
        }
    except sqlite3.Error as exc:
        return {"error": f"{path}: {exc}", "coverage": 0.0}
    finally:
        conn.close()
    want = [
        s
        for s in range(math.ceil(t_lo), math.floor(t_hi))
        if not any(s < hi and s + 1 > lo for lo, hi in down)
    ]
    covered = sum(s in secs for s in want)
    return {
        "rows": rows,
        "seconds_expected": len(want),
        "seconds_with_telemetry": covered,
        "coverage": round(covered / len(want), 4) if want else 0.0,
        "down_s": round(sum(hi - lo for lo, hi in down), 1),
    }


# --- goals and the report ------------------------------------------------------------------


def goals(
    score: PjmScore,
    blocks: Sequence[BlockView],
    tally: dict[str, Any],
    journal: dict[str, Any],
    unplanned_exits: int,
) -> dict[str, bool]:
    return {
        f"overall score {score.score:.3f} >= {OVERALL_GOAL}": score.score >= OVERALL_GOAL,
        f"no block below {BLOCK_GOAL} (lowest {min(b.score for b in blocks):.3f})": all(
            not b.missed for b in blocks
        ),
        f"every dispatch acked ({tally['lost']} lost, last acked: {tally['last_acked']})": (
            tally["lost"] == 0 and tally["last_acked"]
        ),
        f"journal complete: {journal['coverage']:.1%} of seconds outside the daemon's down "
        f"time (>= {JOURNAL_GOAL:.0%})": journal["coverage"] >= JOURNAL_GOAL,
        "no capability promise broken": all(b.promise != "BROKEN" for b in blocks),
        f"the daemon never exited on its own ({unplanned_exits} times)": unplanned_exits == 0,
    }


def report_text(
    score: PjmScore,
    blocks: Sequence[BlockView],
    faults: Sequence[dict[str, Any]],
    tally: dict[str, Any],
    journal: dict[str, Any],
    verdicts: dict[str, bool],
    block_s: float,
) -> str:
    lines = [
        f"{'block':<6} {'from s':>7} {'accuracy':>9} {'delay':>7} {'precision':>10} "
        f"{'score':>7}  {'faults':<10} {'promise':<7} reduced capability announced: times, first"
    ]
    for v, b in zip(blocks, score.blocks, strict=True):
        faults_in = ",".join(map(str, v.faults)) or "-"
        lines.append(
            f"{v.n:<6} {(v.n - 1) * block_s:>7.0f} {b.accuracy:>9.3f} {b.delay:>7.3f} "
            f"{b.precision:>10.3f} {b.score:>7.3f}  {faults_in:<10} {v.promise:<7} "
            f"{v.announcements:>5}  {v.announced or '-'}"
        )
    lines.append(
        f"{'overall':<6} {'':>7} {score.accuracy:>9.3f} {score.delay:>7.3f} "
        f"{score.precision:>10.3f} {score.score:>7.3f}"
    )
    lines += ["", "faults (5 s capability up/down: before -> lowest during -> after):"]
    for f in faults:
        head = f"  {f['n']:>2} {f['kind']:<6} at {f['start_s']:>6.1f} s"
        if f["skipped"]:
            lines.append(f"{head}: {f['what']}: skipped ({f['skipped']})")
            continue
        resumed = f["telemetry_resumed_s"]
        lines.append(
            f"{head} for {f['duration_s']:>5.1f} s: {f['detail']}"
            + (
                f" [{', '.join(f['devices'][:3])}{', ...' if len(f['devices']) > 3 else ''}]"
                if f["devices"]
                else ""
            )
        )
        lines.append(
            f"       {f['before']} -> {f['during_min']} -> {f['after']}; telemetry "
            + ("never resumed" if resumed is None else f"resumed {resumed:.1f} s after")
            + (", meter estimated" if f["meter_estimated"] else "")
        )
    lines += [
        "",
        f"dispatches: {tally['sent']} sent, {tally['resent']} re-sent, {tally['acked']} acked "
        f"({tally['rejected']} rejected {tally['reject_reasons'] or ''}), "
        f"{tally['unacked_in_outages']} unanswered during outages (re-sent), {tally['lost']} "
        f"lost, {tally['publish_failed']} publishes refused (broker down); ack latency p50 "
        f"{tally['ack_latency_p50_s']} s, max {tally['ack_latency_max_s']} s",
        f"journal: rows {journal.get('rows', journal.get('error'))}; telemetry in "
        f"{journal.get('seconds_with_telemetry', 0)} of {journal.get('seconds_expected', 0)} "
        f"seconds outside {journal.get('down_s', 0)} s of daemon down time",
        "",
    ]
    lines += [f"{'PASS' if ok else 'FAIL'}  {goal}" for goal, ok in verdicts.items()]
    return "\n".join(lines)
