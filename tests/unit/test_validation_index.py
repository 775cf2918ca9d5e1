"""planner.NodeIndex: the indexed validation gives exactly what comparing every other node gave.

The oracle below is the O(nodes) validation the index replaced, verbatim; random topologies
(P2P and gateway clusters, dual stack, overlapping pod CIDRs with and without global CIDRs,
shared underlays, overlay addresses that collide under a short bridge CIDR) are checked with a
fresh index and with one kept up to date through random adds and removes, as the reflector does.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable

from fabric import types
from fabric.control import planner

GW = types.ClusterMode.GATEWAY
P2P = types.ClusterMode.P2P


def reference_validate(topology: types.Topology, ann: types.NodeAnnouncement) -> list[str]:
    """The O(nodes) validation the index replaced (every other node compared one by one), kept
    as the oracle: the indexed one must give the very same reasons in the same order.

    Other nodes are the topology's nodes with a different key: re-announcing the same node is
    checked against everybody else only, so an identical re-announcement is always fine and a
    changed one replaces the old if it is valid on its own.
    """
    reasons: list[str] = []
    config = topology.config
    if not ann.name or "/" in ann.name or not ann.cluster or "/" in ann.cluster:
        reasons.append(f"node identity {ann.cluster!r}/{ann.name!r} must be two non-empty names without '/'")
        return reasons
    cluster = config.cluster(ann.cluster)
    if cluster is None:
        known = ", ".join(c.name for c in config.clusters) or "none"
        reasons.append(f"unknown cluster {ann.cluster!r} (configured clusters: {known})")
        return reasons
    if cluster.mode not in planner.SUPPORTED_MODES:
        reasons.append(f"cluster {cluster.name!r} has mode {cluster.mode.value!r}, which this build does not support")

    others = [n for n in topology.nodes if n.key != ann.key]

    # Underlay addresses: the primary one, and at most one more per other family.
    underlay: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    usable: list[str] = []  # valid underlay addresses, one per family
    for i, text in enumerate(ann.underlay_ips):
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            reasons.append(f"underlay address {text!r} is not an IP address")
            continue
        if i == 0:
            underlay = ip
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
            reasons.append(f"underlay address {text} is not a unicast host address")
        if any(types.family_of(u) == ip.version for u in usable):
            reasons.append(f"underlay address {text}: the node announces two underlay addresses of IPv{ip.version}")
            continue
        for o in others:
            if any(planner._same_ip(ou, ip) for ou in o.underlay_ips):
                reasons.append(f"underlay address {text} is already used by node {o.key}")
        usable.append(text)

    # MTU (per underlay family: the outer header differs).
    for text in usable:
        mtu = planner.tunnel_mtu(text, ann.underlay_mtu)
        if ann.underlay_mtu > planner.MAX_UNDERLAY_MTU or mtu < planner.MIN_TUNNEL_MTU:
            reasons.append(
                f"underlay MTU {ann.underlay_mtu} is invalid: the tunnel MTU would be {mtu} over underlay {text}"
                f" (need underlay MTU {planner.MIN_TUNNEL_MTU + ann.underlay_mtu - mtu}..{planner.MAX_UNDERLAY_MTU})"
            )
            break

    # Pod CIDRs.
    own: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    for text in ann.pod_cidrs:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            reasons.append(f"pod CIDR {text!r} is invalid ({e})")
            continue
        if not any(planner._subnet_of(net, c) for c in cluster.pod_cidrs):
            reasons.append(f"pod CIDR {text} is outside cluster {cluster.name!r} podCIDRs {list(cluster.pod_cidrs)}")
        for prev_text, prev in own:
            if prev.version == net.version and prev.overlaps(net):
                reasons.append(f"pod CIDR {text} overlaps the node's own pod CIDR {prev_text}")
        own.append((text, net))
    for o in others:
        for oc in o.pod_cidrs:
            for text, _net in own:
                if planner._overlap(text, oc):
                    mapped = planner._mapped(config, ann.cluster, text) and planner._mapped(config, o.cluster, oc)
                    if o.cluster != ann.cluster and mapped:
                        continue  # both are reached only by their global CIDRs
                    reasons.append(f"pod CIDR {text} overlaps pod CIDR {oc} of node {o.key}")

    # Overlay addresses and MACs: derived, so collisions must be caught here, never planned.
    # Every node may become a bridge node (a gateway-mode node when elected), so vx-bridge is
    # checked for all; vx-local for nodes of gateway-mode clusters, fabric-wide, because the
    # vx-local addresses of gateway-mode nodes are routed (/32) by the other clusters.
    families = [f for f in cluster.families if any(types.family_of(u) == f for u in usable)]
    if usable and not families:
        names = ", ".join(types.FAMILY_NAMES[f] for f in cluster.families)
        reasons.append(
            f"underlay address {', '.join(usable)} is of no family of cluster {cluster.name!r} (ipFamilies: {names}):"
            " the node could carry none of its traffic"
        )
    if underlay is not None:
        kinds: list[tuple[str, Callable[[types.FabricConfig, str], str | None], types.ClusterMode | None]] = [
            ("bridge", planner.bridge_cidr_for, None)
        ]
        if cluster.mode == types.ClusterMode.GATEWAY:
            kinds.append(("local", planner.local_cidr_for, types.ClusterMode.GATEWAY))
        for family in families:
            ul = next(u for u in usable if types.family_of(u) == family)
            for kind, cidr_for, only_mode in kinds:
                reasons += _reference_overlay(topology, ann, ul, others, kind, cidr_for, only_mode)
    devices: list[str] = []
    for family in families:
        devices.append(types.bridge_device(family))
        if cluster.mode == types.ClusterMode.GATEWAY:
            devices.append(types.local_device(family))
    for dev in devices:
        mac = planner.device_mac(ann.key, dev)
        for o in others:
            if planner.device_mac(o.key, dev) == mac:
                reasons.append(f"{dev} MAC {mac} collides with node {o.key}")
    return reasons


def _reference_overlay(
    topology: types.Topology,
    ann: types.NodeAnnouncement,
    underlay: str,
    others: list[types.NodeAnnouncement],
    kind: str,
    cidr_for: Callable[[types.FabricConfig, str], str | None],
    only_mode: types.ClusterMode | None,
) -> list[str]:
    config = topology.config
    reasons: list[str] = []
    cidr = cidr_for(config, underlay)
    if cidr is None:
        return [f"no {kind} CIDR of the family of underlay address {underlay} is configured"]
    mine = planner.overlay_address(underlay, cidr)
    mine_ip = ipaddress.ip_interface(mine)
    net = mine_ip.network
    if mine_ip.ip in (net.network_address, net.broadcast_address) and net.num_addresses > 2:
        reasons.append(
            f"overlay address {mine_ip.ip} derived from underlay {underlay} is the network or"
            f" broadcast address of {kind} CIDR {cidr}"
        )
    family = types.family_of(underlay)
    for o in others:
        if only_mode is not None:
            oc = config.cluster(o.cluster)
            if oc is None or oc.mode != only_mode:
                continue
        o_ul = o.underlay(family)
        if o_ul is None or cidr_for(config, o_ul) != cidr:
            continue
        if planner.overlay_address(o_ul, cidr) == mine:
            reasons.append(
                f"overlay address {mine_ip.ip} derived from underlay {underlay} collides with node"
                f" {o.key} (underlay {o_ul}): {kind} CIDR {cidr} keeps only the host bits"
            )
    return reasons


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
        index = planner.NodeIndex(config)
        for _ in range(40):
            ann = _announcement(rng, config)
            want = reference_validate(topo, ann)
            assert planner.validate_announcement(topo, ann) == want, (seed, ann)
            assert planner.validate_announcement(topo, ann, index) == want, (seed, ann)
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
        planner.validate_announcement(types.Topology(config), _announcement(rng, config), planner.NodeIndex(other))
    except ValueError as e:
        assert "another fabric configuration" in str(e)
    else:
        raise AssertionError("an index of another configuration was used")


def test_overlapping_pods_finds_containing_and_contained_cidrs() -> None:
    config = types.FabricConfig(clusters=(types.ClusterConfig("a", P2P, ("10.0.0.0/8",)),))
    nodes = [types.NodeAnnouncement("a", f"n{i}", f"198.18.0.{i + 1}", (c,))
             for i, c in enumerate(("10.1.0.0/16", "10.1.2.0/24", "10.1.3.0/25", "10.2.0.0/24"))]  # fmt: skip
    index = planner.NodeIndex(config, nodes)

    def found(cidr: str) -> list[str]:
        return sorted(t for _k, _p, t in index.overlapping_pods(ipaddress.ip_network(cidr)))

    assert found("10.1.2.0/23") == ["10.1.0.0/16", "10.1.2.0/24", "10.1.3.0/25"]
    assert found("10.1.3.128/25") == ["10.1.0.0/16"]
    assert found("10.0.0.0/8") == ["10.1.0.0/16", "10.1.2.0/24", "10.1.3.0/25", "10.2.0.0/24"]
    assert found("10.3.0.0/16") == []
    index.remove(nodes[0].key)
    assert found("10.1.3.128/25") == []
