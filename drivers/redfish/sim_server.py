"""Simulated Redfish BMCs: one per GPU rack, each on its own address, over real HTTP(S).

All racks share one aiohttp application and runner; each rack listens on its own (host, port)
and a request is routed to its BMC by the local address it arrived on, so a site of hundreds of
racks costs one listening socket per rack and nothing else. Every resource is built by
`drivers.redfish.resources` from the physics arrays at request time (nothing is copied per
tick): `PowerWatts.Reading` is `physics.reported_w[i]`, a PATCHed SetPoint becomes
`physics.command(i, setpoint_w=...)`.

Authentication as on a BMC: a session (POST Sessions -> 201, X-Auth-Token, Location; DELETE to
log out) or HTTP Basic on every request; the service root, `/redfish`, `$metadata` and the
OData service document are public. With no username configured the BMC accepts anyone.

Faults from `physics.fault[i]`: SILENT never answers (the handler waits, cancelled when the
client gives up), SLOW answers after SLOW_S, ERROR answers 500 / 503 with a Redfish error body,
GARBAGE answers 200 with invalid JSON, REBOOT drops every session and the cap returns to the
factory default. A reboot is also recognised after physics already processed it: the commanded
setpoint no longer being the one this BMC applied means the device restarted.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import ssl
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

from aiohttp import web

from drivers.base import ProtocolError
from drivers.core.spec import DeviceSpec
from drivers.redfish import resources as rf
from drivers.sim.physics import SLOW_S, Fault, SitePhysics

log = logging.getLogger("rampd.sim")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_SESSIONS = 16
"""BMCs allow few concurrent sessions; a client that leaks them gets 503 SessionLimitExceeded."""
SESSION_TIMEOUT_S = 1800
_SILENT_POLL_S = 0.05


@dataclass(slots=True)
class Route:
    methods: dict[str, Handler]
    public: frozenset[str] = frozenset()
    """Methods allowed without authentication."""


@dataclass(slots=True)
class Bmc:
    """The BMC of physics row `i`: its sessions, its stored power limit, request counters."""

    physics: SitePhysics
    i: int
    spec: DeviceSpec
    legacy_only: bool
    paths: rf.ChassisPaths = field(init=False)
    username: str | None = field(init=False)
    password: str | None = field(init=False)
    sessions: dict[str, tuple[str, str]] = field(default_factory=dict)
    """token -> (session id, user name)"""
    setpoint_w: float = field(init=False)
    """The SetPoint as stored (kept while ControlMode is Disabled)."""
    control_mode: str = "Automatic"
    requests: Counter[str] = field(default_factory=Counter)
    """Requests answered normally, by method; for tests and benchmarks."""
    patches: int = 0
    logins: int = 0
    reboots: int = 0
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    _applied_w: float = field(init=False)
    _next_session: int = 1
    _errors: int = 0
    _restarting: bool = False

    def __post_init__(self) -> None:
        self.paths = rf.chassis_paths(self.spec.access.chassis_id)
        self.username, self.password = rf.credentials(self.spec.access)
        self.setpoint_w = self._applied_w = float(self.physics.cmd_setpoint_w[self.i])

    # --- state ---

    def readings(self) -> rf.RackReadings:
        ph, i = self.physics, self.i
        return rf.RackReadings(
            reading_w=float(ph.reported_w[i]),
            setpoint_w=self.setpoint_w,
            allowable_min_w=float(ph.p_min_w[i]),
            allowable_max_w=float(ph.p_max_w[i]),
            control_mode=self.control_mode,
        )

    def etag(self) -> str:
        return rf.etag_of(self.setpoint_w, self.control_mode)

    def fault(self) -> Fault:
        return Fault(int(self.physics.fault[self.i]))

    def check_reboot(self) -> bool:
        """Notice a restart; True while it is still going on (answer 503)."""
        ph, i = self.physics, self.i
        restarting = self.fault() == Fault.REBOOT
        if not restarting:
            self._restarting = False
            if float(ph.cmd_setpoint_w[i]) == self._applied_w:
                return False
        elif self._restarting:
            return True
        self._restarting = restarting
        self.reboots += 1
        self.sessions.clear()
        self.control_mode = "Automatic"
        # physics.step() resets the command to the default; expect that, so it is seen once.
        default = float(ph.default_setpoint_w[i]) if restarting else float(ph.cmd_setpoint_w[i])
        self.setpoint_w = self._applied_w = default
        return restarting

    def apply(self, change: rf.LimitChange) -> None:
        if change.control_mode is not None:
            self.control_mode = change.control_mode
        if change.remove_limit:
            self.control_mode = "Disabled"
        elif change.setpoint_w is not None:
            self.setpoint_w = change.setpoint_w
            if change.control_mode is None and self.control_mode == "Disabled":
                self.control_mode = "Automatic"  # writing a limit enables it (legacy semantics)
        capped = self.control_mode != "Disabled"
        target = self.setpoint_w if capped else float(self.physics.p_max_w[self.i])
        self.physics.command(self.i, setpoint_w=target)
        self._applied_w = float(self.physics.cmd_setpoint_w[self.i])

    def next_error_status(self) -> int:
        self._errors += 1
        return 500 if self._errors % 2 else 503

    # --- authentication ---

    def authorized(self, request: web.Request) -> bool:
        if self.username is None:
            return True
        token = request.headers.get(rf.AUTH_TOKEN_HEADER)
        if token is not None:
            return token in self.sessions
        header = request.headers.get("Authorization")
        basic = rf.parse_basic_authorization(header) if header is not None else None
        return basic is not None and self.credentials_ok(*basic)

    def credentials_ok(self, user: str, password: str) -> bool:
        if self.username is None:
            return True
        user_ok = hmac.compare_digest(user.encode(), self.username.encode())
        pw_ok = hmac.compare_digest(password.encode(), (self.password or "").encode())
        return user_ok and pw_ok


# --- responses ---


def _json(
    body: Mapping[str, object],
    status: int = 200,
    *,
    etag: str | None = None,
    allow: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    h = {"OData-Version": rf.ODATA_VERSION, "Cache-Control": "no-cache"}
    if etag is not None:
        h["ETag"] = etag
    if allow is not None:
        h["Allow"] = allow
    if headers:
        h.update(headers)
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        charset="utf-8",
        headers=h,
    )


def _error(status: int, key: str, message: str, **kw: str) -> web.Response:
    headers = dict(kw)
    return _json(rf.error_body(key, message), status, headers=headers)


def _with_etag(resource: dict[str, object], etag: str) -> dict[str, object]:
    resource["@odata.etag"] = etag
    return resource


_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Basic realm="Redfish"'}


class RedfishSim:
    """The request router shared by every simulated BMC of a site."""

    def __init__(self, bmcs: Sequence[Bmc]) -> None:
        self.bmcs = list(bmcs)
        self._by_addr = {(b.spec.host, b.spec.port): b for b in bmcs}
        self._routes = {id(b): self._route_table(b) for b in bmcs}
        self.closing = asyncio.Event()

    # --- dispatch ---

    async def handle(self, request: web.Request) -> web.StreamResponse:
        bmc = self._bmc_of(request)
        if bmc is None:
            return _error(404, "ResourceMissingAtURI", "no BMC on this address")
        fault = await self._fault_gate(bmc)
        if fault == Fault.ERROR:
            status = bmc.next_error_status()
            if status == 503:
                msg = "The service is temporarily unavailable."
                return _error(503, "ServiceTemporarilyUnavailable", msg, **{"Retry-After": "1"})
            return _error(500, "InternalError", "The request failed due to an internal error.")
        if fault == Fault.GARBAGE:
            return web.Response(
                status=200,
                body=b'{"@odata.type": "#EnvironmentMetrics.v1_2_0.Envi\xff, "PowerWatts": {"Re',
                content_type="application/json",
            )
        if bmc.check_reboot():
            return _error(503, "ServiceTemporarilyUnavailable", "The BMC is restarting.")
        path = request.path
        if len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
        route = self._routes[id(bmc)].get(path)
        if route is None and path.startswith(rf.SESSIONS + "/"):
            route = self._session_route(bmc, path.rsplit("/", 1)[1])
        if route is None:
            return _error(404, "ResourceMissingAtURI", f"The resource at {path} does not exist.")
        allow = ", ".join(route.methods)
        handler = route.methods.get(request.method)
        if handler is None:
            msg = f"{request.method} is not allowed on {path}."
            return _error(405, "OperationNotAllowed", msg, Allow=allow)
        if request.method not in route.public and not bmc.authorized(request):
            return _error(
                401, "NoValidSession", "No valid session or credentials.", **_UNAUTHORIZED_HEADERS
            )
        bmc.requests[request.method] += 1
        response = await handler(request)
        if "Allow" not in response.headers:
            response.headers["Allow"] = allow
        return response

    def _bmc_of(self, request: web.Request) -> Bmc | None:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        if not sock:
            return None
        return self._by_addr.get((str(sock[0]), int(sock[1])))

    async def _fault_gate(self, bmc: Bmc) -> Fault:
        fault = bmc.fault()
        if fault == Fault.SILENT:
            # Never answer: hold the request until the fault clears or the site stops (the
            # client times out first; aiohttp cancels this handler when it disconnects).
            while bmc.fault() == Fault.SILENT and not self.closing.is_set():
                with suppress(TimeoutError):
                    async with asyncio.timeout(_SILENT_POLL_S):
                        await self.closing.wait()
            fault = bmc.fault()
        if fault == Fault.SLOW:
            await asyncio.sleep(SLOW_S)
            fault = bmc.fault()
            if fault == Fault.SLOW:
                fault = Fault.NONE  # slow, then a normal answer
        return fault

    # --- the resource tree of one BMC ---

    def _route_table(self, b: Bmc) -> dict[str, Route]:
        p = b.paths

        def get(build: Callable[[], dict[str, object]], etag: bool = False) -> Handler:
            async def handler(request: web.Request) -> web.StreamResponse:
                if etag:
                    tag = b.etag()
                    return _json(_with_etag(build(), tag), etag=tag)
                return _json(build())

            return handler

        async def metadata(request: web.Request) -> web.StreamResponse:
            return web.Response(
                text=rf.metadata_xml(),
                content_type="application/xml",
                headers={"OData-Version": rf.ODATA_VERSION},
            )

        def root() -> dict[str, object]:
            return rf.service_root(uuid=b.uuid, product=f"rampd simulated BMC ({b.spec.name})")

        def chassis() -> dict[str, object]:
            return rf.chassis(
                p,
                name=b.spec.name,
                model=b.spec.access.model,
                readings=b.readings(),
                with_controls=not b.legacy_only,
            )

        def env() -> dict[str, object]:
            return rf.environment_metrics(p, b.readings(), with_limit=not b.legacy_only)

        root_route = Route({"GET": get(root)}, public=frozenset({"GET"}))
        table: dict[str, Route] = {
            rf.VERSIONS: Route({"GET": get(rf.versions_document)}, frozenset({"GET"})),
            rf.SERVICE_ROOT: root_route,
            rf.ODATA: Route({"GET": get(rf.odata_service_document)}, frozenset({"GET"})),
            rf.METADATA: Route({"GET": metadata}, frozenset({"GET"})),
            rf.CHASSIS: Route({"GET": get(lambda: rf.chassis_collection([p.chassis_id]))}),
            p.chassis: Route({"GET": get(chassis)}),
            p.environment_metrics: Route(
                {"GET": get(env, etag=True)}
                | (
                    {}
                    if b.legacy_only
                    else {"PATCH": self._patch(b, rf.parse_environment_patch, env)}
                )
            ),
            p.power: Route(
                {
                    "GET": get(lambda: rf.power(p, b.readings()), etag=True),
                    "PATCH": self._patch(
                        b, rf.parse_legacy_patch, lambda: rf.power(p, b.readings())
                    ),
                }
            ),
            p.power_subsystem: Route({"GET": get(lambda: rf.power_subsystem(p, b.readings()))}),
            rf.SESSION_SERVICE: Route(
                {"GET": get(lambda: rf.session_service(timeout_s=SESSION_TIMEOUT_S))}
            ),
            rf.SESSIONS: Route(
                {
                    "GET": get(lambda: rf.session_collection(self._session_ids(b))),
                    "POST": self._login(b),
                },
                public=frozenset({"POST"}),
            ),
        }
        if not b.legacy_only:

            def control() -> dict[str, object]:
                return rf.power_limit_control(p, b.readings())

            table[p.controls] = Route({"GET": get(lambda: rf.control_collection(p))})
            table[p.power_limit_control] = Route(
                {
                    "GET": get(control, etag=True),
                    "PATCH": self._patch(b, rf.parse_control_patch, control),
                }
            )
        return table

    @staticmethod
    def _session_ids(b: Bmc) -> list[str]:
        return sorted((sid for sid, _ in b.sessions.values()), key=int)

    def _session_route(self, b: Bmc, session_id: str) -> Route | None:
        found = [(tok, user) for tok, (sid, user) in b.sessions.items() if sid == session_id]
        if not found:
            return None
        token, user = found[0]

        async def get(request: web.Request) -> web.StreamResponse:
            return _json(rf.session(session_id, user))

        async def delete(request: web.Request) -> web.StreamResponse:
            b.sessions.pop(token, None)
            return web.Response(status=204, headers={"OData-Version": rf.ODATA_VERSION})

        return Route({"GET": get, "DELETE": delete})

    # --- writes ---

    def _patch(
        self,
        b: Bmc,
        parse: Callable[[Mapping[str, object]], rf.LimitChange],
        build: Callable[[], dict[str, object]],
    ) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                body = rf.parse_json(await request.read())
            except ProtocolError as exc:
                return _error(400, "MalformedJSON", f"The request body is malformed: {exc}")
            match = request.headers.get("If-Match")
            if match is not None and match not in ("*", b.etag()):
                return _error(412, "PreconditionFailed", "The ETag does not match.")
            try:
                change = parse(body)
            except rf.RequestError as exc:
                return _error(400, exc.key, str(exc))
            ph, i = b.physics, b.i
            sp = change.setpoint_w
            if sp is not None and not float(ph.p_min_w[i]) <= sp <= float(ph.p_max_w[i]):
                msg = f"{sp:g} W is outside {ph.p_min_w[i]:g}..{ph.p_max_w[i]:g} W."
                return _error(400, "PropertyValueOutOfRange", msg)
            b.apply(change)
            b.patches += 1
            tag = b.etag()
            return _json(_with_etag(build(), tag), etag=tag)

        return handler

    def _login(self, b: Bmc) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                user, password = rf.parse_login(rf.parse_json(await request.read()))
            except rf.RequestError as exc:
                return _error(400, exc.key, str(exc))
            except ProtocolError as exc:
                return _error(400, "MalformedJSON", f"The request body is malformed: {exc}")
            if not b.credentials_ok(user, password):
                msg = "Invalid user name or password."
                return _error(401, "ResourceAtUriUnauthorized", msg, **_UNAUTHORIZED_HEADERS)
            if len(b.sessions) >= MAX_SESSIONS:
                return _error(503, "SessionLimitExceeded", "Too many open sessions.")
            session_id = str(b._next_session)
            b._next_session += 1
            token = secrets.token_hex(16)
            b.sessions[token] = (session_id, user)
            b.logins += 1
            headers = {rf.AUTH_TOKEN_HEADER: token, "Location": rf.session_uri(session_id)}
            return _json(rf.session(session_id, user), 201, headers=headers)

        return handler


class RedfishServers:
    """Every simulated BMC of a site; `close()` stops them all."""

    def __init__(self, sim: RedfishSim, runner: web.AppRunner, scheme: str) -> None:
        self.sim = sim
        self._runner = runner
        self.scheme = scheme
        self.bmcs: dict[int, Bmc] = {b.i: b for b in sim.bmcs}
        """By physics row."""

    def url(self, i: int) -> str:
        spec = self.bmcs[i].spec
        return f"{self.scheme}://{spec.host}:{spec.port}"

    async def close(self) -> None:
        self.sim.closing.set()  # releases handlers held by SILENT
        await self._runner.cleanup()


async def start_redfish_servers(
    physics: SitePhysics,
    indices: Sequence[int],
    specs: Sequence[DeviceSpec],
    *,
    ssl_context: ssl.SSLContext | None = None,
    legacy_only: bool = False,
) -> RedfishServers:
    """Serve physics row indices[k] as specs[k] (parallel sequences), each on its host:port.

    `ssl_context` serves HTTPS on every rack (a spec with access.https needs one);
    `legacy_only` serves BMCs without PowerLimitWatts and Controls (capping via legacy Power).
    """
    if len(indices) != len(specs):
        raise ValueError(f"{len(indices)} indices but {len(specs)} specs")
    if ssl_context is None:
        wants_tls = [s.name for s in specs if s.access.https]
        if wants_tls:
            raise ValueError(f"{wants_tls[0]} (and {len(wants_tls) - 1} more) need an ssl_context")
    bmcs = [Bmc(physics, int(i), s, legacy_only) for i, s in zip(indices, specs, strict=True)]
    sim = RedfishSim(bmcs)
    app = web.Application(client_max_size=rf.MAX_BODY_BYTES)
    app.router.add_route("*", "/{tail:.*}", sim.handle)
    # handler_cancellation: a client that gives up cancels its request (SILENT, SLOW faults).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        for b in bmcs:
            site = web.TCPSite(runner, b.spec.host, b.spec.port, ssl_context=ssl_context)
            try:
                await site.start()
            except OSError as exc:
                where = f"{b.spec.host}:{b.spec.port}"
                raise OSError(f"sim: cannot listen on {where} for {b.spec.name}: {exc}") from None
    except BaseException:
        await runner.cleanup()
        raise
    return RedfishServers(sim, runner, "https" if ssl_context is not None else "http")


__all__ = ["Bmc", "RedfishServers", "RedfishSim", "start_redfish_servers"]
