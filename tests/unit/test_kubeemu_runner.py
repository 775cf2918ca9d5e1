"""kubeemu.runner's ServerThread: stopping it leaves no task of the server behind.

aiohttp does not cancel the handler of a request whose client went away and forgets its task,
so the runner's cleanup cannot cancel it; ``stop()`` must, with the loop's other leftovers (the
tree tests' injected latency left such handlers: "Task was destroyed but it is pending!").
"""

from __future__ import annotations

import gc
import logging
import socket
import struct

import pytest

from kubeemu.runner import ServerThread
from tests.waiting import wait_until

pytestmark = pytest.mark.unit


def _open_connections(server: ServerThread) -> int:
    """Connections of the aiohttp server whose transport is still there (aiohttp 3.14 keeps a
    lost connection listed while its handler runs, with no transport and no handler task)."""
    assert server.server is not None and server.server._runner is not None
    aio = server.server._runner.server
    assert aio is not None
    return sum(1 for h in aio.connections if h.transport is not None)


def test_stop_cancels_a_handler_whose_client_went_away(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    server = ServerThread(name="runner").start()
    assert server.server is not None
    server.server.faults.latency_ms = 60_000  # the handler sleeps in the middleware
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        # Closed with a reset, as a client that timed out and dropped its connection does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"GET /version HTTP/1.1\r\nHost: runner\r\n\r\n")
        wait_until(lambda: server.server is not None and server.server.requests == 1, 5, "request in the handler")
    # The client is gone: aiohttp forgets the handler's task (the runner cleanup cannot cancel it).
    wait_until(lambda: server.call(lambda: _open_connections(server)) == 0, 5, "the connection lost")
    server.stop()
    gc.collect()
    destroyed = [r.getMessage() for r in caplog.records if "Task was destroyed" in r.getMessage()]
    assert destroyed == []
