"""State that survives a restart, and a journal in trouble at start, on real files.

* the failsafe's liveness record (last heard, failsafe since) round trip, through a real
  journal and two trackers on unrelated monotonic axes (a restart);
* a corrupt journal (random bytes; malformed pages) moved aside, a fresh one begun;
* a journal that cannot be written (a read-only filesystem; a full one, at start and while
  running): it opens anyway, drops and counts rows, says so once.

The full and read-only filesystems are real: a size-limited tmpfs, remounted read-only (root
ignores permission bits, not a read-only mount). Where mounting is not allowed those tests
are skipped.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.config import FailsafeConfig, SiteLimits
from controller.journal import Event, Journal, Liveness, TelemetrySample
from controller.journal.recover import EVENT_JOURNAL, open_for_daemon
from controller.liveness import LivenessRecorder, restore, start_w
from controller.metrics import Metrics
from controller.target import TargetTracker
from controller.wire import Dispatch, rfc3339

LIMITS = SiteLimits(min_kw=1000.0, max_kw=14000.0)
MIN_W = 1e6


def payload(seq: int, at: float, target_kw: float = 5000.0) -> bytes:
    body: dict[str, Any] = {
        "id": f"d{seq}", "seq": seq, "issued_at": rfc3339(at), "mode": "setpoint",
        "target_kw": target_kw,
    }  # fmt: skip
    return json.dumps(body).encode()


def accept(j: Journal, seq: int, at: float, target_kw: float = 5000.0) -> bytes:
    raw = payload(seq, at, target_kw)
    j.record_dispatch(at, raw, Dispatch.decode(raw, now_unix=at, last_seq=None, limits=LIMITS))
    return raw


def metric(m: Metrics, name: str) -> float | None:
    return m.registry.get_sample_value(name)


# --- the failsafe's liveness record ------------------------------------------------------


def test_liveness_round_trip_and_a_later_dispatch_is_newer_news(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite"
    now = time.time()
    with Journal(db) as j:
        assert j.liveness() is None  # never recorded: an older rampd's journal reads so
        j.record_liveness(now - 100.0, None)
        assert j.flush()
        assert j.liveness() == Liveness(now - 100.0, None)
        j.record_liveness(now - 90.0, now - 30.0)
        assert j.flush()
        assert j.liveness() == Liveness(now - 90.0, now - 30.0)
        # A dispatch accepted after the record (a crash lost the next one): heard then, and
        # it ended the failsafe.
        accept(j, 1, now - 10.0)
        assert j.flush()
        assert j.liveness() == Liveness(now - 10.0, None)
        # One accepted before the failsafe began does not end it.
        j.record_liveness(now - 5.0, now - 8.0)
        assert j.flush()
        assert j.liveness() == Liveness(now - 5.0, now - 8.0)


def run_then_restart(
    db: Path, failsafe: FailsafeConfig, silent_s: float, outage_s: float
) -> tuple[TargetTracker, list[Event]]:
    """A first run whose dispatcher dispatches once and falls silent for `silent_s`, stops;
    a second run `outage_s` later (wall clock), on a new monotonic axis, restored: its
    tracker and the events journalled at its start."""
    u0, m0 = time.time() - silent_s - outage_s, 1000.0
    with Journal(db) as j:
        t = TargetTracker(LIMITS, failsafe, 8e6, now_mono=m0)
        rec = LivenessRecorder(j, t)
        raw = payload(1, u0)
        d = Dispatch.decode(raw, now_unix=u0, last_seq=None, limits=LIMITS)
        t.accept(d, m0, u0)
        j.record_dispatch(u0, raw, d)
        k = 0.0
        while k <= silent_s:  # the cycle's ticks, a few a second
            t.target_w(m0 + k)
            rec.tick(m0 + k, u0 + k)
            k += 0.25
        rec.flush(m0 + silent_s, u0 + silent_s)
        j.record_telemetry(TelemetrySample(at=u0 + silent_s, target_w=t.target_w(m0 + silent_s)))
    m1, u1 = 3.0, u0 + silent_s + outage_s
    with Journal(db) as j:
        lv = j.liveness()
        assert lv is not None
        w = start_w(j, lv, failsafe, u1, resumed=False, default_w=14e6)
        t2 = TargetTracker(LIMITS, failsafe, w, now_mono=m1)
        restore(t2, j, lv, m1, u1)
        assert j.flush()
        return t2, j.events_between(u1 - 1, u1 + 1)


def test_a_dispatcher_silent_across_a_restart_trips_the_failsafe_on_time(tmp_path: Path) -> None:
    fs = FailsafeConfig(dispatch_timeout_s=60.0, policy="min", ramp_s=0.0)
    t, _ = run_then_restart(tmp_path / "journal.sqlite", fs, silent_s=30.0, outage_s=20.0)
    assert t.mode == "normal"
    at = t.failsafe_at()
    assert at is not None and at == pytest.approx(3.0 + 10.0, abs=0.5)  # not 60 s after start
    assert t.target_w(at + 0.01) == MIN_W and t.mode == "failsafe"


def test_a_timer_run_out_during_the_outage_trips_at_start(tmp_path: Path) -> None:
    fs = FailsafeConfig(dispatch_timeout_s=60.0, policy="min", ramp_s=0.0)
    t, events = run_then_restart(tmp_path / "journal.sqlite", fs, silent_s=30.0, outage_s=45.0)
    assert t.mode == "failsafe" and "(across the restart)" in t.failsafe_reason
    (ev,) = events
    assert ev.kind == "failsafe" and "last heard 75 s ago" in ev.text


def test_a_failsafe_on_at_the_stop_is_on_at_start_from_where_the_site_was(
    tmp_path: Path,
) -> None:
    fs = FailsafeConfig(dispatch_timeout_s=10.0, policy="baseline", baseline_kw=3000.0)
    t, events = run_then_restart(tmp_path / "journal.sqlite", fs, silent_s=60.0, outage_s=5.0)
    assert t.mode == "failsafe" and "(since before the restart)" in t.failsafe_reason
    since = t.failsafe_since
    assert since is not None and since == pytest.approx(3.0 - 55.0, abs=0.5)
    # The site was at the baseline when it stopped: the target starts there, not at max.
    assert t.target_w(3.0) == 3e6
    (ev,) = events
    assert ev.kind == "failsafe" and "on since before the restart" in ev.text


def test_the_last_heard_is_journalled_at_most_every_few_seconds(tmp_path: Path) -> None:
    fs = FailsafeConfig(dispatch_timeout_s=60.0)
    with Journal(tmp_path / "journal.sqlite") as j:
        t = TargetTracker(LIMITS, fs, 8e6, now_mono=0.0)
        rec = LivenessRecorder(j, t, every_s=5.0)
        rec.tick(0.0, 1e9)
        assert j.flush()
        first = j.stats.written
        for k in range(1, 101):  # a heartbeat every 0.1 s for 10 s
            t.heartbeat(k / 10)
            rec.tick(k / 10, 1e9 + k / 10)
        assert j.flush()
        assert j.stats.written - first == 2  # at 5 s and at 10 s
        t.start_failsafe(10.05)
        rec.tick(10.05, 1e9 + 10.05)  # the failsafe's start: at once
        assert j.flush()
        assert j.stats.written - first == 3
        lv = j.liveness()
        assert lv is not None and lv.failsafe_since == pytest.approx(1e9 + 10.05)


# --- a corrupt journal at start ------------------------------------------------------------


def test_random_bytes_are_moved_aside_and_a_fresh_journal_begins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "journal.sqlite"
    junk = os.urandom(64 * 1024)
    db.write_bytes(junk)
    Path(f"{db}-wal").write_bytes(os.urandom(4096))  # its log goes with it
    now = time.time()
    caplog.set_level(logging.INFO, logger="rampd")
    j = open_for_daemon(db, now)
    try:
        aside = j.moved_aside
        assert aside is not None and aside.name.startswith("journal.sqlite.corrupt-")
        assert aside.name.endswith(time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)))
        assert aside.read_bytes() == junk and Path(f"{aside}-wal").exists()
        assert j.flush() and j.stats.healthy and j.problem == ""
        (ev,) = j.events_between(now - 1, now + 1)
        assert ev.kind == EVENT_JOURNAL and "file is not a database" in ev.text
        assert aside.name in ev.text
        m = Metrics("test")
        m.watch_journal(j)
        assert metric(m, "rampd_journal_moved_aside_total") == 1.0
        assert metric(m, "rampd_journal_healthy") == 1.0
    finally:
        j.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "moved to" in errors[0].getMessage()


def test_malformed_pages_found_by_reading_what_a_restart_reads(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite"
    now = time.time()
    with Journal(db) as j:
        for seq in range(1, 3001):
            accept(j, seq, now - 3000 + seq)
    size = db.stat().st_size
    with db.open("r+b") as fh:  # garbage over the middle of the dispatches' pages
        for page in range(size // 4096 // 3, 2 * size // 4096 // 3):
            fh.seek(page * 4096)
            fh.write(os.urandom(4096))
    j = open_for_daemon(db, now)
    try:
        assert j.moved_aside is not None and j.last_seq() is None
        assert j.flush()
        (ev,) = j.events_between(now - 1, now + 1)
        assert "malformed" in ev.text
    finally:
        j.close()


def test_a_healthy_journal_is_left_as_it_is(tmp_path: Path) -> None:
    db = tmp_path / "journal.sqlite"
    now = time.time()
    with Journal(db) as j:
        raw = accept(j, 7, now - 5)
    j = open_for_daemon(db, now)
    try:
        assert j.moved_aside is None and j.last_valid_dispatch(now) == (raw,)
        assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []
    finally:
        j.close()


# --- a journal that cannot be written -----------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a size-limited tmpfs (`mount("256k")`); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()} (needs CAP_SYS_ADMIN)")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def remount_read_only(where: Path) -> None:
    r = subprocess.run(
        ["mount", "-o", "remount,ro", str(where)], capture_output=True, text=True, timeout=10
    )
    assert r.returncode == 0, r.stderr


def fill(where: Path) -> Path:
    """Fill the filesystem at `where` with one file, to the last block."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_read_only_filesystem_at_start_resumes_and_counts_the_rows_it_drops(
    tmpfs: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    where = tmpfs("4m")
    db = where / "journal.sqlite"
    now = time.time()
    with Journal(db) as j:
        raw = accept(j, 3, now - 20)
        j.record_liveness(now - 15, None)
    remount_read_only(where)
    caplog.set_level(logging.INFO, logger="rampd")
    j = open_for_daemon(db, now)
    try:
        # What a restart needs is still read: the dispatch in force, its seq, the timer.
        assert j.readable and j.last_valid_dispatch(now) == (raw,) and j.last_seq() == 3
        assert j.liveness() == Liveness(now - 15, None)
        for k in range(5):
            j.record_telemetry(TelemetrySample(at=now + k, target_w=1e6))
        assert not j.flush()
        s = j.stats
        assert s.written == 0 and s.dropped == 5 and not s.healthy
        assert "Read-only file system" in j.problem and j.problem.endswith("rows dropped")
        m = Metrics("test")
        m.watch_journal(j)
        assert metric(m, "rampd_journal_rows_dropped_total") == 5.0
        assert metric(m, "rampd_journal_healthy") == 0.0
    finally:
        j.close()
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "control goes on" in said[0].getMessage()


def test_a_full_disk_at_start_drops_rows_until_there_is_room_again(
    tmpfs: Callable[[str], Path],
) -> None:
    where = tmpfs("256k")
    db = where / "journal.sqlite"
    filler = fill(where)
    j = Journal(db, unwritable_ok=True, reopen_s=0.0)
    try:
        assert "full" in j.problem and not j.readable
        assert j.last_valid_dispatch(time.time()) is None and j.last_seq() is None
        j.record_event("lost", "no room")
        assert not j.flush() and j.stats.dropped == 1
        filler.unlink()
        j.record_event("kept", "room again")  # the next batch opens the journal
        assert j.flush() and j.stats.healthy and j.problem == "" and j.readable
        assert [e.kind for e in j.events_between(0, time.time() + 1)] == ["kept"]
        assert j.stats.dropped == 1
    finally:
        j.close()


def test_a_disk_that_fills_while_running_drops_and_counts_says_it_once(
    tmpfs: Callable[[str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    where = tmpfs("1m")
    j = open_for_daemon(where / "journal.sqlite", time.time())
    m = Metrics("test")
    m.watch_journal(j)
    caplog.set_level(logging.INFO, logger="rampd")
    try:
        j.record_event("before", "room")
        assert j.flush() and metric(m, "rampd_journal_healthy") == 1.0
        written = j.stats.written
        filler = fill(where)
        for k in range(3):  # each bigger than any free page the -wal could reuse
            j.record_event("big", "x" * 200_000, at=time.time() + k)
        assert not j.flush()
        assert "database or disk is full" in j.problem
        assert metric(m, "rampd_journal_healthy") == 0.0
        dropped = metric(m, "rampd_journal_rows_dropped_total")
        assert dropped is not None and dropped >= 1 and j.stats.written == written
        filler.unlink()
        j.record_event("after", "room again")
        assert j.flush(timeout_s=10.0) and j.problem == ""
    finally:
        j.close()
    failed = [r for r in caplog.records if "journal write failed" in r.getMessage()]
    assert len(failed) == 1
