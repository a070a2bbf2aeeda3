"""Framing of the cgminer-style JSON API: one request per TCP connection, one JSON object each
way, no length prefix. A reply usually ends with a NUL byte (the cgminer convention), some
firmware omit it; clients do not half-close, so either side may have to find the end of the
object itself (`object_end`).
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable
from typing import Any, Final

from drivers.base import ProtocolError

Json = dict[str, Any]

MAX_MESSAGE_BYTES: Final = 1 << 20
"""A reply (or request) larger than this is garbage, not a miner talking."""

_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


def encode_request(command: str, *params: str | int | float) -> bytes:
    """`{"command": ..., "parameter": "a,b"}` as sent on the wire (no terminator): what
    `json.dumps` writes, built from escaped strings (every exchange of a fleet pays for it)."""
    if not params:
        return f'{{"command": {_quote(command)}}}'.encode()
    joined = ",".join(str(p) for p in params)
    return f'{{"command": {_quote(command)}, "parameter": {_quote(joined)}}}'.encode()


def object_end(buf: bytes | bytearray) -> int | None:
    """Index just past the first complete top-level JSON object in `buf`; None if incomplete.

    Lets either side stop reading at the end of a message without a terminator (clients do not
    half-close; some miners omit the NUL). Raises ProtocolError when `buf` does not start
    (after whitespace) with '{'.
    """
    depth = 0
    in_str = esc = False
    started = False
    for i, b in enumerate(buf):
        if not started:
            if b in b" \t\r\n":
                continue
            if b != 0x7B:  # '{'
                raise ProtocolError(f"not a JSON object (starts with {bytes([b])!r})")
            started = True
            depth = 1
            continue
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:  # backslash
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b == 0x7B or b == 0x5B:
            depth += 1
        elif b == 0x7D or b == 0x5D:
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def loads(data: bytes | bytearray) -> Any:
    """The JSON value of one message (a trailing NUL and whitespace around it ignored);
    ProtocolError for anything else, whatever the input."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"not UTF-8: {exc.reason}") from None
    # cgminer-style APIs terminate with NUL; tolerate whitespace around it.
    text = text.strip().rstrip("\x00").strip()
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"not JSON: {str(exc)[:80]}") from None


def decode_object(data: bytes | bytearray, what: str = "message") -> Json:
    """One message that must be a JSON object (`what` names it in the error)."""
    obj = loads(data)
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return obj


__all__ = [
    "MAX_MESSAGE_BYTES",
    "Json",
    "decode_object",
    "encode_request",
    "loads",
    "object_end",
]
