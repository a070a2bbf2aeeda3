"""The failsafe across a restart: when the dispatcher was last heard, and whether the failsafe
was on, journalled while running and put back at start.

Without it a restart would reset the silence timer (a dispatcher silent across a restart
would get a fresh `dispatch_timeout_s`) and end a failsafe that no dispatch ended. So the
daemon journals the dispatcher's last sign of life (a dispatch or heartbeat; at most every
`EVERY_S`, the journal is not a heartbeat log) and the failsafe's start and end (at once),
in two `meta` rows; at start `restore` hands them to the tracker: a failsafe that was on stays
on ("since before the restart"), and otherwise the silence timer goes on from the last time
heard, the outage counting as silence (wall-clock time: the monotonic clock does not survive
a restart).
"""

from __future__ import annotations

import logging
import math
from typing import Final

from controller.config import FailsafeConfig
from controller.journal import Journal, Liveness
from controller.target import TargetTracker
from controller.wire import rfc3339

log = logging.getLogger("rampd")

EVERY_S: Final = 5.0
"""How often at most a newer "last heard" is journalled (a failsafe's start or end: at once).
A crash loses at most this much of it: the restarted timer trips that much early, never late."""
EVENT_FAILSAFE: Final = "failsafe"


class LivenessRecorder:
    """Journals what `restore` needs; `tick` every cycle, `flush` at the stop."""

    def __init__(self, journal: Journal, tracker: TargetTracker, *, every_s: float = EVERY_S):
        self._journal = journal
        self._tracker = tracker
        self._every_s = every_s
        self._heard: float | None = None  # as last journalled (monotonic)
        self._since: float | None = None
        self._at = -math.inf  # when last journalled (monotonic)

    def tick(self, now_mono: float, now_unix: float) -> None:
        heard, since = self._tracker.last_heard, self._tracker.failsafe_since
        if heard is None:
            return
        if since == self._since and (heard == self._heard or now_mono - self._at < self._every_s):
            return
        self._write(heard, since, now_mono, now_unix)

    def flush(self, now_mono: float, now_unix: float) -> None:
        """Journal the latest state if it is not yet (at the stop: nothing throttled lost)."""
        heard, since = self._tracker.last_heard, self._tracker.failsafe_since
        if heard is not None and (heard, since) != (self._heard, self._since):
            self._write(heard, since, now_mono, now_unix)

    def _write(self, heard: float, since: float | None, now_mono: float, now_unix: float) -> None:
        # Monotonic instants as wall-clock times, by the offset between the clocks now.
        offset = now_unix - now_mono
        self._journal.record_liveness(heard + offset, None if since is None else since + offset)
        self._heard, self._since, self._at = heard, since, now_mono


def restore(
    tracker: TargetTracker, journal: Journal, lv: Liveness, now_mono: float, now_unix: float
) -> None:
    """Put the failsafe's state from before the restart (`lv`: `journal.liveness()`; an
    older journal has none, and the timer then starts afresh, as it always did) into
    `tracker`, after the resumed dispatches are in force; logged, and journalled when the
    failsafe is on at start."""
    heard_ago = now_unix - lv.last_heard
    on_for = None if lv.failsafe_since is None else now_unix - lv.failsafe_since
    tracker.restore(now_mono, last_heard_ago_s=heard_ago, failsafe_for_s=on_for)
    if on_for is not None:
        text = (
            f"failsafe kept: on since before the restart ({rfc3339(lv.failsafe_since or 0.0)}, "
            f"{max(0.0, on_for):.0f} s ago); {tracker.failsafe_reason}"
        )
    elif tracker.mode == "failsafe":
        text = (
            f"failsafe at start: the dispatcher was last heard {heard_ago:.0f} s ago "
            f"({rfc3339(lv.last_heard)}), before the restart; {tracker.failsafe_reason}"
        )
    else:
        at = tracker.failsafe_at()
        left = "" if at is None else f"; failsafe in {max(0.0, at - now_mono):.0f} s if silent"
        log.info(
            "dispatcher last heard %.0f s ago (%s), before the restart: the silence timer "
            "goes on from there%s",
            heard_ago,
            rfc3339(lv.last_heard),
            left,
        )
        return
    log.warning("%s", text)
    journal.record_event(EVENT_FAILSAFE, text, at=now_unix)


def start_w(
    journal: Journal | None,
    lv: Liveness | None,
    failsafe: FailsafeConfig,
    now_unix: float,
    *,
    resumed: bool,
    default_w: float,
) -> float:
    """Where the target starts when the failsafe will be on at start under `baseline` or
    `min` with nothing resumed: the last journalled target (devices keep their setpoints
    over a restart; the failsafe's ramp goes on from there, not from the site maximum).
    `default_w` otherwise."""
    if journal is None or lv is None or resumed or failsafe.policy == "hold":
        return default_w
    tripped = lv.last_heard + failsafe.dispatch_timeout_s <= now_unix
    if lv.failsafe_since is None and not tripped:
        return default_w
    last = journal.last_target()
    return default_w if last is None else last[1]
