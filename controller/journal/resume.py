"""After a restart: which dispatches are still in force, the last accepted seq, and the last
target, from the journal.

Which dispatch is in force at an instant is `TargetTracker`'s decision; `in_force` replays the
journaled dispatches and failsafe drops through a tracker of its own on the unix axis, so a
resumed site follows the same rules as a live one (a scheduled start that passed during the
outage has started; an expiry that passed has released; a failsafe drop ended everything
before it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

from controller.config import FailsafeConfig, SiteLimits
from controller.journal.schema import (
    EVENT_DISPATCH_DROPPED,
    META_FAILSAFE_SINCE,
    META_LAST_HEARD,
    Liveness,
)
from controller.target import TargetTracker
from controller.wire.dispatch import Dispatch, DispatchMode

Query = Callable[[str, Sequence[Any]], list[Any]]
"""Runs one read query on the journal and returns its rows."""

# The replay's tracker never falls silent on its own (heartbeats are not journaled: the
# failsafes that happened are, as drop events), and a failsafe it is told of drops what is
# in force, as the live one did under the policy that recorded the event.
_REPLAY_FAILSAFE = FailsafeConfig(dispatch_timeout_s=math.inf, policy="min")
# Only which dispatch is in force matters here, not the power: any limits will do.
_REPLAY_LIMITS = SiteLimits(min_kw=0.0, max_kw=1.0)


def last_seq(query: Query) -> int | None:
    """The highest seq ever accepted (kept across retention)."""
    rows = query("SELECT value FROM meta WHERE key = 'last_seq'", ())
    return int(rows[0][0]) if rows else None


def last_target(query: Query) -> tuple[float, float] | None:
    """(at, target_w) of the latest telemetry row with a target: where to resume from."""
    rows = query(
        "SELECT at, target_w FROM telemetry WHERE target_w IS NOT NULL ORDER BY rowid DESC LIMIT 1",
        (),
    )
    return (float(rows[0][0]), float(rows[0][1])) if rows else None


def liveness(query: Query) -> Liveness | None:
    """When the dispatcher was last heard and whether the failsafe was on, as the previous
    run last recorded them; None from a journal that never recorded them (written by an
    older rampd: its silence timer starts afresh, as it did then).

    The record is throttled, so an accepted dispatch journalled after it is newer news:
    it was heard then, and it ended any failsafe begun before it.
    """
    rows = dict(
        query(
            "SELECT key, value FROM meta WHERE key IN (?, ?)",
            (META_LAST_HEARD, META_FAILSAFE_SINCE),
        )
    )
    heard = rows.get(META_LAST_HEARD)
    if heard is None:
        return None
    since = rows.get(META_FAILSAFE_SINCE)
    last = query(
        "SELECT max(received_at) FROM dispatches WHERE decision = 'accepted' AND received_at > ?",
        (float(heard),),
    )
    accepted = None if not last or last[0][0] is None else float(last[0][0])
    if accepted is not None:
        heard = accepted
        if since is not None and float(since) <= accepted:
            since = None
    return Liveness(float(heard), None if since is None else float(since))


def in_force(query: Query, now_unix: float) -> tuple[bytes, ...] | None:
    """Raw payloads to replay, in order, to restore the dispatches in force at `now_unix`.

    Returns (in force,), (pending,), (in force, pending) or None (nothing to resume: never
    dispatched, expired, or dropped by a failsafe). A release in force is returned
    (replaying it leaves the site released).
    """
    # A dispatch that started on acceptance superseded everything before it, pending or in
    # force: the replay can begin with the last one.
    anchor = query(
        "SELECT rowid FROM dispatches WHERE decision = 'accepted' "
        "AND (start_at IS NULL OR start_at <= received_at) ORDER BY rowid DESC LIMIT 1",
        (),
    )
    since = int(anchor[0][0]) if anchor else 0
    rows = query(
        "SELECT received_at, payload, id, seq, mode, target_w, band_w, signal, ramp_s, "
        "issued_at, start_at, expires_at FROM dispatches "
        "WHERE decision = 'accepted' AND rowid >= ? ORDER BY rowid",
        (since,),
    )
    if not rows:
        return None
    drops = [
        float(r[0])
        for r in query(
            "SELECT at FROM events WHERE kind = ? AND at >= ? ORDER BY at",
            (EVENT_DISPATCH_DROPPED, float(rows[0][0])),
        )
    ]
    payloads: dict[int, bytes] = {}
    tracker = TargetTracker(
        _REPLAY_LIMITS, _REPLAY_FAILSAFE, 0.0, now_mono=float(rows[0][0]), announce=False
    )
    k = 0
    for row in rows:
        received_at = float(row[0])
        # A drop at the same instant as an acceptance came first (the dispatch ended it).
        while k < len(drops) and drops[k] <= received_at:
            tracker.start_failsafe(drops[k])
            k += 1
        d = _dispatch(row)
        payloads[id(d)] = bytes(row[1])
        if tracker.last_seq is not None and d.seq <= tracker.last_seq:
            continue  # the live tracker refuses a seq not above the last: so does the replay
        tracker.accept(d, received_at, received_at)
    for t in drops[k:]:
        tracker.start_failsafe(t)
    tracker.target_w(now_unix)  # apply every start and expiry due by now
    chain = tuple(payloads[id(d)] for d in (tracker.in_force, tracker.pending) if d is not None)
    return chain or None


def _dispatch(row: Sequence[Any]) -> Dispatch:
    """The journaled columns of an accepted dispatch, as the tracker took it."""
    _, _, id_, seq, mode, target_w, band_w, signal, ramp_s, issued_at, start_at, expires_at = row

    def opt(x: object) -> float | None:
        return None if x is None else float(cast(float, x))

    return Dispatch(
        id=str(id_),
        seq=int(seq),
        issued_at=float(issued_at),
        mode=cast(DispatchMode, mode),
        target_w=float(target_w or 0.0),
        ramp_s=float(ramp_s or 0.0),
        start_at=opt(start_at),
        expires_at=opt(expires_at),
        signal=opt(signal),
        band_w=opt(band_w),
    )
