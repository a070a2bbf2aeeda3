"""`[dsx_flex]` in the site file: who the agent is, whom it listens to, the keys it trusts,
its feeds, when a breach is one, and the DSX broker (the site's `[mqtt]` where not given).

Feeds map a feed tag to a place: `"site"` (the whole site's meter; its target is the
`dsx_flex` rail) or `"zone:<device name>"` (a zone of this parent, a `zone` device row: the
zone's measured power, from its telemetry; its target caps that row). One feed per place; a
site feed and zone feeds may coexist. Whether a named zone is a zone device of this site is
checked once the devices are expanded (`zone_problem`).

This module is imported by `controller.config`: it must not import it back at load time
(`DsxMqtt.resolve` imports it when called).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from controller.northbound.dsx_flex.signing import PublicKey, Signer, load_public_key, load_signer
from drivers.core.spec import DeviceSpec, Port, PositiveFloat, Strict

if TYPE_CHECKING:
    from controller.config import MqttConfig

NonNegFloat = Annotated[float, Field(ge=0)]
Role = Literal["dsx-flex-agent", "poweragent"]
"""The agent's role in its topics and `source`: DSX Flex 1.7 says `dsx-flex-agent`, older
deployments `poweragent` (whose `source` the 1.7 schema's pattern no longer admits)."""
SITE: Final = "site"
ZONE_PREFIX: Final = "zone:"
"""`"zone:<device name>"`: a feed of a zone of this parent (a `zone` device row)."""


def zone_of(place: str) -> str | None:
    """The zone device a feed's place names (None: the site)."""
    return place[len(ZONE_PREFIX) :] if place.startswith(ZONE_PREFIX) else None


def _place(tag: str, place: str) -> str:
    if place == SITE:
        return place
    zone = zone_of(place)
    if zone is None or not zone or zone != zone.strip():
        raise ValueError(
            f'{tag} = {place!r}: a place is "site" or "zone:<device name>" (a zone of this parent)'
        )
    return place


def _topic_level(v: str) -> str:
    """An identifier that is one MQTT topic level and one `source` path segment."""
    if not v or any(c in v for c in "/#+\0") or v != v.strip():
        raise ValueError(f"{v!r}: use a non-empty name without '/', '#', '+' or edge spaces")
    return v


class DsxTls(Strict):
    """As `[mqtt.tls]` (kept apart: `controller.config` imports this module)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class DsxMqtt(Strict):
    """The DSX broker. Every setting not given here is the site's `[mqtt]` one, so an empty
    table means the site's broker with the site's credentials."""

    host: str | None = None
    port: Port | None = None
    client_id: str | None = None
    """Default: the site's `client_id` + `-dsx` (none: a random one, and a clean session).
    With a client id the session persists, so targets sent while the agent reconnects are
    delivered when it is back (a target is fire-and-forget: nobody would send it again)."""
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] | None = None
    tls: DsxTls | None = None
    reconnect_max_s: PositiveFloat | None = None
    allow_plaintext: bool | None = None

    def resolve(self, site: MqttConfig) -> MqttConfig:
        """The connection settings: these over the site's (the same validation applies)."""
        from controller.config import MqttConfig, TlsConfig

        given = {k: getattr(self, k) for k in self.model_fields_set}
        if "tls" in given and self.tls is not None:
            given["tls"] = TlsConfig(**self.tls.model_dump())
        if "client_id" not in given:
            given["client_id"] = None if site.client_id is None else f"{site.client_id}-dsx"
        merged = site.model_dump() | given
        return MqttConfig.model_validate(merged)


class BreachConfig(Strict):
    """When the measured load above the active target is a breach."""

    tolerance_pct: Annotated[float, Field(ge=0, le=100)] = 2.0
    """Above the target by more than this share of it (or `tolerance_kw`, the larger)."""
    tolerance_kw: NonNegFloat = 10.0
    grace_s: PositiveFloat = 30.0
    """... continuously for this long (the ramp to a new target happens within it)."""
    escalate_after_s: PositiveFloat = 120.0
    """An active breach still there this long after detection is escalated."""
    resolve_after_s: PositiveFloat = 10.0
    """Back within tolerance for this long: resolved."""


class DsxFlexConfig(Strict):
    agent_id: str
    """This agent's identifier: topics `grid/v1/<role>/<agent_id>/...`, source likewise."""
    role: Role = "dsx-flex-agent"
    isv_ids: list[str] = Field(min_length=1)
    """The ISVs whose load targets are applied; any other ISV's are refused (and counted)."""
    infra_ids: list[str] = Field(default_factory=list)
    """Infrastructure agents whose enforcement events are journalled (empty: any)."""
    keys: dict[str, Path] = Field(default_factory=dict)
    """`kid` -> public key file (PEM, or a JWK as JSON): EC P-256 (ES256) or RSA (RS256)."""
    require_signature: bool = True
    """Off: a `data` that is a plain JSON object is accepted too (the schema allows it). A
    JWS is always verified."""
    sign_key_file: Path | None = None
    """The agent's private key (PEM or JWK): status and breach `data` go out as a JWS under
    `sign_kid`. None: as plain JSON objects."""
    sign_kid: str | None = None
    status_period_s: Annotated[float, Field(ge=0.5)] = 15.0
    max_event_age_s: PositiveFloat = 300.0
    """A load target whose `time` is older than this (or this far ahead) is refused: a
    replayed signed target must not come back into force."""
    feeds: dict[str, str] = Field(default_factory=dict)
    """Feed tag -> the place it feeds: `"site"` (the site's meter: its target is the
    `dsx_flex` rail) or `"zone:<device name>"` (that zone's measured power: its target caps
    the zone's row in this parent's allocation). One feed per place. Empty: one feed named
    after the site."""
    breach: BreachConfig = BreachConfig()
    mqtt: DsxMqtt = DsxMqtt()

    _public: dict[str, PublicKey] = PrivateAttr(default_factory=dict)
    _signer: Signer | None = PrivateAttr(default=None)

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, v: str) -> str:
        return _topic_level(v)

    @field_validator("isv_ids", "infra_ids")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        for item in v:
            _topic_level(item)
        if len(set(v)) != len(v):
            raise ValueError("listed twice")
        return v

    @field_validator("feeds")
    @classmethod
    def _places(cls, v: dict[str, str]) -> dict[str, str]:
        for tag, place in v.items():
            _topic_level(tag)
            _place(tag, place)
        # One meter per place: rampd cannot tell two feeds of one place apart.
        seen: dict[str, str] = {}
        for tag, place in v.items():
            if place in seen:
                raise ValueError(f"{seen[place]} and {tag} both feed {place!r}: one feed per place")
            seen[place] = tag
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DsxFlexConfig:
        if self.require_signature and not self.keys:
            raise ValueError("require_signature needs at least one key in keys")
        if (self.sign_key_file is None) != (self.sign_kid is None):
            raise ValueError("sign_key_file and sign_kid go together")
        for kid, path in self.keys.items():
            try:
                self._public[kid] = load_public_key(kid, path)
            except ValueError as exc:
                raise ValueError(f"keys.{kid}: {exc}") from None
        if self.sign_key_file is not None and self.sign_kid is not None:
            try:
                self._signer = load_signer(self.sign_kid, self.sign_key_file)
            except ValueError as exc:
                raise ValueError(f"sign_key_file: {exc}") from None
        return self

    @property
    def public_keys(self) -> dict[str, PublicKey]:
        """The trusted keys by `kid`, read and checked when the file was loaded."""
        return dict(self._public)

    @property
    def signer(self) -> Signer | None:
        return self._signer

    def feed_map(self, site_id: str) -> dict[str, str]:
        """Feed tag -> place, the default feed (the site, tagged with its id) if none."""
        return dict(self.feeds) if self.feeds else {site_id: SITE}

    def zone_problem(self, devices: Sequence[DeviceSpec]) -> str | None:
        """What is wrong with the zones the feeds name, given the site's devices, as
        `feeds.<tag>: <problem>` (None: every one is a zone device of this site)."""
        protocol = {d.name: d.protocol for d in devices}
        zones = sorted(n for n, p in protocol.items() if p == "zone")
        for tag, place in self.feeds.items():
            zone = zone_of(place)
            if zone is None or protocol.get(zone) == "zone":
                continue
            if zone in protocol:
                what = f"{zone!r} is a {protocol[zone]} device, not a zone"
            else:
                what = f"no device is named {zone!r}"
            known = ", ".join(zones) if zones else "none: this site has no zone devices"
            return f"feeds.{tag}: {what} (zones: {known})"
        return None
