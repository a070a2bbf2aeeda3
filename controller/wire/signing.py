"""The legacy dispatch signature: HMAC-SHA256 over canonical JSON (README "Dispatch protocol").

Superseded by JWS over the raw bytes (`jws.py`); accepted for one more release
(`dispatch.hmac_key_file` alone, or with `dispatch.accept_legacy_sig`).

The signed bytes are the object without `sig`, serialised with sorted keys, no spaces and
non-ASCII as raw UTF-8. Dispatchers in other languages reproduce exactly these bytes, so this
format is a contract: changing it breaks every signed dispatcher and every journalled dispatch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any, Final

SIG_FIELD: Final = "sig"
_SIG_HEX: Final = re.compile(r"[0-9a-fA-F]{64}")


class SignatureError(ValueError):
    """A missing, malformed or wrong signature; the message is fit for an ack."""


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """What a dispatch signature covers: the object without `sig`, as canonical JSON.

    Raises ValueError (or a subclass) when the object cannot be encoded, e.g. a lone surrogate.
    """
    body = {k: v for k, v in obj.items() if k != SIG_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode()


def sign(obj: Mapping[str, Any], key: bytes) -> str:
    """The lowercase hex HMAC-SHA256 a dispatcher puts in `sig`."""
    return hmac.new(key, canonical_bytes(obj), hashlib.sha256).hexdigest()


def signed(obj: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """A copy of `obj` (any `sig` in it replaced) carrying its signature."""
    body = {k: v for k, v in obj.items() if k != SIG_FIELD}
    return {**body, SIG_FIELD: sign(body, key)}


def verify(obj: Mapping[str, Any], key: bytes) -> None:
    """Check `obj[sig]` against `key`; SignatureError when it is missing, malformed or wrong.

    Upper- or lowercase hex both pass; the comparison takes constant time.
    """
    sig = obj.get(SIG_FIELD)
    if sig is None:
        raise SignatureError("sig missing (dispatch must be signed)")
    if not isinstance(sig, str) or not _SIG_HEX.fullmatch(sig):
        raise SignatureError("sig must be 64 hex characters (HMAC-SHA256)")
    try:
        expected = hmac.new(key, canonical_bytes(obj), hashlib.sha256).digest()
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise SignatureError("payload cannot be canonicalised for sig") from None
    if not hmac.compare_digest(expected, bytes.fromhex(sig)):
        raise SignatureError("sig does not match (wrong key or altered payload)")
