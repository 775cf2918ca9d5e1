"""``ip`` in a privileged test's own namespace, and the desired state the netlink tests program
there (tests/privileged/conftest.py has their ``dp`` fixture)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from fabric.netlink.objects import Address, FdbEntry, KernelState, Neighbour, Route, Rule, VxlanLink

#: The policy routing table the netlink tests own.
TABLE = 200


@contextlib.contextmanager
def fresh_netns() -> Iterator[str]:
    """A fresh, empty network namespace (loopback up), deleted afterwards with all it holds
    (the ``netns`` fixture; tests that need a second one use this directly)."""
    name = f"kft-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def sh(netns: str, *args: str) -> None:
    """``ip -n NETNS ARGS``; a failure raises with ip's own message."""
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


def ipj(netns: str, *args: str, tool: str = "ip") -> Any:
    """``TOOL -n NETNS -j ARGS`` decoded ([] when the kernel has nothing to list)."""
    out = subprocess.run([tool, "-n", netns, "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def bridge_state(
    link: VxlanLink, neighbours: Iterable[Neighbour], fdb: Iterable[FdbEntry], routes: Iterable[Route]
) -> KernelState:
    """``vx-bridge`` (10.240.0.1/8) with its peers and routes in :data:`TABLE`, looked up by a rule."""
    return KernelState(
        links=frozenset({link}),
        addresses=frozenset({Address("vx-bridge", "10.240.0.1/8")}),
        rules=frozenset({Rule(socket.AF_INET, TABLE, 200)}),
        neighbours=frozenset(neighbours),
        fdb=frozenset(fdb),
        routes=frozenset(routes),
    )
