"""Read-ahead for paho's socket: many MQTT packets per readable event instead of one.

paho's `loop_read` reads one packet per call (for QoS 0 and 1 traffic) and reads it in
pieces: a `recv(1)` for the command byte, one per byte of the remaining length, one for the
body. aiomqtt calls it once per readable event, so every incoming message cost an event-loop
turn and three or more syscalls: a flood of small dispatches topped out near 3,000 a second
while the broker dropped the rest, and the control cycle shared the loop with all of it.

`ReadAhead` stands in for paho's socket: one `recv` of up to `CHUNK` bytes fills a buffer the
small reads are served from, and `pending()` says what is buffered, which aiomqtt's read
callback already honours (it loops while the socket has `pending()` bytes, as for TLS): one
readable event now reads every packet that arrived. Everything else is the real socket's.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import aiomqtt

CHUNK: Final = 64 * 1024


class _Socket(Protocol):
    def recv(self, bufsize: int, /) -> bytes: ...


class ReadAhead:
    """A socket whose reads come from a buffer refilled a chunk at a time."""

    def __init__(self, sock: _Socket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        """Up to `bufsize` buffered bytes; when none are, one real `recv` first, whose
        BlockingIOError / SSLWantReadError (nothing to read) and b"" (closed) paho handles
        as it would from the socket itself."""
        if self._pos >= len(self._buf):
            data = self._sock.recv(CHUNK)
            if not data:
                return data
            self._buf, self._pos = data, 0
        end = self._pos + bufsize
        out = self._buf[self._pos : end]
        self._pos = min(end, len(self._buf))
        return out

    def pending(self) -> int:
        """Bytes readable without a syscall: the buffer's, plus a TLS socket's decrypted ones."""
        inner = getattr(self._sock, "pending", None)
        return len(self._buf) - self._pos + (int(inner()) if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def install(client: aiomqtt.Client) -> None:
    """Give `client`'s paho connection a `ReadAhead` socket on every (re)connect.

    paho calls `on_socket_open` with the socket it has just made and stored, before it sends
    CONNECT; the wrapper replaces the stored one there, then aiomqtt's own handler (which
    registers the reader) runs on it."""
    paho = client._client  # aiomqtt exposes no hook for paho's socket
    aiomqtt_open = paho.on_socket_open
    if aiomqtt_open is None:
        raise RuntimeError("aiomqtt no longer sets paho's on_socket_open: read-ahead not installed")

    def on_socket_open(c: Any, userdata: Any, sock: Any) -> None:
        wrapped = ReadAhead(sock)
        c._sock = wrapped
        aiomqtt_open(c, userdata, wrapped)

    paho.on_socket_open = on_socket_open
