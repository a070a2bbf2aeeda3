"""The tools' command lines, registered on `rampd`'s parser without importing the tools."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from controller.journal import default_journal_path
from controller.tools.bench import add_parser as add_bench_parser

__all__ = ["add_backtest_parser", "add_bench_parser", "add_demo_parser", "add_report_parser"]

DEFAULT_SIM_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sim-site.toml"


def _run_report(args: argparse.Namespace) -> int:
    from controller.tools.report import run_cli

    return run_cli(args)


def _run_demo(args: argparse.Namespace) -> int:
    import asyncio

    from controller.tools.demo import run_demo

    return asyncio.run(
        run_demo(
            Path(args.config),
            mqtt=args.mqtt,
            regulation_s=args.regulation_s,
            hold_s=args.hold_s,
        )
    )


def add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="broker + simulated site + daemon, and a dispatch script")
    demo.add_argument("-c", "--config", default=str(DEFAULT_SIM_CONFIG), help="site TOML file")
    demo.add_argument("--mqtt", help="use this broker HOST:PORT instead of finding or starting one")
    demo.add_argument("--hold-s", type=float, default=15.0, help="seconds per setpoint step")
    demo.add_argument("--regulation-s", type=float, default=60.0, help="seconds of regulation")
    demo.set_defaults(func=_run_demo)


def add_report_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `rampd report` on the CLI's subparsers."""
    p = sub.add_parser(
        "report",
        help="print and plot a journal window, or plot a bench run directory",
        description="Journal: every dispatch, ack, ramp and event in [--from, --to], one line "
        "each, and a PNG of target, measured power and capability. A bench run directory "
        "(with run.json): the ground truth against the dispatches, with each step's figures.",
    )
    # `--from -1h` must read as a value, not an option: argparse takes a leading '-' value
    # only when it looks like a negative number, so teach it that relative times are numbers.
    p._negative_number_matcher = re.compile(r"^-(\d+(\.\d+)?[smhdw]?)+$|^-\d*\.\d+$")
    p.add_argument("source", nargs="?", help="a bench run directory, or a journal file")
    p.add_argument(
        "--journal", help=f"journal file (default {default_journal_path()}, $STATE_DIRECTORY)"
    )
    p.add_argument(
        "--from",
        dest="t_from",
        default="-1h",
        help="start: RFC3339, -1h, -30m, -2d ... (default -1h)",
    )
    p.add_argument("--to", dest="t_to", default="now", help="end: RFC3339, -10m, now (default)")
    p.add_argument("-o", "--out", help="PNG path (default RUN_DIR/report.png or ./rampd-*.png)")
    p.add_argument("--no-plot", action="store_true", help="text only")
    p.add_argument(
        "--events",
        action="store_true",
        help="curtailment events (M&V) of the window instead: one line each, and a PNG each "
        "into --out DIR (default ./rampd-events/)",
    )
    p.set_defaults(func=_run_report)


def _run_backtest(args: argparse.Namespace) -> int:
    from controller.tools.backtest import run_cli

    return run_cli(args)


def add_backtest_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `rampd backtest` on the CLI's subparsers."""
    p = sub.add_parser(
        "backtest",
        help="run the price rule over a price series for a site's fleet",
        description="The daemon's price rule over a CSV of prices (interval_start_utc,"
        "price_usd_per_mwh), fleet model only: energy used and curtailed, hours curtailed per "
        "class, energy cost, revenue and net against running flat out; a PNG, or --json.",
    )
    p.add_argument(
        "--prices", required=True, help="price CSV (interval_start_utc,price_usd_per_mwh)"
    )
    p.add_argument("--site", required=True, help="site TOML file (its fleet, [price_rule])")
    p.add_argument(
        "--hashprice", type=float, help="USD per PH/s per day (default: the site's [economics])"
    )
    p.add_argument("--pool-fee", type=float, help="0..1 (default: the site's, else 0)")
    p.add_argument("--interval-s", type=float, help="CSV interval (default: [prices] interval_s)")
    p.add_argument("--stop-after", type=int, help="override [price_rule] stop_after")
    p.add_argument("--resume-after", type=int, help="override [price_rule] resume_after")
    p.add_argument(
        "--high-strike",
        dest="high_strike_usd_per_mwh",
        type=float,
        help="override [price_rule] high_strike_usd_per_mwh",
    )
    p.add_argument("--min-stopped-s", type=float, help="override [price_rule] min_stopped_s")
    p.add_argument(
        "--stagger-s",
        dest="resume_stagger_s",
        type=float,
        help="override [price_rule] resume_stagger_s",
    )
    p.add_argument(
        "--other-kw", type=float, default=0.0, help="load the rule never moves (kW, default 0)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (no plot)")
    p.add_argument("--plot", help="PNG path (default ./rampd-backtest.png; with --json: none)")
    p.add_argument("--no-plot", action="store_true", help="text only")
    p.set_defaults(func=_run_backtest)
