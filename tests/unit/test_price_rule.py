"""The price rule: merit order, counting, high strike, min stay-stopped time, staggered
resumption, and what it ignores (forecasts, stale quotes, repeated intervals)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from controller.config import PriceRuleConfig
from controller.market.economics import DeviceClass, Economics
from controller.market.price_rule import Mode, PriceRule, RuleEvent
from controller.market.prices import PriceQuote

ECON = Economics(hashprice_usd_per_ph_day=50.0)
# 1,000 S19j Pro (29.5 J/TH: the least efficient, lowest strike), 1,000 S21 (17.5 J/TH),
# GPU racks worth 2,000 USD/MWh, containers with no economics.
OLD = DeviceClass("s19jpro", 1000, full_w=3.072e6, idle_w=20e3, efficiency_j_per_th=29.5)
NEW = DeviceClass("s21", 1000, full_w=3.5e6, idle_w=20e3, efficiency_j_per_th=17.5)
GPU = DeviceClass("gpu", 10, full_w=816e3, idle_w=368e3, value_usd_per_mwh=2000.0)
BOX = DeviceClass("container", 4, full_w=1e6, idle_w=0.1e6)
CLASSES = (NEW, BOX, GPU, OLD)  # not in merit order: the rule sorts them
S_OLD = OLD.strike_usd_per_mwh(ECON)
S_NEW = NEW.strike_usd_per_mwh(ECON)
T0 = 1_717_218_000.0  # 2024-06-01T05:00:00Z
IV = 900.0


def rule(econ: Economics | None = ECON, **kw: Any) -> PriceRule:
    cfg = {"stop_after": 1, "resume_after": 1, "min_stopped_s": 0.0, "resume_stagger_s": 0.0}
    return PriceRule(CLASSES, PriceRuleConfig(**{**cfg, **kw}), econ)


def feed(r: PriceRule, prices: list[float], start: int = 0) -> list[RuleEvent]:
    """One realtime quote per interval from interval `start`, each at its interval's start."""
    out: list[RuleEvent] = []
    for i, p in enumerate(prices, start=start):
        out += r.on_price(PriceQuote(T0 + i * IV, IV, p), T0 + i * IV)
    return out


def curtailed(r: PriceRule) -> set[str]:
    return {k for k, f in r.curtailed_fraction().items() if f > 0}


def test_strikes_in_merit_order() -> None:
    r = rule()
    assert S_OLD < S_NEW < 2000.0
    assert list(r.strikes()) == ["s19jpro", "s21", "gpu", "container"]
    assert r.strikes()["s19jpro"] == pytest.approx(50.0 / (0.024 * 29.5))
    assert math.isinf(r.strikes()["container"])


def test_a_price_between_two_breakevens_curtails_only_the_class_above_it() -> None:
    r = rule()
    events = feed(r, [(S_OLD + S_NEW) / 2])
    assert curtailed(r) == {"s19jpro"}
    assert r.shed_w() == pytest.approx(OLD.shed_w)
    assert [(e.device_class, e.action) for e in events] == [("s19jpro", "curtail")]
    assert "s19jpro curtailed" in events[0].reason
    assert f"strike {S_OLD:.2f}" in events[0].reason
    feed(r, [S_NEW], start=1)  # at the strike counts as at or above
    assert curtailed(r) == {"s19jpro", "s21"}
    assert r.shed_w() == pytest.approx(OLD.shed_w + NEW.shed_w)


def test_stop_after_counts_consecutive_intervals() -> None:
    hi, lo = S_NEW + 10.0, S_OLD - 10.0
    r = rule(stop_after=3)
    feed(r, [hi, hi])
    assert not curtailed(r)
    events = feed(r, [hi], start=2)
    assert curtailed(r) == {"s19jpro", "s21"}
    assert "for 3 interval(s)" in events[0].reason
    # A low interval breaks the streak: two more high ones are not three in a row.
    r = rule(stop_after=3)
    feed(r, [hi, hi, lo, hi, hi])
    assert not curtailed(r)


def test_resume_after_counts_consecutive_intervals_below() -> None:
    hi, lo = S_NEW + 10.0, S_OLD - 10.0
    r = rule(resume_after=3)
    feed(r, [hi, lo, lo, hi, lo, lo])
    assert curtailed(r) == {"s19jpro", "s21"}  # never three low in a row
    events = feed(r, [lo], start=6)
    assert not curtailed(r)
    assert {e.device_class for e in events if e.action == "resume"} == {"s19jpro", "s21"}
    assert all("for 3 interval(s)" in e.reason for e in events if e.action == "resume")


def test_a_high_strike_curtails_at_once_every_class_it_reaches() -> None:
    r = rule(stop_after=4, high_strike_usd_per_mwh=500.0)
    feed(r, [450.0])  # above both miner strikes, below the high strike: counted only
    assert not curtailed(r)
    events = feed(r, [600.0], start=1)
    assert curtailed(r) == {"s19jpro", "s21"}  # not the racks (2,000), never the containers
    assert all("high strike 500" in e.reason for e in events)
    feed(r, [2500.0], start=2)
    assert curtailed(r) == {"s19jpro", "s21", "gpu"}
    assert r.curtailed_fraction()["container"] == 0.0


def test_an_infinite_strike_is_never_curtailed() -> None:
    r = rule(high_strike_usd_per_mwh=100.0)
    feed(r, [1e6] * 5)
    assert r.curtailed_fraction()["container"] == 0.0
    r = rule(econ=None)  # no hashprice: no miner has a strike
    feed(r, [1e6] * 5)
    assert curtailed(r) == {"gpu"}


def test_min_stopped_time_defers_the_resume() -> None:
    hi, lo = S_NEW + 10.0, S_OLD - 10.0
    r = rule(min_stopped_s=1800.0)
    feed(r, [hi])
    events = feed(r, [lo], start=1)  # low long enough, but stopped only 900 s
    assert curtailed(r) == {"s19jpro", "s21"}
    assert {e.action for e in events} == {"defer"}
    assert "min stopped 1800" in events[0].reason
    assert not r.update(T0 + 1799.0)
    assert curtailed(r) == {"s19jpro", "s21"}
    events = r.update(T0 + 1800.0)  # due: no new price needed
    assert not curtailed(r)
    assert {(e.action, e.at) for e in events} == {("resume", T0 + 1800.0)}


def test_a_deferred_resume_is_called_off_when_the_price_rises_again() -> None:
    hi, lo = S_NEW + 10.0, S_OLD - 10.0
    r = rule(min_stopped_s=2700.0)
    feed(r, [hi, lo, hi])
    r.update(T0 + 5 * IV)
    assert curtailed(r) == {"s19jpro", "s21"}
    assert all(m is Mode.STOPPED for k, m in r.modes().items() if k in ("s19jpro", "s21"))


def test_resumption_is_staggered() -> None:
    hi, lo = S_NEW + 10.0, S_OLD - 10.0
    r = rule(resume_stagger_s=300.0)
    feed(r, [hi, lo])
    t = T0 + IV  # the resume starts here
    assert r.curtailed_fraction()["s21"] == 1.0
    r.update(t + 75.0)
    assert r.curtailed_fraction()["s21"] == pytest.approx(0.75)
    r.update(t + 150.0)
    assert r.curtailed_fraction()["s21"] == pytest.approx(0.5)
    assert r.shed_w() == pytest.approx(0.5 * (OLD.shed_w + NEW.shed_w))
    assert not r.settled
    events = r.update(t + 300.0)
    assert r.curtailed_fraction()["s21"] == 0.0
    assert {(e.device_class, e.action) for e in events} == {
        ("s21", "resumed"),
        ("s19jpro", "resumed"),
    }
    assert r.settled


def test_a_high_price_while_resuming_curtails_again() -> None:
    hi, lo = S_NEW + 10.0, S_OLD - 10.0
    r = rule(resume_stagger_s=1200.0, min_stopped_s=900.0)
    feed(r, [hi, lo])
    r.update(T0 + IV + 600.0)
    assert r.curtailed_fraction()["s21"] == pytest.approx(0.5)
    feed(r, [hi], start=2)
    assert r.curtailed_fraction()["s21"] == 1.0
    # ... and the minimum stay-stopped time counts from this new stop.
    feed(r, [lo], start=3)
    assert r.modes()["s21"] is Mode.RESUMING
    r = rule(resume_stagger_s=1200.0, min_stopped_s=1000.0)
    feed(r, [hi, lo, hi, lo])  # stopped again at 2 IV: at 3 IV only 900 s of 1000
    assert r.modes()["s21"] is Mode.STOPPED


def test_stale_and_forecast_quotes_are_ignored() -> None:
    hi = S_NEW + 10.0
    r = PriceRule(CLASSES, PriceRuleConfig(stop_after=1), ECON, grace_s=60.0)
    assert not r.on_price(PriceQuote(T0, IV, hi), T0 + IV + 61.0)  # over, past the grace
    assert not curtailed(r) and r.last_quote is None
    assert not r.on_price(PriceQuote(T0, IV, hi, "forecast"), T0)
    assert not curtailed(r) and r.last_quote is None
    assert r.on_price(PriceQuote(T0, IV, hi), T0 + IV + 59.0)  # within the grace
    assert curtailed(r) == {"s19jpro", "s21"}
    assert r.price_fresh(T0 + IV + 60.0) and not r.price_fresh(T0 + IV + 61.0)


def test_a_repeated_interval_is_not_counted_twice() -> None:
    hi = S_NEW + 10.0
    r = rule(stop_after=2)
    for at in (T0, T0 + 60.0, T0 + 120.0):  # republished each minute
        r.on_price(PriceQuote(T0, IV, hi), at)
    assert not curtailed(r)
    feed(r, [hi], start=1)
    assert curtailed(r) == {"s19jpro", "s21"}


def test_a_revision_replaces_the_interval_price() -> None:
    hi, lo = S_NEW + 10.0, S_OLD - 10.0
    r = rule(stop_after=2)
    feed(r, [hi])
    r.on_price(PriceQuote(T0, IV, lo), T0 + 300.0)  # interval 0 revised down
    assert r.last_quote == PriceQuote(T0, IV, lo)
    feed(r, [hi], start=1)  # one high interval, not two
    assert not curtailed(r)
    r.on_price(PriceQuote(T0 + IV, IV, lo), T0 + IV + 10)
    r.on_price(PriceQuote(T0 + IV, IV, hi), T0 + IV + 20)  # and revised back up: still one
    assert not curtailed(r)
    feed(r, [hi], start=2)
    assert curtailed(r) == {"s19jpro", "s21"}


def test_an_older_interval_is_ignored() -> None:
    hi, lo = S_NEW + 10.0, S_OLD - 10.0
    r = rule(stop_after=2)
    feed(r, [hi, lo])
    r.on_price(PriceQuote(T0, IV, hi), T0 + IV + 1.0)  # late copy of interval 0
    assert r.last_quote == PriceQuote(T0 + IV, IV, lo)
    feed(r, [hi], start=2)
    assert not curtailed(r)


def test_a_gap_in_the_feed_breaks_the_streak() -> None:
    hi = S_NEW + 10.0
    r = rule(stop_after=2)
    feed(r, [hi])
    feed(r, [hi], start=2)  # interval 1 never came
    assert not curtailed(r)
    feed(r, [hi], start=3)
    assert curtailed(r) == {"s19jpro", "s21"}


def test_without_a_fresh_price_the_rule_holds() -> None:
    hi, lo = S_NEW + 10.0, S_OLD - 10.0
    r = rule()
    feed(r, [hi])
    assert not r.update(T0 + 86400.0)
    assert curtailed(r) == {"s19jpro", "s21"}
    r = rule()
    feed(r, [lo])
    r.update(T0 + 86400.0)
    assert not curtailed(r)


def test_new_economics_move_the_strikes() -> None:
    r = rule()
    mid = (S_OLD + S_NEW) / 2
    r.set_economics(Economics(hashprice_usd_per_ph_day=100.0))
    assert r.strikes()["s19jpro"] == pytest.approx(2 * S_OLD)
    feed(r, [mid])
    assert not curtailed(r)
    r.set_economics(Economics(hashprice_usd_per_ph_day=25.0))
    feed(r, [mid], start=1)
    assert curtailed(r) == {"s19jpro", "s21"}


def test_a_disabled_rule_curtails_nothing() -> None:
    r = rule(enabled=False)
    feed(r, [5000.0] * 4)
    assert not curtailed(r)
    assert r.shed_w() == 0.0
    assert r.last_quote is not None
