"""The retained status (also the MQTT will): online or offline, the mode, and why. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from controller.wire.codec import (
    WireError,
    decode_object,
    encode_object,
    optional_str,
    optional_time,
)
from controller.wire.timestamps import rfc3339

State = Literal["online", "offline"]
MAX_DETAIL: Final = 200
"""A peer's detail goes into our logs: no more of it than this."""


@dataclass(frozen=True, slots=True)
class Status:
    state: State
    mode: str | None
    """normal, failsafe, released...; None in the will (the mode at death is unknown)."""
    detail: str
    at: float | None
    """Unix seconds when it was said; the will's is when the session that left it began.
    None: not said (an older sender)."""

    @property
    def online(self) -> bool:
        return self.state == "online"

    def encode(self) -> bytes:
        body = {
            "state": self.state,
            "mode": self.mode,
            "detail": self.detail,
            "at": None if self.at is None else rfc3339(self.at),
        }
        return encode_object(body)

    @classmethod
    def decode(cls, payload: bytes) -> Status:
        """WireError (a ValueError) when it is not a status."""
        obj = decode_object(payload)
        state = obj.get("state")
        if state not in ("online", "offline"):
            raise WireError("status state must be online or offline", code="bad_type")
        return cls(
            state="online" if state == "online" else "offline",
            mode=optional_str(obj, "mode"),
            detail=optional_str(obj, "detail", max_len=MAX_DETAIL) or "",
            at=optional_time(obj, "at"),
        )
