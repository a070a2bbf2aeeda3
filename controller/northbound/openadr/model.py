"""OpenADR 3 objects as the VEN reads them: programs, events, their intervals and descriptors.

Pure: JSON objects in, frozen dataclasses out, `ObjectError` naming the field otherwise. The
readers are lenient where the specification's examples are (a start of "0001-01-01" with no
time or offset means "now"; a time without an offset is UTC) and strict where acting on a
misread would move the site (durations, numbers, priorities).
"""

from __future__ import annotations

import calendar
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from controller.wire.timestamps import parse_rfc3339

INDEFINITE_YEARS: Final = 9999
"""A duration of "P9999Y" (or longer) means no end (User Guide)."""

# The specification's own pattern (components.schemas.duration).
_DURATION: Final = re.compile(
    r"^(-?)P(?=\d|T\d)(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)([DW]))?"
    r"(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$"
)
_NOW_DATE: Final = re.compile(r"^0001-01-01(?:[Tt ]00:00:00(?:\.0+)?(?:[Zz]|[+-]00:00)?)?$")
_NAIVE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?$")


class ObjectError(ValueError):
    """An OpenADR object the VEN cannot act on; the message names the field."""


@dataclass(frozen=True, slots=True)
class Duration:
    """An ISO 8601 duration, kept in its calendar parts (months have no fixed length)."""

    years: int = 0
    months: int = 0
    days: int = 0
    seconds: float = 0.0
    negative: bool = False

    @property
    def indefinite(self) -> bool:
        return self.years >= INDEFINITE_YEARS

    def after(self, start: float) -> float:
        """The unix time this long after `start` (inf when indefinite or past year 9999)."""
        if self.indefinite:
            return math.inf
        sign = -1 if self.negative else 1
        try:
            t = datetime.fromtimestamp(start, UTC)
            month0 = t.month - 1 + sign * (12 * self.years + self.months)
            year, month = t.year + month0 // 12, month0 % 12 + 1
            day = min(t.day, calendar.monthrange(year, month)[1])
            t = t.replace(year=year, month=month, day=day)
            t += sign * timedelta(days=self.days, seconds=self.seconds)
        except (OverflowError, ValueError):
            return math.inf if sign > 0 else -math.inf
        return t.timestamp()

    def seconds_from(self, start: float) -> float:
        """Its length in seconds when it begins at `start` (inf when indefinite)."""
        return self.after(start) - start


ZERO: Final = Duration()


def parse_duration(text: object, field: str) -> Duration:
    if not isinstance(text, str):
        raise ObjectError(f"{field}: not a duration string")
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ObjectError(f"{field}: {text!r} is not an ISO 8601 duration (e.g. PT1H)")
    neg, y, mo, n, unit, h, mi, s = m.groups()
    days = int(n or 0) * (7 if unit == "W" else 1)
    seconds = int(h or 0) * 3600.0 + int(mi or 0) * 60.0 + float(s or 0.0)
    return Duration(int(y or 0), int(mo or 0), days, seconds, negative=bool(neg))


def format_duration(seconds: float) -> str:
    """Seconds as the shortest ISO 8601 duration the schema's pattern accepts."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} s as a duration")
    ms = round(seconds * 1000)
    whole, frac = divmod(ms, 1000)
    return f"PT{whole}S" if frac == 0 else f"PT{whole}.{f'{frac:03d}'.rstrip('0')}S"


def parse_time(text: object, field: str) -> float | None:
    """An RFC 3339 time as unix seconds; None for the "now" of "0001-01-01"."""
    if not isinstance(text, str):
        raise ObjectError(f"{field}: not a date-time string")
    if _NOW_DATE.fullmatch(text):
        return None
    if _NAIVE.fullmatch(text):  # no offset: UTC, as the User Guide's examples mean it
        text += "Z"
    try:
        return parse_rfc3339(text)
    except ValueError as exc:
        raise ObjectError(f"{field}: {text!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class IntervalPeriod:
    start: float | None = None
    """Unix seconds; None: not given (inherited), unless `start_now`."""
    start_now: bool = False
    """The start was "0001-01-01": the moment the VEN first saw the object."""
    duration: Duration | None = None
    randomize: Duration | None = None


@dataclass(frozen=True, slots=True)
class Payload:
    type: str
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Interval:
    id: int
    period: IntervalPeriod | None
    payloads: tuple[Payload, ...]


@dataclass(frozen=True, slots=True)
class PayloadDescriptor:
    payload_type: str
    units: str | None = None


@dataclass(frozen=True, slots=True)
class ReportDescriptor:
    """What report the VTN asks for (defaults as in the schema)."""

    payload_type: str
    reading_type: str | None = None
    units: str | None = None
    aggregate: bool = False
    start_interval: int = -1
    num_intervals: int = -1
    historical: bool = True
    frequency: int = -1
    repeat: int = 1
    report_intervals: str = "INTERVALS"


@dataclass(frozen=True, slots=True)
class Program:
    id: str
    name: str
    payload_descriptors: tuple[PayloadDescriptor, ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    program_id: str
    name: str | None
    priority: int | None
    """Lower is more important; None ranks below every number."""
    modified: float
    period: IntervalPeriod | None
    intervals: tuple[Interval, ...]
    payload_descriptors: tuple[PayloadDescriptor, ...] = ()
    report_descriptors: tuple[ReportDescriptor, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id})" if self.name else self.id


def _obj(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ObjectError(f"{field}: not an object")
    return value


def _list(obj: Mapping[str, Any], key: str, field: str) -> Sequence[Any]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ObjectError(f"{field}.{key}: not a list")
    return value


def _str(obj: Mapping[str, Any], key: str, field: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ObjectError(f"{field}.{key}: missing")
        return None
    if not isinstance(value, str) or not value:
        raise ObjectError(f"{field}.{key}: not a non-empty string")
    return value


def _int(obj: Mapping[str, Any], key: str, field: str, default: int) -> int:
    value = obj.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ObjectError(f"{field}.{key}: not an integer")
    return value


def _bool(obj: Mapping[str, Any], key: str, field: str, default: bool) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ObjectError(f"{field}.{key}: not true or false")
    return value


def parse_period(value: object, field: str) -> IntervalPeriod | None:
    if value is None:
        return None
    obj = _obj(value, field)
    start: float | None = None
    now = False
    if obj.get("start") is not None:
        start = parse_time(obj["start"], f"{field}.start")
        now = start is None
    duration = None
    if obj.get("duration") is not None:
        duration = parse_duration(obj["duration"], f"{field}.duration")
        if duration.negative:
            raise ObjectError(f"{field}.duration: negative")
    randomize = None
    if obj.get("randomizeStart") is not None:
        randomize = parse_duration(obj["randomizeStart"], f"{field}.randomizeStart")
    return IntervalPeriod(start, now, duration, randomize)


def parse_payload_descriptors(obj: Mapping[str, Any], field: str) -> tuple[PayloadDescriptor, ...]:
    out = []
    for i, raw in enumerate(_list(obj, "payloadDescriptors", field)):
        where = f"{field}.payloadDescriptors[{i}]"
        d = _obj(raw, where)
        # A program's list mixes event and report descriptors; only the former say how to
        # read event payloads.
        if d.get("objectType", "EVENT_PAYLOAD_DESCRIPTOR") != "EVENT_PAYLOAD_DESCRIPTOR":
            continue
        ptype = _str(d, "payloadType", where, required=True)
        assert ptype is not None
        out.append(PayloadDescriptor(ptype, _str(d, "units", where)))
    return tuple(out)


def parse_report_descriptor(raw: object, field: str) -> ReportDescriptor:
    d = _obj(raw, field)
    ptype = _str(d, "payloadType", field, required=True)
    assert ptype is not None
    return ReportDescriptor(
        payload_type=ptype,
        reading_type=_str(d, "readingType", field),
        units=_str(d, "units", field),
        aggregate=_bool(d, "aggregate", field, False),
        start_interval=_int(d, "startInterval", field, -1),
        num_intervals=_int(d, "numIntervals", field, -1),
        historical=_bool(d, "historical", field, True),
        frequency=_int(d, "frequency", field, -1),
        repeat=_int(d, "repeat", field, 1),
        report_intervals=_str(d, "reportIntervals", field) or "INTERVALS",
    )


def parse_program(raw: object) -> Program:
    obj = _obj(raw, "program")
    pid = _str(obj, "id", "program", required=True)
    name = _str(obj, "programName", "program", required=True)
    assert pid is not None and name is not None
    return Program(pid, name, parse_payload_descriptors(obj, "program"))


def parse_event(raw: object) -> Event:
    obj = _obj(raw, "event")
    eid = _str(obj, "id", "event", required=True)
    assert eid is not None
    field = f"event {eid}"
    program_id = _str(obj, "programID", field, required=True)
    assert program_id is not None
    stamp = obj.get("modificationDateTime")  # only orders versions: absent sorts first
    modified = None if stamp is None else parse_time(stamp, f"{field}.modificationDateTime")
    priority = obj.get("priority")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or priority < 0
    ):
        raise ObjectError(f"{field}.priority: not a non-negative integer")
    intervals = []
    for i, rawi in enumerate(_list(obj, "intervals", field)):
        where = f"{field}.intervals[{i}]"
        iv = _obj(rawi, where)
        iid = iv.get("id")
        if isinstance(iid, bool) or not isinstance(iid, int):
            raise ObjectError(f"{where}.id: not an integer")
        payloads = []
        for j, rawp in enumerate(_list(iv, "payloads", where)):
            p = _obj(rawp, f"{where}.payloads[{j}]")
            ptype = _str(p, "type", f"{where}.payloads[{j}]", required=True)
            assert ptype is not None
            values = p.get("values")
            if not isinstance(values, list):
                raise ObjectError(f"{where}.payloads[{j}].values: not a list")
            payloads.append(Payload(ptype, tuple(values)))
        period = parse_period(iv.get("intervalPeriod"), f"{where}.intervalPeriod")
        intervals.append(Interval(iid, period, tuple(payloads)))
    reports = tuple(
        parse_report_descriptor(r, f"{field}.reportDescriptors[{i}]")
        for i, r in enumerate(_list(obj, "reportDescriptors", field))
    )
    return Event(
        id=eid,
        program_id=program_id,
        name=_str(obj, "eventName", field),
        priority=priority,
        modified=0.0 if modified is None else modified,
        period=parse_period(obj.get("intervalPeriod"), f"{field}.intervalPeriod"),
        intervals=tuple(intervals),
        payload_descriptors=parse_payload_descriptors(obj, field),
        report_descriptors=reports,
    )
