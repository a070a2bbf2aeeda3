"""The `data` field's JWS (RFC 7515, compact): the keys the agent trusts (`kid` -> public key,
provisioned out of band), verification, and the agent's own signing key.

DSX Flex allows ES256 (EC P-256) and RS256 (RSA). A key's type fixes its algorithm: the
header's `alg` must be that one, so a token can never pick a weaker or different check for a
configured key.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import ECKey, RSAKey

Alg = Literal["ES256", "RS256"]
ALGS: Final[tuple[Alg, ...]] = ("ES256", "RS256")
MIN_RSA_BITS: Final = 2048
MAX_KEY_FILE_BYTES: Final = 64 * 1024


class SignatureError(ValueError):
    """A JWS the agent cannot accept; `reason` says why, for the log and the journal."""


@dataclass(frozen=True, slots=True)
class PublicKey:
    kid: str
    alg: Alg
    key: ECKey | RSAKey


@dataclass(frozen=True, slots=True)
class Signer:
    kid: str
    alg: Alg
    key: ECKey | RSAKey

    def sign(self, payload: bytes) -> str:
        """The compact JWS of `payload` (header `alg`, `kid`)."""
        return jws.serialize_compact({"alg": self.alg, "kid": self.kid}, payload, self.key)


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path}: larger than a key file ({MAX_KEY_FILE_BYTES} bytes)")
    return data


def _parse(data: bytes, *, private: bool) -> ECKey | RSAKey:
    if data.lstrip().startswith(b"{"):
        jwk = json.loads(data)
        if not isinstance(jwk, dict):
            raise ValueError("not a JWK object")
        kty = jwk.get("kty")
        if kty == "EC":
            return ECKey.import_key(jwk)
        if kty == "RSA":
            return RSAKey.import_key(jwk)
        raise ValueError(f"JWK kty {kty!r} is neither EC nor RSA")
    if private:
        pub = serialization.load_pem_private_key(data, password=None).public_key()
    else:
        pub = serialization.load_pem_public_key(data)
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return ECKey.import_key(data)
    if isinstance(pub, rsa.RSAPublicKey):
        return RSAKey.import_key(data)
    raise ValueError(f"a {type(pub).__name__}: only EC P-256 or RSA keys are used")


def _import(data: bytes, path: Path, *, private: bool) -> ECKey | RSAKey:
    """A PEM (SubjectPublicKeyInfo / PKCS#8 or traditional) or a JWK as JSON."""
    try:
        with warnings.catch_warnings():
            # joserfc warns of small RSA keys; `_alg` refuses them, naming the file.
            warnings.simplefilter("ignore", SecurityWarning)
            key = _parse(data, private=private)
    except (ValueError, TypeError, JoseError) as exc:
        what = "private" if private else "public"
        raise ValueError(f"{path}: not a {what} key (PEM or JWK): {exc}") from None
    if key.is_private != private:
        raise ValueError(f"{path}: a {'public' if private else 'private'} key; expected the other")
    return key


def _alg(key: ECKey | RSAKey, path: Path) -> Alg:
    if isinstance(key, ECKey):
        if key.curve_name != "P-256":
            raise ValueError(f"{path}: EC curve {key.curve_name}; ES256 needs P-256")
        return "ES256"
    bits = key.raw_value.key_size
    if bits < MIN_RSA_BITS:
        raise ValueError(f"{path}: RSA key of {bits} bits; RS256 needs at least {MIN_RSA_BITS}")
    return "RS256"


def load_public_key(kid: str, path: Path) -> PublicKey:
    """ValueError naming the file and the problem."""
    key = _import(_read(path), path, private=False)
    return PublicKey(kid, _alg(key, path), key)


def load_signer(kid: str, path: Path) -> Signer:
    key = _import(_read(path), path, private=True)
    return Signer(kid, _alg(key, path), key)


class Verifier:
    """Verifies compact JWS strings against the trusted keys."""

    def __init__(self, keys: Mapping[str, PublicKey]) -> None:
        self._keys = dict(keys)

    def verify(self, token: str) -> tuple[str, bytes]:
        """(kid, payload) of a valid token; SignatureError otherwise."""
        try:
            unverified = jws.extract_compact(token.encode("ascii"))
        except (JoseError, ValueError, UnicodeEncodeError) as exc:
            raise SignatureError(f"not a compact JWS: {exc}") from None
        header = unverified.headers()
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGS:
            raise SignatureError(f"JWS alg {alg!r} not allowed (ES256 or RS256)")
        if not isinstance(kid, str):
            raise SignatureError("JWS header has no kid")
        key = self._keys.get(kid)
        if key is None:
            raise SignatureError(f"JWS kid {kid!r} is not a configured key")
        if alg != key.alg:
            raise SignatureError(f"JWS alg {alg} does not match key {kid} ({key.alg})")
        try:
            verified = jws.deserialize_compact(token, key.key, algorithms=[key.alg])
        except (JoseError, ValueError) as exc:
            raise SignatureError(f"JWS signature does not verify with key {kid}: {exc}") from None
        return kid, verified.payload
