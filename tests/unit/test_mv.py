"""Measurement and verification of curtailment events: baselines, energy, reductions, targets
met and value, on series whose figures are worked out by hand here."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from controller.market.mv import (
    MAX_EVENT_SAMPLES,
    METHOD_FIRST_SAMPLE,
    METHOD_HIGH_4_OF_5,
    METHOD_RECENT,
    CurtailmentEvent,
    EventMeter,
    high_4_of_5_baseline,
    high_k_of_n_baseline,
)

T0 = 1_717_243_200.0  # 2024-06-01T12:00:00Z
KW = 1e3


class Feed:
    """Feeds a meter once a second from T0 on and collects the events it returns."""

    def __init__(self, meter: EventMeter) -> None:
        self.meter = meter
        self.t = T0
        self.events: list[CurtailmentEvent] = []

    def run(
        self,
        seconds: int,
        site_kw: float | Callable[[int], float],
        rail: str = "default",
        target_kw: float = 3000.0,
        *,
        price: float | None = None,
        revenue: float = 0.0,
        detail: str = "",
    ) -> None:
        for i in range(seconds):
            kw = site_kw(i) if callable(site_kw) else site_kw
            ev = self.meter.sample(
                self.t, kw * KW, rail, target_kw * KW,
                price_usd_per_mwh=price, revenue_usd_per_mwh=revenue, detail=detail,
            )  # fmt: skip
            if ev is not None:
                self.events.append(ev)
            self.t += 1.0


def meter(minutes: float = 15.0, tol_kw: float = 20.0, allowance_s: float = 60.0) -> EventMeter:
    return EventMeter(baseline_minutes=minutes, tol_w=tol_kw * KW, ramp_allowance_s=allowance_s)


# --- events and baselines -----------------------------------------------------------------


def test_default_rail_makes_no_event_and_feeds_the_baseline() -> None:
    f = Feed(meter())
    f.run(600, lambda i: 2000.0 if i % 2 else 2200.0)
    assert f.events == []
    assert f.meter.ongoing is None
    assert f.meter.recent_baseline_w() == pytest.approx(2100e3)


def test_an_event_starts_with_a_non_default_rail_and_ends_back_at_default() -> None:
    f = Feed(meter())
    f.run(900, 2000.0)
    start = f.t
    # Down from 2000 to 1000 kW over 30 s, then held; 600 s under a 1000 kW commitment.
    f.run(600, lambda i: 2000.0 - 1000.0 * min(i, 30) / 30, "commitment", 1000.0, detail="c-1")
    assert f.events == []
    ongoing = f.meter.ongoing
    assert ongoing is not None and ongoing.rail == "commitment" and ongoing.started_at == start
    end = f.t
    f.run(1, 2000.0)
    [ev] = f.events
    assert (ev.rail, ev.started_at, ev.ended_at, ev.detail) == ("commitment", start, end, "c-1")
    assert ev.duration_s == 600.0
    assert ev.baseline_w == pytest.approx(2000e3)
    assert ev.baseline_method == METHOD_RECENT
    assert ev.target_w == pytest.approx(1000e3)
    # Reductions 1000 i / 30 kW for the 30 ramp seconds, then 1000 kW for 570 s.
    ramp_kws = sum(1000.0 * i / 30 for i in range(30))
    energy_kwh = (ramp_kws + 570 * 1000.0) / 3600
    assert ev.energy_curtailed_kwh == pytest.approx(energy_kwh)
    assert ev.avg_reduction_kw == pytest.approx(energy_kwh * 3600 / 600)
    # The minimum is over the time after the 60 s ramp-in allowance.
    assert ev.min_reduction_kw == pytest.approx(1000.0)
    assert f.meter.ongoing is None


def test_the_baseline_is_the_last_minutes_of_default_rail_only() -> None:
    f = Feed(meter(minutes=15))
    f.run(600, 2000.0)  # older than the window: forgotten
    f.run(900, 3000.0)
    f.run(300, 1000.0, "price", 0.0)  # curtailed: never a baseline
    f.run(60, 2500.0)
    f.run(10, 1500.0, "dispatch", 1500.0)
    f.run(1, 3000.0)
    first, second = f.events
    assert first.baseline_w == pytest.approx(3000e3)
    # The window skips the price event: 840 s of 3000 kW before it, 60 s of 2500 kW after.
    assert second.baseline_w == pytest.approx((840 * 3000e3 + 60 * 2500e3) / 900)


def test_chained_rails_make_two_events_and_keep_the_first_baseline() -> None:
    f = Feed(meter())
    f.run(900, 2000.0)
    f.run(300, 1500.0, "price", 1500.0, detail="price 180 > strike 95")
    switch = f.t
    f.run(300, 800.0, "commitment", 800.0)
    assert len(f.events) == 1  # the price event ended where the commitment began
    f.run(1, 2000.0)
    price, commitment = f.events
    assert price.rail == "price" and price.ended_at == switch
    assert commitment.rail == "commitment" and commitment.started_at == switch
    assert commitment.baseline_w == price.baseline_w == pytest.approx(2000e3)
    # Against 2000 kW, not the 1500 kW the site drew under the price rail.
    assert commitment.energy_curtailed_kwh == pytest.approx(1200.0 * 300 / 3600)
    assert price.detail == "price 180 > strike 95"


def test_an_event_without_history_takes_its_first_sample_as_baseline() -> None:
    f = Feed(meter())
    f.run(100, lambda i: 2400.0 if i == 0 else 1400.0, "failsafe", 1400.0)
    ev = f.meter.finish(f.t)
    assert ev is not None
    assert ev.baseline_method == METHOD_FIRST_SAMPLE
    assert ev.baseline_w == pytest.approx(2400e3)
    assert ev.energy_curtailed_kwh == pytest.approx(99 * 1000.0 / 3600)
    assert f.meter.finish(f.t) is None


def test_negative_reductions_count_in_the_average_not_in_the_energy() -> None:
    f = Feed(meter())
    f.run(900, 2000.0)
    f.run(100, lambda i: 2200.0 if i < 50 else 1000.0, "dispatch", 1000.0)
    f.run(1, 2000.0)
    [ev] = f.events
    assert ev.energy_curtailed_kwh == pytest.approx(50 * 1000.0 / 3600)
    assert ev.avg_reduction_kw == pytest.approx((50 * -200.0 + 50 * 1000.0) / 100)
    assert ev.min_reduction_kw == pytest.approx(1000.0)  # after the allowance
    assert ev.met is None and ev.met_fraction is None  # a dispatch promises nothing


def test_a_stalled_feed_is_not_integrated_over() -> None:
    m = meter()
    f = Feed(m)
    f.run(900, 2000.0)
    m.sample(f.t, 1000e3, "price", 0.0, price_usd_per_mwh=None, revenue_usd_per_mwh=0.0)
    ev = m.sample(
        f.t + 100.0, 2000e3, "default", 3e6, price_usd_per_mwh=None, revenue_usd_per_mwh=0
    )
    assert ev is not None
    assert ev.energy_curtailed_kwh == pytest.approx(1000.0 * 10.0 / 3600)  # 10 s, not 100 s


# --- targets met -------------------------------------------------------------------------


def test_a_commitment_is_judged_after_the_ramp_in_allowance() -> None:
    f = Feed(meter(tol_kw=20.0, allowance_s=60.0))
    f.run(900, 2000.0)
    # 50 s still at 2000 kW (inside the 60 s allowance), 200 s at 1010 kW (within 1000 + 20),
    # 50 s at 1100 kW (above): judged from second 60, 190 of 240 judged seconds within.
    f.run(
        300,
        lambda i: 2000.0 if i < 50 else 1010.0 if i < 250 else 1100.0,
        "commitment",
        1000.0,
    )
    f.run(1, 2000.0)
    [ev] = f.events
    assert ev.met is False
    assert ev.met_fraction == pytest.approx(190 / 240)
    # Same without the excursion: met.
    g = Feed(meter(tol_kw=20.0, allowance_s=60.0))
    g.run(900, 2000.0)
    g.run(300, lambda i: 2000.0 if i < 50 else 1010.0, "peak", 1000.0)
    g.run(1, 2000.0)
    [ok] = g.events
    assert ok.met is True and ok.met_fraction == pytest.approx(1.0)


def test_a_lower_target_within_an_event_gets_its_own_allowance() -> None:
    f = Feed(meter(tol_kw=20.0, allowance_s=60.0))
    f.run(900, 2000.0)
    # 1500 kW for 200 s, then 1000 kW: the site takes 30 s to follow the drop.
    f.run(200, 1500.0, "commitment", 1500.0)
    f.run(200, lambda i: 1500.0 if i < 30 else 1000.0, "commitment", 1000.0)
    f.run(1, 2000.0)
    [ev] = f.events
    assert ev.met is True
    assert ev.target_w == pytest.approx(1000e3)
    # A rise of the target is no new ramp-in: a site slow to come back up is still within.
    g = Feed(meter(tol_kw=20.0, allowance_s=60.0))
    g.run(900, 2000.0)
    g.run(200, 1000.0, "commitment", 1000.0)
    g.run(100, lambda i: 1300.0 if i < 20 else 1500.0, "commitment", 1500.0)
    g.run(1, 2000.0)
    assert g.events[0].met is True


def test_an_event_shorter_than_the_allowance_is_not_judged() -> None:
    f = Feed(meter(allowance_s=60.0))
    f.run(900, 2000.0)
    f.run(30, 1900.0, "commitment", 1000.0)
    f.run(1, 2000.0)
    [ev] = f.events
    assert ev.met is None and ev.met_fraction is None
    assert ev.min_reduction_kw == pytest.approx(100.0)  # over the whole event then


# --- value -----------------------------------------------------------------------------


def test_cost_avoided_and_revenue_forgone_at_the_prices_received() -> None:
    f = Feed(meter())
    f.run(900, 2000.0)
    # 1000 kW less for an hour: 1 MWh, at 50 USD/MWh; mining would have earned 40 USD/MWh.
    f.run(3600, 1000.0, "price", 1000.0, price=50.0, revenue=40.0)
    f.run(1, 2000.0)
    [ev] = f.events
    assert ev.energy_curtailed_kwh == pytest.approx(1000.0)
    assert ev.cost_avoided_usd == pytest.approx(50.0)
    assert ev.revenue_forgone_usd == pytest.approx(40.0)
    assert ev.priced_fraction == pytest.approx(1.0)


def test_energy_without_a_price_adds_no_cost_avoided() -> None:
    m = meter()
    f = Feed(m)
    f.run(900, 2000.0)
    f.run(1800, 1000.0, "commitment", 1000.0, price=120.0, revenue=40.0)
    f.run(1800, 1000.0, "commitment", 1000.0, price=None, revenue=40.0)
    f.run(1, 2000.0)
    [ev] = f.events
    assert ev.cost_avoided_usd == pytest.approx(0.5 * 120.0)
    assert ev.revenue_forgone_usd == pytest.approx(40.0)
    assert ev.priced_fraction == pytest.approx(0.5)
    # Nothing curtailed: nothing priced either way.
    g = Feed(meter())
    g.run(900, 2000.0)
    g.run(100, 2100.0, "price", 1000.0, price=80.0)
    g.run(1, 2000.0)
    assert g.events[0].priced_fraction is None
    assert g.events[0].cost_avoided_usd == 0.0


def test_a_negative_price_makes_curtailing_cost_money() -> None:
    f = Feed(meter())
    f.run(900, 2000.0)
    f.run(3600, 1000.0, "dispatch", 1000.0, price=-20.0)
    f.run(1, 2000.0)
    assert f.events[0].cost_avoided_usd == pytest.approx(-20.0)


# --- the baseline from the daemon, and the plot's samples --------------------------------


def test_set_baseline_replaces_the_ongoing_events_and_its_chains() -> None:
    m = meter()
    f = Feed(m)
    assert m.set_baseline(2500e3, METHOD_HIGH_4_OF_5) is False  # no event
    f.run(900, 2000.0)
    f.run(10, 1000.0, "peak", 1000.0)
    ongoing = m.ongoing
    assert ongoing is not None and ongoing.baseline_w == pytest.approx(2000e3)
    assert m.set_baseline(2500e3, METHOD_HIGH_4_OF_5, chain_started_at=T0) is False  # stale
    assert m.set_baseline(2500e3, METHOD_HIGH_4_OF_5, chain_started_at=ongoing.started_at)
    f.run(10, 1000.0, "commitment", 1000.0)
    f.run(1, 2000.0)
    peak, commitment = f.events
    for ev in (peak, commitment):
        assert ev.baseline_w == pytest.approx(2500e3)
        assert ev.baseline_method == METHOD_HIGH_4_OF_5
        assert ev.energy_curtailed_kwh == pytest.approx(1500.0 * 10 / 3600)
    # w None keeps the value and names the method (no five days: the recent one stays).
    f.run(5, 1000.0, "price", 1000.0)
    assert m.set_baseline(None, "recent (no 5 days)")
    assert m.ongoing is not None and m.ongoing.baseline_method == "recent (no 5 days)"


def test_samples_are_downsampled_for_the_plot() -> None:
    f = Feed(meter())
    f.run(900, 2000.0)
    f.run(7200, lambda i: 1000.0 + (i % 2) * 100.0, "price", 1000.0)
    f.run(1, 2000.0)
    [ev] = f.events
    assert 0 < len(ev.samples) <= MAX_EVENT_SAMPLES
    t = np.array([s[0] for s in ev.samples])
    assert t[0] == ev.started_at and np.all(np.diff(t) > 0)
    assert [s[1] for s in ev.samples] == pytest.approx([1050.0] * len(ev.samples))
    assert {s[2] for s in ev.samples} == {1000.0}


# --- high 4 of 5 ---------------------------------------------------------------------------


def day_series(
    day: int, kw: float, hours: tuple[float, float] = (14, 16)
) -> tuple[np.ndarray, np.ndarray]:
    """One past day's 1 Hz samples at `kw` over [hours) UTC, `day` days before T0's date."""
    t0 = T0 - day * 86400.0 + (hours[0] - 12) * 3600.0
    t = t0 + np.arange(int((hours[1] - hours[0]) * 3600), dtype=np.float64)
    return t, np.full(t.shape, kw * KW)


def test_high_4_of_5_averages_the_four_highest_days() -> None:
    days = [
        day_series(d, kw)
        for d, kw in zip((7, 6, 5, 4, 3), (1000, 2000, 3000, 4000, 5000), strict=True)
    ]
    start, end = 14 * 3600.0, 16 * 3600.0
    assert high_4_of_5_baseline(days, start, end) == pytest.approx(3500e3)
    # Fewer than 5 days with data: None.
    assert high_4_of_5_baseline(days[1:], start, end) is None
    thin = [*days[1:], (days[0][0][:10], days[0][1][:10])]  # 10 s of a 2 h window
    assert high_4_of_5_baseline(thin, start, end) is None
    # Six days: the 5 latest count (the 9000 kW day is a week older).
    older = day_series(10, 9000)
    assert high_4_of_5_baseline([older, *days], start, end) == pytest.approx(3500e3)



def test_high_2_of_3_for_weekends_and_bad_k_of_n() -> None:
    days = [day_series(d, kw) for d, kw in zip((9, 8, 2), (500, 3000, 2000), strict=True)]
    start, end = 14 * 3600.0, 16 * 3600.0
    assert high_k_of_n_baseline(days, start, end, k=2, n=3) == pytest.approx(2500e3)
    assert high_k_of_n_baseline(days[1:], start, end, k=2, n=3) is None
    with pytest.raises(ValueError, match="0 < k <= n"):
        high_k_of_n_baseline(days, start, end, k=4, n=3)

def test_high_4_of_5_cuts_whole_days_to_the_local_window() -> None:
    tz = ZoneInfo("America/Chicago")
    days = []
    for d, kw in zip(range(5), (1000, 2000, 3000, 4000, 5000), strict=True):
        midnight = datetime(2024, 6, 3 + d, tzinfo=tz).timestamp()  # Monday to Friday
        t = midnight + np.arange(0, 86400, 1.0)
        local_h = (t - midnight) / 3600
        # The day's level in the window (14:00-16:00 local), 9999 kW outside it.
        w = np.where((local_h >= 14) & (local_h < 16), kw * KW, 9999 * KW)
        days.append((t, w))
    got = high_4_of_5_baseline(days, 14 * 3600.0, 16 * 3600.0, tz="America/Chicago")
    assert got == pytest.approx(3500e3)
    # In UTC the window is another stretch of the day: the high outside level comes in.
    assert high_4_of_5_baseline(days, 14 * 3600.0, 16 * 3600.0, tz="UTC") == pytest.approx(9999e3)


def test_high_4_of_5_window_across_midnight() -> None:
    days = []
    for d in range(5):
        midnight = datetime(2024, 6, 3 + d, tzinfo=UTC).timestamp()
        t = midnight + np.arange(0, 2 * 86400, 1.0)
        tod = np.mod(t - midnight, 86400) / 3600
        w = np.where((tod >= 23) | (tod < 1), 1000 * KW * (d + 1), 0.0)
        days.append((t, w))
    got = high_4_of_5_baseline(days, 23 * 3600.0, 1 * 3600.0, tz="UTC")
    assert got == pytest.approx(3500e3)
