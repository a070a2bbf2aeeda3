"""`rampd run | sim | check-config` and the tools: `demo | report | bench`.

The tools register their arguments here but are imported only when they run, so `rampd run`
loads none of them (nor matplotlib or amqtt).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import sys
from collections import defaultdict
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from controller.config import (
    ConfigError,
    LoadedConfig,
    load_config,
    poll_demand,
    split_host_port,
    template_dirs,
)
from controller.fdlimit import raise_fd_limit
from controller.journal import JournalError
from controller.market.economics import merit_order
from controller.tools import TOOL_MODULES
from controller.tools.commands import (
    DEFAULT_SIM_CONFIG,
    add_backtest_parser,
    add_bench_parser,
    add_demo_parser,
    add_report_parser,
)

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop where installed: a site's thousands of one-command TCP
    exchanges (LuxOS) cost several times less CPU there, and a fleet-wide command goes out
    that much sooner. RAMPD_LOOP=asyncio keeps the standard loop."""
    factory = None
    if os.environ.get("RAMPD_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # Library chatter (reconnect noise per attempt) is not an event of ours.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def _load(path: str) -> LoadedConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"rampd: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def summarize(cfg: LoadedConfig) -> str:
    """One screen: devices by kind with their power range, the meter, broker and limits."""
    site = cfg.site
    groups: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for d in cfg.devices:
        g = groups[(d.kind, d.protocol)]
        g[0] += 1
        g[1] += d.p_min_w
        g[2] += d.p_max_w
    lines = [
        f"{cfg.path}: OK",
        f"site {site.site_id!r}: cycle {site.cycle_s * 1e3:.0f} ms, "
        f"target range {site.site.min_kw:g}..{site.site.max_kw:g} kW, "
        f"deadband {site.site.deadband_kw:g} kW",
        f"mqtt {site.mqtt.host}:{site.mqtt.port} topics {cfg.topic_root}/"
        f"{{dispatch,heartbeat,ack,telemetry,status}}"
        f"{' (TLS)' if site.mqtt.tls else ''}",
        (
            f"meter {site.meter.protocol} {site.meter.host}:{site.meter.port} "
            f"unit {site.meter.unit}, every {site.meter.poll_s:g} s"
            if site.meter.protocol != "none"
            else "meter none: power is what the devices (zones) report"
        ),
        f"failsafe after {site.failsafe.dispatch_timeout_s:g} s silence: {site.failsafe.policy}",
        _polls_line(cfg),
        f"metrics http://{site.metrics.listen}/metrics",
        "",
        f"{'kind':<20} {'protocol':<10} {'count':>7} {'min kW':>12} {'max kW':>12}",
    ]
    total = [0, 0.0, 0.0]
    for (kind, protocol), (count, lo, hi) in sorted(groups.items()):
        lines.append(f"{kind:<20} {protocol:<10} {count:>7} {lo / 1e3:>12.1f} {hi / 1e3:>12.1f}")
        total = [total[0] + count, total[1] + lo, total[2] + hi]
    lines.append(f"{'total':<31} {total[0]:>7} {total[1] / 1e3:>12.1f} {total[2] / 1e3:>12.1f}")
    return "\n".join(lines + _economics_lines(cfg))


def _economics_lines(cfg: LoadedConfig) -> list[str]:
    """Each class's price strike (breakeven, or work value), least efficient first."""
    econ = cfg.economics
    classes = merit_order(cfg.device_classes(), econ)
    priced = [c for c in classes if math.isfinite(c.strike_usd_per_mwh(econ))]
    if not priced:
        return []
    head = (
        "economics: no [economics]: miners have no breakeven"
        if econ is None
        else f"economics: hashprice {econ.hashprice_usd_per_ph_day:g} USD/PH/day, "
        f"pool fee {econ.pool_fee:.1%}"
    )
    lines = ["", head, f"{'class (curtailed first)':<26} {'strike USD/MWh':>15}  from"]
    for c in priced:
        src = (
            f"work value {c.value_usd_per_mwh:g} USD/MWh"
            if c.value_usd_per_mwh is not None
            else f"breakeven at {c.efficiency_j_per_th:g} J/TH"
        )
        lines.append(f"{c.kind:<26} {c.strike_usd_per_mwh(econ):>15.2f}  {src}")
    return lines


def _polls_line(cfg: LoadedConfig) -> str:
    budget = cfg.site.site.max_polls_per_s
    line = f"device polls {poll_demand(cfg.devices):.0f}/s of at most {budget:g}/s"
    if cfg.poll_stretch > 1.0:
        line += f": every poll period stretched {cfg.poll_stretch:.2f}x"
    return line


def _cmd_check_config(args: argparse.Namespace) -> int:
    print(summarize(_load(args.config)))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from controller.app import Overrides, run_daemon

    cfg = _load(args.config)
    raise_fd_limit(logging.getLogger("rampd"))
    try:
        run_loop(run_daemon(cfg, Overrides(mqtt=args.mqtt, metrics_listen=args.metrics_listen)))
    except (JournalError, ConfigError) as exc:
        print(f"rampd: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from drivers.sim.site import run_sim

    cfg = _load(args.config)
    control = split_host_port(args.control, default_port=9480) if args.control else None
    truth = Path(args.truth) if args.truth else None
    raise_fd_limit(logging.getLogger("rampd.sim"))  # a listening socket per device
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(run_sim(cfg.sim_site, truth, seed=args.seed, control=control))
    return 0


def _cmd_discover(args: argparse.Namespace) -> int:
    from controller import discovery

    try:
        hosts = discovery.hosts_of(args.cidr)
    except ValueError as exc:
        print(f"rampd discover: {exc}", file=sys.stderr)
        return 2
    found = run_loop(discovery.scan(hosts, concurrency=args.concurrency, timeout_s=args.timeout))
    out = Path(args.write) if args.write else None
    dirs = template_dirs(out if out is not None else Path.cwd() / "site.toml")
    found = discovery.with_templates(found, dirs)
    for f in found:
        tpl = f.template or "no template"
        print(f"# {f.host:<15} {f.firmware:<28} {f.model:<12} {tpl}", file=sys.stderr)
    print(f"# {len(found)} miners among {len(hosts)} addresses", file=sys.stderr)
    if not any(f.template for f in found):
        print("rampd discover: no miner with a template found", file=sys.stderr)
        return 1
    if out is None:
        print(discovery.stanzas(found), end="")
        return 0
    out.write_text(discovery.site_file(found, site_id=args.site_id))
    print(f"# wrote {out}: check it with `rampd check-config {out}`", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rampd", description="Grid-dispatch controller for flexible loads"
    )
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", required=True, help="site TOML file")
    run.add_argument("--mqtt", help="broker HOST:PORT, overrides the config")
    run.add_argument("--metrics-listen", help="HOST:PORT for /metrics, overrides the config")
    run.set_defaults(func=_cmd_run)

    sim = sub.add_parser("sim", help="serve a simulated site for a config")
    sim.add_argument("-c", "--config", default=str(DEFAULT_SIM_CONFIG), help="site TOML file")
    sim.add_argument("--truth", help="append ground truth as JSON lines to this file")
    sim.add_argument("--seed", type=int, default=0, help="random seed of the physics")
    sim.add_argument(
        "--control", help="HOST:PORT of the HTTP endpoint that injects faults (off by default)"
    )
    sim.set_defaults(func=_cmd_sim)

    add_demo_parser(sub)

    check = sub.add_parser("check-config", help="validate a site file and summarize it")
    check.add_argument("config", help="site TOML file")
    check.set_defaults(func=_cmd_check_config)

    disc = sub.add_parser(
        "discover",
        help="find miners on address ranges and write [[devices]] stanzas for them",
    )
    disc.add_argument("cidr", nargs="+", help="address ranges, e.g. 10.1.0.0/22 10.2.0.5")
    disc.add_argument("--write", help="write a whole site file here (default: print stanzas)")
    disc.add_argument("--site-id", default="site", help="site_id of the written file")
    disc.add_argument("--timeout", type=float, default=1.0, help="seconds per exchange (1)")
    disc.add_argument("--concurrency", type=int, default=256, help="hosts at once (256)")
    disc.set_defaults(func=_cmd_discover)

    add_report_parser(sub)
    add_backtest_parser(sub)
    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except ModuleNotFoundError as exc:
        if exc.name not in TOOL_MODULES:
            raise
        print(
            f"rampd {args.command}: needs {exc.name}; "
            "install the tools: pip install 'rampd[tools]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
