"""A lean HTTP/1.1 keep-alive client for BMCs: one connection per rack, one request at a time.

Why not aiohttp: a fleet-wide cap costs every rack one PATCH, and aiohttp's request machinery
(pooling across hosts, redirects, cookies, proxies, multidicts) costs several times the CPU of
the bare-stream floor of `rampd bench fanout` per request. A BMC needs none of it: a request
with an optional JSON body, and a response delimited by Content-Length, chunked encoding or
the connection's end, within size limits, over TCP or TLS.

`HttpConnection.request` raises `ProtocolError` for a response that is not HTTP or breaks a
limit, `DriverError` for transport failures (TLS included); the caller bounds it in time. Any
failure or cancellation closes the connection (its state is unknown), and the next request
opens a new one. A kept-alive connection the BMC closed while idle is retried once, on a new
connection, when not a byte of the response had come.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from drivers.base import DriverError, ProtocolError

MAX_HEAD_BYTES = 16384
"""Status line plus headers; a BMC's are a few hundred bytes."""
_BODYLESS = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes


class HttpConnection:
    """Requests to one BMC (`host`, `port`, TLS when `tls` is a context), in sequence."""

    def __init__(
        self, host: str, port: int, tls: ssl.SSLContext | None, *, max_body_bytes: int
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._max_body = max_body_bytes
        netloc = f"[{host}]" if ":" in host else host
        self._host_header = f"Host: {netloc}:{port}\r\n".encode()
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].transport.abort()  # no TLS close_notify wait: a BMC may hang
            self._streams = None

    async def request(
        self, method: str, path: str, headers: bytes, body: bytes | None = None
    ) -> Response:
        """`headers`: extra header lines, each ending in CRLF."""
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self._host_header + headers
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        wire = head + b"\r\n" + (body or b"")
        try:
            for attempt in (0, 1):
                fresh = self._streams is None
                reader, writer = await self._connect()
                writer.write(wire)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    partial = getattr(exc, "partial", b"")
                    if fresh or attempt or partial:
                        raise
                    self.close()  # closed by the BMC while idle: once more, on a new one
                    continue
                return await self._response(method, head, reader)
            raise AssertionError("unreachable")
        except BaseException as exc:
            self.close()
            if isinstance(exc, ssl.SSLError):
                raise DriverError(f"TLS: {exc}") from None
            if isinstance(exc, asyncio.IncompleteReadError):
                raise DriverError("connection closed mid-response") from None
            if isinstance(exc, asyncio.LimitOverrunError):
                raise ProtocolError(f"response head over {MAX_HEAD_BYTES} bytes") from None
            if isinstance(exc, OSError):
                raise DriverError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
            raise

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(
                self._host, self._port, ssl=self._tls, limit=MAX_HEAD_BYTES
            )
        return self._streams

    async def _response(self, method: str, head: bytes, reader: asyncio.StreamReader) -> Response:
        # Decoded once, whole, not per header name and value: every rack's exchange in a
        # fleet-wide cap pays for each decode.
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit() or len(code) != 3:
            raise ProtocolError(f"not an HTTP response: {lines[0][:40]!r}")
        status = int(code)
        if status < 200:
            raise ProtocolError(f"unexpected interim response {status}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ProtocolError(f"malformed header line {line[:40]!r}")
            headers[name.lower()] = value.strip()
        keep = version != "HTTP/1.0" and "close" not in headers.get("connection", "").lower()
        if method == "HEAD" or status in _BODYLESS:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._chunked(reader)
        elif "content-length" in headers:
            body = await self._sized(reader, headers["content-length"])
        else:
            body = await self._until_eof(reader)
            keep = False
        if not keep:
            self.close()
        return Response(status, headers, body)

    async def _sized(self, reader: asyncio.StreamReader, declared: str) -> bytes:
        if not declared.isdigit():
            raise ProtocolError(f"bad Content-Length {declared[:20]!r}")
        n = int(declared)
        if n > self._max_body:
            raise ProtocolError(f"body of {n} bytes exceeds {self._max_body}")
        return await reader.readexactly(n)

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            size_line = (await reader.readuntil(b"\r\n"))[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_line[:20]!r}") from None
            if size < 0 or len(body) + size > self._max_body:
                raise ProtocolError(f"body exceeds {self._max_body} bytes")
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return bytes(body)
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")

    async def _until_eof(self, reader: asyncio.StreamReader) -> bytes:
        body = await reader.read(self._max_body + 1)
        while len(body) <= self._max_body:
            more = await reader.read(self._max_body + 1 - len(body))
            if not more:
                return body
            body += more
        raise ProtocolError(f"body exceeds {self._max_body} bytes")
