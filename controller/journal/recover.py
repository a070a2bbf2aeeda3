"""The daemon's journal at start, whatever state its file is in.

Record keeping in trouble is no reason to stop controlling a site:

* a corrupt file (SQLite: "file is not a database", "database disk image is malformed"),
  found at open or by reading what a restart reads, is moved aside as
  `<name>.corrupt-<UTC time>` (with its -wal and -shm files, which belong to it and must not
  meet a fresh database) and a fresh journal begins, whose first event says so;
* a journal that cannot be written (read-only directory, file or filesystem, full disk)
  opens without writing: `Journal(unwritable_ok=True)`.

Only a configuration problem still stops the start, with its message: a missing directory,
a file that is another program's database, a newer schema, no WAL support.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Final

from controller.journal.reader import JournalReader
from controller.journal.schema import JournalCorrupt, JournalError, is_corruption
from controller.journal.writer import Journal

log = logging.getLogger("rampd.journal")

EVENT_JOURNAL: Final = "journal"
"""The kind of the event a fresh journal begins with after a corrupt one was moved aside."""
_PROBE_LOOKBACK_S: Final = 7 * 86400.0
"""How far back the start reads dispatches and events (the governor's commitments)."""
_SIDE_FILES: Final = ("-wal", "-shm")


def open_for_daemon(
    path: Path,
    now_unix: float,
    *,
    retention_days: float = 90,
    telemetry_retention_days: float = 14,
) -> Journal:
    """The daemon's journal at `path` (see the module's doc). Raises JournalError only for
    a configuration problem."""

    def journal(unusable: str | None = None) -> Journal:
        return Journal(
            path,
            retention_days=retention_days,
            telemetry_retention_days=telemetry_retention_days,
            unwritable_ok=True,
            unusable=unusable,
        )

    try:
        probe(path, now_unix)
        return journal()
    except JournalCorrupt as exc:
        corrupt = exc
    try:
        aside = move_aside(path, now_unix)
    except OSError as exc:
        why = f"{corrupt}; it cannot be moved aside: {exc.strerror or exc}"
        log.error("journal %s is corrupt and stays so (%s); control goes on without it", path, why)
        return journal(unusable=why)
    text = f"the previous journal was corrupt ({corrupt}); moved to {aside.name}"
    log.error("journal %s: %s; a fresh journal begins", path, text)
    fresh = journal()
    fresh.moved_aside = aside
    fresh.record_event(EVENT_JOURNAL, text, at=now_unix)
    return fresh


def probe(path: Path, now_unix: float) -> None:
    """Read what a restart reads (resume, seq, the failsafe, recent dispatches and events):
    JournalCorrupt if SQLite finds any of it corrupt. Anything else (no file yet, a file
    that cannot be opened for reading) is left to `Journal` to judge."""
    if not path.is_file():
        return
    try:
        reader = JournalReader(path)
    except JournalCorrupt:
        raise
    except JournalError:
        return
    try:
        reader.last_seq()
        reader.last_target()
        reader.liveness()
        reader.last_valid_dispatch(now_unix)
        since = now_unix - _PROBE_LOOKBACK_S
        reader._query(
            "SELECT sum(length(payload)) FROM dispatches WHERE received_at >= ?", (since,)
        )
        reader._query("SELECT sum(length(text)) FROM events WHERE at >= ?", (since,))
    except sqlite3.Error as exc:
        if is_corruption(exc):
            raise JournalCorrupt(f"journal {path} is corrupt: {exc}") from None
    except (ValueError, TypeError):
        # A malformed row a restart cannot use is the resume's to report, not corruption.
        pass
    finally:
        reader.close()


def move_aside(path: Path, now_unix: float) -> Path:
    """Rename `path` and its -wal and -shm files to `<name>.corrupt-<UTC time>[-n]...`;
    returns the new name of the database. The side files go first: a stale -wal beside a
    fresh database would be read as its log."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_unix))
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while any(Path(f"{aside}{s}").exists() for s in ("", *_SIDE_FILES)):
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    for suffix in _SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}{suffix}", f"{aside}{suffix}")
    os.rename(path, aside)
    return aside
