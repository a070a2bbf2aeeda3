"""The chaos bench: the PJM score while devices, meter, broker and daemon fail.

    rampd bench chaos [-c configs/bench-site.toml] [--minutes 30] [--seed N] [--out DIR]
                      [--compress K] [--fault-every-s 60,180] [--first-fault-s S]
                      [--kinds device,rack,meter,broker,daemon] [--quick] [--json]

A broker the bench can kill (chaos_procs.py), `rampd sim` and `rampd run` as processes (as for
the regulation bench, site_run.py), and a supervisor playing systemd's `Restart=on-failure`
(RestartSec 1 s; the journal file is kept across restarts). The site is put mid-range and
offered as the regulation bench does (base = there, band = 0.9 x the 5 s capability at rest);
the real RegA signal is then replayed in real time (K times faster with --compress, blocks,
samples and delays K times shorter) as `regulation` dispatches by a dispatcher that re-sends
what goes unanswered (chaos_link.py), while a seeded schedule injects faults (chaos_faults.py).
The score is the PJM performance score of the simulator's ground truth against the signal as
the grid sent it: samples that could not be delivered still count.

Goals (exit 0 when all are met, 1 when one is not, 2 when the run itself fails):

* overall score >= 0.90, and no block below 0.75;
* every dispatch acked: each publish got its ack, except those made during a broker or daemon
  outage (from 3 s before the kill to the first ack after it), and the run ends with its last
  dispatch acked (an unanswered one was re-sent, with a new id and seq, until acked);
* the journal complete: of the replay's whole seconds outside the daemon's down time (from
  each kill to the restarted daemon's first telemetry), at least 90% have a telemetry row
  (read-only, after the run);
* no capability promise broken. The offer promised to move the band's width within 5 s in
  either direction (to the band's edge where that is nearer): from a measured P, up by
  min(band, base + band - P) and down by min(band, P - (base - band)). A block that misses
  (score < 0.75) keeps the promise only if, between 10 s before the block began and its end,
  the dispatcher heard reduced capability: a telemetry message whose 5 s capability up or
  down was short of that from its own measured power by more than the settle band (2% of
  the power or 0.5% of the site maximum), the daemon's status offline (its will included),
  or no telemetry for more than 5 s (the site off the dispatcher's link).
  Otherwise the site said it could, and did not: the promise is broken;
* the daemon never exited on its own (only the bench's kills).

Writes OUT/results.json (everything printed, and the plan), OUT/run.json and OUT/report.png
(`rampd report OUT`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import random
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final, cast

import aiomqtt
import numpy as np

from controller.tools.bench import add_chaos_arguments
from controller.tools.bench.chaos_faults import (
    DEVICE_PROTOCOLS,
    RACK_PROTOCOL,
    FaultKind,
    FaultRecord,
    Injector,
    describe,
    plan_faults,
    run_schedule,
    usable_kinds,
)
from controller.tools.bench.chaos_judge import (
    announcements,
    block_views,
    dispatch_tally,
    down_windows,
    fault_view,
    goals,
    journal_figures,
    outage_windows,
    report_text,
    score_replay,
)
from controller.tools.bench.chaos_link import Link
from controller.tools.bench.chaos_procs import ChaosBroker, DaemonSupervisor
from controller.tools.bench.regulation import (
    REST_HOLD_S,
    capability_at_rest,
    offer_band,
    put_mid,
    replay_plan,
)
from controller.tools.bench.site_run import (
    BenchError,
    Site,
    config_summary,
    default_out,
    start_site,
)
from controller.tools.report import ReportError, RunDispatch, RunSpec, report_from_run, write_run
from controller.wire.timestamps import rfc3339

DESCRIPTION: Final = (
    "Chaos bench: the PJM regulation score while devices, meter, broker and daemon fail."
)
SETTLE_ACKS_S: Final = 60.0
SCHEDULE_GRACE_S: Final = 200.0
"""After the replay, how long the schedule may still take (an outage's recovery)."""


def command_line(args: argparse.Namespace) -> str:
    lo, hi = args.fault_every_s
    parts = ["rampd", "bench", "chaos", "-c", str(args.config), "--seed", str(args.seed)]
    parts += ["--minutes", f"{args.minutes:g}", "--compress", str(args.compress)]
    parts += ["--fault-every-s", f"{lo:g},{hi:g}", "--first-fault-s", f"{args.first_fault_s:g}"]
    parts += ["--kinds", ",".join(args.kinds), "--day", args.day, "--start", args.start]
    if args.signal:
        parts += ["--signal", str(args.signal)]
    if args.quick:
        parts.append("--quick")
    return shlex.join(parts)


def _names(site: Site) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in site.cfg.devices:
        out.setdefault(d.protocol, []).append(d.name)
    return out


def _check(site: Site, supervisor: DaemonSupervisor, sched: asyncio.Task[Any]) -> None:
    """A dead simulator, a failed supervisor or a failed schedule ends the run."""
    if site.sim.returncode is not None:
        raise BenchError(f"rampd sim exited with {site.sim.returncode} (see {site.out}/sim.log)")
    supervisor.check()
    if sched.done() and not sched.cancelled() and sched.exception() is not None:
        sched.result()


async def _replay(
    site: Site,
    link: Link,
    supervisor: DaemonSupervisor,
    sched: asyncio.Task[Any],
    sig_wall_s: np.ndarray[Any, np.dtype[np.float64]],
    sig: np.ndarray[Any, np.dtype[np.float64]],
    t0: float,
    say: Callable[[str], None],
) -> None:
    next_note = 60.0
    for i, (ts, s) in enumerate(zip(sig_wall_s, sig, strict=True)):
        await asyncio.sleep(max(0.0, t0 + float(ts) - time.time()))
        _check(site, supervisor, sched)
        if i % 16 == 0:
            site.truth.poll()
        await link.tick(i, float(s))
        if ts >= next_note:
            sent = sum(not a.failed for a in link.attempts)
            say(f"  {ts / 60:.0f} min replayed: {sent} dispatches, {link.held} samples held back")
            next_note += 60.0


async def run_bench(args: argparse.Namespace) -> tuple[int, str]:
    """Run, judge, write OUT; (exit code, what to print on stdout)."""
    out = Path(args.out)
    source = Path(args.config)
    replay = replay_plan(args)
    k, block_s, n_blocks, wall_s = replay.k, replay.block_s, replay.n_blocks, replay.wall_s
    sample_s, max_delay_s = replay.sample_s, replay.max_delay_s
    signal_path, sig_t, sig = replay.signal_path, replay.sig_t, replay.sig
    sig_wall_s = sig_t / k
    main = asyncio.current_task()
    if main is not None:  # SIGTERM stops every process the bench started, as Ctrl-C does
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    started = time.time()
    say(
        f"rampd bench chaos: {source}{' (quick)' if args.quick else ''} -> {out}; seed "
        f"{args.seed}; {wall_s / 60:g} min of {signal_path.name} {args.day} from {args.start} "
        f"(x{k}), {n_blocks} blocks of {block_s:g} s"
    )
    async with (
        ChaosBroker(out) as broker,
        start_site(
            source, out, quick=args.quick, mqtt=f"{broker.host}:{broker.port}", seed=args.seed
        ) as site,
    ):
        say(f"  {site.n_devices} devices ON")
        base, lo, hi = await put_mid(site, REST_HOLD_S)
        rest = await capability_at_rest(site)
        band = offer_band(site, base, lo, hi, rest)
        say(f"  offer: base {base:.1f} kW, band +-{band:.1f} kW")
        names = _names(site)
        protocols = [p for p in DEVICE_PROTOCOLS if p in names]
        kinds, dropped = usable_kinds(args.kinds, protocols, len(names.get(RACK_PROTOCOL, [])))
        for why in dropped:
            say(f"  no {why} faults")
        plan = plan_faults(
            random.Random(args.seed),
            run_s=wall_s,
            first_s=args.first_fault_s,
            every_s=args.fault_every_s,
            kinds=kinds,
            protocols=protocols,
        )
        say(f"  plan: {'; '.join(f'{p.at_s:.0f} s {describe(p)}' for p in plan) or 'no faults'}")
        summary = config_summary(site, source, args.quick)
        supervisor = DaemonSupervisor(site)
        supervisor.start()
        with (out / "telemetry.jsonl").open("a", buffering=1, encoding="utf-8") as tel_log:
            link = Link(site, base, band, tel_log)
            link.start()
            inj = Injector(f"http://127.0.0.1:{site.control_port}", names, broker, supervisor)
            t0 = time.time() + 0.5
            sched = asyncio.create_task(
                run_schedule(
                    plan,
                    inj,
                    t0=t0,
                    t_end=t0 + wall_s,
                    telemetry_after=link.telemetry_after,
                    say=say,
                )
            )
            try:
                await _replay(site, link, supervisor, sched, sig_wall_s, sig, t0, say)
                async with asyncio.timeout(SCHEDULE_GRACE_S):
                    records: list[FaultRecord] = await sched
                if not await link.settle(SETTLE_ACKS_S):
                    say(f"  the last dispatch was not acked within {SETTLE_ACKS_S:.0f} s")
                while not site.truth.t or site.truth.t[-1] < t0 + wall_s + 0.5:
                    if time.time() > t0 + wall_s + 30.0:
                        raise BenchError("the simulator's truth log stopped")
                    await asyncio.sleep(0.2)
                    site.truth.poll()
            finally:
                sched.cancel()
                with contextlib.suppress(asyncio.CancelledError, BenchError):
                    await sched
                try:
                    await inj.clear_all()
                except BenchError as exc:
                    say(f"  faults not cleared: {exc}")
                finally:
                    await link.close()
                    await supervisor.close()
    t_end = t0 + wall_s

    truth_t, truth_kw = site.truth.arrays()
    score = score_replay(
        t0,
        sig_wall_s,
        sig,
        truth_t,
        truth_kw,
        base_kw=base,
        band_kw=band,
        sample_s=sample_s,
        block_s=block_s,
        max_delay_s=max_delay_s,
        n_samples=round(wall_s / sample_s),
    )
    said = announcements(link.telemetry, link.status, base, band, site.site_max_kw)
    blocks = block_views(score, t0, block_s, records, said)
    faults = [fault_view(r, link.telemetry, t0) for r in records]
    tally = dispatch_tally(link.attempts, outage_windows(records, link.attempts))
    journal = journal_figures(out / "journal.sqlite", t0, t_end, down_windows(records))
    verdicts = goals(score, blocks, tally, journal, len(supervisor.unplanned))
    plot = await _plot(out, site, link, t0, t_end, score.score, base, band, k)
    body = {
        "format": "rampd-bench-chaos/1",
        "command": command_line(args),
        "started_at": rfc3339(started),
        "finished_at": rfc3339(time.time()),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "config": summary,
        "signal": {"file": str(signal_path), "day": args.day, "start": args.start, "compress": k},
        "offer": {"base_kw": base, "band_kw": band, "range_kw": [lo, hi], "at_rest": rest},
        "scoring": {"sample_s": sample_s, "block_s": block_s, "max_delay_s": max_delay_s},
        "schedule": {
            "seed": args.seed,
            "first_fault_s": args.first_fault_s,
            "fault_every_s": list(args.fault_every_s),
            "kinds": kinds,
            "dropped": dropped,
            "plan": [asdict(p) for p in plan],
        },
        "faults": faults,
        "daemon_exits": [
            {
                **asdict(e),
                "at": round(e.at - t0, 1),
                "restarted_at": None if e.restarted_at is None else round(e.restarted_at - t0, 1),
            }
            for e in supervisor.exits
        ],
        "bench_reconnects": link.reconnects,
        "dispatches": {**tally, "held_back_samples": link.held},
        "journal": journal,
        "blocks": [
            {
                **asdict(b),
                "faults": v.faults,
                "promise": v.promise,
                "announced": v.announced,
                "announcements": v.announcements,
            }
            for b, v in zip(score.blocks, blocks, strict=True)
        ],
        "overall": asdict(score) | {"blocks": None},
        "goals": verdicts,
        "passed": all(verdicts.values()),
        "plot": plot,
    }
    (out / "results.json").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    if args.json:
        return (0 if body["passed"] else 1), json.dumps(body)
    text = report_text(score, blocks, faults, tally, journal, verdicts, block_s)
    return (0 if body["passed"] else 1), (
        f"\n{text}\nresults: {out / 'results.json'}; plot: {plot}\nreproduce: {command_line(args)}"
    )


async def _plot(
    out: Path,
    site: Site,
    link: Link,
    t0: float,
    t_end: float,
    score: float,
    base: float,
    band: float,
    k: int,
) -> str | None:
    spec = RunSpec(
        name=f"chaos bench, site {site.cfg.site.site_id}: PJM score {score:.3f}; base "
        f"{base:.0f} kW band +-{band:.0f} kW, x{k}",
        site_max_kw=site.site_max_kw,
        dispatches=tuple(
            RunDispatch(
                t=a.t, target_kw=round(base + a.signal * band, 1), mode="regulation", id=a.id
            )
            for a in link.attempts
            if not a.failed
        ),
        telemetry="telemetry.jsonl",
        t_start=t0 - 10.0 / k,
        t_end=t_end,
    )
    write_run(out, spec)
    try:
        await asyncio.to_thread(report_from_run, out)
    except ReportError as exc:
        print(f"  no plot: {exc}", file=sys.stderr)
        return None
    return str(out / "report.png")


def say(text: str) -> None:
    """Progress, as it happens (on stderr with --json: run_cli redirects stdout)."""
    print(text, flush=True)


def run_cli(args: argparse.Namespace) -> int:
    lo, hi = args.fault_every_s
    if args.compress < 1 or args.minutes <= 0 or not 0 < lo <= hi:
        print(
            "rampd bench chaos: need --compress >= 1, --minutes > 0 and "
            "--fault-every-s 0 < MIN <= MAX",
            file=sys.stderr,
        )
        return 2
    if args.first_fault_s is None:
        args.first_fault_s = lo
    args.kinds = cast(list[FaultKind], args.kinds)
    args.out = args.out or str(default_out("chaos"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stdout = sys.stdout
    try:
        # --json: stdout holds the one JSON object; progress (ours and the site's) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            code, text = asyncio.run(run_bench(args))
        print(text, file=stdout, flush=True)
        return code
    except (BenchError, aiomqtt.MqttError) as exc:
        print(f"rampd bench chaos: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("rampd bench chaos: interrupted", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chaos_bench", description=DESCRIPTION)
    add_chaos_arguments(p)
    return run_cli(p.parse_args(argv))
