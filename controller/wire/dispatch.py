"""The dispatch message: the typed `Dispatch`, its decoder (every check the daemon makes) and
its encoder (what dispatcher clients and a parent rampd send). Pure, no I/O.

`Dispatch.decode()` turns a raw payload into a `Dispatch` (SI units) or raises
`DispatchRejected` with a short reason that goes into the ack. It never raises anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, cast

from controller.wire import jws, signing
from controller.wire.codec import (
    WireError,
    decode_object,
    encode_object,
    optional_number,
    optional_time,
)
from controller.wire.timestamps import rfc3339

DispatchMode = Literal["setpoint", "regulation", "release", "recall", "commitment"]
MODES: Final[frozenset[str]] = frozenset(
    {"setpoint", "regulation", "release", "recall", "commitment"}
)
TARGET_MODES: Final[frozenset[str]] = frozenset({"setpoint", "regulation", "release"})
"""Modes that set the grid dispatch's target; `recall` only ends frequency deployments, and a
`commitment` is a rail of its own below the grid dispatch (`controller/market/rails.py`)."""
SERVICES: Final = ("ffr", "ufr")
"""Frequency services whose armed amount a dispatch may set (`"services": {"ffr_kw": X}`)."""

REJECT_CODES: Final[frozenset[str]] = frozenset(
    {
        "too_large", "not_utf8", "not_json", "not_object",  # the payload as a whole
        "missing", "bad_type", "not_finite", "out_of_range",  # a field
        "bad_id", "bad_mode", "bad_time",
        "stale", "future", "replay", "expired", "bad_schedule",  # timing and ordering
        "bad_signature",  # JWS or legacy sig missing, malformed or wrong (dispatch.keys)
        "rate_limited",  # over dispatch.max_per_s: refused before any other check
    }
)  # fmt: skip

MAX_ID_LEN: Final = 128
MAX_RAMP_S: Final = 3600.0
# Tolerated dispatcher clock lead: issued_at this far in the future is still accepted.
MAX_CLOCK_SKEW_S: Final = 5.0
# A start_at further ahead than this is a dispatcher bug, not a schedule we should keep.
MAX_START_AHEAD_S: Final = 2 * 86400.0
# Fits a signed 64-bit column (journal) and every JSON library's integers.
MAX_SEQ: Final = 2**63 - 1
PEEK_MAX_BYTES: Final = 4096
"""`peek_name` reads no payload longer than this: a dispatch is a few hundred bytes (a JWS
of one under a kilobyte), and a flood of 64 KiB payloads must not cost a parse each."""


class Limits(Protocol):
    """What the decoder needs of the site's limits (`controller.config.SiteLimits`)."""

    @property
    def min_kw(self) -> float: ...
    @property
    def max_kw(self) -> float: ...
    @property
    def max_issued_age_s(self) -> float: ...


class DispatchRejected(Exception):
    """A payload we will not act on. `reason` (human text) goes into the ack verbatim.

    `code` is a short label from a fixed set (`REJECT_CODES`), fit for a metrics label.
    `id` and `seq` are filled when they could be read, so the ack can name the dispatch even
    when something else in it is wrong.
    """

    def __init__(
        self, reason: str, *, code: str, id: str | None = None, seq: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.id = id
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One validated dispatch, SI units (W, s), times as unix seconds.

    For `regulation`, `target_w` is the base and the requested power is
    `target_w + signal * band_w`. For `release`, `target_w` is the site maximum (the
    encoder leaves it out). A `recall` ends the frequency deployments and leaves the target
    as it is (`target_w` is 0 and means nothing). `armed_w`: the armed amount per frequency
    service it sets (any mode; None: unchanged).

    A `commitment` reduces the site between `start_at` and `end_at`: to `target_w`, or by
    `reduce_by_w` below its baseline (then `target_w` is 0), reached over `ramp_s` (its
    ramp-down) and left over `ramp_up_s`.
    """

    id: str
    seq: int
    issued_at: float
    mode: DispatchMode
    target_w: float
    ramp_s: float = 0.0
    start_at: float | None = None
    expires_at: float | None = None
    signal: float | None = None
    band_w: float | None = None
    armed_w: dict[str, float] | None = None
    end_at: float | None = None
    reduce_by_w: float | None = None
    ramp_up_s: float = 0.0

    @property
    def sets_target(self) -> bool:
        return self.mode in TARGET_MODES

    def to_wire(self) -> dict[str, Any]:
        """The JSON object (kW, RFC 3339), unsigned."""
        body: dict[str, Any] = {
            "id": self.id,
            "seq": self.seq,
            "issued_at": rfc3339(self.issued_at),
            "mode": self.mode,
        }
        if self.mode == "commitment":
            return body | self._commitment_wire()
        if self.mode in ("setpoint", "regulation"):
            body["target_kw"] = _kw(self.target_w)
        body["ramp_s"] = self.ramp_s
        if self.start_at is not None:
            body["start_at"] = rfc3339(self.start_at)
        if self.expires_at is not None:
            body["expires_at"] = rfc3339(self.expires_at)
        if self.band_w is not None:
            body["band_kw"] = _kw(self.band_w)
        if self.signal is not None:
            body["signal"] = self.signal
        if self.armed_w is not None:
            body["services"] = {f"{k}_kw": _kw(w) for k, w in self.armed_w.items()}
        return body

    def _commitment_wire(self) -> dict[str, Any]:
        assert self.start_at is not None and self.end_at is not None
        body: dict[str, Any] = {"start_at": rfc3339(self.start_at), "end_at": rfc3339(self.end_at)}
        if self.reduce_by_w is not None:
            body["reduce_by_kw"] = _kw(self.reduce_by_w)
        else:
            body["reduce_to_kw"] = _kw(self.target_w)
        body["ramp_down_s"] = self.ramp_s
        body["ramp_up_s"] = self.ramp_up_s
        return body

    def encode(self, key: bytes | None = None) -> bytes:
        """UTF-8 JSON, with `sig` when `key` is given (the daemon's `hmac_key_file` bytes)."""
        body = self.to_wire()
        return encode_object(signing.signed(body, key) if key is not None else body, compact=True)

    @classmethod
    def decode(
        cls,
        payload: bytes,
        *,
        now_unix: float,
        last_seq: int | None,
        limits: Limits,
        replay: bool = False,
        hmac_key: bytes | jws.KeyRing | None = None,
    ) -> Dispatch:
        """Validate one wire dispatch (kW, RFC3339) into a `Dispatch` (W, unix seconds).

        Pure: the clock and the last accepted seq are passed in. Raises only
        `DispatchRejected`. Unknown fields are ignored (forward compatibility); `null` counts
        as absent. `replay=True` (resuming from the journal at start) skips the `issued_at`
        freshness checks: the payload was fresh when it was accepted. Everything else is
        checked again against the current config and clock (an expired or now out-of-range
        dispatch is still rejected). `hmac_key`: the site's keys (`jws.KeyRing`: a JWS from a
        configured kid, or a legacy `sig` where the ring accepts it) or a legacy key (bytes:
        `sig` must be the HMAC-SHA256 of `signing.canonical_bytes(obj)`). Authenticity is
        checked before any field (code `bad_signature`). Without keys, `sig` is ignored and a
        JWS is refused.
        """
        return _decode(
            payload,
            now_unix=now_unix,
            last_seq=last_seq,
            limits=limits,
            replay=replay,
            hmac_key=hmac_key,
        )


def peek_name(payload: bytes) -> tuple[str | None, int | None]:
    """The `id` and `seq` a payload says, unverified and nothing else checked: to name a
    dispatch refused before it is decoded (`rate_limited`) in its ack. Cheap by design (one
    JSON parse of at most PEEK_MAX_BYTES, no signature check); (None, None) when it does not
    say them readably. Never raises."""
    if len(payload) > PEEK_MAX_BYTES:
        return None, None
    raw = jws.unverified_payload(payload) if jws.is_compact(payload) else payload
    try:
        obj = decode_object(raw)
    except WireError:
        return None, None
    return _name(obj)


def _name(obj: dict[str, Any]) -> tuple[str | None, int | None]:
    """id and seq where they are fit to repeat in an ack (the decoder checks them after)."""
    raw_id, raw_seq = obj.get("id"), obj.get("seq")
    ok_id = isinstance(raw_id, str) and bool(raw_id.strip()) and len(raw_id) <= MAX_ID_LEN
    ok_seq = isinstance(raw_seq, int) and not isinstance(raw_seq, bool) and 0 <= raw_seq <= MAX_SEQ
    return (raw_id if ok_id else None), (raw_seq if ok_seq else None)


def _kw(w: float) -> float:
    # Six decimals: the kW a dispatcher meant, without the float noise of W -> kW.
    return round(w / 1e3, 6)


# --- decoding ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Ctx:
    """What is known so far about the payload, so every rejection can carry id and seq."""

    id: str | None = None
    seq: int | None = None

    def reject(self, reason: str, *, code: str) -> DispatchRejected:
        return DispatchRejected(reason, code=code, id=self.id, seq=self.seq)


def _present(obj: dict[str, Any], key: str) -> bool:
    # JSON null counts as absent for optional fields.
    return obj.get(key) is not None


def _number(obj: dict[str, Any], key: str, ctx: _Ctx) -> float:
    try:
        value = optional_number(obj, key)
    except WireError as exc:
        raise ctx.reject(exc.reason, code=exc.code) from None
    if value is None:
        raise ctx.reject(f"{key} missing", code="missing")
    return value


def _time(obj: dict[str, Any], key: str, ctx: _Ctx) -> float:
    try:
        value = optional_time(obj, key)
    except WireError as exc:
        raise ctx.reject(exc.reason, code=exc.code) from None
    if value is None:
        raise ctx.reject(f"{key} missing", code="missing")
    return value


def _decode(
    payload: bytes,
    *,
    now_unix: float,
    last_seq: int | None,
    limits: Limits,
    replay: bool,
    hmac_key: bytes | jws.KeyRing | None,
) -> Dispatch:
    # A JWS's payload is decoded as signed (unverified when `error` is set: then only to name
    # the dispatch in the ack below).
    opened = jws.open_signed(payload, hmac_key)
    try:
        obj = decode_object(opened.payload)
    except WireError as exc:
        if opened.error is not None:
            raise DispatchRejected(opened.error, code="bad_signature") from None
        raise DispatchRejected(exc.reason, code=exc.code) from None
    ctx = _Ctx()

    # id and seq first: every later rejection can then name the dispatch in its ack.
    raw_id, raw_seq = obj.get("id"), obj.get("seq")
    ctx.id, ctx.seq = _name(obj)

    # Authenticity before anything else: an unsigned payload is not judged on its content.
    # (id and seq above are only read, to name the dispatch in the ack.)
    try:
        opened.check(obj)
    except signing.SignatureError as exc:
        raise ctx.reject(str(exc), code="bad_signature") from None

    if raw_id is None:
        raise ctx.reject("id missing", code="missing")
    if not isinstance(raw_id, str):
        raise ctx.reject("id must be a string", code="bad_type")
    if not raw_id.strip():
        raise ctx.reject("id empty", code="bad_id")
    if len(raw_id) > MAX_ID_LEN:
        raise ctx.reject(f"id longer than {MAX_ID_LEN} characters", code="bad_id")
    if raw_seq is None:
        raise ctx.reject("seq missing", code="missing")
    if isinstance(raw_seq, bool) or not isinstance(raw_seq, int):
        raise ctx.reject("seq must be an integer", code="bad_type")
    if raw_seq < 0:
        raise ctx.reject("seq must not be negative", code="out_of_range")
    if raw_seq > MAX_SEQ:
        raise ctx.reject("seq out of range", code="out_of_range")
    seq = raw_seq

    mode = obj.get("mode")
    if mode is None:
        raise ctx.reject("mode missing", code="missing")
    if not isinstance(mode, str) or mode not in MODES:
        raise ctx.reject(
            "mode unknown (setpoint, regulation, release, recall or commitment)", code="bad_mode"
        )

    issued_at = _time(obj, "issued_at", ctx)
    age = 0.0 if replay else now_unix - issued_at
    if age > limits.max_issued_age_s:
        raise ctx.reject(
            f"issued_at stale ({age:.1f} s old > {limits.max_issued_age_s} s)", code="stale"
        )
    if age < -MAX_CLOCK_SKEW_S:
        raise ctx.reject(f"issued_at {-age:.1f} s in the future (clock skew?)", code="future")

    # Checked after freshness: a replay of an old message is reported as stale or as a replay,
    # whichever the operator can act on; both reject.
    if last_seq is not None and seq <= last_seq:
        raise ctx.reject(
            f"seq {seq} not above last accepted {last_seq} (replayed or older)", code="replay"
        )

    if mode == "commitment":
        return _commitment(obj, ctx, raw_id, seq, issued_at, now_unix, limits)
    ramp_s = _ramp(obj, "ramp_s", ctx)

    start_at: float | None = None
    if _present(obj, "start_at"):
        start_at = _time(obj, "start_at", ctx)
        if start_at - now_unix > MAX_START_AHEAD_S:
            raise ctx.reject(
                f"start_at more than {MAX_START_AHEAD_S:.0f} s ahead", code="bad_schedule"
            )
    expires_at: float | None = None
    if _present(obj, "expires_at"):
        expires_at = _time(obj, "expires_at", ctx)
        if expires_at <= now_unix:
            raise ctx.reject("expires_at already past", code="expired")
        if start_at is not None and expires_at <= start_at:
            raise ctx.reject("expires_at not after start_at", code="bad_schedule")

    armed_w = _services(obj, ctx)
    min_kw, max_kw = limits.min_kw, limits.max_kw
    signal: float | None = None
    band_w: float | None = None
    if mode == "recall":
        target_kw = 0.0
    elif mode == "release":
        # No constraint: the site goes back to its own maximum. A target_kw, if sent, is
        # ignored but must still be a number (garbage is garbage).
        if _present(obj, "target_kw"):
            _number(obj, "target_kw", ctx)
        target_kw = max_kw
    else:
        target_kw = _number(obj, "target_kw", ctx)
        if target_kw < 0:
            raise ctx.reject("target_kw must not be negative", code="out_of_range")
        if target_kw > max_kw:
            raise ctx.reject(f"target_kw above site maximum {max_kw}", code="out_of_range")
        if target_kw < min_kw:
            raise ctx.reject(f"target_kw below site minimum {min_kw}", code="out_of_range")
        if mode == "regulation":
            band_kw = _number(obj, "band_kw", ctx)
            if band_kw <= 0:
                raise ctx.reject("band_kw must be above 0", code="out_of_range")
            signal = _number(obj, "signal", ctx) if _present(obj, "signal") else 0.0
            if not -1.0 <= signal <= 1.0:
                raise ctx.reject("signal outside -1..+1", code="out_of_range")
            # The whole band must be reachable, not only today's signal: the next regulation
            # message may ask for either edge.
            if target_kw + band_kw > max_kw:
                raise ctx.reject(
                    f"target_kw + band_kw above site maximum {max_kw}", code="out_of_range"
                )
            if target_kw - band_kw < min_kw:
                raise ctx.reject(
                    f"target_kw - band_kw below site minimum {min_kw}", code="out_of_range"
                )
            band_w = band_kw * 1e3

    return Dispatch(
        id=raw_id,
        seq=seq,
        issued_at=issued_at,
        mode=cast(DispatchMode, mode),  # checked against MODES above
        target_w=target_kw * 1e3,
        ramp_s=ramp_s,
        start_at=start_at,
        expires_at=expires_at,
        signal=signal,
        band_w=band_w,
        armed_w=armed_w,
    )


def _ramp(obj: dict[str, Any], key: str, ctx: _Ctx) -> float:
    if not _present(obj, key):
        return 0.0
    ramp_s = _number(obj, key, ctx)
    if ramp_s < 0:
        raise ctx.reject(f"{key} must not be negative", code="out_of_range")
    if ramp_s > MAX_RAMP_S:
        raise ctx.reject(f"{key} above {MAX_RAMP_S:.0f}", code="out_of_range")
    return ramp_s


def _commitment(
    obj: dict[str, Any],
    ctx: _Ctx,
    id_: str,
    seq: int,
    issued_at: float,
    now_unix: float,
    limits: Limits,
) -> Dispatch:
    """`{"mode": "commitment", "start_at", "end_at", "reduce_to_kw" | "reduce_by_kw",
    "ramp_down_s", "ramp_up_s"}`."""
    start_at = _time(obj, "start_at", ctx)
    if start_at - now_unix > MAX_START_AHEAD_S:
        raise ctx.reject(f"start_at more than {MAX_START_AHEAD_S:.0f} s ahead", code="bad_schedule")
    end_at = _time(obj, "end_at", ctx)
    if end_at <= start_at:
        raise ctx.reject("end_at not after start_at", code="bad_schedule")
    if end_at <= now_unix:
        raise ctx.reject("end_at already past", code="expired")
    to, by = _present(obj, "reduce_to_kw"), _present(obj, "reduce_by_kw")
    if to == by:
        raise ctx.reject("give one of reduce_to_kw and reduce_by_kw", code="missing")
    target_kw, reduce_by_w = 0.0, None
    if to:
        target_kw = _number(obj, "reduce_to_kw", ctx)
        if not limits.min_kw <= target_kw <= limits.max_kw:
            raise ctx.reject(
                f"reduce_to_kw outside the site's {limits.min_kw}..{limits.max_kw}",
                code="out_of_range",
            )
    else:
        by_kw = _number(obj, "reduce_by_kw", ctx)
        if not 0.0 < by_kw <= limits.max_kw:
            raise ctx.reject(
                f"reduce_by_kw must be above 0 and at most {limits.max_kw}", code="out_of_range"
            )
        reduce_by_w = by_kw * 1e3
    return Dispatch(
        id=id_,
        seq=seq,
        issued_at=issued_at,
        mode="commitment",
        target_w=target_kw * 1e3,
        ramp_s=_ramp(obj, "ramp_down_s", ctx),
        start_at=start_at,
        end_at=end_at,
        reduce_by_w=reduce_by_w,
        ramp_up_s=_ramp(obj, "ramp_up_s", ctx),
        armed_w=_services(obj, ctx),
    )


def _services(obj: dict[str, Any], ctx: _Ctx) -> dict[str, float] | None:
    """`"services": {"ffr_kw": X, "ufr_kw": Y}`: armed amounts, W by service name."""
    if not _present(obj, "services"):
        return None
    raw = obj["services"]
    if not isinstance(raw, dict):
        raise ctx.reject("services must be an object", code="bad_type")
    known = {f"{name}_kw": name for name in SERVICES}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ctx.reject(f"services.{unknown[0]} unknown ({', '.join(known)})", code="bad_type")
    out: dict[str, float] = {}
    for key, name in known.items():
        if raw.get(key) is None:
            continue
        kw = _number(raw, key, ctx)
        if kw < 0:
            raise ctx.reject(f"services.{key} must not be negative", code="out_of_range")
        out[name] = kw * 1e3
    return out
