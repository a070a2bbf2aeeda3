"""JSON objects in and out, and the field readers every decoder shares. Pure, no I/O.

A decoder raises `WireError` (a ValueError) with a short reason and a code from a fixed set,
never anything else, whatever bytes arrive.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from typing import Any, Final

from controller.wire.timestamps import parse_rfc3339

MAX_PAYLOAD_BYTES: Final = 64 * 1024


class WireError(ValueError):
    """A message that does not say what the protocol says. `code` fits a metrics label."""

    def __init__(self, reason: str, *, code: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN/Infinity by default; they are not JSON and never a valid value.
    raise ValueError(f"non-finite number {name}")


def decode_object(payload: bytes) -> dict[str, Any]:
    """UTF-8 JSON object, at most MAX_PAYLOAD_BYTES; codes too_large, not_utf8, not_json,
    not_object."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(
            f"payload too large ({len(payload)} > {MAX_PAYLOAD_BYTES} bytes)", code="too_large"
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("payload not UTF-8", code="not_utf8") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise WireError("payload not JSON: nested too deeply", code="not_json") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long integers
        first = str(exc).splitlines()[0][:80]
        raise WireError(f"payload not JSON: {first}", code="not_json") from None
    if not isinstance(obj, dict):
        raise WireError("payload not a JSON object", code="not_object")
    return obj


def encode_object(obj: Mapping[str, Any], *, compact: bool = False) -> bytes:
    if compact:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return json.dumps(obj).encode()


def kw(w: float | None) -> float | None:
    """W -> kW for the wire, to the watt; NaN or None -> null (JSON has no NaN)."""
    return None if w is None or w != w else round(w / 1e3, 3)


def optional_number(obj: Any, key: str) -> float | None:
    """``obj[key]`` as a finite float; None when absent or null."""
    value = obj.get(key) if isinstance(obj, Mapping) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"{key} must be a number", code="bad_type")
    try:
        f = float(value)
    except OverflowError:
        raise WireError(f"{key} out of range", code="out_of_range") from None
    if not math.isfinite(f):
        raise WireError(f"{key} must be finite", code="not_finite")
    return f


def optional_w(obj: Any, key: str) -> float | None:
    """``obj[key]`` in kW as W (finite); None when absent or null."""
    value = optional_number(obj, key)
    if value is None:
        return None
    w = value * 1e3
    if not math.isfinite(w):
        raise WireError(f"{key} must be finite", code="not_finite")
    return w


def optional_int(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"{key} must be an integer", code="bad_type")
    return value


def optional_str(obj: Mapping[str, Any], key: str, *, max_len: int | None = None) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise WireError(f"{key} must be a string", code="bad_type")
    return value if max_len is None else value[:max_len]


def optional_choice(obj: Mapping[str, Any], key: str, choices: Collection[str]) -> str | None:
    """``obj[key]`` as one of `choices`; None when absent or null."""
    value = optional_str(obj, key)
    if value is not None and value not in choices:
        raise WireError(f"{key} must be one of {', '.join(sorted(choices))}", code="out_of_range")
    return value


def required(value: Any, key: str) -> Any:
    if value is None:
        raise WireError(f"{key} missing", code="missing")
    return value


def optional_time(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise WireError(f"{key} must be an RFC3339 string", code="bad_type")
    try:
        return parse_rfc3339(value)
    except ValueError as exc:
        raise WireError(f"{key} {exc}", code="bad_time") from None


def section(obj: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise WireError(f"{key} must be an object", code="bad_type")
    return value
