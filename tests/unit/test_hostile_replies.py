"""Hostile device replies: whatever a miner or a BMC sends back, the parsers answer with a
value or a `DriverError` (which the drivers isolate per device), never another exception
(a TypeError escaping a parser would reach the driver's task as a bug, not a device fault).

Property tests over arbitrary bytes and arbitrary JSON of the right outer shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import DriverError
from drivers.luxos import messages as m
from drivers.redfish import resources as rf

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=25,
)
# Replies that look like LuxOS ones (STATUS and a payload section), with hostile contents.
SECTIONS = (
    "STATUS",
    "POWER",
    "SUMMARY",
    "VERSION",
    "CONFIG",
    "DEVDETAILS",
    "PROFILES",
    "SESSION",
    "ATM",
    "PROFILE",
)
LUXOS_REPLY = st.dictionaries(st.sampled_from(SECTIONS), JSON, max_size=4) | st.dictionaries(
    st.sampled_from(SECTIONS),
    st.lists(st.dictionaries(st.text(max_size=12), JSON, max_size=6), max_size=3),
    max_size=4,
)

LUXOS_PARSERS: tuple[Callable[[Any], Any], ...] = (
    m.parse_status,
    m.parse_power,
    m.parse_summary,
    m.parse_version,
    m.parse_config,
    m.parse_devdetails,
    m.parse_profiles,
    m.parse_session,
    m.parse_atm,
    m.parse_profileset,
    lambda r: m.check(r, "power"),
)
REDFISH_READERS: tuple[Callable[[Any], Any], ...] = (
    rf.read_chassis_links,
    rf.read_power_watts,
    rf.read_power_limit,
    rf.read_legacy_power,
)


def survives(fn: Callable[[Any], Any], arg: Any) -> None:
    try:
        out = fn(arg)
    except DriverError:
        return
    # What a parser returns is data the drivers use as numbers: never NaN or inf.
    for value in _numbers(out):
        assert math.isfinite(value), (fn, arg, out)


def _numbers(out: Any) -> list[float]:
    if isinstance(out, bool):
        return []
    if isinstance(out, int | float):
        return [float(out)]
    if isinstance(out, list | tuple):
        return [x for v in out for x in _numbers(v)]
    if hasattr(out, "__dataclass_fields__"):
        return [x for f in out.__dataclass_fields__ for x in _numbers(getattr(out, f))]
    return []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_luxos_decode_of_arbitrary_bytes(data: bytes) -> None:
    survives(m.decode_reply, data)
    survives(m.object_end, data)


@settings(max_examples=300, deadline=None)
@given(LUXOS_REPLY)
def test_luxos_parsers_of_hostile_replies(reply: dict[str, Any]) -> None:
    for parse in LUXOS_PARSERS:
        survives(parse, reply)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_redfish_bodies_of_arbitrary_bytes(data: bytes) -> None:
    survives(rf.parse_json, data)
    survives(rf.error_message, data)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            (
                "PowerWatts",
                "PowerLimitWatts",
                "Links",
                "PowerControl",
                "Id",
                "Controls",
                "EnvironmentMetrics",
                "Power",
                "PowerSubsystem",
                "Reading",
                "SetPoint",
            )
        ),
        JSON,
        max_size=5,
    )
)
def test_redfish_readers_of_hostile_resources(body: dict[str, Any]) -> None:
    for read in REDFISH_READERS:
        survives(read, body)
