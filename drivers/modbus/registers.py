"""Register maps shared by the Modbus driver and the simulated devices, so the two cannot drift.

Addresses are Modbus PDU addresses (0-based, what goes on the wire). 32-bit values are
big-endian in both bytes and words ("ABCD"), the Modbus and SunSpec convention.

LOAD_MAP, a flexible load (container controller / rack-row PDU), holding registers:

    addr  regs  name         type     access  meaning
    0     2     setpoint_w   float32  rw      power target W (readback is this register)
    2     1     run          uint16   rw      1 run, 0 sleep
    3     2     measured_w   float32  ro      measured power W
    5     1     state        uint16   ro      0 ON, 1 SLEEPING, 2 WAKING, 3 FAULT
    6     2     p_min_w      float32  ro      nameplate minimum running power W
    8     2     p_max_w      float32  ro      nameplate maximum power W

Writable first, read-only after, all contiguous: one FC16 of 3 registers sends a command and
one FC3 of 10 registers returns telemetry together with the readback of that command.

METER_MAP, a SunSpec meter (holding registers from 40000): 'SunS', common model 1 (L=66),
model 213 (three-phase wye meter, float, L=124), end model 0xFFFF/0. W > 0 is import
(the site consuming); unimplemented float points read NaN, as SunSpec specifies.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

RegType = Literal["u16", "u32", "f32", "str"]
Value = float | int | str

_SIZES: dict[str, int] = {"u16": 1, "u32": 2, "f32": 2}


# --- scalar codecs (the only place 32-bit values are split into registers) ---


def f32_to_regs(value: float) -> list[int]:
    """float -> [high word, low word]; values beyond float32 range saturate to +-inf."""
    try:
        packed = struct.pack(">f", value)
    except OverflowError:
        packed = struct.pack(">f", math.copysign(math.inf, value))
    hi, lo = struct.unpack(">HH", packed)
    return [hi, lo]


def regs_to_f32(hi: int, lo: int) -> float:
    value: float = struct.unpack(">f", struct.pack(">HH", hi & 0xFFFF, lo & 0xFFFF))[0]
    return value


def as_f32(value: float) -> float:
    """The value a float32 register actually holds after writing `value`."""
    return regs_to_f32(*f32_to_regs(value))


def u32_to_regs(value: int) -> list[int]:
    return [(value >> 16) & 0xFFFF, value & 0xFFFF]


def regs_to_u32(hi: int, lo: int) -> int:
    return ((hi & 0xFFFF) << 16) | (lo & 0xFFFF)


def str_to_regs(text: str, n_regs: int) -> list[int]:
    """ASCII/UTF-8, two bytes per register, NUL-padded to n_regs (SunSpec string)."""
    raw = text.encode()[: 2 * n_regs].ljust(2 * n_regs, b"\0")
    return list(struct.unpack(f">{n_regs}H", raw))


def regs_to_str(regs: Sequence[int]) -> str:
    raw = struct.pack(f">{len(regs)}H", *(r & 0xFFFF for r in regs))
    return raw.rstrip(b"\0").decode(errors="replace")


# --- declarative maps ---


@dataclass(frozen=True, slots=True)
class Reg:
    name: str
    address: int
    type: RegType
    size: int = 0
    """Registers; derived from the type except for strings."""
    writable: bool = False
    unit: str = ""

    def __post_init__(self) -> None:
        if self.type != "str":
            object.__setattr__(self, "size", _SIZES[self.type])
        elif self.size <= 0:
            raise ValueError(f"{self.name}: a string needs a size")

    @property
    def end(self) -> int:
        """One past the last register."""
        return self.address + self.size

    def encode(self, value: Value) -> list[int]:
        if self.type == "f32":
            return f32_to_regs(float(value))
        if self.type == "u16":
            return [int(value) & 0xFFFF]
        if self.type == "u32":
            return u32_to_regs(int(value))
        return str_to_regs(str(value), self.size)

    def decode(self, regs: Sequence[int]) -> Value:
        if len(regs) != self.size:
            raise ValueError(f"{self.name}: need {self.size} registers, got {len(regs)}")
        if self.type == "f32":
            return regs_to_f32(regs[0], regs[1])
        if self.type == "u16":
            return regs[0] & 0xFFFF
        if self.type == "u32":
            return regs_to_u32(regs[0], regs[1])
        return regs_to_str(regs)


@dataclass(frozen=True, slots=True)
class RegisterMap:
    name: str
    regs: tuple[Reg, ...]
    _by_name: dict[str, Reg] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {r.name: r for r in self.regs}
        if len(by_name) != len(self.regs):
            raise ValueError(f"{self.name}: duplicate register names")
        ordered = sorted(self.regs, key=lambda r: r.address)
        for a, b in pairwise(ordered):
            if a.end > b.address:
                raise ValueError(f"{self.name}: {a.name} overlaps {b.name}")
        object.__setattr__(self, "_by_name", by_name)

    def __getitem__(self, name: str) -> Reg:
        return self._by_name[name]

    @property
    def start(self) -> int:
        return min(r.address for r in self.regs)

    @property
    def end(self) -> int:
        return max(r.end for r in self.regs)

    @property
    def count(self) -> int:
        return self.end - self.start

    def span(self, first: str, last: str) -> tuple[int, int]:
        """(address, count) of the block from register `first` through `last`."""
        a, b = self[first], self[last]
        return a.address, b.end - a.address

    def decode(self, regs: Sequence[int], address: int, names: Iterable[str]) -> dict[str, Value]:
        """Decode `names` from a block of registers that starts at `address`."""
        out: dict[str, Value] = {}
        for name in names:
            r = self[name]
            lo = r.address - address
            if lo < 0 or r.end - address > len(regs):
                raise ValueError(f"{self.name}: {name} is outside the block read")
            out[name] = r.decode(regs[lo : lo + r.size])
        return out

    def encode_into(self, block: list[int], address: int, values: Mapping[str, Value]) -> None:
        """Write encoded `values` into `block` (a register list starting at `address`)."""
        for name, value in values.items():
            r = self[name]
            lo = r.address - address
            block[lo : lo + r.size] = r.encode(value)

    def encode(self, values: Mapping[str, Value]) -> tuple[int, list[int]]:
        """(address, registers) of the contiguous block holding exactly `values`."""
        regs = [self[n] for n in values]
        address = min(r.address for r in regs)
        end = max(r.end for r in regs)
        if sum(r.size for r in regs) != end - address:
            raise ValueError(f"{self.name}: {list(values)} are not contiguous")
        block = [0] * (end - address)
        self.encode_into(block, address, values)
        return address, block


# --- the flexible load ---

LOAD_MAP = RegisterMap(
    "load",
    (
        Reg("setpoint_w", 0, "f32", writable=True, unit="W"),
        Reg("run", 2, "u16", writable=True),
        Reg("measured_w", 3, "f32", unit="W"),
        Reg("state", 5, "u16"),
        Reg("p_min_w", 6, "f32", unit="W"),
        Reg("p_max_w", 8, "f32", unit="W"),
    ),
)
LOAD_COMMAND = ("setpoint_w", "run")
"""One write: the whole writable block."""
LOAD_TELEMETRY = ("setpoint_w", "run", "measured_w", "state", "p_min_w", "p_max_w")
"""One read: everything, including the readback of the command."""
RUN, SLEEP = 1, 0
STATE_MAX = 3  # highest state code a load may report (FAULT)


# --- the SunSpec meter ---

SUNSPEC_BASE = 40000
SUNSPEC_MARKER = 0x53756E53  # 'SunS'
SUNSPEC_END = 0xFFFF
COMMON_ID, COMMON_LEN = 1, 66
METER_MODEL_ID, METER_MODEL_LEN = 213, 124
FLOAT_METER_MODELS = (211, 212, 213, 214)
"""SunSpec float meters (single, split, wye, delta) share one point layout."""

# Model 213 points in order after ID and L: 61 float32 then Evt (uint32) = 124 registers.
_M213_FLOATS: tuple[str, ...] = (
    "A", "AphA", "AphB", "AphC",
    "PhV", "PhVphA", "PhVphB", "PhVphC",
    "PPV", "PPVphAB", "PPVphBC", "PPVphCA",
    "Hz",
    "W", "WphA", "WphB", "WphC",
    "VA", "VAphA", "VAphB", "VAphC",
    "VAR", "VARphA", "VARphB", "VARphC",
    "PF", "PFphA", "PFphB", "PFphC",
    *(
        f"{total}{phase}"
        for total in (
            "TotWhExp", "TotWhImp", "TotVAhExp", "TotVAhImp",
            "TotVArhImpQ1", "TotVArhImpQ2", "TotVArhExpQ3", "TotVArhExpQ4",
        )
        for phase in ("", "PhA", "PhB", "PhC")
    ),
)  # fmt: skip


def _meter_regs() -> tuple[Reg, ...]:
    b = SUNSPEC_BASE
    regs = [
        Reg("SunS", b, "u32"),
        Reg("C_ID", b + 2, "u16"),
        Reg("C_L", b + 3, "u16"),
        Reg("Mn", b + 4, "str", size=16),
        Reg("Md", b + 20, "str", size=16),
        Reg("Opt", b + 36, "str", size=8),
        Reg("Vr", b + 44, "str", size=8),
        Reg("SN", b + 52, "str", size=16),
        Reg("DA", b + 68, "u16"),
        Reg("Pad", b + 69, "u16"),
    ]
    m = b + 4 + COMMON_LEN
    regs += [Reg("ID", m, "u16"), Reg("L", m + 1, "u16")]
    regs += [Reg(name, m + 2 + 2 * i, "f32") for i, name in enumerate(_M213_FLOATS)]
    regs.append(Reg("Evt", m + 2 + 2 * len(_M213_FLOATS), "u32"))
    end = m + 2 + METER_MODEL_LEN
    regs += [Reg("End_ID", end, "u16"), Reg("End_L", end + 1, "u16")]
    return tuple(regs)


METER_MAP = RegisterMap("sunspec-meter", _meter_regs())
METER_MODEL_ADDR = METER_MAP["ID"].address
"""40070: where model 213 starts in our map. Clients discover it by walking the chain."""
M21X_OFFSETS: dict[str, int] = {
    name: METER_MAP[name].address - METER_MODEL_ADDR for name in ("Hz", "W", "TotWhImp")
}
"""Point offsets from a float meter model's ID register (Hz 26, W 28, TotWhImp 68)."""
