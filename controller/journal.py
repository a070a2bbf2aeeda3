"""The journal: what the site was asked and what it did, in SQLite (WAL) under the state directory.

Every dispatch as received (raw payload) with the decision, every ack, every ramp with its
outcome, per-second telemetry and operator-relevant events. It answers two questions:

* after a restart: which dispatch is still in force (`last_valid_dispatch`) and which seq was
  the last accepted (`last_seq`), so the daemon resumes the target and keeps refusing replays;
* after a grid event: what happened in a window (`rampd report`, see `controller.tools.report`).

Writing never blocks the event loop. `record_*` methods are sync, O(1) and never raise: they
put one row on a bounded queue; a writer thread owns the write connection and commits what it
finds in batches (one transaction each). A full queue or a failing disk drops rows, counts them
(`stats`) and logs once per change of state (failing -> recovered), never per row.
Retention runs in the writer thread every `retention_interval_s`, in bounded chunks.
`close()` flushes what is queued (with a timeout) and checkpoints the WAL.

Reads (`last_valid_dispatch`, `*_between`) use their own read-only connection and block the
caller; call them at start-up, from the report, or through `asyncio.to_thread`.
`JournalReader` opens a journal read-only without a writer (for `rampd report`).

Times are unix seconds (wall clock: the journal is read by people and other processes),
power in W, energy in J.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from controller.wire.codec import MAX_PAYLOAD_BYTES
from controller.wire.dispatch import MAX_SEQ, Dispatch, DispatchRejected

log = logging.getLogger("rampd.journal")

F64 = npt.NDArray[np.float64]

SCHEMA_VERSION: Final = 1
DEFAULT_FILENAME: Final = "journal.sqlite"
# Without $STATE_DIRECTORY (systemd StateDirectory=rampd) this is where the unit would put it.
DEFAULT_STATE_DIR: Final = Path("/var/lib/rampd")

# An event of this kind means the target tracker dropped its active and pending dispatches
# (failsafe under policy baseline or min): nothing from before it is resumed after a restart.
EVENT_DISPATCH_DROPPED: Final = "dispatch_dropped"

RampOutcome = Literal["settled", "superseded", "timeout", "interrupted"]

_DAY_S: Final = 86400.0
_PRUNE_CHUNK: Final = 10_000

# Each migration brings the schema from version i to i + 1 (index i). Never edit a shipped one.
_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
    CREATE TABLE dispatches (
        received_at REAL NOT NULL,
        payload BLOB NOT NULL,            -- as received, up to MAX_PAYLOAD_BYTES
        payload_len INTEGER NOT NULL,     -- length as received
        id TEXT, seq INTEGER, mode TEXT,
        target_w REAL, band_w REAL, signal REAL, ramp_s REAL,
        issued_at REAL, start_at REAL, expires_at REAL,
        decision TEXT NOT NULL CHECK (decision IN ('accepted', 'rejected')),
        reason TEXT NOT NULL, code TEXT NOT NULL
    );
    CREATE INDEX dispatches_received_at ON dispatches (received_at);
    CREATE TABLE acks (
        at REAL NOT NULL, id TEXT, seq INTEGER, accepted INTEGER NOT NULL, reason TEXT NOT NULL
    );
    CREATE INDEX acks_at ON acks (at);
    CREATE TABLE ramps (
        started_at REAL NOT NULL, dispatch_id TEXT, from_w REAL, target_w REAL NOT NULL,
        tol_w REAL NOT NULL, settled_at REAL, settle_s REAL, overshoot_w REAL NOT NULL,
        iae_j REAL NOT NULL, physical_min_s REAL, outcome TEXT NOT NULL, ended_at REAL NOT NULL
    );
    CREATE INDEX ramps_started_at ON ramps (started_at);
    CREATE TABLE telemetry (
        at REAL NOT NULL,
        measured_w REAL, measured_source TEXT, target_w REAL, min_w REAL, max_w REAL,
        noncontrollable_w REAL,
        up_1s_w REAL, up_5s_w REAL, up_60s_w REAL,
        down_1s_w REAL, down_5s_w REAL, down_60s_w REAL,
        mode TEXT, saturated INTEGER,
        devices_on INTEGER, devices_sleeping INTEGER, devices_waking INTEGER,
        devices_fault INTEGER, devices_unknown INTEGER
    );
    CREATE INDEX telemetry_at ON telemetry (at);
    CREATE TABLE events (at REAL NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL);
    CREATE INDEX events_at ON events (at);
    """,
)

_HORIZONS: Final = ("1s", "5s", "60s")
_STATES: Final = ("on", "sleeping", "waking", "fault", "unknown")

_TELEMETRY_COLUMNS: Final = (
    "at", "measured_w", "measured_source", "target_w", "min_w", "max_w", "noncontrollable_w",
    "up_1s_w", "up_5s_w", "up_60s_w", "down_1s_w", "down_5s_w", "down_60s_w",
    "mode", "saturated",
    "devices_on", "devices_sleeping", "devices_waking", "devices_fault", "devices_unknown",
)  # fmt: skip
_RAMP_COLUMNS: Final = (
    "started_at", "dispatch_id", "from_w", "target_w", "tol_w", "settled_at", "settle_s",
    "overshoot_w", "iae_j", "physical_min_s", "outcome", "ended_at",
)  # fmt: skip
_DISPATCH_COLUMNS: Final = (
    "received_at", "payload", "payload_len", "id", "seq", "mode", "target_w", "band_w", "signal",
    "ramp_s", "issued_at", "start_at", "expires_at", "decision", "reason", "code",
)  # fmt: skip


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


_SQL_DISPATCH: Final = _insert("dispatches", _DISPATCH_COLUMNS)
_SQL_ACK: Final = _insert("acks", ("at", "id", "seq", "accepted", "reason"))
_SQL_RAMP: Final = _insert("ramps", _RAMP_COLUMNS)
_SQL_TELEMETRY: Final = _insert("telemetry", _TELEMETRY_COLUMNS)
_SQL_EVENT: Final = _insert("events", ("at", "kind", "text"))
_SQL_LAST_SEQ: Final = (
    "INSERT INTO meta (key, value) VALUES ('last_seq', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
)


# Errors of one row, not of the database: the other rows of the batch are still written.
_ROW_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    OverflowError,
)


class JournalError(Exception):
    """The journal cannot be opened (raised at open only; never by `record_*`)."""


# --- rows --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TelemetrySample:
    """One per-second telemetry row, SI units; None where unknown."""

    at: float
    measured_w: float | None = None
    measured_source: str | None = None
    target_w: float | None = None
    min_w: float | None = None
    max_w: float | None = None
    noncontrollable_w: float | None = None
    up_w: tuple[float | None, float | None, float | None] = (None, None, None)
    """Reachable increase within 1 s, 5 s and 60 s."""
    down_w: tuple[float | None, float | None, float | None] = (None, None, None)
    mode: str | None = None
    saturated: bool | None = None
    devices: Mapping[str, int] | None = None
    """Device counts by state (on, sleeping, waking, fault, unknown)."""

    @classmethod
    def from_wire(cls, tel: Mapping[str, Any], at: float) -> TelemetrySample:
        """From the telemetry message as published on `<root>/telemetry` (kW), at unix `at`.

        Tolerant: a missing or malformed field becomes None (this runs inside the daemon).
        """
        cap = tel.get("capability")
        cap = cap if isinstance(cap, Mapping) else {}
        up = cap.get("up_kw")
        down = cap.get("down_kw")
        up = up if isinstance(up, Mapping) else {}
        down = down if isinstance(down, Mapping) else {}
        devices = tel.get("devices")
        source = tel.get("measured_source")
        mode = tel.get("mode")
        saturated = tel.get("saturated")
        return cls(
            at=at,
            measured_w=_w(tel.get("measured_kw")),
            measured_source=source if isinstance(source, str) else None,
            target_w=_w(tel.get("target_kw")),
            min_w=_w(tel.get("min_kw")),
            max_w=_w(tel.get("max_kw")),
            noncontrollable_w=_w(tel.get("noncontrollable_kw")),
            up_w=(_w(up.get("1s")), _w(up.get("5s")), _w(up.get("60s"))),
            down_w=(_w(down.get("1s")), _w(down.get("5s")), _w(down.get("60s"))),
            mode=mode if isinstance(mode, str) else None,
            saturated=saturated if isinstance(saturated, bool) else None,
            devices=devices if isinstance(devices, Mapping) else None,
        )


@dataclass(frozen=True, slots=True)
class RampRecord:
    """The outcome of one ramp, as `RampWatch` measured it on the site meter."""

    started_at: float
    dispatch_id: str | None
    from_w: float | None
    target_w: float
    tol_w: float
    settled_at: float | None
    """When the power entered the band for good (None: it did not)."""
    settle_s: float | None
    overshoot_w: float
    """Largest excursion beyond the target, away from where the ramp started (>= 0)."""
    iae_j: float
    """Integral of |power - target| from the start to `ended_at`, J (W s)."""
    physical_min_s: float | None
    outcome: RampOutcome
    ended_at: float

    @property
    def ratio(self) -> float | None:
        """Settle time over the physical minimum, when both are known."""
        if self.settle_s is None or not self.physical_min_s:
            return None
        return self.settle_s / self.physical_min_s


@dataclass(frozen=True, slots=True)
class DispatchRow:
    received_at: float
    payload: bytes
    payload_len: int
    id: str | None
    seq: int | None
    mode: str | None
    target_w: float | None
    band_w: float | None
    signal: float | None
    ramp_s: float | None
    issued_at: float | None
    start_at: float | None
    expires_at: float | None
    decision: Literal["accepted", "rejected"]
    reason: str
    code: str


@dataclass(frozen=True, slots=True)
class AckRow:
    at: float
    id: str | None
    seq: int | None
    accepted: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    kind: str
    text: str


@dataclass(frozen=True, slots=True)
class TelemetrySeries:
    """Telemetry rows of a window as arrays (NaN where unknown), ordered by time."""

    at: F64
    measured_w: F64
    target_w: F64
    min_w: F64
    max_w: F64
    noncontrollable_w: F64
    up_w: F64
    """Shape (3, n): reachable increase within 1 s, 5 s, 60 s."""
    down_w: F64
    devices: F64
    """Shape (5, n): devices on, sleeping, waking, fault, unknown."""
    mode: tuple[str, ...]
    measured_source: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.at.size)


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


def _w(kw: object) -> float | None:
    if isinstance(kw, bool) or not isinstance(kw, int | float):
        return None
    return float(kw) * 1e3


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


# --- paths -------------------------------------------------------------------------------


def default_journal_path() -> Path:
    """`$STATE_DIRECTORY/journal.sqlite` (systemd StateDirectory=), else /var/lib/rampd/."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return (Path(state) if state else DEFAULT_STATE_DIR) / DEFAULT_FILENAME


def _check_directory(path: Path) -> None:
    parent = path.parent
    if not parent.exists():
        raise JournalError(
            f"journal directory {parent} does not exist "
            "(systemd creates it with StateDirectory=rampd; otherwise create it)"
        )
    if not parent.is_dir():
        raise JournalError(f"journal directory {parent} is not a directory")
    # SQLite creates -wal and -shm files beside the journal: the directory must take new files.
    probe = parent / f".rampd-journal-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise JournalError(
            f"journal directory {parent} is not writable by uid {os.geteuid()}: "
            f"{exc.strerror or exc}"
        ) from None
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise JournalError(f"journal {path} is not readable and writable by uid {os.geteuid()}")


def _open_error(path: Path, exc: BaseException) -> JournalError:
    return JournalError(f"cannot open journal {path}: {exc}")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise JournalError(
            f"journal {path} has schema version {version}, newer than this rampd "
            f"understands ({SCHEMA_VERSION}); refusing to touch it"
        )
    if version == 0:
        n = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if n:
            raise JournalError(f"{path} is an SQLite database but not a rampd journal")
    for v in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _MIGRATIONS[v].split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {v + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("journal %s: schema version %d", path, v + 1)


def _check_version(conn: sqlite3.Connection, path: Path) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version == 0:
        raise JournalError(f"{path} is not a rampd journal (schema version 0)")
    if version > SCHEMA_VERSION:
        raise JournalError(
            f"journal {path} has schema version {version}, newer than this rampd "
            f"understands ({SCHEMA_VERSION})"
        )


# --- reading -----------------------------------------------------------------------------


class JournalReader:
    """Read-only access to a journal (no writer, no migration). Queries block the caller."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise JournalError(f"no journal at {self.path}")
        try:
            self._conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
            self._conn.execute("PRAGMA busy_timeout = 5000")
            _check_version(self._conn, self.path)
        except sqlite3.Error as exc:
            raise _open_error(self.path, exc) from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- restart ----------------------------------------------------------------------

    def last_seq(self) -> int | None:
        """The highest seq ever accepted (kept across retention)."""
        rows = self._query("SELECT value FROM meta WHERE key = 'last_seq'")
        return int(rows[0][0]) if rows else None

    def last_target(self) -> tuple[float, float] | None:
        """(at, target_w) of the latest telemetry row with a target: where to resume from."""
        rows = self._query(
            "SELECT at, target_w FROM telemetry WHERE target_w IS NOT NULL "
            "ORDER BY rowid DESC LIMIT 1"
        )
        return (float(rows[0][0]), float(rows[0][1])) if rows else None

    def last_valid_dispatch(self, now_unix: float) -> tuple[bytes, ...] | None:
        """Raw payloads to replay, in order, to restore the target in force at `now_unix`.

        Re-runs the tracker's rules over the accepted dispatches: a dispatch with a future
        `start_at` waits (and is superseded by any later accepted dispatch); one without
        starts at once and supersedes anything pending; `expires_at` ends the dispatch in
        force (a release has no expiry); an `EVENT_DISPATCH_DROPPED` event ends both.
        Returns (in force,), (pending,), (in force, pending) or None (nothing to resume:
        never dispatched, or expired). A release in force is returned (replaying it leaves
        the site released).
        """
        # Only rows from the last dispatch that started on acceptance matter: it superseded
        # everything before it.
        anchor = self._query(
            "SELECT rowid FROM dispatches WHERE decision = 'accepted' "
            "AND (start_at IS NULL OR start_at <= received_at) ORDER BY rowid DESC LIMIT 1"
        )
        since = int(anchor[0][0]) if anchor else 0
        rows = self._query(
            "SELECT received_at, payload, mode, start_at, expires_at FROM dispatches "
            "WHERE decision = 'accepted' AND rowid >= ? ORDER BY rowid",
            (since,),
        )
        if not rows:
            return None
        drops = self._query(
            "SELECT at FROM events WHERE kind = ? AND at >= ? ORDER BY at",
            (EVENT_DISPATCH_DROPPED, float(rows[0][0])),
        )
        # (time, order, kind, row): dispatches keep their acceptance order on equal times.
        timeline: list[tuple[float, int, int, Any]] = [
            (float(r[0]), i, 1, r) for i, r in enumerate(rows)
        ]
        timeline += [(float(d[0]), -1, 0, None) for d in drops]
        timeline.sort(key=lambda e: (e[0], e[1]))
        sim = _ReplaySim()
        for t, _, kind, row in timeline:
            sim.advance(t)
            if kind == 0:
                sim.active = sim.pending = None
            else:
                received_at, payload, mode, start_at, expires_at = row
                sim.accept(
                    bytes(payload),
                    received_at=float(received_at),
                    start_at=None if start_at is None else float(start_at),
                    expires_at=None if expires_at is None or mode == "release" else expires_at,
                )
        sim.advance(now_unix)
        chain = tuple(p[0] for p in (sim.active, sim.pending) if p is not None)
        return chain or None

    # -- windows ----------------------------------------------------------------------

    def dispatches_between(self, t0: float, t1: float) -> list[DispatchRow]:
        rows = self._query(
            f"SELECT {', '.join(_DISPATCH_COLUMNS)} FROM dispatches "
            "WHERE received_at >= ? AND received_at <= ? ORDER BY received_at, rowid",
            (t0, t1),
        )
        return [
            DispatchRow(
                received_at=r[0],
                payload=bytes(r[1]),
                payload_len=r[2],
                id=r[3],
                seq=r[4],
                mode=r[5],
                target_w=r[6],
                band_w=r[7],
                signal=r[8],
                ramp_s=r[9],
                issued_at=r[10],
                start_at=r[11],
                expires_at=r[12],
                decision=r[13],
                reason=r[14],
                code=r[15],
            )
            for r in rows
        ]

    def acks_between(self, t0: float, t1: float) -> list[AckRow]:
        rows = self._query(
            "SELECT at, id, seq, accepted, reason FROM acks WHERE at >= ? AND at <= ? "
            "ORDER BY at, rowid",
            (t0, t1),
        )
        return [AckRow(r[0], r[1], r[2], bool(r[3]), r[4]) for r in rows]

    def ramps_between(self, t0: float, t1: float) -> list[RampRecord]:
        rows = self._query(
            f"SELECT {', '.join(_RAMP_COLUMNS)} FROM ramps "
            "WHERE started_at >= ? AND started_at <= ? ORDER BY started_at, rowid",
            (t0, t1),
        )
        return [RampRecord(*r) for r in rows]

    def events_between(self, t0: float, t1: float) -> list[Event]:
        rows = self._query(
            "SELECT at, kind, text FROM events WHERE at >= ? AND at <= ? ORDER BY at, rowid",
            (t0, t1),
        )
        return [Event(r[0], r[1], r[2]) for r in rows]

    def telemetry_between(self, t0: float, t1: float) -> TelemetrySeries:
        rows = self._query(
            f"SELECT {', '.join(_TELEMETRY_COLUMNS)} FROM telemetry "
            "WHERE at >= ? AND at <= ? ORDER BY at, rowid",
            (t0, t1),
        )
        idx = {c: i for i, c in enumerate(_TELEMETRY_COLUMNS)}
        text = {idx["mode"], idx["measured_source"]}
        numeric = [i for i in range(len(_TELEMETRY_COLUMNS)) if i not in text]
        arr = (
            np.array([[r[i] for i in numeric] for r in rows], dtype=np.float64)
            .reshape(len(rows), len(numeric))
            .T
        )  # None -> NaN
        col = {c: arr[k] for k, c in enumerate(_TELEMETRY_COLUMNS[i] for i in numeric)}
        return TelemetrySeries(
            at=col["at"],
            measured_w=col["measured_w"],
            target_w=col["target_w"],
            min_w=col["min_w"],
            max_w=col["max_w"],
            noncontrollable_w=col["noncontrollable_w"],
            up_w=np.vstack([col[f"up_{h}_w"] for h in _HORIZONS]),
            down_w=np.vstack([col[f"down_{h}_w"] for h in _HORIZONS]),
            devices=np.vstack([col[f"devices_{s}"] for s in _STATES]),
            mode=tuple(r[idx["mode"]] or "" for r in rows),
            measured_source=tuple(r[idx["measured_source"]] or "" for r in rows),
        )


class _ReplaySim:
    """The tracker's dispatch bookkeeping on the unix axis (see `last_valid_dispatch`)."""

    def __init__(self) -> None:
        # (payload, start_at, expires_at)
        self.active: tuple[bytes, float, float | None] | None = None
        self.pending: tuple[bytes, float, float | None] | None = None

    def advance(self, t: float) -> None:
        while True:
            due: list[tuple[float, int]] = []
            if self.pending is not None and self.pending[1] <= t:
                due.append((self.pending[1], 0))
            if self.active is not None and self.active[2] is not None and self.active[2] <= t:
                due.append((self.active[2], 1))
            if not due:
                return
            if min(due)[1] == 0:
                self.active, self.pending = self.pending, None
            else:
                self.active = None

    def accept(
        self,
        payload: bytes,
        *,
        received_at: float,
        start_at: float | None,
        expires_at: float | None,
    ) -> None:
        if start_at is not None and start_at > received_at:
            self.pending = (payload, start_at, expires_at)
        else:
            self.pending = None
            self.active = (payload, received_at, expires_at)


# --- writing -----------------------------------------------------------------------------

_Stmt = tuple[str, tuple[Any, ...]]


class _Barrier:
    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = True


class _Stop:
    pass


_Item = tuple[_Stmt, ...] | _Barrier | _Stop


class Journal(JournalReader):
    """The daemon's journal: non-blocking `record_*`, a writer thread, and the reader queries.

    Opening is synchronous and raises `JournalError` with a clear message (missing or
    read-only directory, not a journal, a newer schema, no WAL support). After that nothing
    raises into the caller: `record_*` drop and count on trouble, see `stats`.
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
    ) -> None:
        path = Path(path)
        if retention_days <= 0 or telemetry_retention_days <= 0:
            raise ValueError("retention must be positive")
        _check_directory(path)
        try:
            conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
            )
        except sqlite3.Error as exc:
            raise _open_error(path, exc) from None
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
            _migrate(conn, path)
        except (sqlite3.Error, JournalError) as exc:
            conn.close()
            if isinstance(exc, JournalError):
                raise
            raise _open_error(path, exc) from None
        try:
            super().__init__(path)
        except JournalError:
            conn.close()
            raise
        self._wconn = conn
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
        self._healthy = True
        self._overflowing = False
        self._thread = threading.Thread(target=self._run, name="rampd-journal", daemon=True)
        self._thread.start()
        log.info(
            "journal %s open (retention %g d, telemetry %g d)",
            path,
            retention_days,
            telemetry_retention_days,
        )

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
                for k in _STATES
            )
            row = (
                _req(s.at), _f(s.measured_w), _str(s.measured_source), _f(s.target_w), _f(s.min_w),
                _f(s.max_w), _f(s.noncontrollable_w), *(_f(x) for x in s.up_w[:3]),
                *(_f(x) for x in s.down_w[:3]), _str(s.mode),
                None if s.saturated is None else int(s.saturated), *counts,
            )  # fmt: skip
            if len(row) != len(_TELEMETRY_COLUMNS):
                raise ValueError("up_w and down_w need 3 values (1 s, 5 s, 60 s)")
            self._put(((_SQL_TELEMETRY, row),))
        except (TypeError, ValueError, OverflowError) as exc:
            self._bad_row("telemetry", exc)

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
                if self._healthy:
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
        if stmts:
            conn = self._wconn
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
                    log.warning("journal writes recovered (%d rows lost while failing)", self._lost)
        stop = False
        for x in batch:
            if isinstance(x, _Barrier):
                x.ok = ok
                x.done.set()
            elif isinstance(x, _Stop):
                stop = True
        return stop

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self._wconn.in_transaction:
                self._wconn.execute("ROLLBACK")

    def _salvage(self, stmts: list[tuple[_Stmt, ...]], first: BaseException) -> bool:
        """Write the records one transaction each; drop (and count) the refused ones."""
        conn = self._wconn
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
            self._healthy = False
            log.error("journal write failed: %s; records are dropped until it recovers", exc)

    def _prune(self) -> bool:
        """Delete one chunk of expired rows per table; True if more remain."""
        more = False
        now = time.time()
        conn = self._wconn
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
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA optimize")
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with contextlib.suppress(sqlite3.Error):
            conn.close()


# --- ramps -------------------------------------------------------------------------------


class RampWatch:
    """Measures ramps online from the site meter, O(1) per sample, for `record_ramp`.

    `start()` when a dispatch comes into force, `observe()` every control cycle with the
    metered power (skip stale readings), `stop()` at shutdown; each returns the finished
    ramp's record, if one finished. A ramp settles when the power has stayed within `tol_w`
    of the target for `confirm_s`; `settle_s` counts to the moment it entered the band for
    good (as `ramp_metrics.ramp_figures` does on a recorded series). A ramp still open when
    the next one starts is "settled" if inside the band then, else "superseded"; one that
    does not settle within `timeout_s` is "timeout"; one open at `stop()` is "interrupted"
    (or "settled" if inside the band).
    """

    def __init__(self, *, confirm_s: float = 10.0, timeout_s: float = 600.0) -> None:
        self.confirm_s = confirm_s
        self.timeout_s = timeout_s
        self._open = False
        self._t0 = 0.0
        self._id: str | None = None
        self._from: float | None = None
        self._target = 0.0
        self._tol = 0.0
        self._phys: float | None = None
        self._dir = 0.0
        self._in_since: float | None = None
        self._overshoot = 0.0
        self._iae = 0.0
        self._last: tuple[float, float] | None = None  # (t, |err|)

    @property
    def active(self) -> bool:
        return self._open

    def start(
        self,
        at: float,
        dispatch_id: str | None,
        *,
        from_w: float | None,
        target_w: float,
        tol_w: float,
        physical_min_s: float | None = None,
    ) -> RampRecord | None:
        """Begin a ramp at unix `at`; returns the previous ramp's record if it was open."""
        prev = self._finish(at, "superseded") if self._open else None
        self._open = True
        self._t0, self._id, self._target, self._tol = at, dispatch_id, target_w, tol_w
        self._from = None if from_w is None or math.isnan(from_w) else from_w
        self._phys = physical_min_s
        if self._from is None or abs(target_w - self._from) <= tol_w:
            self._dir = 0.0
        else:
            self._dir = 1.0 if target_w > self._from else -1.0
        self._in_since, self._overshoot, self._iae, self._last = None, 0.0, 0.0, None
        return prev

    def observe(self, at: float, measured_w: float) -> RampRecord | None:
        if not self._open:
            return None
        if at - self._t0 >= self.timeout_s:
            return self._finish(at, "timeout")
        if math.isnan(measured_w) or at < self._t0:
            return None
        err = measured_w - self._target
        if self._last is not None:
            t_prev, e_prev = self._last
            self._iae += 0.5 * (e_prev + abs(err)) * max(0.0, at - t_prev)
        self._last = (at, abs(err))
        self._overshoot = max(self._overshoot, err * self._dir)
        if abs(err) <= self._tol:
            if self._in_since is None:
                self._in_since = at
            if at - self._in_since >= self.confirm_s:
                return self._finish(at, "settled")
        else:
            self._in_since = None
        return None

    def stop(self, at: float) -> RampRecord | None:
        return self._finish(at, "interrupted") if self._open else None

    def _finish(self, at: float, outcome: RampOutcome) -> RampRecord:
        settled_at = self._in_since
        if outcome in ("superseded", "interrupted") and settled_at is not None:
            outcome = "settled"
        if outcome == "timeout":
            settled_at = None
        self._open = False
        return RampRecord(
            started_at=self._t0,
            dispatch_id=self._id,
            from_w=self._from,
            target_w=self._target,
            tol_w=self._tol,
            settled_at=settled_at,
            settle_s=None if settled_at is None else settled_at - self._t0,
            overshoot_w=self._overshoot,
            iae_j=self._iae,
            physical_min_s=self._phys,
            outcome=outcome,
            ended_at=at,
        )
