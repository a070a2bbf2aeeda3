"""Dispatch HMAC-SHA256: with a key, only correctly signed dispatches pass, and a bad signature
is rejected (code bad_signature) before any other check; without a key, `sig` is ignored."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.config import ConfigError, SiteLimits, load_config
from controller.wire import Dispatch, DispatchRejected, rfc3339
from controller.wire.dispatch import REJECT_CODES
from controller.wire.signing import canonical_bytes, sign

LIMITS = SiteLimits(min_kw=1000.0, max_kw=14000.0, max_issued_age_s=30.0)
NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z
KEY = b"0123456789abcdef-shared-secret"
OTHER_KEY = b"fedcba9876543210-other-secret"


def msg(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "d-1",
        "seq": 10,
        "issued_at": rfc3339(NOW - 1.0),
        "mode": "setpoint",
        "target_kw": 5000.0,
        "ramp_s": 10,
    }
    base.update(overrides)
    return base


def signed(obj: dict[str, Any], key: bytes = KEY) -> dict[str, Any]:
    # Exactly the README recipe.
    body = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return {**obj, "sig": hmac.new(key, body, hashlib.sha256).hexdigest()}


def parse(
    obj: dict[str, Any],
    *,
    key: bytes | None = KEY,
    last_seq: int | None = None,
    replay: bool = False,
    now: float = NOW,
) -> Dispatch:
    payload = json.dumps(obj, ensure_ascii=False).encode()
    return Dispatch.decode(
        payload, now_unix=now, last_seq=last_seq, limits=LIMITS, replay=replay, hmac_key=key
    )


def bad_sig(obj: dict[str, Any], **kw: Any) -> DispatchRejected:
    with pytest.raises(DispatchRejected) as info:
        parse(obj, **kw)
    exc = info.value
    assert exc.code == "bad_signature", exc.reason
    assert exc.reason
    return exc


def test_code_is_a_metrics_label() -> None:
    assert "bad_signature" in REJECT_CODES


def test_readme_recipe_matches_sign() -> None:
    obj = msg()
    assert signed(obj)["sig"] == sign(obj, KEY)
    assert canonical_bytes(signed(obj)) == canonical_bytes(obj)


def test_good_signature_accepted() -> None:
    d = parse(signed(msg()))
    assert (d.id, d.seq, d.target_w, d.ramp_s) == ("d-1", 10, 5_000_000.0, 10.0)


def test_uppercase_hex_accepted_and_key_order_irrelevant() -> None:
    obj = signed(msg())
    obj["sig"] = obj["sig"].upper()
    reordered = dict(reversed(list(obj.items())))
    assert parse(reordered).seq == 10


def test_non_ascii_fields_signed_as_utf8() -> None:
    assert parse(signed(msg(id="Abilène-Ω-1"))).id == "Abilène-Ω-1"


def test_missing_sig_rejected_with_id_and_seq() -> None:
    exc = bad_sig(msg())
    assert (exc.id, exc.seq) == ("d-1", 10)
    assert "missing" in exc.reason


@pytest.mark.parametrize(
    "sig",
    [
        "",
        "zz" * 32,
        "ab" * 31,
        "ab" * 33,
        " " + "ab" * 32,
        "ab " * 32,
        12345,
        True,
        ["ab" * 32],
        {"sig": "ab" * 32},
    ],
)
def test_malformed_sig_rejected(sig: Any) -> None:
    exc = bad_sig({**msg(), "sig": sig})
    assert (exc.id, exc.seq) == ("d-1", 10)


def test_wrong_sig_rejected() -> None:
    obj = signed(msg())
    obj["sig"] = ("0" if obj["sig"][0] != "0" else "1") + obj["sig"][1:]
    assert "does not match" in bad_sig(obj).reason


def test_other_key_rejected() -> None:
    bad_sig(signed(msg(), key=OTHER_KEY))


def test_signature_checked_before_anything_else() -> None:
    # Unsigned garbage fields: the answer is bad_signature, not the field's own error.
    bad_sig(msg(target_kw="lots", mode="max", issued_at="yesterday"))
    bad_sig(msg(issued_at=rfc3339(NOW - 3600)))  # would be stale
    bad_sig(msg(), last_seq=99)  # would be a replay


def test_replay_protection_kept_for_signed() -> None:
    with pytest.raises(DispatchRejected) as info:
        parse(signed(msg()), last_seq=10)
    assert info.value.code == "replay"
    with pytest.raises(DispatchRejected) as info:
        parse(signed(msg(issued_at=rfc3339(NOW - 3600))))
    assert info.value.code == "stale"


def test_journal_replay_verifies_again() -> None:
    raw = signed(msg(issued_at=rfc3339(NOW - 3600)))
    assert parse(raw, replay=True).seq == 10
    tampered = {**raw, "target_kw": 9000.0}
    with pytest.raises(DispatchRejected) as info:
        parse(tampered, replay=True)
    assert info.value.code == "bad_signature"


def test_lone_surrogate_is_rejected_not_raised() -> None:
    payload = json.dumps({**msg(id="\ud800"), "sig": "ab" * 32}).encode()  # ASCII escapes
    with pytest.raises(DispatchRejected) as info:
        Dispatch.decode(payload, now_unix=NOW, last_seq=None, limits=LIMITS, hmac_key=KEY)
    assert info.value.code == "bad_signature"


def test_sig_ignored_without_key() -> None:
    assert parse({**msg(), "sig": "not hex at all"}, key=None).seq == 10
    assert parse({**msg(), "sig": 42}, key=None).seq == 10
    assert parse(signed(msg(), key=OTHER_KEY), key=None).seq == 10
    assert parse(msg(), key=None).seq == 10


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(["id", "seq", "issued_at", "mode", "target_kw", "ramp_s", "extra"]),
    value=_values,
)
def test_any_change_after_signing_rejected(field: str, value: Any) -> None:
    obj = signed(msg())
    if obj.get(field, object()) == value and type(obj.get(field)) is type(value):
        return  # not a change
    obj[field] = value
    bad_sig(obj)


@settings(max_examples=200, deadline=None)
@given(target_kw=st.floats(min_value=1000.0, max_value=14000.0), seq=st.integers(0, 2**62))
def test_signed_valid_dispatch_accepted_and_tampered_rejected(target_kw: float, seq: int) -> None:
    obj = signed(msg(target_kw=target_kw, seq=seq))
    d = parse(obj)
    assert (d.seq, d.target_w) == (seq, target_kw * 1e3)
    bad_sig({**obj, "target_kw": target_kw + 1.0})
    bad_sig({**obj, "seq": seq + 1})
    bad_sig(obj, key=OTHER_KEY)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_payload_never_raises_other(data: bytes) -> None:
    try:
        Dispatch.decode(data, now_unix=NOW, last_seq=None, limits=LIMITS, hmac_key=KEY)
    except DispatchRejected as exc:
        assert exc.code in REJECT_CODES


@settings(max_examples=100, deadline=None)
@given(obj=st.dictionaries(st.text(max_size=8), _values, max_size=8))
def test_arbitrary_unsigned_object_rejected_as_bad_signature(obj: dict[str, Any]) -> None:
    obj.pop("sig", None)
    bad_sig(obj)


# --- the key file, at config load --------------------------------------------------------

SITE = """
site_id = "t1"
[site]
max_kw = 1000
[meter]
host = "127.0.9.1"
port = 1502
[[devices]]
name = "pdu-a"
template = "modbus-load"
address = "127.0.7.1"
"""


def site_with_key(tmp_path: Path, key_file: Path) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(SITE + f'\n[dispatch]\nhmac_key_file = "{key_file}"\n')
    return p


def test_no_key_file_means_no_key(tmp_path: Path) -> None:
    p = tmp_path / "site.toml"
    p.write_text(SITE)
    cfg = load_config(p)
    assert cfg.site.dispatch.hmac_key_file is None
    assert cfg.dispatch_key is None


@pytest.mark.parametrize(
    ("content", "key"),
    [
        (KEY, KEY),
        (KEY + b"\n", KEY),
        (KEY + b"\r\n", KEY),
        (KEY + b"\n\n", KEY + b"\n"),  # only one newline is stripped
        (b" " + KEY + b" ", b" " + KEY + b" "),
    ],
)
def test_key_file_read(tmp_path: Path, content: bytes, key: bytes) -> None:
    kf = tmp_path / "dispatch.key"
    kf.write_bytes(content)
    cfg = load_config(site_with_key(tmp_path, kf))
    # The legacy mode: this key's `sig` on every dispatch, no JWS kids.
    assert cfg.dispatch_key is not None
    assert cfg.dispatch_key.legacy_key == key and cfg.dispatch_key.legacy_accepted
    assert cfg.dispatch_key.kids == ()
    assert str(KEY) not in repr(cfg)  # the key stays out of logs


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "not found"),
        (b"", "empty"),
        (b"\n", "empty"),
        (b"short-key\n", "too short"),
        (b"x" * 15, "too short"),
    ],
)
def test_key_file_errors(tmp_path: Path, content: bytes | None, words: str) -> None:
    kf = tmp_path / "dispatch.key"
    if content is not None:
        kf.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(site_with_key(tmp_path, kf))
    text = str(info.value)
    assert "dispatch.hmac_key_file" in text
    assert str(kf) in text
    assert words in text


def test_key_file_unreadable(tmp_path: Path) -> None:
    kf = tmp_path / "dispatch.key"
    kf.mkdir()  # a directory: unreadable as a file, even as root
    with pytest.raises(ConfigError) as info:
        load_config(site_with_key(tmp_path, kf))
    assert "dispatch.hmac_key_file" in str(info.value)
    assert "cannot read" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_key_file_permission_denied(tmp_path: Path) -> None:
    kf = tmp_path / "dispatch.key"
    kf.write_bytes(KEY)
    kf.chmod(0)
    with pytest.raises(ConfigError) as info:
        load_config(site_with_key(tmp_path, kf))
    assert "cannot read" in str(info.value)


def test_unknown_dispatch_key_rejected(tmp_path: Path) -> None:
    p = tmp_path / "site.toml"
    p.write_text(SITE + '\n[dispatch]\nhmac_key = "inline"\n')
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert "dispatch.hmac_key" in str(info.value)
