"""A port on 127.0.0.1 that a process started later can listen on (UDP and TCP).

Why not the kernel's pick (bind to port 0, close, hand the number on): that port comes from the
ephemeral range (``net.ipv4.ip_local_port_range``, 32768-60999 by default), the same range every
outgoing TCP connection of the machine takes its source port from. Between the pick and the
listener's bind, or at any later restart of the listener (a lab's supervisor restarting
kosmos-mcs on the port saved in its state), a connection may hold it: seen in CI, where a kubelet's
connection to an API server took the clusterset DNS port and kosmos-mcs could never start again.
A port below the ephemeral range is never taken that way; it is picked at random (so concurrent
callers rarely collide) and checked free for both UDP and TCP.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: The lowest port handed out (above the well-known and most registered services' ports).
LOW = 10000
_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (the default when it cannot be read)."""
    try:
        lo, hi = (int(x) for x in _RANGE.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _free(host: str, port: int) -> bool:
    """Is ``port`` free on ``host`` for both UDP and TCP right now?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
        try:
            u.bind((host, port))
            t.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port free on ``host`` for UDP and TCP, outside the ephemeral range (module docstring).
    Raises OSError when none is found in ``tries`` random picks."""
    lo, _hi = ephemeral_range()
    top = lo - 1 if lo - 1 > LOW else 65535
    for _ in range(tries):
        port = random.randint(LOW, top)
        if not (lo <= port <= _hi) and _free(host, port):
            return port
    raise OSError(f"no port free for UDP and TCP on {host} between {LOW} and {top} outside the ephemeral range "
                  f"{lo}-{_hi} after {tries} tries")
