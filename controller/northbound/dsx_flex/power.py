"""DSX Flex's power values (`PowerUnit`, `LoadConstraint`: a value and a unit) and watts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Literal

Unit = Literal["watt", "kilowatt", "megawatt"]
WATTS: Final[dict[Unit, float]] = {"watt": 1.0, "kilowatt": 1e3, "megawatt": 1e6}


@dataclass(frozen=True, slots=True)
class Power:
    """A power as the wire says it (kept to echo it back unchanged) and in watts."""

    value: float
    unit: Unit

    @property
    def w(self) -> float:
        return self.value * WATTS[self.unit]

    def to_wire(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit}

    @classmethod
    def from_wire(cls, obj: object, name: str) -> Power:
        """ValueError naming `name` unless `{"value": number >= 0, "unit": enum}`."""
        if not isinstance(obj, dict):
            raise ValueError(f"{name} must be an object with value and unit")
        value, unit = obj.get("value"), obj.get("unit")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}.value must be a number")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}.value must be finite and >= 0")
        if not isinstance(unit, str) or unit not in WATTS:
            raise ValueError(f"{name}.unit must be one of {', '.join(WATTS)}")
        return cls(float(value), unit)


def kilowatts(w: float) -> dict[str, Any]:
    """A PowerUnit in kW (rampd's unit on the wire), to the watt; never negative."""
    return {"value": round(max(w, 0.0) / 1e3, 3), "unit": "kilowatt"}
