"""parse_dispatch: good dispatches become SI values; anything else is DispatchRejected, never
another exception."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.config import SiteLimits
from controller.wire import MAX_PAYLOAD_BYTES, Ack, Dispatch, DispatchRejected, rfc3339
from controller.wire.dispatch import REJECT_CODES

LIMITS = SiteLimits(min_kw=1000.0, max_kw=14000.0, max_issued_age_s=30.0)
NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z


def msg(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "d-1",
        "seq": 10,
        "issued_at": rfc3339(NOW - 1.0),
        "mode": "setpoint",
        "target_kw": 5000.0,
    }
    for k, v in overrides.items():
        if v is _DROP:
            base.pop(k, None)
        else:
            base[k] = v
    return base


_DROP = object()


def parse(obj: Any, *, last_seq: int | None = None, raw: bytes | None = None) -> Dispatch:
    payload = raw if raw is not None else json.dumps(obj).encode()
    return Dispatch.decode(payload, now_unix=NOW, last_seq=last_seq, limits=LIMITS)


def rejected(obj: Any, *, last_seq: int | None = None, raw: bytes | None = None) -> str:
    with pytest.raises(DispatchRejected) as info:
        parse(obj, last_seq=last_seq, raw=raw)
    exc = info.value
    assert exc.reason, "every rejection carries a reason"
    assert exc.code in REJECT_CODES
    return exc.reason


# --- good ones -----------------------------------------------------------------------------


def test_setpoint_in_watts() -> None:
    d = parse(msg(ramp_s=12.5, expires_at=rfc3339(NOW + 600)))
    assert d == Dispatch(
        id="d-1",
        seq=10,
        issued_at=NOW - 1.0,
        mode="setpoint",
        target_w=5_000_000.0,
        ramp_s=12.5,
        start_at=None,
        expires_at=NOW + 600,
        signal=None,
        band_w=None,
    )


def test_defaults_and_int_values() -> None:
    d = parse(msg(target_kw=7000, ramp_s=None, start_at=None))
    assert d.target_w == 7_000_000.0 and isinstance(d.target_w, float)
    assert d.ramp_s == 0.0 and d.start_at is None and d.expires_at is None


def test_regulation_base_signal_band() -> None:
    d = parse(msg(mode="regulation", target_kw=7000, band_kw=2000, signal=-0.25))
    assert d.mode == "regulation"
    assert d.target_w == 7e6 and d.band_w == 2e6 and d.signal == -0.25


def test_regulation_signal_defaults_to_zero() -> None:
    assert parse(msg(mode="regulation", band_kw=1000)).signal == 0.0


def test_release_needs_no_target_and_means_site_maximum() -> None:
    d = parse(msg(mode="release", target_kw=_DROP, ramp_s=60))
    assert d.mode == "release" and d.target_w == 14e6 and d.ramp_s == 60


def test_times_with_offsets_and_fractions() -> None:
    d = parse(
        msg(
            issued_at="2024-05-01T13:59:58.5+02:00",
            start_at="2024-05-01t12:01:00.123456789z",
            expires_at="2024-05-01T12:10:00Z",
        )
    )
    assert d.issued_at == NOW - 1.5
    assert d.start_at == pytest.approx(NOW + 60.123456, abs=1e-6)
    assert d.expires_at == NOW + 600


def test_unknown_fields_ignored_and_edges_accepted() -> None:
    d = parse(msg(extra={"x": 1}, target_kw=14000.0, issued_at=rfc3339(NOW + 4.0)), last_seq=9)
    assert d.target_w == 14e6
    assert parse(msg(target_kw=1000.0, seq=0)).target_w == 1e6
    assert parse(msg(issued_at=rfc3339(NOW - 29.9))).seq == 10
    assert parse(msg(id="x" * 128)).id == "x" * 128


# --- bad ones ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"[" * 60_000, "nested too deeply"),  # RecursionError inside json
        (b'{"seq": ' + b"9" * 5000 + b"}", "not JSON"),  # over-long integer
        (b'{"id":"a","seq":1,"mode":"setpoint","target_kw":NaN}', "not JSON"),
        (b'{"target_kw": Infinity}', "not JSON"),
        (b'{"target_kw": -Infinity}', "not JSON"),
        (b" " * (MAX_PAYLOAD_BYTES + 1), "too large"),
    ],
)
def test_payload_level_rejections(raw: bytes, needle: str) -> None:
    assert needle in rejected(None, raw=raw)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"id": _DROP}, "id missing"),
        ({"id": 5}, "id must be a string"),
        ({"id": ""}, "id empty"),
        ({"id": "   "}, "id empty"),
        ({"id": "x" * 129}, "id longer than 128"),
        ({"seq": _DROP}, "seq missing"),
        ({"seq": True}, "seq must be an integer"),
        ({"seq": 1.0}, "seq must be an integer"),
        ({"seq": "11"}, "seq must be an integer"),
        ({"seq": -1}, "seq must not be negative"),
        ({"seq": 2**64}, "seq out of range"),
        ({"mode": _DROP}, "mode missing"),
        ({"mode": "boost"}, "mode unknown"),
        ({"mode": 1}, "mode unknown"),
        ({"issued_at": _DROP}, "issued_at missing"),
        ({"issued_at": NOW}, "issued_at must be an RFC3339 string"),
        ({"issued_at": "yesterday"}, "issued_at not RFC3339"),
        ({"issued_at": "2024-05-01"}, "issued_at not RFC3339"),
        ({"issued_at": "2024-05-01T12:00:00"}, "issued_at not RFC3339"),  # no offset
        ({"issued_at": "2024-13-01T12:00:00Z"}, "not a valid date"),
        ({"issued_at": rfc3339(NOW - 31)}, "issued_at stale"),
        ({"issued_at": rfc3339(NOW + 6)}, "in the future"),
        ({"target_kw": _DROP}, "target_kw missing"),
        ({"target_kw": None}, "target_kw missing"),
        ({"target_kw": True}, "target_kw must be a number"),
        ({"target_kw": "5000"}, "target_kw must be a number"),
        ({"target_kw": [5000]}, "target_kw must be a number"),
        ({"target_kw": 10**400}, "target_kw out of range"),
        ({"target_kw": -1.0}, "target_kw must not be negative"),
        ({"target_kw": 14000.001}, "target_kw above site maximum 14000.0"),
        ({"target_kw": 999.0}, "target_kw below site minimum 1000.0"),
        ({"ramp_s": -0.1}, "ramp_s must not be negative"),
        ({"ramp_s": 3601}, "ramp_s above 3600"),
        ({"ramp_s": False}, "ramp_s must be a number"),
        ({"ramp_s": 1e308 * 10}, "non-finite number Infinity"),  # json.dumps writes it
        ({"start_at": "soon"}, "start_at not RFC3339"),
        ({"start_at": rfc3339(NOW + 3 * 86400)}, "start_at more than"),
        ({"expires_at": rfc3339(NOW - 1)}, "expires_at already past"),
        ({"expires_at": rfc3339(NOW)}, "expires_at already past"),
        (
            {"start_at": rfc3339(NOW + 60), "expires_at": rfc3339(NOW + 60)},
            "expires_at not after start_at",
        ),
        (
            {"start_at": rfc3339(NOW + 60), "expires_at": rfc3339(NOW + 30)},
            "expires_at not after start_at",
        ),
        ({"mode": "regulation"}, "band_kw missing"),
        ({"mode": "regulation", "band_kw": 0}, "band_kw must be above 0"),
        ({"mode": "regulation", "band_kw": -5}, "band_kw must be above 0"),
        ({"mode": "regulation", "band_kw": 100, "signal": 1.01}, "signal outside"),
        ({"mode": "regulation", "band_kw": 100, "signal": -1.5}, "signal outside"),
        ({"mode": "regulation", "band_kw": 100, "signal": "0.5"}, "signal must be a number"),
        ({"mode": "regulation", "band_kw": True}, "band_kw must be a number"),
        ({"mode": "regulation", "target_kw": 13000, "band_kw": 1001}, "band_kw above site max"),
        ({"mode": "regulation", "target_kw": 2000, "band_kw": 1001}, "band_kw below site min"),
        ({"mode": "release", "target_kw": "max"}, "target_kw must be a number"),
    ],
)
def test_field_rejections(overrides: dict[str, Any], needle: str) -> None:
    reason = rejected(msg(**overrides))
    assert needle in reason, reason


def test_replayed_or_older_seq_rejected_newer_accepted() -> None:
    assert "not above last accepted 10" in rejected(msg(seq=10), last_seq=10)
    assert "replayed or older" in rejected(msg(seq=3), last_seq=10)
    assert parse(msg(seq=11), last_seq=10).seq == 11


def test_rejection_names_the_dispatch_when_it_can() -> None:
    with pytest.raises(DispatchRejected) as info:
        parse(msg(id="abc", seq=42, target_kw=1e9))
    assert (info.value.id, info.value.seq, info.value.code) == ("abc", 42, "out_of_range")
    with pytest.raises(DispatchRejected) as info:
        parse(msg(id=7, seq="x"))
    assert (info.value.id, info.value.seq) == (None, None)
    with pytest.raises(DispatchRejected) as info:
        parse(None, raw=b"garbage")
    assert (info.value.id, info.value.seq, info.value.code) == (None, None, "not_json")


def test_ack_payload() -> None:
    body = json.loads(Ack("d-1", 10, False, "target_kw above site maximum", NOW).encode())
    assert body == {
        "id": "d-1",
        "seq": 10,
        "accepted": False,
        "reason": "target_kw above site maximum",
        "at": "2024-05-01T12:00:00.000Z",
    }
    assert json.loads(Ack(None, None, False, "payload not JSON", NOW).encode())["id"] is None


# --- properties ----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ["id", "seq", "issued_at", "mode", "target_kw", "ramp_s", "start_at", "expires_at",
          "signal", "band_kw"]  # fmt: skip


def _near(lo: float, hi: float) -> st.SearchStrategy[str]:
    return st.floats(min_value=lo, max_value=hi).map(lambda dt: rfc3339(NOW + dt))


# Plausible dispatches (often valid), then damaged: some fields dropped, some replaced by
# arbitrary JSON. Both outcomes get checked.
plausible = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=20),
        "seq": st.integers(min_value=0, max_value=1000),
        "issued_at": _near(-40, 10),
        "mode": st.sampled_from(["setpoint", "regulation", "release"]),
        "target_kw": st.floats(min_value=0, max_value=15000),
    },
    optional={
        "ramp_s": st.floats(min_value=-1, max_value=4000),
        "start_at": _near(-60, 600),
        "expires_at": _near(-60, 1200),
        "signal": st.floats(min_value=-1.2, max_value=1.2),
        "band_kw": st.floats(min_value=-1, max_value=8000),
    },
)
dispatch_like = st.builds(
    lambda base, damage, drop: {k: v for k, v in {**base, **damage}.items() if k not in drop},
    plausible,
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=2),
    st.sets(st.sampled_from(FIELDS), max_size=2),
)


def _check(payload: bytes, last_seq: int | None = None) -> Dispatch | None:
    try:
        d = Dispatch.decode(payload, now_unix=NOW, last_seq=last_seq, limits=LIMITS)
    except DispatchRejected as exc:
        assert exc.reason and exc.code in REJECT_CODES
        return None
    # Whatever passes is within what the site can do.
    assert d.mode in ("setpoint", "regulation", "release")
    assert LIMITS.min_kw * 1e3 <= d.target_w <= LIMITS.max_kw * 1e3
    assert all(
        math.isfinite(v)
        for v in (d.target_w, d.ramp_s, d.issued_at, d.start_at or 0.0, d.expires_at or 0.0)
    )
    assert 0 <= d.ramp_s <= 3600
    assert last_seq is None or d.seq > last_seq
    if d.mode == "regulation":
        assert d.band_w is not None and d.band_w > 0 and d.signal is not None
        assert LIMITS.min_kw * 1e3 <= d.target_w - d.band_w
        assert d.target_w + d.band_w <= LIMITS.max_kw * 1e3
    return d


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_ever_rejected(payload: bytes) -> None:
    _check(payload)


@given(json_values)
def test_arbitrary_json_only_ever_rejected(value: Any) -> None:
    _check(json.dumps(value).encode())


@settings(max_examples=500)
@given(dispatch_like, st.none() | st.integers(min_value=-1, max_value=100))
def test_dispatch_shaped_objects_parse_or_reject_cleanly(
    obj: dict[str, Any], last: int | None
) -> None:
    _check(json.dumps(obj).encode(), last_seq=last)


@given(
    target=st.floats(min_value=1000, max_value=14000),
    ramp=st.floats(min_value=0, max_value=3600),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_valid_setpoints_always_parse_to_watts(target: float, ramp: float, seq: int) -> None:
    d = parse(msg(target_kw=target, ramp_s=ramp, seq=seq))
    assert d.target_w == target * 1e3 and d.ramp_s == ramp and d.seq == seq


# --- frequency services: armed amounts and recall ------------------------------------------


def test_services_set_armed_amounts_in_watts_with_any_mode_and_round_trip() -> None:
    d = parse(msg(services={"ffr_kw": 1500.0, "ufr_kw": 0}))
    assert d.armed_w == {"ffr": 1.5e6, "ufr": 0.0} and d.sets_target
    again = Dispatch.decode(d.encode(), now_unix=NOW, last_seq=None, limits=LIMITS)
    assert again == d
    only_ffr = parse(msg(services={"ffr_kw": 250.0, "ufr_kw": None}))
    assert only_ffr.armed_w == {"ffr": 250e3}
    assert parse(msg()).armed_w is None


def test_recall_needs_no_target_and_sets_none() -> None:
    d = parse(msg(mode="recall", target_kw=_DROP))
    assert d.mode == "recall" and not d.sets_target
    assert "target_kw" not in d.to_wire()
    assert Dispatch.decode(d.encode(), now_unix=NOW, last_seq=None, limits=LIMITS) == d


@pytest.mark.parametrize(
    ("services", "words"),
    [
        ([1], "services must be an object"),
        ({"pfr_kw": 1.0}, "services.pfr_kw unknown"),
        ({"ffr_kw": -1.0}, "must not be negative"),
        ({"ffr_kw": "lots"}, "ffr_kw"),
        ({"ffr_kw": float("inf")}, "ffr_kw"),
    ],
)
def test_bad_services_are_rejected_with_a_reason(services: Any, words: str) -> None:
    if isinstance(services, dict) and any(
        isinstance(v, float) and math.isinf(v) for v in services.values()
    ):
        raw = json.dumps(msg(services=services)).replace("Infinity", "1e999").encode()
        assert words in rejected(None, raw=raw)
        return
    assert words in rejected(msg(services=services))
