"""The lower rails (commitments, peaks, price, default), the commitment dispatch on the wire,
and the target tracker following the rails' level when no grid dispatch is in force."""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from controller.config import FailsafeConfig, PeaksConfig, RampLimitsConfig, SiteLimits
from controller.market.peaks import Peaks, parse_alert
from controller.market.rails import Rails, SteadyFull
from controller.target import TargetTracker
from controller.wire.dispatch import Dispatch, DispatchRejected
from controller.wire.timestamps import rfc3339

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z, a Sunday
LIMITS = SiteLimits(min_kw=0.0, max_kw=10_000.0)


class FixedShed:
    def __init__(self, w: float = 0.0) -> None:
        self.w = w

    def shed_w(self) -> float:
        return self.w


def commitment(
    start: float, end: float, *, to_kw: float | None = None, by_kw: float | None = None,
    down_s: float = 0.0, up_s: float = 0.0, seq: int = 1,
) -> Dispatch:  # fmt: skip
    body: dict[str, object] = {
        "id": f"c{seq}", "seq": seq, "issued_at": rfc3339(T0), "mode": "commitment",
        "start_at": rfc3339(start), "end_at": rfc3339(end),
        "ramp_down_s": down_s, "ramp_up_s": up_s,
    }  # fmt: skip
    if to_kw is not None:
        body["reduce_to_kw"] = to_kw
    if by_kw is not None:
        body["reduce_by_kw"] = by_kw
    return Dispatch.decode(json.dumps(body).encode(), now_unix=T0, last_seq=None, limits=LIMITS)


def rails(shed_w: float = 0.0, peak_kw: float | None = None) -> tuple[Rails, FixedShed]:
    price = FixedShed(shed_w)
    peaks = Peaks(PeaksConfig(peak_kw=peak_kw))
    return Rails(full_w=10e6, peaks=peaks, price=price), price


def test_default_is_full_power_and_price_sheds_from_the_sites_full_power() -> None:
    r, price = rails()
    d = r.decide(T0, baseline_w=None, full_w=8e6)
    assert (d.rail, d.wish_w) == ("default", 10e6)
    price.w = 2e6
    d = r.decide(T0, baseline_w=None, full_w=8e6)
    assert (d.rail, d.wish_w) == ("price", 6e6)
    assert d.wishes["price"] == 6e6 and d.wishes["peak"] is None


def test_the_lowest_level_governs_and_precedence_breaks_ties() -> None:
    r, price = rails(shed_w=5e6, peak_kw=7000.0)
    r.peaks.on_alert(parse_alert(_alert(T0, T0 + 600, 0.9)), T0)
    d = r.decide(T0 + 1, baseline_w=None)
    assert (d.rail, d.wish_w) == ("price", 5e6)  # the price asks for less than the peak
    price.w = 3e6
    d = r.decide(T0 + 1, baseline_w=None)
    assert (d.rail, d.wish_w) == ("peak", 7e6)
    r.add_commitment(commitment(T0, T0 + 100, to_kw=7000.0))
    d = r.decide(T0 + 1, baseline_w=None)
    assert (d.rail, d.wish_w) == ("commitment", 7e6)  # a tie: the commitment ranks higher
    assert d.reason.startswith("commitment c1")


def test_a_commitment_ramps_down_holds_and_ramps_back_to_the_rails_below() -> None:
    r, _ = rails()
    r.add_commitment(commitment(T0 + 10, T0 + 70, to_kw=4000.0, down_s=20.0, up_s=10.0))
    assert r.decide(T0, baseline_w=None).rail == "default"
    mid = r.decide(T0 + 20, baseline_w=None)
    assert mid.rail == "commitment" and mid.wish_w == pytest.approx(7e6)  # half way down
    assert r.decide(T0 + 50, baseline_w=None).wish_w == pytest.approx(4e6)
    assert r.decide(T0 + 75, baseline_w=None).wish_w == pytest.approx(7e6)  # half way up
    assert r.decide(T0 + 81, baseline_w=None).rail == "default"


def test_reduce_by_is_relative_to_the_baseline_fixed_when_it_starts() -> None:
    r, _ = rails()
    r.add_commitment(commitment(T0 + 10, T0 + 70, by_kw=1500.0))
    assert r.decide(T0 + 10, baseline_w=None).rail == "default"  # waits for a baseline
    d = r.decide(T0 + 11, baseline_w=8e6)
    assert (d.rail, d.wish_w) == ("commitment", 6.5e6)
    assert r.fixed == [("c1", 8e6)]
    # The baseline is fixed: a later (curtailed) figure does not move the level.
    assert r.decide(T0 + 30, baseline_w=6.5e6).wish_w == 6.5e6


def test_commitment_dispatches_are_checked() -> None:
    def reason(**fields: object) -> str:
        body = {"id": "c", "seq": 1, "issued_at": rfc3339(T0), "mode": "commitment",
                "start_at": rfc3339(T0 + 10), "end_at": rfc3339(T0 + 100),
                "reduce_to_kw": 100.0} | fields  # fmt: skip
        body = {k: v for k, v in body.items() if v is not None}
        with pytest.raises(DispatchRejected) as err:
            Dispatch.decode(json.dumps(body).encode(), now_unix=T0, last_seq=None, limits=LIMITS)
        return err.value.reason

    assert reason(end_at=rfc3339(T0 + 5)) == "end_at not after start_at"
    assert reason(start_at=rfc3339(T0 - 100), end_at=rfc3339(T0 - 1)) == "end_at already past"
    assert reason(reduce_by_kw=5.0) == "give one of reduce_to_kw and reduce_by_kw"
    assert reason(reduce_to_kw=None) == "give one of reduce_to_kw and reduce_by_kw"
    assert "outside the site" in reason(reduce_to_kw=20_000.0)
    assert "must be above 0" in reason(reduce_to_kw=None, reduce_by_kw=0.0)
    assert reason(end_at=None) == "end_at missing"
    assert "ramp_up_s" in reason(ramp_up_s=-1)
    d = commitment(T0 + 10, T0 + 100, by_kw=250.0, down_s=30.0, up_s=60.0)
    again = Dispatch.decode(d.encode(), now_unix=T0, last_seq=None, limits=LIMITS)
    assert again == d


def _alert(start: float, end: float, p: float) -> bytes:
    return json.dumps(
        {"start": rfc3339(start), "end": rfc3339(end), "probability": p}
    ).encode()


def test_peak_alerts_below_the_threshold_and_windows_out_of_season_do_nothing() -> None:
    p = Peaks(PeaksConfig(peak_kw=500.0, min_probability=0.6, variant="4cp", hours=[16, 17]))
    tz = ZoneInfo("America/Chicago")
    july_weekday_16h = datetime(2025, 7, 15, 16, 30, tzinfo=tz).timestamp()
    july_weekend_16h = datetime(2025, 7, 19, 16, 30, tzinfo=tz).timestamp()
    march_weekday_16h = datetime(2025, 3, 18, 16, 30, tzinfo=tz).timestamp()
    july_weekday_12h = datetime(2025, 7, 15, 12, 0, tzinfo=tz).timestamp()
    assert p.active(july_weekday_16h) == "4CP window 16:00 America/Chicago"
    assert p.active(july_weekend_16h) is None
    assert p.active(march_weekday_16h) is None
    assert p.active(july_weekday_12h) is None
    p.on_alert(parse_alert(_alert(july_weekday_12h, july_weekday_12h + 900, 0.5)), 0.0)
    assert p.active(july_weekday_12h + 10) is None  # 50 % < 60 %
    # A revised forecast for the same window replaces the first.
    p.on_alert(parse_alert(_alert(july_weekday_12h, july_weekday_12h + 900, 0.7)), 0.0)
    assert len(p.alerts) == 1
    assert (p.active(july_weekday_12h + 10) or "").startswith("peak alert 70%")
    assert p.active(july_weekday_12h + 900) is None


def test_a_12cp_window_counts_every_month_and_weekends_only_when_configured() -> None:
    cfg = PeaksConfig(peak_kw=500.0, variant="12cp", hours=[17], timezone="America/New_York")
    p = Peaks(cfg)
    tz = ZoneInfo("America/New_York")
    for month in range(1, 13):
        day = next(d for d in range(1, 8) if datetime(2025, month, d).weekday() < 5)
        at = datetime(2025, month, day, 17, 5, tzinfo=tz).timestamp()
        assert p.active(at) == "12CP window 17:00 America/New_York", month
        assert p.active(at - 3600.0) is None  # 16:05: not a configured hour
    saturday = datetime(2025, 1, 4, 17, 5, tzinfo=tz).timestamp()
    assert p.active(saturday) is None
    assert Peaks(cfg.model_copy(update={"weekends": True})).active(saturday) is not None


def test_peak_alerts_are_checked() -> None:
    for bad, why in [
        (b"nope", "JSON"),
        (_alert(T0, T0 - 1, 0.5), "end not after start"),
        (_alert(T0, T0 + 1, 1.5), "probability outside 0..1"),
        (b'{"start": "2025-01-01T00:00:00Z"}', "required"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_alert(bad)


def _tracker(limits: RampLimitsConfig | None = None) -> TargetTracker:
    return TargetTracker(
        LIMITS, FailsafeConfig(dispatch_timeout_s=1e6, ramp_s=0.0), 10e6, now_mono=0.0,
        ramp_limits=limits,
    )


def _setpoint(seq: int, kw: float, *, expires_at: float | None = None) -> Dispatch:
    return Dispatch(f"d{seq}", seq, 0.0, "setpoint", kw * 1e3, expires_at=expires_at)


def test_the_tracker_follows_the_rails_level_only_without_a_grid_dispatch() -> None:
    t = _tracker()
    t.set_base(6e6, 0.0, 1.0)
    assert t.target_w(1.0) == 6e6 and t.base_governed
    t.accept(_setpoint(1, 3000.0, expires_at=100.0), 2.0, 2.0)
    t.set_base(5e6, 0.0, 3.0)
    assert t.target_w(3.0) == 3e6 and not t.base_governed  # the dispatch rules
    assert t.target_w(100.0) == 5e6  # expired: back to the rails, not the site maximum
    assert t.mode == "released"
    t.accept(_setpoint(2, 2000.0), 101.0, 101.0)
    t.accept(Dispatch("r", 3, 0.0, "release", 10e6, ramp_s=10.0), 102.0, 102.0)
    assert t.target_w(107.0) == pytest.approx(3.5e6)  # half way from 2 MW to the rails' 5 MW


def test_the_rails_level_keeps_to_the_ramp_limits() -> None:
    t = _tracker(RampLimitsConfig(down_kw_per_min=600.0))  # 10 kW/s
    t.target_w(0.0)
    t.set_base(9e6, 0.0, 0.0)
    assert t.target_w(10.0) == pytest.approx(9.9e6, abs=1e3)
    assert t.target_w(100.0) == pytest.approx(9e6)
    # And back up (a price resumption, a commitment's end) at the up limit.
    u = _tracker(RampLimitsConfig(down_kw_per_min=600.0, up_kw_per_min=300.0))  # 5 kW/s up
    u.target_w(0.0)
    u.set_base(9e6, 0.0, 0.0)
    assert u.target_w(100.0) == pytest.approx(9e6)
    u.set_base(10e6, 0.0, 100.0)
    assert u.target_w(110.0) == pytest.approx(9.05e6, abs=1e3)
    assert u.target_w(300.0) == pytest.approx(10e6)


def test_steady_full_holds_the_highest_over_its_window() -> None:
    full = SteadyFull(window_s=60.0)
    assert full.update(0.0, None) is None
    assert full.update(1.0, 1_100e3) == 1_100e3
    # A sleep transition dips the figure for a few seconds: the level does not follow.
    assert full.update(2.0, 843e3) == 1_100e3
    assert full.update(3.0, float("nan")) == 1_100e3
    assert full.update(4.0, 1_098e3) == 1_100e3
    # A device lost for good: the level comes down once the window has passed the old high.
    assert full.update(61.5, 850e3) == 1_098e3
    assert full.update(64.5, 850e3) == 850e3


def test_price_level_holds_through_a_dip_so_a_peak_keeps_governing() -> None:
    class Shed:
        def shed_w(self) -> float:
            return 450e3

    peaks = Peaks(PeaksConfig(peak_kw=400.0, min_probability=0.5))
    peaks.on_alert(parse_alert(_alert(0.0, 60.0, 0.8)), 0.0)
    rails = Rails(full_w=2_000e3, peaks=peaks, price=Shed())
    full = SteadyFull()
    for t, reported in ((1.0, 1_100e3), (2.0, 843e3), (3.0, 700e3), (4.0, 1_098e3)):
        d = rails.decide(t, baseline_w=None, full_w=full.update(t, reported))
        assert d.rail == "peak", (t, d)
    # Without the hold the dip would hand the rail to the price rule.
    assert rails.decide(3.0, baseline_w=None, full_w=700e3).rail == "price"
