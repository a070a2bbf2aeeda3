"""Benchmarks on a simulated site run as separate processes: `rampd bench ramp | regulation |
fanout | frequency | chaos`.

They print their figures and the command that reproduces them; timing is never a test. The
arguments live here so the CLI can list them without importing the benches themselves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = REPO / "configs" / "bench-site.toml"


def _common(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("-c", "--config", default=str(DEFAULT_CONFIG), help="site TOML file")
    p.add_argument("--out", help=f"output directory (default bench-runs/<timestamp>-{kind})")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small site from the same templates (10 loads, 100 miners, 4 racks), short run",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--mqtt", help="use the broker at HOST:PORT instead of starting one")


def add_ramp_arguments(p: argparse.ArgumentParser) -> None:
    _common(p, "ramp")
    p.add_argument(
        "--random-steps",
        type=int,
        help="seeded random steps after the fixed scenarios (default 20; --quick 1)",
    )
    p.add_argument(
        "--step-cap-s",
        type=float,
        help="end every step after this many seconds (default: from the physical minimum)",
    )


def add_regulation_arguments(p: argparse.ArgumentParser) -> None:
    _common(p, "regulation")
    p.add_argument(
        "--compress",
        type=int,
        help="replay the signal K times faster and score K times shorter samples, blocks and "
        "delays (default 1; --quick 5)",
    )
    p.add_argument(
        "--minutes", type=float, help="wall-clock minutes of replay (default 10; --quick 2)"
    )
    p.add_argument("--day", default="8/1/2017", help="signal column (a day of the CSV)")
    p.add_argument(
        "--start",
        default="22:00:00",
        help="time of day to start the signal at (default 22:00:00: both directions within "
        "10 min; on 8/1/2017 the signal sits at -1 from 16:00 to 16:10)",
    )
    p.add_argument("--signal", help="PJM regulation CSV (default bench/data/pjm_rega_*)")


FANOUT_PROTOCOLS = ("luxos", "braiins", "whatsminer", "antminer", "modbus", "redfish")
FANOUT_SIZES = (1000, 5000, 10000)


def _sizes(text: str) -> list[int]:
    sizes = [int(x) for x in text.split(",") if x.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("comma-separated positive device counts")
    return sizes


def _protocols(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in FANOUT_PROTOCOLS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(FANOUT_PROTOCOLS)}")
    return names


def add_fanout_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output directory (default bench-runs/<timestamp>-fanout)")
    p.add_argument(
        "--sizes", type=_sizes, default=list(FANOUT_SIZES), help="device counts (1000,5000,10000)"
    )
    p.add_argument(
        "--protocols",
        type=_protocols,
        default=list(FANOUT_PROTOCOLS),
        help=",".join(FANOUT_PROTOCOLS),
    )
    p.add_argument("--bursts", type=int, default=3, help="timed bursts after the first (3)")
    p.add_argument(
        "--shards",
        type=int,
        help="simulator processes per run (default: one per 2,500 devices, at most one per CPU)",
    )
    p.add_argument("--concurrency", type=int, help="driver concurrency (default: the driver's)")
    p.add_argument("--poll-s", type=float, help="devices' poll period (default: their templates')")
    p.add_argument(
        "--max-polls-per-s",
        type=float,
        help="the host's poll budget, as site.max_polls_per_s (default: the daemon's)",
    )


def _run_ramp(args: argparse.Namespace) -> int:
    from controller.tools.bench.ramp import run_cli

    return run_cli(args)


def _run_fanout(args: argparse.Namespace) -> int:
    from controller.tools.bench.fanout import run_cli

    return run_cli(args)


def _run_regulation(args: argparse.Namespace) -> int:
    from controller.tools.bench.regulation import run_cli

    return run_cli(args)


def add_frequency_arguments(p: argparse.ArgumentParser) -> None:
    """`rampd bench frequency`'s arguments (here: the parser must not import the bench)."""
    p.add_argument("-c", "--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--out", help="output directory (default bench-runs/<timestamp>-frequency)")
    p.add_argument("--quick", action="store_true", help="the small site")
    p.add_argument(
        "--trace",
        default=str(REPO / "bench" / "data" / "grid_frequency_gb_2019-08-09_1s.csv"),
        help="frequency CSV with an hz column (default: the GB power cut of 9 August 2019)",
    )
    p.add_argument("--trace-nominal-hz", type=float, default=50.0)
    p.add_argument("--ffr-kw", type=float, default=2000.0, help="FFR armed (2000)")
    p.add_argument("--ufr-kw", type=float, default=2000.0, help="UFR armed (2000)")
    p.add_argument("--hold", type=float, default=30.0, help="seconds deployed before recall")
    p.add_argument("--mqtt", help="use this broker HOST:PORT instead of starting one")


def _run_frequency(args: argparse.Namespace) -> int:
    from controller.tools.bench.frequency import run_cli

    return run_cli(args)


CHAOS_KINDS = ("device", "rack", "meter", "broker", "daemon")


def _seconds_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("MIN,MAX in seconds, e.g. 60,180") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError("need 0 < MIN <= MAX")
    return lo, hi


def _chaos_kinds(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in CHAOS_KINDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(CHAOS_KINDS)}")
    return list(dict.fromkeys(names))


def add_chaos_arguments(p: argparse.ArgumentParser) -> None:
    """`rampd bench chaos`'s arguments (here: the parser must not import the bench)."""
    p.add_argument("-c", "--config", default=str(DEFAULT_CONFIG), help="site TOML file")
    p.add_argument("--out", help="output directory (default bench-runs/<timestamp>-chaos)")
    p.add_argument("--quick", action="store_true", help="the small site (see ramp --quick)")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault schedule (default 1)")
    p.add_argument("--minutes", type=float, default=30.0, help="minutes of replay (default 30)")
    p.add_argument(
        "--compress",
        type=int,
        default=1,
        help="replay the signal K times faster; samples, blocks and delays K times shorter "
        "(default 1: real time, 5-minute blocks)",
    )
    p.add_argument(
        "--fault-every-s",
        type=_seconds_range,
        default=(60.0, 180.0),
        metavar="MIN,MAX",
        help="wall seconds between fault starts, uniform (default 60,180; a 2-minute run: "
        "20,40); faults are cut to end 10 s before the next",
    )
    p.add_argument(
        "--first-fault-s", type=float, help="first fault this long after the replay starts "
        "(default: the --fault-every-s minimum)",
    )  # fmt: skip
    p.add_argument(
        "--kinds",
        type=_chaos_kinds,
        default=list(CHAOS_KINDS),
        help=f"fault kinds drawn, each once before any repeats (default {','.join(CHAOS_KINDS)})",
    )
    p.add_argument("--day", default="8/1/2017", help="signal column (a day of the CSV)")
    p.add_argument("--start", default="22:00:00", help="time of day the signal starts at")
    p.add_argument("--signal", help="PJM regulation CSV (default bench/data/pjm_rega_*)")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress: stderr)")


def _run_chaos(args: argparse.Namespace) -> int:
    from controller.tools.bench.chaos import run_cli

    return run_cli(args)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `rampd bench ramp | regulation | fanout | frequency | chaos` on the CLI's
    subparsers."""
    p = sub.add_parser(
        "bench",
        help="benchmarks on a simulated site (ramp, regulation, fanout, frequency, chaos)",
        description="Start a broker, the simulated site and the daemon as processes, drive "
        "them like a grid dispatcher and score the simulator's ground truth.",
    )
    benches = p.add_subparsers(dest="bench", required=True)
    r = benches.add_parser("ramp", help="setpoint steps: settle time against the physical minimum")
    add_ramp_arguments(r)
    r.set_defaults(func=_run_ramp)
    g = benches.add_parser("regulation", help="replay a PJM RegA signal, PJM performance score")
    add_regulation_arguments(g)
    g.set_defaults(func=_run_regulation)
    f = benches.add_parser(
        "fanout", help="time from a dispatch to every device's command answered, beside a floor"
    )
    add_fanout_arguments(f)
    f.set_defaults(func=_run_fanout)
    q = benches.add_parser(
        "frequency", help="replay a real under-frequency event: FFR and UFR on ground truth"
    )
    add_frequency_arguments(q)
    q.set_defaults(func=_run_frequency)
    c = benches.add_parser(
        "chaos", help="replay RegA while devices, meter, broker and daemon fail: PJM score, goals"
    )
    add_chaos_arguments(c)
    c.set_defaults(func=_run_chaos)
