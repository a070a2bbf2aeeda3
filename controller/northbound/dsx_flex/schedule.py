"""Each feed's load targets over time: which one is in force at an instant.

A target holds from its start (now when the ISV gave none) to its end (none: until
replaced). At any instant the newest target covering it wins: newest by the event's `time`,
then by arrival. So a bounded target sent over a standing one takes its window and hands back
when it ends, and a newer target without an end replaces every older one from its start on.
A winner without a constraint (the ISV's `null`) restores the feed's default.

Pure: no I/O, no clock (callers pass unix time).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from controller.northbound.dsx_flex.power import WATTS, Power

MAX_PER_FEED: Final = 512
"""Targets kept per feed at most (after pruning); past it the oldest are dropped."""


@dataclass(frozen=True, slots=True)
class Target:
    feed: str
    start: float
    end: float | None
    constraint: Power | None
    """None: the feed's default (no constraint)."""
    best_effort: bool
    correlation_id: str
    isv: str
    issued: float
    """The event's `time` (unix s): what "newest" means."""
    seq: int
    """Arrival order: breaks ties of `issued`."""
    start_given: bool = True
    """False: the ISV gave no start (it began when it arrived)."""

    @property
    def key(self) -> tuple[float, int]:
        return (self.issued, self.seq)

    @property
    def level_w(self) -> float | None:
        return None if self.constraint is None else self.constraint.w

    def covers(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t < self.end)

    def to_record(self) -> dict[str, Any]:
        c = self.constraint
        return {
            "feed": self.feed,
            "start": self.start,
            "end": self.end,
            "value": None if c is None else c.value,
            "unit": None if c is None else c.unit,
            "best_effort": self.best_effort,
            "correlation_id": self.correlation_id,
            "isv": self.isv,
            "issued": self.issued,
            "start_given": self.start_given,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any], seq: int) -> Target:
        """KeyError/TypeError/ValueError when `r` is not what `to_record` wrote."""
        unit = r["unit"]
        if unit is not None and unit not in WATTS:
            raise ValueError(f"unit {unit!r}")
        return cls(
            feed=str(r["feed"]),
            start=float(r["start"]),
            end=None if r["end"] is None else float(r["end"]),
            constraint=None if unit is None else Power(float(r["value"]), unit),
            best_effort=bool(r["best_effort"]),
            correlation_id=str(r["correlation_id"]),
            isv=str(r["isv"]),
            issued=float(r["issued"]),
            seq=seq,
            start_given=bool(r["start_given"]),
        )


def encode_record(targets: Sequence[Target]) -> str:
    """The journal's copy of one accepted message's targets (a restart reads it back)."""
    return json.dumps([t.to_record() for t in targets], separators=(",", ":"))


def decode_record(text: str, first_seq: int) -> list[Target]:
    """ValueError (or KeyError/TypeError) when `text` is not what `encode_record` wrote."""
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError("not a list")
    return [Target.from_record(r, first_seq + i) for i, r in enumerate(rows)]


class Schedule:
    def __init__(self, feeds: Iterable[str]) -> None:
        self._by_feed: dict[str, list[Target]] = {f: [] for f in feeds}
        """Newest first."""

    @property
    def feeds(self) -> tuple[str, ...]:
        return tuple(self._by_feed)

    def add(self, targets: Iterable[Target]) -> None:
        touched: set[str] = set()
        for t in targets:
            if t.feed not in self._by_feed:
                raise KeyError(f"unknown feed {t.feed!r}")
            self._by_feed[t.feed].append(t)
            touched.add(t.feed)
        for feed in touched:
            self._by_feed[feed].sort(key=lambda t: t.key, reverse=True)
            del self._by_feed[feed][MAX_PER_FEED:]

    def winner(self, feed: str, t: float) -> Target | None:
        """The target in force on `feed` at `t` (None: none; the default applies)."""
        for target in self._by_feed[feed]:
            if target.covers(t):
                return target
        return None

    def prune(self, now: float) -> None:
        """Forget targets that can never win again: over, or covered from now on by a newer
        one without an end."""
        for feed, targets in self._by_feed.items():
            kept: list[Target] = []
            open_from = math.inf  # the earliest start of a newer target without an end
            for t in targets:  # newest first
                over = t.end is not None and t.end <= now
                if not over and open_from > max(now, t.start):
                    kept.append(t)
                if t.end is None:
                    open_from = min(open_from, t.start)
            self._by_feed[feed] = kept

    def targets(self, feed: str) -> list[Target]:
        """Targets still to come or in force, newest first (after `prune`)."""
        return list(self._by_feed[feed])
