"""The frequency bench: a real under-frequency event replayed on the simulated site, with Fast
Frequency Response and under-frequency relay load armed; scored on the simulator's ground truth.

The site (`configs/bench-site.toml`, `--quick`: its small version) runs with `[services]` from
the command line; the armed amounts are sent in a dispatch (`"services"`), as a QSE would.
Once the site is steady, the simulator replays the recording (`POST /grid`, its per-unit
deviation mapped onto the site's nominal frequency). From the truth log (power and frequency
at 50 Hz) it prints, per service: when the frequency crossed the trigger, how long until the
site had shed the armed amount (the goal: within the deadline, and within 1.2x of the
physical minimum of the devices used: their dead time plus their opening time), and the
power before and after. After `--hold` seconds the deployment is recalled by a dispatch and
the restoration is timed and checked against the ramp limits (the largest change in any
rolling 5 s window, and per minute).

    rampd bench frequency [-c configs/bench-site.toml] [--trace FILE] [--trace-nominal-hz 50]
                          [--ffr-kw 2000] [--ufr-kw 2000] [--hold 30] [--quick] [--out DIR]

Writes OUT/results.json and OUT/truth.jsonl. Exits 0 even when verdicts fail: a bench.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from controller.tools.bench.site_run import (
    BenchError,
    Site,
    ack_of,
    default_out,
    http_json,
    start_site,
)
from controller.tools.truth import tolerance_kw
from drivers.core.state import F64

DESCRIPTION: Final = "Frequency bench: a real under-frequency event, FFR and UFR on ground truth."
RATIO_OK: Final = 1.2
SHED_FRACTION: Final = 0.95
"""The armed amount counts as shed once the site is this much of it below where it was."""
LEAD_S: Final = 10.0
"""Seconds of the recording kept before its first trigger crossing (the replay starts there)."""


@dataclass
class ServiceResult:
    service: str
    trigger_hz: float
    armed_kw: float
    deadline_s: float
    crossed_at: float | None
    """Unix time the truth's frequency first reached the trigger."""
    before_kw: float | None
    shed_s: float | None
    """From the crossing until the site had shed SHED_FRACTION of the armed amount."""
    physical_min_s: float | None
    ratio: float | None
    after_kw: float | None
    ok: bool


def cut_trace(src: Path, dst: Path, nominal_hz: float, trigger_hz: float, site_hz: float) -> int:
    """Copy `src` from LEAD_S before its first sample at or below the trigger (mapped to the
    recording's nominal); returns how many seconds were cut."""
    with src.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "hz" not in rows[0]:
        raise BenchError(f"{src}: no hz column")
    hz = [float(r["hz"]) for r in rows]
    trigger = nominal_hz * (1 + (trigger_hz - site_hz) / site_hz)
    first = next((i for i, f in enumerate(hz) if f <= trigger), None)
    if first is None:
        raise BenchError(f"{src}: never reaches {trigger_hz} Hz (mapped: {trigger:.3f} Hz)")
    start = max(0, first - int(LEAD_S))
    with dst.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["t_s", "hz"])
        for k, f in enumerate(hz[start:]):
            w.writerow([k, f])
    return start


def score(
    t: F64,
    kw: F64,
    hz: F64,
    *,
    service: str,
    trigger_hz: float,
    armed_kw: float,
    deadline_s: float,
    physical_min_s: float,
    not_before: float,
) -> ServiceResult:
    """One service's response on the truth: crossing, shed time, before/after."""
    below = np.flatnonzero((t >= not_before) & (hz <= trigger_hz))
    if not below.size:
        return ServiceResult(
            service, trigger_hz, armed_kw, deadline_s, None, None, None, None, None, None, False
        )
    i = int(below[0])
    t0 = float(t[i])
    pre = (t >= t0 - 1.0) & (t < t0)
    before = float(np.mean(kw[pre])) if pre.any() else float(kw[i])
    goal = before - SHED_FRACTION * armed_kw
    after = np.flatnonzero((t >= t0) & (kw <= goal))
    shed_s = None if not after.size else float(t[int(after[0])] - t0)
    settled = (t >= t0 + 1.0) & (t < t0 + 2.0)
    after_kw = float(np.mean(kw[settled])) if settled.any() else None
    ratio = None if shed_s is None or physical_min_s <= 0 else round(shed_s / physical_min_s, 2)
    ok = shed_s is not None and shed_s <= deadline_s
    return ServiceResult(
        service,
        trigger_hz,
        armed_kw,
        deadline_s,
        t0,
        round(before, 1),
        None if shed_s is None else round(shed_s, 3),
        round(physical_min_s, 3),
        ratio,
        None if after_kw is None else round(after_kw, 1),
        ok,
    )


def max_window_change_kw(t: F64, kw: F64, window_s: float) -> float:
    """The largest |change| of the truth within any window of `window_s` seconds."""
    if len(t) < 2:
        return 0.0
    j = 0
    worst = 0.0
    lo_q: list[int] = []
    hi_q: list[int] = []
    for i in range(len(t)):  # monotone deques: running min and max over the window
        while lo_q and kw[lo_q[-1]] >= kw[i]:
            lo_q.pop()
        lo_q.append(i)
        while hi_q and kw[hi_q[-1]] <= kw[i]:
            hi_q.pop()
        hi_q.append(i)
        while t[i] - t[j] > window_s:
            j += 1
        while lo_q[0] < j:
            lo_q.pop(0)
        while hi_q[0] < j:
            hi_q.pop(0)
        worst = max(worst, float(kw[hi_q[0]] - kw[lo_q[0]]))
    return worst


def physical_min_of_breakers(site: Site) -> float:
    """The fastest shed the site's fast devices allow: dead time plus opening time."""
    fast = [
        d.dead_time_s + d.sleep_s
        for d in site.cfg.devices
        if d.services_only or (d.sleep_s > 0 and d.dead_time_s + d.sleep_s <= 0.5)
    ]
    return min(fast) if fast else math.nan


async def run_bench(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_out("frequency")
    sections: dict[str, dict[str, Any]] = {
        "services": {
            "ffr": {"armed_kw": 0.0, "sustain_s": 900.0},
            "ufr": {"armed_kw": 0.0, "sustain_s": 900.0},
        },
        # The proposed large-load limits (grid-services.md): restoration keeps to them.
        "ramp_limits": {"up_kw_per_min": 20_000.0, "max_change_kw_per_5s": 10_000.0},
    }
    async with start_site(
        Path(args.config), out, quick=args.quick, mqtt=args.mqtt, sections=sections
    ) as site:
        svc_cfg = site.cfg.site.services
        nominal = float(site.cfg.site.grid.nominal_hz)
        trace = out / "trace.csv"
        cut = cut_trace(
            Path(args.trace), trace, args.trace_nominal_hz, svc_cfg.ffr.trigger_hz, nominal
        )
        d = site.d
        sent = await d.send(services_kw={"ffr": args.ffr_kw, "ufr": args.ufr_kw}, mode="release")
        ack = await ack_of(d, sent)
        if ack is None or not ack.accepted:
            raise BenchError(f"arming dispatch not accepted: {ack}")
        # The site settles where the release puts it (breakers closed) before the event.
        tol = tolerance_kw(site.site_max_kw, site.site_max_kw)
        await site.steady(tol, hold_s=5.0, within=180.0)
        body = {"trace": str(trace.resolve()), "trace_nominal_hz": args.trace_nominal_hz}
        replay_at = time.time()
        await asyncio.to_thread(http_json, f"http://127.0.0.1:{site.control_port}/grid", body)
        print(f"replaying {args.trace} from {cut} s ({LEAD_S:.0f} s before the FFR trigger)")
        await asyncio.sleep(LEAD_S + args.hold)
        recall = await d.send(mode="recall")
        recall_at = recall.t
        await ack_of(d, recall)
        await asyncio.sleep(max(60.0, args.hold))
        site.truth.poll()
        t = np.asarray(site.truth.t)
        kw = np.asarray(site.truth.kw)
        hz = np.asarray(site.truth.hz)
        pmin = physical_min_of_breakers(site)
        ffr = score(
            t, kw, hz, service="ffr", trigger_hz=svc_cfg.ffr.trigger_hz, armed_kw=args.ffr_kw,
            deadline_s=svc_cfg.ffr.deadline_s, physical_min_s=pmin, not_before=replay_at,
        )  # fmt: skip
        ufr = score(
            t, kw, hz, service="ufr", trigger_hz=svc_cfg.ufr.trigger_hz, armed_kw=args.ufr_kw,
            deadline_s=svc_cfg.ufr.deadline_s, physical_min_s=pmin, not_before=replay_at,
        )  # fmt: skip
        rest = t >= recall_at
        limits = site.cfg.site.ramp_limits
        restore = {
            "max_change_kw_5s": round(max_window_change_kw(t[rest], kw[rest], 5.0), 1),
            "max_change_kw_60s": round(max_window_change_kw(t[rest], kw[rest], 60.0), 1),
            "limit_kw_5s": limits.max_change_kw_per_5s,
            "limit_up_kw_per_min": limits.up_kw_per_min,
        }
    results = [ffr, ufr]
    print()
    print(
        f"{'service':<8} {'trigger':>8} {'armed kW':>9} {'shed s':>7} {'deadline':>8} "
        f"{'phys min':>8} {'ratio':>6} {'before kW':>10} {'after kW':>9}  verdict"
    )
    for r in results:
        print(
            f"{r.service:<8} {r.trigger_hz:>8.2f} {r.armed_kw:>9.0f} "
            f"{_f(r.shed_s, '.3f'):>7} {r.deadline_s:>8.2f} {_f(r.physical_min_s, '.3f'):>8} "
            f"{_f(r.ratio, '.2f'):>6} {_f(r.before_kw, '.0f'):>10} {_f(r.after_kw, '.0f'):>9}  "
            f"{'ok' if r.ok else 'MISSED'}"
        )
    print(
        f"restoration after recall: largest change in 5 s {restore['max_change_kw_5s']} kW "
        f"(limit {restore['limit_kw_5s']}), in 60 s {restore['max_change_kw_60s']} kW "
        f"(limit {restore['limit_up_kw_per_min']})"
    )
    doc: dict[str, Any] = {
        "bench": "frequency",
        "command": " ".join(shlex.quote(a) for a in ["rampd", "bench", "frequency", *sys.argv[3:]]),
        "machine": {"python": platform.python_version()},
        "trace": str(args.trace),
        "results": [asdict(r) for r in results],
        "restoration": restore,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    print(f"JSON: {out / 'results.json'}")
    return 0


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def run_cli(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run_bench(args))
    except BenchError as exc:
        print(f"rampd bench frequency: {exc}", file=sys.stderr)
        return 2
