"""Resume after a restart agrees with the live tracker on which dispatch is in force.

Each case runs a live `TargetTracker` on a monotonic clock (its own axis, as in the daemon) with
a dispatcher that heartbeats every 10 s except when it falls silent, journals what the daemon
journals (every accepted dispatch; a drop event when a failsafe under policy baseline or min
drops the dispatches), stops journaling at `stop`, and restarts at `restart`. The journal's
answer (real SQLite file), put back into a fresh tracker the way the daemon does it, must name
the same dispatch in force and the same pending one as the live tracker at that instant.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from controller.config import FailsafeConfig, FailsafePolicy, SiteLimits
from controller.journal import EVENT_DISPATCH_DROPPED, Journal
from controller.target import TargetTracker, resumed
from controller.wire import Dispatch, DispatchRejected, rfc3339

LIMITS = SiteLimits(min_kw=0.0, max_kw=3000.0)
MONO0 = 1000.0  # the live tracker's monotonic axis differs from the unix one
HEARTBEAT_S = 10.0


@dataclass(frozen=True)
class D:
    """A dispatch sent at `at` (s from the start); start/expiry in the same seconds."""

    at: float
    seq: int
    mode: str = "setpoint"
    start: float | None = None
    expires: float | None = None


@dataclass(frozen=True)
class Case:
    name: str
    dispatches: tuple[D, ...]
    restart: float
    stop: float = 90.0
    policy: FailsafePolicy = "min"
    silent: tuple[float, float] | None = None
    """The dispatcher sends no heartbeat in [from, to)."""
    expect: tuple[int, ...] = field(default=())
    """Seqs (in force, pending) at the restart: pins the case down beside the agreement."""


CASES = [
    Case("the latest immediate dispatch", (D(0, 1), D(10, 2)), restart=120, expect=(2,)),
    Case(
        "a pending start passes during the outage",
        (D(0, 1), D(5, 2, start=100)),
        restart=200,
        expect=(2,),
    ),
    Case(
        "a pending start still ahead",
        (D(0, 1), D(5, 2, start=300)),
        restart=200,
        expect=(1, 2),
    ),
    Case("an expiry during the outage", (D(0, 1, expires=100),), restart=200, expect=()),
    Case(
        "an expiry, then a pending start during the outage",
        (D(0, 1, expires=95), D(1, 2, start=150, expires=400)),
        restart=200,
        expect=(2,),
    ),
    Case(
        "an expiry before a pending start, restart between",
        (D(0, 1, expires=50), D(1, 2, start=150, expires=400)),
        restart=120,
        expect=(2,),
    ),
    Case(
        "the pending dispatch expires too",
        (D(0, 1, expires=50), D(1, 2, start=150, expires=400)),
        restart=500,
        expect=(),
    ),
    Case(
        "a later pending dispatch supersedes an earlier one",
        (D(0, 1), D(1, 2, start=100), D(2, 3, start=200)),
        restart=150,
        expect=(1, 3),
    ),
    Case(
        "an immediate dispatch supersedes a pending one",
        (D(0, 1), D(1, 2, start=100), D(2, 3)),
        restart=150,
        expect=(3,),
    ),
    Case(
        "a release stays in force (it never expires)",
        (D(0, 1), D(1, 2, mode="release", expires=5)),
        restart=150,
        expect=(2,),
    ),
    Case(
        "a failsafe drop ends what was in force and pending",
        (D(0, 1), D(1, 2, start=500)),
        silent=(0, 100),
        restart=600,
        expect=(),
    ),
    Case(
        "a dispatch after a failsafe drop",
        (D(0, 1), D(1, 2, start=500), D(80, 3, expires=300)),
        silent=(0, 70),
        restart=200,
        expect=(3,),
    ),
    Case(
        "a dispatch scheduled after a failsafe drop",
        (D(0, 1), D(1, 2, start=500), D(80, 3, start=150)),
        silent=(0, 70),
        restart=120,
        expect=(3,),
    ),
    Case(
        "a pending start before a failsafe drop",
        (D(0, 1), D(1, 2, start=30)),
        silent=(0, 100),
        restart=150,
        expect=(),
    ),
    Case(
        "under policy hold the failsafe drops nothing",
        (D(0, 1), D(1, 2, start=100)),
        policy="hold",
        silent=(0, 100),
        restart=150,
        expect=(2,),
    ),
    Case(
        "a failsafe under baseline drops too",
        (D(0, 1, expires=500),),
        policy="baseline",
        silent=(0, 80),
        restart=150,
        expect=(),
    ),
]


def _payload(d: D, base: float) -> bytes:
    body: dict[str, Any] = {
        "id": f"d{d.seq}",
        "seq": d.seq,
        "issued_at": rfc3339(base + d.at),
        "mode": d.mode,
        "target_kw": 1000.0 + d.seq,
    }
    if d.start is not None:
        body["start_at"] = rfc3339(base + d.start)
    if d.expires is not None:
        body["expires_at"] = rfc3339(base + d.expires)
    return json.dumps(body).encode()


def _live(case: Case, journal: Journal, base: float) -> TargetTracker:
    """Run the live tracker to the restart, journaling what the daemon journals up to `stop`."""
    fs = FailsafeConfig(dispatch_timeout_s=60.0, policy=case.policy, baseline_kw=500.0, ramp_s=30.0)
    tracker = TargetTracker(LIMITS, fs, LIMITS.max_kw * 1e3, now_mono=MONO0)
    beats = [
        k * HEARTBEAT_S
        for k in range(int(case.restart / HEARTBEAT_S) + 1)
        if case.silent is None or not case.silent[0] <= k * HEARTBEAT_S < case.silent[1]
    ]
    events: list[tuple[float, int, D | None]] = [(t, 1, None) for t in beats]
    events += [(d.at, 0, d) for d in case.dispatches]
    events.append((case.restart, 2, None))
    for t, _, d in sorted(events, key=lambda e: (e[0], e[1])):
        failsafe_at = tracker.failsafe_at()
        if failsafe_at is not None and failsafe_at - MONO0 <= t:
            tracker.target_w(failsafe_at)
            assert tracker.mode == "failsafe"
            assert failsafe_at - MONO0 < case.stop, "a failsafe during the outage is unknowable"
            if case.policy != "hold":
                journal.record_event(
                    EVENT_DISPATCH_DROPPED, "failsafe", at=base + failsafe_at - MONO0
                )
        if t == case.restart and d is None and _ == 2:
            tracker.target_w(MONO0 + t)
        elif d is None:
            tracker.heartbeat(MONO0 + t)
        else:
            assert d.at < case.stop
            raw = _payload(d, base)
            parsed = Dispatch.decode(
                raw, now_unix=base + d.at, last_seq=tracker.last_seq, limits=LIMITS
            )
            tracker.accept(parsed, MONO0 + d.at, base + d.at)
            journal.record_dispatch(base + d.at, raw, parsed)
    return tracker


def _seqs(*ds: Dispatch | None) -> tuple[int, ...]:
    return tuple(d.seq for d in ds if d is not None)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_resume_agrees_with_the_live_tracker(case: Case, tmp_path: Path) -> None:
    base = float(int(time.time())) - 1000.0  # recent: retention keeps it
    with Journal(tmp_path / "journal.sqlite") as journal:
        live = _live(case, journal, base)
        assert journal.flush()
        now_unix = base + case.restart
        chain = journal.last_valid_dispatch(now_unix) or ()

    # The live tracker's own account: a release in force leaves no active dispatch.
    in_force = live.in_force
    assert live.active is (None if in_force is None or in_force.mode == "release" else in_force)
    assert _seqs(in_force, live.pending) == case.expect

    # What resume names is what the live tracker has in force and pending.
    assert tuple(json.loads(raw)["seq"] for raw in chain) == _seqs(in_force, live.pending)

    # The daemon's resume: parse each payload again (one that no longer passes is skipped, as
    # the daemon skips it) and put it back in a fresh tracker: the same dispatch is active
    # and the same one pending, and it heads where the live one heads.
    fresh = TargetTracker(LIMITS, FailsafeConfig(), LIMITS.max_kw * 1e3, now_mono=5.0)
    for raw in chain:
        try:
            d = Dispatch.decode(
                raw, now_unix=now_unix, last_seq=fresh.last_seq, limits=LIMITS, replay=True
            )
        except DispatchRejected:
            continue
        fresh.accept(resumed(d, now_unix), 5.0, now_unix)
    assert _seqs(fresh.active, fresh.pending) == _seqs(live.active, live.pending)
    if in_force is not None:
        # (With nothing in force the daemon restarts from the last journaled target instead.)
        assert fresh.ramp_end_w == live.ramp_end_w
