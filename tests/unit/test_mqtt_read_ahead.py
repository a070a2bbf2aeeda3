"""ReadAhead: paho's small reads served from one chunk, over a real socket pair."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest

from controller.mqtt_read_ahead import CHUNK, ReadAhead


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        yield a, b


def test_small_reads_come_from_one_chunk(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(b"\x30\x05hello\x30\x02ok")
    r = ReadAhead(a)
    assert r.recv(1) == b"\x30"
    assert r.pending() == 10  # the rest was read with the first byte
    assert r.recv(1) == b"\x05"
    assert r.recv(5) == b"hello"
    assert r.recv(100) == b"\x30\x02ok"  # no more than is buffered, without another recv
    assert r.pending() == 0
    with pytest.raises(BlockingIOError):  # nothing buffered, nothing on the socket
        r.recv(1)
    b.sendall(b"more")
    assert r.recv(2) == b"mo" and r.recv(2) == b"re"


def test_a_closed_peer_reads_as_empty(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(b"x")
    b.shutdown(socket.SHUT_WR)
    r = ReadAhead(a)
    assert r.recv(4) == b"x"
    assert r.recv(4) == b""


def test_a_chunk_at_most_per_recv(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.setblocking(False)
    sent = b.send(b"z" * (3 * CHUNK))
    r = ReadAhead(a)
    r.recv(1)
    assert r.pending() <= CHUNK - 1
    got = 1
    while got < sent:
        got += len(r.recv(CHUNK))
    assert got == sent


def test_everything_else_is_the_sockets(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    r = ReadAhead(a)
    assert r.fileno() == a.fileno()
    assert r.getsockname() == a.getsockname()


def test_paho_parses_packets_through_it(pair: tuple[socket.socket, socket.socket]) -> None:
    """paho's own reader, fed three PUBLISH packets in one write, reads all three through
    the read-ahead (loop_read a packet at a time while bytes are pending, as aiomqtt does)."""
    a, b = pair
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    got: list[tuple[str, bytes]] = []
    client.on_message = lambda _c, _u, m: got.append((m.topic, m.payload))
    r = ReadAhead(a)
    client._sock = r  # type: ignore[assignment]
    client._state = paho._ConnectionState.MQTT_CS_CONNECTED

    def publish(topic: bytes, payload: bytes) -> bytes:
        body = len(topic).to_bytes(2, "big") + topic + payload  # QoS 0: no packet id
        return bytes([0x30, len(body)]) + body

    b.sendall(publish(b"s/dispatch", b"1") + publish(b"s/dispatch", b"22") + publish(b"s/x", b""))
    client.loop_read()
    while r.pending():
        client.loop_read()
    assert got == [("s/dispatch", b"1"), ("s/dispatch", b"22"), ("s/x", b"")]
