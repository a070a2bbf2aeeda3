"""The Whatsminer API v2 privileged-command cryptography, shared by driver and simulator.

A privileged command needs a token from `get_token` (`time`, `salt`, `newsalt`) and the admin
password: the password's md5-crypt hash under `salt` (its 22-character digest part) keys
AES-256-ECB (the key is SHA-256 of that digest's text), and the md5-crypt of digest + `time`
under `newsalt` (again the digest part) is the token sign that goes inside the command as
`"token"`. The command travels as `{"enc": 1, "data": base64(AES(json, NUL-padded to 16))}`;
the reply comes back as `{"enc": base64(AES(json))}`. This is what pyasic 0.79 sends
(`rpc/btminer.py`); the implementation here is our own.

md5-crypt ("$1$", Poul-Henning Kamp's FreeBSD scheme) is written out below rather than taken
from passlib: passlib is unmaintained, and the scheme is thirty lines. `salt` is fixed per
miner, so the key derivation is cached; a token refresh costs one md5-crypt (~1 ms).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
MAGIC = "$1$"


class CryptoError(ValueError):
    """Ciphertext that does not decrypt to a JSON object (wrong key, not base64, garbage)."""


def _to64(v: int, n: int) -> str:
    out = []
    for _ in range(n):
        out.append(_ITOA64[v & 0x3F])
        v >>= 6
    return "".join(out)


def md5_crypt(password: str, salt: str) -> str:
    """`$1$<salt>$<22 characters>`, as crypt(3) computes it (salt cut to 8 characters)."""
    pw = password.encode()
    s = salt.encode()[:8]
    alt = hashlib.md5(pw + s + pw).digest()
    ctx = bytearray(pw + MAGIC.encode() + s)
    n = len(pw)
    while n > 0:
        ctx += alt[: min(16, n)]
        n -= 16
    i = len(pw)
    while i:
        ctx += b"\x00" if i & 1 else pw[:1]
        i >>= 1
    final = hashlib.md5(ctx).digest()
    for i in range(1000):
        odd = i & 1
        data = pw if odd else final
        if i % 3:
            data += s
        if i % 7:
            data += pw
        data += final if odd else pw
        final = hashlib.md5(data).digest()
    f = final
    digest = (
        _to64((f[0] << 16) | (f[6] << 8) | f[12], 4)
        + _to64((f[1] << 16) | (f[7] << 8) | f[13], 4)
        + _to64((f[2] << 16) | (f[8] << 8) | f[14], 4)
        + _to64((f[3] << 16) | (f[9] << 8) | f[15], 4)
        + _to64((f[4] << 16) | (f[10] << 8) | f[5], 4)
        + _to64(f[11], 2)
    )
    return f"{MAGIC}{s.decode()}${digest}"


def _digest(crypted: str) -> str:
    """The part after the third '$' (what the firmware and pyasic use)."""
    return crypted.split("$")[3]


@lru_cache(maxsize=4096)
def password_digest(password: str, salt: str) -> str:
    """md5-crypt digest of the admin password under the miner's salt (fixed per miner)."""
    return _digest(md5_crypt(password, salt))


@lru_cache(maxsize=4096)
def aes_key(password: str, salt: str) -> bytes:
    """The AES-256 key of a miner: SHA-256 of the password digest's text."""
    return hashlib.sha256(password_digest(password, salt).encode()).digest()


def token_sign(password: str, salt: str, time_s: str, newsalt: str) -> str:
    """The sign of one token (`get_token`'s time and newsalt): goes into a command as "token"."""
    return _digest(md5_crypt(password_digest(password, salt) + time_s, newsalt))


@dataclass(frozen=True, slots=True)
class Token:
    """What a client holds after `get_token`: the command's sign and the AES key."""

    sign: str
    key: bytes

    @classmethod
    def derive(cls, password: str, salt: str, time_s: str, newsalt: str) -> Token:
        return cls(token_sign(password, salt, time_s, newsalt), aes_key(password, salt))


def _cipher(key: bytes) -> Cipher[modes.ECB]:
    return Cipher(algorithms.AES(key), modes.ECB())


def encrypt(key: bytes, obj: dict[str, Any]) -> str:
    """JSON of `obj`, NUL-padded to the AES block, encrypted, base64 without newlines."""
    plain = json.dumps(obj, separators=(",", ":")).encode()
    plain += b"\x00" * (-len(plain) % 16)
    enc = _cipher(key).encryptor()
    return base64.b64encode(enc.update(plain) + enc.finalize()).decode("ascii")


def decrypt(key: bytes, data: str) -> dict[str, Any]:
    """The JSON object inside `data` (base64 of AES-ECB ciphertext); CryptoError otherwise."""
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise CryptoError(f"not base64: {exc}") from None
    if not raw or len(raw) % 16:
        raise CryptoError(f"ciphertext of {len(raw)} bytes is not whole AES blocks")
    dec = _cipher(key).decryptor()
    plain = (dec.update(raw) + dec.finalize()).rstrip(b"\x00")
    try:
        obj = json.loads(plain.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CryptoError("does not decrypt to JSON (wrong password?)") from None
    if not isinstance(obj, dict):
        raise CryptoError("does not decrypt to a JSON object")
    return obj


__all__ = [
    "CryptoError",
    "Token",
    "aes_key",
    "decrypt",
    "encrypt",
    "md5_crypt",
    "password_digest",
    "token_sign",
]
