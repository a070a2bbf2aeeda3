"""`SetLoadTargetData` (the verified `data` of grid.loadtarget.set.v1) as targets per feed.

The schema's checks (targets an array of at least one; each with an `interval` object of
optional date-times, `load_constraint` a value and unit or null, optional `feed_tags`
strings and `strategy.best_effort` boolean), then the ones a schema cannot say: an interval
that ends after it starts and is not over, a constraint above zero (its description says
> 0), feed tags this agent knows. Any failure refuses the whole message: a set of targets is
one command, never half applied.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

from controller.northbound.dsx_flex.envelope import parse_time
from controller.northbound.dsx_flex.power import Power
from controller.wire.codec import WireError

MAX_TARGETS: Final = 256
"""Targets in one message at most: bounds one message's work (and the schedule's size)."""


class TargetError(WireError):
    def __init__(self, reason: str, *, code: str = "payload") -> None:
        super().__init__(reason, code=code)


@dataclass(frozen=True, slots=True)
class TargetRequest:
    """One element of `targets`, checked; times in unix s (None: now / until replaced)."""

    start: float | None
    end: float | None
    constraint: Power | None
    """None: remove any constraint, back to the feed's default."""
    feeds: tuple[str, ...]
    """The feeds it applies to (all of them when the message named none)."""
    best_effort: bool


def _target(i: int, item: object, feeds: Collection[str], now: float) -> TargetRequest:
    where = f"targets[{i}]"
    if not isinstance(item, dict):
        raise TargetError(f"{where} must be an object")
    if "interval" not in item or "load_constraint" not in item:
        raise TargetError(f"{where} needs interval and load_constraint")
    interval = item["interval"]
    if not isinstance(interval, dict):
        raise TargetError(f"{where}.interval must be an object")
    try:
        start = (
            None
            if "start_time" not in interval
            else parse_time(interval["start_time"], f"{where}.interval.start_time")
        )
        end = (
            None
            if "end_time" not in interval
            else parse_time(interval["end_time"], f"{where}.interval.end_time")
        )
        raw = item["load_constraint"]
        constraint = None if raw is None else Power.from_wire(raw, f"{where}.load_constraint")
    except ValueError as exc:
        raise TargetError(str(exc)) from None
    if constraint is not None and constraint.value <= 0:
        raise TargetError(f"{where}.load_constraint.value must be > 0")
    if end is not None and end <= (now if start is None else start):
        raise TargetError(f"{where}.interval ends before it starts")
    if end is not None and end <= now:
        raise TargetError(f"{where}.interval is already over")
    tags = item.get("feed_tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise TargetError(f"{where}.feed_tags must be an array of strings")
    unknown = [t for t in tags if t not in feeds]
    if unknown:
        raise TargetError(
            f"{where}: feed {unknown[0]!r} is not one of this agent's ({', '.join(feeds)})",
            code="feed",
        )
    strategy = item.get("strategy", {})
    if not isinstance(strategy, dict):
        raise TargetError(f"{where}.strategy must be an object")
    best_effort = strategy.get("best_effort", False)
    if not isinstance(best_effort, bool):
        raise TargetError(f"{where}.strategy.best_effort must be true or false")
    picked = tuple(dict.fromkeys(tags)) if tags else tuple(feeds)
    return TargetRequest(start, end, constraint, picked, best_effort)


def decode_targets(data: Any, feeds: Collection[str], now: float) -> list[TargetRequest]:
    """TargetError (code payload or feed) with the reason."""
    if not isinstance(data, dict):
        raise TargetError("data must be an object")
    targets = data.get("targets")
    if not isinstance(targets, list) or not targets:
        raise TargetError("data.targets must be a non-empty array")
    if len(targets) > MAX_TARGETS:
        raise TargetError(f"more than {MAX_TARGETS} targets in one message")
    return [_target(i, t, feeds, now) for i, t in enumerate(targets)]
