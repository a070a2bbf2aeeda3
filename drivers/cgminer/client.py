"""The client side of the cgminer-style API: one request out, one reply in, one connection.

The LuxOS and Whatsminer drivers and `rampd discover` exchange through `exchange`; for a LuxOS
fleet it runs for every poll and every command of every miner (`rampd bench fanout`).
"""

from __future__ import annotations

import asyncio
from typing import cast

from drivers.base import DeviceTimeout, DriverError, ProtocolError
from drivers.cgminer.wire import MAX_MESSAGE_BYTES, Json, decode_object, object_end


class _Exchange(asyncio.Protocol):
    """One request out, bytes in until the miner closes, sends its NUL, or ends the object.

    A bare Protocol rather than streams: this runs for every poll of every miner, and a
    connection then costs no reader, writer or task objects.
    """

    def __init__(self, request: bytes, done: asyncio.Future[bytes]) -> None:
        self._request = request
        self._done = done
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, so no isinstance).
        cast(asyncio.WriteTransport, transport).write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            return
        self._buf += data
        nul = self._buf.find(b"\x00")
        if nul >= 0:
            self._done.set_result(bytes(self._buf[:nul]))
        elif len(self._buf) > MAX_MESSAGE_BYTES:
            self._done.set_exception(ProtocolError(f"reply over {MAX_MESSAGE_BYTES} bytes"))
        elif self._buf.rstrip().endswith(b"}"):  # cheap test before scanning the object
            try:
                end = object_end(self._buf)
            except ProtocolError as exc:
                self._done.set_exception(exc)
                return
            if end is not None:
                self._done.set_result(bytes(self._buf[:end]))

    def eof_received(self) -> bool:
        if not self._done.done():
            self._done.set_result(bytes(self._buf))
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            if exc is None or self._buf:
                self._done.set_result(bytes(self._buf))
            else:
                self._done.set_exception(exc)


async def exchange(host: str, port: int, request: bytes, timeout_s: float) -> Json:
    """One request, one reply, one connection; the whole exchange within timeout_s.

    Raises DeviceTimeout, DriverError (connection refused or reset) or ProtocolError (a reply
    that is not a JSON object).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                lambda: _Exchange(request, done), host, port
            )
            data = await done
    except TimeoutError:
        raise DeviceTimeout(f"no answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise DriverError(exc.strerror or type(exc).__name__) from None
    finally:
        if transport is not None:
            transport.close()
    if not data:
        raise ProtocolError("connection closed without a reply")
    return decode_object(data, "reply")


__all__ = ["exchange"]
