"""OpenADR 3 objects as the VEN reads them: durations, times, programs and events."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest

from controller.northbound.openadr.model import (
    Duration,
    ObjectError,
    format_duration,
    parse_duration,
    parse_event,
    parse_program,
    parse_time,
)


def unix(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> float:
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("PT1H", 3600.0),
        ("PT15M", 900.0),
        ("PT0.5S", 0.5),
        ("P1D", 86400.0),
        ("P1W", 7 * 86400.0),
        ("P1DT2H3M4S", 86400.0 + 7384.0),
        ("PT0S", 0.0),
    ],
)
def test_fixed_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "d").seconds_from(unix(2024, 3, 1)) == pytest.approx(seconds)


def test_calendar_durations_follow_the_calendar() -> None:
    jan31 = unix(2024, 1, 31, 12)
    assert parse_duration("P1M", "d").after(jan31) == unix(2024, 2, 29, 12)  # leap year, clamped
    assert parse_duration("P1Y", "d").after(unix(2023, 3, 1)) == unix(2024, 3, 1)
    assert parse_duration("P1Y2M", "d").after(unix(2023, 11, 15)) == unix(2025, 1, 15)


def test_p9999y_is_indefinite() -> None:
    d = parse_duration("P9999Y", "d")
    assert d.indefinite and d.after(unix(2024, 1, 1)) == math.inf
    # Past year 9999 is no end either.
    assert parse_duration("P8000Y", "d").after(unix(2024, 1, 1)) == math.inf


def test_negative_duration() -> None:
    d = parse_duration("-PT1H", "d")
    assert d.negative and d.after(unix(2024, 1, 1, 1)) == unix(2024, 1, 1)


@pytest.mark.parametrize("text", ["1 hour", "PT", "P", "PT1.5H", "P1H", "T1H", "", "pt1h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ObjectError, match="d: "):
        parse_duration(text, "d")
    with pytest.raises(ObjectError):
        parse_duration(3600, "d")


@pytest.mark.parametrize(
    ("seconds", "text"), [(10, "PT10S"), (0.25, "PT0.25S"), (300.5, "PT300.5S")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text, "d").seconds_from(0.0) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["0001-01-01", "0001-01-01T00:00:00", "0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000Z"],
)
def test_year_one_means_now(text: str) -> None:
    assert parse_time(text, "t") is None


def test_times() -> None:
    assert parse_time("2024-06-01T12:00:00Z", "t") == unix(2024, 6, 1, 12)
    assert parse_time("2024-06-01T14:00:00+02:00", "t") == unix(2024, 6, 1, 12)
    assert parse_time("2024-06-01T12:00:00", "t") == unix(2024, 6, 1, 12)  # no offset: UTC
    with pytest.raises(ObjectError, match="t: "):
        parse_time("June 1st", "t")


def event(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "e1",
        "createdDateTime": "2024-06-01T00:00:00Z",
        "modificationDateTime": "2024-06-01T00:00:05Z",
        "objectType": "EVENT",
        "programID": "p1",
        "eventName": "heat",
        "priority": 2,
        "payloadDescriptors": [
            {
                "objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                "payloadType": "IMPORT_CAPACITY_LIMIT",
                "units": "MW",
            }
        ],
        "reportDescriptors": [{"payloadType": "DEMAND", "frequency": 1, "repeat": -1}],
        "intervalPeriod": {
            "start": "2024-06-01T12:00:00Z",
            "duration": "PT1H",
            "randomizeStart": "PT5M",
        },
        "intervals": [
            {"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [1.5]}]},
            {
                "id": 1,
                "intervalPeriod": {"duration": "PT30M"},
                "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [2]}],
            },
        ],
    }
    base.update(over)
    return base


def test_event_parsed() -> None:
    e = parse_event(event())
    assert (e.id, e.program_id, e.name, e.priority) == ("e1", "p1", "heat", 2)
    assert e.modified == unix(2024, 6, 1, 0, 0, 5)
    assert e.period is not None and e.period.start == unix(2024, 6, 1, 12)
    assert e.period.randomize == Duration(seconds=300.0)
    assert [i.id for i in e.intervals] == [0, 1]
    assert e.intervals[1].period is not None and e.intervals[1].period.start is None
    assert e.intervals[0].payloads[0].values == (1.5,)
    assert e.payload_descriptors[0].units == "MW"
    d = e.report_descriptors[0]
    assert (d.payload_type, d.frequency, d.repeat, d.start_interval, d.historical) == (
        "DEMAND",
        1,
        -1,
        -1,
        True,
    )
    assert e.label == "heat (e1)"


def test_event_defaults_and_nulls() -> None:
    e = parse_event(
        event(priority=None, eventName=None, payloadDescriptors=None, reportDescriptors=None)
    )
    assert e.priority is None and e.name is None and e.label == "e1"
    assert e.payload_descriptors == () and e.report_descriptors == ()


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"priority": -1}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"programID": None}, "programID"),
        ({"intervals": [{"id": "zero", "payloads": []}]}, "intervals[0].id"),
        ({"intervals": [{"id": 0, "payloads": [{"type": "X", "values": 3}]}]}, "values"),
        ({"intervalPeriod": {"duration": "-PT1H"}}, "duration"),
        ({"intervalPeriod": {"start": "noon"}}, "start"),
        ({"reportDescriptors": [{"payloadType": "DEMAND", "repeat": "always"}]}, "repeat"),
    ],
)
def test_bad_events_name_the_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(ObjectError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_event(event(**over))


def test_program_keeps_event_payload_descriptors_only() -> None:
    p = parse_program(
        {
            "id": "p1",
            "programName": "capacity",
            "payloadDescriptors": [
                {"objectType": "REPORT_PAYLOAD_DESCRIPTOR", "payloadType": "DEMAND", "units": "W"},
                {
                    "objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                    "payloadType": "DISPATCH_SETPOINT",
                    "units": "KW",
                },
            ],
        }
    )
    assert (p.id, p.name) == ("p1", "capacity")
    assert [(d.payload_type, d.units) for d in p.payload_descriptors] == [
        ("DISPATCH_SETPOINT", "KW")
    ]
    with pytest.raises(ObjectError, match="programName"):
        parse_program({"id": "p2"})
