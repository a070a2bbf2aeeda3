"""Event intervals in time (sequence, overrides, "now", indefinite, randomizeStart) and the
arbitration between events (priority, level, units)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from controller.northbound.openadr.config import PayloadMapping
from controller.northbound.openadr.model import Event, Program, parse_event, parse_program
from controller.northbound.openadr.schedule import decide, randomize_offset, spans

T0 = 1_717_243_200.0  # 2024-06-01T12:00:00Z
OBEY = {
    "IMPORT_CAPACITY_LIMIT": PayloadMapping(maps_to="import_limit"),
    "DISPATCH_SETPOINT": PayloadMapping(maps_to="setpoint", units="MW"),
}


def ev(
    eid: str = "e1",
    *,
    period: dict[str, Any] | None = None,
    intervals: list[dict[str, Any]] | None = None,
    priority: int | None = None,
    units: str | None = "KW",
    ptype: str = "IMPORT_CAPACITY_LIMIT",
    program: str = "p1",
) -> Event:
    return parse_event(
        {
            "id": eid,
            "programID": program,
            "modificationDateTime": "2024-06-01T00:00:00Z",
            "priority": priority,
            "payloadDescriptors": None
            if units is None
            else [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": ptype, "units": units}],
            "intervalPeriod": period
            if period is not None
            else {"start": "2024-06-01T12:00:00Z", "duration": "PT1H"},
            "intervals": intervals
            if intervals is not None
            else [{"id": 0, "payloads": [{"type": ptype, "values": [400]}]}],
        }
    )


def limit(iid: int, kw: float, **period: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": iid,
        "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [kw]}],
    }
    if period:
        out["intervalPeriod"] = period
    return out


def test_intervals_follow_one_another_and_override() -> None:
    e = ev(
        intervals=[
            limit(0, 100),
            limit(1, 200),  # follows the first
            limit(2, 300, duration="PT30M"),  # its own duration
            limit(3, 400, start="2024-06-01T18:00:00Z"),  # its own start
            limit(4, 500),  # follows that one
        ]
    )
    placed, problems = spans(e, first_seen=0.0, seed="s")
    assert problems == []
    assert [(s.interval_id, s.start - T0, s.end - T0) for s in placed] == [
        (0, 0.0, 3600.0),
        (1, 3600.0, 7200.0),
        (2, 7200.0, 9000.0),
        (3, 6 * 3600.0, 7 * 3600.0),
        (4, 7 * 3600.0, 8 * 3600.0),
    ]
    assert [s.index for s in placed] == [0, 1, 2, 3, 4]


def test_start_now_and_indefinite() -> None:
    e = ev(period={"start": "0001-01-01T00:00:00Z", "duration": "P9999Y"})
    (s,), _ = spans(e, first_seen=T0 + 42.0, seed="s")
    assert s.start == T0 + 42.0 and s.end == math.inf
    assert s.active(T0 + 42.0) and s.active(T0 + 1e9) and not s.active(T0 + 41.0)


def test_what_cannot_be_placed_is_said() -> None:
    e = ev(period={"duration": "PT1H"}, intervals=[limit(0, 1)])
    assert spans(e, 0.0, "s") == ([], ["interval 0: no start in the interval or the event"])
    # No duration anywhere: the schema's default PT0S, never in force.
    e = ev(period={"start": "2024-06-01T12:00:00Z"})
    assert spans(e, 0.0, "s") == ([], ["interval 0: zero duration, never in force"])


def test_randomize_start_event_wide_keeps_intervals_back_to_back() -> None:
    period = {"start": "2024-06-01T12:00:00Z", "duration": "PT1H", "randomizeStart": "PT10M"}
    e = ev(period=period, intervals=[limit(0, 1), limit(1, 2)])
    a, _ = spans(e, 0.0, "seed-1")
    b, _ = spans(e, 0.0, "seed-1")
    assert a == b  # re-reading never draws again
    offset = a[0].start - T0
    assert 0.0 <= offset <= 600.0
    assert offset == pytest.approx(randomize_offset("seed-1", "e1", None, 600.0), abs=1e-6)
    assert a[1].start == a[0].end and a[1].start - (T0 + 3600.0) == pytest.approx(offset)
    # Another seed (another site) draws another delay; draws spread over the range.
    offsets = [spans(e, 0.0, f"site-{i}")[0][0].start - T0 for i in range(200)]
    assert min(offsets) >= 0.0 and max(offsets) <= 600.0
    assert min(offsets) < 60.0 and max(offsets) > 540.0


def test_randomize_start_per_interval() -> None:
    e = ev(intervals=[limit(0, 1, randomizeStart="PT1M"), limit(1, 2)])
    placed, _ = spans(e, 0.0, "x")
    assert placed[0].start - T0 == pytest.approx(randomize_offset("x", "e1", 0, 60.0), abs=1e-6)
    assert placed[1].start == T0 + 3600.0  # not randomized, follows the unshifted first


def decision(events: list[Event], now: float, programs: dict[str, Program] | None = None) -> Any:
    tracked = [(e, spans(e, T0, "s")[0]) for e in events]
    return decide(tracked, programs or {}, OBEY, now)


def test_highest_priority_wins_even_if_higher() -> None:
    a = ev("a", priority=1, intervals=[limit(0, 300)])
    b = ev("b", priority=0, intervals=[limit(0, 500)])
    d = decision([a, b], T0 + 10)
    assert d.level_w == 500e3 and d.winner is not None and d.winner.event.id == "b"
    assert "priority 0" in d.reason and "IMPORT_CAPACITY_LIMIT 500 KW" in d.reason


def test_no_priority_ranks_last_and_equals_take_the_lowest() -> None:
    a = ev("a", priority=None, intervals=[limit(0, 100)])
    b = ev("b", priority=3, intervals=[limit(0, 900)])
    c = ev("c", priority=3, intervals=[limit(0, 700)])
    assert decision([a, b, c], T0 + 1).level_w == 700e3
    assert decision([a], T0 + 1).level_w == 100e3


def test_units_event_then_program_then_config() -> None:
    sp = ev(
        ptype="DISPATCH_SETPOINT",
        units="MW",
        intervals=[{"id": 0, "payloads": [{"type": "DISPATCH_SETPOINT", "values": [1.2]}]}],
    )
    assert decision([sp], T0).level_w == pytest.approx(1.2e6)
    no_units = ev(units=None, intervals=[limit(0, 400)])
    program = parse_program(
        {
            "id": "p1",
            "programName": "cap",
            "payloadDescriptors": [
                {
                    "objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                    "payloadType": "IMPORT_CAPACITY_LIMIT",
                    "units": "W",
                }
            ],
        }
    )
    assert decision([no_units], T0, {"p1": program}).level_w == 400.0
    assert decision([no_units], T0).level_w == 400e3  # the configured default, KW
    sp_default = ev(
        ptype="DISPATCH_SETPOINT",
        units=None,
        intervals=[{"id": 0, "payloads": [{"type": "DISPATCH_SETPOINT", "values": [2]}]}],
    )
    assert decision([sp_default], T0).level_w == 2e6  # configured MW for this type


def test_payloads_not_read_are_ignored_and_said() -> None:
    bad_units = ev("u", units="KWH", intervals=[limit(0, 400)])
    bad_value = ev(
        "v",
        intervals=[{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": ["lots"]}]}],
    )
    two = ev(
        "w",
        intervals=[{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [1, 2]}]}],
    )
    other = ev("x", intervals=[{"id": 0, "payloads": [{"type": "PRICE", "values": [0.2]}]}])
    d = decision([bad_units, bad_value, two, other], T0 + 1)
    assert d.level_w is None and d.winner is None
    assert [eid for eid, _ in d.problems] == ["u", "v", "w"]  # PRICE is simply not obeyed
    assert "units 'KWH'" in d.problems[0][1]


def test_next_change_and_future_events() -> None:
    later = ev("later", period={"start": "2024-06-01T13:00:00Z", "duration": "PT30M"})
    now_ = ev("now", period={"start": "2024-06-01T12:00:00Z", "duration": "PT2H"})
    d = decision([later], T0)
    assert d.level_w is None and d.next_change == T0 + 3600.0
    d = decision([later, now_], T0 + 60)
    assert d.level_w == 400e3 and d.next_change == T0 + 3600.0
    d = decision([later, now_], T0 + 3600.0)
    assert d.next_change == T0 + 5400.0
    assert decision([later], T0 + 5400.0).next_change == math.inf
