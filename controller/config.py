"""Site configuration: TOML files validated by pydantic, device templates expanded into rows.

A bad file fails at start with one message naming the file, the key and the problem
(`ConfigError`). Units on the wire of the config are kW and seconds, as operators write
them; `DeviceSpec` carries SI watts for the fleet.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from controller.market.economics import DeviceClass, Economics, device_classes
from controller.northbound.dsx_flex.config import DsxFlexConfig
from controller.northbound.openadr.config import OpenAdrConfig
from controller.wire.jws import KID, KeyRing, VerifyKey
from drivers.core import registry
from drivers.core.spec import DeviceAccess as DeviceAccess
from drivers.core.spec import DeviceSpec as DeviceSpec
from drivers.core.spec import MeterConfig as MeterConfig
from drivers.core.spec import Port, PositiveFloat, SiteSpec, Strict
from drivers.core.spec import SimParams as SimParams

FailsafePolicy = Literal["hold", "baseline", "min"]
NonNegFloat = Annotated[float, Field(ge=0)]


class ConfigError(Exception):
    """A configuration problem, phrased for the operator: file, key, what is wrong."""


class TlsConfig(Strict):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class MqttConfig(Strict):
    host: str = "127.0.0.1"
    port: Port = 1883
    prefix: str = "rampd"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    tls: TlsConfig | None = None
    reconnect_max_s: PositiveFloat = 30.0
    allow_plaintext: bool = False
    """Allow MQTT without TLS to a broker that is not on this host. Off: dispatches and
    credentials would cross the network readable and forgeable."""

    @model_validator(mode="after")
    def _tls_off_loopback(self) -> MqttConfig:
        plaintext_problem(self.host, self.tls is not None, self.allow_plaintext)
        return self

    @field_validator("prefix")
    @classmethod
    def _prefix_is_topic_safe(cls, v: str) -> str:
        if not v or any(c in v for c in "#+\0") or v.startswith("/") or v.endswith("/"):
            raise ValueError("must be a non-empty topic level without '#', '+' or edge '/'")
        return v


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (names are not resolved: anything else is remote)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plaintext_problem(host: str, tls: bool, allowed: bool) -> None:
    """Raise ValueError when MQTT would go in plaintext to a broker off this host."""
    if not tls and not allowed and not is_loopback(host):
        raise ValueError(
            f"plaintext MQTT to {host!r}, which is not this host: configure [mqtt.tls], "
            "or set allow_plaintext = true if the network is trusted"
        )


class SiteLimits(Strict):
    """What the dispatcher may ask for, and how close counts as arrived."""

    min_kw: NonNegFloat = 0.0
    max_kw: PositiveFloat
    deadband_kw: NonNegFloat = 5.0
    telemetry_max_age_s: PositiveFloat = 10.0
    max_issued_age_s: PositiveFloat = 30.0
    max_polls_per_s: PositiveFloat = 2000.0
    """Device polls per second this host makes at most. Past it, every device's poll period
    is stretched by the same factor: at 10,000 devices polled each second, polls alone would
    take a core from the commands and the control cycle (`rampd bench fanout`)."""

    @model_validator(mode="after")
    def _ordered(self) -> SiteLimits:
        if self.min_kw >= self.max_kw:
            raise ValueError("min_kw must be below max_kw")
        return self


class FailsafeConfig(Strict):
    dispatch_timeout_s: PositiveFloat = 60.0
    policy: FailsafePolicy = "hold"
    baseline_kw: NonNegFloat | None = None
    ramp_s: NonNegFloat = 30.0

    @model_validator(mode="after")
    def _baseline_given(self) -> FailsafeConfig:
        if self.policy == "baseline" and self.baseline_kw is None:
            raise ValueError("policy 'baseline' needs baseline_kw")
        return self


class MetricsConfig(Strict):
    listen: str = "127.0.0.1:9470"
    per_device: bool = False
    """Export power and setpoint per device (a label per device: small sites only)."""

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        split_host_port(v, default_port=9470)
        return v


class ControlConfig(Strict):
    """Gains of the meter feedback; the defaults suit a 100 ms cycle."""

    observer_tau_s: PositiveFloat = 1.0
    meter_max_age_s: PositiveFloat = 1.0
    meter_lag_s: NonNegFloat = 0.05
    """The meter's own latency (sampling/averaging); a 10 Hz meter holds each value ~50 ms."""


class FrequencySource(Strict):
    """A frequency source apart from the site meter: a protective relay or PMU over Modbus
    TCP, its frequency as a 32-bit float (two holding registers, big-endian words)."""

    host: str
    port: Port = 502
    unit: Annotated[int, Field(ge=0, le=255)] = 1
    address: Annotated[int, Field(ge=0, le=65534)]
    """Holding register of the frequency's first word."""


class GridConfig(Strict):
    """The grid the site is on, and how rampd reads its frequency."""

    nominal_hz: Literal[50, 60] = 60
    poll_s: Annotated[float, Field(gt=0, le=0.05)] = 0.05
    """Frequency read on its own fast path, at least 20 times a second."""
    max_age_s: Annotated[float, Field(gt=0, le=1.0)] = 0.2
    """A reading older than this is stale: it triggers nothing."""
    source: FrequencySource | None = None
    """None: the site meter's frequency (SunSpec model 21x `Hz`)."""


class FfrConfig(Strict):
    """Fast Frequency Response: shed `armed_kw` within `deadline_s` of frequency falling to
    `trigger_hz`, hold it up to `sustain_s` or until recalled (ERCOT: 59.85 Hz, 15 cycles)."""

    armed_kw: NonNegFloat = 0.0
    trigger_hz: PositiveFloat = 59.85
    deadline_s: PositiveFloat = 0.25
    sustain_s: PositiveFloat = 900.0


class UfrConfig(Strict):
    """Load on an under-frequency relay (ERCOT RRS: 59.70 Hz, within 30 cycles)."""

    armed_kw: NonNegFloat = 0.0
    trigger_hz: PositiveFloat = 59.70
    deadline_s: PositiveFloat = 0.5
    sustain_s: PositiveFloat = 900.0


class PfrConfig(Strict):
    """Droop (primary frequency response): power moves with frequency outside the deadband,
    `band_kw` at most each way, on top of the dispatch. Off while `band_kw` is 0."""

    droop: Annotated[float, Field(gt=0, le=0.2)] = 0.05
    deadband_hz: NonNegFloat = 0.017
    band_kw: NonNegFloat = 0.0


class ServicesConfig(Strict):
    ffr: FfrConfig = FfrConfig()
    ufr: UfrConfig = UfrConfig()
    pfr: PfrConfig = PfrConfig()


class RampLimitsConfig(Strict):
    """Ramp-rate limits on the site's load (None: no limit). Dispatches and restorations
    keep to them; frequency deployments and the failsafe are exempt."""

    up_kw_per_min: PositiveFloat | None = None
    down_kw_per_min: PositiveFloat | None = None
    max_change_kw_per_5s: PositiveFloat | None = None
    """No more change than this within any rolling 5 s window."""


class ReserveConfig(Strict):
    """Fast reserve: power the site keeps reachable within 5 s while it follows its target.

    A site that sells fast up-ramps must not put its flexibility where it cannot come back
    quickly (a sleeping miner needs minutes to wake). The controller holds at least this
    much on devices that can move it within 5 s, and reports what it holds."""

    up_kw_5s: NonNegFloat = 0.0
    down_kw_5s: NonNegFloat = 0.0


class EconomicsConfig(Strict):
    """What mining earns: each miner class's breakeven power price follows from these and
    its efficiency (hashprice / efficiency). Updated at run time over MQTT
    (`<prefix>/<site>/economics`)."""

    hashprice_usd_per_ph_day: PositiveFloat
    """Mining revenue per PH/s per day (before the pool fee)."""
    pool_fee: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class PricesConfig(Strict):
    """Where real-time power prices come from: MQTT (`<prefix>/<site>/price`, always
    listened to), and optionally a CSV file or an HTTP source polled every `poll_s`."""

    csv: Path | None = None
    """Rows `interval_start_utc,price_usd_per_mwh` (ISO 8601 UTC), as the ERCOT data."""
    http: str | None = None
    """A URL answering one price message (the MQTT payload) or a list of them."""
    poll_s: PositiveFloat = 60.0
    timeout_s: Annotated[float, Field(gt=0, le=30)] = 5.0
    interval_s: PositiveFloat = 900.0
    """Interval length of CSV rows (ERCOT real-time settlement: 15 min)."""
    grace_s: NonNegFloat = 60.0
    """A price is stale (flagged, ignored) once its interval has ended this long ago."""


class PriceRuleConfig(Strict):
    """Curtail a class at or above its strike (its breakeven, or its work value for GPU
    racks) for `stop_after` consecutive intervals; at once at `high_strike_usd_per_mwh`;
    resume after `resume_after` intervals below, no earlier than `min_stopped_s`, spread
    over `resume_stagger_s`. Off while `enabled` is false."""

    enabled: bool = True
    stop_after: Annotated[int, Field(ge=1, le=96)] = 1
    resume_after: Annotated[int, Field(ge=1, le=96)] = 1
    high_strike_usd_per_mwh: PositiveFloat | None = None
    min_stopped_s: NonNegFloat = 900.0
    resume_stagger_s: NonNegFloat = 300.0


class PeaksConfig(Strict):
    """Coincident-peak avoidance: during a peak alert (MQTT `<prefix>/<site>/peak`) of at
    least `min_probability`, or inside a configured window, the site goes to `peak_kw`.
    Windows: `variant` 4cp (June-September) or 12cp (every month), the local `hours` that
    start a window (`timezone`), weekdays only unless `weekends`."""

    peak_kw: NonNegFloat | None = None
    """None: peaks are not acted on."""
    min_probability: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    variant: Literal["none", "4cp", "12cp"] = "none"
    hours: list[Annotated[int, Field(ge=0, le=23)]] = Field(default_factory=list)
    timezone: str = "America/Chicago"
    weekends: bool = False

    @field_validator("timezone")
    @classmethod
    def _tz_ok(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v


class MvConfig(Strict):
    """Measurement and verification of curtailment events: the baseline is the average of
    the last `baseline_minutes` before the event (`recent`), or from the journal's like days
    over the hour it starts in (`high_4_of_5`: the 4 highest of the last 5 weekdays, on a
    weekend the 2 highest of the last 3 weekend days; falls back to `recent` without them)."""

    baseline: Literal["recent", "high_4_of_5"] = "recent"
    baseline_minutes: Annotated[float, Field(gt=0, le=1440)] = 15.0
    ramp_allowance_s: NonNegFloat = 60.0
    """A commitment or peak is judged met from this long after it starts (or its level drops)."""


class DeviceTemplate(Strict):
    """One device class: its protocol, limits and dynamics. Numbers in a template are sourced."""

    kind: str
    protocol: str
    """A registered driver's protocol (`drivers.core.registry`), checked at load."""
    p_min_kw: NonNegFloat
    p_max_kw: PositiveFloat
    p_idle_kw: NonNegFloat = 0.0
    ramp_up_kw_s: PositiveFloat
    ramp_down_kw_s: PositiveFloat
    dead_time_s: NonNegFloat = 0.0
    wake_s: NonNegFloat = 0.0
    sleep_s: NonNegFloat = 0.0
    step_kw: NonNegFloat = 0.0
    deadband_kw: NonNegFloat = 0.0
    noise_kw: NonNegFloat = 0.0
    priority: int = 0
    port: Port = 502
    unit: Annotated[int, Field(ge=0, le=255)] = 1
    poll_s: PositiveFloat = 2.0
    timeout_s: Annotated[float, Field(gt=0, le=10)] = 1.0
    setpoint_is_cap: bool = False
    """The setpoint is a ceiling: the device draws what its workload needs, up to it (a GPU
    power cap). The controller then learns each device's demand from its readings."""
    services_only: bool = False
    """Moved only by the grid services (a feeder breaker tripped for fast frequency
    response): regular control leaves it as it is, running."""
    ramps_itself: bool = False
    """The device is a controller of its own (a rampd zone) that moves to a new setpoint as
    fast as it can: it gets its steady-state share at once, never a setpoint ramped cycle
    by cycle, which it would follow a dead time late."""
    efficiency_j_per_th: PositiveFloat | None = None
    """A miner's efficiency at the wall: its breakeven price is hashprice / efficiency."""
    value_usd_per_mwh: PositiveFloat | None = None
    """What the work of a non-mining load (a GPU rack) is worth per MWh: its price strike."""
    access: DeviceAccess = DeviceAccess()
    sim: SimParams = SimParams()

    @model_validator(mode="after")
    def _ordered(self) -> DeviceTemplate:
        if self.efficiency_j_per_th is not None and self.value_usd_per_mwh is not None:
            raise ValueError("give efficiency_j_per_th (miners) or value_usd_per_mwh, not both")
        if self.p_min_kw > self.p_max_kw:
            raise ValueError("p_min_kw must not exceed p_max_kw")
        if self.p_idle_kw > self.p_min_kw:
            raise ValueError("p_idle_kw must not exceed p_min_kw")
        return self


class DeviceGroup(Strict):
    """Devices listed one by one (count 1) or generated from a template over an address range."""

    name: str
    template: str
    count: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    address: ipaddress.IPv4Address | None = None
    """Required, except for zones (child rampd instances, reached by MQTT topic)."""
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError("use letters, digits, '-' and '_'")
        return v


class JournalConfig(Strict):
    path: Path | None = None
    """SQLite file. Default: $STATE_DIRECTORY/journal.sqlite (systemd); else no journal."""
    retention_days: PositiveFloat = 90.0
    telemetry_retention_days: PositiveFloat = 14.0


MIN_HMAC_KEY_BYTES = 16


class DispatchConfig(Strict):
    keys: dict[str, Path] = Field(default_factory=dict)
    """JWS keys by `kid` (1-64 of letters, digits and `. _ : -`): a shared-secret file (HS256,
    at least 16 bytes, one trailing newline ignored) or a PEM EC P-256 public key (ES256).
    When any is set, every dispatch and heartbeat must be a JWS from one of them; two at once
    is a rotation."""
    accept_legacy_sig: bool = False
    """With `keys`: also accept the legacy `sig` dispatches (keyed with `hmac_key_file`) and
    unsigned heartbeats, for one release while dispatchers move to JWS."""
    hmac_key_file: Path | None = None
    """Legacy shared HMAC-SHA256 key (at least 16 bytes; one trailing newline is ignored).
    Alone (no `keys`): every dispatch must carry a valid `sig`, heartbeats are not checked.
    Without any key, a `sig` field is ignored and a JWS refused."""
    max_per_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 20.0
    """Dispatches taken a second on average; beyond it (and `burst`) a dispatch is refused
    `rate_limited` before any other check, so a flood costs the daemon little."""
    burst: Annotated[int, Field(ge=1)] = 40
    """Dispatches taken at once above the rate (the token bucket's size)."""

    @field_validator("keys")
    @classmethod
    def _kids_ok(cls, v: dict[str, Path]) -> dict[str, Path]:
        for kid in v:
            if not KID.fullmatch(kid):
                raise ValueError(f"kid {kid!r}: use 1-64 of letters, digits and . _ : -")
        return v

    @model_validator(mode="after")
    def _legacy_ok(self) -> DispatchConfig:
        if self.accept_legacy_sig and (self.hmac_key_file is None or not self.keys):
            raise ValueError("accept_legacy_sig needs both keys and hmac_key_file")
        if self.keys and self.hmac_key_file is not None and not self.accept_legacy_sig:
            raise ValueError(
                "hmac_key_file is unused beside keys: remove it, or set accept_legacy_sig = true"
            )
        return self


class SiteConfig(Strict):
    site_id: str
    cycle_s: Annotated[float, Field(ge=0.01, le=5.0)] = 0.1
    mqtt: MqttConfig = MqttConfig()
    site: SiteLimits
    failsafe: FailsafeConfig = FailsafeConfig()
    metrics: MetricsConfig = MetricsConfig()
    control: ControlConfig = ControlConfig()
    reserve: ReserveConfig = ReserveConfig()
    grid: GridConfig = GridConfig()
    services: ServicesConfig = ServicesConfig()
    ramp_limits: RampLimitsConfig = RampLimitsConfig()
    journal: JournalConfig = JournalConfig()
    dispatch: DispatchConfig = DispatchConfig()
    economics: EconomicsConfig | None = None
    prices: PricesConfig = PricesConfig()
    price_rule: PriceRuleConfig = PriceRuleConfig()
    peaks: PeaksConfig = PeaksConfig()
    mv: MvConfig = MvConfig()
    dsx_flex: DsxFlexConfig | None = None
    openadr: OpenAdrConfig | None = None
    meter: MeterConfig
    devices: list[DeviceGroup] = Field(min_length=1)
    noncontrollable_kw: NonNegFloat = 0.0
    """Simulator only: mean non-flexible load (cooling, auxiliaries) behind the meter."""

    @field_validator("site_id")
    @classmethod
    def _site_id_ok(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError("use letters, digits, '-' and '_'")
        return v


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    path: Path
    site: SiteConfig
    templates: dict[str, DeviceTemplate]
    devices: tuple[DeviceSpec, ...]
    dispatch_key: KeyRing | None = field(default=None, repr=False)
    """The keys read from `dispatch.keys` and `dispatch.hmac_key_file` at load; None:
    dispatches and heartbeats unsigned."""

    @property
    def poll_stretch(self) -> float:
        """What every device's poll period is multiplied by (`SiteLimits.max_polls_per_s`)."""
        return poll_stretch(self.devices, self.site.site.max_polls_per_s)

    @property
    def sim_site(self) -> SiteSpec:
        """What a simulator of this site serves."""
        return SiteSpec(
            self.devices,
            self.site.meter,
            self.site.noncontrollable_kw * 1e3,
            nominal_hz=self.site.grid.nominal_hz,
        )

    def device_classes(self) -> list[DeviceClass]:
        """The fleet's classes by kind with their templates' economics (overrides applied)."""
        econ = class_economics(self.site.devices, self.templates, self.path)
        return device_classes(
            self.devices,
            {k: e for k, (e, _) in econ.items()},
            {k: v for k, (_, v) in econ.items()},
        )

    @property
    def economics(self) -> Economics | None:
        e = self.site.economics
        return None if e is None else Economics(e.hashprice_usd_per_ph_day, e.pool_fee)

    @property
    def topic_root(self) -> str:
        return f"{self.site.mqtt.prefix}/{self.site.site_id}"


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """'host:port', 'host' or '[v6]:port' -> (host, port); ValueError when malformed."""
    host, sep, port_s = text.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        return text.strip("[]"), default_port
    if not port_s.isdigit() or not 0 <= int(port_s) < 65536:  # 0: any free port
        raise ValueError(f"bad port in {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port_s)


def _loc(err: ErrorDetails) -> str:
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def _format_validation(path: Path, exc: ValidationError, prefix: str = "") -> str:
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors():
        key = f"{prefix}{_loc(err)}"
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def read_hmac_key(
    config_path: Path, key_file: Path | None, what: str = "dispatch.hmac_key_file"
) -> bytes | None:
    """The dispatch HMAC key from its file, or None when none is configured.

    One trailing newline (LF or CRLF) is stripped; anything else is part of the key. A file
    that is missing, unreadable, empty or shorter than MIN_HMAC_KEY_BYTES is a ConfigError
    naming `what` (the setting).
    """
    if key_file is None:
        return None
    where = f"{config_path}: {what}"
    try:
        key = key_file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {key_file}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {key_file}: {exc.strerror or exc}") from None
    if key.endswith(b"\r\n"):
        key = key[:-2]
    elif key.endswith(b"\n"):
        key = key[:-1]
    if not key:
        raise ConfigError(f"{where}: {key_file} is empty")
    if len(key) < MIN_HMAC_KEY_BYTES:
        raise ConfigError(
            f"{where}: key in {key_file} too short ({len(key)} < {MIN_HMAC_KEY_BYTES} bytes)"
        )
    return key


def read_dispatch_keys(config_path: Path, cfg: DispatchConfig) -> KeyRing | None:
    """The site's dispatch keys (`dispatch.keys`, `dispatch.hmac_key_file`), or None when
    none is configured. A kid's file holding a PEM is an ES256 public key, anything else an
    HS256 secret (as `read_hmac_key` reads it). A bad file is a ConfigError naming the kid."""
    legacy = read_hmac_key(config_path, cfg.hmac_key_file)
    keys: dict[str, VerifyKey] = {}
    for kid, key_file in cfg.keys.items():
        what = f"dispatch.keys.{kid}"
        try:
            head = key_file.read_bytes()[:64]
        except OSError:
            head = b""  # read_hmac_key says what is wrong with the file
        if head.lstrip().startswith(b"-----BEGIN"):
            keys[kid] = _read_es256_key(config_path, key_file, what)
        else:
            secret = read_hmac_key(config_path, key_file, what)
            assert secret is not None  # a file was named
            keys[kid] = VerifyKey.hs256(secret)
    if not keys and legacy is None:
        return None
    return KeyRing(keys, legacy_key=legacy, accept_legacy=cfg.accept_legacy_sig)


def _read_es256_key(config_path: Path, key_file: Path, what: str) -> VerifyKey:
    where = f"{config_path}: {what}: {key_file}"
    pem = key_file.read_bytes()
    if b"PRIVATE KEY" in pem:
        # The site verifies only; its private half belongs with the dispatcher.
        raise ConfigError(
            f"{where} holds a private key: give the public one (openssl ec -in KEY -pubout)"
        )
    try:
        public = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{where}: not a PEM public key ({exc})") from None
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{where}: not an EC public key (ES256 needs EC P-256)")
    try:
        return VerifyKey.es256(public)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def template_dirs(config_path: Path) -> list[Path]:
    """Where templates are looked up: beside the site file, then the shipped ones."""
    shipped = Path(__file__).resolve().parent.parent / "configs" / "devices"
    return [config_path.parent / "devices", shipped]


def _load_template(name: str, config_path: Path) -> tuple[Path, DeviceTemplate]:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad template name {name!r}")
    for folder in template_dirs(config_path):
        candidate = folder / f"{name}.toml"
        if candidate.is_file():
            raw = _read_toml(candidate)
            try:
                return candidate, DeviceTemplate.model_validate(raw)
            except ValidationError as exc:
                raise ConfigError(_format_validation(candidate, exc)) from None
    searched = ", ".join(str(d) for d in template_dirs(config_path))
    raise ConfigError(f"{config_path}: devices: template {name!r} not found in {searched}")


def known_protocols() -> tuple[str, ...]:
    """Protocols with a registered driver, the built-in ones loaded first."""
    # Imported here, not at the top: the zone driver imports this module.
    import controller.protocols  # noqa: F401

    return registry.known()


def _expand(
    groups: list[DeviceGroup], templates: dict[str, DeviceTemplate], path: Path
) -> Iterator[DeviceSpec]:
    seen: set[str] = set()
    for gi, group in enumerate(groups):
        key = f"devices.{gi}"
        base = templates[group.template]
        try:
            tpl = DeviceTemplate.model_validate({**base.model_dump(), **group.overrides})
        except ValidationError as exc:
            raise ConfigError(_format_validation(path, exc, prefix=f"{key}.overrides.")) from None
        if tpl.protocol not in known_protocols():
            raise ConfigError(
                f"{path}: {key}.template {group.template!r}: unknown device protocol "
                f"{tpl.protocol!r}; known: {', '.join(known_protocols())}"
            )
        if group.address is None and tpl.protocol != "zone":
            raise ConfigError(f"{path}: {key}.address: required for {tpl.protocol} devices")
        last = int(group.address or 0) + group.count - 1
        if last > int(ipaddress.IPv4Address("255.255.255.254")):
            raise ConfigError(f"{path}: {key}.address: range of {group.count} overflows IPv4")
        if group.name in seen:
            raise ConfigError(f"{path}: {key}.name: duplicate group name {group.name!r}")
        seen.add(group.name)
        width = max(4, len(str(group.count)))
        for i in range(group.count):
            yield DeviceSpec(
                name=group.name if group.count == 1 else f"{group.name}-{i:0{width}d}",
                kind=tpl.kind,
                protocol=tpl.protocol,
                host="" if group.address is None else str(group.address + i),
                port=tpl.port,
                unit=tpl.unit,
                p_min_w=tpl.p_min_kw * 1e3,
                p_max_w=tpl.p_max_kw * 1e3,
                p_idle_w=tpl.p_idle_kw * 1e3,
                ramp_up_w_s=tpl.ramp_up_kw_s * 1e3,
                ramp_down_w_s=tpl.ramp_down_kw_s * 1e3,
                dead_time_s=tpl.dead_time_s,
                wake_s=tpl.wake_s,
                sleep_s=tpl.sleep_s,
                step_w=tpl.step_kw * 1e3,
                deadband_w=tpl.deadband_kw * 1e3,
                noise_w=tpl.noise_kw * 1e3,
                priority=tpl.priority,
                poll_s=tpl.poll_s,
                timeout_s=tpl.timeout_s,
                access=tpl.access,
                sim=tpl.sim,
                setpoint_is_cap=tpl.setpoint_is_cap,
                ramps_itself=tpl.ramps_itself,
                services_only=tpl.services_only,
            )


def class_economics(
    groups: list[DeviceGroup], templates: dict[str, DeviceTemplate], path: Path
) -> dict[str, tuple[float | None, float | None]]:
    """(efficiency_j_per_th, value_usd_per_mwh) by device kind, overrides applied; one kind
    with two different figures is a config error (a class has one breakeven)."""
    out: dict[str, tuple[float | None, float | None]] = {}
    for gi, group in enumerate(groups):
        tpl = DeviceTemplate.model_validate(
            {**templates[group.template].model_dump(), **group.overrides}
        )
        figures = (tpl.efficiency_j_per_th, tpl.value_usd_per_mwh)
        if out.setdefault(tpl.kind, figures) != figures:
            raise ConfigError(
                f"{path}: devices.{gi}: kind {tpl.kind!r} has other economics in an earlier "
                "group; give each class one efficiency_j_per_th or value_usd_per_mwh"
            )
    return out


def poll_demand(devices: Sequence[DeviceSpec]) -> float:
    """Polls a second the devices ask for at their own periods. Zones are not counted:
    their telemetry is pushed, and reading it is local."""
    return sum(1.0 / d.poll_s for d in devices if d.protocol != "zone")


def poll_stretch(devices: Sequence[DeviceSpec], max_polls_per_s: float) -> float:
    """The factor every device's poll period is multiplied by to keep the host's polls
    within `max_polls_per_s` (1.0 when they fit)."""
    return max(1.0, poll_demand(devices) / max_polls_per_s)


def _check_poll_budget(p: Path, limits: SiteLimits, devices: Sequence[DeviceSpec]) -> None:
    """A stretch must leave readings fresh: a poll may wait up to a period behind a burst,
    so the longest stretched period must fit twice within telemetry_max_age_s."""
    stretch = poll_stretch(devices, limits.max_polls_per_s)
    if stretch == 1.0:
        return
    longest = stretch * max(d.poll_s for d in devices if d.protocol != "zone")
    if 2.0 * longest > limits.telemetry_max_age_s:
        raise ConfigError(
            f"{p}: site.max_polls_per_s: {len(devices)} devices within "
            f"{limits.max_polls_per_s:g} polls/s are polled {stretch:.1f}x slower than their "
            f"poll_s, the slowest every {longest:.1f} s: over half of "
            f"site.telemetry_max_age_s ({limits.telemetry_max_age_s:g} s). Raise either "
            "(a faster host), or split the devices over zones"
        )


def load_config(path: str | Path) -> LoadedConfig:
    """Read, validate and expand a site file; raise ConfigError with file, key and problem."""
    p = Path(path)
    raw = _read_toml(p)
    try:
        site = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation(p, exc)) from None
    templates: dict[str, DeviceTemplate] = {}
    for gi, group in enumerate(site.devices):
        if group.template not in templates:
            try:
                templates[group.template] = _load_template(group.template, p)[1]
            except ValueError as exc:
                raise ConfigError(f"{p}: devices.{gi}.template: {exc}") from None
    devices = tuple(_expand(site.devices, templates, p))
    endpoints: dict[tuple[str, int], str] = {(site.meter.host, site.meter.port): "meter"}
    for dev in devices:
        if not dev.host:  # a zone: reached by topic, not by address
            continue
        other = endpoints.setdefault((dev.host, dev.port), dev.name)
        if other != dev.name:
            raise ConfigError(f"{p}: devices: {dev.name} and {other} share {dev.host}:{dev.port}")
    _check_poll_budget(p, site.site, devices)
    zones_wrong = None if site.dsx_flex is None else site.dsx_flex.zone_problem(devices)
    if zones_wrong is not None:  # a zone feed names a device of this site that is a zone
        raise ConfigError(f"{p}: dsx_flex.{zones_wrong}")
    class_economics(site.devices, templates, p)  # checked at load, not first at run time
    dispatch_key = read_dispatch_keys(p, site.dispatch)
    return LoadedConfig(
        path=p, site=site, templates=templates, devices=devices, dispatch_key=dispatch_key
    )
