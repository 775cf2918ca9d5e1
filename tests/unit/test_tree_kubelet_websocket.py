"""tree/websocket.py frame by frame over a socket pair: masking by side, the three length
encodings, fragments joined, pings answered, a close answered once, a refused upgrade's body."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tree import websocket as ws

pytestmark = pytest.mark.unit


@pytest.fixture
def pair() -> Iterator[tuple[ws.Conn, ws.Conn]]:
    a, b = socket.socketpair()
    client = ws.Conn(a, a.makefile("rb"), client=True)
    server = ws.Conn(b, b.makefile("rb"), client=False)
    yield client, server
    a.close()
    b.close()


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_messages_of_every_length_encoding_both_ways(pair: tuple[ws.Conn, ws.Conn], size: int) -> None:
    client, server = pair
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    t = threading.Thread(target=client.send, args=(ws.BINARY, b"\x01" + payload))
    t.start()
    assert server.recv() == (ws.BINARY, b"\x01" + payload)
    t.join()
    t = threading.Thread(target=server.send, args=(ws.TEXT, payload))
    t.start()
    assert client.recv() == (ws.TEXT, payload)
    t.join()


def test_a_client_frame_is_masked_and_a_server_frame_is_not(pair: tuple[ws.Conn, ws.Conn]) -> None:
    client, server = pair
    client.send(ws.BINARY, b"abc")
    head = server.rfile.read(2)
    assert head[1] & 0x80 and head[1] & 0x7F == 3
    key, body = server.rfile.read(4), server.rfile.read(3)
    assert bytes(x ^ key[i % 4] for i, x in enumerate(body)) == b"abc"
    server.send(ws.BINARY, b"xyz")
    assert client.rfile.read(5) == b"\x82\x03xyz"


def test_fragments_are_joined_and_pings_answered_between_them(pair: tuple[ws.Conn, ws.Conn]) -> None:
    client, server = pair
    # a server's frames, by hand: "he" (not final), a ping, "llo" (continuation, final)
    server.sock.sendall(b"\x02\x02he" + b"\x89\x04ping" + b"\x80\x03llo")
    assert client.recv() == (ws.BINARY, b"hello")
    b0, b1 = server.rfile.read(2)
    assert b0 == 0x80 | ws.PONG and b1 == 0x80 | 4  # a masked pong with the ping's payload
    key = server.rfile.read(4)
    assert bytes(x ^ key[i % 4] for i, x in enumerate(server.rfile.read(4))) == b"ping"


def test_a_close_is_answered_once_and_ends_the_reader(pair: tuple[ws.Conn, ws.Conn]) -> None:
    client, server = pair
    server.close(1000)
    assert client.recv() is None and client.close_received and client.close_sent
    assert server.recv() is None  # the answer to its close
    with pytest.raises(OSError):
        client.send(ws.BINARY, b"late")


def test_a_server_frame_that_is_masked_is_a_protocol_error(pair: tuple[ws.Conn, ws.Conn]) -> None:
    client, server = pair
    server.sock.sendall(b"\x82\x81" + b"\x00\x00\x00\x00" + b"x")
    with pytest.raises(ws.ProtocolError):
        client.recv()


def test_accept_key_is_the_rfc_example() -> None:
    assert ws.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert ws.offered(" v5.channel.k8s.io, v4.channel.k8s.io ,") == ["v5.channel.k8s.io", "v4.channel.k8s.io"]
