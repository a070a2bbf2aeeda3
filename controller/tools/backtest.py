"""`rampd backtest`: the daemon's price rule over a price series, for a site file's fleet.

    rampd backtest --prices bench/data/ercot_rt_spp_hb_west_2024-06_08.csv \\
        --site configs/bench-site.toml --hashprice 50 [--json] [--plot out.png]

Fleet model only (`controller.market.backtest`): no devices, no simulator. The rule is the
site file's `[price_rule]` (evaluated even where the file has it disabled: the backtest asks
what it would do), its strikes from the templates and `[economics]`; `--hashprice` and
`--pool-fee` override the latter. Text: a table and a PNG (matplotlib, the `tools` extra,
imported only to draw). `--json`: one JSON object on stdout, no plot unless `--plot` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from controller.config import ConfigError, LoadedConfig, PriceRuleConfig, load_config
from controller.market.backtest import BacktestResult, backtest
from controller.market.economics import Economics
from controller.market.prices import PriceError, read_price_csv
from controller.wire.timestamps import rfc3339

DEFAULT_PLOT = "rampd-backtest.png"


class BacktestError(Exception):
    """Input the backtest cannot use; the message says which and why."""


def economics_of(cfg: LoadedConfig, hashprice: float | None, pool_fee: float | None) -> Economics:
    site = cfg.site.economics
    hp = hashprice if hashprice is not None else (site.hashprice_usd_per_ph_day if site else None)
    if hp is None:
        raise BacktestError(
            f"{cfg.path} has no [economics] hashprice_usd_per_ph_day: give --hashprice "
            "(USD per PH/s per day)"
        )
    fee = pool_fee if pool_fee is not None else (site.pool_fee if site else 0.0)
    try:
        return Economics(hp, fee)
    except ValueError as exc:
        raise BacktestError(f"--hashprice/--pool-fee: {exc}") from None


def rule_of(cfg: LoadedConfig, args: argparse.Namespace) -> PriceRuleConfig:
    over: dict[str, Any] = {"enabled": True}
    for key in ("stop_after", "resume_after", "high_strike_usd_per_mwh", "min_stopped_s"):
        if getattr(args, key, None) is not None:
            over[key] = getattr(args, key)
    if getattr(args, "resume_stagger_s", None) is not None:
        over["resume_stagger_s"] = args.resume_stagger_s
    try:
        return PriceRuleConfig.model_validate({**cfg.site.price_rule.model_dump(), **over})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BacktestError(f"price rule: {problems}") from None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def summary(
    r: BacktestResult, econ: Economics, rule: PriceRuleConfig, *, site: Path, prices: Path
) -> dict[str, Any]:
    """The JSON object: totals, per class, strikes (null: never curtailed), the period."""
    end = float(r.t[-1] + r.dt_s[-1])
    return {
        "site": str(site),
        "prices": str(prices),
        "period": {
            "start": rfc3339(float(r.t[0])),
            "end": rfc3339(end),
            "intervals": int(r.t.size),
            "hours": round(r.hours, 3),
        },
        "price_usd_per_mwh": {
            "mean": round(float(np.average(r.price, weights=r.dt_s)), 2),
            "min": float(r.price.min()),
            "max": float(r.price.max()),
        },
        "economics": {
            "hashprice_usd_per_ph_day": econ.hashprice_usd_per_ph_day,
            "pool_fee": econ.pool_fee,
        },
        "rule": rule.model_dump(),
        "strikes": {k: _finite(round(v, 2)) for k, v in r.strikes.items()},
        "classes": [
            {
                "kind": c.kind,
                "count": c.count,
                "full_kw": round(c.full_w / 1e3, 3),
                "idle_kw": round(c.idle_w / 1e3, 3),
                "strike_usd_per_mwh": _finite(round(r.strikes[c.kind], 2)),
                "curtailed_hours": round(r.curtailed_hours[c.kind], 3),
                "energy_mwh": round(r.class_energy_mwh[c.kind], 3),
                "energy_cost_usd": round(r.class_cost_usd[c.kind], 2),
                "revenue_usd": round(r.class_revenue_usd[c.kind], 2),
            }
            for c in r.classes
        ],
        "curtailments": sum(1 for e in r.events if e.action == "curtail"),
        "curtailed_hours": {k: round(v, 3) for k, v in r.curtailed_hours.items()},
        "other_kw": round((r.flat_w - sum(c.full_w for c in r.classes)) / 1e3, 3),
        "energy_mwh": round(r.energy_mwh, 3),
        "curtailed_mwh": round(r.curtailed_mwh, 3),
        "energy_cost_usd": round(r.energy_cost_usd, 2),
        "mining_revenue_usd": round(r.mining_revenue_usd, 2),
        "net_usd": round(r.net_usd, 2),
        "flat_out_energy_mwh": round(r.flat_out_energy_mwh, 3),
        "flat_out_cost_usd": round(r.flat_out_cost_usd, 2),
        "flat_out_revenue_usd": round(r.flat_out_revenue_usd, 2),
        "flat_out_net_usd": round(r.flat_out_net_usd, 2),
        "gain_usd": round(r.gain_usd, 2),
    }


def table(s: dict[str, Any]) -> str:
    """The summary as an operator reads it."""
    p, e, rl = s["period"], s["economics"], s["rule"]
    hs = rl["high_strike_usd_per_mwh"]
    lines = [
        f"rampd backtest: {s['site']} on {s['prices']}",
        f"period {p['start']} .. {p['end']}: {p['intervals']} intervals, {p['hours']:.1f} h; "
        f"price mean {s['price_usd_per_mwh']['mean']:.2f}, min {s['price_usd_per_mwh']['min']:.2f}"
        f", max {s['price_usd_per_mwh']['max']:.2f} USD/MWh",
        f"hashprice {e['hashprice_usd_per_ph_day']:g} USD/PH/day, pool fee {e['pool_fee']:.1%}; "
        f"rule: stop after {rl['stop_after']}, resume after {rl['resume_after']} interval(s), "
        f"high strike {'none' if hs is None else f'{hs:g}'}, min stopped "
        f"{rl['min_stopped_s']:g} s, resume stagger {rl['resume_stagger_s']:g} s",
        "",
        f"{'class':<22}{'count':>7}{'full kW':>11}{'strike':>10}{'curt. h':>9}"
        f"{'MWh':>11}{'cost USD':>13}{'revenue USD':>14}",
    ]
    for c in s["classes"]:
        strike = "never" if c["strike_usd_per_mwh"] is None else f"{c['strike_usd_per_mwh']:.2f}"
        lines.append(
            f"{c['kind']:<22}{c['count']:>7}{c['full_kw']:>11,.0f}{strike:>10}"
            f"{c['curtailed_hours']:>9.2f}{c['energy_mwh']:>11,.1f}{c['energy_cost_usd']:>13,.0f}"
            f"{c['revenue_usd']:>14,.0f}"
        )
    if s["other_kw"]:
        lines.append(f"{'(other load)':<22}{'':>7}{s['other_kw']:>11,.0f}{'never':>10}")
    rows = [
        ("energy MWh", "energy_mwh", "flat_out_energy_mwh", ",.1f"),
        ("energy cost USD", "energy_cost_usd", "flat_out_cost_usd", ",.0f"),
        ("revenue USD", "mining_revenue_usd", "flat_out_revenue_usd", ",.0f"),
        ("net USD", "net_usd", "flat_out_net_usd", ",.0f"),
    ]
    lines += ["", f"{'':<18}{'with rule':>14}{'flat out':>14}{'difference':>14}"]
    for label, a, b, fmt in rows:
        d = s[a] - s[b]
        lines.append(f"{label:<18}{s[a]:>14{fmt}}{s[b]:>14{fmt}}{d:>+14{fmt}}")
    lines.append(f"curtailed {s['curtailed_mwh']:,.1f} MWh in {s['curtailments']} curtailment(s)")
    return "\n".join(lines)


def render_plot(r: BacktestResult, out_png: Path, title: str) -> Path:
    """Price with the class strikes (symlog: spikes and negative prices both show), and the
    site's power flat out against with the rule."""
    from matplotlib import dates as mdates
    from matplotlib.figure import Figure

    t = (np.append(r.t, r.t[-1] + r.dt_s[-1]) * 1e3).astype("datetime64[ms]")

    def steps(v: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.append(v, v[-1])  # the last interval drawn to its end

    fig = Figure(figsize=(12.8, 7.2), dpi=100, layout="constrained")
    ax_p, ax_w = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1])
    ax_p.plot(t, steps(r.price), color="tab:blue", lw=0.7, drawstyle="steps-post", label="price")
    ax_p.set_yscale("symlog", linthresh=100.0)
    by_strike: dict[float, list[str]] = {}
    for k, v in r.strikes.items():
        if math.isfinite(v):
            by_strike.setdefault(round(v, 2), []).append(k)
    colors = ["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"]
    for i, (v, kinds) in enumerate(sorted(by_strike.items())):
        ax_p.axhline(
            v, color=colors[i % len(colors)], lw=1.0, ls="--",
            label=f"strike {v:.2f}:\n  " + "\n  ".join(kinds),
        )  # fmt: skip
    ax_p.set_ylabel("price (USD/MWh, symlog)")
    ax_p.grid(True, color="0.9", lw=0.8)
    ax_p.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)

    ax_w.plot(t[[0, -1]], [r.flat_w / 1e6] * 2, color="0.3", lw=1.2, ls="--", label="flat out")
    ax_w.plot(
        t, steps(r.site_w / 1e6), color="tab:green", lw=0.8, drawstyle="steps-post",
        label="with the price rule",
    )  # fmt: skip
    ax_w.set_ylabel("site power (MW, interval mean)")
    ax_w.grid(True, color="0.9", lw=0.8)
    ax_w.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    locator = mdates.AutoDateLocator(minticks=6, maxticks=14)  # type: ignore[no-untyped-call]
    ax_w.xaxis.set_major_locator(locator)
    ax_w.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    ax_w.set_xlabel("time (UTC)")
    headline, _, rest = title.partition("\n")
    fig.suptitle(headline, x=0.01, ha="left", fontsize=12, weight="bold")
    if rest:
        ax_p.set_title(rest, fontsize=9.5, loc="left")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, backtest, summarize; draw the plot when asked. BacktestError on bad input."""
    try:
        cfg = load_config(args.site)
    except ConfigError as exc:
        raise BacktestError(str(exc)) from None
    econ = economics_of(cfg, args.hashprice, args.pool_fee)
    rule = rule_of(cfg, args)
    interval_s = args.interval_s if args.interval_s is not None else cfg.site.prices.interval_s
    prices = Path(args.prices)
    try:
        quotes = read_price_csv(prices, interval_s)
    except PriceError as exc:
        raise BacktestError(str(exc)) from None
    if args.other_kw < 0:
        raise BacktestError("--other-kw must not be negative")
    result = backtest(quotes, cfg.device_classes(), rule, econ, other_w=args.other_kw * 1e3)
    s = summary(result, econ, rule, site=cfg.path, prices=prices)
    plot = args.plot if args.plot is not None else (None if args.json else DEFAULT_PLOT)
    if plot is not None and not args.no_plot:
        title = (
            f"Price rule backtest: {cfg.site.site_id} on {prices.name}\n"
            f"hashprice {econ.hashprice_usd_per_ph_day:g} USD/PH/day: net {s['net_usd']:,.0f} "
            f"vs {s['flat_out_net_usd']:,.0f} USD flat out ({s['gain_usd']:+,.0f}); "
            f"{s['curtailed_mwh']:,.1f} MWh curtailed"
        )
        s["plot"] = str(render_plot(result, Path(plot), title))
    return s


def run_cli(args: argparse.Namespace) -> int:
    try:
        s = run(args)
    except BacktestError as exc:
        print(f"rampd backtest: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(s))
    else:
        print(table(s))
        if "plot" in s:
            print(f"plot: {s['plot']}")
    return 0
