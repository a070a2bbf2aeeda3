"""The daemon's side of the rails, against a real journal file: commitments put back after a
restart (with the baseline a `reduce_by` one fixed), price, peak and economics messages
taken or rejected, and the tracker following the rails' level."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from controller.config import load_config
from controller.governor import Governor
from controller.journal import Journal
from controller.metrics import Metrics
from controller.target import TargetTracker
from controller.wire.dispatch import Dispatch
from controller.wire.timestamps import rfc3339

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


def governor(tmp_path: Path, journal: Journal) -> tuple[Governor, TargetTracker, Metrics]:
    cfg_path = tmp_path / "site.toml"
    cfg_path.write_text(SITE)
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
        assert j.flush()
        rails = [e.text for e in j.events_between(now - 1, now + 10) if e.kind == "rail"]
        assert [r.split(":")[0] for r in rails] == ["default -> price", "price -> dispatch"]
        assert tracker.base_governed
