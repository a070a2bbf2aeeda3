"""The journal's on-disk schema: tables, migrations, version checks, and the row types.

Times are unix seconds (wall clock: the journal is read by people and other processes),
power in W, energy in J. A journal written by any rampd with the same `SCHEMA_VERSION` opens;
a newer one is refused rather than touched.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from controller.market.mv import CurtailmentEvent
from controller.ramp_score import RampOutcome, RampRecord
from controller.wire.telemetry import Telemetry
from drivers.core.state import F64

log = logging.getLogger("rampd.journal")


SCHEMA_VERSION: Final = 4
DEFAULT_FILENAME: Final = "journal.sqlite"
# Without $STATE_DIRECTORY (systemd StateDirectory=rampd) this is where the unit would put it.
DEFAULT_STATE_DIR: Final = Path("/var/lib/rampd")

# An event of this kind means the target tracker dropped its active and pending dispatches
# (failsafe under policy baseline or min): nothing from before it is resumed after a restart.
EVENT_DISPATCH_DROPPED: Final = "dispatch_dropped"

# The `meta` rows that carry the failsafe over a restart (unix seconds; failsafe_since NULL
# while it is off). Rows of `meta` need no migration: an older journal simply has none.
META_LAST_HEARD: Final = "dispatcher_last_heard"
META_FAILSAFE_SINCE: Final = "failsafe_since"

__all__ = [
    "DEFAULT_FILENAME",
    "DEFAULT_STATE_DIR",
    "EVENT_DISPATCH_DROPPED",
    "SCHEMA_VERSION",
    "AckRow",
    "CurtailmentEvent",
    "DispatchRow",
    "Event",
    "JournalCorrupt",
    "JournalError",
    "JournalUnwritable",
    "Liveness",
    "RampOutcome",
    "RampRecord",
    "TelemetrySample",
    "TelemetrySeries",
    "default_journal_path",
]

# Each migration brings the schema from version i to i + 1 (index i). Never edit a shipped one.
MIGRATIONS: Final[tuple[str, ...]] = (
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
    # Devices that acknowledge commands but do not move (verified commands).
    """
    ALTER TABLE telemetry ADD COLUMN devices_unresponsive INTEGER;
    """,
    # Frequency deployments and the site's measured response (the evidence for the QSE).
    """
    CREATE TABLE deployments (
        service TEXT NOT NULL, at REAL NOT NULL, trigger_hz REAL, armed_w REAL NOT NULL,
        devices INTEGER NOT NULL, expected_w REAL NOT NULL, before_w REAL,
        after_0_25s_w REAL, after_0_5s_w REAL, after_1s_w REAL,
        end_w REAL, duration_s REAL, ended_by TEXT
    );
    CREATE INDEX deployments_at ON deployments (at);
    """,
    # Curtailment events' measurement and verification (the evidence for settlement).
    """
    CREATE TABLE curtailments (
        rail TEXT NOT NULL, started_at REAL NOT NULL, ended_at REAL NOT NULL,
        baseline_w REAL, baseline_method TEXT NOT NULL, target_w REAL,
        energy_curtailed_kwh REAL, avg_reduction_kw REAL, min_reduction_kw REAL,
        met INTEGER, met_fraction REAL,
        cost_avoided_usd REAL, revenue_forgone_usd REAL, priced_fraction REAL,
        samples TEXT NOT NULL,            -- JSON [[t, site_kw, target_kw], ...], null for NaN
        detail TEXT NOT NULL
    );
    CREATE INDEX curtailments_started_at ON curtailments (started_at);
    """,
)

HORIZONS: Final = ("1s", "5s", "60s")
TELEMETRY_HORIZONS_S: Final = (1.0, 5.0, 60.0)
"""The capability horizons a telemetry row keeps (its `up_<h>_w`, `down_<h>_w` columns)."""
STATES: Final = ("on", "sleeping", "waking", "fault", "unknown", "unresponsive")

TELEMETRY_COLUMNS: Final = (
    "at", "measured_w", "measured_source", "target_w", "min_w", "max_w", "noncontrollable_w",
    "up_1s_w", "up_5s_w", "up_60s_w", "down_1s_w", "down_5s_w", "down_60s_w",
    "mode", "saturated",
    "devices_on", "devices_sleeping", "devices_waking", "devices_fault", "devices_unknown",
    "devices_unresponsive",
)  # fmt: skip
RAMP_COLUMNS: Final = (
    "started_at", "dispatch_id", "from_w", "target_w", "tol_w", "settled_at", "settle_s",
    "overshoot_w", "iae_j", "physical_min_s", "outcome", "ended_at",
)  # fmt: skip
DEPLOYMENT_COLUMNS: Final = (
    "service", "at", "trigger_hz", "armed_w", "devices", "expected_w", "before_w",
    "after_0_25s_w", "after_0_5s_w", "after_1s_w", "end_w", "duration_s", "ended_by",
)  # fmt: skip
CURTAILMENT_COLUMNS: Final = (
    "rail", "started_at", "ended_at", "baseline_w", "baseline_method", "target_w",
    "energy_curtailed_kwh", "avg_reduction_kw", "min_reduction_kw", "met", "met_fraction",
    "cost_avoided_usd", "revenue_forgone_usd", "priced_fraction", "samples", "detail",
)  # fmt: skip
DISPATCH_COLUMNS: Final = (
    "received_at", "payload", "payload_len", "id", "seq", "mode", "target_w", "band_w", "signal",
    "ramp_s", "issued_at", "start_at", "expires_at", "decision", "reason", "code",
)  # fmt: skip


def insert_sql(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


class JournalError(Exception):
    """The journal cannot be opened (raised at open only; never by `record_*`)."""


class JournalCorrupt(JournalError):
    """The file is not a database, or its pages are malformed (SQLite says so). The daemon
    moves it aside and starts a fresh journal (`controller.journal.recover`)."""


class JournalUnwritable(JournalError):
    """The journal cannot be written: a read-only directory, file or filesystem, a full
    disk, an I/O error. The daemon runs on without it, counting the rows it drops."""


# SQLite's primary result codes (sqlite3.h) that say what kind of trouble an error is.
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT = 3, 8, 10, 11
_SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 13, 14, 26
_CORRUPT_CODES: Final = frozenset({_SQLITE_CORRUPT, _SQLITE_NOTADB})
_UNWRITABLE_CODES: Final = frozenset(
    {_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN}
)


def is_corruption(exc: BaseException) -> bool:
    """SQLite says the file is not a database or is malformed."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in _CORRUPT_CODES


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
    """Reachable increase within each of TELEMETRY_HORIZONS_S."""
    down_w: tuple[float | None, float | None, float | None] = (None, None, None)
    mode: str | None = None
    saturated: int | None = None
    """-1 target below what the fleet reaches this cycle, +1 above, 0 within."""
    devices: Mapping[str, int] | None = None
    """Device counts by state (on, sleeping, waking, fault, unknown)."""

    @classmethod
    def from_telemetry(cls, tel: Telemetry) -> TelemetrySample:
        """The row for one telemetry message, from its model (SI units already)."""
        cap = tel.capability
        up: tuple[float | None, ...] = (None, None, None)
        down: tuple[float | None, ...] = (None, None, None)
        if cap is not None:
            up, down = zip(*(cap.within(h) for h in TELEMETRY_HORIZONS_S), strict=True)
        return cls(
            at=tel.at,
            measured_w=tel.measured_w,
            measured_source=tel.measured_source,
            target_w=tel.target_w,
            min_w=tel.min_w,
            max_w=tel.max_w,
            noncontrollable_w=tel.noncontrollable_w,
            up_w=(up[0], up[1], up[2]),
            down_w=(down[0], down[1], down[2]),
            mode=tel.mode,
            saturated=tel.saturated,
            devices=tel.devices.to_wire(),
        )


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
class Liveness:
    """What the failsafe needs from before a restart (unix seconds)."""

    last_heard: float
    """The last dispatch or heartbeat, or the start of the silence if none came since the
    previous run began."""
    failsafe_since: float | None
    """When the failsafe began, if it was on at the stop."""


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


def _real(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _nan(x: object) -> float:
    return math.nan if x is None else float(x)  # type: ignore[arg-type]


def curtailment_row(ev: CurtailmentEvent) -> tuple[Any, ...]:
    """An event as a `curtailments` row (NaN and infinities as NULL)."""
    if not (math.isfinite(ev.started_at) and math.isfinite(ev.ended_at)):
        raise ValueError("a curtailment needs finite start and end times")
    samples = json.dumps(
        [[_real(x) for x in s] for s in ev.samples], separators=(",", ":"), allow_nan=False
    )
    return (
        str(ev.rail), float(ev.started_at), float(ev.ended_at), _real(ev.baseline_w),
        str(ev.baseline_method), _real(ev.target_w), _real(ev.energy_curtailed_kwh),
        _real(ev.avg_reduction_kw), _real(ev.min_reduction_kw),
        None if ev.met is None else int(bool(ev.met)), _real(ev.met_fraction),
        _real(ev.cost_avoided_usd), _real(ev.revenue_forgone_usd), _real(ev.priced_fraction),
        samples, str(ev.detail),
    )  # fmt: skip


def curtailment_from_row(r: Sequence[Any]) -> CurtailmentEvent:
    """The event of a `curtailments` row, in `CURTAILMENT_COLUMNS` order (NULL as NaN)."""
    raw = json.loads(r[14]) if r[14] else []
    samples = tuple((_nan(s[0]), _nan(s[1]), _nan(s[2])) for s in raw)
    return CurtailmentEvent(
        rail=r[0],
        started_at=r[1],
        ended_at=r[2],
        baseline_w=_nan(r[3]),
        baseline_method=r[4],
        target_w=r[5],
        energy_curtailed_kwh=_nan(r[6]),
        avg_reduction_kw=_nan(r[7]),
        min_reduction_kw=_nan(r[8]),
        met=None if r[9] is None else bool(r[9]),
        met_fraction=r[10],
        cost_avoided_usd=_nan(r[11]),
        revenue_forgone_usd=_nan(r[12]),
        priced_fraction=r[13],
        samples=samples,
        detail=r[15],
    )


# --- paths and versions ------------------------------------------------------------------


def default_journal_path() -> Path:
    """`$STATE_DIRECTORY/journal.sqlite` (systemd StateDirectory=), else /var/lib/rampd/."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return (Path(state) if state else DEFAULT_STATE_DIR) / DEFAULT_FILENAME


def check_directory(path: Path) -> None:
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
        raise JournalUnwritable(
            f"journal directory {parent} is not writable by uid {os.geteuid()}: "
            f"{exc.strerror or exc}"
        ) from None
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise JournalUnwritable(
            f"journal {path} is not readable and writable by uid {os.geteuid()}"
        )


def open_error(path: Path, exc: BaseException) -> JournalError:
    """The error to raise for an SQLite error at open, of the kind SQLite's code says."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    kind = (
        JournalCorrupt
        if primary in _CORRUPT_CODES
        else JournalUnwritable
        if primary in _UNWRITABLE_CODES
        else JournalError
    )
    return kind(f"cannot open journal {path}: {exc}")


def read_only_filesystem(path: Path) -> bool:
    """The filesystem holding `path` (or its directory) is mounted read-only."""
    for p in (path, path.parent):
        try:
            return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        except OSError:
            continue
    return False


def migrate(conn: sqlite3.Connection, path: Path) -> None:
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
            for stmt in MIGRATIONS[v].split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {v + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("journal %s: schema version %d", path, v + 1)


def check_version(conn: sqlite3.Connection, path: Path) -> int:
    """The journal's schema version, if this rampd reads it (JournalError otherwise)."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version == 0:
        raise JournalError(f"{path} is not a rampd journal (schema version 0)")
    if version > SCHEMA_VERSION:
        raise JournalError(
            f"journal {path} has schema version {version}, newer than this rampd "
            f"understands ({SCHEMA_VERSION})"
        )
    return version
