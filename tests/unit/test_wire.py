"""Every message model round-trips through its one encoder and decoder, and every time rampd
publishes has the one format."""

from __future__ import annotations

import json
import math
import re

import pytest

from controller.config import ReserveConfig, SiteLimits
from controller.telemetry import build_telemetry
from controller.wire import (
    Ack,
    Dispatch,
    DispatchRejected,
    Heartbeat,
    Status,
    Telemetry,
    WireError,
    parse_rfc3339,
    rfc3339,
)
from controller.wire.signing import canonical_bytes, sign, signed, verify
from controller.wire.telemetry import (
    CapabilityReport,
    CycleReport,
    DeviceCounts,
    ReserveReport,
    SleepReport,
)

AT = 1_714_564_800.25  # exact in milliseconds
LIMITS = SiteLimits(min_kw=100.0, max_kw=14000.0, max_issued_age_s=30.0)
KEY = b"0123456789abcdef-shared-secret"
ONE_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

FULL = Telemetry(
    at=AT,
    mode="normal",
    devices=DeviceCounts(on=7, sleeping=1, waking=0, fault=2, unknown=0),
    measured_w=1_234_500.0,
    measured_source="meter",
    target_w=1_250_000.0,
    min_w=100_000.0,
    max_w=4_000_000.0,
    noncontrollable_w=150_000.0,
    capability=CapabilityReport((1.0, 5.0, 60.0), (10_000.0, 50_000.0, None), (0.0, 1e6, 2e6)),
    saturated=0,
    reserve=ReserveReport(500.0, 250.0, 50_000.0, 1e6),
    physical_min_s=2.5,
    sleep=SleepReport(parked=1, waking=0),
    cycle=CycleReport(count=1234, overruns=3),
)


def _decode_dispatch(payload: bytes, key: bytes | None = None) -> Dispatch:
    return Dispatch.decode(payload, now_unix=AT + 1.0, last_seq=None, limits=LIMITS, hmac_key=key)


@pytest.mark.parametrize(
    "d",
    [
        Dispatch("d-1", 1, AT, "setpoint", 1_250_500.0),
        Dispatch("d-2", 2, AT, "setpoint", 412_345.0, 12.5, AT + 60, AT + 600),
        Dispatch("d-3", 3, AT, "regulation", 5e6, signal=-0.25, band_w=1e6),
        Dispatch("d-4", 4, AT, "release", LIMITS.max_kw * 1e3, expires_at=AT + 60),
        Dispatch("dé-5", 2**63 - 1, AT, "setpoint", 100e3),
    ],
)
@pytest.mark.parametrize("key", [None, KEY])
def test_dispatch_round_trips(d: Dispatch, key: bytes | None) -> None:
    assert _decode_dispatch(d.encode(key), key) == d


def test_a_dispatch_signed_by_the_encoder_passes_the_verifier_and_nothing_else_does() -> None:
    payload = Dispatch("d-1", 1, AT, "setpoint", 1e6).encode(KEY)
    obj = json.loads(payload)
    verify(obj, KEY)
    assert obj["sig"] == sign(obj, KEY)
    assert canonical_bytes(obj) == canonical_bytes(signed(obj, KEY))
    with pytest.raises(DispatchRejected) as info:
        _decode_dispatch(Dispatch("d-1", 1, AT, "setpoint", 1e6).encode(b"another key" * 2), KEY)
    assert info.value.code == "bad_signature" and info.value.id == "d-1"


@pytest.mark.parametrize(
    "ack",
    [Ack("d-1", 7, True, "", AT), Ack(None, None, False, "payload not JSON", AT)],
)
def test_ack_round_trips(ack: Ack) -> None:
    assert Ack.decode(ack.encode()) == ack


@pytest.mark.parametrize(
    "status",
    [Status("online", "normal", "", AT), Status("offline", None, "connection lost", AT)],
)
def test_status_round_trips(status: Status) -> None:
    assert Status.decode(status.encode()) == status


def test_heartbeat_round_trips_and_anything_is_a_heartbeat() -> None:
    hb = Heartbeat("campus", AT)
    assert Heartbeat.decode(hb.encode()) == hb
    assert Heartbeat.decode(b"bench") == Heartbeat(None, None)


@pytest.mark.parametrize(
    "tel", [FULL, Telemetry(at=AT, mode="normal", devices=DeviceCounts(unknown=3))]
)
def test_telemetry_round_trips(tel: Telemetry) -> None:
    assert Telemetry.decode(tel.encode()) == tel


def test_telemetry_keeps_its_field_names() -> None:
    body = json.loads(FULL.encode())
    assert list(body) == [
        "at", "measured_kw", "measured_source", "target_kw", "min_kw", "max_kw",
        "noncontrollable_kw", "capability", "devices", "mode", "saturated", "reserve",
        "physical_min_s", "sleep", "cycle", "ramp_limit", "hz", "services",
    ]  # fmt: skip
    assert body["capability"]["up_kw"] == {"1s": 10.0, "5s": 50.0, "60s": None}
    assert body["reserve"] == {
        "up_kw_5s": 500.0, "down_kw_5s": 250.0, "up_held_kw": 50.0, "down_held_kw": 1000.0
    }  # fmt: skip
    assert body["devices"] == {
        "on": 7,
        "sleeping": 1,
        "waking": 0,
        "fault": 2,
        "unknown": 0,
        "unresponsive": 0,
    }
    assert body["measured_kw"] == 1234.5 and body["cycle"] == {"count": 1234, "overruns": 3}
    before_first_cycle = json.loads(Telemetry(at=AT, mode="normal").encode())
    assert set(before_first_cycle) == {"at", "mode", "devices"}


def test_nan_power_is_null_on_the_wire() -> None:
    tel = Telemetry(
        at=AT, mode="normal", measured_w=math.nan, capability=CapabilityReport((), (), ())
    )
    assert json.loads(tel.encode())["measured_kw"] is None


def test_every_time_published_has_one_format() -> None:
    times = [
        json.loads(Ack("d-1", 1, True, "", AT).encode())["at"],
        json.loads(Status("online", "normal", "", AT).encode())["at"],
        json.loads(FULL.encode())["at"],
        json.loads(Heartbeat("x", AT).encode())["at"],
        json.loads(Dispatch("d-1", 1, AT, "setpoint", 1e6).encode())["issued_at"],
    ]
    assert len(set(times)) == 1 and ONE_FORMAT.fullmatch(times[0]), times
    assert times[0] == "2024-05-01T12:00:00.250Z"


@pytest.mark.parametrize(
    "text",
    ["2024-05-01T12:00:00.250Z", "2024-05-01T14:00:00.25+02:00", "2024-05-01t12:00:00.250z"],
)
def test_decoders_accept_any_offset(text: str) -> None:
    assert parse_rfc3339(text) == AT
    assert Ack.decode(json.dumps({"accepted": True, "at": text}).encode()).at == AT


def test_rfc3339_is_utc_milliseconds() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"at": "2024-05-01T12:00:00Z", "mode": "normal", "devices": {"on": "7"}}',
        b'{"at": "yesterday", "mode": "normal"}',
        b'{"mode": "normal"}',
        b'{"at": "2024-05-01T12:00:00Z", "mode": "normal", "capability": {"up_kw": {"x": 1}}}',
        b'{"at": "2024-05-01T12:00:00Z", "mode": "normal", "sleep": {"parked": 1}}',
    ],
)
def test_bad_telemetry_is_a_wire_error(payload: bytes) -> None:
    with pytest.raises(WireError):
        Telemetry.decode(payload)


def test_the_builder_says_only_what_it_knows_before_the_first_cycle() -> None:
    tel = build_telemetry(
        None,
        at=AT,
        mode="normal",
        devices={"on": 2, "unknown": 1},
        cycles=0,
        overruns=0,
        reserve=ReserveConfig(),
        physical_min_s=None,
    )
    assert tel == Telemetry(at=AT, mode="normal", devices=DeviceCounts(on=2, unknown=1))
    assert not tel.started


def test_telemetry_carries_frequency_and_services_and_round_trips() -> None:
    from controller.wire.telemetry import CapabilityReport, ServiceReport

    tel = Telemetry(
        at=AT,
        mode="normal",
        capability=CapabilityReport((1.0,), (0.0,), (0.0,)),
        hz=59.834,
        services={
            "ffr": ServiceReport(900e3, 2e6, True, since=AT - 3.0),
            "ufr": ServiceReport(0.0, 1.1e6, False),
        },
    )
    body = json.loads(tel.encode())
    assert body["hz"] == 59.834
    assert body["services"]["ffr"] == {
        "armed_kw": 900.0, "max_armable_kw": 2000.0, "deployed": True,
        "since": rfc3339(AT - 3.0),
    }  # fmt: skip
    again = Telemetry.decode(tel.encode())
    assert again.hz == 59.834 and again.services == tel.services
    body["services"]["ufr"]["deployed"] = "yes"
    with pytest.raises(WireError):
        Telemetry.decode(json.dumps(body).encode())
