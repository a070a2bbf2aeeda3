"""The LuxOS message set: requests and replies round-trip; garbage is ProtocolError, never more."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import ProtocolError
from drivers.luxos import messages as m
from tests.helpers import assert_finite_numbers


def wire(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply as the driver sees it after the socket: encoded, then decoded."""
    return m.decode_reply(m.encode_reply(reply))


# --- requests ---


def test_request_encoding_joins_parameters_with_commas() -> None:
    assert json.loads(m.encode_request("version")) == {"command": "version"}
    raw = m.encode_request("profileset", "yJN2nlj1", "default")
    assert json.loads(raw) == {"command": "profileset", "parameter": "yJN2nlj1,default"}
    req = m.decode_request(raw)
    assert req == m.Request("profileset", ("yJN2nlj1", "default"))


def test_request_decoding_tolerates_terminators_and_multi_commands() -> None:
    req = m.decode_request(b'{"command": "power+summary"}\n\x00')
    assert req.commands == ("power", "summary")
    assert m.decode_request(b'{"command":"curtail","parameter":"s , sleep"}').params == (
        "s",
        "sleep",
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"version",
        b"[]",
        b'{"parameter":"x"}',
        b'{"command":""}',
        b'{"command":1}',
        b'{"command":"x","parameter":[1]}',
        b"\xff\xfe",
        b"{" * 100_000,
    ],
)
def test_bad_requests_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.decode_request(raw)


def test_object_end_finds_the_end_of_a_json_object() -> None:
    body = b'{"a": "}{\\"", "b": [1, {"c": 2}]}'
    assert m.object_end(body) is not None
    assert m.object_end(body + b"\x00trailing") == len(body)
    assert m.object_end(body[:-1]) is None
    assert m.object_end(b"  ") is None
    with pytest.raises(ProtocolError):
        m.object_end(b"garbage{")


# --- replies ---


def test_reply_carries_status_and_trailing_nul() -> None:
    raw = m.encode_reply(m.power_reply(3499.6, True))
    assert raw.endswith(b"\x00")
    reply = m.decode_reply(raw)
    st_ = m.parse_status(reply)
    assert (st_.status, st_.code, st_.msg) == ("S", m.Code.POWER, "Power usage")
    assert reply["id"] == 1
    assert reply["STATUS"][0]["Description"].startswith("LUXminer ")
    assert m.is_success(reply)
    assert m.parse_power(reply) == m.PowerReading(3500.0, True)


def test_parsers_round_trip_the_builders() -> None:
    assert m.parse_summary(wire(m.summary_reply(200e3, 199e3, 42))).hashrate_ths == 200.0
    v = m.parse_version(wire(m.version_reply("Antminer S21")))
    assert v.type_name == "Antminer S21" and v.luxminer == m.LUXMINER_VERSION
    cfg = m.parse_config(
        wire(
            m.config_reply(
                type_name="Antminer S21",
                profile="440MHz",
                curtailed=True,
                psu_on=False,
                atm_enabled=False,
                hostname="m1",
                mac="02:00:00:00:00:01",
            )
        )
    )
    assert cfg == m.ConfigInfo("440MHz", True, False, "Antminer S21")
    assert m.parse_devdetails(wire(m.devdetails_reply("Antminer S21"))) == ["Antminer S21"] * 3
    ladder = [m.Profile("default", 3500, 200), m.Profile("465MHz", 3250, 185.7)]
    parsed = m.parse_profiles(wire(m.profiles_reply(ladder)))
    assert [(p.name, p.watts) for p in parsed] == [("465MHz", 3250.0), ("default", 3500.0)]
    assert m.parse_session(wire(m.session_reply("abcd1234", created=True))) == "abcd1234"
    assert m.parse_session(wire(m.session_reply("", created=False)), "session") == ""
    assert m.parse_atm(wire(m.atm_reply(True))) is True
    assert m.parse_profileset(wire(m.profileset_reply("default"))) == "default"
    multi = wire(m.multi_reply({"power": m.power_reply(10, False)}))
    assert m.parse_power(multi["power"][0]).psu_on is False


@pytest.mark.parametrize(
    ("code", "msg", "error"),
    [
        (m.Code.INVALID_SESSION, "Invalid session_id", m.InvalidSession),
        (0, "Session expired", m.InvalidSession),
        (m.Code.SESSION_BUSY, "Another session is active", m.SessionBusy),
        (14, "Session in use", m.SessionBusy),
        (m.Code.ALREADY_ACTIVE, "Miner is already active", m.AlreadyActive),
        (m.Code.INTERNAL, "Internal error", m.CommandError),
    ],
)
def test_error_replies_map_to_errors(code: int, msg: str, error: type[m.CommandError]) -> None:
    reply = wire(m.error_reply(code, msg))
    assert not m.is_success(reply)
    with pytest.raises(error) as info:
        m.check(reply, "profileset")
    assert type(info.value) is error
    assert info.value.code == code and info.value.msg == msg
    assert isinstance(info.value, ProtocolError)  # the driver's error hierarchy


def test_informational_status_is_success() -> None:
    reply = m.power_reply(100, True)
    reply["STATUS"][0]["STATUS"] = "I"
    assert m.parse_power(reply).watts == 100.0


@pytest.mark.parametrize(
    ("reply", "parse"),
    [
        ({}, m.parse_power),
        ({"STATUS": "S"}, m.parse_power),
        ({"STATUS": [{"STATUS": "S"}]}, m.parse_power),
        ({"STATUS": [{"STATUS": "Q"}], "POWER": [{"Watts": 1}]}, m.parse_power),
        ({"STATUS": [{"STATUS": "S"}], "POWER": []}, m.parse_power),
        ({"STATUS": [{"STATUS": "S"}], "POWER": [{"Watts": "12"}]}, m.parse_power),
        ({"STATUS": [{"STATUS": "S"}], "POWER": [{"Watts": True}]}, m.parse_power),
        ({"STATUS": [{"STATUS": "S"}], "POWER": [{"Watts": float("nan")}]}, m.parse_power),
        ({"STATUS": [{"STATUS": "S"}], "POWER": [{"Watts": 1, "PSU": "on"}]}, m.parse_power),
        ({"STATUS": [{"STATUS": "S"}], "SUMMARY": [{"GHS 5s": -1}]}, m.parse_summary),
        ({"STATUS": [{"STATUS": "S"}], "VERSION": [{"Type": "S21"}]}, m.parse_version),
        ({"STATUS": [{"STATUS": "S"}], "CONFIG": [{"Profile": "x"}]}, m.parse_config),
        ({"STATUS": [{"STATUS": "S"}], "PROFILES": []}, m.parse_profiles),
        (
            {"STATUS": [{"STATUS": "S"}], "PROFILES": [{"Profile Name": "a", "Watts": 0}]},
            m.parse_profiles,
        ),
        ({"STATUS": [{"STATUS": "S"}], "SESSION": [{}]}, m.parse_session),
        ({"STATUS": [{"STATUS": "S"}], "ATM": [{"Enabled": 1}]}, m.parse_atm),
        ({"STATUS": [{"STATUS": "S"}], "DEVDETAILS": [1]}, m.parse_devdetails),
    ],
)
def test_missing_or_wrong_keys_are_protocol_errors(
    reply: dict[str, Any], parse: Callable[[dict[str, Any]], object]
) -> None:
    with pytest.raises(ProtocolError):
        parse(reply)


def test_garbage_replies_are_protocol_errors() -> None:
    for raw in (b"", b"\x00", b"\xff\xfe{{{", b"[1,2]", b'"x"', b"{" * 50_000, b"null"):
        with pytest.raises(ProtocolError):
            m.decode_reply(raw)
    with pytest.raises(ProtocolError):
        m.decode_reply(b"{}" + b" " * (m.MAX_MESSAGE_BYTES + 1))


def test_choose_profile_takes_the_highest_at_or_below() -> None:
    ladder = [m.Profile(n, w, 0) for n, w in (("low", 1750), ("mid", 2500), ("top", 3500))]
    assert m.choose_profile(ladder, 3500).name == "top"
    assert m.choose_profile(ladder, 3499).name == "mid"
    assert m.choose_profile(ladder, 2500).name == "mid"
    assert m.choose_profile(ladder, 100).name == "low"  # nothing below: the lowest
    with pytest.raises(ValueError):
        m.choose_profile([], 1)


def test_multi_command_replies_split_by_command() -> None:
    power, summary = m.power_reply(3100.0, True), m.summary_reply(1.5e5, 1.4e5, 60)
    parts = m.split_multi(m.multi_reply({"power": power, "summary": summary}), ["power", "summary"])
    assert m.parse_power(parts["power"]).watts == 3100.0
    assert m.parse_summary(parts["summary"]).ghs_5s == 1.5e5
    assert m.split_multi(power, ["power"]) == {"power": power}  # one command: as it came
    with pytest.raises(ProtocolError, match="without 'summary'"):
        m.split_multi(m.multi_reply({"power": power}), ["power", "summary"])
    refused = m.error_reply(m.Code.INVALID_COMMAND, "Invalid command")  # no multi-commands
    with pytest.raises(m.CommandError):
        m.split_multi(refused, ["power", "summary"])


# --- nothing but ProtocolError, whatever arrives ---

PARSERS: list[Callable[[dict[str, Any]], object]] = [
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
    lambda r: m.check(r, "x"),
    lambda r: m.split_multi(r, ["power", "summary"]),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3)
    ),
    max_leaves=12,
)
keys = st.sampled_from(
    [
        "STATUS",
        "POWER",
        "SUMMARY",
        "VERSION",
        "CONFIG",
        "DEVDETAILS",
        "PROFILES",
        "PROFILE",
        "SESSION",
        "ATM",
        "id",
        "Watts",
        "PSU",
        "GHS 5s",
        "Profile",
        "CurtailMode",
        "Type",
        "LUXminer",
        "SessionID",
        "Enabled",
        "Profile Name",
        "Model",
        "Code",
        "Msg",
    ]
)
near_replies = st.dictionaries(
    keys,
    st.lists(st.dictionaries(keys | st.text(max_size=4), json_values, max_size=4), max_size=2)
    | json_values,
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_error(raw: bytes) -> None:
    try:
        reply = m.decode_reply(raw)
    except ProtocolError:
        return
    for parse in PARSERS:
        with contextlib.suppress(ProtocolError):
            parse(reply)
    with contextlib.suppress(ProtocolError):
        m.decode_request(raw)
    with contextlib.suppress(ProtocolError):
        m.object_end(raw)


@settings(max_examples=500, deadline=None)
@given(near_replies)
def test_arbitrary_reply_shapes_raise_only_protocol_error(reply: dict[str, Any]) -> None:
    # What a parser returns reaches the fleet arrays as numbers: never NaN or inf.
    for parse in PARSERS:
        with contextlib.suppress(ProtocolError):
            assert_finite_numbers(parse(reply))
    # and the same after the wire (NaN and huge numbers included)
    try:
        raw = m.encode_reply(reply)
    except ValueError:
        return
    decoded = m.decode_reply(raw)
    for parse in PARSERS:
        with contextlib.suppress(ProtocolError):
            assert_finite_numbers(parse(decoded))
