"""The one timestamp format on rampd's wire: RFC 3339, UTC, milliseconds, `Z`.

Every time rampd publishes looks like `2024-05-01T12:00:00.123Z`; every time it reads may
carry any RFC 3339 offset (`+02:00`, `z`, a space for `T`), since dispatchers differ.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)
EXAMPLE: Final = "2024-05-01T12:00:00Z"


def rfc3339(unix: float) -> str:
    """Unix seconds -> '2024-05-01T12:00:00.123Z' (UTC, milliseconds)."""
    text = datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """RFC 3339 with any offset -> unix seconds. ValueError says what is wrong, to be
    prefixed with the field's name."""
    if not _RFC3339.fullmatch(text):
        raise ValueError(f"not RFC3339 (e.g. {EXAMPLE})")
    try:
        # fromisoformat rejects a lower-case "t"/"z", which RFC 3339 allows.
        return datetime.fromisoformat(text.upper()).timestamp()
    except ValueError:
        raise ValueError("not a valid date and time") from None
