"""What drivers need to know of a device: its spec (SI units) and how to reach it.

The site configuration (`controller.config`) builds these from its TOML files and templates;
drivers and simulators take them as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# "none": no meter of its own (a parent of zones: its power is what its zones report).
MeterProtocol = Literal["modbus", "none"]
PositiveFloat = Annotated[float, Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MeterConfig(Strict):
    protocol: MeterProtocol = "modbus"
    host: str = "127.0.0.1"
    port: Port = 502
    unit: Annotated[int, Field(ge=0, le=255)] = 1
    poll_s: PositiveFloat = 0.1
    timeout_s: PositiveFloat = 1.0


class DeviceAccess(Strict):
    """How to log in to a device: credentials, TLS, protocol-specific addressing."""

    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    https: bool = False
    ca_file: Path | None = None
    """CA bundle for HTTPS; None uses the system store."""
    session_auth: bool = True
    """Redfish: log in with a session (X-Auth-Token); False uses HTTP basic auth."""
    chassis_id: str = "1"
    """Redfish: the Chassis member whose power is read and capped."""
    model: str | None = None
    """Hardware model, e.g. "S21"; reported by the simulator and shown in logs."""
    topic_root: str | None = None
    """Zone: the child rampd's topic root (default `<mqtt.prefix>/<device name>`)."""
    hmac_key_file: Path | None = None
    """Zone: the key that signs dispatches to it (the child's `dispatch.hmac_key_file`)."""


class SimParams(Strict):
    """Simulator only: the workload a device runs, as a fraction of its p_max.

    A GPU rack draws min(power cap, what its jobs demand); jobs are piecewise constant with a
    level drawn uniformly in [demand_min_frac, demand_max_frac] and a duration drawn around
    job_s. The default (1.0, 1.0) is a device that always draws its setpoint (a miner).
    """

    demand_min_frac: Annotated[float, Field(ge=0, le=1)] = 1.0
    demand_max_frac: Annotated[float, Field(ge=0, le=1)] = 1.0
    job_s: PositiveFloat = 120.0

    @model_validator(mode="after")
    def _ordered(self) -> SimParams:
        if self.demand_min_frac > self.demand_max_frac:
            raise ValueError("demand_min_frac must not exceed demand_max_frac")
        return self


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One expanded device row, SI units."""

    name: str
    kind: str
    protocol: str
    host: str
    port: int
    unit: int
    p_min_w: float
    p_max_w: float
    p_idle_w: float
    ramp_up_w_s: float
    ramp_down_w_s: float
    dead_time_s: float
    wake_s: float
    sleep_s: float
    step_w: float
    deadband_w: float
    noise_w: float
    priority: int
    poll_s: float
    timeout_s: float
    access: DeviceAccess = field(default_factory=DeviceAccess)
    sim: SimParams = field(default_factory=SimParams)
    setpoint_is_cap: bool = False
    ramps_itself: bool = False
    services_only: bool = False


@dataclass(frozen=True, slots=True)
class SiteSpec:
    """What the simulator serves: the devices, the site meter, and the mean non-flexible load
    behind the meter (cooling, auxiliaries)."""

    devices: Sequence[DeviceSpec]
    meter: MeterConfig
    noncontrollable_w: float = 0.0
    nominal_hz: float = 60.0
    """The grid's nominal frequency (the simulated grid's, and the meter serves it)."""
