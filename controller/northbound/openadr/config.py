"""`[openadr]` in the site file: the VTN, the VEN's credentials, what it obeys and reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from drivers.core.spec import PositiveFloat, Strict

PowerUnits = Literal["W", "KW", "MW"]
"""Units a power payload may come in (OpenADR's units enumeration has KW; W and MW are the
private strings VTNs use for small and large loads)."""

MapsTo = Literal["import_limit", "setpoint"]
Name = Annotated[str, Field(min_length=1, max_length=128)]


class PayloadMapping(Strict):
    """How one event payload type moves the site."""

    maps_to: MapsTo
    """`import_limit`: a ceiling on the site's import; `setpoint`: the site's target. Both are
    the level of the `openadr` rail (the lowest lower rail governs), so a setpoint never lifts
    the site above a commitment, peak or price curtailment."""
    units: PowerUnits = "KW"
    """Used when neither the event's nor the program's payloadDescriptor gives units."""


def _default_payloads() -> dict[str, PayloadMapping]:
    return {
        "IMPORT_CAPACITY_LIMIT": PayloadMapping(maps_to="import_limit"),
        "DISPATCH_SETPOINT": PayloadMapping(maps_to="setpoint"),
    }


class OpenAdrConfig(Strict):
    """An OpenADR 3.1 VEN: events from the VTN set the `openadr` rail, reports go back."""

    vtn_url: str
    """The VTN's base URL (the OpenAPI paths go below it), e.g. https://vtn.example/openadr3."""
    client_id: Name
    client_secret_file: Path
    """The OAuth2 client secret; relative paths are relative to the site file."""
    scope: str | None = None
    """OAuth2 scope to ask for (None: the VTN's default for the client)."""
    ven_name: Name | None = None
    """The VEN's venName on the VTN (default: the site_id). Registered if absent."""
    programs: list[Name] = Field(default_factory=list)
    """programName of the programs to obey; empty: every program the VTN shows this VEN."""
    payloads: dict[str, PayloadMapping] = Field(default_factory=_default_payloads)
    """Event payload types to obey (others are ignored) and how each maps."""
    resource_name: Name = "AGGREGATED_REPORT"
    """resourceName in reports: the site meter measures the whole fleet."""
    poll_s: PositiveFloat = 30.0
    """REST re-read period while no notifier connection is up (the fallback)."""
    resync_s: PositiveFloat = 300.0
    """REST re-read period while the MQTT notifier is up (a lost notification heals)."""
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 10.0
    """Each HTTP request and each MQTT connect/subscribe."""
    backoff_max_s: PositiveFloat = 300.0
    token_refresh_margin_s: Annotated[float, Field(ge=0)] = 60.0
    """A token is renewed this long before it expires (at most half its lifetime)."""
    notifier: bool = True
    """Use the VTN's MQTT notifier when /notifiers offers one."""
    report_period_s: Annotated[float, Field(ge=1)] = 300.0
    """Reports on an indefinite (or SUB_INTERVALS) event interval cover slots this long."""
    ca_file: Path | None = None
    """CA bundle for an https VTN (None: the system store)."""
    mqtt_ca_file: Path | None = None
    """CA bundle for an mqtts notifier broker (None: the system store)."""
    allow_plaintext: bool = False
    """Allow http:// to a VTN off this host (the client secret and tokens would be readable)."""
    randomize_seed: int | None = None
    """Seed of the randomizeStart draws (tests); None: random per process."""

    @field_validator("vtn_url")
    @classmethod
    def _url_ok(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return v.rstrip("/")

    @field_validator("payloads")
    @classmethod
    def _payloads_ok(cls, v: dict[str, PayloadMapping]) -> dict[str, PayloadMapping]:
        if not v:
            raise ValueError("at least one payload type must be obeyed")
        for name in v:
            if not 1 <= len(name) <= 128:
                raise ValueError(f"payload type {name!r}: 1 to 128 characters")
        return v

    @model_validator(mode="after")
    def _plaintext(self) -> OpenAdrConfig:
        from controller.config import is_loopback

        parts = urlsplit(self.vtn_url)
        host = parts.hostname or ""
        if parts.scheme == "http" and not self.allow_plaintext and not is_loopback(host):
            raise ValueError(
                f"plaintext http to {host!r}, which is not this host: use https, or set "
                "allow_plaintext = true if the network is trusted"
            )
        return self

    def resolve(self, site_file: Path) -> OpenAdrConfig:
        """Relative file paths made relative to the site file's folder."""
        base = site_file.parent

        def rel(p: Path | None) -> Path | None:
            return None if p is None or p.is_absolute() else base / p

        updates: dict[str, Path] = {}
        for key in ("client_secret_file", "ca_file", "mqtt_ca_file"):
            new = rel(getattr(self, key))
            if new is not None:
                updates[key] = new
        return self.model_copy(update=updates)
