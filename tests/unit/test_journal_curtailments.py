"""Curtailment events in the journal (schema 4): record and read back, the migration from a
schema 3 journal, and the past weekdays' site power a high-4-of-5 baseline averages."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from controller.journal import (
    SCHEMA_VERSION,
    CurtailmentEvent,
    Journal,
    JournalReader,
    TelemetrySample,
)
from controller.journal.schema import MIGRATIONS
from controller.market.mv import EventMeter, high_4_of_5_baseline, high_k_of_n_baseline

T0 = 1_717_243_200.0  # 2024-06-01T12:00:00Z
TZ = "America/Chicago"
KEEP = dict(retention_days=100 * 365.0, telemetry_retention_days=100 * 365.0)
"""Retention that keeps 2024's rows (it prunes at open)."""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite"


@pytest.fixture
def journal(db: Path) -> Iterator[Journal]:
    j = Journal(db, **KEEP)
    try:
        yield j
    finally:
        j.close()


def metered_event(start: float, rail: str = "commitment") -> CurtailmentEvent:
    """An event measured by the real meter: 900 s at 2000 kW, then 600 s at 1000 kW."""
    m = EventMeter(baseline_minutes=15, tol_w=20e3)
    t = start - 900.0
    while t < start + 600.0:
        rail_now = "default" if t < start else rail
        site = 2000e3 if t < start else 1000e3
        m.sample(
            t, site, rail_now, 1000e3, price_usd_per_mwh=90.0, revenue_usd_per_mwh=45.0,
            detail="commitment c-7",
        )  # fmt: skip
        t += 1.0
    ev = m.finish(t)
    assert ev is not None
    return ev


def bare_event(start: float, **fields: object) -> CurtailmentEvent:
    base: dict[str, object] = dict(
        rail="price", started_at=start, ended_at=start + 60.0, baseline_w=2e6,
        baseline_method="recent (no 5 days)", target_w=None, energy_curtailed_kwh=0.0,
        avg_reduction_kw=-5.0, min_reduction_kw=-12.5, met=None, met_fraction=None,
        cost_avoided_usd=0.0, revenue_forgone_usd=0.0, priced_fraction=None,
        samples=((start, 2005.0, math.nan),), detail="",
    )  # fmt: skip
    base.update(fields)
    return CurtailmentEvent(**base)  # type: ignore[arg-type]


def same(a: CurtailmentEvent, b: CurtailmentEvent) -> None:
    """Equal field by field, NaN equal to NaN."""
    for name in CurtailmentEvent.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if name == "samples":
            assert np.array_equal(np.array(x), np.array(y), equal_nan=True)
        elif isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), name
        else:
            assert x == y, name


# --- record and read ----------------------------------------------------------------------


def test_curtailments_are_recorded_and_read_back(journal: Journal, db: Path) -> None:
    ev = metered_event(T0)
    assert ev.met is True and ev.energy_curtailed_kwh == pytest.approx(1000.0 * 600 / 3600)
    other = bare_event(T0 + 7200.0)
    journal.record_curtailment(other)
    journal.record_curtailment(ev)
    assert journal.flush()
    got = journal.curtailments(T0 - 10.0, T0 + 86400.0)
    assert [g.started_at for g in got] == [T0, T0 + 7200.0]  # by start time
    same(got[0], ev)
    same(got[1], other)
    assert got[0].samples and got[0].samples[0][0] == T0
    # A separate read-only reader sees the same rows.
    with JournalReader(db) as reader:
        same(reader.curtailments(T0, T0)[0], ev)


def test_curtailments_overlapping_the_window_are_returned(journal: Journal) -> None:
    journal.record_curtailment(bare_event(T0))  # T0 .. T0 + 60
    assert journal.flush()
    assert len(journal.curtailments(T0 + 30.0, T0 + 40.0)) == 1  # inside it
    assert len(journal.curtailments(T0 - 100.0, T0)) == 1  # touches its start
    assert journal.curtailments(T0 + 61.0, T0 + 100.0) == []
    assert journal.curtailments(T0 - 100.0, T0 - 1.0) == []


def test_a_bad_curtailment_is_dropped_and_counted(journal: Journal) -> None:
    journal.record_curtailment(bare_event(math.nan))
    journal.record_curtailment(bare_event(T0, met=True, met_fraction=0.97, target_w=1e6))
    assert journal.flush()
    assert journal.stats.dropped == 1
    [ev] = journal.curtailments(0.0, 2e9)
    assert ev.met is True and ev.met_fraction == 0.97 and ev.target_w == 1e6


# --- schema 3 -> 4 ---------------------------------------------------------------------


def make_schema_3(path: Path) -> None:
    """A journal as rampd with schema 3 left it, with a telemetry row and an event."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        for script in MIGRATIONS[:3]:
            conn.executescript(script)
        conn.execute("PRAGMA user_version = 3")
        conn.execute("INSERT INTO telemetry (at, measured_w) VALUES (?, ?)", (T0, 1.5e6))
        conn.execute("INSERT INTO events (at, kind, text) VALUES (?, 'start', 'v3')", (T0,))
    finally:
        conn.close()


def test_a_schema_3_journal_migrates_to_4(db: Path) -> None:
    assert SCHEMA_VERSION == 4
    make_schema_3(db)
    # The report on a journal no daemon has migrated yet: no table, no events, no error.
    with JournalReader(db) as reader:
        assert reader.curtailments(0.0, 2e9) == []
        assert [e.text for e in reader.events_between(0.0, 2e9)] == ["v3"]
    j = Journal(db, **KEEP)
    try:
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert {"curtailments", "curtailments_started_at", "deployments"} <= tables
        assert [e.text for e in j.events_between(0.0, 2e9)] == ["v3"]
        assert j.telemetry_between(0.0, 2e9).measured_w.tolist() == [1.5e6]
        ev = metered_event(T0 + 3600.0)
        j.record_curtailment(ev)
        assert j.flush()
        same(j.curtailments(0.0, 2e9)[0], ev)
    finally:
        j.close()
    Journal(db, **KEEP).close()  # opening again migrates nothing
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM curtailments").fetchone()[0] == 1


# --- the past weekdays' site power --------------------------------------------------------


def local(d: int, hour: float, month: int = 6) -> float:
    zone = ZoneInfo(TZ)
    return (datetime(2024, month, d, tzinfo=zone) + timedelta(hours=hour)).timestamp()


def test_site_power_days_takes_weekdays_without_curtailments(journal: Journal) -> None:
    # June 2024: the 1st and 2nd, 8th and 9th are weekends. Each day 13:00-16:00 local, every
    # 10 s, at a level telling the day apart (its date x 100 kW; weekends 9999 kW).
    for d in range(1, 12):
        weekend = datetime(2024, 6, d).weekday() >= 5
        kw = 9999.0 if weekend else d * 100.0
        for t in np.arange(local(d, 13), local(d, 16), 10.0):
            journal.record_telemetry(
                TelemetrySample(at=float(t), measured_w=kw * 1e3, measured_source="meter")
            )
        assert journal.flush()
    # Thursday the 6th was curtailed through the window; Monday the 10th for one minute.
    journal.record_curtailment(bare_event(local(6, 13.5), ended_at=local(6, 15.5)))
    ffr_at = local(10, 14.5)
    journal.record_curtailment(bare_event(ffr_at, rail="frequency", ended_at=ffr_at + 60.0))
    assert journal.flush()

    before = local(12, 14)  # an event on Wednesday the 12th, 14:00-15:00 local
    days = journal.site_power_days(before, 14 * 3600.0, 15 * 3600.0, TZ)
    levels = [round(float(w[0]) / 1e5) for _, w in days]
    # Oldest first: Tue 4, Wed 5, (Thu 6 curtailed), Fri 7, (weekend), Mon 10, Tue 11.
    assert levels == [4, 5, 7, 10, 11]
    for d, (t, w) in zip((4, 5, 7, 10, 11), days, strict=True):
        assert t.min() >= local(d, 14) and t.max() < local(d, 15)
        assert np.all(w == d * 100e3)
    t10 = days[3][0]
    assert t10.size == 360 - 6  # the frequency event's 60 s left out
    assert not np.any((t10 >= ffr_at) & (t10 < ffr_at + 60.0))

    baseline = high_4_of_5_baseline(days, 14 * 3600.0, 15 * 3600.0)
    assert baseline == pytest.approx((500 + 700 + 1000 + 1100) / 4 * 1e3)
    # Not enough weekdays in the lookback: fewer days, and no high-4-of-5 baseline.
    few = journal.site_power_days(before, 14 * 3600.0, 15 * 3600.0, TZ, lookback_days=6)
    assert [round(float(w[0]) / 1e5) for _, w in few] == [7, 10, 11]
    assert high_4_of_5_baseline(few, 14 * 3600.0, 15 * 3600.0) is None
    assert len(journal.site_power_days(before, 14 * 3600.0, 15 * 3600.0, TZ, n_days=2)) == 2


def test_a_weekend_event_takes_weekend_days(journal: Journal) -> None:
    # June 2024, 13:00-16:00 local every 10 s at the day's date x 100 kW: weekends 1-2, 8-9,
    # 15-16; the weekdays in between at 9999 kW, which a weekend baseline must never see.
    for d in range(1, 16):
        weekend = datetime(2024, 6, d).weekday() >= 5
        kw = d * 100.0 if weekend else 9999.0
        for t in np.arange(local(d, 13), local(d, 16), 10.0):
            journal.record_telemetry(
                TelemetrySample(at=float(t), measured_w=kw * 1e3, measured_source="meter")
            )
        assert journal.flush()
    before = local(16, 14)  # Sunday the 16th
    days = journal.site_power_days(before, 14 * 3600.0, 15 * 3600.0, TZ, n_days=3)
    assert [round(float(w[0]) / 1e5) for _, w in days] == [8, 9, 15]
    got = high_k_of_n_baseline(days, 14 * 3600.0, 15 * 3600.0, k=2, n=3)
    assert got == pytest.approx((900 + 1500) / 2 * 1e3)
    # A weekday event the same week takes the weekdays (Monday the 17th: 10-14, all 9999).
    monday = journal.site_power_days(local(17, 14), 14 * 3600.0, 15 * 3600.0, TZ)
    assert len(monday) == 5 and all(np.all(w == 9999e3) for _, w in monday)
