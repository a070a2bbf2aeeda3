"""Soak: the simulated site under random dispatches for a long time; does the daemon stay sound?

Broker, `rampd sim` and `rampd run` as separate processes (controller/tools/bench/site_run.py, as
for the ramp bench) at the site's 100 ms cycle. A dispatcher sends random dispatches (mostly
setpoints, some regulation and release, a few invalid ones) every 0.5-2 s while the daemon's
own /metrics is sampled: resident memory (process_resident_memory_bytes), live asyncio tasks
(rampd_asyncio_tasks), cycles and cycle overruns. Figures after the warm-up decide:

* resident memory grows less than --max-rss-growth-pct (default 10%) from warm-up to the end;
* no task leak: the median task count of the last quarter is not above the maximum of the
  first quarter (both after warm-up);
* cycle overruns after warm-up stay under --max-overrun-pct (default 1%) of cycles;
* the cycle's p99 after warm-up is under --max-cycle-p99-ms (default 50 ms), read from the
  daemon's own cycle-duration histogram (at least 99% of the cycles in buckets up to it);
* no file-descriptor leak: judged like the tasks, on process_open_fds;
* every dispatch sent is acked.

Exit code 0 when every goal is met, 1 when one fails, 2 when the run itself fails. Figures
depend on the machine and its load: not a test (tests/e2e/test_soak_short.py runs a short one).

Reproduce: python bench/soak.py --full --minutes 30 --out /tmp/soak30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families

from controller.dispatcher import Sent
from controller.tools.bench import DEFAULT_CONFIG
from controller.tools.bench.histogram import Buckets, locate
from controller.tools.bench.site_run import (
    BenchError,
    Site,
    ack_of,
    default_out,
    http_json,
    start_site,
)

# The reference site's addresses, each to 127.92.<offset + k>.x in this bench's own loopback
# block: meter (k 0), Modbus rows (1), LuxOS miners (10; 2,000 span 10.1 .. 17.208), Redfish
# racks (30), and --full's other firmwares and feeders (40-43: Braiins, Whatsminer, stock
# Antminer, breakers), so no soak shares an address with another bench or test.
ADDRESSES = {
    "127.80.0.1": 0,
    "127.80.1.1": 1,
    "127.81.0.1": 10,
    "127.82.0.1": 30,
    "127.86.0.1": 40,
    "127.87.0.1": 41,
    "127.88.0.1": 42,
    "127.89.0.1": 43,
}
MAX_NET_OFFSET = 255 - max(ADDRESSES.values())
SERIES = {
    "rss": "process_resident_memory_bytes",
    "tasks": "rampd_asyncio_tasks",
    "cycles": "rampd_cycle_duration_seconds_count",
    "overruns": "rampd_cycle_overruns_total",
    "fds": "process_open_fds",
}
CYCLE_BUCKET = "rampd_cycle_duration_seconds_bucket"


MAX_RSS_GROWTH_PCT = 10.0
MAX_OVERRUN_PCT = 1.0
MAX_CYCLE_P99_MS = 50.0


@dataclass(frozen=True, slots=True)
class Goals:
    max_rss_growth_pct: float = MAX_RSS_GROWTH_PCT
    max_overrun_pct: float = MAX_OVERRUN_PCT
    max_cycle_p99_ms: float = MAX_CYCLE_P99_MS


@dataclass(slots=True)
class Sample:
    t: float  # seconds since the start of the soak
    rss: float
    tasks: float
    cycles: float
    overruns: float
    fds: float
    cycle_buckets: Buckets


@dataclass(slots=True)
class Tally:
    sent: int = 0
    invalid: int = 0
    ids: list[str] = field(default_factory=list)
    last: Sent | None = None


def site_file(out: Path, net_offset: int = 0) -> Path:
    """The reference site file with its addresses moved to 127.92.x.x, written into `out`."""
    text = DEFAULT_CONFIG.read_text(encoding="utf-8")
    for old, k in ADDRESSES.items():
        if f'"{old}"' not in text:
            raise BenchError(f"{DEFAULT_CONFIG} no longer holds address {old}")
        text = text.replace(f'"{old}"', f'"127.92.{net_offset + k}.1"')
    path = out / "soak-site.toml"
    path.write_text(text, encoding="utf-8")  # templates: the shipped ones (load_config)
    return path


async def scrape(url: str, t: float) -> Sample:
    text = await asyncio.to_thread(http_json, url)
    wanted = set(SERIES.values())
    values: dict[str, float] = {}
    buckets: Buckets = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                values[s.name] = float(s.value)
            elif s.name == CYCLE_BUCKET:
                buckets.append((float(s.labels["le"]), float(s.value)))
    missing = wanted - values.keys()
    if missing or not buckets:
        raise BenchError(f"{url} does not serve {sorted(missing) or [CYCLE_BUCKET]}")
    return Sample(t, *(values[SERIES[k]] for k in SERIES), cycle_buckets=sorted(buckets))


async def sampler(site: Site, url: str, t0: float, every_s: float, out: list[Sample]) -> None:
    while True:
        site.check_alive()
        out.append(await scrape(url, time.monotonic() - t0))
        await asyncio.sleep(every_s)


async def dispatcher(site: Site, rnd: random.Random, tally: Tally) -> None:
    """Random dispatches, 0.5-2 s apart: setpoints mostly, some regulation and release, and a
    few invalid ones (above the site maximum: rejected, and must be acked all the same)."""
    max_kw = site.site_max_kw
    while True:
        kind = rnd.choices(["setpoint", "regulation", "release", "invalid"], [70, 15, 5, 10])[0]
        if kind == "setpoint":
            sent = await site.d.send("setpoint", rnd.uniform(0.3, 0.95) * max_kw)
        elif kind == "regulation":
            band = round(0.05 * max_kw, 1)
            sent = await site.d.send(
                "regulation", 0.6 * max_kw, band_kw=band, signal=round(rnd.uniform(-1, 1), 3)
            )
        elif kind == "release":
            sent = await site.d.send("release", max_kw)
        else:
            sent = await site.d.send("setpoint", 2 * max_kw)
            tally.invalid += 1
        tally.sent += 1
        tally.ids.append(sent.dispatch.id)
        tally.last = sent
        await asyncio.sleep(rnd.uniform(0.5, 2.0))


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def flat(xs: list[float]) -> tuple[float, float]:
    """(first-quarter max, last-quarter median): a leak shows as the second above the first."""
    q = max(1, len(xs) // 4)
    return max(xs[:q]), _median(xs[-q:])


def figures(samples: list[Sample], warmup_s: float, tally: Tally, acked: int) -> dict[str, Any]:
    after = [s for s in samples if s.t >= warmup_s]
    if len(after) < 4:
        raise BenchError(f"only {len(after)} samples after the warm-up: run longer")
    k = max(1, min(3, len(after) // 4))
    rss_warm = _median([s.rss for s in after[:k]])
    rss_end = _median([s.rss for s in after[-k:]])
    tasks = [s.tasks for s in after]
    fds = [s.fds for s in after]
    first, last = after[0], after[-1]
    cycles = last.cycles - first.cycles
    overruns = last.overruns - first.overruns
    p99 = locate(0.99, first.cycle_buckets, last.cycle_buckets)
    tasks_max, tasks_end = flat(tasks)
    fds_max, fds_end = flat(fds)
    return {
        "duration_s": round(samples[-1].t, 1),
        "warmup_s": warmup_s,
        "samples": len(samples),
        "rss_warm_mib": round(rss_warm / 2**20, 2),
        "rss_end_mib": round(rss_end / 2**20, 2),
        "rss_growth_pct": round(100.0 * (rss_end - rss_warm) / rss_warm, 2),
        "tasks_min": int(min(tasks)),
        "tasks_max": int(max(tasks)),
        "tasks_first_quarter_max": int(tasks_max),
        "tasks_last_quarter_median": tasks_end,
        "fds_min": int(min(fds)),
        "fds_max": int(max(fds)),
        "fds_first_quarter_max": int(fds_max),
        "fds_last_quarter_median": fds_end,
        "cycle_p99_bucket_ms": round(p99.upper * 1e3, 3) if p99 else None,
        "cycle_p99_est_ms": round(p99.estimate * 1e3, 3) if p99 else None,
        "cycles": int(last.cycles),
        "cycles_after_warmup": int(cycles),
        "overruns": int(last.overruns),
        "overruns_after_warmup": int(overruns),
        "overrun_pct": round(100.0 * overruns / cycles, 3) if cycles else None,
        "overrun_pct_whole_run": round(100.0 * last.overruns / last.cycles, 3)
        if last.cycles
        else None,
        "dispatches_sent": tally.sent,
        "dispatches_invalid": tally.invalid,
        "dispatches_acked": acked,
    }


def verdicts(fig: dict[str, Any], goals: Goals) -> dict[str, bool]:
    return {
        f"rss growth < {goals.max_rss_growth_pct:g}%": fig["rss_growth_pct"]
        < goals.max_rss_growth_pct,
        "no task growth": fig["tasks_last_quarter_median"] <= fig["tasks_first_quarter_max"],
        "no file-descriptor growth": fig["fds_last_quarter_median"] <= fig["fds_first_quarter_max"],
        # The bucket's upper bound, not the estimate: 99% of cycles provably within the goal.
        f"cycle p99 < {goals.max_cycle_p99_ms:g} ms": fig["cycle_p99_bucket_ms"] is not None
        and fig["cycle_p99_bucket_ms"] <= goals.max_cycle_p99_ms,
        f"overruns < {goals.max_overrun_pct:g}%": fig["overrun_pct"] is not None
        and fig["overrun_pct"] < goals.max_overrun_pct,
        "every dispatch acked": fig["dispatches_acked"] == fig["dispatches_sent"],
    }


async def run_soak(
    out: Path,
    *,
    minutes: float,
    warmup_s: float,
    sample_s: float,
    quick: bool,
    seed: int,
    goals: Goals,
    net_offset: int = 0,
) -> int:
    source = site_file(out, net_offset)
    rnd = random.Random(seed)
    tally = Tally()
    samples: list[Sample] = []
    print(f"soak: {minutes:g} min, warm-up {warmup_s:g} s, output in {out}", flush=True)
    async with start_site(source, out, quick=quick, seed=seed) as site:
        listen = site.cfg.site.metrics.listen
        url = f"http://{listen}/metrics"
        print(
            f"site up: {site.n_devices} devices, cycle {site.cfg.site.cycle_s * 1e3:.0f} ms",
            flush=True,
        )
        t0 = time.monotonic()
        tasks = [
            asyncio.create_task(sampler(site, url, t0, sample_s, samples)),
            asyncio.create_task(dispatcher(site, rnd, tally)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, timeout=minutes * 60.0)
            for t in done:
                t.result()  # a sampler or dispatcher error ends the soak
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # Acks come in order: once the last one is in, every earlier one had its chance.
        if tally.last is not None:
            await ack_of(site.d, tally.last)
        seen = {a.id for a in site.d.acks}
        acked = sum(1 for i in tally.ids if i in seen)
        samples.append(await scrape(url, time.monotonic() - t0))
    fig = figures(samples, warmup_s, tally, acked)
    ok = verdicts(fig, goals)
    (out / "results.json").write_text(
        json.dumps(
            {
                "figures": fig,
                "goals": asdict(goals),
                "verdicts": ok,
                "samples": [asdict(s) for s in samples],
            },
            indent=1,
        )
    )
    print(report(fig, ok), flush=True)
    return 0 if all(ok.values()) else 1


def report(fig: dict[str, Any], ok: dict[str, bool]) -> str:
    lines = [
        f"duration {fig['duration_s']:.0f} s (warm-up {fig['warmup_s']:g} s), "
        f"{fig['samples']} samples",
        f"RSS after warm-up {fig['rss_warm_mib']:.1f} MiB, at end {fig['rss_end_mib']:.1f} MiB, "
        f"growth {fig['rss_growth_pct']:+.2f}%",
        f"asyncio tasks after warm-up: min {fig['tasks_min']}, max {fig['tasks_max']} "
        f"(first-quarter max {fig['tasks_first_quarter_max']}, "
        f"last-quarter median {fig['tasks_last_quarter_median']:g})",
        f"open file descriptors after warm-up: min {fig['fds_min']}, max {fig['fds_max']} "
        f"(first-quarter max {fig['fds_first_quarter_max']}, "
        f"last-quarter median {fig['fds_last_quarter_median']:g})",
        f"cycle p99 after warm-up {fig['cycle_p99_est_ms']} ms "
        f"(in the histogram bucket up to {fig['cycle_p99_bucket_ms']} ms)",
        f"cycles {fig['cycles']} ({fig['cycles_after_warmup']} after warm-up), overruns "
        f"{fig['overruns_after_warmup']} after warm-up = {fig['overrun_pct']}% "
        f"(whole run {fig['overruns']} = {fig['overrun_pct_whole_run']}%)",
        f"dispatches sent {fig['dispatches_sent']} ({fig['dispatches_invalid']} invalid), "
        f"acked {fig['dispatches_acked']}",
    ]
    lines += [f"{'PASS' if passed else 'FAIL'}  {goal}" for goal, passed in ok.items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Soak the simulated site under random dispatches.")
    p.add_argument("--minutes", type=float, default=30.0, help="soak length (default 30)")
    p.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="excluded from the figures (default: a fifth of the run, at most 300 s)",
    )
    p.add_argument("--sample-s", type=float, default=5.0, help="metrics sampling period")
    p.add_argument(
        "--full",
        action="store_true",
        help="the whole reference campus (2,540 devices) instead of its --quick form (195)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--net-offset",
        type=int,
        default=0,
        help=f"devices on 127.92.<offset+k>.x (0..{MAX_NET_OFFSET}): two soaks side by side",
    )
    p.add_argument("--out", type=Path, default=None, help="output directory")
    p.add_argument("--max-rss-growth-pct", type=float, default=MAX_RSS_GROWTH_PCT)
    p.add_argument("--max-overrun-pct", type=float, default=MAX_OVERRUN_PCT)
    p.add_argument("--max-cycle-p99-ms", type=float, default=MAX_CYCLE_P99_MS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.minutes <= 0 or args.sample_s <= 0:
        print("soak: --minutes and --sample-s must be positive", file=sys.stderr)
        return 2
    if not 0 <= args.net_offset <= MAX_NET_OFFSET:
        print(f"soak: --net-offset must be within 0..{MAX_NET_OFFSET}", file=sys.stderr)
        return 2
    warmup_s = args.warmup_s if args.warmup_s is not None else min(300.0, args.minutes * 12.0)
    goals = Goals(args.max_rss_growth_pct, args.max_overrun_pct, args.max_cycle_p99_ms)
    out: Path = args.out or default_out("soak")
    out.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(
            run_soak(
                out,
                minutes=args.minutes,
                warmup_s=warmup_s,
                sample_s=args.sample_s,
                quick=not args.full,
                seed=args.seed,
                goals=goals,
                net_offset=args.net_offset,
            )
        )
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
