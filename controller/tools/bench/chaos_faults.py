"""The chaos bench's faults: the seeded schedule (pure) and their injection on a running site.

The schedule is drawn from one `random.Random(seed)`: the first fault at `first_s`, then one
every `every_s` (uniform within min..max), each of a kind taken from a shuffled bag (every kind
once before any repeats, so a short run with few faults still sees each kind), with its own
draws (protocol, mode, share of devices, duration, selection seed). Nominal durations:

    device   10-30% of one protocol's devices silent, slow, answering garbage, or rebooting
             (no answer, then back at factory defaults) for 30-120 s
    rack     one rack BMC in ten (at least one) restarting: no answer for 30-120 s, then back
             with its sessions dropped and the cap at its factory default
    meter    the site meter silent for 5-20 s
    broker   mosquitto killed (SIGKILL), started again on the same port 1-5 s later
    daemon   `rampd run` killed (SIGKILL); the supervisor starts it again after RestartSec

Faults never overlap. At run time a fault is cut so it ends CLEAR_S before the next one is due
and before the replay ends (this is what compresses a short run: `--fault-every-s 20,40` gives
faults of at most 10-30 s); a broker or daemon outage is followed by CLEAR_S once telemetry is
back before the next fault starts. A fault with less than MIN_FAULT_S left, or an outage with
less than OUTAGE_TAIL_S of replay after it, is skipped (and listed as skipped).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from controller.tools.bench.chaos_procs import ChaosBroker, DaemonSupervisor
from controller.tools.bench.site_run import BenchError, http_json

FaultKind = Literal["device", "rack", "meter", "broker", "daemon"]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = ("device", "rack", "meter", "broker", "daemon")
OUTAGES: Final[frozenset[str]] = frozenset({"broker", "daemon"})
DEVICE_MODES: Final = ("silent", "slow", "garbage", "reboot")
DEVICE_PROTOCOLS: Final = ("luxos", "braiins", "whatsminer", "antminer", "modbus")
RACK_PROTOCOL: Final = "redfish"
DURATION_S: Final[Mapping[FaultKind, tuple[float, float]]] = {
    "device": (30.0, 120.0),
    "rack": (30.0, 120.0),
    "meter": (5.0, 20.0),
    "broker": (1.0, 5.0),
    "daemon": (0.0, 0.0),  # the supervisor's RestartSec decides
}
DEVICE_FRACTION: Final = (0.10, 0.30)
RACK_FRACTION: Final = 0.10
CLEAR_S: Final = 10.0
MIN_FAULT_S: Final = 3.0
OUTAGE_TAIL_S: Final = 20.0
RECOVER_WITHIN_S: Final = 180.0
"""How long an outage may take until telemetry is back before the bench gives up."""


@dataclass(frozen=True, slots=True)
class PlannedFault:
    n: int
    kind: FaultKind
    at_s: float
    """Seconds after the replay's start it is due."""
    duration_s: float
    protocol: str | None = None
    mode: str | None = None
    fraction: float | None = None
    seed: int = 0


@dataclass(slots=True)
class FaultRecord:
    """One fault as injected: unix times; `end` is when it was cleared (device, rack, meter),
    when the broker listened again, or when the supervisor started the daemon again."""

    plan: PlannedFault
    start: float = 0.0
    end: float = 0.0
    devices: list[str] = field(default_factory=list)
    detail: str = ""
    skipped: str | None = None
    back_at: float | None = None
    """Outages: the first telemetry after `end` (the daemon and the bench both back)."""


def usable_kinds(
    kinds: Sequence[FaultKind], protocols: Sequence[str], racks: int
) -> tuple[list[FaultKind], list[str]]:
    """The kinds this site can have, and why the others were dropped."""
    usable: list[FaultKind] = []
    dropped: list[str] = []
    for k in kinds:
        if k == "device" and not protocols:
            dropped.append(f"device (none of {', '.join(DEVICE_PROTOCOLS)} on the site)")
        elif k == "rack" and racks == 0:
            dropped.append("rack (no Redfish racks on the site)")
        else:
            usable.append(k)
    return usable, dropped


def plan_faults(
    rnd: random.Random,
    *,
    run_s: float,
    first_s: float,
    every_s: tuple[float, float],
    kinds: Sequence[FaultKind],
    protocols: Sequence[str],
) -> list[PlannedFault]:
    """The schedule over a replay of `run_s` seconds (see the module's docstring)."""
    if not kinds:
        return []
    out: list[PlannedFault] = []
    bag: list[FaultKind] = []
    at = first_s
    while at < run_s:
        if not bag:
            bag = list(kinds)
            rnd.shuffle(bag)
        kind = bag.pop()
        lo, hi = DURATION_S[kind]
        duration = round(rnd.uniform(lo, hi), 1)
        seed = rnd.randrange(2**31)
        protocol: str | None = None
        mode: str | None = None
        fraction: float | None = None
        if kind == "device":
            protocol = rnd.choice(sorted(protocols))
            mode = rnd.choice(DEVICE_MODES)
            fraction = round(rnd.uniform(*DEVICE_FRACTION), 2)
        elif kind == "rack":
            protocol, mode, fraction = RACK_PROTOCOL, "reboot", RACK_FRACTION
        out.append(
            PlannedFault(len(out) + 1, kind, round(at, 1), duration, protocol, mode, fraction, seed)
        )
        at += rnd.uniform(*every_s)
    return out


def describe(p: PlannedFault) -> str:
    if p.kind == "device":
        return f"{p.fraction:.0%} of {p.protocol} {p.mode}"
    if p.kind == "rack":
        return "rack BMC restart"
    if p.kind == "meter":
        return "meter silent"
    if p.kind == "broker":
        return "broker SIGKILL + restart"
    return "daemon SIGKILL + supervisor restart"


class Injector:
    """Injects planned faults through the simulator's control endpoint, the broker and the
    daemon's supervisor; `clear_all()` undoes whatever is still in force."""

    def __init__(
        self,
        control_url: str,
        names_by_protocol: Mapping[str, Sequence[str]],
        broker: ChaosBroker,
        supervisor: DaemonSupervisor,
    ) -> None:
        self.url = control_url.rstrip("/")
        self.names = {k: sorted(v) for k, v in names_by_protocol.items()}
        self.broker = broker
        self.supervisor = supervisor
        self._faulty: list[str] = []
        self._meter_silent = False

    async def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            answer = json.loads(await asyncio.to_thread(http_json, self.url + path, body))
        except (OSError, ValueError) as exc:
            raise BenchError(f"simulator control {path} {body}: {exc}") from None
        if not isinstance(answer, dict):
            raise BenchError(f"simulator control {path}: answered {answer!r}")
        return answer

    def pick(self, p: PlannedFault) -> list[str]:
        """The devices a device or rack fault hits: its share of the protocol, at least one,
        drawn with the fault's own seed."""
        pool = self.names.get(p.protocol or "", [])
        k = max(1, round((p.fraction or 0.0) * len(pool)))
        return sorted(random.Random(p.seed).sample(pool, min(k, len(pool))))

    async def inject(self, p: PlannedFault, duration_s: float) -> FaultRecord:
        """Inject, wait out its duration, clear; returns the record (times unix)."""
        rec = FaultRecord(p, start=time.time())
        if p.kind in ("device", "rack"):
            rec.devices = self.pick(p)
            reboot = p.mode == "reboot"
            # A reboot: no answer while the device boots, then back at its factory defaults.
            await self._post(
                "/faults", {"fault": "silent" if reboot else p.mode, "devices": rec.devices}
            )
            self._faulty = rec.devices
            rec.start = time.time()
            await asyncio.sleep(duration_s)
            await self._post(
                "/faults", {"fault": "reboot" if reboot else "none", "devices": rec.devices}
            )
            self._faulty = []
            what = "BMC restart" if p.kind == "rack" else p.mode
            rec.detail = f"{len(rec.devices)} {p.protocol} {what}"
        elif p.kind == "meter":
            await self._post("/meter", {"fault": "silent"})
            self._meter_silent = True
            rec.start = time.time()
            await asyncio.sleep(duration_s)
            await self._post("/meter", {"fault": "none"})
            self._meter_silent = False
            rec.detail = "meter silent"
        elif p.kind == "broker":
            self.broker.kill()
            rec.start = time.time()
            await asyncio.sleep(duration_s)
            await self.broker.start()
            rec.detail = f"broker down {duration_s:.1f} s"
        else:
            rec.start = self.supervisor.kill()
            restarted = await self.supervisor.restarted_after(rec.start, within=30.0)
            rec.end = restarted
            rec.detail = f"SIGKILL, restarted after {restarted - rec.start:.1f} s"
            return rec
        rec.end = time.time()
        return rec

    async def clear_all(self) -> None:
        """Whatever is still in force goes (a run cut short by an error)."""
        if not self.broker.running:
            await self.broker.start()
        if self._faulty:
            await self._post("/faults", {"fault": "none", "devices": self._faulty})
            self._faulty = []
        if self._meter_silent:
            await self._post("/meter", {"fault": "none"})
            self._meter_silent = False


async def run_schedule(
    plan: Sequence[PlannedFault],
    inj: Injector,
    *,
    t0: float,
    t_end: float,
    telemetry_after: Callable[[float, float], Awaitable[float | None]],
    say: Callable[[str], None],
) -> list[FaultRecord]:
    """Inject the plan against the replay [t0, t_end] (unix), one fault at a time."""
    records: list[FaultRecord] = []
    not_before = t0
    for i, p in enumerate(plan):
        start = max(t0 + p.at_s, not_before)
        due_next = t0 + plan[i + 1].at_s if i + 1 < len(plan) else t_end
        room = min(due_next, t_end) - CLEAR_S - start
        duration = min(p.duration_s, room)
        skip = None
        if p.kind in OUTAGES and t_end - start < OUTAGE_TAIL_S + p.duration_s:
            skip = f"less than {OUTAGE_TAIL_S:g} s of replay left after it"
        elif p.kind not in OUTAGES and duration < MIN_FAULT_S:
            skip = f"less than {MIN_FAULT_S:g} s before the next fault or the end"
        if skip is not None:
            records.append(FaultRecord(p, start=start, end=start, skipped=skip))
            say(f"  fault {p.n} ({describe(p)}) skipped: {skip}")
            continue
        await asyncio.sleep(max(0.0, start - time.time()))
        rec = await inj.inject(p, duration)
        records.append(rec)
        say(
            f"  fault {p.n} at {rec.start - t0:6.1f} s: {describe(p)}: {rec.detail} "
            f"({rec.end - rec.start:.1f} s)"
        )
        not_before = rec.end + CLEAR_S
        if p.kind in OUTAGES:
            rec.back_at = await telemetry_after(rec.end, RECOVER_WITHIN_S)
            if rec.back_at is None:
                raise BenchError(
                    f"no telemetry within {RECOVER_WITHIN_S:.0f} s after fault {p.n} "
                    f"({describe(p)}) ended"
                )
            say(f"    telemetry back {rec.back_at - rec.end:.1f} s after it ended")
            not_before = rec.back_at + CLEAR_S
    return records
