"""Redfish driver for GPU racks: read power and set the rack's power cap through its BMC.

Each rack has one keep-alive HTTP/1.1 connection (`drivers.redfish.http`; a TLS handshake
per poll would cost a BMC more than the request) and its own task: it polls on a staggered
schedule and sends the latest queued cap, one request at a time, so a dead BMC only ever costs
its own task time. Every request has the rack's timeout (about 1 s), bodies are size-limited,
and a failure backs off with jitter.

On first contact a rack is discovered (DMTF Redfish, `drivers.redfish.resources`): GET the
Chassis, prefer `EnvironmentMetrics.PowerLimitWatts` (PATCH SetPoint, read
`PowerWatts.Reading`), else fall back to the legacy `Power` resource (PATCH
`PowerControl[0].PowerLimit.LimitInWatts`, read `PowerConsumedWatts`). A 404 on the
discovered resource starts discovery again.

Authentication per rack: a Redfish session (POST Sessions, X-Auth-Token; a 401 logs in again
once and retries) or HTTP Basic (`access.session_auth = false`). Sessions are deleted when the
driver stops: BMCs allow only a few.

A cap is absolute, so writes need no ETag precondition: the newest value simply wins. The
SetPoint read back by each poll is compared with the last cap sent; a BMC that lost it (reboot,
another manager) gets it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import numpy as np

from drivers.base import CommandObserver, DeviceTimeout, DriverError, ProtocolError
from drivers.core.command import Intent
from drivers.core.image import DevicePort
from drivers.core.registry import DriverContext, register
from drivers.core.spec import DeviceAccess, DeviceSpec
from drivers.core.state import DeviceState
from drivers.device_driver import FAULT_AFTER, DriverOptions, PerDeviceDriver, Reading
from drivers.redfish import resources as rf
from drivers.redfish.http import HttpConnection, Response
from drivers.redfish.resources import Mechanism
from drivers.slots import COMMAND, exchange_priority

log = logging.getLogger("rampd.drivers.redfish")

_HEADERS = f"OData-Version: {rf.ODATA_VERSION}\r\nAccept: application/json\r\n".encode()
_TOKEN = rf.AUTH_TOKEN_HEADER.lower()
_READBACK_TOLERANCE_W = 1.0  # caps go out in whole watts; BMCs report 0.1 W or 1 W
_LOGOUT_TIMEOUT_S = 1.0


@dataclass(slots=True)
class _Rack:
    """What the driver knows about one BMC."""

    spec: DeviceSpec
    conn: HttpConnection
    username: str | None
    password: str | None
    session_auth: bool
    paths: rf.ChassisPaths
    headers: bytes
    """The header lines of an authenticated request: Basic credentials, or the session's
    token once logged in (`_set_session`)."""
    token: str | None = None
    session_uri: str | None = None
    mechanism: Mechanism | None = None
    uri: str = ""
    """The discovered resource: GET for power and the cap read back, PATCH to cap."""
    allow_min_w: float = math.nan
    allow_max_w: float = math.nan


def _ssl_contexts(specs: Sequence[DeviceSpec]) -> dict[Path | None, ssl.SSLContext]:
    """One verifying context per CA bundle (None: the system store), shared by racks."""
    out: dict[Path | None, ssl.SSLContext] = {}
    for s in specs:
        if s.access.https and s.access.ca_file not in out:
            ca = s.access.ca_file
            out[ca] = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    return out


def _rack(
    spec: DeviceSpec, contexts: dict[Path | None, ssl.SSLContext], max_body_bytes: int
) -> _Rack:
    access: DeviceAccess = spec.access
    username, password = rf.credentials(access)
    tls = contexts[access.ca_file] if access.https else None
    headers = _HEADERS
    if username is not None and not access.session_auth:
        basic = rf.basic_authorization(username, password or "")
        headers += f"Authorization: {basic}\r\n".encode("latin-1")
    return _Rack(
        spec=spec,
        conn=HttpConnection(spec.host, spec.port, tls, max_body_bytes=max_body_bytes),
        username=username,
        password=password,
        session_auth=access.session_auth,
        paths=rf.chassis_paths(access.chassis_id),
        headers=headers,
    )


def _set_session(rack: _Rack, token: str | None, uri: str | None) -> None:
    """A session logged in to, or gone (None): its token goes into every request's headers."""
    rack.token, rack.session_uri = token, uri
    rack.headers = _HEADERS
    if token is not None:
        rack.headers += f"{rf.AUTH_TOKEN_HEADER}: {token}\r\n".encode("latin-1")


@dataclass(frozen=True, slots=True)
class _RackReading(Reading):
    """Telemetry plus the cap read back (None: the BMC reports none)."""

    setpoint_w: float | None


class RedfishDriver(PerDeviceDriver[_RackReading]):
    """Caps the GPU racks of its port."""

    protocol = "redfish"
    default_concurrency = 64
    _log = log

    def __init__(
        self,
        port: DevicePort,
        on_command: CommandObserver | None = None,
        *,
        max_body_bytes: int = rf.MAX_BODY_BYTES,
        **options: Unpack[DriverOptions],
    ) -> None:
        super().__init__(port, on_command, **options)
        contexts = _ssl_contexts(self._specs)
        # Reads password files: now, so a missing one fails at start.
        self._racks = [_rack(s, contexts, max_body_bytes) for s in self._specs]
        self._max_body = max_body_bytes
        self._last_sent_w = np.full(len(self._specs), np.nan)  # last cap, in whole watts
        # Counters beyond the base's, public for metrics.
        self.logins = 0
        self.relogins = 0

    def mechanism(self, local: int) -> Mechanism | None:
        """How rack `local` is capped, once discovered."""
        return self._racks[local].mechanism

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self._logout_all()
            for rack in self._racks:
                rack.conn.close()

    # --- transactions ---

    async def _read(self, local: int) -> _RackReading:
        rack = await self._ready(local)
        body = rf.parse_json((await self._call(local, "GET", rack.uri)).body, self._max_body)
        return self._decode(local, body)

    async def _command(self, local: int, power_w: float, intent: Intent) -> None:
        # A rack has no sleep state (its template cannot sleep): the cap is all there is.
        rack = await self._ready(local)
        w = self._clamp(rack, power_w)
        if rack.mechanism is Mechanism.ENVIRONMENT_METRICS:
            body = rf.environment_limit_patch(w)
        else:
            body = rf.legacy_limit_patch(w)
        await self._call(local, "PATCH", rack.uri, body)
        self._last_sent_w[local] = round(w)

    @staticmethod
    def _clamp(rack: _Rack, value: float) -> float:
        # The BMC refuses (400) a cap outside its allowable range: send the nearest it takes.
        if not math.isnan(rack.allow_min_w):
            value = max(value, rack.allow_min_w)
        if not math.isnan(rack.allow_max_w):
            value = min(value, rack.allow_max_w)
        return value

    def _decode(self, local: int, body: dict[str, Any]) -> _RackReading:
        """Measured power and the cap read back, from the discovered resource."""
        rack = self._racks[local]
        if rack.mechanism is Mechanism.ENVIRONMENT_METRICS:
            measured = rf.read_power_watts(body)
            limit = rf.read_power_limit(body)
            if limit is None:
                rack.mechanism = None  # firmware changed under us: discover again
                raise ProtocolError("PowerLimitWatts disappeared from EnvironmentMetrics")
        else:
            legacy = rf.read_legacy_power(body)
            measured, limit = legacy.consumed_w, legacy.limit
        return _RackReading(
            self._check_power(local, measured),
            DeviceState.ON,  # a capped rack runs; it has no sleep state
            None if limit is None else limit.setpoint_w,
        )

    def _polled(self, local: int, reading: _RackReading) -> None:
        """A BMC that lost our cap (reboot, another manager) gets it again."""
        expected, setpoint_w = self._last_sent_w[local], reading.setpoint_w
        if not self._readback_due(local) or (
            setpoint_w is not None and abs(setpoint_w - expected) <= _READBACK_TOLERANCE_W
        ):
            return
        self._resend(
            local,
            "cap read back as %s, sent %.0f W",
            "none" if setpoint_w is None else f"{setpoint_w:.0f} W",
            expected,
        )

    async def _ready(self, local: int) -> _Rack:
        """The rack, discovered: which resource reads its power and takes its cap."""
        rack = self._racks[local]
        if rack.mechanism is not None:
            return rack
        chassis = rf.parse_json((await self._call(local, "GET", rack.paths.chassis)).body)
        links = rf.read_chassis_links(chassis)
        if links.environment_metrics is not None:
            env = rf.parse_json((await self._call(local, "GET", links.environment_metrics)).body)
            rf.read_power_watts(env)
            limit = rf.read_power_limit(env)
            if limit is not None:
                self._discovered(
                    rack, Mechanism.ENVIRONMENT_METRICS, links.environment_metrics, limit
                )
                return rack
        if links.power is not None:
            legacy = rf.read_legacy_power(
                rf.parse_json((await self._call(local, "GET", links.power)).body)
            )
            if legacy.limit is not None:
                self._discovered(rack, Mechanism.LEGACY_POWER, links.power, legacy.limit)
                return rack
        raise ProtocolError(
            f"chassis {rack.paths.chassis_id} offers no power limit "
            "(EnvironmentMetrics.PowerLimitWatts or Power.PowerControl[0].PowerLimit)"
        )

    def _discovered(
        self, rack: _Rack, mechanism: Mechanism, uri: str, limit: rf.PowerLimit
    ) -> None:
        lo, hi = limit.allowable_min_w, limit.allowable_max_w
        rack.mechanism, rack.uri = mechanism, uri
        rack.allow_min_w = math.nan if lo is None else lo
        rack.allow_max_w = math.nan if hi is None else hi
        # The normal path is quiet; a fallback is worth one line per rack.
        level = logging.DEBUG if mechanism is Mechanism.ENVIRONMENT_METRICS else logging.INFO
        log.log(
            level,
            "redfish %s: capping via %s (%s..%s W)",
            rack.spec.name,
            mechanism.value,
            "?" if lo is None else f"{lo:.0f}",
            "?" if hi is None else f"{hi:.0f}",
        )

    # --- HTTP ---

    async def _call(
        self, local: int, method: str, path: str, body: dict[str, Any] | None = None
    ) -> Response:
        """One authenticated request; a rejected session logs in again once. 2xx or raise."""
        rack = self._racks[local]
        use_session = rack.session_auth and rack.username is not None
        if use_session and rack.token is None:
            await self._login(local)
        reply = await self._request(local, method, path, body)
        if reply.status == 401 and use_session:
            _set_session(rack, None, None)  # expired, or the BMC restarted
            self.relogins += 1
            await self._login(local)
            reply = await self._request(local, method, path, body)
        if reply.status == 404 and path == rack.uri:
            rack.mechanism = None  # the resource moved: discover again
        if not 200 <= reply.status < 300:
            detail = rf.error_message(reply.body)
            raise ProtocolError(f"{method} {path}: HTTP {reply.status} {detail}".rstrip())
        return reply

    async def _login(self, local: int) -> None:
        rack = self._racks[local]
        creds = rf.login_body(rack.username or "", rack.password or "")
        reply = await self._request(local, "POST", rf.SESSIONS, creds, auth=False)
        if reply.status not in (200, 201):
            detail = rf.error_message(reply.body)
            raise ProtocolError(f"login: HTTP {reply.status} {detail}".rstrip())
        _set_session(rack, *rf.read_login(reply.headers.get(_TOKEN), reply.headers.get("location")))
        self.logins += 1

    async def _request(
        self,
        local: int,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        auth: bool = True,
    ) -> Response:
        """One HTTP exchange within the rack's timeout; DriverError for transport failures."""
        rack = self._racks[local]
        timeout_s = rack.spec.timeout_s
        headers = rack.headers if auth else _HEADERS
        data = None if body is None else json.dumps(body).encode()
        try:
            # The timeout starts once a slot is taken: waiting for one is not the rack's fault.
            await self._take_slot(local)
            try:
                async with asyncio.timeout(timeout_s):
                    return await rack.conn.request(method, path, headers, data)
            finally:
                self._slots.release()
        except TimeoutError:
            raise DeviceTimeout(f"no answer within {timeout_s:g} s") from None

    async def _logout_all(self) -> None:
        """Delete our sessions (best effort, bounded): BMCs allow only a few."""

        async def logout(local: int) -> None:
            exchange_priority.set(COMMAND)  # this task's own context; never preempted as a poll
            rack = self._racks[local]
            if rack.token is None or rack.session_uri is None:
                return
            with suppress(DriverError):
                await self._request(local, "DELETE", rack.session_uri)
            _set_session(rack, None, None)

        with suppress(TimeoutError):
            async with asyncio.timeout(_LOGOUT_TIMEOUT_S):
                await asyncio.gather(*(logout(i) for i in range(len(self._racks))))


__all__ = ["FAULT_AFTER", "RedfishDriver"]


@register("redfish")
def _redfish(port: DevicePort, ctx: DriverContext) -> RedfishDriver:
    return RedfishDriver(
        port, ctx.on_command, poll_stretch=ctx.poll_stretch, max_concurrency=ctx.max_concurrency
    )
