"""The shared Redfish resource module: builders, the bodies each side sends, and the parsers.

What the simulator builds, the driver's parsers must read back exactly; what the driver sends,
the simulator's parsers must accept; anything else must surface as ProtocolError, never as a
KeyError or TypeError from deep inside a parser.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.config import DeviceAccess
from drivers.base import ProtocolError
from drivers.redfish import resources as rf
from tests.helpers import assert_finite_numbers

P = rf.chassis_paths("1")
R = rf.RackReadings(
    reading_w=61234.56, setpoint_w=70000.0, allowable_min_w=36800.0, allowable_max_w=81600.0
)


def test_paths_and_types() -> None:
    assert P.chassis == "/redfish/v1/Chassis/1"
    assert P.environment_metrics == "/redfish/v1/Chassis/1/EnvironmentMetrics"
    assert P.power == "/redfish/v1/Chassis/1/Power"
    assert P.power_limit_control == "/redfish/v1/Chassis/1/Controls/PowerLimit"
    assert rf.session_uri("7") == "/redfish/v1/SessionService/Sessions/7"
    assert rf.odata_type("Chassis") == "#Chassis.v1_17_0.Chassis"
    assert rf.odata_type("ChassisCollection") == "#ChassisCollection.ChassisCollection"
    assert rf.chassis_paths("HGX_Chassis.0").chassis_id == "HGX_Chassis.0"
    for bad in ("", "a/b", "..", ".hidden", "x" * 65, "a b", "a%2F"):
        with pytest.raises(ValueError):
            rf.chassis_paths(bad)


def test_service_root_and_discovery_documents() -> None:
    root = rf.service_root(uuid="u", product="p")
    assert root["@odata.id"] == "/redfish/v1/"
    assert root["Links"]["Sessions"]["@odata.id"] == rf.SESSIONS
    assert root["Chassis"]["@odata.id"] == rf.CHASSIS
    doc = rf.odata_service_document()
    assert doc["@odata.context"] == rf.METADATA
    assert {v["url"] for v in doc["value"]} >= {"/redfish/v1/", rf.CHASSIS, rf.SESSIONS}
    col = rf.chassis_collection(["1", "2"])
    assert col["Members@odata.count"] == 2
    assert col["Members"][1] == {"@odata.id": "/redfish/v1/Chassis/2"}


def test_metadata_references_every_namespace_served() -> None:
    root = ET.fromstring(rf.metadata_xml())
    edmx = "{http://docs.oasis-open.org/odata/ns/edmx}"
    included = {
        inc.attrib["Namespace"]
        for ref in root.iter(f"{edmx}Reference")
        for inc in ref.iter(f"{edmx}Include")
    }
    for name in rf.SCHEMAS:
        served = rf.odata_type(name)[1:].rsplit(".", 1)[0]  # "#Chassis.v1_17_0.Chassis"
        assert served in included, served
        assert name in included
    container = next(root.iter("{http://docs.oasis-open.org/odata/ns/edm}EntityContainer"))
    assert container.attrib["Extends"] == "ServiceRoot.v1_5_0.ServiceContainer"


def test_environment_metrics_round_trip() -> None:
    env = rf.environment_metrics(P, R, with_limit=True)
    assert rf.read_power_watts(env) == pytest.approx(61234.6)
    limit = rf.read_power_limit(env)
    assert limit == rf.PowerLimit(70000.0, 36800.0, 81600.0, "Automatic")
    assert env["PowerLimitWatts"]["DataSourceUri"] == P.power_limit_control
    bare = rf.environment_metrics(P, R, with_limit=False)
    assert rf.read_power_limit(bare) is None
    assert rf.read_power_watts(bare) == pytest.approx(61234.6)


def test_legacy_power_round_trip() -> None:
    body = rf.power(P, R)
    legacy = rf.read_legacy_power(body)
    assert legacy.consumed_w == pytest.approx(61234.6)
    assert legacy.limit == rf.PowerLimit(70000.0, None, 81600.0)
    uncapped = rf.power(P, rf.RackReadings(1.0, 5.0, 0.0, 10.0, control_mode="Disabled"))
    limit = rf.read_legacy_power(uncapped).limit
    assert limit is not None and limit.setpoint_w is None


def test_chassis_links() -> None:
    full = rf.chassis(P, name="r", model="m", readings=R, with_controls=True)
    links = rf.read_chassis_links(full)
    assert links == rf.ChassisLinks(P.environment_metrics, P.power, P.controls)
    old = rf.chassis(
        P, name="r", model=None, readings=R, with_controls=False, with_environment_metrics=False
    )
    assert rf.read_chassis_links(old) == rf.ChassisLinks(None, P.power, None)
    for evil in ("http://elsewhere/redfish/v1/x", "/other/path", "/redfish/v1/../x", 3, None):
        with pytest.raises(ProtocolError):
            rf.read_chassis_links({"EnvironmentMetrics": {"@odata.id": evil}})


@pytest.mark.parametrize("w", [36800.0, 50000.4, 50000.6, 81600.0])
def test_patch_bodies_round_trip(w: float) -> None:
    # Whole watts on the wire; the simulator reads back exactly what the driver meant.
    assert rf.parse_environment_patch(rf.environment_limit_patch(w)).setpoint_w == round(w)
    assert rf.parse_legacy_patch(rf.legacy_limit_patch(w)).setpoint_w == round(w)
    assert rf.parse_control_patch(rf.control_setpoint_patch(w)).setpoint_w == round(w)
    # ... and through JSON, as on the wire.
    wire = json.loads(json.dumps(rf.environment_limit_patch(w)))
    assert rf.parse_environment_patch(wire).setpoint_w == round(w)


def test_patch_parsers_refuse_what_is_not_writable() -> None:
    cases: list[tuple[Callable[[Mapping[str, Any]], rf.LimitChange], dict[str, Any], str]] = [
        (rf.parse_environment_patch, {"PowerWatts": {"Reading": 1}}, "PropertyNotWritable"),
        (rf.parse_environment_patch, {}, "PropertyMissing"),
        (rf.parse_environment_patch, {"PowerLimitWatts": 5}, "PropertyValueTypeError"),
        (
            rf.parse_environment_patch,
            {"PowerLimitWatts": {"AllowableMax": 1}},
            "PropertyNotWritable",
        ),
        (rf.parse_environment_patch, {"PowerLimitWatts": {"SetPoint": True}}, "TypeError"),
        (rf.parse_environment_patch, {"PowerLimitWatts": {"SetPoint": "5"}}, "TypeError"),
        (rf.parse_control_patch, {"SetPoint": 10**400}, "PropertyValueOutOfRange"),
        (rf.parse_control_patch, {"ControlMode": "Turbo"}, "PropertyValueNotInList"),
        (rf.parse_control_patch, {"ControlMode": ["Manual"]}, "PropertyValueNotInList"),
        (rf.parse_legacy_patch, {"PowerControl": []}, "PropertyValueFormatError"),
        (rf.parse_legacy_patch, {"PowerControl": [{"PowerLimit": {}}]}, "PropertyMissing"),
        (
            rf.parse_legacy_patch,
            {"PowerControl": [{"PowerLimit": {"LimitInWatts": 5, "LimitException": "x"}}]},
            "PropertyNotWritable",
        ),
    ]
    for parse, body, key in cases:
        with pytest.raises(rf.RequestError) as info:
            parse(body)
        assert info.value.key.endswith(key) or key in info.value.key, (body, info.value.key)
    assert rf.parse_legacy_patch(
        {"PowerControl": [{"PowerLimit": {"LimitInWatts": None}}]}
    ).remove_limit
    change = rf.parse_control_patch({"SetPoint": 5, "ControlMode": "Manual", "@odata.etag": "x"})
    assert change == rf.LimitChange(setpoint_w=5.0, control_mode="Manual")


def test_login_bodies_and_answers() -> None:
    assert rf.parse_login(rf.login_body("admin", "pw")) == ("admin", "pw")
    with pytest.raises(rf.RequestError):
        rf.parse_login({"UserName": "admin"})
    assert rf.read_login("tok", "/redfish/v1/SessionService/Sessions/3") == (
        "tok",
        "/redfish/v1/SessionService/Sessions/3",
    )
    absolute = "https://10.0.0.1/redfish/v1/SessionService/Sessions/4"
    assert rf.read_login("tok", absolute)[1] == "/redfish/v1/SessionService/Sessions/4"
    assert rf.read_login("tok", "http://[bad")[1] is None
    assert rf.read_login("tok", None)[1] is None
    for token in (None, "", "a\nb", "x" * 2000, "é"):
        with pytest.raises(ProtocolError):
            rf.read_login(token, None)


def test_error_bodies() -> None:
    body = rf.error_body("InternalError", "boom")
    assert body["error"]["code"] == "Base.1.16.InternalError"
    assert rf.error_message(json.dumps(body).encode()) == "boom"
    assert rf.error_message(b"not json") == ""
    assert rf.error_message(b'{"error": {"message": "short"}}') == "short"


def test_parse_json_refuses_what_is_not_a_json_object() -> None:
    assert rf.parse_json(b'{"a": 1}') == {"a": 1}
    for bad in (
        b"",
        b"[1]",
        b"null",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b"\xff\xfe",
        b'{"a": 1',
        b"[" * 50_000,  # nesting beyond the recursion limit
        b'{"a": ' + b"9" * 5000 + b"}",  # beyond int's digit limit
    ):
        with pytest.raises(ProtocolError):
            rf.parse_json(bad)
    with pytest.raises(ProtocolError):
        rf.parse_json(b" " * (rf.MAX_BODY_BYTES + 1))


def test_number_checks() -> None:
    for bad in ({"Reading": True}, {"Reading": "1"}, {"Reading": 10**400}, {"Reading": None}):
        with pytest.raises(ProtocolError):
            rf.read_power_watts({"PowerWatts": bad})
    with pytest.raises(ProtocolError):
        rf.read_power_limit({"PowerLimitWatts": {"AllowableMin": 5, "AllowableMax": 1}})
    with pytest.raises(ProtocolError):
        rf.read_power_limit({"PowerLimitWatts": {"ControlMode": {"x": 1}}})


def test_credentials_from_password_file(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("s3cret\nignored\n")
    assert rf.credentials(DeviceAccess(username="u", password_file=f)) == ("u", "s3cret")
    assert rf.credentials(DeviceAccess(username="u", password="p", password_file=f)) == ("u", "p")
    with pytest.raises(ValueError):
        rf.credentials(DeviceAccess(username="u", password_file=tmp_path / "missing"))


def test_etag_follows_the_settable_state() -> None:
    assert rf.etag_of(1.0, "Automatic") == rf.etag_of(1.0, "Automatic")
    assert rf.etag_of(1.0, "Automatic") != rf.etag_of(2.0, "Automatic")
    assert rf.etag_of(1.0, "A").startswith('W/"')


# --- arbitrary input never raises anything but ProtocolError ---

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
keys = st.sampled_from(
    [
        "PowerWatts",
        "PowerLimitWatts",
        "Reading",
        "SetPoint",
        "AllowableMin",
        "AllowableMax",
        "ControlMode",
        "PowerControl",
        "PowerConsumedWatts",
        "PowerLimit",
        "LimitInWatts",
        "PowerCapacityWatts",
        "EnvironmentMetrics",
        "Power",
        "Controls",
        "@odata.id",
        "UserName",
        "Password",
        "error",
    ]
)
# Bodies shaped like the real ones (the interesting keys), filled with anything.
shaped = st.recursive(
    json_values,
    lambda inner: st.dictionaries(keys, inner, max_size=5) | st.lists(inner, max_size=3),
    max_leaves=12,
)

READERS: list[Callable[[Mapping[str, Any]], object]] = [
    rf.read_power_watts,
    rf.read_power_limit,
    rf.read_legacy_power,
    rf.read_chassis_links,
    rf.parse_environment_patch,
    rf.parse_legacy_patch,
    rf.parse_control_patch,
    rf.parse_login,
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(body: bytes) -> None:
    try:
        value = rf.parse_json(body)
    except ProtocolError:
        return
    assert isinstance(value, dict)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, shaped, max_size=6))
def test_arbitrary_bodies_raise_only_protocol_errors(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    parsed = rf.parse_json(raw)
    for read in READERS:
        with suppress(ProtocolError):
            assert_finite_numbers(read(parsed))
    rf.error_message(raw)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0, max_value=1e7), st.floats(min_value=0, max_value=1e7))
def test_limits_read_back_finite(setpoint: float, reading: float) -> None:
    r = rf.RackReadings(reading, setpoint, 0.0, 1e7)
    env = rf.environment_metrics(P, r, with_limit=True)
    limit = rf.read_power_limit(json.loads(json.dumps(env)))
    assert limit is not None and limit.setpoint_w is not None
    assert math.isfinite(limit.setpoint_w)
    assert abs(limit.setpoint_w - setpoint) <= 0.05 + 1e-9 * setpoint
