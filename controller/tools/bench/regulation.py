"""The regulation bench: replay a real PJM RegA signal and score the site like PJM would.

The site is first put mid-range and left to rest; the offer is read from the daemon's
telemetry there: base = that level, band = 0.9 x min(5 s capability up, down), bounded so
base +- band stays inside the site's limits and the fleet's range. The signal s(t) is then
replayed as `regulation` dispatches (target_kw = base, band_kw = band, signal = s) every
2 s / K, and the simulator's ground truth, averaged per sample, is scored with the PJM
performance score (controller/tools/pjm_score.py) on samples, blocks and delays K times shorter
than PJM's 10 s / 5 min / 5 min. The response is scored over the replay only (no tail past
its end), so the last block's longest delays are not tried.

    rampd bench regulation [-c configs/bench-site.toml] [--out DIR] [--quick] [--compress K]
                           [--minutes M] [--day 8/1/2017] [--start 22:00:00]

Writes OUT/results.json and OUT/run.json (`rampd report OUT` draws OUT/report.png).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import aiomqtt
import numpy as np

from controller.dispatcher import Sent
from controller.tools.bench import add_regulation_arguments
from controller.tools.bench.site_run import (
    REPO,
    BenchError,
    Site,
    ack_of,
    config_summary,
    default_out,
    fresh_telemetry,
    start_site,
)
from controller.tools.pjm_score import PjmScore, load_pjm_csv, normalize, pjm_score, resample
from controller.tools.report import ReportError, RunDispatch, RunSpec, report_from_run, write_run
from controller.tools.truth import tolerance_kw
from controller.wire import Telemetry
from controller.wire.timestamps import rfc3339
from drivers.core.state import F64

DESCRIPTION: Final = "Regulation bench: replay a PJM RegA signal, score with the PJM score."
DEFAULT_SIGNAL: Final = REPO / "bench" / "data" / "pjm_rega_2017-08_2s.csv"
"""A copy of ../shared/data/pjm_rega_2017-08_2s.csv (see bench/data/README.md)."""
SIGNAL_STEP_S: Final = 2.0
"""The CSV's sample period."""
PJM_SAMPLE_S: Final = 10.0
PJM_BLOCK_S: Final = 300.0
PJM_MAX_DELAY_S: Final = 300.0
QUALIFY: Final = 0.75
BAND_FRACTION: Final = 0.9
REST_HOLD_S: Final = 5.0


def signal_slice(
    path: Path, day: str, start: str, seconds: float
) -> tuple[np.ndarray[Any, np.dtype[np.float64]], np.ndarray[Any, np.dtype[np.float64]]]:
    """`seconds` of the signal of `day` from time of day `start`: (t from 0, s)."""
    t, s = load_pjm_csv(path, day)
    h, m, sec = (int(x) for x in start.split(":"))
    first = _first_time_of_day(path)
    offset = (h * 3600 + m * 60 + sec - first) % 86400
    sel = (t >= offset - 1e-9) & (t < offset + seconds - 1e-9)
    if not sel.any() or float(t[sel][-1] - offset) < seconds - 2 * SIGNAL_STEP_S:
        raise BenchError(
            f"{path}: {day} has no {seconds:.0f} s of signal from {start} "
            f"(the file covers {t[-1] / 3600:.1f} h from its first row)"
        )
    return t[sel] - offset, s[sel]


def _first_time_of_day(path: Path) -> float:
    with path.open() as fh:
        fh.readline()
        h, m, s = (int(x) for x in fh.readline().split(",")[0].strip().split(":"))
    return float(h * 3600 + m * 60 + s)


async def capability_at_rest(site: Site, n: int = 3) -> dict[str, float]:
    """Median of the next n telemetry messages' range and 5 s capability."""
    msgs = [await fresh_telemetry(site.d, within=5.0) for _ in range(n)]

    def med(get: Callable[[Telemetry], float | None]) -> float:
        return float(statistics.median((get(m) or 0.0) / 1e3 for m in msgs))

    def reach5(m: Telemetry) -> tuple[float | None, float | None]:
        return m.capability.within(5.0) if m.capability else (None, None)

    return {
        "measured_kw": med(lambda m: m.measured_w),
        "min_kw": med(lambda m: m.min_w),
        "max_kw": med(lambda m: m.max_w),
        "up_kw_5s": med(lambda m: reach5(m)[0]),
        "down_kw_5s": med(lambda m: reach5(m)[1]),
    }


def score_table(score: PjmScore, block_s: float) -> str:
    head = f"{'block':<8} {'from s':>7} {'accuracy':>9} {'delay':>7} {'precision':>10} {'score':>7}"
    head += f" {'best delay s':>13}"
    rows = [head, "-" * len(head)]
    for i, b in enumerate(score.blocks):
        rows.append(
            f"{i + 1:<8} {i * block_s:>7.0f} {b.accuracy:>9.3f} {b.delay:>7.3f} "
            f"{b.precision:>10.3f} {b.score:>7.3f} {b.best_delay_s:>13.1f}"
        )
    rows.append(
        f"{'overall':<8} {'':>7} {score.accuracy:>9.3f} {score.delay:>7.3f} "
        f"{score.precision:>10.3f} {score.score:>7.3f}"
    )
    return "\n".join(rows)


def command_line(args: argparse.Namespace) -> str:
    parts = ["rampd", "bench", "regulation", "-c", str(args.config), "--seed", str(args.seed)]
    parts += ["--compress", str(args.compress), "--minutes", f"{args.minutes:g}"]
    parts += ["--day", args.day, "--start", args.start]
    if args.signal:
        parts += ["--signal", str(args.signal)]
    if args.quick:
        parts.append("--quick")
    return shlex.join(parts)


async def put_mid(site: Site, hold_s: float) -> tuple[float, float, float]:
    """Dispatch the middle of the flexible range and wait until the site rests there."""
    tel = await fresh_telemetry(site.d)
    limits = site.cfg.site.site
    lo = max(limits.min_kw, (tel.min_w or 0.0) / 1e3)
    hi = min(limits.max_kw, (tel.max_w or 0.0) / 1e3)
    mid = round((lo + hi) / 2, 1)
    tol = tolerance_kw(mid, site.site_max_kw)
    phys, _ = await site.physical_min(mid, tol)
    cap = max(60.0, 1.5 * phys + 30.0) if phys is not None else 180.0
    sent = await site.d.send("setpoint", mid)
    ack = await ack_of(site.d, sent)
    if ack is None or not ack.accepted:
        raise BenchError(f"the mid-range setpoint {mid} kW was not accepted: {ack}")
    t_end = await site.settle(mid, tol, t0=sent.t, hold_s=hold_s, cap_s=cap)
    settled = t_end - sent.t < cap
    print(
        f"  mid-range setpoint {mid:.1f} kW (range {lo:.0f}..{hi:.0f} kW): "
        f"{'at rest' if settled else 'NOT settled'} after {t_end - sent.t:.1f} s"
    )
    return mid, lo, hi


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """What a replay of the RegA signal covers: whole PJM blocks, K times faster."""

    k: int
    sample_s: float
    block_s: float
    max_delay_s: float
    n_blocks: int
    wall_s: float
    signal_path: Path
    sig_t: F64
    """Signal sample times (s from the start, at the signal's own pace: divide by k)."""
    sig: F64


def replay_plan(args: argparse.Namespace) -> ReplayPlan:
    """The blocks `--minutes` holds at `--compress`, and the signal slice they replay;
    BenchError when no whole block fits or the signal cannot be read."""
    k = args.compress
    block_s = PJM_BLOCK_S / k
    n_blocks = int(args.minutes * 60.0 / block_s + 1e-9)
    if n_blocks < 1:
        raise BenchError(
            f"--minutes {args.minutes:g} is shorter than one block ({block_s:g} s at "
            f"--compress {k})"
        )
    wall_s = n_blocks * block_s
    signal_path = Path(args.signal) if args.signal else DEFAULT_SIGNAL
    try:
        sig_t, sig = signal_slice(signal_path, args.day, args.start, wall_s * k)
    except (OSError, ValueError) as exc:
        raise BenchError(f"signal: {exc}") from None
    return ReplayPlan(
        k, PJM_SAMPLE_S / k, block_s, PJM_MAX_DELAY_S / k, n_blocks, wall_s, signal_path,
        sig_t, sig,
    )  # fmt: skip


def offer_band(site: Site, base: float, lo: float, hi: float, rest: dict[str, float]) -> float:
    """The regulation offer's band: BAND_FRACTION of the smaller 5 s capability at rest,
    inside the site's limits and range, to 0.1 kW; BenchError when there is none."""
    limits = site.cfg.site.site
    band = BAND_FRACTION * min(rest["up_kw_5s"], rest["down_kw_5s"])
    band = min(band, base - max(limits.min_kw, lo), min(limits.max_kw, hi) - base)
    band = math.floor(band * 10) / 10
    if band <= 0:
        raise BenchError(f"no band to offer at {base} kW (capability at rest: {rest})")
    return band


async def run_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    source = Path(args.config)
    replay = replay_plan(args)
    k, block_s, n_blocks, wall_s = replay.k, replay.block_s, replay.n_blocks, replay.wall_s
    sample_s, max_delay_s = replay.sample_s, replay.max_delay_s
    signal_path, sig_t, sig_s = replay.signal_path, replay.sig_t, replay.sig
    if not math.isclose(wall_s, args.minutes * 60.0):
        print(f"  (replaying {wall_s:g} s: a whole number of {block_s:g} s blocks)")
    started = time.time()
    print(
        f"rampd bench regulation: {source}{' (quick)' if args.quick else ''} -> {out}; "
        f"{signal_path.name} {args.day} from {args.start}, {wall_s * k / 60:g} min of signal "
        f"in {wall_s / 60:g} min (x{k}), {n_blocks} blocks of {block_s:g} s"
    )
    sent: list[Sent] = []
    async with start_site(source, out, quick=args.quick, mqtt=args.mqtt, seed=args.seed) as site:
        print(f"  {site.n_devices} devices ON")
        base, lo, hi = await put_mid(site, REST_HOLD_S)
        rest = await capability_at_rest(site)
        band = offer_band(site, base, lo, hi, rest)
        print(
            f"  offer: base {base:.1f} kW, band +-{band:.1f} kW (0.9 x min of 5 s capability "
            f"up {rest['up_kw_5s']:.0f} / down {rest['down_kw_5s']:.0f} kW)"
        )
        t_start = time.time() + 0.5
        for i, (ts, s) in enumerate(zip(sig_t, sig_s, strict=True)):
            due = t_start + float(ts) / k
            await asyncio.sleep(max(0.0, due - time.time()))
            if i % 16 == 0:
                site.check_alive()
                site.truth.poll()
            sent.append(
                await site.d.send("regulation", base, band_kw=band, signal=round(float(s), 4))
            )
            if i and i % max(1, round(60.0 * k / SIGNAL_STEP_S)) == 0:
                print(f"  replayed {ts / 60:.0f} min of signal ({(time.time() - t_start):.0f} s)")
        t0 = sent[0].t
        t_end = t0 + wall_s
        while not site.truth.t or site.truth.t[-1] < t_end + 0.5:
            if time.time() > t_end + 30.0:
                raise BenchError("the simulator's truth log stopped")
            await site.poll_truth()
        await asyncio.sleep(1.0)  # the last acks
        summary = config_summary(site, source, args.quick)
        acks = [site.d.ack_seen(x.dispatch.id) for x in sent]
    rejected = [a for a in acks if a is not None and not a.accepted]
    missing = sum(a is None for a in acks)

    t, kw = site.truth.arrays()
    n = round(wall_s / sample_s)
    pub_t = np.asarray([x.t for x in sent])
    pub_s = np.asarray([(x.dispatch.signal or 0.0) for x in sent])
    signal = resample(pub_t, pub_s, t0, sample_s, n, mode="hold")
    response = normalize(resample(t, kw, t0, sample_s, n, mode="mean"), base, band)
    score = pjm_score(signal, response, sample_s=sample_s, block_s=block_s, max_delay_s=max_delay_s)
    err_kw = float(np.mean(np.abs(response - signal))) * band

    spec = RunSpec(
        name=(
            f"regulation bench, site {site.cfg.site.site_id}: PJM score {score.score:.3f} "
            f"(accuracy {score.accuracy:.2f}, delay {score.delay:.2f}, precision "
            f"{score.precision:.2f}); base {base:.0f} kW band +-{band:.0f} kW, x{k}"
        ),
        site_max_kw=site.site_max_kw,
        dispatches=tuple(
            RunDispatch(
                t=x.t,
                target_kw=round(base + (x.dispatch.signal or 0.0) * band, 1),
                mode="regulation",
                id=x.dispatch.id,
            )
            for x in sent
        ),
        telemetry="telemetry.jsonl",
        t_start=t0 - 10.0 / k,
        t_end=t_end,
    )
    write_run(out, spec)
    plot: str | None = str(out / "report.png")
    try:
        await asyncio.to_thread(report_from_run, out)
    except ReportError as exc:
        print(f"  no plot: {exc}")
        plot = None

    verdict = "qualifies" if score.score >= QUALIFY else "does not qualify"
    body = {
        "format": "rampd-bench-regulation/1",
        "command": command_line(args),
        "started_at": rfc3339(started),
        "finished_at": rfc3339(time.time()),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "config": summary,
        "signal": {
            "file": str(signal_path),
            "day": args.day,
            "start": args.start,
            "signal_s": wall_s * k,
            "compress": k,
            "dispatch_every_s": SIGNAL_STEP_S / k,
        },
        "offer": {"base_kw": base, "band_kw": band, "range_kw": [lo, hi], "at_rest": rest},
        "scoring": {
            "sample_s": sample_s,
            "block_s": block_s,
            "max_delay_s": max_delay_s,
            "response": "ground truth, time-weighted mean per sample",
            "signal": "published signal in force at each sample",
        },
        "dispatches": len(sent),
        "rejected": len(rejected),
        "unacked": missing,
        "reject_reasons": sorted({a.reason for a in rejected}),
        "mean_abs_error_kw": round(err_kw, 1),
        "blocks": [asdict(b) for b in score.blocks],
        "overall": {
            "accuracy": score.accuracy,
            "delay": score.delay,
            "precision": score.precision,
            "score": score.score,
            "qualifies": score.score >= QUALIFY,
        },
        "plot": plot,
    }
    (out / "results.json").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    print()
    print(score_table(score, block_s))
    print()
    print(
        f"PJM performance score {score.score:.3f}: {verdict} (>= {QUALIFY}); mean |error| "
        f"{err_kw:.1f} kW ({100 * err_kw / band:.1f}% of the band); {len(sent)} dispatches, "
        f"{len(rejected)} rejected, {missing} without ack"
    )
    print(f"results: {out / 'results.json'}; plot: {plot}")
    print(f"reproduce: {command_line(args)}")
    return 0


def run_cli(args: argparse.Namespace) -> int:
    if args.compress is None:
        args.compress = 5 if args.quick else 1
    if args.minutes is None:
        args.minutes = 2.0 if args.quick else 10.0
    if args.compress < 1 or args.minutes <= 0:
        print("rampd bench regulation: need --compress >= 1 and --minutes > 0", file=sys.stderr)
        return 2
    args.out = args.out or str(default_out("regulation"))
    try:
        return asyncio.run(run_bench(args))
    except (BenchError, aiomqtt.MqttError) as exc:
        print(f"rampd bench regulation: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="regulation_bench", description=DESCRIPTION)
    add_regulation_arguments(p)
    return run_cli(p.parse_args(argv))
