"""Dual stack in the agent (issue 5), without root: configuration, announcement, rendering of
IPv6 devices onto the IPv6 underlay interface, ICMPv6 probe packets."""

from __future__ import annotations

import socket

import pytest

from fabric import types
from fabric.agent import config, probes, render
from fabric.netlink import objects

BASE = ["--reflector", "198.18.0.1:4880", "--cluster", "east", "--node", "e1", "--underlay-ip", "198.18.0.11"]


def test_dual_stack_flags_make_a_dual_stack_announcement() -> None:
    cfg = config.load([*BASE, "--underlay-ip6", "fd00:198:18::b", "--pod-cidr", "10.10.1.0/24",
                       "--pod-cidr", "fd00:10:10:1::/64"], environ={})  # fmt: skip
    ann = config.announcement(cfg, 1500)
    assert ann.underlay_ips == ("198.18.0.11", "fd00:198:18::b")
    assert ann.underlay(6) == "fd00:198:18::b" and ann.pod_cidrs == ("10.10.1.0/24", "fd00:10:10:1::/64")
    env = config.load([*BASE, "--pod-cidr", "10.10.1.0/24"], environ={"FABRIC_UNDERLAY_IP6": "fd00:198:18::b"})
    assert env.underlay_ip6 == "fd00:198:18::b"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--underlay-ip6", "198.18.0.12"], "--underlay-ip6: 198.18.0.12 is not an IPv6 address"),
        (["--underlay-ip6", "nope"], "--underlay-ip6: invalid value 'nope'"),
    ],
)
def test_bad_ipv6_underlay_is_refused_naming_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.load([*BASE, "--pod-cidr", "10.10.1.0/24", *argv], environ={})


def test_ipv6_device_binds_to_the_interface_holding_the_ipv6_underlay() -> None:
    state = types.NodeState(
        devices=(
            types.VxlanDevice("vx-bridge", 54, 4876, "02:00:00:00:00:01", "100.82.0.11/10", "198.18.0.11", 1450),
            types.VxlanDevice("vx-bridge-6", 64, 4866, "02:00:00:00:00:02", "fd00:100:64::b/64", "fd00:198:18::b",
                              1430),
        ),
        peers=(types.Peer("vx-bridge-6", "fd00:100:64::c", "02:00:00:00:00:03", "fd00:198:18::c"),),
        routes=(types.RouteEntry("fd00:10:20::/48", "fd00:100:64::c", "vx-bridge-6"),),
    )
    ks = render.render(state, underlay_ifindex=2, table=200, rule_priority=200,
                       underlay_ifindexes={"fd00:198:18::b": 7})  # fmt: skip
    links = {link.name: link for link in ks.links if isinstance(link, objects.VxlanLink)}
    assert (links["vx-bridge"].underlay_ifindex, links["vx-bridge-6"].underlay_ifindex) == (2, 7)
    assert {r.family for r in ks.rules} == {socket.AF_INET, socket.AF_INET6}
    assert objects.Neighbour("vx-bridge-6", "fd00:100:64::c", "02:00:00:00:00:03") in ks.neighbours
    assert objects.Route(200, "fd00:10:20::/48", "vx-bridge-6", "fd00:100:64::c") in ks.routes


def test_icmpv6_echo_packets() -> None:
    req = probes.echo_request6(0x1234, 7)
    assert req[0] == 128 and req[4:8] == bytes.fromhex("12340007")
    reply = bytes([129, 0, 0, 0]) + req[4:]
    assert probes.parse_echo_reply6(reply, 0x1234) == 7
    assert probes.parse_echo_reply6(reply, 0x9999) is None
    assert probes.parse_echo_reply6(req, 0x1234) is None  # a request is not a reply
