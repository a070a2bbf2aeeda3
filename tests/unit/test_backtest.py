"""The backtest: the price rule over a price series, fleet model only, against flat out."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.config import PriceRuleConfig
from controller.market.backtest import backtest
from controller.market.economics import DeviceClass, Economics
from controller.market.price_rule import PriceRule
from controller.market.prices import PriceQuote

ECON = Economics(hashprice_usd_per_ph_day=50.0, pool_fee=0.02)
OLD = DeviceClass("s19jpro", 100, full_w=307.2e3, idle_w=2e3, efficiency_j_per_th=29.5)
NEW = DeviceClass("s21", 100, full_w=350e3, idle_w=2e3, efficiency_j_per_th=17.5)
BOX = DeviceClass("container", 2, full_w=500e3, idle_w=50e3)  # no economics
CLASSES = (OLD, NEW, BOX)
S_OLD, S_NEW = OLD.strike_usd_per_mwh(ECON), NEW.strike_usd_per_mwh(ECON)
T0 = 1_717_218_000.0
IV = 900.0
MWH = 3.6e9  # W s


def series(prices: list[float], interval_s: float = IV) -> list[PriceQuote]:
    return [PriceQuote(T0 + i * interval_s, interval_s, p) for i, p in enumerate(prices)]


def cfg(**kw: Any) -> PriceRuleConfig:
    base = {"stop_after": 1, "resume_after": 1, "min_stopped_s": 0.0, "resume_stagger_s": 0.0}
    return PriceRuleConfig(**{**base, **kw})


def test_below_every_strike_is_flat_out() -> None:
    r = backtest(series([20.0, -5.0, 30.0, S_OLD - 0.01]), CLASSES, cfg(), ECON)
    assert r.curtailed_mwh == 0.0
    assert all(h == 0.0 for h in r.curtailed_hours.values())
    assert r.energy_mwh == pytest.approx(r.flat_out_energy_mwh)
    assert r.net_usd == pytest.approx(r.flat_out_net_usd)
    full = OLD.full_w + NEW.full_w + BOX.full_w
    assert r.flat_out_energy_mwh == pytest.approx(full * 4 * IV / MWH)
    # Cost at each interval's price, negative prices paying the site.
    assert r.energy_cost_usd == pytest.approx(full * IV / MWH * (20.0 - 5.0 + 30.0 + S_OLD - 0.01))


def test_one_interval_between_the_breakevens() -> None:
    mid = (S_OLD + S_NEW) / 2
    r = backtest(series([10.0, mid, 10.0]), CLASSES, cfg(), ECON)
    assert r.curtailed_hours == {"s19jpro": 0.25, "s21": 0.0, "container": 0.0}
    assert r.curtailed_mwh == pytest.approx(OLD.shed_w * IV / MWH)
    assert r.energy_mwh + r.curtailed_mwh == pytest.approx(r.flat_out_energy_mwh)
    assert r.fraction[0].tolist() == [0.0, 1.0, 0.0]
    assert r.site_w[1] == pytest.approx(r.flat_w - OLD.shed_w)
    # The curtailed class loses its revenue on the shed energy and saves its cost there.
    shed_mwh = OLD.shed_w * IV / MWH
    assert r.flat_out_revenue_usd - r.mining_revenue_usd == pytest.approx(shed_mwh * S_OLD)
    assert r.flat_out_cost_usd - r.energy_cost_usd == pytest.approx(shed_mwh * mid)
    assert r.gain_usd == pytest.approx(shed_mwh * (mid - S_OLD))
    assert r.gain_usd > 0


def test_a_class_without_economics_costs_and_earns_nothing() -> None:
    r = backtest(series([1e4, 50.0]), CLASSES, cfg(), ECON)
    assert r.curtailed_hours["container"] == 0.0
    assert r.class_revenue_usd["container"] == 0.0
    box_mwh = BOX.full_w * 2 * IV / MWH
    assert r.class_energy_mwh["container"] == pytest.approx(box_mwh)
    assert r.class_cost_usd["container"] == pytest.approx(box_mwh / 2 * (1e4 + 50.0))


def test_other_load_counts_energy_and_cost_only() -> None:
    base = backtest(series([40.0, 60.0]), CLASSES, cfg(), ECON)
    more = backtest(series([40.0, 60.0]), CLASSES, cfg(), ECON, other_w=1e6)
    assert more.energy_mwh - base.energy_mwh == pytest.approx(1e6 * 2 * IV / MWH)
    assert more.energy_cost_usd - base.energy_cost_usd == pytest.approx(1e6 * IV / MWH * 100.0)
    assert more.mining_revenue_usd == base.mining_revenue_usd
    assert more.flat_w - base.flat_w == 1e6


def test_stop_after_and_min_stopped_in_the_series() -> None:
    hi, lo = S_NEW + 50.0, 10.0
    two = backtest(series([hi, lo, hi, hi, lo, lo]), CLASSES, cfg(stop_after=2), ECON)
    # Curtailed at the second high interval in a row (index 3), resumed at the next low one.
    assert two.fraction[1].tolist() == [0, 0, 0, 1, 0, 0]
    held = backtest(series([hi, lo, lo, lo]), CLASSES, cfg(min_stopped_s=1800.0), ECON)
    assert held.fraction[1].tolist() == [1, 1, 0, 0]


def test_staggered_resumption_is_counted_by_fraction() -> None:
    hi, lo = S_NEW + 50.0, 10.0
    step = 10.0
    r = backtest(series([hi, lo]), CLASSES, cfg(resume_stagger_s=300.0), ECON, step_s=step)
    # A linear return over 300 s from the second interval's start: 150 s curtailed-equivalent,
    # sampled every step_s (each step holds the fraction at its start).
    hours = r.curtailed_hours["s21"]
    assert 900.0 + 150.0 <= hours * 3600.0 <= 900.0 + 150.0 + step + 1e-6
    assert 0.0 < r.fraction[1, 1] < 1.0
    assert r.energy_mwh + r.curtailed_mwh == pytest.approx(r.flat_out_energy_mwh)


def test_it_runs_the_daemons_rule() -> None:
    prices = [10.0, S_NEW + 1, S_OLD + 1, 10.0, 600.0, 10.0, S_NEW, 10.0]
    rule = cfg(high_strike_usd_per_mwh=500.0, min_stopped_s=1800.0)
    r = backtest(series(prices), CLASSES, rule, ECON)
    # The same rule driven by hand as the daemon would: the same decisions, the same times.
    pr = PriceRule(CLASSES, rule, ECON)
    expected = []
    for q in series(prices):
        expected += pr.on_price(q, q.interval_start)
        for t in np.arange(q.interval_start + 60.0, q.end, 60.0):
            expected += pr.update(float(t))
    assert list(r.events) == expected
    assert {e.action for e in expected} == {"curtail", "defer", "resume"}
    assert r.fraction[0].tolist() == [0, 1, 1, 0, 1, 1, 1, 0]
    assert r.fraction[1].tolist() == [0, 1, 1, 0, 1, 1, 1, 0]


def test_bad_series_are_refused() -> None:
    with pytest.raises(ValueError, match="no prices"):
        backtest([], CLASSES, cfg(), ECON)
    q = series([1.0, 2.0])
    with pytest.raises(ValueError, match="increasing"):
        backtest([q[1], q[0]], CLASSES, cfg(), ECON)


prices_st = st.lists(
    st.floats(min_value=-50.0, max_value=5000.0, allow_nan=False), min_size=1, max_size=60
)


@settings(max_examples=60, deadline=None)
@given(prices=prices_st)
def test_curtailing_at_once_never_loses(prices: list[float]) -> None:
    """Stop after one interval at or above the strike, resume after one below, no minimum
    time nor stagger: each curtailed interval saves price - strike per MWh shed, never less
    than zero, so the rule's net is at least flat out's; energy adds up."""
    r = backtest(series(prices), CLASSES, cfg(), ECON)
    assert r.net_usd >= r.flat_out_net_usd - 1e-6 * max(1.0, abs(r.flat_out_net_usd))
    assert r.energy_mwh + r.curtailed_mwh == pytest.approx(r.flat_out_energy_mwh)
    above = np.array(prices) >= S_NEW
    assert r.curtailed_hours["s21"] == pytest.approx(above.sum() * IV / 3600.0)


@settings(max_examples=60, deadline=None)
@given(prices=prices_st)
def test_a_one_class_fleet_equals_its_closed_form(prices: list[float]) -> None:
    """One class curtailed at once and resumed at once: each interval runs at full below the
    strike and idles at or above it, so every figure of the JSON output is a sum over the
    intervals, written here from the model's definition rather than from the code."""
    r = backtest(series(prices), (OLD,), cfg(), ECON)
    # Breakeven by hand: 1 PH/s at 29.5 J/TH draws 29.5 kW, 0.708 MWh a day, and earns 50
    # USD a day less the 2% pool fee.
    strike = 50.0 * (1 - 0.02) / (29.5e3 * 24 / 1e6)
    assert r.strikes == {"s19jpro": pytest.approx(strike)}
    p = np.array(prices)
    off = p >= strike
    w = np.where(off, OLD.idle_w, OLD.full_w)
    mwh = w * IV / MWH
    flat_mwh = OLD.full_w * IV / MWH
    assert r.curtailed_hours == {"s19jpro": pytest.approx(off.sum() * IV / 3600.0)}
    assert r.energy_mwh == pytest.approx(mwh.sum())
    assert r.curtailed_mwh == pytest.approx(off.sum() * OLD.shed_w * IV / MWH)
    assert r.energy_cost_usd == pytest.approx((mwh * p).sum(), abs=1e-6)
    assert r.mining_revenue_usd == pytest.approx(mwh.sum() * strike)
    assert r.net_usd == pytest.approx(mwh.sum() * strike - (mwh * p).sum(), abs=1e-6)
    assert r.flat_out_net_usd == pytest.approx((flat_mwh * (strike - p)).sum(), abs=1e-6)
