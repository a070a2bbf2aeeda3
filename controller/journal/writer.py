"""The journal's writer: non-blocking `record_*` and the thread that commits them.

`record_*` methods are sync, O(1) and never raise: they put one row on a bounded queue; a
writer thread owns the write connection and commits what it finds in batches (one transaction
each). A full queue or a failing disk drops rows, counts them (`stats`) and logs once per change
of state (failing -> recovered), never per row. Retention runs in the writer thread every
`retention_interval_s`, in bounded chunks. `close()` flushes what is queued (with a timeout) and
checkpoints the WAL.

The daemon opens its journal with `unwritable_ok=True`: a journal that cannot be written at
start (read-only, full disk) is not a reason to stop controlling the site. It comes up without
a write connection (reading what it can, for the restart), drops and counts every row, and
tries to open again every `REOPEN_S`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from controller.journal.reader import JournalReader
from controller.journal.schema import (
    CURTAILMENT_COLUMNS,
    DEPLOYMENT_COLUMNS,
    DISPATCH_COLUMNS,
    META_FAILSAFE_SINCE,
    META_LAST_HEARD,
    RAMP_COLUMNS,
    STATES,
    TELEMETRY_COLUMNS,
    JournalError,
    JournalUnwritable,
    RampRecord,
    TelemetrySample,
    check_directory,
    curtailment_row,
    insert_sql,
    migrate,
    open_error,
    read_only_filesystem,
)
from controller.market.mv import CurtailmentEvent
from controller.wire.codec import MAX_PAYLOAD_BYTES
from controller.wire.dispatch import MAX_SEQ, Dispatch, DispatchRejected

log = logging.getLogger("rampd.journal")

_DAY_S: Final = 86400.0
_PRUNE_CHUNK: Final = 10_000
REOPEN_S: Final = 30.0
"""How often a journal that could not be opened for writing tries again."""

_SQL_DISPATCH: Final = insert_sql("dispatches", DISPATCH_COLUMNS)
_SQL_ACK: Final = insert_sql("acks", ("at", "id", "seq", "accepted", "reason"))
_SQL_RAMP: Final = insert_sql("ramps", RAMP_COLUMNS)
_SQL_TELEMETRY: Final = insert_sql("telemetry", TELEMETRY_COLUMNS)
_SQL_EVENT: Final = insert_sql("events", ("at", "kind", "text"))
_SQL_DEPLOYMENT: Final = insert_sql("deployments", DEPLOYMENT_COLUMNS)
_SQL_CURTAILMENT: Final = insert_sql("curtailments", CURTAILMENT_COLUMNS)
_SQL_LAST_SEQ: Final = (
    "INSERT INTO meta (key, value) VALUES ('last_seq', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
)
_SQL_META: Final = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

# Errors of one row, not of the database: the other rows of the batch are still written.
_ROW_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    OverflowError,
)


@dataclass(frozen=True, slots=True)
class JournalStats:
    written: int
    """Rows committed since open."""
    dropped: int
    """Rows lost: queue full, write failed, or recorded after close."""
    write_errors: int
    """Failed write transactions."""
    pruned: int
    """Rows deleted by retention."""
    queued: int
    healthy: bool
    """False while writes are failing."""


def _f(x: object) -> float | None:
    """A float for a REAL column; None for None, NaN (SQLite would store NULL anyway)."""
    if x is None:
        return None
    f = float(x)  # type: ignore[arg-type]  # TypeError/ValueError are caught by the caller
    return None if math.isnan(f) else f


def _req(x: object) -> float:
    """A finite float for a NOT NULL column (ValueError otherwise, caught by the caller)."""
    f = float(x)  # type: ignore[arg-type]
    if not math.isfinite(f):
        raise ValueError(f"not a finite number: {f}")
    return f


def _str(x: object) -> str | None:
    return x if isinstance(x, str) else None


def _seq(x: object) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_SEQ else None


_Stmt = tuple[str, tuple[Any, ...]]


class _Barrier:
    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = True


class _Stop:
    pass


_Item = tuple[_Stmt, ...] | _Barrier | _Stop


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """The write connection, in WAL mode, migrated; JournalError (or its JournalCorrupt,
    JournalUnwritable kinds) with a clear message otherwise."""
    check_directory(path)
    try:
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
        )
    except sqlite3.Error as exc:
        raise open_error(path, exc) from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if mode.lower() != "wal":
            raise JournalError(
                f"journal {path}: SQLite refused WAL mode (got {mode!r}); "
                "is the state directory on a network filesystem?"
            )
        conn.execute("PRAGMA synchronous = NORMAL")
        # Keep the -wal file small after checkpoints (it is reused, not truncated).
        conn.execute(f"PRAGMA journal_size_limit = {64 * 1024 * 1024}")
        migrate(conn, path)
    except (sqlite3.Error, JournalError) as exc:
        conn.close()
        if isinstance(exc, JournalError):
            raise
        raise open_error(path, exc) from None
    return conn


class Journal(JournalReader):
    """The daemon's journal: non-blocking `record_*`, a writer thread, and the reader queries.

    Opening is synchronous and raises `JournalError` with a clear message (missing or
    read-only directory, not a journal, a newer schema, no WAL support; `JournalCorrupt`
    when SQLite finds the file corrupt). With `unwritable_ok`, a journal that cannot be
    written (`JournalUnwritable`: read-only, disk full) opens anyway, without writing (see
    the module's doc). After that nothing raises into the caller: `record_*` drop and count
    on trouble, see `stats` and `problem`.
    """

    def __init__(
        self,
        path: Path,
        *,
        retention_days: float = 90,
        telemetry_retention_days: float = 14,
        retention_interval_s: float = 3600.0,
        queue_max: int = 10_000,
        max_batch: int = 2_000,
        busy_timeout_s: float = 5.0,
        unwritable_ok: bool = False,
        unusable: str | None = None,
        reopen_s: float = REOPEN_S,
    ) -> None:
        """`unusable`: why the file is known to be beyond use (a corrupt journal that could
        not be moved aside): nothing is opened, every row is dropped and counted. `reopen_s`:
        how often a journal opened without writing tries again."""
        path = Path(path)
        if retention_days <= 0 or telemetry_retention_days <= 0:
            raise ValueError("retention must be positive")
        self._busy_timeout_s = busy_timeout_s
        self._problem = ""  # why writes fail, while they do
        self.moved_aside: Path | None = None
        """Where a corrupt journal found at start was moved (`controller.journal.recover`)."""
        conn: sqlite3.Connection | None = None
        if unusable is not None:
            self._problem = unusable
        else:
            try:
                conn = _connect(path, busy_timeout_s)
            except JournalUnwritable as exc:
                if not unwritable_ok:
                    raise
                self._problem = str(exc)
        if conn is not None:
            try:
                super().__init__(path)
            except JournalError:
                conn.close()
                raise
        else:
            super().__init__(path, open_now=False)
            if unusable is None:
                self._open_read_degraded()
        self._wconn = conn
        self._reopen_s = reopen_s
        self._next_open = time.monotonic() + reopen_s
        self._retention: tuple[tuple[str, str, float], ...] = (
            ("dispatches", "received_at", retention_days),
            ("acks", "at", retention_days),
            ("ramps", "started_at", retention_days),
            ("events", "at", retention_days),
            ("telemetry", "at", telemetry_retention_days),
        )
        self._retention_interval_s = retention_interval_s
        self._max_batch = max_batch
        self._q: queue.Queue[_Item] = queue.Queue(maxsize=queue_max)
        self._stopping = threading.Event()
        self._closed = False
        # Counters: each is written by one thread only (no lost updates).
        self._written = 0  # writer
        self._lost = 0  # writer: rows of failed transactions
        self._write_errors = 0  # writer
        self._pruned = 0  # writer
        self._dropped_full = 0  # callers
        self._dropped_closed = 0  # callers
        self._dropped_bad = 0  # callers: a row that could not be built
        self._refused = 0  # writer: rows the database refused
        self._healthy = conn is not None
        self._overflowing = False
        self._thread = threading.Thread(target=self._run, name="rampd-journal", daemon=True)
        self._thread.start()
        if conn is None:
            log.error(
                "journal cannot be written (%s); control goes on: journal rows are dropped "
                "and counted (rampd_journal_rows_dropped_total); trying again every %g s",
                self._problem,
                reopen_s,
            )
            return
        log.info(
            "journal %s open (retention %g d, telemetry %g d)",
            path,
            retention_days,
            telemetry_retention_days,
        )

    def _open_read_degraded(self) -> None:
        """What a journal that cannot be written can still be read for (the restart's
        queries): read-only, else immutable on a read-only filesystem; else nothing."""
        if not self.path.is_file():
            return
        try:
            self._open_read()
            return
        except JournalError as exc:
            error = exc
        if read_only_filesystem(self.path):
            try:
                self._open_read(immutable=True)
                return
            except JournalError as exc:
                error = exc
        log.warning("journal cannot be read either (%s): nothing is resumed from it", error)

    # -- recording (sync, O(1), never raises) -------------------------------------------

    def record_dispatch(
        self, received_at: float, payload: bytes, result: Dispatch | DispatchRejected
    ) -> None:
        """A dispatch as received, with the decision (the parsed Dispatch, or the rejection)."""
        try:
            raw = bytes(payload[:MAX_PAYLOAD_BYTES])
            if isinstance(result, Dispatch):
                d = result
                row: tuple[Any, ...] = (
                    _req(received_at), raw, len(payload), _str(d.id), _seq(d.seq), str(d.mode),
                    _f(d.target_w), _f(d.band_w), _f(d.signal), _f(d.ramp_s),
                    _f(d.issued_at), _f(d.start_at), _f(d.expires_at), "accepted", "", "",
                )  # fmt: skip
                self._put(((_SQL_DISPATCH, row), (_SQL_LAST_SEQ, (_seq(d.seq),))))
            else:
                row = (
                    _req(received_at), raw, len(payload), _str(result.id), _seq(result.seq), None,
                    None, None, None, None, None, None, None, "rejected",
                    str(result.reason), str(result.code),
                )  # fmt: skip
                self._put(((_SQL_DISPATCH, row),))
        except (TypeError, ValueError, OverflowError) as exc:
            self._bad_row("dispatch", exc)

    def record_ack(
        self, at: float, id: str | None, seq: int | None, accepted: bool, reason: str
    ) -> None:
        try:
            row = (_req(at), _str(id), _seq(seq), int(bool(accepted)))
            self._put(((_SQL_ACK, (*row, str(reason))),))
        except (TypeError, ValueError, OverflowError) as exc:
            self._bad_row("ack", exc)

    def record_ramp(self, ramp: RampRecord) -> None:
        try:
            r = ramp
            row = (
                _req(r.started_at), _str(r.dispatch_id), _f(r.from_w), _req(r.target_w),
                _req(r.tol_w), _f(r.settled_at), _f(r.settle_s), _req(r.overshoot_w),
                _req(r.iae_j), _f(r.physical_min_s), str(r.outcome), _req(r.ended_at),
            )  # fmt: skip
            self._put(((_SQL_RAMP, row),))
        except (TypeError, ValueError, OverflowError) as exc:
            self._bad_row("ramp", exc)

    def record_telemetry(self, s: TelemetrySample) -> None:
        try:
            dev = s.devices or {}
            counts = tuple(
                int(v) if isinstance(v := dev.get(k), int) and 0 <= v < 2**62 else None
                for k in STATES
            )
            row = (
                _req(s.at), _f(s.measured_w), _str(s.measured_source), _f(s.target_w), _f(s.min_w),
                _f(s.max_w), _f(s.noncontrollable_w), *(_f(x) for x in s.up_w[:3]),
                *(_f(x) for x in s.down_w[:3]), _str(s.mode),
                None if s.saturated is None else int(s.saturated), *counts,
            )  # fmt: skip
            if len(row) != len(TELEMETRY_COLUMNS):
                raise ValueError("up_w and down_w need 3 values (1 s, 5 s, 60 s)")
            self._put(((_SQL_TELEMETRY, row),))
        except (TypeError, ValueError, OverflowError) as exc:
            self._bad_row("telemetry", exc)

    def record_deployment(
        self,
        service: str,
        at: float,
        trigger_hz: float,
        armed_w: float,
        devices: int,
        expected_w: float,
        before_w: float | None,
        after_w: tuple[float | None, float | None, float | None],
        end_w: float | None,
        duration_s: float | None,
        ended_by: str,
    ) -> None:
        """A frequency deployment, once it ended: the site meter before, 0.25 s, 0.5 s and
        1 s after the trigger crossing (`at`, Unix time), and at its end."""
        try:
            row = (
                str(service), _req(at), _f(trigger_hz), _req(armed_w), int(devices),
                _req(expected_w), _f(before_w), *(_f(x) for x in after_w), _f(end_w),
                _f(duration_s), str(ended_by),
            )  # fmt: skip
            self._put(((_SQL_DEPLOYMENT, row),))
        except (TypeError, ValueError, OverflowError) as exc:
            self._bad_row("deployment", exc)

    def record_curtailment(self, ev: CurtailmentEvent) -> None:
        """A curtailment event's M&V figures, once it ended (kept for settlement: retention
        does not prune them, like deployments)."""
        try:
            self._put(((_SQL_CURTAILMENT, curtailment_row(ev)),))
        except (TypeError, ValueError, OverflowError) as exc:
            self._bad_row("curtailment", exc)

    def record_liveness(self, last_heard: float, failsafe_since: float | None) -> None:
        """When the dispatcher was last heard, and since when the failsafe is on (None: it
        is off), unix seconds: what a restart needs to carry the failsafe over
        (`JournalReader.liveness`). Overwrites the previous record."""
        try:
            heard = _req(last_heard)
            since = None if failsafe_since is None else _req(failsafe_since)
            self._put(
                ((_SQL_META, (META_LAST_HEARD, heard)), (_SQL_META, (META_FAILSAFE_SINCE, since)))
            )
        except (TypeError, ValueError, OverflowError) as exc:
            self._bad_row("liveness", exc)

    def record_event(self, kind: str, text: str, at: float | None = None) -> None:
        """An operator-relevant event: start, stop, mode change, failsafe, replay, ..."""
        try:
            when = time.time() if at is None else _req(at)
            self._put(((_SQL_EVENT, (when, str(kind), str(text))),))
        except (TypeError, ValueError, OverflowError) as exc:
            self._bad_row("event", exc)

    def _put(self, item: tuple[_Stmt, ...]) -> None:
        if self._closed:
            if not self._dropped_closed:
                log.warning("journal closed: further records are dropped")
            self._dropped_closed += 1
            return
        try:
            self._q.put_nowait(item)
        except queue.Full:
            if not self._overflowing:
                self._overflowing = True
                log.error("journal queue full (writer behind): records are being dropped")
            self._dropped_full += 1
            return
        if self._overflowing:
            self._overflowing = False
            log.warning("journal queue accepts records again (%d dropped)", self._dropped_full)

    def _bad_row(self, what: str, exc: BaseException) -> None:
        if not self._dropped_bad:
            log.error("journal: cannot record a %s (%s); dropped", what, exc)
        self._dropped_bad += 1

    # -- state --------------------------------------------------------------------------

    @property
    def problem(self) -> str:
        """Why journal rows are being dropped, for the status; "" while writes succeed."""
        if self._healthy:
            return ""
        return f"journal not written ({self._problem or 'writer stopped'}): rows dropped"

    @property
    def stats(self) -> JournalStats:
        return JournalStats(
            written=self._written,
            dropped=self._dropped_full + self._dropped_closed + self._dropped_bad + self._lost,
            write_errors=self._write_errors,
            pruned=self._pruned,
            queued=self._q.qsize(),
            healthy=self._healthy,
        )

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything recorded so far is committed (or failed). True if done."""
        if self._closed:
            return not self._thread.is_alive()
        barrier = _Barrier()
        try:
            self._q.put(barrier, timeout=timeout_s)
        except queue.Full:
            return False
        return barrier.done.wait(timeout_s) and barrier.ok

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush the queue (up to `timeout_s`), checkpoint, close. Idempotent; never raises."""
        if not self._closed:
            self._closed = True
            # The reader first: the writer's connection, closing last, removes -wal and -shm.
            with contextlib.suppress(sqlite3.Error):
                super().close()
            self._stopping.set()
            with contextlib.suppress(queue.Full):
                self._q.put_nowait(_Stop())
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error(
                    "journal: writer did not finish within %.1f s; %d queued records lost",
                    timeout_s,
                    self._q.qsize(),
                )
            else:
                s = self.stats
                log.info(
                    "journal closed: %d rows written, %d dropped, %d pruned",
                    s.written,
                    s.dropped,
                    s.pruned,
                )

    def __enter__(self) -> Journal:
        return self

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        next_prune = 0.0  # at once: a restart after a long stop catches up
        backoff = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_prune:
                    if self._healthy:
                        more = self._prune()
                        next_prune = now + (0.0 if more else self._retention_interval_s)
                    else:  # writes are failing: prune once they recover
                        next_prune = now + 5.0
                wait = min(1.0, max(0.0, next_prune - time.monotonic()))
                try:
                    first = self._q.get(timeout=wait)
                except queue.Empty:
                    if self._stopping.is_set():
                        return
                    continue
                batch = [first]
                with contextlib.suppress(queue.Empty):
                    while len(batch) < self._max_batch:
                        batch.append(self._q.get_nowait())
                stop = self._write(batch)
                if stop and self._q.empty():
                    return
                if self._healthy or self._wconn is None:  # nothing to retry without one
                    backoff = 0.0
                else:
                    backoff = min(30.0, max(0.5, 2 * backoff))
                    self._stopping.wait(backoff)
        except BaseException:  # a bug here must not pass silently: the journal stops
            log.exception("journal writer crashed; records are dropped from now on")
            self._healthy = False
            raise
        finally:
            self._finish()

    def _write(self, batch: list[_Item]) -> bool:
        stmts = [x for x in batch if isinstance(x, tuple)]
        ok = True
        conn = self._wconn if self._wconn is not None else self._reopen()
        if conn is None:
            self._lost += len(stmts)  # no database to write to: counted, never queued up
            ok = not stmts
        elif stmts:
            try:
                conn.execute("BEGIN IMMEDIATE")
                for item in stmts:
                    for sql, params in item:
                        conn.execute(sql, params)
                conn.execute("COMMIT")
            except _ROW_ERRORS as exc:
                # A row the database refuses (a bug upstream): keep the others.
                self._rollback()
                ok = self._salvage(stmts, exc)
            except sqlite3.Error as exc:
                ok = False
                self._failed(exc, len(stmts))
            else:
                self._written += len(stmts)
                if not self._healthy:
                    self._healthy = True
                    self._problem = ""
                    log.warning("journal writes recovered (%d rows lost while failing)", self._lost)
        stop = False
        for x in batch:
            if isinstance(x, _Barrier):
                x.ok = ok
                x.done.set()
            elif isinstance(x, _Stop):
                stop = True
        return stop

    def _reopen(self) -> sqlite3.Connection | None:
        """A journal opened without writing: try again every REOPEN_S (the disk may have been
        freed, the filesystem remounted read-write). Writer thread only."""
        now = time.monotonic()
        if now < self._next_open or self._stopping.is_set():
            return None
        self._next_open = now + self._reopen_s
        try:
            conn = _connect(self.path, self._busy_timeout_s)
        except JournalError as exc:
            self._problem = str(exc)
            return None
        self._wconn = conn
        if not self.readable:
            with contextlib.suppress(JournalError):
                self._open_read()
        # `_write` says "recovered" once the first rows are committed.
        return conn

    def _rollback(self) -> None:
        conn = self._wconn
        if conn is None:
            return
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _salvage(self, stmts: list[tuple[_Stmt, ...]], first: BaseException) -> bool:
        """Write the records one transaction each; drop (and count) the refused ones."""
        conn = self._wconn
        assert conn is not None
        bad = 0
        for item in stmts:
            try:
                conn.execute("BEGIN IMMEDIATE")
                for sql, params in item:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            except _ROW_ERRORS:
                self._rollback()
                bad += 1
            except sqlite3.Error as exc:
                self._failed(exc, 1)
                return False
            else:
                self._written += 1
        if bad:
            if not self._refused:
                log.error("journal refused a record (%s); dropped", first)
            self._refused += bad
            self._lost += bad
        return True

    def _failed(self, exc: sqlite3.Error, rows: int) -> None:
        self._rollback()
        self._write_errors += 1
        self._lost += rows
        if self._healthy:
            self._problem = str(exc)
            self._healthy = False
            log.error("journal write failed: %s; records are dropped until it recovers", exc)

    def _prune(self) -> bool:
        """Delete one chunk of expired rows per table; True if more remain."""
        more = False
        now = time.time()
        conn = self._wconn
        if conn is None:
            return False
        for table, column, days in self._retention:
            try:
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute(
                    f"DELETE FROM {table} WHERE rowid IN "
                    f"(SELECT rowid FROM {table} WHERE {column} < ? LIMIT {_PRUNE_CHUNK})",
                    (now - days * _DAY_S,),
                )
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._failed(exc, 0)
                return False
            self._pruned += max(cur.rowcount, 0)
            more = more or cur.rowcount >= _PRUNE_CHUNK
        return more

    def _finish(self) -> None:
        conn = self._wconn
        if conn is None:
            return
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA optimize")
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with contextlib.suppress(sqlite3.Error):
            conn.close()
