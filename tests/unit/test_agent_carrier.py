"""The pure parts of the carrier-up flush (fabric/agent/carrier.py): which neighbour entries it
may delete, and which link messages are a carrier-up edge. The kernel path is in
tests/privileged/test_agent_heal.py."""

from __future__ import annotations

import pytest

from fabric.agent import carrier
from fabric.netlink import fake, objects
from fabric.netlink.dataplane import KernelNeighbour

# ndm_state bits (include/uapi/linux/neighbour.h)
INCOMPLETE, REACHABLE, STALE, DELAY, PROBE, FAILED, NOARP, PERMANENT = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
MAC = "02:00:00:00:00:01"


def _n(ip: str, state: int, mac: str = "") -> KernelNeighbour:
    return KernelNeighbour("eth0", ip, mac, state)


def test_only_incomplete_and_failed_entries_without_address_are_selected() -> None:
    entries = [
        _n("198.18.0.1", INCOMPLETE),
        _n("198.18.0.2", FAILED),
        _n("fd00::3", INCOMPLETE),
        _n("fd00::4", FAILED),
        _n("198.18.0.5", REACHABLE, MAC),
        _n("198.18.0.6", STALE, MAC),
        _n("198.18.0.7", DELAY, MAC),
        _n("198.18.0.8", PROBE, MAC),
        _n("198.18.0.9", PERMANENT, MAC),
        _n("198.18.0.10", NOARP),
        _n("198.18.0.11", NOARP | PERMANENT, MAC),
        # Mixed bits are not a plain unresolved entry: kept.
        _n("198.18.0.12", INCOMPLETE | PERMANENT),
        _n("198.18.0.13", FAILED | NOARP),
        # An address present means something resolved it: kept.
        _n("198.18.0.14", FAILED, MAC),
    ]
    assert [n.ip for n in carrier.unresolved(entries)] == ["198.18.0.1", "198.18.0.2", "fd00::3", "fd00::4"]


def test_nothing_selected_from_a_resolved_table() -> None:
    assert carrier.unresolved([_n("198.18.0.5", REACHABLE, MAC), _n("198.18.0.9", PERMANENT, MAC)]) == []


@pytest.mark.parametrize("state", [INCOMPLETE, FAILED])
def test_flush_deletes_the_selected_entries_through_the_dataplane(state: int) -> None:
    dp = fake.FakeDataplane()
    dp.add_plain_link("eth0", ip="198.18.0.11")
    dp.set_neighbours([objects.Neighbour("eth0", "198.18.0.9", MAC)])
    dp.neighbours[("eth0", "198.18.0.1")] = _n("198.18.0.1", state)
    dp.neighbours[("eth0", "198.18.0.5")] = _n("198.18.0.5", REACHABLE, MAC)
    assert carrier.flush_unresolved(dp, "eth0") == ["198.18.0.1"]
    assert {n.ip for n in dp.list_neighbours("eth0")} == {"198.18.0.9", "198.18.0.5"}
    assert carrier.flush_unresolved(dp, "eth0") == []


def test_carrier_edges() -> None:
    t = carrier.CarrierTracker()
    t.learn(2, carrier.IFF_LOWER_UP)
    assert not t.update(2, carrier.IFF_LOWER_UP)  # still up: no edge
    assert not t.update(2, 0)  # down
    assert not t.update(2, 0)
    assert t.update(2, carrier.IFF_LOWER_UP)  # back: the edge
    assert not t.update(2, carrier.IFF_LOWER_UP)
    assert not t.update(7, carrier.IFF_LOWER_UP)  # first seen already up: no edge
    t.learn(9, 0)
    assert t.update(9, carrier.IFF_LOWER_UP)  # learnt down at start, then up
    t.forget(9)
    assert not t.update(9, carrier.IFF_LOWER_UP)  # a reused ifindex starts afresh
