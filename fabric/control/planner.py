"""The planner: topology -> the complete desired state of one node. Pure functions, no I/O.

What a P2P node gets (this build supports P2P clusters only)
-------------------------------------------------------------

* one ``vx-bridge`` device (VNI 54, UDP 4876), MTU = underlay MTU - vxlan overhead, a
  locally administered MAC hashed from the node identity, and an overlay address made of the
  bridge CIDR's network bits and the underlay address's host bits (:func:`overlay_address`);
* one :class:`~fabric.types.Peer` for every *other* node of the fabric, in every cluster (same
  cluster included, as Kosmos does: P2P nodes of one cluster tunnel to each other too, which
  the gateway issue will rely on), i.e. a static neighbour (overlay IP -> MAC) and a static FDB
  entry (MAC -> underlay IP) on ``vx-bridge``;
* for every node of every *other* cluster, one route per pod CIDR of that node, via that node's
  overlay IP. Pod CIDRs of the node's own cluster are never routed by the fabric: the cluster's
  own CNI already does it, and a second route would fight it.

Service CIDRs are deliberately absent. A service CIDR is not owned by one node, so it must route
to one elected node of the owning cluster (its gateway); that election, and the routes through
the elected node, belong to the gateway issue and will be added there as a separate pass over
the topology. Routing service CIDRs to an arbitrary node now would be a guess that moves traffic
when the node set changes.

Stability and determinism
-------------------------

``plan`` depends only on the topology, and every address and MAC depends only on the node's own
identity and announcement, never on other nodes or on their order. So a join or leave changes
other nodes' plans by exactly the joining/leaving node's peer and routes (a delta of a handful
of entries), and a recompute never renumbers a tunnel. Because derived overlay addresses and
MACs could collide (Kosmos silently derived two nodes onto one address), the reflector refuses
an announcement that would collide (:func:`validate_announcement`) instead of planning it.

Cost: ``plan`` is O(nodes) for one node. What a node contributes to the others' plans (its peer
and routes) is derived once and cached (it is pure), so re-planning every node after a join
costs one derivation per node plus O(nodes) cheap tuple work per node, not a hash or address
parse per pair.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging

from fabric import types

_log = logging.getLogger(__name__)

#: Smallest tunnel MTU we accept: the IPv4 minimum datagram size every host must accept.
MIN_TUNNEL_MTU = 576
#: Largest underlay MTU: the IPv4/IPv6 total-length field.
MAX_UNDERLAY_MTU = 65535
#: Modes this build can plan for (gateway mode arrives with its own issue).
SUPPORTED_MODES = (types.ClusterMode.P2P,)


@functools.lru_cache(maxsize=65536)
def overlay_address(underlay_ip: str, bridge_cidr: str) -> str:
    """The node's overlay address on vx-bridge, as ``ip/prefixlen`` of ``bridge_cidr``.

    Network bits come from the bridge CIDR, host bits from the underlay address: with
    ``100.64.0.0/10`` the underlay ``198.18.0.11`` becomes ``100.82.0.11/10``. Raises
    ValueError for an unparsable input or mixed address families.
    """
    ip = ipaddress.ip_address(underlay_ip)
    net = ipaddress.ip_network(bridge_cidr, strict=False)
    if ip.version != net.version:
        raise ValueError(f"underlay address {underlay_ip} and bridge CIDR {bridge_cidr} are of different families")
    host_mask = int(net.hostmask)
    addr = ipaddress.ip_address(int(net.network_address) | (int(ip) & host_mask))
    return f"{addr}/{net.prefixlen}"


@functools.lru_cache(maxsize=65536)
def device_mac(key: types.NodeKey, device: str) -> str:
    """Stable MAC of ``device`` on the node ``key``: locally administered, unicast.

    A hash of the identity (not of the addresses) so a node whose underlay address changes
    keeps its MAC; collisions are checked by :func:`validate_announcement`.
    """
    digest = bytearray(hashlib.sha256(f"{key.cluster}/{key.name}/{device}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02  # clear multicast bit, set locally administered bit
    return ":".join(f"{b:02x}" for b in digest)


def bridge_cidr_for(config: types.FabricConfig, underlay_ip: str) -> str | None:
    """The first bridge CIDR of the underlay address's family (None if there is none)."""
    version = ipaddress.ip_address(underlay_ip).version
    for c in config.bridge_cidrs:
        if ipaddress.ip_network(c, strict=False).version == version:
            return c
    return None


def tunnel_mtu(underlay_ip: str, underlay_mtu: int) -> int:
    overhead = types.VXLAN_OVERHEAD_V6 if ipaddress.ip_address(underlay_ip).version == 6 else types.VXLAN_OVERHEAD_V4
    return underlay_mtu - overhead


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_announcement(topology: types.Topology, ann: types.NodeAnnouncement) -> list[str]:
    """Reasons ``ann`` must be refused (empty when it may join or replace its old announcement).

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
    if cluster.mode not in SUPPORTED_MODES:
        reasons.append(f"cluster {cluster.name!r} has mode {cluster.mode.value!r}, which this build does not support")

    others = [n for n in topology.nodes if n.key != ann.key]

    # Underlay address.
    underlay: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        underlay = ipaddress.ip_address(ann.underlay_ip)
    except ValueError:
        underlay = None
        reasons.append(f"underlay address {ann.underlay_ip!r} is not an IP address")
    if underlay is not None:
        if underlay.is_unspecified or underlay.is_multicast or underlay.is_loopback:
            reasons.append(f"underlay address {ann.underlay_ip} is not a unicast host address")
        for o in others:
            if _same_ip(o.underlay_ip, underlay):
                reasons.append(f"underlay address {ann.underlay_ip} is already used by node {o.key}")

    # MTU.
    if underlay is not None:
        mtu = tunnel_mtu(ann.underlay_ip, ann.underlay_mtu)
        if ann.underlay_mtu > MAX_UNDERLAY_MTU or mtu < MIN_TUNNEL_MTU:
            reasons.append(
                f"underlay MTU {ann.underlay_mtu} is invalid: the tunnel MTU would be {mtu}"
                f" (need underlay MTU {MIN_TUNNEL_MTU + ann.underlay_mtu - mtu}..{MAX_UNDERLAY_MTU})"
            )

    # Pod CIDRs.
    own: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    for text in ann.pod_cidrs:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            reasons.append(f"pod CIDR {text!r} is invalid ({e})")
            continue
        if not any(_subnet_of(net, c) for c in cluster.pod_cidrs):
            reasons.append(f"pod CIDR {text} is outside cluster {cluster.name!r} podCIDRs {list(cluster.pod_cidrs)}")
        for prev_text, prev in own:
            if prev.version == net.version and prev.overlaps(net):
                reasons.append(f"pod CIDR {text} overlaps the node's own pod CIDR {prev_text}")
        own.append((text, net))
    for o in others:
        for oc in o.pod_cidrs:
            for text, _net in own:
                if types.cidrs_overlap(text, oc):
                    reasons.append(f"pod CIDR {text} overlaps pod CIDR {oc} of node {o.key}")

    # Overlay address and MAC: derived, so collisions must be caught here, never planned.
    if underlay is not None:
        bridge = bridge_cidr_for(config, ann.underlay_ip)
        if bridge is None:
            reasons.append(f"no bridge CIDR of the family of underlay address {ann.underlay_ip} is configured")
        else:
            mine = overlay_address(ann.underlay_ip, bridge)
            mine_ip = ipaddress.ip_interface(mine)
            net = mine_ip.network
            if mine_ip.ip in (net.network_address, net.broadcast_address) and net.num_addresses > 2:
                reasons.append(
                    f"overlay address {mine_ip.ip} derived from underlay {ann.underlay_ip} is the network or"
                    f" broadcast address of bridge CIDR {bridge}"
                )
            for o in others:
                if bridge_cidr_for(config, o.underlay_ip) != bridge:
                    continue
                if overlay_address(o.underlay_ip, bridge) == mine:
                    reasons.append(
                        f"overlay address {mine_ip.ip} derived from underlay {ann.underlay_ip} collides with node"
                        f" {o.key} (underlay {o.underlay_ip}): bridge CIDR {bridge} keeps only the host bits"
                    )
    mac = device_mac(ann.key, types.VX_BRIDGE)
    for o in others:
        if device_mac(o.key, types.VX_BRIDGE) == mac:
            reasons.append(f"{types.VX_BRIDGE} MAC {mac} collides with node {o.key}")
    return reasons


def _same_ip(text: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text) == ip
    except ValueError:
        return False


def _subnet_of(net: ipaddress.IPv4Network | ipaddress.IPv6Network, cidr: str) -> bool:
    outer = ipaddress.ip_network(cidr, strict=False)
    if outer.version != net.version:
        return False
    return net.subnet_of(outer)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def plan(topology: types.Topology, key: types.NodeKey) -> types.NodeState:
    """The complete planned state of node ``key`` (which must be in the topology).

    Assumes every node in the topology passed :func:`validate_announcement`; the reflector
    guarantees it. Raises KeyError for a node that is not in the topology.
    """
    node = topology.node(key)
    if node is None:
        raise KeyError(f"node {key} is not in the topology")
    config = topology.config
    bridge = bridge_cidr_for(config, node.underlay_ip)
    if bridge is None:
        raise ValueError(f"no bridge CIDR for the family of {node.underlay_ip} (node {key})")
    device = types.VxlanDevice(
        name=types.VX_BRIDGE,
        vni=types.VX_BRIDGE_VNI,
        port=types.VX_BRIDGE_PORT,
        mac=device_mac(key, types.VX_BRIDGE),
        address=overlay_address(node.underlay_ip, bridge),
        local=node.underlay_ip,
        mtu=tunnel_mtu(node.underlay_ip, node.underlay_mtu),
    )
    own_cluster = node.cluster
    # Nodes of unsupported clusters or without a bridge CIDR of their family are never admitted
    # by validation; skipping them keeps plan total for any topology.
    supported = {c.name for c in config.clusters if c.mode in SUPPORTED_MODES}
    bridges = _bridges_by_family(config.bridge_cidrs)
    peers: dict[str, types.Peer] = {}
    routes: dict[str, types.RouteEntry] = {}
    for other in topology.nodes:
        if other.key == key or other.cluster not in supported:
            continue
        other_bridge = bridges.get(6 if ":" in other.underlay_ip else 4)
        if other_bridge is None:
            continue
        (peer_key, peer), other_routes = _contribution(other_bridge, other)
        peers[peer_key] = peer
        if other.cluster != own_cluster:
            routes.update(other_routes)
    # Same layout as NodeState.from_entries (sorted by entry key) without re-deriving every key:
    # this is the hot path when thousands of nodes are re-planned after a join.
    return types.NodeState(
        devices=(device,),
        peers=tuple(peers[k] for k in sorted(peers)),
        routes=tuple(routes[k] for k in sorted(routes)),
    )


@functools.lru_cache(maxsize=64)
def _bridges_by_family(bridge_cidrs: tuple[str, ...]) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in bridge_cidrs:
        out.setdefault(ipaddress.ip_network(c, strict=False).version, c)
    return out


@functools.lru_cache(maxsize=65536)
def _contribution(
    bridge_cidr: str, other: types.NodeAnnouncement
) -> tuple[tuple[str, types.Peer], tuple[tuple[str, types.RouteEntry], ...]]:
    """What ``other`` adds to every other node's plan: its peer, and the routes to its pod CIDRs
    (used by nodes of other clusters only). Cached: it depends on nothing but its arguments
    (cheap to hash), and re-planning every node after a join would otherwise redo it once per
    pair of nodes."""
    via = overlay_address(other.underlay_ip, bridge_cidr).partition("/")[0]
    peer = types.Peer(
        device=types.VX_BRIDGE,
        overlay_ip=via,
        mac=device_mac(other.key, types.VX_BRIDGE),
        underlay_ip=other.underlay_ip,
        node=str(other.key),
    )
    routes = (
        types.RouteEntry(dst=types.canonical_cidr(cidr), via=via, device=types.VX_BRIDGE) for cidr in other.pod_cidrs
    )
    return (types.entry_key(peer), peer), tuple((types.entry_key(r), r) for r in routes)


def plan_all(topology: types.Topology) -> dict[types.NodeKey, types.NodeState]:
    """Every node's plan (used by tests and by the reflector after a change)."""
    return {n.key: plan(topology, n.key) for n in topology.nodes}
