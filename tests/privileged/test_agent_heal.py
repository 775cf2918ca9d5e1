"""Issue 18 (heal within 1 s), against a real kernel: when the underlay regains carrier the agent
deletes the underlay's unresolved (INCOMPLETE/FAILED) neighbour entries and nothing else.

The agent itself runs (``Agent.run``: its real carrier monitor on RTNLGRP_LINK, its handler, its
reconcile worker) in a throwaway namespace whose underlay is one end of a veth pair; the other
end lives in a second throwaway namespace. No reflector answers (a unix socket path that does
not exist): the carrier path does not depend on the session. Nothing is sent outside the two
namespaces.

    node ns:  u0  198.51.100.1/24, fd00:1::1/64   (the agent's underlay)
    peer ns:  p0  198.51.100.2/24                  (set down/up: u0 loses/regains carrier)

During the cut (u0 NO-CARRIER) the test creates, on u0: INCOMPLETE entries by sending a UDP
datagram to absent neighbours (IPv4 and IPv6, as the tunnel probes do in the lab), a FAILED
entry, and entries that must survive: PERMANENT, REACHABLE, STALE.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest

from fabric import netns as namespaces
from fabric.agent import agent as agent_mod
from fabric.agent import carrier, config
from fabric.netlink import dataplane
from tests.privileged.kernelns import fresh_netns
from tests.unit.test_agent_loop import NoProber, _NoEvents
from tests.waiting import wait_until_async

INCOMPLETE, REACHABLE, STALE, FAILED, PERMANENT = 0x01, 0x02, 0x04, 0x20, 0x80
SURVIVORS = {"198.51.100.5": REACHABLE, "198.51.100.6": STALE, "198.51.100.9": PERMANENT}


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True)


@pytest.fixture
def peer_ns() -> Iterator[str]:
    with fresh_netns() as name:
        yield name


def _send_udp(ns: str, dst: str) -> None:
    """One datagram from ``ns`` to an absent neighbour: the kernel queues it behind a fresh
    INCOMPLETE entry and returns at once."""
    import socket

    def send() -> None:
        fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", (dst, 9))

    namespaces.run_in(ns, send)


def _table(dp: dataplane.KernelDataplane) -> dict[str, int]:
    return {n.ip: n.state for n in dp.list_neighbours("u0")}


def _flushed() -> float:
    return prometheus_client.REGISTRY.get_sample_value("fabric_agent_underlay_neighbours_flushed_total") or 0.0


def test_carrier_up_flushes_only_unresolved_underlay_neighbours(netns: str, peer_ns: str, tmp_path: Path) -> None:
    ip(netns, "link", "add", "u0", "type", "veth", "peer", "name", "p0", "netns", peer_ns)
    ip(netns, "addr", "add", "198.51.100.1/24", "dev", "u0")
    ip(netns, "-6", "addr", "add", "fd00:1::1/64", "dev", "u0", "nodad")
    ip(peer_ns, "addr", "add", "198.51.100.2/24", "dev", "p0")
    ip(netns, "link", "set", "u0", "up")
    ip(peer_ns, "link", "set", "p0", "up")
    dp = dataplane.KernelDataplane(netns=netns)
    cfg = config.load(["--reflector", f"unix:{tmp_path / 'no-reflector.sock'}", "--cluster", "c", "--node", "n",
                       "--underlay-ip", "198.51.100.1", "--pod-cidr", "10.9.1.0/24"], environ={})
    agent = agent_mod.Agent(
        cfg, dp, events_factory=_NoEvents, prober_factory=NoProber, handle_signals=False,
        carrier_factory=functools.partial(carrier.CarrierMonitor, netns=netns),
    )
    assert agent.underlay.name == "u0"

    async def scenario() -> None:
        run = asyncio.create_task(agent.run())
        try:
            await asyncio.sleep(0.2)  # the monitor has subscribed and learnt u0 up
            ip(peer_ns, "link", "set", "p0", "down")  # the cut: u0 loses carrier
            await wait_until_async(lambda: not _carrier(netns), 5, "u0 never lost carrier")
            _send_udp(netns, "198.51.100.7")
            _send_udp(netns, "fd00:1::7")
            ip(netns, "neigh", "replace", "198.51.100.8", "dev", "u0", "nud", "failed")
            for addr, nud in (("198.51.100.5", "reachable"), ("198.51.100.6", "stale"), ("198.51.100.9", "permanent")):
                ip(netns, "neigh", "replace", addr, "lladdr", f"02:00:00:00:00:0{addr[-1]}", "nud", nud, "dev", "u0")
            before = _table(dp)
            # The kernel keeps them while the carrier is down: what the agent must remove.
            unresolved = {a for a, s in before.items() if s in (INCOMPLETE, FAILED)}
            assert {"198.51.100.7", "fd00:1::7", "198.51.100.8"} <= unresolved, before
            assert before["198.51.100.7"] == INCOMPLETE and before["fd00:1::7"] == INCOMPLETE, before
            assert {a: before.get(a) for a in SURVIVORS} == SURVIVORS
            count = _flushed()
            ip(peer_ns, "link", "set", "p0", "up")  # heal
            await wait_until_async(lambda: _flushed() > count, 5, "the agent never flushed on carrier-up")
            after = _table(dp)
            assert not unresolved & after.keys(), after
            assert {a: after.get(a) for a in SURVIVORS} == SURVIVORS, after
            assert _flushed() - count == len(unresolved)
            assert not run.done()
        finally:
            agent.stop()
            assert await asyncio.wait_for(run, 10) == 0

    try:
        asyncio.run(scenario())
    finally:
        dp.close()


def _carrier(ns: str) -> bool:
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "u0"], check=True, capture_output=True, text=True)
    return "LOWER_UP" in out.stdout
