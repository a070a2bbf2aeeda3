"""The ramp bench: how fast the site reaches a setpoint, against the fleet's physical minimum.

Each scenario is one setpoint dispatch (ramp_s 0) after the site has settled on the previous
one: full flexible range down and up, half range down and up, steps inside the fast reserve,
and seeded random steps (`--quick`: a small site, no full-range pair, one random step). Per
step, from the unix time just before the dispatch is published until the simulator's ground
truth enters and stays within +-tolerance_kw(target, site max): settle time, overshoot,
integral of absolute error, the physical minimum (asked from the simulator right before
publishing) and settle / physical minimum.

    rampd bench ramp [-c configs/bench-site.toml] [--out DIR] [--quick] [--seed N]
                     [--random-steps 20] [--mqtt HOST:PORT]

Writes OUT/results.json, OUT/<scenario>/{run.json,truth.jsonl,telemetry.jsonl,report.png}
(`rampd report OUT/<scenario>` redraws one) and OUT/run.json for the whole run. Exits 0 even
when verdicts fail: it is a bench, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import aiomqtt

from controller.ramp_score import score_series
from controller.tools.bench import add_ramp_arguments
from controller.tools.bench.site_run import (
    BenchError,
    Site,
    ack_of,
    config_summary,
    default_out,
    fresh_telemetry,
    start_site,
    write_telemetry_slice,
    write_truth_slice,
)
from controller.tools.report import ReportError, RunDispatch, RunSpec, report_from_run, write_run
from controller.tools.truth import tolerance_kw
from controller.wire.timestamps import rfc3339

DESCRIPTION: Final = (
    "Ramp bench: setpoint steps on a simulated site, settle time against the physical minimum."
)
RATIO_OK: Final = 1.2
RESERVE_SETTLE_S: Final = 5.0
HOLD_S: Final = 5.0
"""A step is over once the truth has stayed in the band this long."""
QUICK_HOLD_S: Final = 3.0
PRE_S: Final = 3.0
"""Seconds of truth before each dispatch kept in its run directory."""
MIN_APART: Final = 0.05
"""Random steps land at least this fraction of the range away from the current level."""


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    kind: str  # "full", "half", "reserve" or "random"
    target_kw: float


@dataclass(slots=True)
class StepResult:
    name: str
    kind: str
    target_kw: float
    tol_kw: float
    t0: float
    t_end: float
    from_kw: float | None
    step_kw: float | None
    accepted: bool | None
    reason: str | None
    settle_s: float | None
    physical_min_s: float | None
    ratio: float | None
    overshoot_kw: float
    iae_kws: float
    verdict: str
    within: bool
    dispatch_id: str
    sim: dict[str, Any]
    """The simulator's answer to /physical_min right before the dispatch."""
    run_dir: str = ""


def plan(
    level: float,
    lo: float,
    hi: float,
    *,
    reserve_up_kw: float,
    reserve_down_kw: float,
    n_random: int,
    seed: int,
    quick: bool = False,
) -> list[Scenario]:
    """The scenarios in order; each starts where the previous one's target left the site.
    `quick` leaves out the full-range pair (the slowest: miners' profile ramps)."""
    span = hi - lo
    out: list[Scenario] = []

    def add(name: str, kind: str, target: float) -> None:
        nonlocal level
        level = round(min(hi, max(lo, target)), 1)
        out.append(Scenario(name, kind, level))

    if not quick:
        add("full range down", "full", lo)
        add("full range up", "full", hi)
    add("half range down", "half", hi - 0.5 * span)
    add("reserve up", "reserve", level + 0.8 * reserve_up_kw)
    add("reserve down", "reserve", level - 0.8 * reserve_down_kw)
    add("half range up", "half", level + 0.5 * span)
    rng = random.Random(seed)
    width = len(str(n_random))
    for k in range(n_random):
        target = rng.uniform(lo, hi)
        for _ in range(1000):
            if abs(target - level) >= MIN_APART * span:
                break
            target = rng.uniform(lo, hi)
        add(f"random {k + 1:0{width}d}", "random", target)
    return out


def window_cap_s(physical_min_s: float | None, fallback_s: float) -> float:
    """How long a step may take before it counts as not settled: wakes of sleeping miners
    take minutes, so the cap grows with the physical minimum."""
    if physical_min_s is None:
        return fallback_s
    return max(60.0, 1.5 * physical_min_s + 30.0)


def verdict(
    kind: str, settle_s: float | None, ratio: float | None, reachable: bool
) -> tuple[str, bool]:
    """The verdict text and whether the step counts as within RATIO_OK of the physics."""
    if settle_s is None:
        return ("NOT SETTLED" if reachable else "unreachable (sim)"), False
    if kind == "reserve" and settle_s > RESERVE_SETTLE_S:
        return f"slow (> {RESERVE_SETTLE_S:g} s)", False
    if ratio is None:
        return "no phys min", False
    if ratio > RATIO_OK:
        return f"slow (> {RATIO_OK:g}x)", False
    return "ok", True


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


async def run_step(
    site: Site, sc: Scenario, *, hold_s: float, fallback_cap_s: float, cap_s: float | None
) -> StepResult:
    """Publish one setpoint and follow the truth until settled and held, or the cap."""
    tol = tolerance_kw(sc.target_kw, site.site_max_kw)
    phys, sim = await site.physical_min(sc.target_kw, tol)
    cap = cap_s if cap_s is not None else window_cap_s(phys, fallback_cap_s)
    sent = await site.d.send("setpoint", sc.target_kw)
    ack = await ack_of(site.d, sent)
    t0 = sent.t
    if ack is not None and not ack.accepted:
        await asyncio.sleep(hold_s)  # rejected: nothing moves, nothing to wait for
        site.truth.poll()
        t_end = time.time()
    else:
        t_end = await site.settle(sc.target_kw, tol, t0=t0, hold_s=hold_s, cap_s=cap)
    t, kw = site.truth.arrays()
    f = score_series(t, kw * 1e3, t0=t0, t_end=t_end, target_w=sc.target_kw * 1e3, tol_w=tol * 1e3)
    ratio = f.settle_s / phys if f.settle_s is not None and phys else None
    # The simulator answered but found the band out of reach (within an hour).
    reachable = not (sim and phys is None)
    text, ok = verdict(sc.kind, f.settle_s, ratio, reachable)
    start = None if f.from_w is None else f.from_w / 1e3
    return StepResult(
        name=sc.name,
        kind=sc.kind,
        target_kw=sc.target_kw,
        tol_kw=round(tol, 3),
        t0=t0,
        t_end=t_end,
        from_kw=None if start is None else round(start, 1),
        step_kw=None if start is None else round(sc.target_kw - start, 1),
        accepted=None if ack is None else ack.accepted,
        reason=None if ack is None else ack.reason,
        settle_s=None if f.settle_s is None else round(f.settle_s, 3),
        physical_min_s=phys,
        ratio=None if ratio is None else round(ratio, 3),
        overshoot_kw=round(f.overshoot_w / 1e3, 1),
        iae_kws=round(f.iae_j / 1e3, 1),
        verdict=text if ack is None or ack.accepted else "REJECTED",
        within=ok and ack is not None and ack.accepted,
        dispatch_id=sent.dispatch.id,
        sim=sim,
    )


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else f"{x:{spec}}"


def table(results: list[StepResult]) -> str:
    head = (
        f"{'scenario':<18} {'target kW':>10} {'step kW':>9} {'settle s':>9} {'phys min s':>10} "
        f"{'ratio':>6} {'overshoot kW':>12} {'IAE kW*s':>10}  verdict"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        settle = "never" if r.settle_s is None else f"{r.settle_s:.2f}"
        rows.append(
            f"{r.name[:18]:<18} {r.target_kw:>10.1f} {_fmt(r.step_kw, '+.1f'):>9} {settle:>9} "
            f"{_fmt(r.physical_min_s):>10} {_fmt(r.ratio):>6} {r.overshoot_kw:>12.1f} "
            f"{r.iae_kws:>10.1f}  {r.verdict}"
        )
    return "\n".join(rows)


def summary_line(results: list[StepResult]) -> str:
    ok = sum(r.within for r in results)
    line = f"{ok}/{len(results)} scenarios within {RATIO_OK:g}x"
    notes = []
    if missing := sum(not r.sim for r in results):
        notes.append(f"{missing} without a physical minimum: the simulator did not answer")
    if beyond := sum(bool(r.sim) and r.physical_min_s is None for r in results):
        notes.append(f"{beyond} out of the fleet's physical reach")
    return f"{line} ({'; '.join(notes)})" if notes else line


def command_line(args: argparse.Namespace) -> str:
    parts = ["rampd", "bench", "ramp", "-c", str(args.config), "--seed", str(args.seed)]
    parts += ["--random-steps", str(args.random_steps)]
    if args.quick:
        parts.append("--quick")
    if args.step_cap_s is not None:
        parts += ["--step-cap-s", f"{args.step_cap_s:g}"]
    return shlex.join(parts)


async def run_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    source = Path(args.config)
    hold = QUICK_HOLD_S if args.quick else HOLD_S
    fallback_cap = 90.0 if args.quick else 300.0
    started = time.time()
    print(f"rampd bench ramp: {source}{' (quick)' if args.quick else ''} -> {out}")
    results: list[StepResult] = []
    async with start_site(source, out, quick=args.quick, mqtt=args.mqtt, seed=args.seed) as site:
        print(f"  {site.n_devices} devices ON; waiting for the site to rest ...")
        tol0 = tolerance_kw(site.site_max_kw, site.site_max_kw)
        level = await site.steady(tol0, hold_s=hold, within=60.0)
        tel = await fresh_telemetry(site.d)
        limits = site.cfg.site.site
        # At rest the daemon holds its initial target (the site maximum): every device is
        # at its own maximum, so the level at rest is the most the site can draw. The
        # telemetry's max_kw also counts GPU racks' caps above what their jobs draw.
        lo = max(limits.min_kw, (tel.min_w or 0.0) / 1e3)
        hi = min(limits.max_kw, (tel.max_w or 0.0) / 1e3, round(level, 1))
        up5_w, down5_w = tel.capability.within(5.0) if tel.capability else (None, None)
        up5, down5 = (up5_w or 0.0) / 1e3, (down5_w or 0.0) / 1e3
        reserve = site.cfg.site.reserve
        r_up = reserve.up_kw_5s or up5
        r_down = reserve.down_kw_5s or down5
        scenarios = plan(
            level,
            lo,
            hi,
            reserve_up_kw=r_up,
            reserve_down_kw=r_down,
            n_random=args.random_steps,
            seed=args.seed,
            quick=args.quick,
        )
        print(
            f"  at rest {level:.0f} kW; flexible range {lo:.0f}..{hi:.0f} kW (telemetry "
            f"min_kw {(tel.min_w or 0.0) / 1e3:.0f}, max_kw {(tel.max_w or 0.0) / 1e3:.0f}); "
            "reserve "
            f"steps +-0.8 x {r_up:.0f}/{r_down:.0f} kW; {len(scenarios)} scenarios"
        )
        fleet: dict[str, Any] = {"rest_kw": round(level, 1), "min_kw": lo, "max_kw": hi}
        fleet |= {"up_kw_5s": up5, "down_kw_5s": down5, "telemetry_at_rest": tel.to_wire()}
        for sc in scenarios:
            r = await run_step(
                site, sc, hold_s=hold, fallback_cap_s=fallback_cap, cap_s=args.step_cap_s
            )
            results.append(r)
            settle = "never" if r.settle_s is None else f"{r.settle_s:.2f} s"
            print(
                f"  {r.name:<18} -> {r.target_kw:9.1f} kW: settle {settle:>9}, "
                f"phys min {_fmt(r.physical_min_s)} s, {r.verdict}"
            )
        site.truth.poll()
        summary = config_summary(site, source, args.quick)
        for r in results:
            run_dir = out / slug(r.name)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_truth_slice(site, run_dir / "truth.jsonl", r.t0 - PRE_S, r.t_end)
            write_telemetry_slice(site, run_dir / "telemetry.jsonl", r.t0 - PRE_S, r.t_end)
            write_run(run_dir, _spec(r, site.site_max_kw, t_start=r.t0 - PRE_S, t_end=r.t_end))
            r.run_dir = str(run_dir)
        write_run(
            out,
            RunSpec(
                name=f"ramp bench, site {site.cfg.site.site_id}",
                site_max_kw=site.site_max_kw,
                dispatches=tuple(_dispatch(r) for r in results),
                telemetry="telemetry.jsonl",
                t_start=results[0].t0 - PRE_S if results else None,
            ),
        )
    # The processes are down: plotting does not compete with the site for the CPU.
    plots = await asyncio.to_thread(_plot_all, [Path(r.run_dir) for r in results])
    lines = summary_line(results)
    body = {
        "format": "rampd-bench-ramp/1",
        "command": command_line(args),
        "started_at": rfc3339(started),
        "finished_at": rfc3339(time.time()),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "seed": args.seed,
        "config": summary,
        "fleet": fleet,
        "criteria": {
            "tolerance": "max(2% of target, 0.5% of site max)",
            "ratio_ok": RATIO_OK,
            "reserve_settle_s": RESERVE_SETTLE_S,
            "hold_s": hold,
        },
        "scenarios": [asdict(r) for r in results],
        "plots": plots,
        "summary": {"within": sum(r.within for r in results), "total": len(results), "text": lines},
    }
    (out / "results.json").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    print()
    print(table(results))
    print()
    print(lines)
    print(f"results: {out / 'results.json'}; plots: {out}/<scenario>/report.png")
    print(f"reproduce: {command_line(args)}")
    return 0


def _dispatch(r: StepResult) -> RunDispatch:
    return RunDispatch(
        t=r.t0,
        target_kw=r.target_kw,
        mode="setpoint",
        id=r.dispatch_id,
        label=r.name,
        t_end=r.t_end,
        physical_min_s=r.physical_min_s,
    )


def _spec(r: StepResult, site_max_kw: float, *, t_start: float, t_end: float) -> RunSpec:
    return RunSpec(
        name=f"ramp bench: {r.name}",
        site_max_kw=site_max_kw,
        dispatches=(_dispatch(r),),
        telemetry="telemetry.jsonl",
        t_start=t_start,
        t_end=t_end,
    )


def _plot_all(run_dirs: list[Path]) -> list[str]:
    out = []
    for run_dir in run_dirs:
        try:
            report_from_run(run_dir)
            out.append(str(run_dir / "report.png"))
        except ReportError as exc:
            print(f"  no plot for {run_dir}: {exc}")
    return out


def run_cli(args: argparse.Namespace) -> int:
    if args.random_steps is None:
        args.random_steps = 1 if args.quick else 20
    if args.random_steps < 0:
        print("rampd bench ramp: --random-steps must not be negative", file=sys.stderr)
        return 2
    args.out = args.out or str(default_out("ramp"))
    try:
        return asyncio.run(run_bench(args))
    except (BenchError, aiomqtt.MqttError) as exc:
        print(f"rampd bench ramp: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ramp_bench", description=DESCRIPTION)
    add_ramp_arguments(p)
    return run_cli(p.parse_args(argv))
