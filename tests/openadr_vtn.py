"""A test VTN written from the OpenADR 3.1.1 specification (configs/standards/openadr3-3.1.1).

It implements what a VEN uses (`/auth/server`, `/auth/token`, `/programs`, `/events`,
`/vens`, `/reports`, `/notifiers` and the VEN-scoped MQTT topic endpoints) plus what a
business-logic (BL) client needs to drive a test (creating programs and events, reading
reports). Every request it receives and every response it sends is validated against
`openadr3.yaml` with openapi-core (a request may carry no property the document does not
define); every MQTT notification it publishes against the document's `notification`
schema; every interval payload of an event or a report, and every report's readingType,
against the enumerations' schemas (jsonschema). A failure is recorded in `Vtn.errors` (and
a bad request is answered 400): the tests assert the list is empty.

Three errata are applied to the document, in memory, before it is used; `ERRATA` names them,
and tests/unit/test_openadr_conformance.py checks that each one is still needed (the
unpatched document fails exactly there), so a fixed specification makes that test fail and
the erratum can go:
1. `BlVenRequest.targets` has `default: null          -` (a stray "-"): the string
   "null          -" is no array, and openapi-spec-validator refuses the whole document.
2. `ven` (and `resource`) is `allOf: [objectMetadata, BlVenRequest]`: objectMetadata's
   `objectType` must be one of PROGRAM, EVENT, ... VEN, BlVenRequest's must be
   BL_VEN_REQUEST, so no object can be a `ven`. Patched: the BL request's own `objectType`
   (its discriminator as a request) is not required of the stored object, which carries
   objectMetadata's "VEN" (as every other object carries its type).
3. `programRequest.payloadDescriptors` and `notification.object` have a `discriminator` on
   `objectType` with no `mapping`: OpenAPI 3.0 then takes the value as a schema name
   (`#/components/schemas/EVENT_PAYLOAD_DESCRIPTOR`, `.../EVENT`), which does not exist.
   Patched: the mapping the document means (value -> the schema of that object).
The `servers` entry (SwaggerHub's mock) is replaced by where this VTN listens.

The VTN runs on its own thread and event loop, so tests of any loop scope (and the e2e
daemon, a separate process) reach it over a real socket.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final

import aiohttp
import aiomqtt
import jsonschema  # type: ignore[import-untyped]
import yaml
from aiohttp import web
from jsonschema_path import SchemaPath
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.validation.schemas import oas30_write_schema_validators_factory

from controller.wire.timestamps import rfc3339

IGNORE_OAUTH2_WARNING: Final = "ignore:Unsupported scheme type:UserWarning"
"""openapi-core checks no oauth2 security scheme and warns on every secured request; the VTN
checks bearer tokens itself (401 for a missing, unknown or expired one). Test modules pass
this to `pytest.mark.filterwarnings`."""

SPEC_DIR: Final = (
    Path(__file__).resolve().parent.parent / "configs" / "standards" / "openadr3-3.1.1"
)
SPEC_FILE: Final = SPEC_DIR / "openadr3.yaml"
BASE_PATH: Final = "/openadr3/3.1.1"
"""The VTN serves below a path, so the VEN's base-URL handling is exercised."""

VEN_CLIENT: Final = ("rampd-ven", "ven-secret-1234")
BL_CLIENT: Final = ("bl-operator", "bl-secret-5678")


# -- the specification ----------------------------------------------------------------------


@cache
def raw_spec() -> dict[str, Any]:
    """openadr3.yaml exactly as published."""
    with SPEC_FILE.open(encoding="utf-8") as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    return doc


def _erratum_targets_default(s: dict[str, Any]) -> None:
    s["BlVenRequest"]["properties"]["targets"]["default"] = None


def _erratum_ven_object_type(s: dict[str, Any]) -> None:
    for stored, request in (("ven", "BlVenRequest"), ("resource", "BlResourceRequest")):
        body = copy.deepcopy(s[request])
        body["required"] = [r for r in body["required"] if r != "objectType"]
        del body["properties"]["objectType"]
        name = f"{request}StoredBody"
        s[name] = body
        s[stored]["allOf"] = [
            {"$ref": "#/components/schemas/objectMetadata"},
            {"$ref": f"#/components/schemas/{name}"},
        ]


def _erratum_discriminator_mapping(s: dict[str, Any]) -> None:
    ref = "#/components/schemas/"
    s["programRequest"]["properties"]["payloadDescriptors"]["items"]["discriminator"]["mapping"] = {
        "EVENT_PAYLOAD_DESCRIPTOR": ref + "eventPayloadDescriptor",
        "REPORT_PAYLOAD_DESCRIPTOR": ref + "reportPayloadDescriptor",
    }
    s["notification"]["properties"]["object"]["discriminator"]["mapping"] = {
        t: ref + t.lower()
        for t in ("PROGRAM", "EVENT", "REPORT", "SUBSCRIPTION", "VEN", "RESOURCE")
    }


ERRATA: Final[dict[str, Callable[[dict[str, Any]], None]]] = {
    "targets default": _erratum_targets_default,
    "ven objectType": _erratum_ven_object_type,
    "discriminator mapping": _erratum_discriminator_mapping,
}


def spec(base_url: str, *, errata: tuple[str, ...] = tuple(ERRATA)) -> dict[str, Any]:
    """The document with the named errata applied and `servers` pointing at `base_url`."""
    doc = copy.deepcopy(raw_spec())
    for name in errata:
        ERRATA[name](doc["components"]["schemas"])
    doc["servers"] = [{"url": base_url}]
    return doc


@cache
def _enumeration(name: str) -> dict[str, Any]:
    with (SPEC_DIR / "enumerations" / f"{name}.schema.yaml").open(encoding="utf-8") as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    return doc


def payload_errors(kind: str, payload_type: str, values: Any) -> list[str]:
    """A valuesMap's values against the enumeration of its type ("event" or "report"
    payloads); a type the enumerations do not define (a private string) is not checked."""
    doc = _enumeration("event-interval-payloads" if kind == "event" else "report-payloads")
    schema = doc["definitions"].get(payload_type)
    if schema is None:
        return []
    v = jsonschema.Draft7Validator(schema)
    return [f"{payload_type} values {values!r}: {e.message}" for e in v.iter_errors(values)]


def reading_type_errors(reading: Any) -> list[str]:
    v = jsonschema.Draft7Validator(_enumeration("reading-types"))
    return [f"readingType {reading!r}: {e.message}" for e in v.iter_errors(reading)]


class Conformance:
    """openadr3.yaml (errata applied) for a VTN at `base_url`: requests, responses, and
    single schemas (MQTT notifications)."""

    def __init__(self, base_url: str, *, errata: tuple[str, ...] = tuple(ERRATA)) -> None:
        self.doc = spec(base_url, errata=errata)
        self._path = SchemaPath.from_dict(self.doc)
        self._api: OpenAPI | None = None
        self._strict: OpenAPI | None = None

    @property
    def api(self) -> OpenAPI:
        """Requests and responses (built on first use: openapi-core validates the document
        first, which the unpatched one fails)."""
        if self._api is None:
            self._api = OpenAPI.from_dict(self.doc)
        return self._api

    @property
    def strict(self) -> OpenAPI:
        """For requests: no property the document does not define is accepted either (the
        schemas allow any by default; what a client sends should say only what the
        specification defines). Not for responses: the stored objects are `allOf`
        compositions, which a per-schema ban on other properties would break."""
        if self._strict is None:
            self._strict = OpenAPI.from_dict(
                self.doc, config=Config(additional_properties_default_policy="forbid")
            )
        return self._strict

    def schema_errors(self, name: str, value: Any) -> list[str]:
        schema = self._path / "components" / "schemas" / name
        v = oas30_write_schema_validators_factory.create(self._path, schema)
        return [f"{name}: {e.message}" for e in v.validator.iter_errors(value)]


@dataclass
class _Request:
    """openapi-core's Request protocol over an aiohttp request (with the port in host_url,
    which openapi-core's own aiohttp wrapper leaves out)."""

    host_url: str
    path: str
    method: str
    parameters: RequestParameters
    content_type: str
    body: bytes | None


@dataclass
class _Response:
    data: bytes
    status_code: int
    content_type: str
    headers: Mapping[str, str]


def _wrap(request: web.Request, body: bytes) -> _Request:
    url = request.url
    return _Request(
        host_url=f"{url.scheme}://{url.host}:{url.port}",
        path=url.path,
        method=request.method.lower(),
        parameters=RequestParameters(query=request.query, header=request.headers, cookie={}),
        content_type=request.content_type,
        body=body or None,
    )


def _why(exc: Exception) -> str:
    parts = [f"{type(exc).__name__}: {exc}"]
    cause = exc.__cause__
    while cause is not None:
        errs = getattr(cause, "schema_errors", None)
        parts.append(str([getattr(e, "message", e) for e in errs]) if errs else repr(cause))
        cause = cause.__cause__
    return " <- ".join(parts)


# -- the VTN -------------------------------------------------------------------------------


@dataclass
class Fault:
    """An injected misbehaviour for `method` requests whose path starts with `path`."""

    method: str
    path: str
    count: int
    kind: str
    """"500": a problem answer; "garbage": 200 with a body that is not JSON; "slow": an
    answer only after `delay_s`."""
    delay_s: float = 0.0


@dataclass
class Logged:
    at: float
    """Monotonic."""
    method: str
    path: str
    client: str | None
    status: int = 0


@dataclass
class _Store:
    programs: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    vens: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    counter: int = 0


class Vtn:
    """`with Vtn(mqtt=(host, port)) as vtn:` a VTN on 127.0.0.1, `vtn.url` its base URL."""

    def __init__(
        self,
        *,
        mqtt: tuple[str, int] | None = None,
        advertise_uri: str | None = None,
        token_lifetime_s: int = 3600,
        clients: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        self.mqtt = mqtt
        self.advertise_uri = advertise_uri
        """What /notifiers offers (default: the mqtt broker's mqtt:// URI)."""
        self.token_lifetime_s = token_lifetime_s
        self.clients: dict[str, tuple[str, str]] = dict(
            clients or {VEN_CLIENT[0]: (VEN_CLIENT[1], "ven"), BL_CLIENT[0]: (BL_CLIENT[1], "bl")}
        )
        self.errors: list[str] = []
        self.log: list[Logged] = []
        self.faults: list[Fault] = []
        self.unauthorized = 0
        self.tokens_issued: dict[str, int] = {}
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.publish_failures: list[str] = []
        self._store = _Store()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.conformance: Conformance | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BASE_PATH}"

    def __enter__(self) -> Vtn:
        self._thread = threading.Thread(target=self._main, name="test-vtn", daemon=True)
        self._thread.start()
        if not self._ready.wait(15.0):
            raise RuntimeError("test VTN did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(15.0)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start())
            self._ready.set()
            loop.run_forever()
        finally:
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        b = BASE_PATH
        r.add_get(b + "/auth/server", self._auth_server)
        r.add_post(b + "/auth/token", self._auth_token)
        r.add_get(b + "/programs", self._programs)
        r.add_post(b + "/programs", self._create_program)
        r.add_get(b + "/events", self._events)
        r.add_post(b + "/events", self._create_event)
        r.add_get(b + "/events/{id}", self._event)
        r.add_put(b + "/events/{id}", self._update_event)
        r.add_delete(b + "/events/{id}", self._delete_event)
        r.add_get(b + "/vens", self._vens)
        r.add_post(b + "/vens", self._create_ven)
        r.add_get(b + "/vens/{id}", self._ven)
        r.add_get(b + "/reports", self._reports)
        r.add_post(b + "/reports", self._create_report)
        r.add_get(b + "/notifiers", self._notifiers)
        r.add_get(b + "/notifiers/mqtt/topics/vens/{id}/{what}", self._ven_topics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.conformance = Conformance(self.url)

    # -- what tests look at ---------------------------------------------------------------------
    def error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def fail(
        self, method: str, path: str, count: int, kind: str = "500", delay_s: float = 0.0
    ) -> None:
        """The next `count` `method` requests below `path` (relative to the base) misbehave."""
        with self._lock:
            self.faults.append(Fault(method, BASE_PATH + path, count, kind, delay_s))

    def requests(self, method: str, path: str, since: float = 0.0) -> list[Logged]:
        with self._lock:
            return [
                x
                for x in self.log
                if x.method == method and x.path == BASE_PATH + path and x.at >= since
            ]

    def reports(self) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(r) for r in self._store.reports.values()]

    def vens(self) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(v) for v in self._store.vens.values()]

    # -- plumbing -----------------------------------------------------------------------------
    def _next_id(self, prefix: str) -> str:
        self._store.counter += 1
        return f"{prefix}-{self._store.counter}"

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        assert self.conformance is not None
        body = await request.read()
        wrapped = _wrap(request, body)
        entry = Logged(time.monotonic(), request.method, request.path, self._client_of(request))
        with self._lock:
            self.log.append(entry)
        try:
            self.conformance.strict.validate_request(wrapped)
        except Exception as exc:
            self.error(f"request {request.method} {request.path}: {_why(exc)}")
            entry.status = 400
            return _problem(400, "Bad Request", _why(exc)[:500])
        fault = self._take_fault(request.method, request.path)
        resp: web.StreamResponse
        if fault is not None and fault.kind == "garbage":
            entry.status = 200
            return web.Response(body=b"<html>not json", content_type="application/json")
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.delay_s)
        if fault is not None and fault.kind == "500":
            resp = _problem(500, "Internal Server Error", "injected fault")
        else:
            try:
                resp = await handler(request)
            except _ProblemError as exc:
                resp = exc.response
        entry.status = resp.status
        if isinstance(resp, web.Response):
            out = _Response(
                resp.body if isinstance(resp.body, bytes) else b"",
                resp.status,
                resp.content_type,
                resp.headers,
            )
            try:
                self.conformance.api.validate_response(wrapped, out)
            except Exception as exc:
                self.error(f"response {request.method} {request.path} {resp.status}: {_why(exc)}")
        return resp

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if method == f.method and path.startswith(f.path) and f.count > 0:
                    f.count -= 1
                    return f
        return None

    def _client_of(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        entry = self._store.tokens.get(token or "")
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def _authorized(self, request: web.Request, role: str | None = None) -> str:
        """The client id behind the bearer token; raises a 401/403 problem otherwise."""
        client = self._client_of(request)
        if client is None:
            with self._lock:
                self.unauthorized += 1
            raise _ProblemError(401, "Unauthorized", "missing, unknown or expired bearer token")
        if role is not None and self.clients[client][1] != role:
            raise _ProblemError(403, "Forbidden", f"{client} may not do this")
        return client

    def _meta(
        self, kind: str, body: Mapping[str, Any], old: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        now = rfc3339(time.time())
        oid = old["id"] if old else self._next_id(kind.lower())
        created = old["createdDateTime"] if old else now
        return {
            "id": oid,
            "createdDateTime": created,
            "modificationDateTime": now,
            "objectType": kind,
            **body,
        }

    def _page(self, request: web.Request, items: list[dict[str, Any]]) -> web.Response:
        skip = int(request.query.get("skip", "0"))
        limit = int(request.query.get("limit", "50"))
        return _json(items[skip : skip + limit])

    # -- auth -------------------------------------------------------------------------------
    async def _auth_server(self, request: web.Request) -> web.Response:
        return _json({"tokenURL": self.url + "/auth/token"})

    async def _auth_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        cid, secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        known = self.clients.get(cid)
        if known is None or known[0] != secret:
            return _problem(401, "Unauthorized", "unknown client or wrong secret")
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._store.tokens[token] = (cid, time.monotonic() + self.token_lifetime_s)
            self.tokens_issued[cid] = self.tokens_issued.get(cid, 0) + 1
        return _json(
            {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime_s}
        )

    # -- programs -------------------------------------------------------------------------------
    async def _programs(self, request: web.Request) -> web.Response:
        self._authorized(request)
        return self._page(request, list(self._store.programs.values()))

    async def _create_program(self, request: web.Request) -> web.Response:
        self._authorized(request, "bl")
        body = await request.json()
        if any(p["programName"] == body["programName"] for p in self._store.programs.values()):
            return _problem(409, "Conflict", "programName exists")
        obj = self._meta("PROGRAM", body)
        self._store.programs[obj["id"]] = obj
        return _json(obj, 201)

    # -- events ---------------------------------------------------------------------------------
    async def _events(self, request: web.Request) -> web.Response:
        self._authorized(request)
        pid = request.query.get("programID")
        items = [e for e in self._store.events.values() if pid is None or e["programID"] == pid]
        return self._page(request, items)

    async def _event(self, request: web.Request) -> web.Response:
        self._authorized(request)
        obj = self._store.events.get(request.match_info["id"])
        return _json(obj) if obj else _problem(404, "Not Found", "no such event")

    def _check_event(self, body: Mapping[str, Any]) -> web.Response | None:
        if body["programID"] not in self._store.programs:
            return _problem(400, "Bad Request", "unknown programID")
        for iv in body.get("intervals") or []:
            for p in iv["payloads"]:
                for e in payload_errors("event", p["type"], p["values"]):
                    self.error(f"event payload: {e}")
                    return _problem(400, "Bad Request", e)
        return None

    async def _create_event(self, request: web.Request) -> web.Response:
        self._authorized(request, "bl")
        body = await request.json()
        bad = self._check_event(body)
        if bad is not None:
            return bad
        obj = self._meta("EVENT", body)
        self._store.events[obj["id"]] = obj
        await self._notify("EVENT", "CREATE", obj)
        return _json(obj, 201)

    async def _update_event(self, request: web.Request) -> web.Response:
        self._authorized(request, "bl")
        old = self._store.events.get(request.match_info["id"])
        if old is None:
            return _problem(404, "Not Found", "no such event")
        body = await request.json()
        bad = self._check_event(body)
        if bad is not None:
            return bad
        obj = self._meta("EVENT", body, old)
        self._store.events[obj["id"]] = obj
        await self._notify("EVENT", "UPDATE", obj)
        return _json(obj)

    async def _delete_event(self, request: web.Request) -> web.Response:
        self._authorized(request, "bl")
        obj = self._store.events.pop(request.match_info["id"], None)
        if obj is None:
            return _problem(404, "Not Found", "no such event")
        await self._notify("EVENT", "DELETE", obj)
        return _json(obj)

    # -- vens -----------------------------------------------------------------------------------
    async def _vens(self, request: web.Request) -> web.Response:
        client = self._authorized(request)
        name = request.query.get("venName")
        bl = self.clients[client][1] == "bl"
        items = [
            v
            for v in self._store.vens.values()
            if (bl or v["clientID"] == client) and (name is None or v["venName"] == name)
        ]
        return self._page(request, items)

    async def _ven(self, request: web.Request) -> web.Response:
        self._authorized(request)
        obj = self._store.vens.get(request.match_info["id"])
        return _json(obj) if obj else _problem(404, "Not Found", "no such ven")

    async def _create_ven(self, request: web.Request) -> web.Response:
        client = self._authorized(request)
        body = dict(await request.json())
        if any(v["venName"] == body["venName"] for v in self._store.vens.values()):
            return _problem(409, "Conflict", "venName exists")
        body.pop("objectType")  # the request's discriminator; the object is a "VEN"
        body.setdefault("clientID", client)
        obj = self._meta("VEN", body)
        with self._lock:
            self._store.vens[obj["id"]] = obj
        return _json(obj, 201)

    # -- reports --------------------------------------------------------------------------------
    async def _reports(self, request: web.Request) -> web.Response:
        client = self._authorized(request)
        eid = request.query.get("eventID")
        bl = self.clients[client][1] == "bl"
        items = [
            r
            for r in self._store.reports.values()
            if (bl or r["clientID"] == client) and (eid is None or r["eventID"] == eid)
        ]
        return self._page(request, items)

    async def _create_report(self, request: web.Request) -> web.Response:
        client = self._authorized(request, "ven")
        body = await request.json()
        if body["eventID"] not in self._store.events:
            return _problem(404, "Not Found", "no such event")
        for d in body.get("payloadDescriptors") or []:
            if d.get("readingType") is not None:
                for e in reading_type_errors(d["readingType"]):
                    self.error(f"report: {e}")
        for res in body["resources"]:
            for iv in res["intervals"]:
                for p in iv["payloads"]:
                    for e in payload_errors("report", p["type"], p["values"]):
                        self.error(f"report payload: {e}")
        obj = self._meta("REPORT", {**body, "clientID": client})
        with self._lock:
            self._store.reports[obj["id"]] = obj
        return _json(obj, 201)

    # -- notifiers ------------------------------------------------------------------------------
    async def _notifiers(self, request: web.Request) -> web.Response:
        self._authorized(request)
        out: dict[str, Any] = {"WEBHOOK": True}
        if self.mqtt is not None:
            uri = self.advertise_uri or f"mqtt://{self.mqtt[0]}:{self.mqtt[1]}"
            out["MQTT"] = {
                "URIS": [uri],
                "serialization": "JSON",
                "authentication": {"method": "ANONYMOUS"},
            }
        return _json(out)

    async def _ven_topics(self, request: web.Request) -> web.Response:
        client = self._authorized(request)
        ven = self._store.vens.get(request.match_info["id"])
        what = request.match_info["what"]
        if self.mqtt is None or ven is None or what not in ("events", "programs", "resources"):
            return _problem(404, "Not Found", "no such topics")
        if ven["clientID"] != client and self.clients[client][1] != "bl":
            return _problem(403, "Forbidden", "another VEN's topics")
        root = f"openadr/{what}/vens/{ven['id']}"
        return _json(
            {
                "topics": {
                    "CREATE": f"{root}/create",
                    "UPDATE": f"{root}/update",
                    "DELETE": f"{root}/delete",
                    "ALL": f"{root}/+",
                }
            }
        )

    async def _notify(self, kind: str, op: str, obj: dict[str, Any]) -> None:
        """Publish the notification on every VEN's scoped topic (every VEN sees every
        event here: no targets are resolved), validated before it goes out."""
        if self.mqtt is None:
            return
        msg = {"objectType": kind, "operation": op, "object": obj}
        assert self.conformance is not None
        for e in self.conformance.schema_errors("notification", msg):
            self.error(f"notification: {e}")
        topics = [f"openadr/{kind.lower()}s/vens/{v}/{op.lower()}" for v in self._store.vens]
        try:
            async with asyncio.timeout(3.0):
                async with aiomqtt.Client(self.mqtt[0], self.mqtt[1], timeout=2.0) as c:
                    for t in topics:
                        await c.publish(t, json.dumps(msg).encode(), qos=1)
        except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
            with self._lock:
                self.publish_failures.append(f"{op} {obj['id']}: {exc!r}")
            return
        with self._lock:
            self.published.extend((t, msg) for t in topics)


class _ProblemError(Exception):
    """Raised by a handler: answer with this problem (validated like any answer)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.response = _problem(status, title, detail)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(obj).encode(), status=status, content_type="application/json"
    )


def _problem(status: int, title: str, detail: str) -> web.Response:
    return _json({"title": title, "status": status, "detail": detail}, status)


# -- a business-logic client, for the tests ---------------------------------------------------


class BlClient:
    """The utility's side, over HTTP through the same validation: `async with BlClient(vtn)`."""

    def __init__(self, vtn: Vtn) -> None:
        self.vtn = vtn
        self._http: aiohttp.ClientSession | None = None
        self._token = ""

    async def __aenter__(self) -> BlClient:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        form = {
            "grant_type": "client_credentials",
            "client_id": BL_CLIENT[0],
            "client_secret": BL_CLIENT[1],
        }
        got = await self._call("POST", "/auth/token", data=form, auth=False)
        self._token = got["access_token"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    async def _call(self, method: str, path: str, *, auth: bool = True, **kw: Any) -> Any:
        assert self._http is not None
        headers = {"Authorization": f"Bearer {self._token}"} if auth else {}
        async with self._http.request(method, self.vtn.url + path, headers=headers, **kw) as r:
            body = await r.json(content_type=None)
            if r.status >= 300:
                raise AssertionError(f"{method} {path}: {r.status} {body}")
            return body

    async def create_program(self, name: str, **fields: Any) -> dict[str, Any]:
        out: dict[str, Any] = await self._call(
            "POST", "/programs", json={"programName": name, **fields}
        )
        return out

    async def create_event(self, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("POST", "/events", json=body)
        return out

    async def update_event(self, eid: str, body: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("PUT", f"/events/{eid}", json=body)
        return out

    async def delete_event(self, eid: str) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("DELETE", f"/events/{eid}")
        return out

    async def reports(self, event_id: str | None = None) -> list[dict[str, Any]]:
        params = {} if event_id is None else {"eventID": event_id}
        out: list[dict[str, Any]] = await self._call("GET", "/reports", params=params)
        return out


def limit_event(
    program_id: str,
    kw: float,
    *,
    start: str = "0001-01-01T00:00:00Z",
    duration: str = "P9999Y",
    priority: int | None = None,
    payload_type: str = "IMPORT_CAPACITY_LIMIT",
    units: str = "KW",
    reports: list[dict[str, Any]] | None = None,
    name: str = "limit",
) -> dict[str, Any]:
    """An eventRequest: one interval asking for `kw` from `start` for `duration`."""
    body: dict[str, Any] = {
        "programID": program_id,
        "eventName": name,
        "priority": priority,
        "payloadDescriptors": [
            {"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": payload_type, "units": units}
        ],
        "intervalPeriod": {"start": start, "duration": duration},
        "intervals": [{"id": 0, "payloads": [{"type": payload_type, "values": [kw]}]}],
    }
    if reports is not None:
        body["reportDescriptors"] = reports
    return body


def iter_report_values(report: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """(payload type, value) of every interval of a report."""
    for res in report["resources"]:
        for iv in res["intervals"]:
            for p in iv["payloads"]:
                yield p["type"], float(p["values"][0])
