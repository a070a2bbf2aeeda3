"""Power prices: the quote every source turns into, its parsers, and the CSV reader.

A quote is the price of one settlement interval. Sources: MQTT (`<prefix>/<site>/price`, one
JSON object), an HTTP endpoint (one object or a list), a CSV file of
`interval_start_utc,price_usd_per_mwh` rows. Pure, except `read_price_csv`, which reads its file.

    {"interval_start": "2024-06-01T05:00:00Z", "interval_s": 900, "usd_per_mwh": 131.2,
     "kind": "realtime"}

`interval_start` is RFC 3339 or unix seconds; `kind` is "realtime" (the default) or
"forecast". Negative prices are real (wind at night in West Texas) and allowed.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, cast

from controller.wire.timestamps import parse_rfc3339

QuoteKind = Literal["realtime", "forecast"]
KINDS: Final[tuple[QuoteKind, ...]] = ("realtime", "forecast")
MAX_PAYLOAD_BYTES: Final = 1 << 20
"""An HTTP source may answer a day of 5-minute forecasts; nothing sane is near 1 MiB."""
CSV_COLUMNS: Final = ("interval_start_utc", "price_usd_per_mwh")


class PriceError(ValueError):
    """A price message or file that cannot be used; the message says why (and where)."""


@dataclass(frozen=True, slots=True)
class PriceQuote:
    interval_start: float
    """Unix seconds."""
    interval_s: float
    usd_per_mwh: float
    kind: QuoteKind = "realtime"

    def __post_init__(self) -> None:
        if not math.isfinite(self.interval_start):
            raise PriceError("interval_start must be finite")
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise PriceError("interval_s must be a positive number")
        if not math.isfinite(self.usd_per_mwh):
            raise PriceError("usd_per_mwh must be finite")
        if self.kind not in KINDS:
            raise PriceError(f"kind must be one of {', '.join(KINDS)}")

    @property
    def end(self) -> float:
        return self.interval_start + self.interval_s

    def is_stale(self, now: float, grace_s: float) -> bool:
        """Past its interval plus the grace: acting on it would act on an old price."""
        return now > self.end + grace_s


def _number(obj: Mapping[str, Any], key: str) -> float:
    if key not in obj:
        raise PriceError(f"missing field {key!r}")
    v = obj[key]
    # bool is an int in Python, never a price.
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise PriceError(f"{key}: must be a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise PriceError(f"{key}: must be finite")
    return f


def _interval_start(obj: Mapping[str, Any]) -> float:
    v = obj.get("interval_start")
    if isinstance(v, str):
        try:
            return parse_rfc3339(v)
        except ValueError as exc:
            raise PriceError(f"interval_start: {exc}") from None
    return _number(obj, "interval_start")


def _quote(obj: Any) -> PriceQuote:
    if not isinstance(obj, dict):
        raise PriceError(f"a price must be a JSON object, got {type(obj).__name__}")
    start = _interval_start(obj)
    interval_s = _number(obj, "interval_s")
    if interval_s <= 0:
        raise PriceError(f"interval_s: must be > 0, got {interval_s:g}")
    price = _number(obj, "usd_per_mwh")
    kind = obj.get("kind", "realtime")
    if kind not in KINDS:
        raise PriceError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    return PriceQuote(start, interval_s, price, cast(QuoteKind, kind))


def _reject_constant(name: str) -> float:
    # json.loads takes NaN/Infinity by default: not JSON, and never a price.
    raise ValueError(f"non-finite number {name}")


def _decode(payload: bytes | str | dict[str, Any] | list[Any]) -> Any:
    if isinstance(payload, dict | list):
        return payload
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PriceError(f"payload too large ({len(payload)} > {MAX_PAYLOAD_BYTES})")
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise PriceError("payload not UTF-8") from None
    try:
        return json.loads(payload, parse_constant=_reject_constant)
    except RecursionError:
        raise PriceError("payload not JSON: nested too deeply") from None
    except ValueError as exc:
        raise PriceError(f"payload not JSON: {str(exc).splitlines()[0][:80]}") from None


def parse_quote(payload: bytes | str | dict[str, Any]) -> PriceQuote:
    """One price message (MQTT). Raises PriceError (a ValueError) saying what is wrong."""
    return _quote(_decode(payload))


def parse_quotes(payload: bytes | str | dict[str, Any] | list[Any]) -> list[PriceQuote]:
    """One price message or a list of them (an HTTP source). A bad item rejects the whole
    answer, naming its index: a source that sends garbage is not trusted for the rest."""
    obj = _decode(payload)
    if not isinstance(obj, list):
        return [_quote(obj)]
    out: list[PriceQuote] = []
    for i, item in enumerate(obj):
        try:
            out.append(_quote(item))
        except PriceError as exc:
            raise PriceError(f"item {i}: {exc}") from None
    return out


def _csv_time(text: str) -> float:
    """ISO 8601; a time without an offset is UTC (the column says so)."""
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"interval_start_utc: not an ISO 8601 time: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def read_price_csv(path: Path, interval_s: float = 900.0) -> list[PriceQuote]:
    """Realtime quotes from `interval_start_utc,price_usd_per_mwh` rows (a header first),
    in strictly increasing time. PriceError names the file and the line."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise PriceError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PriceError(f"{path}: cannot read: {exc}") from None
    if not rows:
        raise PriceError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    try:
        i_t, i_p = (header.index(c) for c in CSV_COLUMNS)
    except ValueError:
        raise PriceError(
            f"{path}:1: header must name {', '.join(CSV_COLUMNS)}; got {','.join(header)}"
        ) from None
    quotes: list[PriceQuote] = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            if len(row) <= max(i_t, i_p):
                raise ValueError(f"expected {len(header)} columns, got {len(row)}")
            start = _csv_time(row[i_t])
            try:
                price = float(row[i_p])
            except ValueError:
                raise ValueError(f"price_usd_per_mwh: not a number: {row[i_p]!r}") from None
            if quotes and start <= quotes[-1].interval_start:
                raise ValueError("interval_start_utc not after the previous row's")
            quotes.append(PriceQuote(start, interval_s, price, "realtime"))
        except ValueError as exc:  # PriceError too
            raise PriceError(f"{path}:{lineno}: {exc}") from None
    if not quotes:
        raise PriceError(f"{path}: no price rows")
    return quotes
