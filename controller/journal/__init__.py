"""The journal: what the site was asked and what it did, in SQLite (WAL) under the state directory.

Every dispatch as received (raw payload) with the decision, every ack, every ramp with its
outcome, per-second telemetry, operator-relevant events, frequency deployments and
curtailment events with their measurement and verification (kept for settlement). It
answers three questions:

* after a restart: which dispatch is still in force (`last_valid_dispatch`) and which seq was
  the last accepted (`last_seq`), so the daemon resumes the target and keeps refusing replays
  (`resume`);
* after a grid event: what happened in a window (`rampd report`, see `controller.tools.report`);
* for settlement: what each curtailment event gave up and earned (`curtailments`), and the
  past days' load a high-4-of-5 baseline averages (`site_power_days`).

`schema` holds the tables, migrations and row types; `writer` the daemon's `Journal` (writing
never blocks the event loop); `reader` the read-only `JournalReader` the report opens;
`recover` how the daemon opens its journal whatever state the file is in (corrupt: moved
aside; read-only or full: run on, counting the rows dropped).
"""

from controller.journal.reader import JournalReader
from controller.journal.schema import (
    DEFAULT_FILENAME,
    DEFAULT_STATE_DIR,
    EVENT_DISPATCH_DROPPED,
    SCHEMA_VERSION,
    AckRow,
    CurtailmentEvent,
    DispatchRow,
    Event,
    JournalCorrupt,
    JournalError,
    JournalUnwritable,
    Liveness,
    RampOutcome,
    RampRecord,
    TelemetrySample,
    TelemetrySeries,
    default_journal_path,
)
from controller.journal.writer import Journal, JournalStats

__all__ = [
    "DEFAULT_FILENAME",
    "DEFAULT_STATE_DIR",
    "EVENT_DISPATCH_DROPPED",
    "SCHEMA_VERSION",
    "AckRow",
    "CurtailmentEvent",
    "DispatchRow",
    "Event",
    "Journal",
    "JournalCorrupt",
    "JournalError",
    "JournalReader",
    "JournalStats",
    "JournalUnwritable",
    "Liveness",
    "RampOutcome",
    "RampRecord",
    "TelemetrySample",
    "TelemetrySeries",
    "default_journal_path",
]
