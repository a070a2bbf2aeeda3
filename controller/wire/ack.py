"""The ack: one per dispatch, accepted or rejected with a reason. Pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

from controller.wire.codec import (
    WireError,
    decode_object,
    encode_object,
    optional_choice,
    optional_int,
    optional_str,
    optional_time,
)
from controller.wire.timestamps import rfc3339

MAX_REASON: Final = 200
"""A peer's reason goes into our logs: no more of it than this."""

RampLimitName = Literal["up_kw_per_min", "down_kw_per_min", "max_change_kw_per_5s"]
"""The `[ramp_limits]` key that governs a move (`limited_by` in acks and telemetry)."""
RAMP_LIMIT_NAMES: Final[tuple[str, ...]] = get_args(RampLimitName)


@dataclass(frozen=True, slots=True)
class Ack:
    """`id` and `seq` are None when the dispatch was too broken to name itself."""

    id: str | None
    seq: int | None
    accepted: bool
    reason: str
    at: float | None
    """Unix seconds when the daemon decided (None: not said, from an older sender)."""
    limited_by: RampLimitName | None = None
    """An accepted dispatch slowed by a ramp limit: the limit that governs its move."""
    reach_at: float | None = None
    """With `limited_by`: unix seconds when the limited target reaches the dispatch's."""

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "seq": self.seq,
            "accepted": self.accepted,
            "reason": self.reason,
            "at": None if self.at is None else rfc3339(self.at),
        }
        if self.limited_by is not None:  # absent, not null, when no limit slows the move
            body["limited_by"] = self.limited_by
            body["reach_at"] = None if self.reach_at is None else rfc3339(self.reach_at)
        return encode_object(body, compact=True)

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        """WireError (a ValueError) when it is not an ack."""
        obj = decode_object(payload)
        accepted = obj.get("accepted")
        if not isinstance(accepted, bool):
            raise WireError("ack needs a boolean accepted", code="bad_type")
        return cls(
            id=optional_str(obj, "id"),
            seq=optional_int(obj, "seq"),
            accepted=accepted,
            reason=optional_str(obj, "reason", max_len=MAX_REASON) or "",
            at=optional_time(obj, "at"),
            limited_by=cast(
                RampLimitName | None, optional_choice(obj, "limited_by", RAMP_LIMIT_NAMES)
            ),
            reach_at=optional_time(obj, "reach_at"),
        )
