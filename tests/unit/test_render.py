"""render(): planned NodeState -> kernel objects, pure."""

from __future__ import annotations

import socket

from fabric import types
from fabric.agent import render
from fabric.netlink import objects

DEV = types.VxlanDevice(
    name="vx-bridge", vni=54, port=4876, mac="02:AA:00:00:00:01", address="100.82.0.11/10", local="198.18.0.11",
    mtu=1450,
)
PEER = types.Peer(device="vx-bridge", overlay_ip="100.82.0.13", mac="02:aa:00:00:00:03", underlay_ip="198.18.0.13",
                  node="west/w1")


def _render(state: types.NodeState) -> objects.KernelState:
    return render.render(state, underlay_ifindex=7, table=200, rule_priority=200)


def test_device_peer_and_route_become_link_address_rule_neighbour_fdb_route() -> None:
    state = types.NodeState.from_entries(
        [DEV, PEER, types.RouteEntry(dst="10.20.1.7/24", via="100.82.0.13", device="vx-bridge")]
    )
    ks = _render(state)
    assert ks.links == {objects.VxlanLink("vx-bridge", 54, 4876, "02:aa:00:00:00:01", "198.18.0.11", 7, 1450)}
    assert ks.addresses == {objects.Address("vx-bridge", "100.82.0.11/10")}
    assert ks.rules == {objects.Rule(socket.AF_INET, 200, 200)}
    assert ks.neighbours == {objects.Neighbour("vx-bridge", "100.82.0.13", "02:aa:00:00:00:03")}
    assert ks.fdb == {objects.FdbEntry("vx-bridge", "02:aa:00:00:00:03", "198.18.0.13")}
    # canonical CIDR: the kernel reports network form, so the diff must compare network form
    assert ks.routes == {objects.Route(200, "10.20.1.0/24", "vx-bridge", "100.82.0.13")}


def test_route_without_planned_peer_is_not_programmed() -> None:
    state = types.NodeState.from_entries([DEV, types.RouteEntry(dst="10.20.1.0/24", via="100.82.0.99",
                                                                device="vx-bridge")])
    assert _render(state).routes == frozenset()


def test_peer_on_unplanned_device_is_ignored() -> None:
    state = types.NodeState.from_entries([PEER])
    ks = _render(state)
    assert not ks.neighbours and not ks.fdb and not ks.links and not ks.rules


def test_empty_state_renders_empty() -> None:
    assert _render(types.NodeState()) == objects.KernelState()
