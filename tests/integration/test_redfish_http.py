"""The BMC HTTP client over real sockets: keep-alive, what a BMC may do to a kept connection,
and the three ways a body ends. (Hostile bytes of every kind: test_hostile_transport.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from drivers.base import DriverError, ProtocolError
from drivers.redfish.http import HttpConnection

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def bmc(
    handler: Handler, max_body_bytes: int = 1000
) -> AsyncIterator[tuple[HttpConnection, list[int]]]:
    """A TCP server on a free loopback port and a client of it; yields (client, one entry
    per connection the server accepted)."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(len(accepted))
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    http = HttpConnection(
        "127.0.0.1", srv.sockets[0].getsockname()[1], None, max_body_bytes=max_body_bytes
    )
    try:
        yield http, accepted
    finally:
        http.close()
        srv.close()
        await srv.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def reply(body: bytes, *headers: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


async def test_requests_share_one_connection() -> None:
    async def handler(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            body = head.split(b" ")[1]  # echo the path
            w.write(reply(body, b"Content-Length: %d" % len(body), b"X-Auth-Token: t"))

    async with bmc(handler) as (http, conns):
        for path in ("/a", "/b", "/c"):
            resp = await http.request("PATCH", path, b"Accept: application/json\r\n", b"{}")
            assert (resp.status, resp.body) == (200, path.encode())
            assert resp.headers["x-auth-token"] == "t"
        assert len(conns) == 1


async def test_a_connection_the_bmc_closed_while_idle_is_replaced_without_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(reply(b"ok", b"Content-Length: 2"))
        await w.drain()
        # ...and closes it while idle (its keep-alive timeout), saying nothing.

    async with bmc(handler) as (http, conns):
        for _ in range(3):
            resp = await http.request("GET", "/x", b"")
            assert resp.body == b"ok"
        assert len(conns) == 3


async def test_a_response_cut_off_on_a_new_connection_is_an_error_not_retried() -> None:
    async def handler(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Le")

    async with bmc(handler) as (http, conns):
        with pytest.raises(DriverError, match="closed mid-response"):
            await http.request("GET", "/x", b"")
        assert len(conns) == 1


CHUNKED = b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n"


@pytest.mark.parametrize(
    ("wire", "body"),
    [
        (reply(b"abc", b"Content-Length: 3"), b"abc"),
        (reply(CHUNKED, b"Transfer-Encoding: chunked"), b"abcde"),
        (reply(b"read to the end", b"Connection: close"), b"read to the end"),
    ],
    ids=["content-length", "chunked", "until-close"],
)
async def test_each_way_a_body_ends(wire: bytes, body: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(wire)
        await w.drain()
        if b"Connection: close" in wire:
            w.close()
        else:
            await reader.read()  # keep it open

    async with bmc(handler) as (http, _):
        assert (await http.request("GET", "/x", b"")).body == body


async def test_limits_are_protocol_errors() -> None:
    async def handler(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(reader)
        w.write(reply(b"x" * 20, b"Content-Length: 20"))
        await reader.read()

    async with bmc(handler, max_body_bytes=10) as (http, _):
        with pytest.raises(ProtocolError, match="exceeds 10"):
            await http.request("GET", "/x", b"")
