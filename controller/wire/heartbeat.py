"""The dispatcher's heartbeat. Unsigned, any payload counts as one (README): the decoder reads
what a well-formed one says and never rejects. Signed (a JWS, when the site has
`dispatch.keys`), `verify` checks who sent it and that it is fresh. Pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from controller.wire.codec import (
    WireError,
    decode_object,
    encode_object,
    optional_str,
    optional_time,
)
from controller.wire.jws import KeyRing
from controller.wire.signing import SignatureError
from controller.wire.timestamps import rfc3339

MAX_CLOCK_SKEW_S = 5.0
"""Tolerated dispatcher clock lead, as for a dispatch's `issued_at`."""


class HeartbeatRejected(ValueError):
    """A heartbeat that does not count; the message says why (for the log)."""


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

    @classmethod
    def verify(
        cls, payload: bytes, keys: KeyRing, *, now_unix: float, max_age_s: float
    ) -> tuple[Heartbeat, str]:
        """(heartbeat, kid) of a JWS from one of `keys`' kids whose `at` is at most
        `max_age_s` old; HeartbeatRejected otherwise. `at` is required: a signed heartbeat
        recorded by an eavesdropper must not keep the failsafe off when replayed later (the
        caller also refuses one not after the last from the same kid)."""
        try:
            v = keys.verify(payload)
            obj = decode_object(v.payload)
            hb = cls(sender=optional_str(obj, "from"), at=optional_time(obj, "at"))
        except SignatureError as exc:
            raise HeartbeatRejected(str(exc)) from None
        except WireError as exc:
            raise HeartbeatRejected(f"signed heartbeat: {exc.reason}") from None
        if hb.at is None:
            raise HeartbeatRejected("signed heartbeat without at")
        age = now_unix - hb.at
        if age > max_age_s:
            raise HeartbeatRejected(f"heartbeat at stale ({age:.1f} s old > {max_age_s} s)")
        if age < -MAX_CLOCK_SKEW_S:
            raise HeartbeatRejected(f"heartbeat at {-age:.1f} s in the future (clock skew?)")
        return hb, v.kid
