"""The vx-local prefixes other clusters route to a gateway-mode cluster
(:func:`fabric.control.planner.local_hosts`): the images of its ``nodeCIDRs`` and, around its
other nodes, the widest prefixes that hold no other cluster's vx-local address. Issue 21 section
1: with the nodes' addresses collapsed instead, every join changed every plan outside its cluster.

The properties, over random fabrics (clusters in blocks, interleaved, declared or not): the
longest prefix that matches a node's vx-local address is its own cluster's, and only one; a
node that joins inside its cluster's prefix moves no prefix of any cluster."""

from __future__ import annotations

import dataclasses
import ipaddress
import random

import pytest

from fabric import types, validation
from fabric.control import election, planner

GW, P2P = types.ClusterMode.GATEWAY, types.ClusterMode.P2P
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _topology(config: types.FabricConfig, nodes: list[types.NodeAnnouncement]) -> types.Topology:
    t = dataclasses.replace(types.Topology(config), nodes=tuple(sorted(nodes, key=lambda n: n.key)))
    return t.with_roles(election.elect(t, {n.key for n in nodes}, {}))


def _prefixes(topo: types.Topology, family: int = 4) -> dict[str, tuple[str, ...]]:
    view = planner.VIEWS.get(topo)
    return {name: planner.local_hosts(view, cv, family) for name, cv in view.clusters.items() if cv.gateway_mode}


def _owner(prefixes: dict[str, tuple[str, ...]], addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The cluster of the longest prefix holding ``addr``; fails when two clusters' tie."""
    best: list[tuple[int, str]] = []
    for name, nets in prefixes.items():
        best += [(ipaddress.ip_network(n).prefixlen, name) for n in nets if addr in ipaddress.ip_network(n)]
    if not best:
        return None
    best.sort(reverse=True)
    assert len(best) == 1 or best[0][0] > best[1][0], f"{addr}: two clusters route it as long: {best}"
    return best[0][1]


def _vx_local(node: types.NodeAnnouncement, local: str = "198.19.0.0/16") -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(planner.overlay_address(node.underlay_ip, local).partition("/")[0])


def _random_fabric(rng: random.Random) -> tuple[types.FabricConfig, list[types.NodeAnnouncement]]:
    """2-6 gateway-mode clusters and a P2P one. Each gateway cluster gets an underlay /26 block
    (declared as nodeCIDRs half the time) and places its nodes in it, or, interleaved, anywhere
    in a shared /24; a few nodes stray outside their block."""
    k = rng.randint(2, 6)
    blocks = rng.sample(range(8, 64), k)  # /26 number b of 198.18.0.0/16
    clusters = [types.ClusterConfig("p", P2P, ("10.200.0.0/16",))]
    nodes: list[types.NodeAnnouncement] = []
    used: set[int] = set()

    def address(lo: int, hi: int) -> str | None:
        for _ in range(50):
            a = rng.randint(lo, hi)
            if a not in used:
                used.add(a)
                return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.0")) + a))
        return None

    interleaved = rng.random() < 0.3
    for c in range(k):
        block = blocks[c] * 64
        declared = (f"{ipaddress.IPv4Address(int(ipaddress.IPv4Address('198.18.0.0')) + block)}/26",)
        clusters.append(types.ClusterConfig(
            f"g{c}", GW, (f"10.{c}.0.0/16",), node_cidrs=declared if rng.random() < 0.5 else ()))  # fmt: skip
        for i in range(rng.randint(1, 12)):
            if interleaved:
                where = (1, 254)
            elif rng.random() < 0.1:
                where = (256, 64 * 64 - 1)  # a stray: anywhere, maybe inside another's block
            else:
                where = (block + 1, block + 62)
            ul = address(*where)
            if ul is not None:
                nodes.append(types.NodeAnnouncement(f"g{c}", f"n{i}", ul, (f"10.{c}.{i}.0/24",)))
    for i in range(rng.randint(0, 5)):
        ul = address(1, 64 * 64 - 1)
        if ul is not None:
            nodes.append(types.NodeAnnouncement("p", f"p{i}", ul, (f"10.200.{i}.0/24",)))
    return types.FabricConfig(clusters=tuple(clusters)), nodes


@pytest.mark.parametrize("seed", range(60))
def test_every_node_is_routed_to_its_own_cluster_and_a_join_inside_a_prefix_moves_none(seed: int) -> None:
    rng = random.Random(seed)
    config, nodes = _random_fabric(rng)
    assert validation.config_problems(config) == []
    topo = _topology(config, nodes)
    prefixes = _prefixes(topo)
    for n in nodes:
        if n.cluster != "p":
            assert _owner(prefixes, _vx_local(n)) == n.cluster, (n, prefixes)
    # A new node of a cluster at a free address inside one of its prefixes (outside any other
    # cluster's declared image) moves no prefix of any cluster.
    taken = {_vx_local(n) for n in nodes}
    images = [ipaddress.ip_network(types.local_image(c, "198.19.0.0/16"))
              for cc in config.clusters for c in cc.node_cidrs]  # fmt: skip
    for name, nets in prefixes.items():
        for text in nets:
            net = ipaddress.IPv4Network(text)
            free = [a for a in (net.network_address + i for i in range(min(net.num_addresses, 64)))
                    if a not in taken and not any(a in img and img != net for img in images)
                    and int(a) & 0xFFFF not in (0, 0xFFFF)]  # fmt: skip
            if not free or net.prefixlen == 32:
                continue
            vx = rng.choice(free)
            ul = str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.0")) + (int(vx) & 0xFFFF)))
            joined = _topology(config, [*nodes, types.NodeAnnouncement(name, "joiner", ul, ("10.250.0.0/24",))])
            assert _prefixes(joined) == prefixes, (name, text, ul)
            return


def test_interleaved_clusters_get_host_routes_and_p2p_nodes_bound_nothing() -> None:
    config = types.FabricConfig(clusters=(
        types.ClusterConfig("a", GW, ("10.1.0.0/16",)), types.ClusterConfig("b", GW, ("10.2.0.0/16",)),
        types.ClusterConfig("p", P2P, ("10.3.0.0/16",)),
    ))  # fmt: skip
    nodes = [types.NodeAnnouncement("ab"[i % 2], f"n{i}", f"198.18.0.{i + 1}", (f"10.{i % 2 + 1}.{i}.0/24",))
             for i in range(6)]  # fmt: skip
    # P2P nodes have no vx-local address: next to a's and b's they change nothing.
    p2p = [types.NodeAnnouncement("p", f"p{i}", f"198.18.0.{i + 10}", (f"10.3.{i}.0/24",)) for i in range(3)]
    got = _prefixes(_topology(config, nodes + p2p))
    assert got == _prefixes(_topology(config, nodes))
    # a at .1 .3 .5, b at .2 .4 .6: every a node is a host route but the lowest; b's last
    # (nothing above it) takes the rest of the range's upper half it shares with nobody.
    assert got["a"] == ("198.19.0.0/31", "198.19.0.3/32", "198.19.0.5/32")
    assert got["b"][:2] == ("198.19.0.2/32", "198.19.0.4/32")


def test_a_lone_gateway_cluster_takes_the_whole_local_cidr_and_a_second_one_splits_it() -> None:
    """Nothing bounds the first cluster: every vx-local address is its (only P2P nodes route
    them, which have none). The second cluster's first node splits the range, in one flush."""
    config = types.FabricConfig(clusters=(
        types.ClusterConfig("a", GW, ("10.1.0.0/16",)), types.ClusterConfig("b", GW, ("10.2.0.0/16",)),
    ))  # fmt: skip
    a1 = types.NodeAnnouncement("a", "a1", "198.18.1.1", ("10.1.1.0/24",))
    assert _prefixes(_topology(config, [a1]))["a"] == ("198.19.0.0/16",)
    b1 = types.NodeAnnouncement("b", "b1", "198.18.200.1", ("10.2.1.0/24",))
    got = _prefixes(_topology(config, [a1, b1]))
    assert got == {"a": ("198.19.0.0/17",), "b": ("198.19.128.0/17",)}


def test_dual_stack_prefixes_are_per_family() -> None:
    config = types.FabricConfig(clusters=(
        types.ClusterConfig("a", GW, ("10.1.0.0/16", "fd00:1::/48"), ip_families=(4, 6)),
        types.ClusterConfig("b", GW, ("10.2.0.0/16", "fd00:2::/48"), ip_families=(4, 6)),
    ))  # fmt: skip
    nodes = [
        types.NodeAnnouncement("a", "a1", "198.18.0.1", ("10.1.1.0/24", "fd00:1:0:1::/64"),
                               extra_underlay_ips=("fd00:18::1",)),
        types.NodeAnnouncement("b", "b1", "198.18.0.2", ("10.2.1.0/24", "fd00:2:0:1::/64"),
                               extra_underlay_ips=("fd00:18::4",)),
    ]
    topo = _topology(config, nodes)
    v6 = _prefixes(topo, 6)
    local6 = planner.VIEWS.get(topo).locals[6]
    for n in nodes:
        ul6 = n.underlay(6)
        assert ul6 is not None
        addr = ipaddress.ip_address(planner.overlay_address(ul6, local6).partition("/")[0])
        assert _owner(v6, addr) == n.cluster, v6
    assert _prefixes(topo, 4) == {"a": ("198.19.0.0/31",), "b": ("198.19.0.2/31",)}


@pytest.mark.parametrize("seed", range(10))
def test_prefixes_reused_from_the_previous_view_are_those_computed_afresh(seed: int) -> None:
    """Each view reuses the previous one's cluster points and solved groups where they did not
    change: over a random sequence of joins and leaves they equal a computation without them."""
    rng = random.Random(1000 + seed)
    config, nodes = _random_fabric(rng)
    present = list(nodes)
    for _ in range(12):
        if present and rng.random() < 0.4:
            present.remove(rng.choice(present))
        else:
            missing = [n for n in nodes if n not in present]
            if missing:
                present.append(rng.choice(missing))
        reused = _prefixes(_topology(config, present))
        planner._LAST_POINTS.clear()
        planner._LAST_SOLVED.clear()
        assert _prefixes(_topology(config, present)) == reused
