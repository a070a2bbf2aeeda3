"""JWS dispatch and heartbeat signatures: only a JWS from a configured kid, with that kid's
algorithm, over unaltered bytes passes; everything else is rejected (code bad_signature) with
a reason, before any other check, and changes nothing. The legacy `sig` passes only in the
legacy mode or behind `dispatch.accept_legacy_sig`. Heartbeats: signed, fresh and newer than
the last, or ignored and counted.

Tokens the tests forge (alg none, RS256, HS512, alg confusion) are built by hand, with base64
and hmac, not by the code under test."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.config import ConfigError, FailsafeConfig, SiteLimits, load_config
from controller.intake import DispatchIntake, HeartbeatGate
from controller.metrics import Metrics
from controller.target import TargetTracker
from controller.wire import Ack, Dispatch, DispatchRejected, Heartbeat, rfc3339
from controller.wire.dispatch import REJECT_CODES
from controller.wire.jws import MAX_TOKEN_BYTES, KeyRing, Signer, VerifyKey, is_compact
from controller.wire.signing import signed

LIMITS = SiteLimits(min_kw=1000.0, max_kw=14000.0, max_issued_age_s=30.0)
NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z
SECRET = b"0123456789abcdef-shared-secret"
NEW_SECRET = b"a-brand-new-secret-for-2025b"
LEGACY = b"legacy-hmac-key-0123456789"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_PUB_PEM = EC_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)

HS = Signer.hs256("desk-a", SECRET)
ES = Signer.es256("desk-es", EC_KEY)
RING = KeyRing({"desk-a": VerifyKey.hs256(SECRET), "desk-es": VerifyKey.es256(EC_KEY.public_key())})


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


def body(obj: dict[str, Any] | None = None) -> bytes:
    return json.dumps(msg() if obj is None else obj).encode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: bytes, key: bytes, digest: str = "sha256") -> bytes:
    """A JWS made by hand: HMAC with `digest` over the signing input, whatever alg says."""
    data = f"{b64url(json.dumps(header).encode())}.{b64url(payload)}"
    sig = hmac.new(key, data.encode(), digest).digest()
    return f"{data}.{b64url(sig)}".encode()


def decode(
    payload: bytes,
    keys: KeyRing | bytes | None = RING,
    *,
    last_seq: int | None = None,
    replay: bool = False,
) -> Dispatch:
    return Dispatch.decode(
        payload, now_unix=NOW, last_seq=last_seq, limits=LIMITS, replay=replay, hmac_key=keys
    )


def rejected(payload: bytes, keys: KeyRing | bytes | None = RING, **kw: Any) -> DispatchRejected:
    with pytest.raises(DispatchRejected) as info:
        decode(payload, keys, **kw)
    exc = info.value
    assert exc.code == "bad_signature", exc.reason
    assert exc.reason
    return exc


# --- dispatches ----------------------------------------------------------------------------


@pytest.mark.parametrize("signer", [HS, ES], ids=["HS256", "ES256"])
def test_a_jws_from_a_configured_kid_is_accepted(signer: Signer) -> None:
    token = signer.sign(body())
    assert is_compact(token) and token.count(b".") == 2
    d = decode(token)
    assert (d.id, d.seq, d.target_w, d.ramp_s) == ("d-1", 10, 5_000_000.0, 10.0)


def test_the_payload_is_taken_as_signed_whatever_its_json_printer() -> None:
    # Spaces, key order, 5000 vs 5000.0, escaped non-ASCII: all the signer's business.
    raw = (
        b'{ "target_kw" : 5000 , "mode":"setpoint", "seq": 10,\n "id": "Abil\\u00e8ne-1",'
        b' "issued_at": "2024-05-01T13:59:59+02:00", "ramp_s": 1e1 }'
    )
    d = decode(HS.sign(raw))
    assert (d.id, d.target_w, d.ramp_s, d.issued_at) == ("Abilène-1", 5e6, 10.0, NOW - 1.0)
    assert decode(b"\n " + ES.sign(raw) + b"\r\n").seq == 10  # surrounding whitespace


def test_rotation_two_kids_at_once_then_the_old_one_removed() -> None:
    old, new = Signer.hs256("2024", SECRET), Signer.hs256("2025", NEW_SECRET)
    both = KeyRing({"2024": VerifyKey.hs256(SECRET), "2025": VerifyKey.hs256(NEW_SECRET)})
    assert decode(old.sign(body(msg(seq=1))), both).seq == 1
    assert decode(new.sign(body(msg(seq=2))), both, last_seq=1).seq == 2
    only_new = KeyRing({"2025": VerifyKey.hs256(NEW_SECRET)})
    assert decode(new.sign(body(msg(seq=3))), only_new).seq == 3
    exc = rejected(old.sign(body(msg(seq=4))), only_new)
    assert "kid '2024' unknown" in exc.reason
    # A key under the wrong kid is a wrong key, not a rotation.
    swapped = Signer.hs256("2025", SECRET)
    assert "does not verify" in rejected(swapped.sign(body()), only_new).reason


def test_unknown_kid_rejected_naming_the_dispatch() -> None:
    exc = rejected(Signer.hs256("intruder", SECRET).sign(body()))
    assert "kid 'intruder' unknown" in exc.reason
    assert (exc.id, exc.seq) == ("d-1", 10)  # read, unverified, only for the ack


@pytest.mark.parametrize(
    ("header", "digest", "words"),
    [
        ({"alg": "none", "kid": "desk-a"}, None, "alg 'none' not accepted"),
        ({"alg": "RS256", "kid": "desk-a"}, "sha256", "alg 'RS256' not accepted"),
        ({"alg": "HS512", "kid": "desk-a"}, "sha512", "alg 'HS512' not accepted"),
        ({"alg": "ES384", "kid": "desk-es"}, "sha384", "alg 'ES384' not accepted"),
        ({"alg": "hs256", "kid": "desk-a"}, "sha256", "alg 'hs256' not accepted"),
        ({"alg": ["HS256"], "kid": "desk-a"}, "sha256", "not accepted"),
        ({"kid": "desk-a"}, "sha256", "no alg"),
        ({"alg": "HS256"}, "sha256", "no kid"),
        ({"alg": "HS256", "kid": ""}, "sha256", "no kid"),
        ({"alg": "HS256", "kid": 7}, "sha256", "no kid"),
        ({"alg": "HS256", "kid": "desk-a", "crit": ["exp"]}, "sha256", "crit"),
        ({"alg": "HS256", "kid": "desk-a", "b64": False}, "sha256", "b64"),
    ],
)
def test_headers_we_do_not_accept(header: dict[str, Any], digest: str | None, words: str) -> None:
    if digest is None:  # alg none: no signature at all
        token = f"{b64url(json.dumps(header).encode())}.{b64url(body())}.".encode()
    else:
        token = forged(header, body(), SECRET, digest)
    exc = rejected(token)
    assert words in exc.reason, exc.reason
    assert (exc.id, exc.seq) == ("d-1", 10)


def test_alg_confusion_hs256_keyed_with_the_public_key_is_refused() -> None:
    # The classic: an ES256 kid's public key (which anyone may hold) used as an HMAC secret.
    token = forged({"alg": "HS256", "kid": "desk-es"}, body(), EC_PUB_PEM)
    assert "kid 'desk-es' is an ES256 key" in rejected(token).reason
    # And the other way round: an HS256 kid never takes an ES256 signature.
    es_as_hs = Signer("desk-a", "ES256", ES.key).sign(body())
    assert "kid 'desk-a' is an HS256 key" in rejected(es_as_hs).reason


def test_tampered_payload_header_or_signature_rejected() -> None:
    head, payload, sig = HS.sign(body()).split(b".")
    other = b64url(body(msg(target_kw=9000.0))).encode()
    assert "does not verify" in rejected(b".".join((head, other, sig))).reason
    extra = b64url(json.dumps({"alg": "HS256", "kid": "desk-a", "typ": "JWT"}).encode())
    assert "does not verify" in rejected(b".".join((extra.encode(), payload, sig))).reason
    flipped = sig[:5] + (b"A" if sig[5:6] != b"A" else b"B") + sig[6:]
    assert "does not verify" in rejected(b".".join((head, payload, flipped))).reason
    es = ES.sign(body()).split(b".")
    assert "does not verify" in rejected(b".".join((es[0], other, es[2]))).reason
    short = b64url(base64.urlsafe_b64decode(es[2] + b"==")[:60]).encode()  # not 64 bytes
    assert "does not verify" in rejected(b".".join((es[0], es[1], short))).reason


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (b"!!!.e30.abc", "not signed"),  # not base64url: not a JWS
        (b"bm90IGpzb24.e30.abc", "header is not base64url JSON"),
        (b"W10.e30.abc", "header is not a JSON object"),  # []
        (b"a.b.c.d", "not signed"),  # four segments: not a JWS
        (b"eyJhbGciOiJIUzI1NiIsImtpZCI6ImRlc2stYSJ9.e30", "not signed"),  # two
        (b"eyJhbGciOiJIUzI1NiIsImtpZCI6ImRlc2stYSJ9.%%%.abc", "not signed"),
    ],
)
def test_malformed_jws_rejected(token: bytes, words: str) -> None:
    assert words in rejected(token).reason


def test_a_signed_payload_that_is_not_a_dispatch_is_judged_as_one() -> None:
    with pytest.raises(DispatchRejected) as info:
        decode(HS.sign(b"not json"))
    assert info.value.code == "not_json"
    with pytest.raises(DispatchRejected) as info:
        decode(HS.sign(body(msg(mode="max"))))
    assert info.value.code == "bad_mode"


def test_too_large_jws_rejected_before_any_work() -> None:
    token = HS.sign(b" " * MAX_TOKEN_BYTES)
    assert "too large" in rejected(token).reason


def test_signature_must_be_canonical_base64url() -> None:
    head, payload, sig = HS.sign(body()).split(b".")
    last = sig[-1:]  # 32 bytes: the last character carries 4 bits and 2 unused ones
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    i = alphabet.index(last)
    variant = sig[:-1] + alphabet[i ^ 1 : (i ^ 1) + 1]  # same bytes once decoded
    assert base64.urlsafe_b64decode(variant + b"=") == base64.urlsafe_b64decode(sig + b"=")
    assert "not base64url" in rejected(b".".join((head, payload, variant))).reason


def test_unsigned_json_rejected_when_keys_are_configured() -> None:
    exc = rejected(body())
    assert "not signed" in exc.reason and "JWS" in exc.reason
    assert (exc.id, exc.seq) == ("d-1", 10)
    # Checked before everything else: the answer is the signature, not the field.
    rejected(body(msg(target_kw="lots", issued_at="yesterday")))
    rejected(body(), last_seq=99)


def test_legacy_sig_only_behind_the_switch() -> None:
    legacy_body = json.dumps(signed(msg(), LEGACY)).encode()
    no_switch = KeyRing({"desk-a": VerifyKey.hs256(SECRET)})
    assert "not signed" in rejected(legacy_body, no_switch).reason
    switch = KeyRing({"desk-a": VerifyKey.hs256(SECRET)}, legacy_key=LEGACY, accept_legacy=True)
    assert decode(legacy_body, switch).seq == 10
    assert decode(HS.sign(body()), switch).seq == 10  # JWS still accepted beside it
    wrong = json.dumps(signed(msg(), SECRET)).encode()
    assert "does not match" in rejected(wrong, switch).reason
    exc = rejected(body(), switch)  # neither
    assert "sig missing and not a JWS" in exc.reason
    # The legacy mode (hmac_key_file alone) is as before: sig required, no JWS.
    legacy_only = KeyRing.legacy(LEGACY)
    assert decode(legacy_body, legacy_only).seq == 10
    assert decode(legacy_body, LEGACY).seq == 10  # a bare key means the same
    assert "no dispatch.keys" in rejected(HS.sign(body()), legacy_only).reason


def test_without_keys_a_jws_is_refused_not_trusted() -> None:
    exc = rejected(HS.sign(body()), None)
    assert "no dispatch.keys" in exc.reason
    assert (exc.id, exc.seq) == ("d-1", 10)
    assert decode(body(), None).seq == 10  # unsigned JSON as before


def test_replay_and_freshness_still_apply_to_signed_dispatches() -> None:
    token = ES.sign(body())
    assert decode(token).seq == 10
    with pytest.raises(DispatchRejected) as info:
        decode(token, last_seq=10)
    assert info.value.code == "replay"
    with pytest.raises(DispatchRejected) as info:
        decode(HS.sign(body(msg(issued_at=rfc3339(NOW - 3600)))))
    assert info.value.code == "stale"


def test_journal_replay_verifies_again_with_the_current_keys() -> None:
    token = HS.sign(body(msg(issued_at=rfc3339(NOW - 3600))))
    assert decode(token, replay=True).seq == 10
    rotated = KeyRing({"desk-es": VerifyKey.es256(EC_KEY.public_key())})
    assert "unknown" in rejected(token, rotated, replay=True).reason


def test_key_ring_keeps_its_secrets_out_of_repr() -> None:
    text = repr(RING) + repr(HS) + repr(KeyRing.legacy(LEGACY))
    assert "desk-a" in text and SECRET.decode() not in text and LEGACY.decode() not in text


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_arbitrary_payload_never_raises_other(data: bytes) -> None:
    for keys in (RING, None):
        try:
            decode(data, keys)
        except DispatchRejected as exc:
            assert exc.code in REJECT_CODES


@settings(max_examples=300, deadline=None)
@given(index=st.integers(min_value=0), char=st.sampled_from(b"AQgw_-.Z09="))
def test_any_one_character_changed_is_rejected(index: int, char: int) -> None:
    token = bytearray((HS if index % 2 else ES).sign(body()))
    i = index % len(token)
    if token[i] == char:
        return
    token[i] = char
    with pytest.raises(DispatchRejected) as info:
        decode(bytes(token))
    assert info.value.code in REJECT_CODES


# --- heartbeats ----------------------------------------------------------------------------


def beat(at: float, signer: Signer | None = HS, sender: str = "desk") -> bytes:
    raw = Heartbeat(sender, at).encode()
    return raw if signer is None else signer.sign(raw)


def gate(keys: KeyRing | None = RING) -> tuple[HeartbeatGate, Metrics]:
    metrics = Metrics("test")
    return HeartbeatGate(keys, LIMITS, metrics), metrics


def ignored(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("rampd_heartbeats_rejected_total") or 0.0


def test_heartbeats_from_configured_kids_count_others_are_ignored_and_counted() -> None:
    g, metrics = gate()
    assert g.accept(beat(NOW - 1.0), NOW)
    assert g.accept(beat(NOW - 0.5, ES), NOW)  # each kid its own sequence
    assert not g.accept(beat(NOW, None), NOW)  # unsigned
    assert not g.accept(b"anything", NOW)
    assert not g.accept(beat(NOW, Signer.hs256("intruder", SECRET)), NOW)
    assert not g.accept(beat(NOW, Signer.hs256("desk-a", NEW_SECRET)), NOW)  # wrong key
    assert not g.accept(forged({"alg": "none", "kid": "desk-a"}, beat(NOW, None), b""), NOW)
    assert ignored(metrics) == 5.0


def test_a_recorded_heartbeat_replayed_does_not_count() -> None:
    g, metrics = gate()
    first = beat(NOW - 2.0)
    assert g.accept(first, NOW - 1.0)
    assert not g.accept(first, NOW)  # the same one again: not after the last
    assert not g.accept(beat(NOW - 3.0), NOW)  # an older one
    assert g.accept(beat(NOW - 1.0), NOW)  # the next real one
    # Once older than max_issued_age_s it is stale anyway, even to a fresh gate.
    g2, _ = gate()
    assert not g2.accept(first, NOW + LIMITS.max_issued_age_s)
    assert not g2.accept(beat(NOW + 60.0), NOW)  # from the future
    assert not g2.accept(HS.sign(b'{"from": "desk"}'), NOW)  # no at
    assert not g2.accept(HS.sign(b"[1]"), NOW)
    assert ignored(metrics) == 2.0


def test_without_jws_keys_any_heartbeat_counts_as_before() -> None:
    for keys in (None, KeyRing.legacy(LEGACY)):
        g, metrics = gate(keys)
        assert g.accept(b"", NOW) and g.accept(beat(NOW, None), NOW) and g.accept(beat(NOW), NOW)
        assert ignored(metrics) == 0.0


def test_under_the_legacy_switch_unsigned_heartbeats_count_but_a_bad_jws_does_not() -> None:
    ring = KeyRing({"desk-a": VerifyKey.hs256(SECRET)}, legacy_key=LEGACY, accept_legacy=True)
    g, metrics = gate(ring)
    assert g.accept(beat(NOW, None), NOW)  # a legacy dispatcher's heartbeat
    assert g.accept(beat(NOW), NOW)
    assert not g.accept(beat(NOW + 1.0, Signer.hs256("intruder", SECRET)), NOW)
    assert ignored(metrics) == 1.0


def test_ignored_heartbeats_are_logged_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rampd")
    g, metrics = gate()
    for _ in range(20):
        g.accept(b"unsigned", NOW)
    lines = [r.getMessage() for r in caplog.records if "heartbeat ignored" in r.getMessage()]
    assert len(lines) == 1 and "not signed" not in lines[0], lines
    assert "not a JWS" in lines[0], lines
    assert ignored(metrics) == 20.0


def test_signed_heartbeat_decodes_to_the_same_model() -> None:
    hb, kid = Heartbeat.verify(beat(NOW - 1.0, ES), RING, now_unix=NOW, max_age_s=30.0)
    assert (hb.sender, hb.at, kid) == ("desk", NOW - 1.0, "desk-es")


# --- the intake: acks, and nothing moves -------------------------------------------------


def test_intake_acks_a_forged_dispatch_and_moves_nothing() -> None:
    limits = SiteLimits(min_kw=0.0, max_kw=14000.0)
    tracker = TargetTracker(limits, FailsafeConfig(), initial_w=14e6)
    acks: list[Ack] = []
    intake = DispatchIntake(
        tracker=tracker,
        limits=limits,
        hmac_key=RING,
        journal=None,
        metrics=Metrics("test"),
        publish_ack=lambda b: acks.append(Ack.decode(b)),
        on_accepted=lambda d, t: None,
    )
    now = rfc3339(time.time())
    intake.on_dispatch(Signer.hs256("intruder", SECRET).sign(body(msg(issued_at=now))))
    intake.on_dispatch(body(msg(seq=11, issued_at=now)))
    assert [(a.seq, a.accepted) for a in acks] == [(10, False), (11, False)]
    assert tracker.last_seq is None
    intake.on_dispatch(ES.sign(body(msg(seq=12, issued_at=now))))
    assert (acks[-1].seq, acks[-1].accepted) == (12, True) and tracker.last_seq == 12


# --- the config --------------------------------------------------------------------------

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


def site(tmp_path: Path, dispatch: str) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(SITE + "\n[dispatch]\n" + dispatch + "\n")
    return p


def test_config_keys_table_builds_the_ring(tmp_path: Path) -> None:
    (tmp_path / "a.key").write_bytes(SECRET + b"\n")
    (tmp_path / "es.pem").write_bytes(EC_PUB_PEM)
    cfg = load_config(
        site(tmp_path, f'keys = {{ "desk-a" = "{tmp_path}/a.key", desk-es = "{tmp_path}/es.pem" }}')
    )
    ring = cfg.dispatch_key
    assert ring is not None
    assert ring.kids == ("desk-a", "desk-es") and not ring.legacy_accepted
    assert (ring.alg("desk-a"), ring.alg("desk-es")) == ("HS256", "ES256")
    assert decode(HS.sign(body()), ring).seq == 10 and decode(ES.sign(body()), ring).seq == 10
    assert SECRET.decode() not in repr(cfg)


def test_config_legacy_switch_and_migration(tmp_path: Path) -> None:
    (tmp_path / "a.key").write_bytes(SECRET)
    (tmp_path / "legacy.key").write_bytes(LEGACY)
    keys = f'keys = {{ desk-a = "{tmp_path}/a.key" }}'
    legacy = f'hmac_key_file = "{tmp_path}/legacy.key"'
    ring = load_config(site(tmp_path, f"{keys}\n{legacy}\naccept_legacy_sig = true")).dispatch_key
    assert ring is not None and ring.legacy_accepted and ring.kids == ("desk-a",)
    for bad, words in [
        (f"{keys}\n{legacy}", "remove it, or set accept_legacy_sig"),
        (f"{keys}\naccept_legacy_sig = true", "accept_legacy_sig needs both"),
        (f"{legacy}\naccept_legacy_sig = true", "accept_legacy_sig needs both"),
        (f'keys = {{ "bad kid" = "{tmp_path}/a.key" }}', "kid 'bad kid'"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(site(tmp_path, bad))
        assert words in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "not found"),
        (b"short-key\n", "too short"),
        (b"", "empty"),
        (
            EC_KEY.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "holds a private key",
        ),
        (
            ec.generate_private_key(ec.SECP384R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "P-256",
        ),
        (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "not an EC public key",
        ),
        (b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
    ],
)
def test_config_key_file_errors_name_the_kid(
    tmp_path: Path, content: bytes | None, words: str
) -> None:
    kf = tmp_path / "k"
    if content is not None:
        kf.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(site(tmp_path, f'keys = {{ desk-a = "{kf}" }}'))
    text = str(info.value)
    assert "dispatch.keys.desk-a" in text and str(kf) in text and words in text, text
