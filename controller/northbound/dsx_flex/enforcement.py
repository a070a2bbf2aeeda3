"""`PowerBreachEnforcementData` (grid.powerbreach.enforcement.v1's verified `data`): what an
infrastructure agent did about a breach, checked field by field as dsx-flex.yaml says, and
the one journal line it becomes.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from controller.northbound.dsx_flex.envelope import is_uuid, parse_time
from controller.northbound.dsx_flex.power import Power
from controller.wire.codec import WireError

ACTIONS: Final = ("applied", "reverted")
CODES: Final = ("success", "partial", "error")
RESOURCE_TYPES: Final = ("node", "gpu", "chassis")
REQUESTED: Final = ("power_cap", "throttle", "suspend")
RESULT_CODES: Final = ("applied", "failed", "skipped")
MAX_RESULTS: Final = 10_000


class EnforcementError(WireError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason, code="payload")


@dataclass(frozen=True, slots=True)
class Enforcement:
    breach_id: str
    feed_tag: str
    action: str
    code: str
    diag_msg: str | None
    results: tuple[tuple[str, str], ...]
    """(resource_id, code) per resource."""
    timestamp: float

    def summary(self, infra: str, known: bool) -> str:
        counts = {c: sum(1 for _, rc in self.results if rc == c) for c in RESULT_CODES}
        parts = ", ".join(f"{n} {c}" for c, n in counts.items() if n)
        text = (
            f"{infra}: {self.action} {self.code} for breach {self.breach_id}"
            f"{'' if known else ' (not a breach of this agent)'} on feed {self.feed_tag}"
            f" ({len(self.results)} resources{': ' + parts if parts else ''})"
        )
        return text if self.diag_msg is None else f"{text}: {self.diag_msg}"


def _choice(obj: dict[str, Any], key: str, choices: tuple[str, ...], where: str) -> str:
    v = obj.get(key)
    if v not in choices:
        raise EnforcementError(f"{where}{key} must be one of {', '.join(choices)}")
    return str(v)


def _string(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str | None:
    if optional and key not in obj:
        return None
    v = obj.get(key)
    if not isinstance(v, str):
        raise EnforcementError(f"{where}{key} must be a string")
    return v


def _result(i: int, item: object) -> tuple[str, str]:
    where = f"results[{i}]."
    if not isinstance(item, dict):
        raise EnforcementError(f"results[{i}] must be an object")
    rid = _string(item, "resource_id", where)
    _choice(item, "resource_type", RESOURCE_TYPES, where)
    _choice(item, "requested_action", REQUESTED, where)
    code = _choice(item, "code", RESULT_CODES, where)
    _string(item, "message", where, optional=True)
    if "applied_power" in item:
        try:
            Power.from_wire(item["applied_power"], f"{where}applied_power")
        except ValueError as exc:
            raise EnforcementError(str(exc)) from None
    assert rid is not None
    return rid, code


def decode_enforcement(data: Any) -> Enforcement:
    if not isinstance(data, dict):
        raise EnforcementError("data must be an object")
    missing = [
        k
        for k in ("breach_id", "feed_tag", "action", "code", "results", "timestamp")
        if k not in data
    ]
    if missing:
        raise EnforcementError(f"missing {', '.join(missing)}")
    if not is_uuid(data["breach_id"]):
        raise EnforcementError("breach_id must be a UUID")
    feed = _string(data, "feed_tag", "")
    action = _choice(data, "action", ACTIONS, "")
    code = _choice(data, "code", CODES, "")
    diag = _string(data, "diag_msg", "", optional=True)
    results = data["results"]
    if not isinstance(results, list) or len(results) > MAX_RESULTS:
        raise EnforcementError(f"results must be an array (at most {MAX_RESULTS})")
    try:
        at = parse_time(data["timestamp"], "timestamp")
    except ValueError as exc:
        raise EnforcementError(str(exc)) from None
    assert feed is not None
    return Enforcement(
        data["breach_id"],
        feed,
        action,
        code,
        diag,
        tuple(_result(i, r) for i, r in enumerate(results)),
        at,
    )
