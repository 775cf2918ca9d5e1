"""The planner: topology -> the complete desired state of one node. Pure functions, no I/O.

Roles
-----

Every cluster has exactly one *active gateway* and at most one *hot standby*, elected by the
reflector (:func:`elect`) and stored in the topology (``Topology.roles``), so :func:`plan` stays a
pure function of the topology. Node classes (Kosmos' names, inventory section 2.5):

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
  ``vx-local`` addresses of C's nodes via the same gateway, collapsed into the fewest CIDRs
  that cover exactly them (nodes of one underlay subnet give a handful per cluster, not one
  per node). The latter is the host-network return path: a process on an internal node of C
  that talks to a remote pod leaves with its ``vx-local`` address as source (the kernel picks
  the address of the output device), and the remote pod's node must route the reply back to
  C. Kosmos masquerades such traffic on the gateway (iptables); routing the addresses keeps the
  fabric stateless and NAT-free (no peer: they share C's gateway as next hop, i.e. one nexthop
  object).

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
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from fabric import types, validation
from fabric.control import api

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
    return _first_of_family(types.with_defaults(config.bridge_cidrs, _BRIDGE_DEFAULTS), underlay_ip)


def local_cidr_for(config: types.FabricConfig, underlay_ip: str) -> str | None:
    """The first vx-local CIDR of the underlay address's family (None if there is none)."""
    return _first_of_family(types.with_defaults(config.local_cidrs, _LOCAL_DEFAULTS), underlay_ip)


@functools.lru_cache(maxsize=65536)
def _first_of_family(cidrs: tuple[str, ...], underlay_ip: str) -> str | None:
    """Cached: validation asks it for every other node of the fabric, once per announcement."""
    version = ipaddress.ip_address(underlay_ip).version
    for c in cidrs:
        if ipaddress.ip_network(c, strict=False).version == version:
            return c
    return None


def tunnel_mtu(underlay_ip: str, underlay_mtu: int) -> int:
    overhead = types.VXLAN_OVERHEAD_V6 if ipaddress.ip_address(underlay_ip).version == 6 else types.VXLAN_OVERHEAD_V4
    return underlay_mtu - overhead


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


#: Every tunnel device a node may get; MAC collisions are indexed for all of them.
_ALL_DEVICES = tuple(dev for f in (4, 6) for dev in (types.bridge_device(f), types.local_device(f)))
#: Overlay address kinds: (name, the CIDR it is derived from).
_OVERLAY_KINDS: tuple[tuple[str, Callable[[types.FabricConfig, str], str | None]], ...] = (
    ("bridge", bridge_cidr_for),
    ("local", local_cidr_for),
)


class NodeIndex:
    """The nodes of a topology, indexed by everything :func:`validate_announcement` compares a
    new announcement with: underlay addresses, derived overlay addresses, device MACs and pod
    CIDRs (by prefix length, so overlaps are found by lookups and bisection).

    Why: checking one announcement against every other node is O(nodes), so a bring-up of N
    nodes cost O(N^2) (at 10,000 nodes, minutes of the reflector's event loop). With the index
    one check costs O(own items x log nodes). The reflector keeps one index next to its pending
    topology and updates it with every admission and withdrawal; other callers let
    :func:`validate_announcement` build one. Overlay addresses depend on the configuration's
    bridge/local CIDRs, so an index belongs to one configuration (a new one means a new index).
    """

    def __init__(self, config: types.FabricConfig, nodes: Iterable[types.NodeAnnouncement] = ()) -> None:
        self.config = config
        self.nodes: dict[types.NodeKey, types.NodeAnnouncement] = {}
        self._underlay: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, set[types.NodeKey]] = {}
        self._overlay: dict[tuple[str, str, str], set[types.NodeKey]] = {}
        self._mac: dict[tuple[str, str], set[types.NodeKey]] = {}
        #: (version, prefix length) -> sorted network addresses (as ints) of the pod CIDRs.
        self._pod_starts: dict[tuple[int, int], list[int]] = {}
        #: (version, prefix length, network int) -> (node, position in its pod_cidrs, CIDR text).
        self._pod_owners: dict[tuple[int, int, int], list[tuple[types.NodeKey, int, str]]] = {}
        for n in nodes:
            self.add(n)

    @classmethod
    def of(cls, topology: types.Topology) -> NodeIndex:
        return cls(topology.config, topology.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def _items(self, n: types.NodeAnnouncement) -> tuple[
        list[tuple[dict[Any, set[types.NodeKey]], Any]], list[tuple[int, int, int, int, str]]
    ]:
        """The index slots of ``n``: (table, slot key) pairs, and its pod CIDRs as
        (version, prefix length, network int, position, text). Texts that do not parse are
        left out (a node in a topology passed validation; a hand-made one may not have)."""
        slots: list[tuple[dict[Any, set[types.NodeKey]], Any]] = []
        for text in n.underlay_ips:
            ip = _parsed_ip(text)
            if ip is not None:
                slots.append((self._underlay, ip))
        for family in (4, 6):
            ul = n.underlay(family)
            if ul is None or _parsed_ip(ul) is None:
                continue
            for kind, cidr_for in _OVERLAY_KINDS:
                cidr = cidr_for(self.config, ul)
                if cidr is None:
                    continue
                try:
                    slots.append((self._overlay, (kind, cidr, overlay_address(ul, cidr))))
                except ValueError:
                    continue
        for dev in _ALL_DEVICES:
            slots.append((self._mac, (dev, device_mac(n.key, dev))))
        pods: list[tuple[int, int, int, int, str]] = []
        for pos, text in enumerate(n.pod_cidrs):
            try:
                net = _parsed_net(text)
            except ValueError:
                continue
            pods.append((net.version, net.prefixlen, int(net.network_address), pos, text))
        return slots, pods

    def add(self, n: types.NodeAnnouncement) -> None:
        """Index ``n`` (replacing the announcement of the same node, if any)."""
        if n.key in self.nodes:
            self.remove(n.key)
        self.nodes[n.key] = n
        slots, pods = self._items(n)
        for table, slot in slots:
            table.setdefault(slot, set()).add(n.key)
        for version, plen, start, pos, text in pods:
            starts = self._pod_starts.setdefault((version, plen), [])
            starts.insert(bisect.bisect_right(starts, start), start)
            self._pod_owners.setdefault((version, plen, start), []).append((n.key, pos, text))

    def remove(self, key: types.NodeKey) -> None:
        """Forget the node ``key`` (nothing happens for an unknown one)."""
        n = self.nodes.pop(key, None)
        if n is None:
            return
        slots, pods = self._items(n)
        for table, slot in slots:
            keys = table.get(slot)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del table[slot]
        for version, plen, start, pos, text in pods:
            starts = self._pod_starts[(version, plen)]
            del starts[bisect.bisect_left(starts, start)]
            if not starts:
                del self._pod_starts[(version, plen)]
            owners = self._pod_owners[(version, plen, start)]
            owners.remove((key, pos, text))
            if not owners:
                del self._pod_owners[(version, plen, start)]

    def underlay_users(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> set[types.NodeKey]:
        return self._underlay.get(ip, set())

    def overlay_users(self, kind: str, cidr: str, address: str) -> set[types.NodeKey]:
        return self._overlay.get((kind, cidr, address), set())

    def mac_users(self, device: str, mac: str) -> set[types.NodeKey]:
        return self._mac.get((device, mac), set())

    def overlapping_pods(
        self, net: ipaddress.IPv4Network | ipaddress.IPv6Network
    ) -> list[tuple[types.NodeKey, int, str]]:
        """Pod CIDRs of indexed nodes that overlap ``net``: (node, position, text). Two CIDRs
        overlap when one contains the other: the containing ones are found by looking up the
        prefixes of ``net`` at every indexed prefix length up to its own, the contained ones by
        bisecting the indexed networks of every longer prefix length within ``net``'s range."""
        out: list[tuple[types.NodeKey, int, str]] = []
        version, plen = net.version, net.prefixlen
        bits = net.max_prefixlen
        start = int(net.network_address)
        end = int(net.broadcast_address)
        for (v, q), starts in self._pod_starts.items():
            if v != version:
                continue
            if q <= plen:
                sup = start & (((1 << bits) - 1) ^ ((1 << (bits - q)) - 1))
                out += self._pod_owners.get((v, q, sup), ())
            else:
                lo, hi = bisect.bisect_left(starts, start), bisect.bisect_right(starts, end)
                for s in sorted(set(starts[lo:hi])):
                    out += self._pod_owners[(v, q, s)]
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """One reason an announcement is refused: its class (what the wire's ``Rejected`` and the
    reflector's rejection metric carry) and its text (what people read)."""

    reason: api.RejectionReason
    text: str


_R = api.RejectionReason


def validate_announcement(
    topology: types.Topology, ann: types.NodeAnnouncement, index: NodeIndex | None = None
) -> list[str]:
    """The texts of :func:`announcement_refusals` (empty when ``ann`` may join)."""
    return [r.text for r in announcement_refusals(topology, ann, index)]


def announcement_refusals(
    topology: types.Topology, ann: types.NodeAnnouncement, index: NodeIndex | None = None
) -> list[Refusal]:
    """Why ``ann`` must be refused (empty when it may join or replace its old announcement).

    Other nodes are the topology's nodes with a different key: re-announcing the same node is
    checked against everybody else only, so an identical re-announcement is always fine and a
    changed one replaces the old if it is valid on its own. ``index`` holds the nodes to check
    against (it is used instead of ``topology.nodes``; see :class:`NodeIndex`); without one it
    is built from the topology. Reasons about other nodes name them in key order.
    """
    reasons: list[Refusal] = []
    config = topology.config
    if index is None:
        index = NodeIndex.of(topology)
    elif index.config is not config and index.config != config:
        raise ValueError("validate_announcement: the index belongs to another fabric configuration")
    if not ann.name or "/" in ann.name or not ann.cluster or "/" in ann.cluster:
        reasons.append(Refusal(
            _R.IDENTITY, f"node identity {ann.cluster!r}/{ann.name!r} must be two non-empty names without '/'"
        ))
        return reasons
    cluster = config.cluster(ann.cluster)
    if cluster is None:
        known = ", ".join(c.name for c in config.clusters) or "none"
        reasons.append(Refusal(_R.UNKNOWN_CLUSTER, f"unknown cluster {ann.cluster!r} (configured clusters: {known})"))
        return reasons
    if cluster.mode not in SUPPORTED_MODES:
        reasons.append(Refusal(
            _R.UNSUPPORTED_MODE,
            f"cluster {cluster.name!r} has mode {cluster.mode.value!r}, which this build does not support",
        ))

    def others(keys: Iterable[types.NodeKey]) -> list[types.NodeKey]:
        return sorted(k for k in keys if k != ann.key)

    # Underlay addresses: the primary one, and at most one more per other family.
    underlay: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    usable: list[str] = []  # valid underlay addresses, one per family
    for i, text in enumerate(ann.underlay_ips):
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            reasons.append(Refusal(_R.UNDERLAY, f"underlay address {text!r} is not an IP address"))
            continue
        if i == 0:
            underlay = ip
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
            reasons.append(Refusal(_R.UNDERLAY, f"underlay address {text} is not a unicast host address"))
        if any(types.family_of(u) == ip.version for u in usable):
            reasons.append(Refusal(
                _R.UNDERLAY, f"underlay address {text}: the node announces two underlay addresses of IPv{ip.version}"
            ))
            continue
        for o in others(index.underlay_users(ip)):
            reasons.append(Refusal(_R.UNDERLAY_CONFLICT, f"underlay address {text} is already used by node {o}"))
        usable.append(text)

    # MTU (per underlay family: the outer header differs).
    for text in usable:
        mtu = tunnel_mtu(text, ann.underlay_mtu)
        if ann.underlay_mtu > MAX_UNDERLAY_MTU or mtu < MIN_TUNNEL_MTU:
            reasons.append(Refusal(
                _R.MTU,
                f"underlay MTU {ann.underlay_mtu} is invalid: the tunnel MTU would be {mtu} over underlay {text}"
                f" (need underlay MTU {MIN_TUNNEL_MTU + ann.underlay_mtu - mtu}..{MAX_UNDERLAY_MTU})",
            ))
            break

    # Pod CIDRs.
    own: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    for text in ann.pod_cidrs:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            reasons.append(Refusal(_R.POD_CIDR, f"pod CIDR {text!r} is invalid ({e})"))
            continue
        if cluster.discover_pod_cidrs:
            reasons += _discovered_pod_reasons(config, cluster, text, net)
        elif not any(_subnet_of(net, c) for c in cluster.pod_cidrs):
            reasons.append(Refusal(
                _R.POD_CIDR, f"pod CIDR {text} is outside cluster {cluster.name!r} podCIDRs {list(cluster.pod_cidrs)}"
            ))
        for prev_text, prev in own:
            if prev.version == net.version and prev.overlaps(net):
                reasons.append(Refusal(_R.POD_CIDR, f"pod CIDR {text} overlaps the node's own pod CIDR {prev_text}"))
        own.append((text, net))
    clashes: set[tuple[types.NodeKey, int, str, int, str]] = set()
    for own_pos, (text, net) in enumerate(own):
        for o_key, o_pos, oc in index.overlapping_pods(net):
            if o_key != ann.key:
                clashes.add((o_key, o_pos, oc, own_pos, text))
    for o_key, _o_pos, oc, _own_pos, text in sorted(clashes):
        mapped = _mapped(config, ann.cluster, text) and _mapped(config, o_key.cluster, oc)
        if o_key.cluster != ann.cluster and mapped:
            continue  # both are reached only by their global CIDRs
        reasons.append(Refusal(_R.POD_CIDR_CONFLICT, f"pod CIDR {text} overlaps pod CIDR {oc} of node {o_key}"))

    # Overlay addresses and MACs: derived, so collisions must be caught here, never planned.
    # Every node may become a bridge node (a gateway-mode node when elected), so vx-bridge is
    # checked for all; vx-local for nodes of gateway-mode clusters, fabric-wide, because the
    # vx-local addresses of gateway-mode nodes are routed (collapsed) by the other clusters.
    families = [f for f in cluster.families if any(types.family_of(u) == f for u in usable)]
    if usable and not families:
        names = ", ".join(types.FAMILY_NAMES[f] for f in cluster.families)
        reasons.append(Refusal(
            _R.UNDERLAY,
            f"underlay address {', '.join(usable)} is of no family of cluster {cluster.name!r} (ipFamilies: {names}):"
            " the node could carry none of its traffic",
        ))
    if underlay is not None:
        kinds: list[tuple[str, Callable[[types.FabricConfig, str], str | None], types.ClusterMode | None]] = [
            ("bridge", bridge_cidr_for, None)
        ]
        if cluster.mode == types.ClusterMode.GATEWAY:
            kinds.append(("local", local_cidr_for, types.ClusterMode.GATEWAY))
        for family in families:
            ul = next(u for u in usable if types.family_of(u) == family)
            for kind, cidr_for, only_mode in kinds:
                reasons += _overlay_reasons(index, ann, ul, kind, cidr_for, only_mode, others)
    devices: list[str] = []
    for family in families:
        devices.append(types.bridge_device(family))
        if cluster.mode == types.ClusterMode.GATEWAY:
            devices.append(types.local_device(family))
    for dev in devices:
        mac = device_mac(ann.key, dev)
        for o in others(index.mac_users(dev, mac)):
            reasons.append(Refusal(_R.MAC_CONFLICT, f"{dev} MAC {mac} collides with node {o}"))
    return reasons


def _overlay_reasons(
    index: NodeIndex,
    ann: types.NodeAnnouncement,
    underlay: str,
    kind: str,
    cidr_for: Callable[[types.FabricConfig, str], str | None],
    only_mode: types.ClusterMode | None,
    others: Callable[[Iterable[types.NodeKey]], list[types.NodeKey]],
) -> list[Refusal]:
    config = index.config
    reasons: list[Refusal] = []
    cidr = cidr_for(config, underlay)
    if cidr is None:
        return [Refusal(_R.OVERLAY, f"no {kind} CIDR of the family of underlay address {underlay} is configured")]
    mine = overlay_address(underlay, cidr)
    mine_ip = ipaddress.ip_interface(mine)
    net = mine_ip.network
    if mine_ip.ip in (net.network_address, net.broadcast_address) and net.num_addresses > 2:
        reasons.append(Refusal(
            _R.OVERLAY,
            f"overlay address {mine_ip.ip} derived from underlay {underlay} is the network or"
            f" broadcast address of {kind} CIDR {cidr}",
        ))
    family = types.family_of(underlay)
    for o in others(index.overlay_users(kind, cidr, mine)):
        if only_mode is not None:
            oc = config.cluster(o.cluster)
            if oc is None or oc.mode != only_mode:
                continue
        o_ul = index.nodes[o].underlay(family)
        reasons.append(Refusal(
            _R.OVERLAY_CONFLICT,
            f"overlay address {mine_ip.ip} derived from underlay {underlay} collides with node"
            f" {o} (underlay {o_ul}): {kind} CIDR {cidr} keeps only the host bits",
        ))
    return reasons


def _discovered_pod_reasons(
    config: types.FabricConfig,
    cluster: types.ClusterConfig,
    text: str,
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> list[Refusal]:
    """Why pod CIDR ``text`` of a node of discovery-mode ``cluster`` must be refused.

    Its cluster's own ``pod_cidrs`` are the union of what its admitted nodes announced, so they
    are not checked against (a new node is outside them by nature, and a check against them
    would feed back into them). Instead, what fabric/crd.py checks a discovered CIDR against,
    so that admitting a node can never make its Cluster invalid: its ipFamilies, its own service
    CIDRs and globalCIDRsMap keys (a key maps whole ranges), every cluster's global CIDRs, the
    other clusters' pod and service CIDRs (unless both sides are mapped, as for node vs node)
    and the fabric's bridge/local CIDRs. O(clusters), not O(nodes): nodes are the index's."""
    reasons: list[Refusal] = []
    if cluster.ip_families and net.version not in cluster.ip_families:
        names = ", ".join(types.FAMILY_NAMES[f] for f in cluster.ip_families)
        reasons.append(Refusal(
            _R.POD_CIDR, f"pod CIDR {text} is IPv{net.version} but cluster {cluster.name!r} ipFamilies is [{names}]"
        ))
    for svc in cluster.service_cidrs:
        if _overlap(text, svc):
            reasons.append(Refusal(
                _R.POD_CIDR, f"pod CIDR {text} overlaps {svc} of cluster {cluster.name!r} serviceCIDRs (its own)"
            ))
    for key, _glob in cluster.global_cidrs:
        if _overlap(text, key) and not _subnet_of(net, key):
            reasons.append(Refusal(_R.POD_CIDR, f"pod CIDR {text} is only partly inside {key} of cluster "
                                   f"{cluster.name!r} globalCIDRs (its own): a mapping must cover whole ranges"))
    mine_mapped = _mapped(config, cluster.name, text)
    for other in config.clusters:
        for _key, glob in other.global_cidrs:
            if _overlap(text, glob):
                reasons.append(Refusal(
                    _R.POD_CIDR, f"pod CIDR {text} overlaps global CIDR {glob} of cluster {other.name!r} globalCIDRs"
                ))
        if other.name == cluster.name:
            continue
        for field, cidrs in (("podCIDRs", other.pod_cidrs), ("serviceCIDRs", other.service_cidrs)):
            for oc in cidrs:
                if not _overlap(text, oc) or (mine_mapped and _mapped(config, other.name, oc)):
                    continue
                reasons.append(Refusal(_R.POD_CIDR, f"pod CIDR {text} overlaps {oc} of cluster {other.name!r} {field} "
                                       "(overlapping clusters need both ranges mapped by globalCIDRs)"))
    for field, cidrs, defaults in (("bridgeCIDRs", config.bridge_cidrs, _BRIDGE_DEFAULTS),
                                   ("localCIDRs", config.local_cidrs, _LOCAL_DEFAULTS)):  # fmt: skip
        for ic in types.with_defaults(cidrs, defaults):
            if _overlap(text, ic):
                reasons.append(Refusal(_R.POD_CIDR, f"pod CIDR {text} overlaps the fabric's {field} {ic}"))
    return reasons


def _mapped(config: types.FabricConfig, cluster: str, cidr: str) -> bool:
    """Is ``cidr`` inside a CIDR that ``cluster`` maps to a global CIDR?"""
    c = config.cluster(cluster)
    try:
        return c is not None and types.to_global(cidr, c.global_cidrs) is not None
    except ValueError:
        return False


@functools.lru_cache(maxsize=65536)
def _parsed_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address text parsed once (None: not an address). Validating one announcement compares
    it with every other node: without the cache that is one parse per node per announcement."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=65536)
def _parsed_net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR text parsed once (see _parsed_ip); the network object caches its own
    broadcast address, which ``overlaps`` needs."""
    return ipaddress.ip_network(text, strict=False)


def _overlap(a: str, b: str) -> bool:
    """types.cidrs_overlap on cached parses."""
    na, nb = _parsed_net(a), _parsed_net(b)
    return na.version == nb.version and na.overlaps(nb)


def _subnet_of(net: ipaddress.IPv4Network | ipaddress.IPv6Network, cidr: str) -> bool:
    outer = ipaddress.ip_network(cidr, strict=False)
    if outer.version != net.version:
        return False
    return net.subnet_of(outer)  # type: ignore[arg-type]


def config_problems(config: types.FabricConfig) -> list[str]:
    """Why ``config`` cannot be planned from at all (empty when it can); the checks are the
    configuration's one set of semantic checks, :func:`fabric.validation.config_problems`."""
    return validation.config_problems(config)


# --------------------------------------------------------------------------------------------
# Election
# --------------------------------------------------------------------------------------------


def candidates(cluster: types.ClusterConfig, present: Collection[str]) -> list[str]:
    """Gateway candidates of ``cluster`` that are in the topology, most preferred first: the
    configured ``gateways`` in their order, or every node by name when none are configured."""
    if cluster.gateways:
        return [n for n in cluster.gateways if n in present]
    return sorted(present)


def elect(
    topology: types.Topology,
    connected: Collection[types.NodeKey],
    unreachable: Mapping[types.NodeKey, int],
) -> tuple[types.GatewayRole, ...]:
    """The gateway roles the reflector should plan with, given its liveness view.

    ``connected``: nodes with an open session. ``unreachable``: per node, how many *other* nodes
    currently report it unreachable through the tunnel (their probes stopped being answered).
    A candidate is *healthy* when connected and reported by nobody.

    Rules, per cluster (pure, deterministic for equal inputs):

    * The current active gateway keeps the role while it is connected and nobody reports it
      (sticky: a healed old gateway does not take the role back).
    * Otherwise the role moves to the best connected candidate - fewest reports, then the
      configured order - but only if that candidate is strictly better than the current one
      (or the current one lost its session). One peer whose own link is broken reports every
      gateway alike and so moves nothing; a dead gateway is reported by all its peers and moves.
    * Without any connected candidate the current gateway stays (its dataplane may still work);
      with no current gateway, the first candidate in the topology is taken.
    * The standby is kept while it is a healthy candidate; otherwise the best remaining
      candidate (connected first) replaces it.

    One value per cluster: the planned state can never hold two active gateways for a cluster.
    """
    present: dict[str, list[str]] = {}
    for n in topology.nodes:
        present.setdefault(n.cluster, []).append(n.name)
    roles: list[types.GatewayRole] = []
    for c in topology.config.clusters:
        cands = candidates(c, present.get(c.name, ()))
        if cands:
            roles.append(_elect_cluster(c.name, cands, topology.role(c.name), connected, unreachable))
    return tuple(sorted(roles))


def unreachable_scores(
    reports: Mapping[types.NodeKey, Collection[types.NodeKey]],
    probe_targets: Mapping[types.NodeKey, Collection[str]],
) -> dict[types.NodeKey, int]:
    """Per node, how many *other* nodes report it unreachable: the input of :func:`elect`.

    ``reports``: each reporter's latest set of unreachable peers; ``probe_targets``: the peers
    (``cluster/node``) each reporter was planned to probe. A reporter that cannot reach *any*
    of its two or more targets is isolated itself - its own link is down, or it just came back
    and its probes have not been answered yet - and says nothing about the others, so its report
    is not counted. Without this, a healed old gateway's stale report would make the new active
    gateway look dead and pull the role back (a flap).
    """
    scores: dict[types.NodeKey, int] = {}
    for reporter, down in reports.items():
        targets = set(probe_targets.get(reporter, ()))
        if len(targets) >= 2 and targets <= {str(k) for k in down}:
            continue
        for k in down:
            if k != reporter:
                scores[k] = scores.get(k, 0) + 1
    return scores


def _elect_cluster(
    cluster: str,
    cands: list[str],
    current: types.GatewayRole | None,
    connected: Collection[types.NodeKey],
    unreachable: Mapping[types.NodeKey, int],
) -> types.GatewayRole:
    """:func:`elect` for one cluster with at least one candidate present."""
    order = {name: i for i, name in enumerate(cands)}
    up = {name for name in cands if types.NodeKey(cluster, name) in connected}
    score = {name: unreachable.get(types.NodeKey(cluster, name), 0) for name in cands}

    def rank(name: str) -> tuple[int, int, int]:
        return (0 if name in up else 1, score[name], order[name])

    active = current.active if current is not None and current.active in order else ""
    if not active:
        active = min(cands, key=rank)
    elif active not in up or score[active] > 0:
        best = min(up, key=rank) if up else ""
        if best and best != active and (active not in up or score[best] < score[active]):
            active = best
    rest = [n for n in cands if n != active]
    standby = current.standby if current is not None and current.standby in rest else ""
    if rest and (not standby or standby not in up or score[standby] > 0):
        best = min(rest, key=rank)
        if not standby or rank(best) < rank(standby):
            standby = best
    return types.GatewayRole(cluster, active, standby)


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _ClusterView:
    config: types.ClusterConfig
    nodes: tuple[types.NodeAnnouncement, ...]
    active: types.NodeAnnouncement | None
    #: Active and standby (the nodes holding gateway devices and peers), active first.
    hot: tuple[types.NodeAnnouncement, ...]
    families: tuple[int, ...]

    @property
    def gateway_mode(self) -> bool:
        return self.config.mode == types.ClusterMode.GATEWAY


@dataclasses.dataclass(frozen=True, slots=True)
class _View:
    """What every node's plan needs of a topology, computed once per topology value."""

    clusters: dict[str, _ClusterView]
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
    #: (cluster, family) -> its nodes' vx-local addresses collapsed (see _local_hosts), filled on
    #: first use: every plan of the fabric asks for every gateway-mode cluster's.
    local_hosts: dict[tuple[str, int], tuple[str, ...]] = dataclasses.field(default_factory=dict)

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
        self.view: _View | None = None

    def get(self, topology: types.Topology) -> _View:
        if self.topology is not topology or self.view is None:
            self.view = _build_view(topology)
            self.topology = topology
        return self.view


_VIEWS = _ViewCache()


def _build_view(topology: types.Topology) -> _View:
    config = topology.config
    by_cluster: dict[str, list[types.NodeAnnouncement]] = {}
    for n in topology.nodes:
        by_cluster.setdefault(n.cluster, []).append(n)
    clusters: dict[str, _ClusterView] = {}
    for c in config.clusters:
        if c.mode not in SUPPORTED_MODES:
            continue
        nodes = tuple(by_cluster.get(c.name, ()))
        by_name = {n.name: n for n in nodes}
        role = topology.role(c.name)
        active = by_name.get(role.active) if role is not None else None
        standby = by_name.get(role.standby) if role is not None and role.standby != role.active else None
        hot = tuple(n for n in (active, standby) if n is not None)
        clusters[c.name] = _ClusterView(c, nodes, active, hot, c.families)
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
    return _View(
        clusters=clusters,
        bridge_nodes=bridge_nodes,
        hot_keys=hot_keys,
        bridges=_by_family(types.with_defaults(config.bridge_cidrs, _BRIDGE_DEFAULTS)),
        locals=_by_family(types.with_defaults(config.local_cidrs, _LOCAL_DEFAULTS)),
        by_key={n.key: n for n in topology.nodes},
        reach=reach,
    )


_BRIDGE_DEFAULTS = (types.DEFAULT_BRIDGE_CIDR_V4, types.DEFAULT_BRIDGE_CIDR_V6)
_LOCAL_DEFAULTS = (types.DEFAULT_LOCAL_CIDR_V4, types.DEFAULT_LOCAL_CIDR_V6)


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

    Planned per address family the node carries (see :meth:`_View.supports`): each family has
    its own devices (``vx-bridge``/``vx-local`` for IPv4, ``vx-bridge-6``/``vx-local-6`` for
    IPv6), peers (only nodes that carry the family too) and routes (only destinations of the
    family). So a route exists only where both ends support its family; an IPv4-only node plans
    exactly what it planned before dual stack.

    Assumes every node in the topology passed :func:`validate_announcement`; the reflector
    guarantees it. Raises KeyError for a node that is not in the topology.
    """
    view = _VIEWS.get(topology)
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
    view: _View,
    own: _ClusterView,
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
        devices.append(_device(key, bridge_dev, underlay, bridge, mtu))
        if own.config.global_cidrs:
            programs.append(types.Program(bridge_dev, types.PROGRAM_TUNNEL))
        for other in view.bridge_nodes:
            if other.key == key or (gateway_mode and other.cluster == node.cluster):
                continue
            if not view.supports(other, family):
                continue
            (peer_key, peer), _ = _contribution(bridge, other, ())
            if other.cluster != node.cluster and other.key in view.hot_keys:
                peer = dataclasses.replace(peer, probe=True)
            peers[peer_key] = peer
    local_via = ""
    if gateway_mode:
        local = view.locals.get(family)
        if local is None:
            raise ValueError(f"no local CIDR for the family of {underlay} (node {key})")
        devices.append(_device(key, local_dev, underlay, local, mtu))
        for other in own.nodes if hot else own.hot:
            if other.key == key or other.underlay(family) is None:
                continue
            peer = _local_peer(local, other)
            if other in own.hot:
                peer = dataclasses.replace(peer, probe=True)
            peers[types.entry_key(peer)] = peer
        active = own.active
        active_ul = active.underlay(family) if active is not None else None
        if active is not None and active.key != key and active_ul is not None:
            local_via = overlay_address(active_ul, local).partition("/")[0]

    if gateway_mode and (own.active is None or own.active.key != key):
        # Standby and internal nodes: everything of the other clusters via the active gateway.
        if local_via:
            for dst in _remote_destinations(view, node.cluster, family):
                routes[f"route/{dst}"] = types.RouteEntry(dst=dst, via=local_via, device=local_dev)
            if not hot:
                dst = _canonical(bridge)
                routes[f"route/{dst}"] = types.RouteEntry(dst=dst, via=local_via, device=local_dev)
    else:
        _bridge_routes(view, node, family, routes)


def _routed(cidrs: Iterable[str], global_cidrs: tuple[tuple[str, str], ...]) -> list[str]:
    """What the other clusters route for ``cidrs`` of a cluster with ``global_cidrs``: the global
    CIDR of a mapped one (by prefix, for a node CIDR inside a mapped range), else the CIDR."""
    return [_to_global(c, global_cidrs) or c for c in cidrs] if global_cidrs else list(cidrs)


@functools.lru_cache(maxsize=65536)
def _canonical(cidr: str) -> str:
    """types.canonical_cidr, cached: planning asks for the same few CIDRs over and over."""
    return types.canonical_cidr(cidr)


@functools.lru_cache(maxsize=65536)
def _to_global(text: str, global_cidrs: tuple[tuple[str, str], ...]) -> str | None:
    """types.to_global, cached (see _canonical)."""
    return types.to_global(text, global_cidrs)


def _bridge_routes(view: _View, node: types.NodeAnnouncement, family: int, routes: dict[str, types.RouteEntry]) -> None:
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
                _, other_routes = _contribution(bridge, other, cv.config.global_cidrs)
                routes.update(other_routes)
        gw = cv.active
        gw_ul = gw.underlay(family) if gw is not None else None
        if gw_ul is None:
            continue
        via = overlay_address(gw_ul, bridge).partition("/")[0]
        dsts: list[str] = _routed(cv.config.service_cidrs, cv.config.global_cidrs)
        if cv.gateway_mode:
            dsts += _routed(cv.config.pod_cidrs, cv.config.global_cidrs)
            dsts += _local_hosts(view, cv, family)
        for dst in dsts:
            if types.family_of(dst) != family:
                continue
            dst = _canonical(dst)
            routes[f"route/{dst}"] = types.RouteEntry(dst=dst, via=via, device=device)


def _remote_destinations(view: _View, own_cluster: str, family: int) -> list[str]:
    """Everything of ``family`` of the other clusters a non-active node of a gateway cluster
    routes to its gateway: whole pod CIDRs of clusters with somewhere to go, service CIDRs of
    clusters with an active gateway, and the vx-local hosts of gateway-mode clusters."""
    out: list[str] = []
    for name, cv in view.clusters.items():
        if name == own_cluster or family not in cv.families:
            continue
        if cv.gateway_mode:
            reachable = cv.active is not None and cv.active.underlay(family) is not None
        else:
            reachable = any(n.underlay(family) is not None for n in cv.nodes)
        if reachable:
            out += _routed(cv.config.pod_cidrs, cv.config.global_cidrs)
        if cv.active is not None and cv.active.underlay(family) is not None:
            out += _routed(cv.config.service_cidrs, cv.config.global_cidrs)
            if cv.gateway_mode:
                out += _local_hosts(view, cv, family)
    return [_canonical(d) for d in out if types.family_of(d) == family]


def _local_hosts(view: _View, cv: _ClusterView, family: int) -> tuple[str, ...]:
    """The vx-local addresses of ``family`` of the nodes of a gateway-mode cluster, as the fewest
    CIDRs that cover exactly them (and nothing else: two clusters' sets never share a CIDR).

    Why collapsed: every node outside the cluster routes these (the host-network return path,
    see "Routes"), so one route per node made every plan O(nodes of the fabric) in gateway mode
    too. A cluster's nodes usually sit in one underlay subnet, so their vx-local addresses (the
    underlay's host bits) are mostly contiguous and collapse into a few CIDRs per cluster."""
    key = (cv.config.name, family)
    hosts = view.local_hosts.get(key)
    if hosts is None:
        local = view.locals.get(family)
        underlays = tuple(ul for n in cv.nodes if (ul := n.underlay(family)) is not None)
        hosts = view.local_hosts[key] = _collapsed_hosts(underlays, local) if local is not None else ()
    return hosts


@functools.lru_cache(maxsize=4096)
def _collapsed_hosts(underlays: tuple[str, ...], local_cidr: str) -> tuple[str, ...]:
    """The vx-local addresses derived from ``underlays`` in ``local_cidr``, collapsed (cached:
    every viewer class asks for the same cluster)."""
    hosts = [ipaddress.ip_network(overlay_address(ul, local_cidr).partition("/")[0]) for ul in underlays]
    return tuple(str(n) for n in ipaddress.collapse_addresses(hosts))  # type: ignore[type-var]


def _family(ip: str) -> int:
    return types.family_of(ip)


def _device(key: types.NodeKey, name: str, underlay_ip: str, cidr: str, mtu: int) -> types.VxlanDevice:
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
    out: dict[int, str] = {}
    for c in cidrs:
        out.setdefault(ipaddress.ip_network(c, strict=False).version, c)
    return out


@functools.lru_cache(maxsize=65536)
def _local_peer(local_cidr: str, other: types.NodeAnnouncement) -> types.Peer:
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
def _contribution(
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
    dsts = _routed((c for c in other.pod_cidrs if types.family_of(c) == family), global_cidrs)
    routes = (types.RouteEntry(dst=_canonical(cidr), via=via, device=device) for cidr in dsts)
    return (types.entry_key(peer), peer), tuple((types.entry_key(r), r) for r in routes)


def plan_all(topology: types.Topology) -> dict[types.NodeKey, types.NodeState]:
    """Every node's plan (used by tests and by the reflector after a change)."""
    return {n.key: plan(topology, n.key) for n in topology.nodes}


# --------------------------------------------------------------------------------------------
# The plan as a union of parts (incremental planning)
# --------------------------------------------------------------------------------------------
#
# plan(topology, key) is the reference. For the reflector's hot path the same plan is also the
# disjoint union of *parts*, each keyed by its source:
#
# * ``self`` - the node's own devices, programs, translations, hairpin routes and (internal
#   nodes of gateway-mode clusters) the bridge-CIDR route to the active gateway;
# * ``node:CLUSTER/NAME`` - what one other node contributes: its peers and the routes that
#   name it (a P2P node's pod CIDRs);
# * ``cluster:NAME`` - the whole-cluster routes of another cluster: its service CIDRs, its pod
#   CIDRs where they are routed as a whole (gateway mode, or seen from a non-active node) and,
#   for a gateway-mode cluster, its nodes' vx-local addresses collapsed (so its signature
#   includes them: a join into a gateway-mode cluster changes that cluster's part).
#
# Except ``self``, a part depends on the viewer only through its :class:`ViewerClass` (cluster,
# families, role), so one computation serves every node of a class. A change of the topology
# changes the parts of a few sources (see :func:`node_signature`, :func:`cluster_signature`); the
# other parts are equal by construction, so a viewer's new plan is its old plan with the changed
# parts swapped, whatever the size of the fabric. The entry keys of different sources never
# collide in a validated topology (addresses, MACs and CIDRs are refused when they overlap), which
# is what makes the union well defined; tests/unit/test_incremental_planner.py checks the union
# against plan() over random topologies and changes.

SELF_SOURCE = "self"


def node_source(key: types.NodeKey) -> str:
    """The source name of the part node ``key`` contributes to other nodes' plans."""
    return f"node:{key}"


def cluster_source(name: str) -> str:
    """The source name of the whole-cluster routes of cluster ``name``."""
    return f"cluster:{name}"


@dataclasses.dataclass(frozen=True, slots=True)
class ViewerClass:
    """Everything about a viewer that its ``node:`` and ``cluster:`` parts depend on.

    Nodes of one class see every other node and cluster alike, so a part is computed once per
    class. For P2P nodes the role is irrelevant (their routes never depend on their own
    cluster's gateways) and normalised away, so a service-gateway move re-plans nobody fully.
    """

    cluster: str
    #: The families the node carries (its cluster's, where it has an underlay address).
    families: tuple[int, ...]
    gateway_mode: bool
    has_bridge: bool
    #: Active or standby gateway (gateway mode only).
    hot: bool
    #: The active gateway itself (gateway mode only): it routes over vx-bridge.
    active: bool
    #: Per family of ``families``: the own active gateway's vx-local address a non-active node of
    #: a gateway-mode cluster routes everything through ("" when there is none).
    local_vias: tuple[str, ...]

    @property
    def routes_via_local(self) -> bool:
        return self.gateway_mode and not self.active


def _viewer_class(view: _View, node: types.NodeAnnouncement) -> ViewerClass | None:
    own = view.clusters.get(node.cluster)
    if own is None:
        return None
    families = tuple(f for f in own.families if node.underlay(f) is not None)
    if not own.gateway_mode:
        return ViewerClass(node.cluster, families, False, True, False, False, ())
    hot = node.key in view.hot_keys
    active = own.active is not None and own.active.key == node.key
    vias: list[str] = []
    for f in families:
        ul = own.active.underlay(f) if own.active is not None and not active else None
        vias.append(overlay_address(ul, view.locals[f]).partition("/")[0] if ul is not None else "")
    return ViewerClass(node.cluster, families, True, hot, hot, active, tuple(vias))


def viewer_class(topology: types.Topology, key: types.NodeKey) -> ViewerClass | None:
    """The class of node ``key`` in ``topology`` (None: it plans nothing)."""
    view = _VIEWS.get(topology)
    node = view.by_key.get(key)
    if node is None:
        raise KeyError(f"node {key} is not in the topology")
    return _viewer_class(view, node)


def node_signature(topology: types.Topology, key: types.NodeKey) -> object:
    """What the ``node:`` part of ``key`` depends on besides the viewer class and the
    configuration: equal signatures in two topologies of one configuration mean equal parts for
    every viewer class. None for a node that is not in the topology."""
    return _node_signature(_VIEWS.get(topology), key)


def _node_signature(view: _View, key: types.NodeKey) -> object:
    x = view.by_key.get(key)
    if x is None:
        return None
    xc = view.clusters.get(x.cluster)
    if xc is None:
        return (x,)
    return (x, key in view.hot_keys)


def cluster_signature(topology: types.Topology, name: str) -> object:
    """What the ``cluster:`` part of ``name`` depends on besides the viewer class and the
    configuration (see :func:`node_signature`)."""
    return _cluster_signature(_VIEWS.get(topology), name)


def _cluster_signature(view: _View, name: str) -> object:
    cv = view.clusters.get(name)
    if cv is None:
        return None
    # A gateway-mode cluster's part also routes its nodes' vx-local addresses (collapsed).
    hosts = tuple(_local_hosts(view, cv, f) for f in cv.families) if cv.gateway_mode else ()
    return (cv.active, view.reach.get(name, frozenset()), hosts)


def plan_parts(topology: types.Topology, key: types.NodeKey) -> dict[str, dict[str, types.Entry]]:
    """Every non-empty part of node ``key``'s plan by source; their union is ``plan(topology,
    key)`` (tests check it). Raises KeyError for a node that is not in the topology."""
    view = _VIEWS.get(topology)
    node = view.by_key.get(key)
    if node is None:
        raise KeyError(f"node {key} is not in the topology")
    cls = _viewer_class(view, node)
    out: dict[str, dict[str, types.Entry]] = {}
    if cls is None:
        return out
    counter = PartCounter()
    parts = {SELF_SOURCE: _self_part(view, node, cls)}
    for other in topology.nodes:
        if other.key != key:
            parts[node_source(other.key)] = _node_part(view, cls, other, counter)
    for c in view.clusters:
        parts[cluster_source(c)] = _cluster_part(view, cls, c, counter)
    return {s: p for s, p in parts.items() if p}


class PartCounter:
    """Planner work done, counted (not timed): the scaling tests assert on these."""

    __slots__ = ("full_plans", "parts")

    def __init__(self) -> None:
        self.parts = 0
        self.full_plans = 0


def _route(dst: str, via: str, device: str) -> tuple[str, types.RouteEntry]:
    return f"route/{dst}", types.RouteEntry(dst=dst, via=via, device=device)


def _self_part(view: _View, node: types.NodeAnnouncement, cls: ViewerClass) -> dict[str, types.Entry]:
    own = view.clusters[cls.cluster]
    entries: list[types.Entry] = []
    glob = own.config.global_cidrs
    if glob:
        entries += [types.Translation(lo, gl) for lo, gl in glob]
        entries.append(types.Program(types.HAIRPIN_DEVICE, types.PROGRAM_HAIRPIN))
        for _lo, gl in glob:
            if types.family_of(gl) in cls.families:
                unspecified = "0.0.0.0" if types.family_of(gl) == 4 else "::"
                entries.append(types.RouteEntry(dst=gl, via=unspecified, device=types.HAIRPIN_DEVICE))
    for i, f in enumerate(cls.families):
        underlay = node.underlay(f)
        assert underlay is not None
        mtu = tunnel_mtu(underlay, node.underlay_mtu)
        if cls.has_bridge:
            entries.append(_device(node.key, types.bridge_device(f), underlay, view.bridges[f], mtu))
            if glob:
                entries.append(types.Program(types.bridge_device(f), types.PROGRAM_TUNNEL))
        if cls.gateway_mode:
            entries.append(_device(node.key, types.local_device(f), underlay, view.locals[f], mtu))
            if not cls.active and not cls.hot and cls.local_vias[i]:
                dst = _canonical(view.bridges[f])
                entries.append(types.RouteEntry(dst=dst, via=cls.local_vias[i], device=types.local_device(f)))
    return {types.entry_key(e): e for e in entries}


def _node_part(
    view: _View, cls: ViewerClass, x: types.NodeAnnouncement, counter: PartCounter
) -> dict[str, types.Entry]:
    """What node ``x`` contributes to the plan of a node of class ``cls`` (not ``x`` itself)."""
    counter.parts += 1
    out: dict[str, types.Entry] = {}
    xc = view.clusters.get(x.cluster)
    if xc is None:
        return out
    same = x.cluster == cls.cluster
    x_hot = x.key in view.hot_keys
    x_bridge = not xc.gateway_mode or x_hot
    for f in cls.families:
        bridge = view.bridges[f]
        x_ul = x.underlay(f)
        if cls.has_bridge and x_bridge and not (cls.gateway_mode and same) and view.supports(x, f):
            (peer_key, peer), _ = _contribution(bridge, x, ())
            if not same and x_hot:
                peer = dataclasses.replace(peer, probe=True)
            out[peer_key] = peer
        if cls.gateway_mode and same and (cls.hot or x_hot) and x_ul is not None:
            peer = _local_peer(view.locals[f], x)
            if x_hot:
                peer = dataclasses.replace(peer, probe=True)
            out[types.entry_key(peer)] = peer
        if same or f not in xc.families or x_ul is None:
            continue
        if not cls.routes_via_local and not xc.gateway_mode:
            _, routes = _contribution(bridge, x, xc.config.global_cidrs)
            out.update(routes)
    return out


def _cluster_part(view: _View, cls: ViewerClass, name: str, counter: PartCounter) -> dict[str, types.Entry]:
    """The whole-cluster routes of cluster ``name`` in the plan of a node of class ``cls``."""
    counter.parts += 1
    out: dict[str, types.Entry] = {}
    cv = view.clusters.get(name)
    if cv is None or name == cls.cluster:
        return out
    glob = cv.config.global_cidrs
    for i, f in enumerate(cls.families):
        if f not in cv.families:
            continue
        gw_ul = cv.active.underlay(f) if cv.active is not None else None
        dsts: list[str] = []
        if cls.routes_via_local:
            via = cls.local_vias[i]
            if not via:
                continue
            device = types.local_device(f)
            reachable = gw_ul is not None if cv.gateway_mode else f in view.reach.get(name, frozenset())
            if reachable:
                dsts += _routed(cv.config.pod_cidrs, glob)
            if gw_ul is not None:
                dsts += _routed(cv.config.service_cidrs, glob)
                if cv.gateway_mode:
                    dsts += _local_hosts(view, cv, f)
        else:
            if gw_ul is None:
                continue
            via = overlay_address(gw_ul, view.bridges[f]).partition("/")[0]
            device = types.bridge_device(f)
            dsts += _routed(cv.config.service_cidrs, glob)
            if cv.gateway_mode:
                dsts += _routed(cv.config.pod_cidrs, glob)
                dsts += _local_hosts(view, cv, f)
        for dst in dsts:
            if types.family_of(dst) == f:
                k, r = _route(_canonical(dst), via, device)
                out[k] = r
    return out


def state_from_entries(entries: Mapping[str, types.Entry]) -> types.NodeState:
    """A NodeState from entries already keyed by :func:`types.entry_key` (the layout of
    ``NodeState.from_entries`` without re-deriving every key)."""
    ordered = [entries[k] for k in sorted(entries)]
    return types.NodeState(
        devices=tuple(e for e in ordered if isinstance(e, types.VxlanDevice)),
        peers=tuple(e for e in ordered if isinstance(e, types.Peer)),
        routes=tuple(e for e in ordered if isinstance(e, types.RouteEntry)),
        translations=tuple(e for e in ordered if isinstance(e, types.Translation)),
        programs=tuple(e for e in ordered if isinstance(e, types.Program)),
    )


def diff_entries(old: Mapping[str, types.Entry], new: Mapping[str, types.Entry]) -> types.StateDelta:
    """:func:`types.diff_states` on keyed entries."""
    upserts = tuple(new[k] for k in sorted(new) if old.get(k) != new[k])
    removals = tuple(k for k in sorted(old) if k not in new)
    return types.StateDelta(upserts, removals)


class IncrementalPlanner:
    """The plans of every node of a changing topology, kept up to date part by part.

    :meth:`update` adopts a new topology and returns, per node whose plan changed, the delta
    from its previous plan (equal to ``diff_states(plan(old, key), plan(new, key))``). Work per
    update is O(nodes) cheap signature compares to find what changed, then per node O(what
    changed for it): the parts of the changed sources are computed once per viewer class, and a
    viewer only swaps them in. A viewer whose own class or announcement changed, a new node and
    every node after a configuration change are planned in full with :func:`plan`.

    Deltas are shared: viewers of one class that see the same changes get the very same
    StateDelta object, so the caller can encode one message for all of them.
    """

    def __init__(self) -> None:
        self.topology: types.Topology | None = None
        self._view: _View | None = None
        self._entries: dict[types.NodeKey, dict[str, types.Entry]] = {}
        self._config: types.FabricConfig | None = None
        #: Work counters (see PartCounter), cumulative.
        self.counter = PartCounter()

    def entries(self, key: types.NodeKey) -> Mapping[str, types.Entry]:
        """The current plan of ``key`` as keyed entries (empty for an unknown node)."""
        return self._entries.get(key, {})

    def state(self, key: types.NodeKey) -> types.NodeState:
        """The current plan of ``key``, built on demand (not cached: it is needed once per
        snapshot, and a cached copy of every plan doubled the reflector's memory per node)."""
        return state_from_entries(self._entries.get(key, {}))

    def size(self, key: types.NodeKey) -> int:
        return len(self._entries.get(key, ()))

    def planned(self, key: types.NodeKey, ann: types.NodeAnnouncement) -> bool:
        """Is ``ann`` (this very announcement) planned already?"""
        return self._view is not None and self._view.by_key.get(key) == ann

    def update(self, new: types.Topology) -> dict[types.NodeKey, types.StateDelta]:
        """Adopt ``new``; returns the delta of every node whose plan changed (a new node's delta
        is its whole plan). Nodes no longer in the topology are forgotten."""
        old_view, old_config = self._view, self._config
        view = _VIEWS.get(new)
        self.topology, self._view, self._config = new, view, new.config
        for gone in [k for k in self._entries if k not in view.by_key]:
            del self._entries[gone]
        if old_view is None or old_config != new.config:
            return {n.key: d for n in new.nodes if (d := self._full(new, n.key))}

        # Which sources changed: O(nodes) cheap compares (identity first), once per update.
        changed_nodes = [
            key
            for key in view.by_key.keys() | old_view.by_key.keys()
            if _node_signature(old_view, key) != _node_signature(view, key)
        ]
        changed_clusters = [
            c for c in view.clusters if _cluster_signature(old_view, c) != _cluster_signature(view, c)
        ]
        changed_set = set(changed_nodes)

        # Per class: the old and new union of the changed parts, computed once.
        class_changes: dict[ViewerClass, tuple[dict[str, types.Entry], dict[str, types.Entry]]] = {}
        per_node: dict[tuple[ViewerClass, types.NodeKey], tuple[dict[str, types.Entry], dict[str, types.Entry]]] = {}
        deltas: dict[tuple[ViewerClass, types.NodeKey | None], types.StateDelta] = {}
        out: dict[types.NodeKey, types.StateDelta] = {}
        for node in new.nodes:
            key = node.key
            old_node = old_view.by_key.get(key)
            cls = _viewer_class(view, node)
            if old_node is None or old_node != node or key not in self._entries or cls != _viewer_class(
                old_view, old_node
            ):
                d = self._full(new, key)
                if d:
                    out[key] = d
                continue
            if cls is None or not (changed_nodes or changed_clusters):
                continue
            excl = key if key in changed_set else None
            delta = deltas.get((cls, excl))
            if delta is None:
                changes = class_changes.get(cls)
                if changes is None:
                    changes = self._changes(old_view, view, cls, changed_nodes, changed_clusters, per_node)
                    class_changes[cls] = changes
                old_u, new_u = changes
                if excl is not None:
                    # The viewer's own node part is not in its plan.
                    mine_old, mine_new = per_node[(cls, excl)]
                    old_u = {k: e for k, e in old_u.items() if k not in mine_old}
                    new_u = {k: e for k, e in new_u.items() if k not in mine_new}
                delta = diff_entries(old_u, new_u)
                deltas[(cls, excl)] = delta
            if delta:
                self._apply(key, delta)
                out[key] = delta
        return out

    def _changes(
        self,
        old_view: _View,
        view: _View,
        cls: ViewerClass,
        changed_nodes: list[types.NodeKey],
        changed_clusters: list[str],
        per_node: dict[tuple[ViewerClass, types.NodeKey], tuple[dict[str, types.Entry], dict[str, types.Entry]]],
    ) -> tuple[dict[str, types.Entry], dict[str, types.Entry]]:
        old_u: dict[str, types.Entry] = {}
        new_u: dict[str, types.Entry] = {}
        c = self.counter
        for key in changed_nodes:
            o, n = old_view.by_key.get(key), view.by_key.get(key)
            po = _node_part(old_view, cls, o, c) if o is not None else {}
            pn = _node_part(view, cls, n, c) if n is not None else {}
            per_node[(cls, key)] = (po, pn)
            old_u.update(po)
            new_u.update(pn)
        for name in changed_clusters:
            old_u.update(_cluster_part(old_view, cls, name, c))
            new_u.update(_cluster_part(view, cls, name, c))
        return old_u, new_u

    def _full(self, topology: types.Topology, key: types.NodeKey) -> types.StateDelta:
        self.counter.full_plans += 1
        new = plan(topology, key).entries()
        delta = diff_entries(self._entries.get(key, {}), new)
        self._entries[key] = new
        return delta

    def _apply(self, key: types.NodeKey, delta: types.StateDelta) -> None:
        entries = self._entries[key]
        for k in delta.removals:
            del entries[k]
        for e in delta.upserts:
            entries[types.entry_key(e)] = e
