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
MAX_MORE: Final = 1000
"""At most this many further dispatches in one grouped ack (`more`)."""

Name = tuple[str | None, int | None]
"""A dispatch as an ack names it: its id and seq (None where it did not say them)."""

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
    more: tuple[Name, ...] = ()
    """A grouped ack (dispatches refused `rate_limited`): the further dispatches it answers,
    each with the same decision and reason, after the one `id` and `seq` name."""

    def names(self) -> tuple[Name, ...]:
        """Every dispatch this ack answers, in the order they came: (id, seq) each."""
        return ((self.id, self.seq), *self.more)

    def answers(self, dispatch_id: str) -> bool:
        return self.id == dispatch_id or any(i == dispatch_id for i, _ in self.more)

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
        if self.more:  # absent unless grouped: an ack of one dispatch reads as it always did
            body["more"] = [{"id": i, "seq": q} for i, q in self.more]
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
            more=_more(obj),
        )


def _more(obj: dict[str, Any]) -> tuple[Name, ...]:
    raw = obj.get("more")
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_MORE:
        raise WireError(f"more must be a list of at most {MAX_MORE} objects", code="bad_type")
    out: list[Name] = []
    for item in raw:
        if not isinstance(item, dict):
            raise WireError("more must be a list of {id, seq} objects", code="bad_type")
        out.append((optional_str(item, "id"), optional_int(item, "seq")))
    return tuple(out)
