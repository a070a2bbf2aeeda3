"""Flood: a publisher allowed on the broker sends N dispatches a second; does the site run on?

A mosquitto of its own (`max_queued_messages` raised as README "Broker settings" advises,
`$SYS` every second to count what it drops), `rampd sim` and `rampd run` as separate
processes (controller/tools/bench/site_run.py) on the site file given (addresses moved to
127.100-103.x), and the flood from its own process (controller/tools/bench/flood.py:
mosquitto_pub fed at the rate, every ack collected). A quiet window first, then the flood;
the daemon's /metrics is scraped at each edge and telemetry's arrivals timed by a subscriber
of its own. Printed:

* dispatches offered and handled (acked: accepted or rate_limited), a second, and the ack
  messages that carried them; what the broker dropped before rampd saw it;
* the cycle's work time (rampd_cycle_duration_seconds) and how late it starts
  (rampd_cycle_lateness_seconds), p50/p99 quiet and flooded, overruns;
* telemetry's interval as received, the daemon's CPU and memory;
* whether the last accepted dispatch governs, and how soon a dispatch after the flood is acked.

Figures depend on the machine and its load: not a test (tests/e2e/test_dispatch_flood.py is).

Reproduce: python bench/flood_bench.py --rate 10000 --seconds 60 [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiomqtt
from prometheus_client.parser import text_string_to_metric_families

from controller.tools.bench.histogram import quantile
from controller.tools.bench.site_run import BenchError, Site, default_out, http_json, start_site
from controller.tools.broker import free_port
from controller.wire import Telemetry

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SITE = REPO / "configs" / "sim-site.toml"
HISTOGRAMS = ("rampd_cycle_duration_seconds", "rampd_cycle_lateness_seconds")
COUNTERS = (
    "rampd_cycle_overruns_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "rampd_dispatches_total",
)


# --- the broker ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def broker(exe: str, queue: int) -> AsyncIterator[tuple[str, int]]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="rampd-flood-") as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages {queue}\nsys_interval 1\nlog_dest none\n"
        )
        proc = await asyncio.create_subprocess_exec(
            exe, "-c", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            yield "127.0.0.1", port
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)


async def broker_dropped(host: str, port: int) -> int | None:
    """Messages mosquitto dropped (a client's queue full), from its retained $SYS topic."""
    try:
        async with aiomqtt.Client(host, port, timeout=5) as c:
            await c.subscribe("$SYS/broker/publish/messages/dropped")
            async with asyncio.timeout(10):
                async for m in c.messages:
                    return int(bytes(m.payload if isinstance(m.payload, bytes) else b"0"))
    except (aiomqtt.MqttError, TimeoutError, ValueError):
        return None
    return None


# --- the site file ---------------------------------------------------------------------------


def moved_site(source: Path, out: Path) -> Path:
    """The site file with every 127.A.B.C address moved to 127.(100+A).B.C, written into
    `out` (so the run shares no address with tests or other benches), with the templates
    beside the source linked there."""
    text = source.read_text(encoding="utf-8")
    moved = re.sub(
        r'"127\.(\d+)\.(\d+)\.(\d+)"', lambda m: f'"127.{100 + int(m[1])}.{m[2]}.{m[3]}"', text
    )
    path = out / f"source-{source.name}"
    path.write_text(moved, encoding="utf-8")
    link, templates = out / "devices", source.parent / "devices"
    if templates.is_dir() and not link.exists():
        link.symlink_to(templates, target_is_directory=True)
    return path


# --- measuring -------------------------------------------------------------------------------


async def scrape(url: str) -> dict[str, Any]:
    """The cycle histograms' buckets and a few counters (summed over labels, by reason for
    the dispatches)."""
    text = await asyncio.to_thread(http_json, url)
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        if family.name in HISTOGRAMS:
            out[family.name] = [
                (float(s.labels["le"]), s.value)
                for s in family.samples
                if s.name.endswith("_bucket")
            ]
        for s in family.samples:
            if s.name in COUNTERS:
                key = s.name
                if s.name == "rampd_dispatches_total":
                    key = f"{s.name}:{s.labels.get('result')}:{s.labels.get('reason')}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def window(a: dict[str, Any], b: dict[str, Any], wall_s: float) -> dict[str, Any]:
    dur, late = HISTOGRAMS
    cpu_s = b["process_cpu_seconds_total"] - a["process_cpu_seconds_total"]
    decided = sum(v - a.get(k, 0.0) for k, v in b.items() if k.startswith("rampd_dispatches"))
    return {
        "dispatches": int(decided),
        "dispatches_per_s": round(decided / wall_s),
        # What a dispatch costs the daemon, polling and control included: with the daemon
        # on a core of its own, about 1e6 / this many a second.
        "cpu_us_per_dispatch": round(1e6 * cpu_s / decided) if decided else None,
        "cycles": int(b[dur][-1][1] - a[dur][-1][1]),
        "cycle_p50_ms": round(1e3 * quantile(0.5, a[dur], b[dur]), 2),
        "cycle_p99_ms": round(1e3 * quantile(0.99, a[dur], b[dur]), 2),
        "late_p50_ms": round(1e3 * quantile(0.5, a[late], b[late]), 2),
        "late_p99_ms": round(1e3 * quantile(0.99, a[late], b[late]), 2),
        "overruns": int(b["rampd_cycle_overruns_total"] - a["rampd_cycle_overruns_total"]),
        "cpu_pct": round(100 * cpu_s / wall_s, 1),
        "rss_mib": round(b["process_resident_memory_bytes"] / 2**20, 1),
    }


class Arrivals:
    """When telemetry reaches a subscriber (monotonic), and what it said."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, Telemetry]] = []

    async def run(self, host: str, port: int, root: str) -> None:
        async with aiomqtt.Client(host, port, timeout=5) as c:
            await c.subscribe(f"{root}/telemetry")
            async for m in c.messages:
                payload = m.payload if isinstance(m.payload, bytes) else b""
                with contextlib.suppress(ValueError):
                    self.seen.append((time.monotonic(), Telemetry.decode(payload)))

    def intervals(self, t0: float, t1: float) -> dict[str, Any]:
        ts = [t for t, _ in self.seen if t0 <= t <= t1]
        gaps = [b - a for a, b in itertools.pairwise(ts)]
        if not gaps:
            return {"messages": len(ts), "mean_s": None, "max_s": None}
        return {
            "messages": len(ts),
            "mean_s": round(sum(gaps) / len(gaps), 3),
            "max_s": round(max(gaps), 3),
        }


# --- the run ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace, exe: str, source: Path, out: Path) -> dict[str, Any]:
    async with (
        broker(exe, args.broker_queue) as (host, port),
        start_site(source, out, quick=args.quick, mqtt=f"{host}:{port}") as site,
    ):
        return await measure(args, out, site, host, port)


async def measure(
    args: argparse.Namespace, out: Path, site: Site, host: str, port: int
) -> dict[str, Any]:
    url = f"http://{site.cfg.site.metrics.listen}/metrics"
    root = site.cfg.topic_root
    arrivals = Arrivals()
    listener = asyncio.create_task(arrivals.run(host, port, root))
    max_kw = site.site_max_kw
    print(f"site up: {site.n_devices} devices, cycle {site.cfg.site.cycle_s * 1e3:.0f} ms, "
          f"limit {site.cfg.site.dispatch.max_per_s:g}/s burst {site.cfg.site.dispatch.burst}",
          flush=True)  # fmt: skip
    try:
        first, _ = await site.d.send_acked("setpoint", round(0.8 * max_kw, 1), ramp_s=0)
        if not first.accepted:
            raise BenchError(f"the first dispatch was refused: {first.reason}")
        q0, tq0 = await scrape(url), time.monotonic()
        await asyncio.sleep(args.quiet_s)  # the quiet window: nothing to wait for but time
        q1, tq1 = await scrape(url), time.monotonic()
        print(f"quiet window {tq1 - tq0:.0f} s done; flooding {args.rate:g}/s for "
              f"{args.seconds:g} s", flush=True)  # fmt: skip
        flood_json = out / "flood.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller.tools.bench.flood",
            "--host", host, "--port", str(port), "--root", root,
            "--rate", str(args.rate), "--seconds", str(args.seconds),
            "--lo-kw", str(round(0.3 * max_kw, 1)), "--hi-kw", str(round(0.95 * max_kw, 1)),
            "--ack-wait-s", str(args.ack_wait_s), "--out", str(flood_json),
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        f0, tf0 = q1, tq1
        # Two flood windows: while it is offered (its nominal length), and until all is acked.
        done = asyncio.ensure_future(proc.wait())
        await asyncio.wait({done}, timeout=args.seconds)
        f_mid, tf_mid = await scrape(url), time.monotonic()
        await done
        f1, tf1 = await scrape(url), time.monotonic()
        if proc.returncode != 0:
            raise BenchError(f"the flood publisher exited with {proc.returncode}")
        fig = json.loads(await asyncio.to_thread(flood_json.read_text))
        # The last accepted dispatch governs; then one more, once the flood is over.
        governs = None
        if fig["last_accepted_kw"] is not None:
            want = fig["last_accepted_kw"]
            with contextlib.suppress(TimeoutError):
                await site.d.until(lambda: _target_kw(site) == want, 10)
            governs = _target_kw(site) == want
        t = time.monotonic()
        final, _ = await site.d.send_acked("setpoint", round(0.5 * max_kw, 1), ramp_s=0)
        final_ack_s = time.monotonic() - t
        dropped = await broker_dropped(host, port)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    handled_s = fig["acks_done_s"] or (tf1 - tf0)
    load = os.getloadavg()
    return {
        "site": {"config": args.config, "quick": args.quick, "devices": site.n_devices},
        "machine": f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at the end",
        "offered": fig["offered"],
        "offered_per_s": round(fig["offered"] / fig["publish_s"]),
        "acked": fig["acked"],
        "acked_per_s": round(fig["acked"] / handled_s),
        "all_acked_after_s": fig["acks_done_s"],
        "accepted": fig["accepted"],
        "rate_limited": fig["rate_limited"],
        "other": fig["other"],
        "duplicates": fig["duplicates"],
        "missing": fig["missing"],
        "ack_messages": fig["ack_messages"],
        "broker_dropped": dropped,
        "quiet": window(q0, q1, tq1 - tq0) | {"telemetry": arrivals.intervals(tq0, tq1)},
        "flood_offered": window(f0, f_mid, tf_mid - tf0)
        | {"telemetry": arrivals.intervals(tf0, tf_mid)},
        "flood_whole": window(f0, f1, tf1 - tf0) | {"telemetry": arrivals.intervals(tf0, tf1)},
        "last_accepted_governs": governs,
        "after_flood_ack_s": round(final_ack_s, 3),
        "after_flood_accepted": final.accepted,
    }


def _target_kw(site: Site) -> float | None:
    tel = site.d.latest()
    return None if tel is None or tel.target_w is None else round(tel.target_w / 1e3, 3)


def report(r: dict[str, Any]) -> str:
    def win(name: str, w: dict[str, Any]) -> str:
        tel = w["telemetry"]
        return (
            f"  {name:<14} cycles {w['cycles']:>6}  work p50 {w['cycle_p50_ms']:>6.2f} "
            f"p99 {w['cycle_p99_ms']:>6.2f} ms  late p50 {w['late_p50_ms']:>6.2f} "
            f"p99 {w['late_p99_ms']:>6.2f} ms  overruns {w['overruns']}  "
            f"telemetry {tel['messages']} msgs, mean {tel['mean_s']} s max {tel['max_s']} s  "
            f"cpu {w['cpu_pct']}%  rss {w['rss_mib']} MiB  dispatches {w['dispatches_per_s']}/s"
            f" at {w['cpu_us_per_dispatch']} us of daemon CPU each"
        )

    lines = [
        f"site {r['site']['config']}{' (--quick)' if r['site']['quick'] else ''}: "
        f"{r['site']['devices']} devices; {r['machine']}",
        f"offered {r['offered']} dispatches at {r['offered_per_s']}/s; "
        f"acked {r['acked']} ({r['accepted']} accepted, {r['rate_limited']} rate_limited, "
        f"{r['other']} other) at {r['acked_per_s']}/s, all after {r['all_acked_after_s']} s; "
        f"{r['ack_messages']} ack messages; missing {r['missing']}, duplicates "
        f"{r['duplicates']}; broker dropped {r['broker_dropped']}",
        win("quiet", r["quiet"]),
        win("flood (offer)", r["flood_offered"]),
        win("flood (+drain)", r["flood_whole"]),
        f"last accepted dispatch governs: {r['last_accepted_governs']}; a dispatch after the "
        f"flood: accepted {r['after_flood_accepted']}, acked in {r['after_flood_ack_s']} s",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Flood a simulated site's dispatch topic.")
    p.add_argument("-c", "--config", default=str(DEFAULT_SITE), help="site TOML file")
    p.add_argument("--quick", action="store_true", help="the site's --quick form (fewer devices)")
    p.add_argument("--rate", type=float, default=10_000.0, help="dispatches a second")
    p.add_argument("--seconds", type=float, default=60.0, help="flood length")
    p.add_argument("--quiet-s", type=float, default=20.0, help="quiet window before it")
    p.add_argument("--ack-wait-s", type=float, default=180.0, help="wait for acks after it")
    p.add_argument("--broker-queue", type=int, default=100_000, help="max_queued_messages")
    p.add_argument("--out", type=Path, default=None, help="output directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = (args.out or default_out("flood")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        print("flood bench: needs mosquitto (apt-get install mosquitto)", file=sys.stderr)
        return 2
    source = moved_site(Path(args.config).resolve(), out)
    try:
        result = asyncio.run(run(args, exe, source, out))
    except BenchError as exc:
        print(f"flood bench: {exc}", file=sys.stderr)
        return 2
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(report(result))
    cmd = " ".join(["python bench/flood_bench.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"reproduce: {cmd}  (results in {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
