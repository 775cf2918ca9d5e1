"""tools.nsutil's readiness wait: a client started after it never meets 'connection refused'."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from fabric import netns as namespaces
from tools import nsutil

SLOW_SERVER = (
    "import socket, time; time.sleep(0.5); s = socket.socket(); s.bind(('127.0.0.1', 5399)); s.listen(); s.accept()"
)


def test_wait_listening_returns_once_a_slow_server_listens(netns: str) -> None:
    proc = nsutil.spawn_in_netns(netns, [sys.executable, "-c", SLOW_SERVER])
    try:
        assert 5399 not in nsutil.listening_ports(netns)
        nsutil.wait_listening(netns, 5399, proc, timeout_s=20)
        assert 5399 in nsutil.listening_ports(netns)
        namespaces.run_in(netns, lambda: socket.create_connection(("127.0.0.1", 5399), timeout=5).close())
    finally:
        proc.kill()
        proc.wait()


def test_wait_listening_fails_fast_when_the_server_exits(netns: str) -> None:
    proc = nsutil.spawn_in_netns(netns, [sys.executable, "-c", "raise SystemExit(3)"], stderr=subprocess.DEVNULL)
    with pytest.raises(RuntimeError, match=r"exited \(3\) before listening on 5399"):
        nsutil.wait_listening(netns, 5399, proc, timeout_s=20)
