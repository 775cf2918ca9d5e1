"""tools.ports: a port handed to a process that listens later is outside the kernel's ephemeral
range (where outgoing connections take their source ports) and free for UDP and TCP."""

from __future__ import annotations

import socket

import pytest

from tools import ports


def test_a_free_port_is_outside_the_ephemeral_range_and_free_for_udp_and_tcp() -> None:
    lo, hi = ports.ephemeral_range()
    for _ in range(20):
        port = ports.free_port()
        assert not lo <= port <= hi and port >= ports.LOW
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
            u.bind(("127.0.0.1", port))
            t.bind(("127.0.0.1", port))


def test_a_port_taken_for_tcp_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    busy = taken.getsockname()[1]
    picks = iter([busy, 12345, 12346, 12347])
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (busy + 1, busy + 2))
    monkeypatch.setattr(ports.random, "randint", lambda a, b: next(picks))
    try:
        got = ports.free_port()
    finally:
        taken.close()
    assert got != busy and got in (12345, 12346, 12347)
