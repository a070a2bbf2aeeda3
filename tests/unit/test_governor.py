"""The daemon's side of the rails, against a real journal file: commitments put back after a
restart (with the baseline a `reduce_by` one fixed), price, peak and economics messages
taken or rejected, and the tracker following the rails' level."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from controller.config import load_config
from controller.governor import Governor
from controller.journal import Journal, TelemetrySample
from controller.market.rails import RAILS
from controller.metrics import Metrics
from controller.target import TargetTracker
from controller.wire.dispatch import Dispatch
from controller.wire.timestamps import rfc3339
from tests.helpers import until

SITE = """
site_id = "gov"
[site]
min_kw = 0.0
max_kw = 2000.0
[economics]
hashprice_usd_per_ph_day = 50.0
[price_rule]
min_stopped_s = 0
resume_stagger_s = 0
[peaks]
peak_kw = 300.0
[meter]
host = "127.0.0.9"
[[devices]]
name = "old"
template = "modbus-load"
count = 2
address = "127.0.0.1"
overrides = { kind = "old", efficiency_j_per_th = 30.0 }
"""


def governor(
    tmp_path: Path, journal: Journal | None, extra: str = ""
) -> tuple[Governor, TargetTracker, Metrics]:
    cfg_path = tmp_path / "site.toml"
    cfg_path.write_text(SITE + extra)
    cfg = load_config(cfg_path)
    tracker = TargetTracker(cfg.site.site, cfg.site.failsafe, 2e6, now_mono=time.monotonic())
    metrics = Metrics("test")
    return Governor(cfg, tracker, metrics, journal), tracker, metrics


def commitment(now: float, *, seq: int, end_in: float, by_kw: float) -> tuple[bytes, Dispatch]:
    d = Dispatch(
        f"c{seq}", seq, now, "commitment", 0.0, start_at=now - 10.0, end_at=now + end_in,
        reduce_by_w=by_kw * 1e3,
    )  # fmt: skip
    return d.encode(), d


def test_commitments_not_over_come_back_after_a_restart_with_their_baseline(
    tmp_path: Path,
) -> None:
    now = time.time()
    db = tmp_path / "journal.sqlite"
    with Journal(db) as j:
        for seq, end_in in ((1, -5.0), (2, 600.0)):  # one over, one not
            payload, d = commitment(now - 20.0, seq=seq, end_in=end_in + 20.0, by_kw=400.0)
            j.record_dispatch(now - 20.0, payload, d)
        j.record_event("commitment_baseline", "c2 1500000.0", at=now - 10.0)
        assert j.flush()
    with Journal(db) as j:
        gov, tracker, _ = governor(tmp_path, j)
        limits = load_config(tmp_path / "site.toml").site.site
        assert gov.resume(limits, None, now) == 1
        gov.tick(now, time.monotonic(), upper=None, site_w=1.2e6, target_w=1.1e6, full_w=2e6)
        assert gov.governing == "commitment"
        assert gov.decision.wish_w == pytest.approx(1.1e6)  # 1500 kW baseline - 400 kW
        assert tracker.base_w == pytest.approx(1.1e6)


def test_price_peak_and_economics_messages_are_taken_or_rejected(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.sqlite") as j:
        gov, tracker, metrics = governor(tmp_path, j)
        now = time.time()
        strike = gov.rule.strikes()["old"]
        quote = (
            f'{{"interval_start": "{rfc3339(now - 1)}", "interval_s": 300, '
            f'"usd_per_mwh": {strike + 1}}}'
        ).encode()
        gov.on_price(quote)
        gov.tick(now, time.monotonic(), upper=None, site_w=600e3, target_w=600e3, full_w=600e3)
        assert gov.governing == "price"
        assert gov.decision.wish_w == pytest.approx(600e3 - 2 * 225e3)
        # A new hashprice moves every strike at once.
        gov.on_economics(b'{"hashprice_usd_per_ph_day": 500}')
        assert gov.rule.strikes()["old"] == pytest.approx(10 * strike)
        for bad in (b"{", b'{"usd_per_mwh": 10}', b'{"hashprice_usd_per_ph_day": -1}'):
            gov.on_price(bad)
            gov.on_economics(bad)
            gov.on_peak(bad)
        assert gov.rule.strikes()["old"] == pytest.approx(10 * strike)  # unchanged by junk
        for what in ("price", "economics", "peak"):
            rejected = metrics.registry.get_sample_value(
                "rampd_inputs_rejected_total", {"input": what}
            )
            assert rejected == 3, what
        stale = (
            f'{{"interval_start": "{rfc3339(now - 4000)}", "interval_s": 300, '
            f'"usd_per_mwh": 1}}'
        ).encode()
        gov.on_price(stale)
        assert gov.rule.last_quote is not None and gov.rule.last_quote.usd_per_mwh > 1
        peak = f'{{"start": "{rfc3339(now)}", "end": "{rfc3339(now + 60)}", "probability": 0.9}}'
        gov.on_peak(peak.encode())
        gov.tick(now + 1, time.monotonic(), upper=None, site_w=150e3, target_w=150e3, full_w=600e3)
        assert gov.decision.wishes["peak"] == 300e3
        gov.tick(
            now + 2, time.monotonic(), upper=("dispatch", "setpoint d1"), site_w=150e3,
            target_w=150e3, full_w=600e3,
        )  # fmt: skip
        assert gov.governing == "dispatch"
        gov.tick(
            now + 3, time.monotonic(), upper=("dispatch", "setpoint d1"), site_w=150e3,
            target_w=150e3, full_w=600e3,
            upper_wishes={"failsafe": None, "frequency": None, "dispatch": 150e3},
        )  # fmt: skip
        asks = gov.report(now + 3).wishes_w
        assert list(asks) == [r for r in RAILS if r in asks]  # highest precedence first
        assert list(asks)[:3] == ["failsafe", "frequency", "dispatch"]
        assert asks["dispatch"] == 150e3 and asks["peak"] == 300e3 and asks["failsafe"] is None
        wish = metrics.registry.get_sample_value("rampd_rail_wish_watts", {"rail": "dispatch"})
        assert wish == 150e3
        assert j.flush()
        rails = [e.text for e in j.events_between(now - 1, now + 10) if e.kind == "rail"]
        assert [r.split(":")[0] for r in rails] == ["default -> price", "price -> dispatch"]
        assert tracker.base_governed


@pytest.mark.parametrize(
    ("day", "method", "expected_kw"),
    [
        # Wednesday 12 June 2024: the last 5 weekdays are 5-7, 10, 11; the 4 highest of them.
        (12, "high_4_of_5", (600 + 700 + 1000 + 1100) / 4),
        # Sunday 16 June: the last 3 weekend days are 8, 9, 15; the 2 highest.
        (16, "high_2_of_3", (900 + 1500) / 2),
    ],
)
async def test_a_new_event_takes_its_like_day_baseline_from_the_journal(
    tmp_path: Path, day: int, method: str, expected_kw: float
) -> None:
    tz = ZoneInfo("America/Chicago")  # [peaks] timezone's default, the M&V's local time

    def local(d: int, hour: float) -> float:
        return datetime(2024, 6, d, tzinfo=tz).timestamp() + hour * 3600.0

    with Journal(tmp_path / "journal.sqlite") as j:
        # Each past day 13:00-16:00 local, every 10 s, at its date x 100 kW.
        for d in range(1, day):
            for t in np.arange(local(d, 13), local(d, 16), 10.0):
                j.record_telemetry(
                    TelemetrySample(at=float(t), measured_w=d * 100e3, measured_source="meter")
                )
            assert j.flush()  # a day at a time: the writer's queue is bounded
        gov, _, _ = governor(tmp_path, j, '[mv]\nbaseline = "high_4_of_5"\n')
        at = local(day, 14.0)
        gov.tick(
            at, time.monotonic(), upper=("dispatch", "setpoint d1"), site_w=400e3,
            target_w=400e3, full_w=2e6,
        )  # fmt: skip
        ongoing = gov.meter.ongoing
        assert ongoing is not None and ongoing.chain_started_at == at

        def looked_up() -> bool:
            o = gov.meter.ongoing
            return o is not None and o.baseline_method == method

        await until(looked_up, 10.0, what=f"the {method} baseline")
        o = gov.meter.ongoing
        assert o is not None and o.baseline_w == pytest.approx(expected_kw * 1e3)
        # Without like days in the journal the event says it fell back.
        gov2, _, _ = governor(tmp_path, j, '[mv]\nbaseline = "high_4_of_5"\n')
        gov2.tick(
            local(3, 14.0), time.monotonic(), upper=("dispatch", "setpoint d1"),
            site_w=400e3, target_w=400e3, full_w=2e6,
        )  # fmt: skip

        def fell_back() -> bool:
            o = gov2.meter.ongoing
            return o is not None and o.baseline_method == "recent (no like days)"

        await until(fell_back, 10.0, what="the fallback to recent")
