"""Admission: whether an announcement or a configuration may join the topology, and if not, why.

Each refusal names its class (:class:`~fabric.control.api.RejectionReason`) and says what was
wrong. :class:`NodeIndex` keeps the lookups (supernets, overlay addresses, MACs) that make
checking one announcement O(its own items x log n) instead of a scan of every node.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any

from fabric import types, validation
from fabric.control import api
from fabric.control.planner import (
    BRIDGE_DEFAULTS,
    LOCAL_DEFAULTS,
    MAX_UNDERLAY_MTU,
    MIN_TUNNEL_MTU,
    SUPPORTED_MODES,
    bridge_cidr_for,
    device_mac,
    local_cidr_for,
    network,
    overlay_address,
    overlay_point,
    tunnel_mtu,
)

_log = logging.getLogger(__name__)

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
        ip = _parsed_ip(text)  # cached: NodeIndex.add parses it again once admitted
        if ip is None:
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
    # vx-local addresses of gateway-mode nodes are routed (as prefixes) by the other clusters.
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
    point = overlay_point(underlay, cidr)  # the same address as an int (cached, not parsed again)
    net = network(cidr)
    mine_ip = type(net.network_address)(point)
    if point in (int(net.network_address), int(net.broadcast_address)) and net.num_addresses > 2:
        reasons.append(Refusal(
            _R.OVERLAY,
            f"overlay address {mine_ip} derived from underlay {underlay} is the network or"
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
            f"overlay address {mine_ip} derived from underlay {underlay} collides with node"
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
    for field, cidrs, defaults in (("bridgeCIDRs", config.bridge_cidrs, BRIDGE_DEFAULTS),
                                   ("localCIDRs", config.local_cidrs, LOCAL_DEFAULTS)):  # fmt: skip
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
    """Is ``net`` inside ``cidr`` (a configured range: parsed once, not once per node)?"""
    outer = _parsed_net(cidr)
    if outer.version != net.version:
        return False
    return net.subnet_of(outer)  # type: ignore[arg-type]


def config_problems(config: types.FabricConfig) -> list[str]:
    """Why ``config`` cannot be planned from at all (empty when it can); the checks are the
    configuration's one set of semantic checks, :func:`fabric.validation.config_problems`."""
    return validation.config_problems(config)
