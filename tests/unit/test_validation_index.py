"""admission.NodeIndex: the indexed validation gives exactly what comparing every other node gave.

The oracle (ScanIndex) answers every query by comparing with every node, as validation did
before the index; random topologies (P2P and gateway clusters, dual stack, overlapping pod CIDRs
with and without global CIDRs, shared underlays, overlay addresses that collide under a short
bridge CIDR) are checked with a fresh index and with one kept up to date through random adds and
removes, as the reflector does.
"""

from __future__ import annotations

import ipaddress
import random

from fabric import types
from fabric.control import admission, planner

GW = types.ClusterMode.GATEWAY
P2P = types.ClusterMode.P2P


class ScanIndex(admission.NodeIndex):
    """The oracle: every query answered by comparing with every node, one by one (what
    validation did before the index). validate_announcement must give the very same reasons
    with it as with the real index."""

    def underlay_users(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> set[types.NodeKey]:
        return {n.key for n in self.nodes.values() if any(_ip(u) == ip for u in n.underlay_ips)}

    def overlay_users(self, kind: str, cidr: str, address: str) -> set[types.NodeKey]:
        cidr_for = dict(admission._OVERLAY_KINDS)[kind]
        out = set()
        for n in self.nodes.values():
            for family in (4, 6):
                ul = n.underlay(family)
                if ul is None or cidr_for(self.config, ul) != cidr:
                    continue
                if planner.overlay_address(ul, cidr) == address:
                    out.add(n.key)
        return out

    def mac_users(self, device: str, mac: str) -> set[types.NodeKey]:
        return {n.key for n in self.nodes.values() if planner.device_mac(n.key, device) == mac}

    def overlapping_pods(
        self, net: ipaddress.IPv4Network | ipaddress.IPv6Network
    ) -> list[tuple[types.NodeKey, int, str]]:
        out = []
        for n in self.nodes.values():
            for pos, text in enumerate(n.pod_cidrs):
                try:
                    other = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    continue
                if other.version == net.version and other.overlaps(net):
                    out.append((n.key, pos, text))
        return out


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _config(rng: random.Random) -> types.FabricConfig:
    clusters = []
    for i, name in enumerate(("a", "b", "c")):
        pods: tuple[str, ...] = (f"10.{i}.0.0/16",) if rng.random() < 0.7 else ("10.9.0.0/16",)  # c may overlap a/b
        if rng.random() < 0.4:
            pods = (*pods, f"fd00:{i}::/48")
        mapped = tuple((p, f"172.{16 + i}.0.0/16") for p in pods if ":" not in p) if rng.random() < 0.5 else ()
        clusters.append(types.ClusterConfig(name, rng.choice((P2P, GW)), pods, global_cidrs=mapped))
    bridge = rng.choice(((types.DEFAULT_BRIDGE_CIDR_V4,), ("100.64.0.0/16",), ("100.64.0.0/16", "fd80::/64")))
    return types.FabricConfig(clusters=tuple(clusters), bridge_cidrs=bridge)


def _announcement(rng: random.Random, config: types.FabricConfig) -> types.NodeAnnouncement:
    c = rng.choice(config.clusters)
    v4 = next(p for p in c.pod_cidrs if ":" not in p)
    prefix = rng.choice((24, 24, 24, 23, 25))
    start = ipaddress.ip_network(v4).network_address + rng.randrange(4) * 256
    pods = [str(ipaddress.ip_network(f"{start}/{prefix}", strict=False))]
    v6 = [p for p in c.pod_cidrs if ":" in p]
    if v6 and rng.random() < 0.7:
        pods.append(f"{ipaddress.ip_network(v6[0]).network_address + rng.randrange(3) * 2**64}/64")
    if rng.random() < 0.05:
        pods.append("not-a-cidr")
    underlay = f"198.{rng.choice((18, 19))}.0.{rng.randrange(1, 12)}"  # /16 bridge CIDRs collide 18 vs 19
    extra = (f"fd01::{rng.randrange(1, 12)}",) if rng.random() < 0.4 else ()
    return types.NodeAnnouncement(c.name, f"n{rng.randrange(14)}", underlay, tuple(pods), extra_underlay_ips=extra)


def test_indexed_validation_equals_the_one_by_one_comparison() -> None:
    checked = refused = 0
    for seed in range(60):
        rng = random.Random(seed)
        config = _config(rng)
        topo = types.Topology(config)
        index = admission.NodeIndex(config)
        for _ in range(40):
            ann = _announcement(rng, config)
            want = admission.validate_announcement(topo, ann, ScanIndex(config, topo.nodes))
            assert admission.validate_announcement(topo, ann) == want, (seed, ann)
            assert admission.validate_announcement(topo, ann, index) == want, (seed, ann)
            checked += 1
            refused += bool(want)
            if not want:
                topo = topo.with_node(ann)
                index.add(ann)
            elif topo.nodes and rng.random() < 0.3:
                gone = rng.choice(topo.nodes).key
                topo = topo.without_node(gone)
                index.remove(gone)
    # The generator must exercise both outcomes, or the equality above proves little.
    assert refused > checked // 5 and checked - refused > checked // 5, (checked, refused)


def test_an_index_of_another_configuration_is_refused() -> None:
    rng = random.Random(1)
    config = _config(rng)
    other = _config(random.Random(7))
    assert other != config
    try:
        admission.validate_announcement(types.Topology(config), _announcement(rng, config), admission.NodeIndex(other))
    except ValueError as e:
        assert "another fabric configuration" in str(e)
    else:
        raise AssertionError("an index of another configuration was used")


def test_overlapping_pods_finds_containing_and_contained_cidrs() -> None:
    config = types.FabricConfig(clusters=(types.ClusterConfig("a", P2P, ("10.0.0.0/8",)),))
    nodes = [types.NodeAnnouncement("a", f"n{i}", f"198.18.0.{i + 1}", (c,))
             for i, c in enumerate(("10.1.0.0/16", "10.1.2.0/24", "10.1.3.0/25", "10.2.0.0/24"))]  # fmt: skip
    index = admission.NodeIndex(config, nodes)

    def found(cidr: str) -> list[str]:
        return sorted(t for _k, _p, t in index.overlapping_pods(ipaddress.ip_network(cidr)))

    assert found("10.1.2.0/23") == ["10.1.0.0/16", "10.1.2.0/24", "10.1.3.0/25"]
    assert found("10.1.3.128/25") == ["10.1.0.0/16"]
    assert found("10.0.0.0/8") == ["10.1.0.0/16", "10.1.2.0/24", "10.1.3.0/25", "10.2.0.0/24"]
    assert found("10.3.0.0/16") == []
    index.remove(nodes[0].key)
    assert found("10.1.3.128/25") == []
