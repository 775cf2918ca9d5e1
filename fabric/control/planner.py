"""The planner: topology -> the complete desired state of one node. Pure functions, no I/O.

What may join the topology is :mod:`fabric.control.admission`; who the gateways are,
:mod:`fabric.control.election`; the stateful incremental planner the reflector keeps,
:mod:`fabric.control.incremental`.

Roles
-----

Every cluster has exactly one *active gateway* and at most one *hot standby*, elected by the
reflector (:func:`elect`) and stored in the topology (``Topology.roles``), so :func:`plan` stays a
pure function of the topology. A gateway-mode cluster with ``activeGateways: N`` > 1 has N
active gateways (``GatewayRole.also_active``): each is a hot gateway node that routes over
``vx-bridge`` like the active one, and every route below that says "via C's active gateway"
goes via all of C's actives as one nexthop group (``RouteEntry.vias``; the design is in
:mod:`fabric.control.active_active`). Node classes (Kosmos' names, inventory section 2.5):

* **endpoint node** - any node of a P2P cluster. It has ``vx-bridge`` (VNI 54, UDP 4876).
* **hot gateway node** - the active gateway or the standby of a gateway-mode cluster. It has
  ``vx-bridge`` *and* ``vx-local`` (VNI 55, UDP 4877). Active and standby hold the very same
  devices and peers; only their routes differ. So moving the role changes routes only (a
  nexthop swap on every affected node, no device, FDB or neighbour has to appear first), which
  is what makes sub-second failover cheap and hitless when the old gateway still forwards.
* **internal node** - any other node of a gateway-mode cluster. It has only ``vx-local`` and
  tunnels only to its cluster's hot gateway nodes: O(1) peers whatever the size of the fabric.

Peers (one static neighbour + one static FDB entry each)
--------------------------------------------------------

* ``vx-bridge`` (endpoint and hot gateway nodes): every endpoint node of every P2P cluster (its
  own cluster included, as before) and every hot gateway node of every *other* gateway-mode
  cluster.
* ``vx-local``: a hot gateway node peers with every node of its cluster (the return path, and
  the warm state of a standby); an internal node with the hot gateway nodes of its cluster.
* Peers that are active or standby gateways of a cluster the node depends on carry
  ``probe=True``: the agent watches them with probes through the tunnel (see the reflector).

Routes (table of ours; never for the node's own cluster: its CNI routes those)
-------------------------------------------------------------------------------

On an endpoint node and on the *active* gateway, for every other cluster C:

* C is P2P: each node's pod CIDRs via that node (node-granular, as before); C's service CIDRs
  via C's active gateway;
* C is gateway-mode: C's whole pod CIDRs and service CIDRs via C's active gateway, plus the
  ``vx-local`` addresses of C's nodes via the same gateway: the images of C's ``nodeCIDRs``
  (its nodes' underlay subnets) in the local CIDR, and around C's other nodes the widest
  prefixes that hold no other cluster's ``vx-local`` address (``local_hosts``): a node that
  joins inside them moves no route, so a join changes no plan outside C. The latter is the
  host-network return path: a process on an internal node of C that talks to a remote pod
  leaves with its ``vx-local`` address as source (the kernel picks the address of the output
  device), and the remote pod's node must route the reply back to C. Kosmos masquerades such
  traffic on the gateway (iptables); routing the addresses keeps the fabric stateless and
  NAT-free (no peer: they share C's gateway as next hop, i.e. one nexthop object).

On every other node of a gateway-mode cluster (the standby and the internal nodes) the same
destinations, aggregated per cluster (C's pod CIDRs as a whole), all via the active gateway's
``vx-local`` address; internal nodes (which have no ``vx-bridge``) also route the bridge CIDRs
there, so replies to host-network traffic of endpoint and gateway nodes (sourced from their
``vx-bridge`` address) find their way back.

Global IP: a CIDR of cluster C that C maps in ``globalCIDRs`` is routed by the other clusters
only by its global CIDR, wherever the text above says "C's pod/service CIDRs" (a P2P node's pod
CIDR maps into the global CIDR by prefix: node ``10.10.1.0/24`` inside ``10.10.0.0/16 ->
100.100.0.0/16`` is routed as ``100.100.1.0/24``). Every node of a cluster with global CIDRs
gets the translation table (:class:`~fabric.types.Translation`, its own cluster's mappings only:
each side translates its own addresses, so translation is symmetric and stateless), the tunnel
programs on each ``vx-bridge`` it has (endpoint nodes; active *and* standby gateways, so a
failover finds them attached already), and the hairpin device with routes for the cluster's own
global CIDRs (:data:`~fabric.types.HAIRPIN_DEVICE`, via the unspecified address: a device
route), so pods reach pods of their own cluster by global IP.

Service CIDRs of a cluster are routed only once it has an active gateway. A topology without
roles (as the issue-2 goldens are) plans P2P clusters exactly as before: no service routes.

Stability and determinism
-------------------------

``plan`` depends only on the topology, and every address and MAC depends only on the node's own
identity and announcement, never on other nodes or on their order. So a join or leave changes
other nodes' plans by exactly the joining/leaving node's peer and routes (a delta of a handful
of entries), and a recompute never renumbers a tunnel. Because derived overlay addresses and
MACs could collide (Kosmos silently derived two nodes onto one address), the reflector refuses
an announcement that would collide (:func:`validate_announcement`) instead of planning it.

Cost: ``plan`` is O(nodes) for one node. What a node contributes to the others' plans (its peer
and routes) is derived once and cached (it is pure), and the per-cluster view of a topology is
computed once per topology value. The reflector does not re-plan every node after a change: the
plan is also a disjoint union of *parts* keyed by their source (the node itself, each other node,
each other cluster; see "The plan as a union of parts" below), and :class:`IncrementalPlanner`
swaps in only the parts of the sources that changed, computed once per viewer class - O(1)
planner work per node for a join, a leave or a service-gateway move. ``plan`` remains the
reference the parts are tested against.
"""


from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import ipaddress
import logging
from collections.abc import Iterable

from fabric import types
from fabric.control import active_active

_log = logging.getLogger(__name__)

#: Smallest tunnel MTU we accept: the IPv4 minimum datagram size every host must accept.
MIN_TUNNEL_MTU = 576
#: Largest underlay MTU: the IPv4/IPv6 total-length field.
MAX_UNDERLAY_MTU = 65535
#: Modes this build can plan for.
SUPPORTED_MODES = (types.ClusterMode.P2P, types.ClusterMode.GATEWAY)


@functools.lru_cache(maxsize=65536)
def overlay_address(underlay_ip: str, bridge_cidr: str) -> str:
    """The node's overlay address on vx-bridge, as ``ip/prefixlen`` of ``bridge_cidr``.

    Network bits come from the bridge CIDR, host bits from the underlay address: with
    ``100.64.0.0/10`` the underlay ``198.18.0.11`` becomes ``100.82.0.11/10``. Raises
    ValueError for an unparsable input or mixed address families.
    """
    net = network(bridge_cidr)
    point = overlay_point(underlay_ip, bridge_cidr)
    return f"{type(net.network_address)(point)}/{net.prefixlen}"  # not ip_address(): an int below 2**32 reads as IPv4


@functools.lru_cache(maxsize=65536)
def overlay_point(underlay_ip: str, cidr: str) -> int:
    """:func:`overlay_address` as an int, without the prefix length: the address parsed once per
    node for admission's checks, the vx-local prefixes and the device addresses together
    (ValueError as there)."""
    ip = ipaddress.ip_address(underlay_ip)
    net = network(cidr)
    if ip.version != net.version:
        raise ValueError(f"underlay address {underlay_ip} and overlay CIDR {cidr} are of different families")
    return types.graft(int(ip), net)


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
    return _first_of_family(config.bridge_cidrs, BRIDGE_DEFAULTS, types.family_of(underlay_ip))


def local_cidr_for(config: types.FabricConfig, underlay_ip: str) -> str | None:
    """The first vx-local CIDR of the underlay address's family (None if there is none)."""
    return _first_of_family(config.local_cidrs, LOCAL_DEFAULTS, types.family_of(underlay_ip))


@functools.lru_cache(maxsize=1024)
def _first_of_family(cidrs: tuple[str, ...], defaults: tuple[str, ...], family: int) -> str | None:
    """Cached by family, not by address: admission asks it twice per announcement (issue 21: a
    cache keyed by the underlay address missed for every new node of a bring-up)."""
    return types.first_per_family(types.with_defaults(cidrs, defaults)).get(family)


@functools.lru_cache(maxsize=1024)
def network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``ip_network(cidr, strict=False)``, parsed once per configured CIDR (the per-node checks
    and derivations read the same few ranges for every node). ValueError as ``ip_network``."""
    return ipaddress.ip_network(cidr, strict=False)


def tunnel_mtu(underlay_ip: str, underlay_mtu: int) -> int:
    """The MTU of a tunnel device over ``underlay_ip`` (an address already validated: its family
    is read from the text, not parsed; admission and planning ask for every node)."""
    overhead = types.VXLAN_OVERHEAD_V6 if types.family_of(underlay_ip) == 6 else types.VXLAN_OVERHEAD_V4
    return underlay_mtu - overhead




# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterView:
    """One cluster as every node's plan sees it: its nodes, active gateways and hot set, computed
    once per topology in :class:`View`. Public because the incremental planner
    (fabric/control/incremental.py) reads it too."""

    config: types.ClusterConfig
    nodes: tuple[types.NodeAnnouncement, ...]
    active: types.NodeAnnouncement | None
    #: Active gateways and standby (the nodes holding gateway devices and peers), active first.
    hot: tuple[types.NodeAnnouncement, ...]
    families: tuple[int, ...]
    #: Every active gateway present, ``active`` first (active/active: more than one).
    actives: tuple[types.NodeAnnouncement, ...] = ()

    def is_active(self, key: types.NodeKey) -> bool:
        """Is ``key`` one of the cluster's active gateways (it routes over vx-bridge)?"""
        return any(a.key == key for a in self.actives)

    def gateway_route(self, family: int, cidr: str) -> tuple[str, tuple[str, ...]] | None:
        """``(via, vias)`` of a route to this cluster's gateways of ``family``, their overlay
        addresses in ``cidr`` (see :func:`fabric.control.active_active.route_vias`); None when
        no active gateway has an underlay address of the family."""
        uls = [ul for a in self.actives if (ul := a.underlay(family)) is not None]
        if not uls:
            return None
        return active_active.route_vias(
            (overlay_address(ul, cidr).partition("/")[0] for ul in uls), self.config.active_gateways
        )

    @property
    def gateway_mode(self) -> bool:
        return self.config.mode == types.ClusterMode.GATEWAY


@dataclasses.dataclass(frozen=True, slots=True)
class View:
    """What every node's plan needs of a topology, computed once per topology value."""

    clusters: dict[str, ClusterView]
    #: Nodes that have vx-bridge: every node of a P2P cluster, hot nodes of gateway clusters.
    bridge_nodes: tuple[types.NodeAnnouncement, ...]
    #: Active/standby gateways of every cluster.
    hot_keys: frozenset[types.NodeKey]
    bridges: dict[int, str]
    locals: dict[int, str]
    #: Every node by key (plan and the parts look nodes up by key: O(1), not a scan).
    by_key: dict[types.NodeKey, types.NodeAnnouncement] = dataclasses.field(default_factory=dict)
    #: Per cluster, the families some node of it has an underlay address of (whether a P2P
    #: cluster is reachable in a family at all: the aggregate routes of non-active nodes).
    reach: dict[str, frozenset[int]] = dataclasses.field(default_factory=dict)
    #: (cluster, family) -> the prefixes of its nodes' vx-local addresses (see local_hosts), filled on
    #: first use: every plan of the fabric asks for every gateway-mode cluster's.
    local_hosts: dict[tuple[str, int], tuple[str, ...]] = dataclasses.field(default_factory=dict)
    #: (cluster, family, routed via the own gateway's vx-local) -> the canonical destinations
    #: of that cluster's whole-cluster routes in the family, filled on first use by
    #: fabric.control.incremental: every viewer class of the fabric asks for the same ones and
    #: only the next hop differs (issue 21: at 100 gateway-mode clusters a flush asked ~100x).
    cluster_dsts: dict[tuple[str, int, bool], tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def supports(self, node: types.NodeAnnouncement, family: int) -> bool:
        """Does ``node`` carry ``family`` through the fabric: its cluster runs the family and the
        node has an underlay address of it (the tunnel devices of a family ride on its underlay)."""
        cv = self.clusters.get(node.cluster)
        return cv is not None and family in cv.families and node.underlay(family) is not None


class _ViewCache:
    """The view of the last topology planned. Keyed by identity: hashing a topology of
    thousands of nodes once per planned node would cost O(nodes^2)."""

    def __init__(self) -> None:
        self.topology: types.Topology | None = None
        self.view: View | None = None

    def get(self, topology: types.Topology) -> View:
        if self.topology is not topology or self.view is None:
            self.view = _build_view(topology)
            self.topology = topology
        return self.view


VIEWS = _ViewCache()


def _build_view(topology: types.Topology) -> View:
    config = topology.config
    by_cluster: dict[str, list[types.NodeAnnouncement]] = {}
    for n in topology.nodes:
        by_cluster.setdefault(n.cluster, []).append(n)
    clusters: dict[str, ClusterView] = {}
    for c in config.clusters:
        if c.mode not in SUPPORTED_MODES:
            continue
        nodes = tuple(by_cluster.get(c.name, ()))
        by_name = {n.name: n for n in nodes}
        role = topology.role(c.name)
        names = role.actives if role is not None else ()
        actives = tuple(dict.fromkeys(gw for name in names if (gw := by_name.get(name)) is not None))
        active = actives[0] if actives else None
        standby = by_name.get(role.standby) if role is not None and role.standby not in names else None
        hot = actives + ((standby,) if standby is not None else ())
        clusters[c.name] = ClusterView(c, nodes, active, hot, c.families, actives)
    bridge_nodes = tuple(
        n
        for n in topology.nodes
        if n.cluster in clusters and (not clusters[n.cluster].gateway_mode or n in clusters[n.cluster].hot)
    )
    hot_keys = frozenset(n.key for cv in clusters.values() for n in cv.hot)
    reach = {
        name: frozenset(f for f in cv.families if any(n.underlay(f) is not None for n in cv.nodes))
        for name, cv in clusters.items()
    }
    return View(
        clusters=clusters,
        bridge_nodes=bridge_nodes,
        hot_keys=hot_keys,
        bridges=_by_family(types.with_defaults(config.bridge_cidrs, BRIDGE_DEFAULTS)),
        locals=_by_family(types.with_defaults(config.local_cidrs, LOCAL_DEFAULTS)),
        by_key={n.key: n for n in topology.nodes},
        reach=reach,
    )


BRIDGE_DEFAULTS = (types.DEFAULT_BRIDGE_CIDR_V4, types.DEFAULT_BRIDGE_CIDR_V6)
LOCAL_DEFAULTS = (types.DEFAULT_LOCAL_CIDR_V4, types.DEFAULT_LOCAL_CIDR_V6)


def shared_families(a: types.ClusterConfig, b: types.ClusterConfig) -> tuple[int, ...]:
    """Families two clusters can talk in: both run them (``a``'s order)."""
    return tuple(f for f in a.families if f in b.families)


def unreachable_pairs(config: types.FabricConfig) -> list[tuple[str, str, str]]:
    """Cluster pairs that cannot talk at all, with why: ``(a, b, reason)`` for every pair (in
    configuration order) that shares no address family. ``fabric-tool status`` shows these."""
    out = []
    cs = [c for c in config.clusters if c.mode in SUPPORTED_MODES]
    for i, a in enumerate(cs):
        for b in cs[i + 1 :]:
            if not shared_families(a, b):
                fa = ", ".join(types.FAMILY_NAMES[f] for f in a.families)
                fb = ", ".join(types.FAMILY_NAMES[f] for f in b.families)
                out.append((a.name, b.name, f"no common address family ({a.name}: {fa}; {b.name}: {fb})"))
    return out


def plan(topology: types.Topology, key: types.NodeKey) -> types.NodeState:
    """The complete planned state of node ``key`` (which must be in the topology).

    Planned per address family the node carries (see :meth:`View.supports`): each family has
    its own devices (``vx-bridge``/``vx-local`` for IPv4, ``vx-bridge-6``/``vx-local-6`` for
    IPv6), peers (only nodes that carry the family too) and routes (only destinations of the
    family). So a route exists only where both ends support its family; an IPv4-only node plans
    exactly what it planned before dual stack.

    Assumes every node in the topology passed :func:`validate_announcement`; the reflector
    guarantees it. Raises KeyError for a node that is not in the topology.
    """
    view = VIEWS.get(topology)
    node = view.by_key.get(key)
    if node is None:
        raise KeyError(f"node {key} is not in the topology")
    own = view.clusters.get(node.cluster)
    # Nodes of unsupported clusters are never admitted by validation; plan nothing for them.
    if own is None:
        return types.NodeState()
    gateway_mode = own.gateway_mode
    hot = node in own.hot
    has_bridge = not gateway_mode or hot
    devices: list[types.VxlanDevice] = []
    peers: dict[str, types.Peer] = {}
    routes: dict[str, types.RouteEntry] = {}
    translations: list[types.Translation] = []
    programs: list[types.Program] = []
    families = [f for f in own.families if node.underlay(f) is not None]
    if own.config.global_cidrs:
        translations = [types.Translation(lo, gl) for lo, gl in own.config.global_cidrs]
        programs.append(types.Program(types.HAIRPIN_DEVICE, types.PROGRAM_HAIRPIN))
        for _lo, gl in own.config.global_cidrs:
            if types.family_of(gl) in families:
                unspecified = "0.0.0.0" if types.family_of(gl) == 4 else "::"
                routes[f"route/{gl}"] = types.RouteEntry(dst=gl, via=unspecified, device=types.HAIRPIN_DEVICE)
    for family in families:
        _plan_family(view, own, node, family, has_bridge, hot, devices, peers, routes, programs)
    # Same layout as NodeState.from_entries (sorted by entry key) without re-deriving every key:
    # this is the hot path when thousands of nodes are re-planned after a join.
    return types.NodeState(
        devices=tuple(sorted(devices, key=lambda d: d.name)),
        peers=tuple(peers[k] for k in sorted(peers)),
        routes=tuple(routes[k] for k in sorted(routes)),
        translations=tuple(sorted(translations, key=types.entry_key)),
        programs=tuple(sorted(programs, key=types.entry_key)),
    )


def _plan_family(
    view: View,
    own: ClusterView,
    node: types.NodeAnnouncement,
    family: int,
    has_bridge: bool,
    hot: bool,
    devices: list[types.VxlanDevice],
    peers: dict[str, types.Peer],
    routes: dict[str, types.RouteEntry],
    programs: list[types.Program],
) -> None:
    """One family's devices, peers and routes of ``node`` (see :func:`plan`)."""
    key = node.key
    underlay = node.underlay(family)
    assert underlay is not None
    gateway_mode = own.gateway_mode
    bridge = view.bridges.get(family)
    if bridge is None:
        raise ValueError(f"no bridge CIDR for the family of {underlay} (node {key})")
    mtu = tunnel_mtu(underlay, node.underlay_mtu)
    bridge_dev = types.bridge_device(family)
    local_dev = types.local_device(family)
    if has_bridge:
        devices.append(device(key, bridge_dev, underlay, bridge, mtu))
        if own.config.global_cidrs:
            programs.append(types.Program(bridge_dev, types.PROGRAM_TUNNEL))
        for other in view.bridge_nodes:
            if other.key == key or (gateway_mode and other.cluster == node.cluster):
                continue
            if not view.supports(other, family):
                continue
            (peer_key, peer), _ = contribution(bridge, other, ())
            if other.cluster != node.cluster and other.key in view.hot_keys:
                peer = dataclasses.replace(peer, probe=True)
            peers[peer_key] = peer
    local_via = ""
    local_vias: tuple[str, ...] = ()
    if gateway_mode:
        local = view.locals.get(family)
        if local is None:
            raise ValueError(f"no local CIDR for the family of {underlay} (node {key})")
        devices.append(device(key, local_dev, underlay, local, mtu))
        for other in own.nodes if hot else own.hot:
            if other.key == key or other.underlay(family) is None:
                continue
            peer = local_peer(local, other)
            if other in own.hot:
                peer = dataclasses.replace(peer, probe=True)
            peers[types.entry_key(peer)] = peer
        own_route = own.gateway_route(family, local) if not own.is_active(key) else None
        if own_route is not None:
            local_via, local_vias = own_route

    if gateway_mode and not own.is_active(key):
        # Standby and internal nodes: everything of the other clusters via the active gateway
        # (active/active: via all of them, as one group).
        if local_via:
            for dst in _remote_destinations(view, node.cluster, family):
                routes[f"route/{dst}"] = types.RouteEntry(dst=dst, via=local_via, device=local_dev, vias=local_vias)
            if not hot:
                dst = canonical(bridge)
                routes[f"route/{dst}"] = types.RouteEntry(dst=dst, via=local_via, device=local_dev, vias=local_vias)
    else:
        _bridge_routes(view, node, family, routes)


def routed(cidrs: Iterable[str], global_cidrs: tuple[tuple[str, str], ...]) -> list[str]:
    """What the other clusters route for ``cidrs`` of a cluster with ``global_cidrs``: the global
    CIDR of a mapped one (by prefix, for a node CIDR inside a mapped range), else the CIDR."""
    return [_to_global(c, global_cidrs) or c for c in cidrs] if global_cidrs else list(cidrs)


@functools.lru_cache(maxsize=65536)
def canonical(cidr: str) -> str:
    """types.canonical_cidr, cached: planning asks for the same few CIDRs over and over."""
    return types.canonical_cidr(cidr)


@functools.lru_cache(maxsize=65536)
def _to_global(text: str, global_cidrs: tuple[tuple[str, str], ...]) -> str | None:
    """types.to_global, cached (see canonical)."""
    return types.to_global(text, global_cidrs)


def _bridge_routes(view: View, node: types.NodeAnnouncement, family: int, routes: dict[str, types.RouteEntry]) -> None:
    """Routes of ``family`` of an endpoint node or an active gateway: straight to the owner over
    the family's bridge device."""
    bridge = view.bridges[family]
    device = types.bridge_device(family)
    for name, cv in view.clusters.items():
        if name == node.cluster or family not in cv.families:
            continue
        if not cv.gateway_mode:
            for other in cv.nodes:
                if other.underlay(family) is None:
                    continue
                _, other_routes = contribution(bridge, other, cv.config.global_cidrs)
                routes.update(other_routes)
        gw = cv.gateway_route(family, bridge)
        if gw is None:
            continue
        via, vias = gw
        dsts: list[str] = routed(cv.config.service_cidrs, cv.config.global_cidrs)
        if cv.gateway_mode:
            dsts += routed(cv.config.pod_cidrs, cv.config.global_cidrs)
            dsts += local_hosts(view, cv, family)
        for dst in dsts:
            if types.family_of(dst) != family:
                continue
            dst = canonical(dst)
            routes[f"route/{dst}"] = types.RouteEntry(dst=dst, via=via, device=device, vias=vias)


def _remote_destinations(view: View, own_cluster: str, family: int) -> list[str]:
    """Everything of ``family`` of the other clusters a non-active node of a gateway cluster
    routes to its gateway: whole pod CIDRs of clusters with somewhere to go, service CIDRs of
    clusters with an active gateway, and the vx-local hosts of gateway-mode clusters."""
    out: list[str] = []
    for name, cv in view.clusters.items():
        if name == own_cluster or family not in cv.families:
            continue
        gw_reachable = any(a.underlay(family) is not None for a in cv.actives)
        reachable = gw_reachable if cv.gateway_mode else any(n.underlay(family) is not None for n in cv.nodes)
        if reachable:
            out += routed(cv.config.pod_cidrs, cv.config.global_cidrs)
        if gw_reachable:
            out += routed(cv.config.service_cidrs, cv.config.global_cidrs)
            if cv.gateway_mode:
                out += local_hosts(view, cv, family)
    return [canonical(d) for d in out if types.family_of(d) == family]


def local_hosts(view: View, cv: ClusterView, family: int) -> tuple[str, ...]:
    """What every node outside the gateway-mode cluster ``cv`` routes to its gateway for the
    vx-local addresses of ``family`` of its nodes, as the fewest CIDRs: the images of its
    ``nodeCIDRs`` in the local CIDR (:func:`fabric.types.local_image`), and for its other nodes
    the widest prefixes that hold no vx-local address of another cluster (:func:`_aggregates`).

    Why not one route per node: every node outside the cluster routes these (the host-network
    return path, see "Routes"), so that made every plan O(nodes of the fabric) in gateway mode.
    Why not the nodes' addresses collapsed (as before issue 21's step): that set changes with
    every node that joins or leaves, and so did every plan outside the cluster: at 100 clusters
    of 100 nodes a join reached 99 % of the fabric and a bring-up was O(N^2) messages. A prefix
    that holds only this cluster's addresses does not move when a node joins inside it, and a
    cluster's nodes usually sit in one underlay subnet, so they share one or two. The images of
    declared subnets do not move at all; a node outside them is aggregated like any other, and
    one inside another cluster's image is routed by its own address, which the longer prefix
    makes win (the images of two clusters never overlap: :func:`fabric.validation.config_problems`)."""
    key = (cv.config.name, family)
    hosts = view.local_hosts.get(key)
    if hosts is None:
        local = view.locals.get(family)
        gateway_clusters = tuple(c for c in view.clusters.values() if c.gateway_mode)
        for name, got in _aggregates(gateway_clusters, family, local).items():
            view.local_hosts[(name, family)] = got
        hosts = view.local_hosts.setdefault(key, ())
    return hosts


def _aggregates(clusters: tuple[ClusterView, ...], family: int, local: str | None) -> dict[str, tuple[str, ...]]:
    """:func:`local_hosts` of every gateway-mode cluster of ``clusters`` in ``family``, computed
    together: a cluster's prefixes are bounded by the others' addresses.

    The vx-local address of a node (:func:`overlay_address`) is its point in the local CIDR; a
    cluster's declared images are intervals of it. For a node that no image of its own cluster
    covers, take the nearest point or interval end of another cluster below and above it; the
    longest common prefix with either, plus one bit, is the widest prefix around the node that
    holds nothing of another cluster (every CIDR is an interval, so nothing farther can be in it).
    Nodes of one cluster next to each other share that prefix; addresses nobody has yet go to the
    cluster whose prefix holds them, which is harmless (no node answers there, and a node that
    joins there is a new bound that splits the prefix in the same flush that announces it).

    Cost: a view is built per topology, and a bring-up makes hundreds. Clusters whose spans (from
    their lowest to their highest point) overlap are solved together (:func:`_solve`); such a
    group depends only on its members' points and the nearest point outside it on either side.
    Both a cluster's points and a group's prefixes are reused from the previous view of the same
    local CIDR when those did not change, so a flush recomputes only what a change touched: past
    one pass over the nodes' addresses (to see which clusters changed), O(clusters) per view when
    clusters keep to their own underlay ranges, O(M log M) for the M nodes of clusters whose
    addresses interleave. Only the previous view's are kept (memory: one view's worth, not a
    cache of every bring-up step)."""
    out: dict[str, tuple[str, ...]] = {c.config.name: () for c in clusters}
    if local is None:
        return out
    last_points, last_solved = _LAST_POINTS.get(local, {}), _LAST_SOLVED.get(local, {})
    points_now: dict[tuple[str, tuple[str, ...], tuple[str, ...]], _Points] = {}
    solved_now: dict[tuple[tuple[_Points, ...], int | None, int | None], dict[str, tuple[str, ...]]] = {}
    per: list[_Points] = []
    for cv in clusters:
        declared = tuple(c for c in cv.config.node_cidrs if types.family_of(c) == family)
        underlays = tuple(ul for n in cv.nodes if (ul := n.underlay(family)) is not None)
        key = (cv.config.name, underlays, declared)
        pts = points_now[key] = last_points.get(key) or _cluster_points(*key, local)
        if pts.points:
            per.append(pts)
    per.sort(key=lambda p: p.low)
    groups: list[list[_Points]] = []
    high = -1
    for pts in per:
        if groups and pts.low <= high:
            groups[-1].append(pts)
        else:
            groups.append([pts])
        high = max(high, pts.high)
    for i, group in enumerate(groups):
        below = max(p.high for p in groups[i - 1]) if i > 0 else None
        above = min(p.low for p in groups[i + 1]) if i + 1 < len(groups) else None
        gkey = (tuple(group), below, above)
        got = solved_now[gkey] = last_solved.get(gkey) or _solve(*gkey, local)
        out.update(got)
    _LAST_POINTS[local], _LAST_SOLVED[local] = points_now, solved_now
    return out


#: Per local CIDR, the previous view's cluster points and solved groups (see :func:`_aggregates`).
_LAST_POINTS: dict[str, dict[tuple[str, tuple[str, ...], tuple[str, ...]], _Points]] = {}
_LAST_SOLVED: dict[str, dict[tuple[tuple[_Points, ...], int | None, int | None], dict[str, tuple[str, ...]]]] = {}


@dataclasses.dataclass(frozen=True, slots=True)
class _Points:
    """One gateway-mode cluster's points in the local CIDR (see :func:`_aggregates`)."""

    name: str
    #: (point, needs a prefix) sorted: its nodes' vx-local addresses (needs: no image of its own
    #: covers it) and the ends of its declared images (bounds for the others only).
    points: tuple[tuple[int, bool], ...]
    #: Its declared images, as networks and as (first, last) spans.
    images: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    spans: tuple[tuple[int, int], ...]
    low: int
    high: int


def _cluster_points(name: str, underlays: tuple[str, ...], declared: tuple[str, ...], local: str) -> _Points:
    """:class:`_Points` of one cluster (``underlays``: its nodes' of the local CIDR's family)."""
    subnets = [network(c) for c in declared]  # not strict: the configuration check is not
    images = tuple(network(types.local_image(str(s), local)) for s in subnets)
    spans = tuple((int(i.network_address), int(i.broadcast_address)) for i in images)
    points = [(p, False) for span in spans for p in span]
    for ul in underlays:
        covered = bool(subnets) and any(ipaddress.ip_address(ul) in s for s in subnets)
        points.append((overlay_point(ul, local), not covered))
    points.sort()
    low, high = (points[0][0], points[-1][0]) if points else (0, -1)
    return _Points(name, tuple(points), images, spans, low, high)


def _solve(group: tuple[_Points, ...], below: int | None, above: int | None, local: str) -> dict[str, tuple[str, ...]]:
    """The prefixes of the clusters of ``group``, whose spans overlap, with ``below`` and
    ``above`` the nearest points of other clusters outside it (see :func:`_aggregates`)."""
    lnet = network(local)
    width: int = lnet.max_prefixlen
    # (point, owner index, needs), with the outside bounds as points of an owner of their own.
    points = [(p, k, needs) for k, g in enumerate(group) for p, needs in g.points]
    points += [(b, -1, False) for b in (below, above) if b is not None]
    points.sort()
    near_below = _nearest_other(points)
    near_above = _nearest_other(points[::-1])[::-1]
    spans = sorted((first, last, k) for k, g in enumerate(group) for first, last in g.spans)
    firsts = [s[0] for s in spans]
    prefixes: list[set[tuple[int, int]]] = [set() for _ in group]
    for i, (point, owner, needs) in enumerate(points):
        if not needs:
            continue
        j = bisect.bisect_right(firsts, point) - 1
        if j >= 0 and spans[j][1] >= point and spans[j][2] != owner:
            length = width  # inside another cluster's image: its own address, the longer prefix
        else:
            bounds = [b for b in (near_below[i], near_above[i]) if b is not None]
            length = max((width - (point ^ b).bit_length() + 1 for b in bounds), default=0)
            length = min(width, max(lnet.prefixlen, length))
        shift = width - length
        prefixes[owner].add(((point >> shift) << shift, length))
    out: dict[str, tuple[str, ...]] = {}
    for k, g in enumerate(group):
        nets = [*g.images, *(ipaddress.ip_network(p) for p in sorted(prefixes[k]))]
        out[g.name] = tuple(str(n) for n in ipaddress.collapse_addresses(nets))  # type: ignore[type-var]
    return out


def _nearest_other(points: list[tuple[int, int, bool]]) -> list[int | None]:
    """For each of ``points`` (sorted either way), the nearest earlier point of another owner.
    One pass: the last point seen, and the last one of an owner other than its owner."""
    out: list[int | None] = []
    last_owner: int | None = None
    last: int | None = None
    last_other: int | None = None  # the last point of an owner other than last_owner
    for point, owner, _needs in points:
        if owner != last_owner:
            last_other, last_owner = last, owner
        out.append(last_other)
        last = point
    return out


def _family(ip: str) -> int:
    return types.family_of(ip)


def device(key: types.NodeKey, name: str, underlay_ip: str, cidr: str, mtu: int) -> types.VxlanDevice:
    vni, port = types.TUNNEL_DEVICES[name][:2]
    return types.VxlanDevice(
        name=name,
        vni=vni,
        port=port,
        mac=device_mac(key, name),
        address=overlay_address(underlay_ip, cidr),
        local=underlay_ip,
        mtu=mtu,
    )


@functools.lru_cache(maxsize=64)
def _by_family(cidrs: tuple[str, ...]) -> dict[int, str]:
    """types.first_per_family, cached: once per topology's view."""
    return types.first_per_family(cidrs)


@functools.lru_cache(maxsize=65536)
def local_peer(local_cidr: str, other: types.NodeAnnouncement) -> types.Peer:
    family = types.family_of(local_cidr)
    underlay = other.underlay(family)
    assert underlay is not None
    device = types.local_device(family)
    return types.Peer(
        device=device,
        overlay_ip=overlay_address(underlay, local_cidr).partition("/")[0],
        mac=device_mac(other.key, device),
        underlay_ip=underlay,
        node=str(other.key),
    )


@functools.lru_cache(maxsize=65536)
def contribution(
    bridge_cidr: str, other: types.NodeAnnouncement, global_cidrs: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, types.Peer], tuple[tuple[str, types.RouteEntry], ...]]:
    """What ``other`` adds to every other node's plan as a bridge node of the family of
    ``bridge_cidr``: its peer, and the routes to its pod CIDRs of that family (used by endpoint
    nodes and active gateways of other clusters when ``other`` is an endpoint node; global
    CIDRs of ``other``'s cluster applied). Cached: it depends on nothing but its arguments
    (cheap to hash), and re-planning every node after a join would otherwise redo it once per
    pair."""
    family = types.family_of(bridge_cidr)
    underlay = other.underlay(family)
    assert underlay is not None
    device = types.bridge_device(family)
    via = overlay_address(underlay, bridge_cidr).partition("/")[0]
    peer = types.Peer(
        device=device,
        overlay_ip=via,
        mac=device_mac(other.key, device),
        underlay_ip=underlay,
        node=str(other.key),
    )
    dsts = routed((c for c in other.pod_cidrs if types.family_of(c) == family), global_cidrs)
    routes = (types.RouteEntry(dst=canonical(cidr), via=via, device=device) for cidr in dsts)
    return (types.entry_key(peer), peer), tuple((types.entry_key(r), r) for r in routes)


def plan_all(topology: types.Topology) -> dict[types.NodeKey, types.NodeState]:
    """Every node's plan (used by tests and by the reflector after a change)."""
    return {n.key: plan(topology, n.key) for n in topology.nodes}
