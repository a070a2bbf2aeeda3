"""The journal on real SQLite files: WAL, batching writer, retention, restart resume, failures."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.config import SiteLimits
from controller.journal import (
    EVENT_DISPATCH_DROPPED,
    SCHEMA_VERSION,
    Journal,
    JournalError,
    JournalReader,
    RampRecord,
    TelemetrySample,
    default_journal_path,
)
from controller.wire import Dispatch, DispatchRejected, Telemetry, rfc3339

LIMITS = SiteLimits(min_kw=0.0, max_kw=3000.0)
DAY = 86400.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite"


@pytest.fixture
def journal(db: Path) -> Iterator[Journal]:
    j = Journal(db)
    try:
        yield j
    finally:
        j.close()


def payload(seq: int, at: float, **fields: Any) -> bytes:
    body: dict[str, Any] = {
        "id": f"d{seq}",
        "seq": seq,
        "issued_at": rfc3339(at),
        "mode": "setpoint",
        "target_kw": 1000.0 + seq,
    }
    for key, value in fields.items():
        body[key] = rfc3339(value) if key in ("start_at", "expires_at") else value
    return json.dumps(body).encode()


def accept(j: Journal, seq: int, at: float, **fields: Any) -> bytes:
    """Parse a real payload at `at` (the daemon's path) and journal the accepted dispatch."""
    raw = payload(seq, at, **fields)
    d = Dispatch.decode(raw, now_unix=at, last_seq=None, limits=LIMITS)
    j.record_dispatch(at, raw, d)
    return raw


def reject(j: Journal, raw: bytes, at: float, last_seq: int | None = None) -> DispatchRejected:
    with pytest.raises(DispatchRejected) as info:
        Dispatch.decode(raw, now_unix=at, last_seq=last_seq, limits=LIMITS)
    j.record_dispatch(at, raw, info.value)
    return info.value


def sample(at: float, measured_kw: float = 1000.0, mode: str = "normal") -> TelemetrySample:
    return TelemetrySample(
        at=at,
        measured_w=measured_kw * 1e3,
        measured_source="meter",
        target_w=1e6,
        min_w=2e5,
        max_w=2.5e6,
        up_w=(1e4, 5e4, 3e5),
        down_w=(2e4, 1e5, 6e5),
        mode=mode,
        saturated=False,
        devices={"on": 250, "sleeping": 3, "waking": 0, "fault": 1, "unknown": 2},
    )


def count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# --- opening ------------------------------------------------------------------------------


def test_open_creates_schema_in_wal_mode(journal: Journal, db: Path) -> None:
    assert journal.flush()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"dispatches", "acks", "ramps", "telemetry", "events", "meta"} <= tables
    assert Path(f"{db}-wal").exists()


def test_missing_directory_fails_at_open_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="does not exist"):
        Journal(tmp_path / "nope" / "journal.sqlite")


def test_read_only_directory_fails_at_open_with_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # Root ignores permission bits; /proc is a directory where no file can be created.
        where = Path("/proc")
    else:
        where = tmp_path / "ro"
        where.mkdir()
        where.chmod(0o555)
    with pytest.raises(JournalError, match=r"journal directory .* not writable"):
        Journal(where / "journal.sqlite")


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.sqlite"
    text.write_text("hello, not a database\n" * 100)
    with pytest.raises(JournalError, match="cannot open journal"):
        Journal(text)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(JournalError, match="not a rampd journal"):
        Journal(other)


def test_a_newer_schema_is_refused(db: Path) -> None:
    Journal(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(JournalError, match="newer"):
        Journal(db)
    with pytest.raises(JournalError, match="newer"):
        JournalReader(db)


def test_reader_needs_an_existing_journal(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="no journal"):
        JournalReader(tmp_path / "absent.sqlite")


def test_default_path_follows_systemd_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/rampd:/var/lib/other")
    assert default_journal_path() == Path("/var/lib/rampd/journal.sqlite")
    monkeypatch.delenv("STATE_DIRECTORY")
    assert default_journal_path() == Path("/var/lib/rampd/journal.sqlite")


# --- writing ------------------------------------------------------------------------------


def test_everything_recorded_is_there_after_close_and_reopen(db: Path) -> None:
    now = time.time()
    j = Journal(db, queue_max=50_000)
    for i in range(20_000):
        j.record_telemetry(sample(now - 20_000 + i, 1000.0 + i % 7))
    raw = accept(j, 5, now)
    j.record_ack(now, "d5", 5, True, "")
    reject(j, b"{not json", now)
    j.record_ack(now, None, None, False, "payload not JSON")
    j.record_event("start", "rampd 0.1.0", at=now)
    j.record_ramp(
        RampRecord(now, "d5", 1.5e6, 1e6, 2e4, now + 3.2, 3.2, 1.1e4, 5e5, 2.9, "settled", now + 13)
    )
    j.close()  # no explicit flush: close must flush
    assert j.stats.dropped == 0
    assert j.stats.written == 20_006

    with JournalReader(db) as r:
        tel = r.telemetry_between(now - DAY, now + DAY)
        assert len(tel) == 20_000
        assert np.all(np.diff(tel.at) > 0)
        assert tel.measured_w[7] == pytest.approx(1000e3)
        assert tel.up_w[:, 0] == pytest.approx([1e4, 5e4, 3e5])
        # A state the sample does not name (unresponsive) is unknown, not zero.
        assert tel.devices[:, 0] == pytest.approx([250, 3, 0, 1, 2, np.nan], nan_ok=True)
        assert tel.mode[0] == "normal" and tel.measured_source[0] == "meter"
        ds = r.dispatches_between(now - 1, now + 1)
        assert [d.decision for d in ds] == ["accepted", "rejected"]
        assert ds[0].payload == raw and ds[0].seq == 5 and ds[0].target_w == 1005e3
        assert ds[1].payload == b"{not json" and ds[1].code == "not_json"
        acks = r.acks_between(now - 1, now + 1)
        assert [(a.id, a.accepted) for a in acks] == [("d5", True), (None, False)]
        assert [e.kind for e in r.events_between(now - 1, now + 1)] == ["start"]
        (ramp,) = r.ramps_between(now - 1, now + 1)
        assert ramp.settle_s == 3.2 and ramp.outcome == "settled" and ramp.ratio is not None
        assert r.last_seq() == 5
        assert r.last_target() == (pytest.approx(now - 1), 1e6)
    # Reopened for writing, it carries on from the same data.
    j2 = Journal(db)
    try:
        assert j2.last_seq() == 5
        assert len(j2.telemetry_between(now - DAY, now + DAY)) == 20_000
    finally:
        j2.close()
    assert not Path(f"{db}-wal").exists()  # checkpointed and removed by the last close


def test_records_never_block_or_raise_while_the_database_is_locked(db: Path) -> None:
    """Another process holds the write lock: the writer fails, the callers never notice."""
    now = time.time()
    j = Journal(db, queue_max=100, busy_timeout_s=0.05)
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        for i in range(2000):  # far more than the queue holds
            j.record_telemetry(sample(now + i))
            j.record_event("tick", f"{i}", at=now + i)
        deadline = time.monotonic() + 10
        while j.stats.write_errors == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = j.stats
        assert stats.write_errors >= 1 and not stats.healthy
        assert stats.dropped > 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # The lock is gone: writes recover and what was not dropped is there.
    j.record_event("after", "lock released", at=now)
    assert j.flush(timeout_s=30)
    stats = j.stats
    assert stats.healthy
    assert stats.written + stats.dropped == 4001
    j.close()
    assert count(db, "telemetry") + count(db, "events") == stats.written


def test_disk_full_after_open_does_not_raise_into_the_caller(tmp_path: Path) -> None:
    """A real EFBIG: the file-size limit stops the -wal file growing in a child process."""
    script = textwrap.dedent(
        """
        import json, os, resource, signal, sys, time
        from pathlib import Path
        from controller.journal import Journal, TelemetrySample

        path = Path(sys.argv[1])
        j = Journal(path, busy_timeout_s=0.1)
        j.record_event("start", "x")
        assert j.flush(10)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        sizes = [os.path.getsize(p) for p in (path, Path(f"{path}-wal"))]
        resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes) + 65536, hard))
        now = time.time()
        for i in range(3000):
            j.record_event("big", "x" * 4000, at=now + i)
            if i % 100 == 0:
                time.sleep(0.01)  # let the writer hit the limit while we keep recording
        j.flush(20)
        failing = j.stats
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        time.sleep(1.5)  # the writer's backoff
        j.record_event("after", "disk has room again", at=now)
        recovered = j.flush(60)
        j.close()
        print(json.dumps({"failing": failing.write_errors, "healthy_then": failing.healthy,
                          "recovered": recovered, "healthy": j.stats.healthy,
                          "dropped": j.stats.dropped}))
        """
    )
    db = tmp_path / "journal.sqlite"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(db)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["failing"] >= 1 and out["healthy_then"] is False
    assert out["dropped"] > 0
    assert out["recovered"] and out["healthy"]
    assert proc.stderr.count("journal write failed") == 1  # once per change of state
    with JournalReader(db) as r:
        kinds = {e.kind for e in r.events_between(0, time.time() + 10_000)}
    assert {"start", "after"} <= kinds


def test_bad_records_are_dropped_and_counted_not_raised(journal: Journal) -> None:
    now = time.time()
    journal.record_telemetry(TelemetrySample(at=math.nan))
    journal.record_event("x", "y", at=math.inf)
    journal.record_ack(now, "a", 2**70, True, "")  # seq out of range -> stored as NULL
    journal.record_ramp(
        RampRecord(now, "r", None, math.nan, 1.0, None, None, 0.0, 0.0, None, "timeout", now)
    )
    journal.record_telemetry(TelemetrySample(at=now, measured_w=math.nan))  # NaN -> NULL
    assert journal.flush()
    stats = journal.stats
    assert stats.dropped == 3 and stats.written == 2 and stats.healthy
    (ack,) = journal.acks_between(now - 1, now + 1)
    assert ack.seq is None
    assert np.isnan(journal.telemetry_between(now - 1, now + 1).measured_w[0])


def test_records_after_close_are_dropped_quietly(db: Path) -> None:
    j = Journal(db)
    j.close()
    j.record_event("late", "after close")
    j.close()  # idempotent
    assert j.stats.dropped == 1


def test_retention_deletes_old_rows_periodically(db: Path) -> None:
    now = time.time()
    j = Journal(db, retention_days=90, telemetry_retention_days=14, retention_interval_s=0.1)
    try:
        accept(j, 1, now - 100 * DAY)
        j.record_ack(now - 100 * DAY, "d1", 1, True, "")
        for age in (100, 50):
            j.record_event("e", f"{age} days old", at=now - age * DAY)
        for age in (20, 10):
            j.record_telemetry(sample(now - age * DAY))
        assert j.flush()
        deadline = time.monotonic() + 10
        while j.stats.pruned < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert j.stats.pruned == 4
        assert [e.text for e in j.events_between(0, now)] == ["50 days old"]
        assert len(j.telemetry_between(0, now)) == 1
        assert j.dispatches_between(0, now) == [] and j.acks_between(0, now) == []
        assert j.last_seq() == 1  # kept beyond the rows' retention
    finally:
        j.close()


def test_retention_runs_at_open(db: Path) -> None:
    now = time.time()
    with Journal(db, telemetry_retention_days=1) as j:
        j.record_telemetry(sample(now - 2 * DAY))
        j.record_telemetry(sample(now))
    j = Journal(db, telemetry_retention_days=1)
    try:
        assert j.flush()
        assert len(j.telemetry_between(0, now + 1)) == 1
    finally:
        j.close()


# --- resuming after a restart --------------------------------------------------------------


def test_nothing_to_resume_in_an_empty_journal(journal: Journal) -> None:
    assert journal.last_valid_dispatch(time.time()) is None
    assert journal.last_seq() is None
    assert journal.last_target() is None


def test_resume_the_latest_accepted_dispatch(journal: Journal) -> None:
    t = time.time()
    accept(journal, 1, t)
    b = accept(journal, 2, t + 10)
    reject(journal, payload(3, t + 20, target_kw=-5.0), t + 20, last_seq=2)
    reject(journal, payload(1, t + 21), t + 21, last_seq=2)  # a replay
    assert journal.flush()
    assert journal.last_valid_dispatch(t + 30) == (b,)
    assert journal.last_seq() == 2  # rejected seqs do not count
    # The payload is the raw bytes as received: the daemon parses it again.
    d = Dispatch.decode(b, now_unix=t + 10, last_seq=None, limits=LIMITS)
    assert isinstance(d, Dispatch) and d.seq == 2


def test_an_expired_dispatch_is_not_resumed(journal: Journal) -> None:
    t = time.time()
    a = accept(journal, 1, t, expires_at=t + 60)
    assert journal.flush()
    assert journal.last_valid_dispatch(t + 59) == (a,)
    assert journal.last_valid_dispatch(t + 61) is None
    assert journal.last_seq() == 1  # still refused as a replay


def test_a_pending_dispatch_is_resumed_with_the_one_in_force(journal: Journal) -> None:
    t = time.time()
    a = accept(journal, 1, t)
    accept(journal, 2, t + 1, start_at=t + 100)
    p3 = accept(journal, 3, t + 2, start_at=t + 200)  # supersedes the pending seq 2
    assert journal.flush()
    assert journal.last_valid_dispatch(t + 10) == (a, p3)
    assert journal.last_valid_dispatch(t + 150) == (a, p3)  # seq 2 never starts
    assert journal.last_valid_dispatch(t + 250) == (p3,)


def test_an_immediate_dispatch_supersedes_a_pending_one(journal: Journal) -> None:
    t = time.time()
    accept(journal, 1, t)
    accept(journal, 2, t + 1, start_at=t + 100)
    c = accept(journal, 3, t + 2)
    assert journal.flush()
    assert journal.last_valid_dispatch(t + 200) == (c,)


def test_expiry_before_a_pending_start(journal: Journal) -> None:
    t = time.time()
    accept(journal, 1, t, expires_at=t + 50)
    p = accept(journal, 2, t + 1, start_at=t + 100, expires_at=t + 300)
    assert journal.flush()
    assert journal.last_valid_dispatch(t + 60) == (p,)
    assert journal.last_valid_dispatch(t + 400) is None


def test_a_release_in_force_is_resumed(journal: Journal) -> None:
    t = time.time()
    accept(journal, 1, t)
    r = accept(journal, 2, t + 1, mode="release", expires_at=t + 5)  # a release never expires
    assert journal.flush()
    assert journal.last_valid_dispatch(t + 100) == (r,)


def test_a_failsafe_drop_ends_what_was_in_force(journal: Journal) -> None:
    t = time.time()
    accept(journal, 1, t)
    accept(journal, 2, t + 1, start_at=t + 500)
    journal.record_event(EVENT_DISPATCH_DROPPED, "failsafe: policy min", at=t + 61)
    assert journal.flush()
    assert journal.last_valid_dispatch(t + 100) is None
    b = accept(journal, 3, t + 200)
    assert journal.flush()
    assert journal.last_valid_dispatch(t + 300) == (b,)


# --- rows from the daemon's own shapes ---------------------------------------------------


def test_telemetry_sample_from_the_model_as_published() -> None:
    wire = {
        "at": "2024-05-01T12:00:00.000Z",
        "measured_kw": 1200.5,
        "measured_source": "meter",
        "target_kw": 1200.0,
        "min_kw": 100.0,
        "max_kw": 3000.0,
        "noncontrollable_kw": 80.0,
        "capability": {
            "up_kw": {"1s": 10.0, "5s": 50.0, "60s": 900.0},
            "down_kw": {"1s": 20.0, "5s": 100.0, "60s": None},
        },
        "devices": {"on": 250, "sleeping": 0, "waking": 0, "fault": 1, "unknown": 0},
        "mode": "normal",
        "saturated": -1,
        "cycle": {"count": 10, "overruns": 0},
    }
    tel = Telemetry.decode(json.dumps(wire).encode())
    s = TelemetrySample.from_telemetry(tel)
    assert s.at == tel.at
    assert s.measured_w == pytest.approx(1_200_500.0)
    assert s.up_w == pytest.approx((1e4, 5e4, 9e5))
    assert s.down_w[2] is None and s.saturated == -1 and s.mode == "normal"
    assert s.devices is not None and s.devices["fault"] == 1
    before_first_cycle = Telemetry(at=2.0, mode="normal")
    empty = TelemetrySample.from_telemetry(before_first_cycle)
    assert empty.measured_w is None and empty.up_w == (None, None, None)
