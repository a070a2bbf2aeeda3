"""DSX Flex against its official schemas (configs/standards/dsx-flex/dsx-flex.yaml).

The daemon checks incoming events in code (no JSON Schema engine at run time); here that code
meets the yaml: whatever it accepts the schema accepts, whatever the schema refuses it
refuses, on hand-made cases and on generated mutations. And everything the agent builds to
publish (status snapshots, breach alerts, in their envelopes) validates.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.northbound.dsx_flex import envelope
from controller.northbound.dsx_flex.breach import Alert, infrastructure_actions, shed_hints
from controller.northbound.dsx_flex.enforcement import decode_enforcement
from controller.northbound.dsx_flex.envelope import EnvelopeError, Trace
from controller.northbound.dsx_flex.loadtarget import TargetError, decode_targets
from controller.northbound.dsx_flex.power import Power
from controller.northbound.dsx_flex.schedule import Target
from controller.northbound.dsx_flex.status import Bounds, FeedState, status_data
from controller.wire.timestamps import rfc3339
from tests.dsx_isv import IsvKey, check_event, errors, load_target_event, spec, target
from tests.helpers import device_spec

FEEDS = ("main-a",)
NOW = time.time()


def accepts(event: dict[str, Any]) -> bool:
    """The agent's decoder on a plain-`data` load target event (envelope, then payload)."""
    try:
        env = envelope.decode(json.dumps(event).encode(), envelope.LOADTARGET_SET)
        if isinstance(env.data, dict):
            decode_targets(env.data, FEEDS, NOW)
    except (EnvelopeError, TargetError):
        return False
    return True


def valid(event: dict[str, Any]) -> bool:
    return not errors("LoadTargetSetEvent", event)


def base() -> dict[str, Any]:
    return load_target_event(
        "acme",
        [
            target(
                5.0, "megawatt", start=NOW - 1, end=NOW + 900, feeds=["main-a"], best_effort=False
            )
        ],
        None,
    )


def test_the_copied_spec_is_dsx_flex_1_7_with_its_license() -> None:
    doc = spec()
    assert doc["asyncapi"] == "3.1.0"
    folder = Path(envelope.__file__).resolve().parents[3] / "configs/standards/dsx-flex"
    assert "Apache License" in (folder / "LICENSE").read_text()
    channels = {c["address"] for c in doc["channels"].values()}
    assert "grid/v1/isv/{identifier}/loadtarget/set" in channels
    assert doc["channels"]["powerBreachAlertChannel"]["bindings"]["mqtt"]["qos"] == 2


def test_a_good_event_is_valid_and_accepted_plain_and_signed(tmp_path: Path) -> None:
    e = base()
    assert valid(e) and accepts(e)
    key = IsvKey.create(tmp_path, "k1")
    signed = load_target_event("acme", [target(400.0)], key)
    assert valid(signed)
    env = envelope.decode(json.dumps(signed).encode(), envelope.LOADTARGET_SET)
    assert isinstance(env.data, str) and env.role == "isv" and env.sender == "acme"


def _del(path: tuple[Any, ...]) -> Any:
    def f(e: dict[str, Any]) -> None:
        obj = e
        for k in path[:-1]:
            obj = obj[k]
        del obj[path[-1]]

    return f


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def f(e: dict[str, Any]) -> None:
        obj = e
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value

    return f


T0 = ("data", "targets", 0)
BREAKS = {
    **{f"no {k}": _del((k,)) for k in envelope.REQUIRED},
    "specversion 1.0": _set(("specversion",), "1.0"),
    "id not a uuid": _set(("id",), "1234-1234"),
    "id a number": _set(("id",), 7),
    "source role": _set(("source",), "//grid/v1/vendor/acme"),
    "source path": _set(("source",), "//grid/v1/isv/acme/extra"),
    "type": _set(("type",), "grid.powerstate.status.v1"),
    "time not a date": _set(("time",), "yesterday"),
    "time with a space": _set(("time",), "2026-01-01 00:00:00Z"),
    "datacontenttype": _set(("datacontenttype",), "application/xml"),
    "subject a number": _set(("subject",), 3),
    "traceparent upper hex": _set(("traceparent",), "00-" + "A" * 32 + "-" + "b" * 16 + "-01"),
    "traceparent short": _set(("traceparent",), "00-abc-def-01"),
    "correlationid": _set(("correlationid",), "not-a-uuid"),
    "tracestate null": _set(("tracestate",), None),
    "data a number": _set(("data",), 5),
    "data a non-JWS string": _set(("data",), "hello"),
    "no targets": _del(("data", "targets")),
    "targets empty": _set(("data", "targets"), []),
    "target a string": _set(T0, "5 MW"),
    "no interval": _del((*T0, "interval")),
    "no load_constraint": _del((*T0, "load_constraint")),
    "interval a list": _set((*T0, "interval"), []),
    "start_time null": _set((*T0, "interval", "start_time"), None),
    "end_time not a date": _set((*T0, "interval", "end_time"), "soon"),
    "constraint no unit": _del((*T0, "load_constraint", "unit")),
    "constraint gigawatt": _set((*T0, "load_constraint", "unit"), "gigawatt"),
    "constraint negative": _set((*T0, "load_constraint", "value"), -1),
    "constraint a string": _set((*T0, "load_constraint", "value"), "5"),
    "constraint a bool": _set((*T0, "load_constraint", "value"), True),
    "constraint a list": _set((*T0, "load_constraint"), [5, "megawatt"]),
    "feed_tags a string": _set((*T0, "feed_tags"), "main-a"),
    "feed_tags numbers": _set((*T0, "feed_tags"), [1]),
    "strategy a bool": _set((*T0, "strategy"), True),
    "best_effort a string": _set((*T0, "strategy", "best_effort"), "yes"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_what_the_schema_refuses_the_agent_refuses(name: str) -> None:
    e = base()
    BREAKS[name](e)
    assert not valid(e), f"{name}: the schema accepts it; the case is wrong"
    assert not accepts(e), f"{name}: the agent accepted what the schema refuses"


STRICTER = {
    # Valid per schema, refused by what a schema cannot say (each with its reason).
    "ends before it starts": _set((*T0, "interval", "end_time"), rfc3339(NOW - 100)),
    "already over": _set((*T0, "interval"), {"end_time": rfc3339(NOW - 10)}),
    "zero (description: > 0)": _set((*T0, "load_constraint", "value"), 0),
    "unknown feed": _set((*T0, "feed_tags"), ["main-z"]),
}


@pytest.mark.parametrize("name", sorted(STRICTER))
def test_what_only_the_agent_refuses_is_schema_valid(name: str) -> None:
    e = base()
    STRICTER[name](e)
    assert valid(e) and not accepts(e)


LENIENT = {
    "null constraint": _set((*T0, "load_constraint"), None),
    "no interval fields": _set((*T0, "interval"), {}),
    "watts, integer": _set((*T0, "load_constraint"), {"value": 400000, "unit": "watt"}),
    "no feed_tags": _del((*T0, "feed_tags")),
    "empty feed_tags": _set((*T0, "feed_tags"), []),
    "no strategy": _del((*T0, "strategy")),
    "no correlationid": _del(("correlationid",)),
    "tracestate": _set(("tracestate",), "vendor=abc"),
    "an offset time": _set(("time",), rfc3339(NOW).replace("Z", "+00:00")),
    "extra attribute": _set(("dataschema",), "urn:x"),
    "extra target field": _set((*T0, "note"), "x"),
}


@pytest.mark.parametrize("name", sorted(LENIENT))
def test_what_the_schema_allows_the_agent_takes(name: str) -> None:
    e = base()
    LENIENT[name](e)
    assert valid(e) and accepts(e)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**7),
    st.floats(-1e3, 1e7),
    st.text(max_size=12),
    st.sampled_from(
        ["watt", "kilowatt", "megawatt", "1.0.2", rfc3339(NOW), str(uuid.uuid4()), "a.b.c"]
    ),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_whatever_the_agent_accepts_the_schema_accepts(data: st.DataObject) -> None:
    e = base()
    paths = _paths(e)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        try:
            if data.draw(st.booleans()):
                _set(path, data.draw(json_value))(e)
            else:
                _del(path)(e)
        except (KeyError, IndexError, TypeError):
            continue
    if accepts(e):
        assert valid(e), (e, errors("LoadTargetSetEvent", e))


# -- what the agent publishes ----------------------------------------------------------------


def _target(value: float | None, **kw: Any) -> Target:
    fields: dict[str, Any] = dict(
        feed="main-a",
        start=NOW,
        end=None,
        best_effort=False,
        correlation_id=str(uuid.uuid4()),
        isv="acme",
        issued=NOW,
        seq=1,
    )
    fields.update(kw)
    return Target(constraint=None if value is None else Power(value, "kilowatt"), **fields)


def _status_event(state: FeedState) -> dict[str, Any]:
    body = envelope.encode(
        source="//grid/v1/dsx-flex-agent/f1",
        type_=envelope.POWERSTATE_STATUS,
        subject="powerstate",
        data=status_data({"main-a": state}, NOW),
        at=NOW,
        trace=Trace.new(),
        correlationid=str(uuid.uuid4()),
    )
    return dict(json.loads(body))


@pytest.mark.parametrize("with_event", [True, False])
def test_status_snapshots_validate(with_event: bool) -> None:
    active = _target(600.0)
    later = _target(300.0, start=NOW + 60, end=NOW + 120, seq=2)
    restored = _target(None, start=NOW + 120, seq=3)  # a null target is not listed
    state = FeedState(
        targets=[restored, later, active],
        active=active,
        bounds=Bounds(100e3, 1000e3, 1000e3),
        calculated_w=600e3,
        in_flight=with_event,
        event="start_ramp_down" if with_event else "periodic",
        event_start=NOW if with_event else None,
        compliant=True,
    )
    event = _status_event(state)
    data, found = check_event(event)
    assert not found, found
    feed = data["feeds"]["main-a"]
    assert [t["active"] for t in feed["targets"]] == [True, False]
    assert ("power_event_start_time" in feed) is with_event
    assert event["specversion"] == "1.0.2"


@pytest.mark.parametrize("status", ["active", "escalated", "resolved"])
def test_breach_alerts_validate(status: Any) -> None:
    t = _target(500.0)
    alert = Alert(
        "main-a",
        status,
        "critical",
        str(uuid.uuid4()),
        NOW - 60,
        NOW if status == "resolved" else None,
        t,
        700e3,
    )
    devices = [
        device_spec(name="gpu-1", protocol="redfish", setpoint_is_cap=True, priority=0),
        device_spec(name="s21-1", protocol="luxos", priority=1),
    ]
    hints = shed_hints(devices, alert.excess_w)
    assert hints
    body = envelope.encode(
        source="//grid/v1/dsx-flex-agent/f1",
        type_=envelope.POWERBREACH_ALERT,
        subject="powerbreach",
        data=alert.to_wire(hints, infrastructure_actions(status, "critical", True)),
        at=NOW,
        trace=Trace.new(),
        correlationid=t.correlation_id,
    )
    data, found = check_event(json.loads(body))
    assert not found, found
    assert ("shed_hints" in data) is (status != "resolved")
    assert ("resolved_at" in data["breach"]) is (status == "resolved")
    assert (data["infrastructure_actions"] == []) is (status == "resolved")


def test_enforcement_decoder_matches_the_schema() -> None:
    good = {
        "breach_id": str(uuid.uuid4()),
        "feed_tag": "main-a",
        "action": "applied",
        "code": "success",
        "timestamp": rfc3339(NOW),
        "results": [
            {
                "resource_id": "r1",
                "resource_type": "gpu",
                "requested_action": "throttle",
                "code": "applied",
                "applied_power": {"value": 3, "unit": "kilowatt"},
            }
        ],
    }
    assert not errors("PowerBreachEnforcementData", good)
    decode_enforcement(good)
    for key in ("breach_id", "feed_tag", "action", "code", "results", "timestamp"):
        bad = copy.deepcopy(good)
        del bad[key]
        assert errors("PowerBreachEnforcementData", bad)
        with pytest.raises(ValueError):
            decode_enforcement(bad)
    for path, value in [
        (("action",), "undone"),
        (("results", 0, "code"), "done"),
        (("results", 0, "resource_type"), "rack"),
        (("breach_id",), "b-1"),
        (("results", 0, "applied_power", "unit"), "hp"),
    ]:
        bad = copy.deepcopy(good)
        _set(path, value)(bad)
        assert errors("PowerBreachEnforcementData", bad)
        with pytest.raises(ValueError):
            decode_enforcement(bad)
