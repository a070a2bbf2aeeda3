"""The VEN's REST side: OAuth2 client credentials and the VTN's endpoints (aiohttp).

The token URL comes from `GET /auth/server`; a token is renewed before it expires (its
`expires_in` less a margin, at most half its lifetime) and once more on a 401. Every request
has a timeout; anything but the expected answer is a `VtnError` the caller logs and retries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urljoin

import aiohttp

log = logging.getLogger("rampd.openadr")

PAGE: Final = 50
"""The specification's maximum `limit`."""
MAX_PAGES: Final = 200
"""A VTN that never stops paging is cut off (10,000 objects)."""


class VtnError(Exception):
    """The VTN did not answer as the specification says (or not at all)."""

    def __init__(self, text: str, status: int | None = None) -> None:
        super().__init__(text)
        self.status = status


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float
    """Monotonic; inf when the VTN gave no lifetime."""
    renew_at: float


def ssl_context(ca_file: Path | None) -> ssl.SSLContext | None:
    return None if ca_file is None else ssl.create_default_context(cafile=str(ca_file))


def _problem(body: bytes) -> str:
    """The problem object's title/detail, else the start of the body."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body[:120].decode(errors="replace")
    if isinstance(obj, dict):
        parts = [str(obj[k]) for k in ("title", "detail", "error", "error_description") if k in obj]
        if parts:
            return ": ".join(parts)
    return body[:120].decode(errors="replace")


class VtnClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        client_id: str,
        secret: str,
        *,
        scope: str | None,
        timeout_s: float,
        refresh_margin_s: float,
        ssl_ctx: ssl.SSLContext | None = None,
        on_request: Callable[[str, str], None] | None = None,
    ) -> None:
        self._http = session
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self._secret = secret
        self._scope = scope
        self._timeout_s = timeout_s
        self._margin_s = refresh_margin_s
        self._ssl = ssl_ctx
        self._on_request = on_request or (lambda op, result: None)
        self._token: Token | None = None
        self._token_url: str | None = None
        self._token_lock = asyncio.Lock()
        self.tokens_fetched = 0

    def url(self, path: str) -> str:
        return self.base_url + path

    # -- OAuth2 ---------------------------------------------------------------------------
    async def token(self) -> str:
        """A valid access token, fetched or renewed when due."""
        async with self._token_lock:
            tok = self._token
            if tok is None or time.monotonic() >= tok.renew_at:
                tok = self._token = await self._fetch_token()
            return tok.value

    def drop_token(self) -> None:
        self._token = None

    async def _fetch_token(self) -> Token:
        if self._token_url is None:
            info = await self._raw("GET", "/auth/server", op="auth_server", auth=False)
            url = info.get("tokenURL") if isinstance(info, dict) else None
            if not isinstance(url, str) or not url:
                raise VtnError("/auth/server: no tokenURL")
            self._token_url = urljoin(self.base_url + "/", url)
        form = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self._secret,
        }
        if self._scope:
            form["scope"] = self._scope
        try:
            body = await self._send("POST", self._token_url, op="token", data=form)
        except VtnError:
            self._token_url = None  # the auth server may have moved: ask again next time
            raise
        if not isinstance(body, dict):
            raise VtnError("token endpoint: not a JSON object")
        value, kind = body.get("access_token"), body.get("token_type")
        if not isinstance(value, str) or not value or str(kind).lower() != "bearer":
            raise VtnError("token endpoint: no bearer access_token")
        life = body.get("expires_in")
        now = time.monotonic()
        if isinstance(life, int | float) and not isinstance(life, bool) and life > 0:
            margin = min(self._margin_s, 0.5 * float(life))
            tok = Token(value, now + float(life), now + float(life) - margin)
        else:
            tok = Token(value, float("inf"), float("inf"))
        self.tokens_fetched += 1
        log.debug("token fetched (expires in %s s)", life)
        return tok

    # -- requests -------------------------------------------------------------------------
    async def request(
        self,
        method: str,
        path: str,
        *,
        op: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        expect: tuple[int, ...] = (200,),
    ) -> Any:
        """An authorized request to the VTN; on a 401, one retry with a fresh token."""
        for attempt in (1, 2):
            try:
                return await self._raw(
                    method, path, op=op, params=params, body=body, expect=expect, auth=True
                )
            except VtnError as exc:
                if exc.status != 401 or attempt == 2:
                    raise
                self.drop_token()
        raise AssertionError("unreachable")

    async def _raw(
        self,
        method: str,
        path: str,
        *,
        op: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        expect: tuple[int, ...] = (200,),
        auth: bool,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {await self.token()}"
        return await self._send(
            method,
            self.url(path),
            op=op,
            params=params,
            json_body=body,
            headers=headers,
            expect=expect,
        )

    async def _send(
        self,
        method: str,
        url: str,
        *,
        op: str,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._http.request(
                    method,
                    url,
                    params=params,
                    json=json_body,
                    data=data,
                    headers=headers,
                    ssl=self._ssl if self._ssl is not None else True,
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
        except TimeoutError:
            self._on_request(op, "timeout")
            raise VtnError(f"{op}: no answer within {self._timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            self._on_request(op, "error")
            raise VtnError(f"{op}: {type(exc).__name__}: {exc}") from None
        if status not in expect:
            self._on_request(op, str(status))
            raise VtnError(f"{op}: HTTP {status}: {_problem(raw)}", status)
        try:
            out = json.loads(raw) if raw else None
        except ValueError:
            self._on_request(op, "bad_json")
            raise VtnError(f"{op}: answer is not JSON") from None
        self._on_request(op, "ok")
        return out

    async def get_all(
        self, path: str, *, op: str, params: Mapping[str, str] | None = None
    ) -> list[Any]:
        """Every object of a search, page by page (skip/limit)."""
        out: list[Any] = []
        for page in range(MAX_PAGES):
            q = {**(params or {}), "skip": str(page * PAGE), "limit": str(PAGE)}
            got = await self.request("GET", path, op=op, params=q)
            if not isinstance(got, list):
                raise VtnError(f"{op}: answer is not a list")
            out.extend(got)
            if len(got) < PAGE:
                return out
        raise VtnError(f"{op}: more than {MAX_PAGES} pages")
