"""Read-only queries on a journal: the restart queries and the windows `rampd report` reads.

Queries block the caller: call them at start-up, from the report, or through
`asyncio.to_thread`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import numpy as np

from controller.journal import resume
from controller.journal.schema import (
    CURTAILMENT_COLUMNS,
    DISPATCH_COLUMNS,
    HORIZONS,
    RAMP_COLUMNS,
    STATES,
    TELEMETRY_COLUMNS,
    AckRow,
    DispatchRow,
    Event,
    JournalError,
    Liveness,
    RampRecord,
    TelemetrySeries,
    check_version,
    curtailment_from_row,
    open_error,
)
from controller.market.mv import CurtailmentEvent, covered_s, window_length_s
from drivers.core.state import F64

_CURTAILMENTS_SINCE: Final = 4
"""The schema version that added the curtailments table (an older journal has none)."""


class JournalReader:
    """Read-only access to a journal (no writer, no migration). Queries block the caller."""

    def __init__(self, path: Path, *, open_now: bool = True) -> None:
        """`open_now=False`: no connection yet (`_open_read` later); queries answer nothing
        meanwhile (the daemon's journal, when its file cannot be read)."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._version = 0
        if open_now:
            self._open_read()

    def _open_read(self, *, immutable: bool = False) -> None:
        """Connect read-only. `immutable`: on a read-only filesystem, where SQLite cannot
        create the WAL index a WAL database is otherwise read through (nothing can write
        there, so nothing changes under the reader)."""
        if not self.path.is_file():
            raise JournalError(f"no journal at {self.path}")
        flags = "mode=ro&immutable=1" if immutable else "mode=ro"
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?{flags}",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA busy_timeout = 5000")
            version = check_version(conn, self.path)
        except (sqlite3.Error, JournalError) as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, JournalError):
                raise
            raise open_error(self.path, exc) from None
        with self._lock:
            self._conn, self._version = conn, version

    @property
    def readable(self) -> bool:
        """Queries read the journal (False: they answer nothing)."""
        return self._conn is not None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            if self._conn is None:
                return []
            return self._conn.execute(sql, params).fetchall()

    # -- restart (see `controller.journal.resume`) -----------------------------------------

    def last_seq(self) -> int | None:
        """The highest seq ever accepted (kept across retention)."""
        return resume.last_seq(self._query)

    def last_target(self) -> tuple[float, float] | None:
        """(at, target_w) of the latest telemetry row with a target: where to resume from."""
        return resume.last_target(self._query)

    def liveness(self) -> Liveness | None:
        """When the dispatcher was last heard and whether the failsafe was on, as the last
        run recorded them (None: never recorded). See `resume.liveness`."""
        return resume.liveness(self._query)

    def last_valid_dispatch(self, now_unix: float) -> tuple[bytes, ...] | None:
        """Raw payloads to replay, in order, to restore the target in force at `now_unix`:
        (in force,), (pending,), (in force, pending) or None. See `resume.in_force`."""
        return resume.in_force(self._query, now_unix)

    # -- windows ----------------------------------------------------------------------

    def dispatches_between(self, t0: float, t1: float) -> list[DispatchRow]:
        rows = self._query(
            f"SELECT {', '.join(DISPATCH_COLUMNS)} FROM dispatches "
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
            f"SELECT {', '.join(RAMP_COLUMNS)} FROM ramps "
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
            f"SELECT {', '.join(TELEMETRY_COLUMNS)} FROM telemetry "
            "WHERE at >= ? AND at <= ? ORDER BY at, rowid",
            (t0, t1),
        )
        idx = {c: i for i, c in enumerate(TELEMETRY_COLUMNS)}
        text = {idx["mode"], idx["measured_source"]}
        numeric = [i for i in range(len(TELEMETRY_COLUMNS)) if i not in text]
        arr = (
            np.array([[r[i] for i in numeric] for r in rows], dtype=np.float64)
            .reshape(len(rows), len(numeric))
            .T
        )  # None -> NaN
        col = {c: arr[k] for k, c in enumerate(TELEMETRY_COLUMNS[i] for i in numeric)}
        return TelemetrySeries(
            at=col["at"],
            measured_w=col["measured_w"],
            target_w=col["target_w"],
            min_w=col["min_w"],
            max_w=col["max_w"],
            noncontrollable_w=col["noncontrollable_w"],
            up_w=np.vstack([col[f"up_{h}_w"] for h in HORIZONS]),
            down_w=np.vstack([col[f"down_{h}_w"] for h in HORIZONS]),
            devices=np.vstack([col[f"devices_{s}"] for s in STATES]),
            mode=tuple(r[idx["mode"]] or "" for r in rows),
            measured_source=tuple(r[idx["measured_source"]] or "" for r in rows),
        )

    # -- measurement and verification ------------------------------------------------

    def curtailments(self, since: float, until: float) -> list[CurtailmentEvent]:
        """Curtailment events overlapping [since, until], by start time."""
        if self._version < _CURTAILMENTS_SINCE:
            return []
        rows = self._query(
            f"SELECT {', '.join(CURTAILMENT_COLUMNS)} FROM curtailments "
            "WHERE ended_at >= ? AND started_at <= ? ORDER BY started_at, rowid",
            (since, until),
        )
        return [curtailment_from_row(r) for r in rows]

    def site_power_days(
        self,
        before: float,
        start_s_of_day: float,
        end_s_of_day: float,
        tz: str,
        n_days: int = 5,
        *,
        lookback_days: int = 14,
        min_coverage: float = 0.5,
    ) -> list[tuple[F64, F64]]:
        """The site's measured power (telemetry `measured_w`) over a local time-of-day
        window on the last `n_days` usable like days before `before` (weekdays for a
        weekday, Saturdays and Sundays for a weekend day), oldest first: the series
        `controller.market.mv.high_k_of_n_baseline` averages.

        Days are walked back from the day before `before`'s local date (a window crossing
        midnight belongs to the day it starts), at most `lookback_days` of them (telemetry
        retention is 14 days by default). Samples inside recorded curtailments are left out
        (a curtailed period is never a baseline); a day whose remaining samples cover less
        than `min_coverage` of the window (the daemon was down, or the site was curtailed)
        is skipped. May return fewer than `n_days`. Blocks: run it in a thread.
        """
        zone = ZoneInfo(tz)
        length_s = window_length_s(start_s_of_day, end_s_of_day)
        start_s = start_s_of_day % 86400.0
        need_s = min_coverage * length_s
        first_day = datetime.fromtimestamp(before, zone).date()
        weekend = first_day.weekday() >= 5

        def window(d: date) -> tuple[float, float]:
            # Wall-clock arithmetic on an aware datetime: local times, DST included.
            midnight = datetime(d.year, d.month, d.day, tzinfo=zone)
            t0 = (midnight + timedelta(seconds=start_s)).timestamp()
            t1 = (midnight + timedelta(seconds=start_s + length_s)).timestamp()
            return t0, t1

        candidates = [
            d
            for k in range(1, lookback_days + 1)
            if ((d := first_day - timedelta(days=k)).weekday() >= 5) == weekend
        ]
        if not candidates:
            return []
        curtailed = [
            (ev.started_at, ev.ended_at)
            for ev in self.curtailments(window(candidates[-1])[0], before)
        ]
        out: list[tuple[F64, F64]] = []
        for d in candidates:
            t0, t1 = window(d)
            if t1 > before:
                continue
            rows = self._query(
                "SELECT at, measured_w FROM telemetry "
                "WHERE at >= ? AND at < ? AND measured_w IS NOT NULL ORDER BY at",
                (t0, t1),
            )
            arr = np.array(rows, dtype=np.float64).reshape(-1, 2)
            t, w = arr[:, 0], arr[:, 1]
            keep = np.isfinite(w)
            for c0, c1 in curtailed:
                keep &= (t < c0) | (t >= c1)
            t, w = t[keep], w[keep]
            if covered_s(t) >= need_s:
                out.append((t, w))
                if len(out) == n_days:
                    break
        return out[::-1]
