"""Signatures over the raw bytes: JWS compact serialization (RFC 7515), HS256 and ES256 only.

A signed message is `BASE64URL(header).BASE64URL(payload).BASE64URL(signature)` in ASCII. The
payload is the message's JSON exactly as the dispatcher signed it: nothing is re-serialised, so
any language's JSON printer (or `printf`) will do, unlike the legacy `sig` (`signing.py`).

The header must carry `alg` and `kid`. Each configured kid has one key, and the key's type fixes
its algorithm (a shared secret: HS256; an EC P-256 public key: ES256), so a message can neither
pick `none` nor turn a public key into an HMAC secret. Two kids at once is a key rotation.
Pure, no I/O: `controller.config` reads the key files.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import ECKey, OctKey

from controller.wire import signing
from controller.wire.codec import MAX_PAYLOAD_BYTES
from controller.wire.signing import SignatureError

Alg = Literal["HS256", "ES256"]
ALGS: Final[tuple[Alg, ...]] = ("HS256", "ES256")
MIN_SECRET_BYTES: Final = 16
"""An HS256 secret's minimum length, as for the legacy key file."""
KID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
"""What a configured kid may look like: safe to echo in acks and logs."""
# base64url without padding, three segments. The payload may be empty (RFC 7515), and so may
# the signature, so that `alg: none` is refused as such rather than as noise.
_COMPACT: Final = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
MAX_TOKEN_BYTES: Final = (MAX_PAYLOAD_BYTES * 4 + 2) // 3 + 4096
"""A JWS whose payload can be at most MAX_PAYLOAD_BYTES, with room for the other segments."""


def is_compact(payload: bytes) -> bool:
    """Shaped like a JWS compact serialization (a JSON object never is)."""
    return _COMPACT.fullmatch(payload.strip()) is not None


def _b64decode(segment: bytes) -> bytes:
    # urlsafe_b64decode wants the padding JWS leaves out; validate=True refuses stray bytes.
    padded = segment + b"=" * (-len(segment) % 4)
    return base64.b64decode(padded, altchars=b"-_", validate=True)


def _show(value: object) -> str:
    """An attacker's header value, bounded for an ack or a log line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One kid's key and the algorithm it allows."""

    alg: Alg
    key: OctKey | ECKey = field(repr=False)

    @classmethod
    def hs256(cls, secret: bytes) -> VerifyKey:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"HS256 secret too short ({len(secret)} < {MIN_SECRET_BYTES} bytes)")
        return cls("HS256", OctKey.import_key(secret))

    @classmethod
    def es256(cls, public_key: ec.EllipticCurvePublicKey) -> VerifyKey:
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("ES256 needs an EC public key")
        if public_key.curve.name != "secp256r1":
            raise ValueError(f"ES256 needs curve P-256 (prime256v1), not {public_key.curve.name}")
        return cls("ES256", ECKey.import_key(public_key))


@dataclass(frozen=True, slots=True)
class Verified:
    kid: str
    alg: Alg
    payload: bytes
    """The signed bytes, as the signer gave them."""


@dataclass(frozen=True, slots=True)
class Opened:
    """A dispatch payload after its signature was looked at (`KeyRing.open`).

    `payload` is the JSON to decode: a JWS's payload, or the message as received. With
    `error` set the message is not authentic and `payload` (unverified) serves only to name
    the dispatch in its ack. With `legacy_key`, the decoded object's `sig` must verify.
    """

    payload: bytes
    kid: str | None = None
    error: str | None = None
    legacy_key: bytes | None = field(default=None, repr=False)
    jws_too: bool = False
    """A JWS would have done as well (said when the legacy `sig` is missing)."""

    def check(self, obj: Mapping[str, Any]) -> None:
        """SignatureError (fit for an ack) unless the message is authentic."""
        if self.error is not None:
            raise SignatureError(self.error)
        if self.legacy_key is None:
            return
        if self.jws_too and signing.SIG_FIELD not in obj:
            raise SignatureError("not signed: sig missing and not a JWS (dispatch must be signed)")
        signing.verify(obj, self.legacy_key)


class KeyRing:
    """The keys a site accepts signatures from: JWS keys by kid, and the legacy HMAC key.

    `legacy_key` alone (no kids) is the legacy mode: every dispatch carries `sig`. With kids,
    every dispatch and heartbeat must be a JWS from one of them, unless `accept_legacy`
    (for one release) also lets legacy `sig` dispatches, and unsigned heartbeats, through.
    """

    __slots__ = ("_keys", "legacy_accepted", "legacy_key")

    def __init__(
        self,
        keys: Mapping[str, VerifyKey] | None = None,
        *,
        legacy_key: bytes | None = None,
        accept_legacy: bool = False,
    ) -> None:
        self._keys = dict(keys or {})
        for kid in self._keys:
            if not KID.fullmatch(kid):
                raise ValueError(f"kid {kid!r}: use 1-64 of letters, digits and . _ : -")
        if accept_legacy and legacy_key is None:
            raise ValueError("accept_legacy needs the legacy key")
        self.legacy_key = legacy_key
        self.legacy_accepted = legacy_key is not None and (accept_legacy or not self._keys)
        """Legacy `sig` dispatches pass (when their sig verifies)."""

    @classmethod
    def legacy(cls, key: bytes) -> KeyRing:
        """The legacy mode: `sig` with this key, no JWS."""
        return cls(legacy_key=key)

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    def alg(self, kid: str) -> Alg | None:
        key = self._keys.get(kid)
        return None if key is None else key.alg

    def __repr__(self) -> str:  # never the secrets
        legacy = "on" if self.legacy_accepted else "off"
        return f"KeyRing(kids={list(self.kids)}, legacy={legacy})"

    def verify(self, token: bytes) -> Verified:
        """The payload of a JWS from one of the ring's kids; SignatureError (its message fit
        for an ack) when it is malformed, names an alg or kid we do not accept, or does not
        verify."""
        token = token.strip()
        if len(token) > MAX_TOKEN_BYTES:
            raise SignatureError(f"JWS too large ({len(token)} > {MAX_TOKEN_BYTES} bytes)")
        if not _COMPACT.fullmatch(token):
            raise SignatureError("not a JWS compact serialization (header.payload.signature)")
        try:
            header = json.loads(_b64decode(token.split(b".", 1)[0]))
        except (ValueError, binascii.Error, RecursionError):
            raise SignatureError("JWS header is not base64url JSON") from None
        if not isinstance(header, dict):
            raise SignatureError("JWS header is not a JSON object")
        alg, kid = header.get("alg"), header.get("kid")
        if alg is None:
            raise SignatureError("JWS header has no alg")
        if alg not in ALGS:
            raise SignatureError(f"JWS alg {_show(alg)} not accepted (HS256 or ES256 only)")
        if not isinstance(kid, str) or not kid:
            raise SignatureError("JWS header has no kid")
        key = self._keys.get(kid)
        if key is None:
            raise SignatureError(f"JWS kid {_show(kid)} unknown (not in dispatch.keys)")
        if key.alg != alg:
            raise SignatureError(f"JWS alg {alg} but kid {kid!r} is an {key.alg} key")
        # Extensions would change what is signed (b64: RFC 7797) or must be understood (crit).
        if "crit" in header or "b64" in header:
            raise SignatureError("JWS crit and b64 headers not supported")
        # One encoding per signature: a variant in the unused low bits of the last character
        # would otherwise verify too (harmless, but a message then has two accepted forms).
        sig = token.rsplit(b".", 1)[1]
        try:
            canonical = base64.urlsafe_b64encode(_b64decode(sig)).rstrip(b"=") == sig
        except (ValueError, binascii.Error):
            canonical = False
        if not canonical:
            raise SignatureError("JWS signature is not base64url")
        try:
            obj = jws.deserialize_compact(token, key.key, algorithms=[key.alg])
        except BadSignatureError:
            raise SignatureError(
                f"JWS signature does not verify with kid {kid!r} (wrong key or altered)"
            ) from None
        except (JoseError, ValueError, TypeError) as exc:
            raise SignatureError(f"malformed JWS ({type(exc).__name__})") from None
        return Verified(kid, key.alg, bytes(obj.payload))

    def open(self, payload: bytes) -> Opened:
        """What to decode of a dispatch payload, and whether it is authentic (see `Opened`)."""
        if is_compact(payload):
            if not self._keys:
                return Opened(_peek(payload), error="JWS received but no dispatch.keys configured")
            try:
                v = self.verify(payload)
            except SignatureError as exc:
                return Opened(_peek(payload), error=str(exc))
            return Opened(v.payload, kid=v.kid)
        if self.legacy_accepted:
            return Opened(payload, legacy_key=self.legacy_key, jws_too=bool(self._keys))
        return Opened(payload, error="not signed: dispatch.keys require a JWS (header.payload.sig)")


def _peek(token: bytes) -> bytes:
    """A JWS's payload unverified (to name a rejected dispatch in its ack), or b""."""
    parts = token.strip().split(b".")
    if len(parts) != 3 or len(parts[1]) > MAX_TOKEN_BYTES:
        return b""
    try:
        return _b64decode(parts[1])
    except (ValueError, binascii.Error):
        return b""


def unverified_payload(token: bytes) -> bytes:
    """A JWS's payload as sent, NOT verified (b"" when unreadable): only ever to name the
    message (a dispatch refused before its signature is checked, in its ack)."""
    return _peek(token)


def open_signed(payload: bytes, keys: bytes | KeyRing | None) -> Opened:
    """`KeyRing.open` for what `Dispatch.decode` is given: a ring, a legacy key (bytes) or
    nothing (unsigned site: a JWS is refused, since nothing here could verify it)."""
    if isinstance(keys, bytes):
        keys = KeyRing.legacy(keys)
    if keys is None:
        if is_compact(payload):
            return Opened(_peek(payload), error="JWS received but no dispatch.keys configured")
        return Opened(payload)
    return keys.open(payload)


@dataclass(frozen=True, slots=True)
class Signer:
    """A dispatcher's signing key: `sign(json_bytes)` is the JWS to publish."""

    kid: str
    alg: Alg
    key: OctKey | ECKey = field(repr=False)

    @classmethod
    def hs256(cls, kid: str, secret: bytes) -> Signer:
        """The shared secret: the bytes of the site's key file for this kid."""
        return cls(kid, "HS256", VerifyKey.hs256(secret).key)

    @classmethod
    def es256(cls, kid: str, private_key: ec.EllipticCurvePrivateKey | bytes) -> Signer:
        """An EC P-256 private key (or its PEM); the site holds the public half."""
        if isinstance(private_key, bytes):
            loaded = load_pem_private_key(private_key, password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError("ES256 needs an EC private key")
            private_key = loaded
        VerifyKey.es256(private_key.public_key())  # the curve check
        return cls(kid, "ES256", ECKey.import_key(private_key))

    def sign(self, payload: bytes) -> bytes:
        header = {"alg": self.alg, "kid": self.kid}
        return jws.serialize_compact(header, payload, self.key, algorithms=[self.alg]).encode()
