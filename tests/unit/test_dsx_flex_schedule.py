"""The DSX Flex schedule: the newest target for a time wins; null restores the default."""

from __future__ import annotations

from typing import Any

from controller.northbound.dsx_flex.power import Power
from controller.northbound.dsx_flex.schedule import (
    MAX_PER_FEED,
    Schedule,
    Target,
    decode_record,
    encode_record,
)

T0 = 1_800_000_000.0


def tgt(kw: float | None, start: float, end: float | None, issued: float, **f: Any) -> Target:
    fields: dict[str, Any] = dict(
        feed="a", best_effort=False, correlation_id=f"c{issued}", isv="acme", seq=int(issued)
    )
    fields.update(f)
    c = None if kw is None else Power(kw, "kilowatt")
    return Target(
        start=T0 + start,
        end=None if end is None else T0 + end,
        constraint=c,
        issued=T0 + issued,
        **fields,
    )


def level(s: Schedule, t: float) -> float | None:
    w = s.winner("a", T0 + t)
    return None if w is None else w.level_w


def test_a_window_over_a_standing_target_takes_its_time_and_hands_back() -> None:
    s = Schedule(["a"])
    s.add([tgt(800, 0, None, 1)])
    s.add([tgt(300, 10, 20, 2)])
    assert [level(s, t) for t in (5, 10, 19.9, 20, 1000)] == [800e3, 300e3, 300e3, 800e3, 800e3]


def test_a_newer_open_target_replaces_older_ones_from_its_start() -> None:
    s = Schedule(["a"])
    s.add([tgt(800, 0, None, 1), tgt(300, 10, 20, 2)])
    s.add([tgt(500, 15, None, 3)])
    assert [level(s, t) for t in (5, 12, 15, 25)] == [800e3, 300e3, 500e3, 500e3]
    s.prune(T0 + 16)  # from 16 on, nothing older can win again
    assert [t.level_w for t in s.targets("a")] == [500e3]


def test_newest_means_the_event_time_not_the_arrival() -> None:
    s = Schedule(["a"])
    s.add([tgt(300, 0, None, issued=5, seq=1)])
    s.add([tgt(900, 0, None, issued=4, seq=2)])  # arrived later, issued earlier
    assert level(s, 1) == 300e3


def test_null_restores_the_default_and_an_interval_ends_the_target() -> None:
    s = Schedule(["a"])
    s.add([tgt(400, 0, 30, 1)])
    s.add([tgt(None, 10, 20, 2)])
    assert [level(s, t) for t in (5, 15, 25, 30)] == [400e3, None, 400e3, None]
    assert s.winner("a", T0 + 15) is not None  # the null target is what is in force
    s.prune(T0 + 30)
    assert s.targets("a") == []


def test_targets_later_in_one_message_win_ties() -> None:
    s = Schedule(["a"])
    s.add([tgt(400, 0, None, 1, seq=1), tgt(200, 0, None, 1, seq=2)])
    assert level(s, 1) == 200e3


def test_feeds_are_separate_and_bounded() -> None:
    s = Schedule(["a", "b"])
    s.add([tgt(400, 0, None, 1, feed="b")])
    assert level(s, 1) is None and s.winner("b", T0 + 1) is not None
    s.add([tgt(float(i + 1), i, i + 1.0, i + 2) for i in range(MAX_PER_FEED + 10)])
    assert len(s.targets("a")) == MAX_PER_FEED
    assert level(s, MAX_PER_FEED + 9.5) == (MAX_PER_FEED + 10) * 1e3  # the newest kept


def test_journal_records_round_trip() -> None:
    ts = [tgt(400, 0, 30, 1, start_given=False), tgt(None, 10, None, 2)]
    back = decode_record(encode_record(ts), first_seq=7)
    assert [(b.start, b.end, b.constraint, b.start_given, b.seq) for b in back] == [
        (ts[0].start, ts[0].end, ts[0].constraint, False, 7),
        (ts[1].start, None, None, True, 8),
    ]
