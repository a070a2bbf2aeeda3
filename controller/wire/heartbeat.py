"""The dispatcher's heartbeat. Any payload counts as one (README): the decoder reads what a
well-formed one says and never rejects. Pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from controller.wire.codec import (
    decode_object,
    encode_object,
    optional_str,
    optional_time,
)
from controller.wire.timestamps import rfc3339


@dataclass(frozen=True, slots=True)
class Heartbeat:
    sender: str | None
    """Who is alive (on the wire `from`); None when not said."""
    at: float | None

    def encode(self) -> bytes:
        body = {"from": self.sender, "at": None if self.at is None else rfc3339(self.at)}
        return encode_object(body, compact=True)

    @classmethod
    def decode(cls, payload: bytes) -> Heartbeat:
        try:
            obj = decode_object(payload)
            return cls(sender=optional_str(obj, "from"), at=optional_time(obj, "at"))
        except ValueError:  # its arrival is the message; its content is a courtesy
            return cls(sender=None, at=None)
