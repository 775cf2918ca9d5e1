"""The underlay reader against a real kernel, in a throwaway namespace, and the choice made from it.

Namespace layout (nothing outside it is touched; nothing is sent anywhere: ``route get`` only asks):

    ens7   veth,  DOWN   192.0.2.7/24 (peer peer7, down)
    ens9   veth,  UP     198.51.100.2/24, 198.51.100.3/24, 2001:db8:1::2/64
    peer9  veth,  UP     (its peer; IPv6 link-local only)
    203.0.113.0/24 via 198.51.100.1 src 198.51.100.3
    2001:db8:99::/48 via 2001:db8:1::1
"""

from __future__ import annotations

import subprocess

import pytest

from fabric import nodeinfo
from fabric.agent import agent, config
from fabric.netlink import underlay


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True)


@pytest.fixture
def host(netns: str) -> str:
    ip(netns, "link", "add", "ens7", "type", "veth", "peer", "name", "peer7")
    ip(netns, "addr", "add", "192.0.2.7/24", "dev", "ens7")
    ip(netns, "link", "add", "ens9", "type", "veth", "peer", "name", "peer9")
    ip(netns, "addr", "add", "198.51.100.2/24", "dev", "ens9")
    ip(netns, "addr", "add", "198.51.100.3/24", "dev", "ens9")
    ip(netns, "-6", "addr", "add", "2001:db8:1::2/64", "dev", "ens9", "nodad")
    ip(netns, "link", "set", "ens9", "up")
    ip(netns, "link", "set", "peer9", "up")
    ip(netns, "route", "add", "203.0.113.0/24", "via", "198.51.100.1", "src", "198.51.100.3")
    ip(netns, "-6", "route", "add", "2001:db8:99::/48", "via", "2001:db8:1::1")
    return netns


def test_read_links(host: str) -> None:
    links = {ln.name: ln for ln in underlay.read_links(host)}
    assert set(links) == {"lo", "ens7", "peer7", "ens9", "peer9"}
    assert links["lo"].loopback and links["lo"].up
    assert not links["ens7"].up and links["ens7"].kind == "veth"
    assert links["ens9"].up and links["ens9"].kind == "veth" and not links["ens9"].loopback
    got = {(a.address, a.family, a.scope) for a in links["ens9"].addresses}
    assert {("198.51.100.2", 4, "global"), ("198.51.100.3", 4, "global"), ("2001:db8:1::2", 6, "global")} <= got
    assert any(a.scope == "link" and a.family == 6 for a in links["ens9"].addresses)
    assert ("127.0.0.1", 4, "host") in {(a.address, a.family, a.scope) for a in links["lo"].addresses}


def test_route_towards(host: str) -> None:
    assert underlay.route_towards("203.0.113.5", host) == nodeinfo.RouteHint("203.0.113.5", "198.51.100.3", "ens9")
    assert underlay.route_towards("198.51.100.9", host) == nodeinfo.RouteHint("198.51.100.9", "198.51.100.2", "ens9")
    assert underlay.route_towards("2001:db8:99::1", host) == nodeinfo.RouteHint("2001:db8:99::1", "2001:db8:1::2",
                                                                               "ens9")
    miss = underlay.route_towards("100.64.0.1", host)
    assert miss.source == "" and "unreachable" in miss.error.lower()


def test_choice_from_the_kernel(host: str) -> None:
    links = underlay.read_links(host)
    internal = {4: "10.0.0.1", 6: "fd00::1"}

    def choose(method: str, nic: str = "*") -> tuple[str, str]:
        route = underlay.route_towards(method.partition("=")[2], host) if method.startswith("can-reach=") else None
        u = nodeinfo.choose_underlay("n1", method, nic, links, route, internal)
        return u.ip, u.ip6

    assert choose("interface=^ens") == ("198.51.100.2", "2001:db8:1::2")  # ens7 sorts first but is down
    assert choose("first-found") == ("198.51.100.2", "2001:db8:1::2")
    assert choose("can-reach=203.0.113.5") == ("198.51.100.3", "fd00::1")
    assert choose("can-reach=2001:db8:99::1") == ("10.0.0.1", "2001:db8:1::2")
    with pytest.raises(nodeinfo.NodeInfoError, match=r"no source address towards 100\.64\.0\.1"):
        choose("can-reach=100.64.0.1")
    with pytest.raises(nodeinfo.NodeInfoError, match="'peer9' has no global IPv4"):
        choose("first-found", nic="peer9")


def test_agent_startup_step_in_the_namespace(host: str) -> None:
    facts = nodeinfo.NodeFacts("10.0.0.1", "", ("10.10.1.0/24",))
    cfg = config.load(["--reflector", "r:4880", "--cluster", "east", "--node", "n1", "--in-cluster",
                       "--autodetection-method", "can-reach=203.0.113.5"], environ={})
    assert agent._choose_underlay(cfg, facts, netns=host).underlay_ip == "198.51.100.3"
    cfg = config.load(["--reflector", "r:4880", "--cluster", "east", "--node", "n1", "--in-cluster",
                       "--autodetection-method", "can-reach=203.0.113.5", "--nic-override", "n1=ens7"], environ={})
    assert agent._choose_underlay(cfg, facts, netns=host).underlay_ip == "192.0.2.7"  # explicit: down is accepted
