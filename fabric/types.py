"""Plain immutable values shared by every layer of the fabric.

This module sits at the bottom of the import graph: ``fabric.control``, ``fabric.netlink``,
the agent, the add-ons and the tools may all import it, and it imports nothing of ours.

Two families of values live here:

* the **fabric configuration** and **node announcements** the reflector plans from
  (:class:`ClusterConfig`, :class:`FabricConfig`, :class:`NodeAnnouncement`), and
* the **planned state of one node** (:class:`NodeState`): the vxlan devices it must have,
  the peers it tunnels to (one static neighbour + one static FDB entry each) and the routes
  it sends through them.

A :class:`NodeState` is a set of *entries*, each with a stable string key (see
:func:`entry_key`). The control channel ships a snapshot as the full set and every later change
as a :class:`StateDelta` (upserts + removed keys), so a node join costs other agents a few
entries, not a full snapshot.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import sys
from collections.abc import Iterable, Mapping

#: Inter-cluster vxlan device (Kosmos-compatible name, VNI and UDP port).
VX_BRIDGE = "vx-bridge"
VX_BRIDGE_VNI = 54
VX_BRIDGE_PORT = 4876
#: Intra-cluster device of gateway-mode clusters: internal nodes reach their gateway over it.
VX_LOCAL = "vx-local"
VX_LOCAL_VNI = 55
VX_LOCAL_PORT = 4877
#: IPv6 twins (DESIGN.md): the same roles for IPv6 traffic, carried over the IPv6 underlay. A
#: device carries one family end to end (inner and outer), so a dual-stack node has both pairs.
VX_BRIDGE6 = "vx-bridge-6"
VX_BRIDGE6_VNI = 64
VX_BRIDGE6_PORT = 4866
VX_LOCAL6 = "vx-local-6"
VX_LOCAL6_VNI = 65
VX_LOCAL6_PORT = 4867
#: Every tunnel device: name -> (VNI, UDP port, address family it carries).
TUNNEL_DEVICES: dict[str, tuple[int, int, int]] = {
    VX_BRIDGE: (VX_BRIDGE_VNI, VX_BRIDGE_PORT, 4),
    VX_LOCAL: (VX_LOCAL_VNI, VX_LOCAL_PORT, 4),
    VX_BRIDGE6: (VX_BRIDGE6_VNI, VX_BRIDGE6_PORT, 6),
    VX_LOCAL6: (VX_LOCAL6_VNI, VX_LOCAL6_PORT, 6),
}
#: VXLAN over an IPv4 underlay costs 50 bytes (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
VXLAN_OVERHEAD_V4 = 50
#: Over an IPv6 underlay the outer header is 40 bytes, hence 70.
VXLAN_OVERHEAD_V6 = 70

#: Default overlay range the vx-bridge addresses are derived from (RFC 6598 shared space, not a
#: public range as Kosmos' 220.0.0.0/8 is). Configurable per fabric with ``bridgeCIDRs``.
DEFAULT_BRIDGE_CIDR_V4 = "100.64.0.0/10"
#: Default overlay range of the vx-local addresses (nodes of gateway-mode clusters). Kosmos used
#: the public 210.0.0.0/8; we take 198.19.0.0/16, the upper half of the RFC 2544 benchmarking
#: block 198.18.0.0/15: never routed on the Internet, disjoint from the bridge default and from
#: the lab's default underlay 198.18.0.0/16. Host bits come from the underlay address as for
#: vx-bridge, so the 16 host bits keep every address of a /16 underlay distinct. Configurable per
#: fabric with ``localCIDRs``; the topology validation refuses overlaps with anything else.
DEFAULT_LOCAL_CIDR_V4 = "198.19.0.0/16"
#: IPv6 defaults, unique local addresses (RFC 4193) that mirror the IPv4 choices: the bridge range
#: ``fd00:100:64::/64`` (as 100.64/10), the vx-local range ``fd00:198:19::/64`` (as 198.19/16), both
#: disjoint from the lab's default IPv6 underlay ``fd00:198:18::/64`` (as 198.18/16). A /64 keeps
#: the 64 host bits of the underlay address, so the nodes of one /64 underlay never collide. A
#: family missing from ``bridgeCIDRs`` / ``localCIDRs`` takes its default (:func:`with_defaults`),
#: so an IPv4-only file plans exactly as before and a dual-stack one needs no extra key.
DEFAULT_BRIDGE_CIDR_V6 = "fd00:100:64::/64"
DEFAULT_LOCAL_CIDR_V6 = "fd00:198:19::/64"
#: Address families by the names Kubernetes uses (``ipFamilies``).
FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}


def family_of(text: str) -> int:
    """4 or 6: the family of an address or CIDR text (no parse: the hot paths call it)."""
    return 6 if ":" in text else 4


def bridge_device(family: int) -> str:
    """The inter-cluster tunnel device of ``family``."""
    return VX_BRIDGE6 if family == 6 else VX_BRIDGE


def local_device(family: int) -> str:
    """The intra-cluster (gateway-mode) tunnel device of ``family``."""
    return VX_LOCAL6 if family == 6 else VX_LOCAL


def derive_families(cidrs: Iterable[str]) -> tuple[int, ...]:
    """The families of ``cidrs`` in order of first appearance; ``(4,)`` when there are none. The
    default of a cluster's ``ipFamilies``: its pod CIDRs say what it runs, the first is primary."""
    out: list[int] = []
    for c in cidrs:
        f = family_of(c)
        if f not in out:
            out.append(f)
    return tuple(out) or (4,)


def with_defaults(cidrs: Iterable[str], defaults: Iterable[str]) -> tuple[str, ...]:
    """``cidrs`` plus the default of every family they lack (the effective bridge/local ranges)."""
    given = tuple(cidrs)
    have = {family_of(c) for c in given}
    return given + tuple(d for d in defaults if family_of(d) not in have)


def first_per_family(cidrs: Iterable[str]) -> dict[int, str]:
    """The first of ``cidrs`` of each family: the one the fabric uses where a range is
    configured per family (bridge and local CIDRs), so the planner and every check agree."""
    out: dict[int, str] = {}
    for c in cidrs:
        out.setdefault(family_of(c), c)
    return out


def graft(host: int, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    """The address (as an int) with ``net``'s network bits and the host bits of ``host``: how
    a node's overlay addresses are derived from its underlay address, and subnets' images."""
    return int(net.network_address) | (host & int(net.hostmask))


def local_image(node_cidr: str, local_cidr: str) -> str:
    """The image of the underlay subnet ``node_cidr`` in the vx-local range ``local_cidr``: the
    vx-local addresses of all its addresses (network bits of the local CIDR, host bits of the
    underlay address, as :func:`fabric.control.planner.overlay_address` derives one) as one CIDR.
    The image of ``10.0.5.0/24`` in ``198.19.0.0/16`` is ``198.19.5.0/24``; a subnet wider than
    the local CIDR's host part maps onto all of it. ValueError for unparsable input or mixed
    families."""
    net = ipaddress.ip_network(node_cidr, strict=False)
    local = ipaddress.ip_network(local_cidr, strict=False)
    if net.version != local.version:
        raise ValueError(f"node CIDR {node_cidr} and local CIDR {local_cidr} are of different families")
    base = graft(int(net.network_address), local)
    return str(ipaddress.ip_network((base, max(net.prefixlen, local.prefixlen)), strict=False))


class ClusterMode(enum.StrEnum):
    """How a cluster connects to the others."""

    P2P = "p2p"
    GATEWAY = "gateway"


#: The largest ``activeGateways`` a cluster may ask for (a resilient nexthop group's buckets are
#: spread over its members; more than a few gateways is not what the feature was built and tested for).
MAX_ACTIVE_GATEWAYS = 8


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterConfig:
    """One cluster as the fabric configuration declares it."""

    name: str
    mode: ClusterMode
    pod_cidrs: tuple[str, ...]
    service_cidrs: tuple[str, ...] = ()
    #: Gateway candidates (node names), in order of preference; empty = every node may be one.
    gateways: tuple[str, ...] = ()
    #: Global IP: ``(local CIDR, global CIDR)`` pairs, sorted by local CIDR (see
    #: :func:`frozen_mapping`). Each local CIDR is one of ``pod_cidrs``/``service_cidrs`` and
    #: other clusters see and route it only by its global CIDR (same size, 1:1 by prefix).
    global_cidrs: tuple[tuple[str, str], ...] = ()
    #: ``ipFamilies`` (4, 6), primary first; empty = derived from ``pod_cidrs`` (see
    #: :attr:`families`), so configurations written before dual stack mean what they meant.
    ip_families: tuple[int, ...] = ()
    #: Discovery mode (a Cluster resource without ``podCIDRs``): ``pod_cidrs`` is the union of
    #: the pod CIDRs its admitted nodes announced, so a node's pod CIDR is not checked against
    #: it (a new node's range is outside it until the union is recomputed), only against what
    #: other clusters and the fabric use. False (the default): ``pod_cidrs`` is declared and
    #: every node's pod CIDR must lie inside it, as in the topology file.
    discover_pod_cidrs: bool = False
    #: Active/active (issue 21 section 2): how many gateways of a gateway-mode cluster carry
    #: traffic at once (``activeGateways``). 1 (the default) is the classic one active gateway
    #: plus a hot standby; N > 1 elects N actives that remote clusters and the cluster's own
    #: nodes reach through a resilient nexthop group (see :mod:`fabric.control.active_active`).
    active_gateways: int = 1
    #: Gateway mode (``nodeCIDRs``): the subnets its nodes' underlay addresses are in. Other
    #: clusters route its vx-local addresses as the image of these in the fabric's local CIDR
    #: (:func:`fabric.control.planner.local_hosts`), which no join or leave inside them and no
    #: other cluster's node changes; empty = the widest prefixes around the nodes' addresses that
    #: hold no other cluster's (a join inside them changes nothing either, but another cluster's
    #: node among them splits them).
    node_cidrs: tuple[str, ...] = ()

    @property
    def families(self) -> tuple[int, ...]:
        """The address families the cluster runs, primary first."""
        return self.ip_families or derive_families(self.pod_cidrs)


@dataclasses.dataclass(frozen=True, slots=True)
class FabricConfig:
    """Fabric-wide configuration the reflector plans from (the topology file minus lab-only keys)."""

    clusters: tuple[ClusterConfig, ...]
    bridge_cidrs: tuple[str, ...] = (DEFAULT_BRIDGE_CIDR_V4,)
    #: vx-local overlay ranges (see DEFAULT_LOCAL_CIDR_V4).
    local_cidrs: tuple[str, ...] = (DEFAULT_LOCAL_CIDR_V4,)
    #: Nodes the configuration expects (``cluster/node``); lets a restarted reflector stop
    #: holding back END_OF_SNAPSHOT as soon as all of them have announced themselves.
    expected_nodes: tuple[str, ...] = ()

    def cluster(self, name: str) -> ClusterConfig | None:
        for c in self.clusters:
            if c.name == name:
                return c
        return None


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class NodeKey:
    """A node's identity in the fabric: node names are unique only inside their cluster."""

    cluster: str
    name: str

    def __str__(self) -> str:
        return f"{self.cluster}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> NodeKey:
        cluster, sep, name = text.partition("/")
        if not sep or not cluster or not name or "/" in name:
            raise ValueError(f"node key {text!r} is not of the form CLUSTER/NODE")
        return cls(cluster, name)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeAnnouncement:
    """What an agent tells the reflector about its node when it opens a session."""

    cluster: str
    name: str
    underlay_ip: str
    pod_cidrs: tuple[str, ...]
    #: MTU of the underlay interface; tunnel devices get this minus the vxlan overhead.
    underlay_mtu: int = 1500
    capabilities: tuple[str, ...] = ()
    #: Underlay addresses of the node's other families (a dual-stack node: its IPv6 address when
    #: ``underlay_ip`` is IPv4). At most one address per family, none of ``underlay_ip``'s family.
    extra_underlay_ips: tuple[str, ...] = ()
    #: The node's identity, made once from ``cluster`` and ``name`` (not an argument, not compared):
    #: every pass over the nodes asks for it, about 1.4 million times in a bring-up of 10,000
    #: agents, and a NodeKey made per call cost the reflector ~1 s of it (issue 21, profiled).
    key: NodeKey = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", NodeKey(self.cluster, self.name))

    @property
    def underlay_ips(self) -> tuple[str, ...]:
        return (self.underlay_ip, *self.extra_underlay_ips)

    def underlay(self, family: int) -> str | None:
        """The node's underlay address of ``family`` (None: it has none)."""
        for ip in (self.underlay_ip, *self.extra_underlay_ips):
            if family_of(ip) == family:
                return ip
        return None


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class GatewayRole:
    """The reflector's decision for one cluster: its active gateway and its hot standby.

    Both are node names of the cluster (``standby`` may be empty). The active gateway is the
    cluster's only tunnel endpoint towards other clusters (gateway mode) and the entry point of
    its service CIDRs (every mode); the standby holds the same devices and peers as the active
    one, so moving the role to it changes routes only. One value per cluster means the planned
    state can never name two active gateways for one cluster.
    """

    cluster: str
    active: str
    standby: str = ""
    #: Active/active: the further active gateways beside ``active`` (empty with the default
    #: ``activeGateways: 1``), most preferred first. ``active`` stays the first of them, so
    #: everything that knows only one active gateway (service routes of old agents, status)
    #: still names a node that forwards.
    also_active: tuple[str, ...] = ()

    @property
    def actives(self) -> tuple[str, ...]:
        """Every active gateway, ``active`` first."""
        return (self.active, *self.also_active) if self.active else self.also_active


@dataclasses.dataclass(frozen=True, slots=True)
class Topology:
    """Everything the planner needs: the configuration, the announced nodes and the gateway
    roles the reflector elected (from its liveness view; see ``election.elect``).

    ``nodes`` and ``roles`` are kept sorted so equal topologies compare (and hash) equal, and
    ``plan`` stays a pure function of this value.
    """

    config: FabricConfig
    nodes: tuple[NodeAnnouncement, ...] = ()
    roles: tuple[GatewayRole, ...] = ()

    def with_roles(self, roles: Iterable[GatewayRole]) -> Topology:
        return dataclasses.replace(self, roles=tuple(sorted(roles)))

    def role(self, cluster: str) -> GatewayRole | None:
        for r in self.roles:
            if r.cluster == cluster:
                return r
        return None

    def with_node(self, node: NodeAnnouncement) -> Topology:
        rest = [n for n in self.nodes if n.key != node.key]
        return dataclasses.replace(self, nodes=tuple(sorted([*rest, node], key=lambda n: n.key)))

    def without_node(self, key: NodeKey) -> Topology:
        return dataclasses.replace(self, nodes=tuple(n for n in self.nodes if n.key != key))

    def node(self, key: NodeKey) -> NodeAnnouncement | None:
        for n in self.nodes:
            if n.key == key:
                return n
        return None


# --------------------------------------------------------------------------------------------
# The host's links as the underlay chooser sees them
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class HostAddress:
    """One address of a host link. This and the two below are what the underlay chooser
    (:func:`fabric.nodeinfo.choose_underlay`) reads from the host and what
    :mod:`fabric.netlink.underlay` fills from the kernel. They live here, below both, so that
    the dataplane does not import ``fabric.nodeinfo`` and ``fabric.nodeinfo`` (which the Cluster
    schema and so the control plane use) does not import the dataplane."""

    address: str
    #: 4 or 6.
    family: int
    #: ``global``, ``site``, ``link``, ``host`` or ``nowhere``.
    scope: str = "global"


@dataclasses.dataclass(frozen=True, slots=True)
class HostLink:
    name: str
    up: bool
    loopback: bool = False
    #: ``IFLA_INFO_KIND`` (``veth``, ``bridge``, ``vxlan``...), "" for a physical NIC.
    kind: str = ""
    addresses: tuple[HostAddress, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class RouteHint:
    """What ``ip route get TARGET`` answered: the source address and output interface, or why not."""

    target: str
    source: str = ""
    interface: str = ""
    #: The kernel's refusal (``Network is unreachable``...), "" when it found a route.
    error: str = ""


# --------------------------------------------------------------------------------------------
# Planned state of one node
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class VxlanDevice:
    """A vxlan tunnel device the node must have, fully specified (no kernel defaults relied on)."""

    name: str
    vni: int
    port: int
    #: Locally administered unicast MAC, derived from the node identity: stable across plans.
    mac: str
    #: Overlay interface address with prefix length, e.g. ``100.82.0.11/10``.
    address: str
    #: Underlay source address; the agent binds the device to the interface holding it.
    local: str
    mtu: int


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    """A tunnel peer on ``device``: one static neighbour (overlay IP -> MAC) and one static FDB
    entry (MAC -> underlay IP). Routes name the peer by its overlay IP."""

    device: str
    overlay_ip: str
    mac: str
    underlay_ip: str
    #: ``cluster/node`` of the peer, for humans (status, diagnostics); not programmed.
    node: str = ""
    #: The agent watches this peer with probes through the tunnel and reports when it stops
    #: answering (set for active and standby gateways the node depends on).
    probe: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class RouteEntry:
    """Route ``dst`` (a canonical CIDR) through the peer whose overlay IP is ``via``."""

    dst: str
    via: str
    device: str
    #: Active/active: every equal next hop (sorted overlay IPs of the destination's active
    #: gateways, ``via`` among them) when there are two or more; empty for a single next hop.
    #: The agent programs them as one resilient nexthop group; a consumer that knows only
    #: ``via`` still routes through a gateway that forwards.
    vias: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Translation:
    """Global IP: the node translates ``local`` (a CIDR of its own cluster) to ``global_`` (same
    size, 1:1 by prefix) on its tunnel devices and hairpin device, statelessly in both ways."""

    local: str
    global_: str


@dataclasses.dataclass(frozen=True, slots=True)
class Program:
    """A translator program the node runs on ``device``: ``point`` is :data:`PROGRAM_TUNNEL`
    (ingress global -> local, egress local -> global on an inter-cluster tunnel device) or
    :data:`PROGRAM_HAIRPIN` (the hairpin device, created by the agent with it)."""

    device: str
    point: str


Entry = VxlanDevice | Peer | RouteEntry | Translation | Program

#: Program points (see :class:`Program`).
PROGRAM_TUNNEL = "tunnel"
PROGRAM_HAIRPIN = "hairpin"
#: The hairpin device (kind ifb: NOARP, no carrier needed): the own cluster's global CIDRs are
#: routed to it on every node of a cluster that has global CIDRs, so a pod reaches a pod of its
#: own cluster through that pod's global address (a Kosmos TODO).
HAIRPIN_DEVICE = "kf-hairpin"


def entry_key(entry: Entry) -> str:
    """Stable identity of an entry: two entries with the same key replace each other.

    Interned: the reflector keeps every node's plan keyed by these, and in a P2P fabric of N
    nodes the same N keys appear in N plans; one shared string per key instead of N copies
    was most of the reflector's memory per node."""
    if isinstance(entry, VxlanDevice):
        return sys.intern(f"device/{entry.name}")
    if isinstance(entry, Peer):
        return sys.intern(f"peer/{entry.device}/{entry.overlay_ip}")
    if isinstance(entry, RouteEntry):
        return sys.intern(f"route/{entry.dst}")
    if isinstance(entry, Translation):
        return sys.intern(f"translation/{entry.local}")
    if isinstance(entry, Program):
        return sys.intern(f"program/{entry.device}/{entry.point}")
    raise TypeError(f"not a NodeState entry: {entry!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class NodeState:
    """The complete planned state of one node. Entries are sorted by key, so equal states
    compare equal and the same topology always yields byte-identical plans."""

    devices: tuple[VxlanDevice, ...] = ()
    peers: tuple[Peer, ...] = ()
    routes: tuple[RouteEntry, ...] = ()
    translations: tuple[Translation, ...] = ()
    programs: tuple[Program, ...] = ()

    @classmethod
    def from_entries(cls, entries: Iterable[Entry]) -> NodeState:
        by_key: dict[str, Entry] = {}
        for e in entries:
            by_key[entry_key(e)] = e
        ordered = [by_key[k] for k in sorted(by_key)]
        return cls(
            devices=tuple(e for e in ordered if isinstance(e, VxlanDevice)),
            peers=tuple(e for e in ordered if isinstance(e, Peer)),
            routes=tuple(e for e in ordered if isinstance(e, RouteEntry)),
            translations=tuple(e for e in ordered if isinstance(e, Translation)),
            programs=tuple(e for e in ordered if isinstance(e, Program)),
        )

    def entries(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        every: tuple[Entry, ...] = (*self.devices, *self.peers, *self.routes, *self.translations, *self.programs)
        for e in every:
            out[entry_key(e)] = e
        return out

    def __len__(self) -> int:
        return len(self.devices) + len(self.peers) + len(self.routes) + len(self.translations) + len(self.programs)


@dataclasses.dataclass(frozen=True, slots=True)
class StateDelta:
    """Change from one NodeState to the next: entries to add or replace, keys to remove."""

    upserts: tuple[Entry, ...] = ()
    removals: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.upserts or self.removals)

    def __len__(self) -> int:
        return len(self.upserts) + len(self.removals)


def diff_states(old: NodeState, new: NodeState) -> StateDelta:
    """Delta turning ``old`` into ``new``; O(n) in the number of entries."""
    old_e, new_e = old.entries(), new.entries()
    upserts = tuple(new_e[k] for k in sorted(new_e) if old_e.get(k) != new_e[k])
    removals = tuple(k for k in sorted(old_e) if k not in new_e)
    return StateDelta(upserts, removals)


def apply_delta(state: NodeState, delta: StateDelta) -> NodeState:
    """``state`` with ``delta`` applied (what an agent does with each delta it receives)."""
    entries = state.entries()
    for k in delta.removals:
        entries.pop(k, None)
    for e in delta.upserts:
        entries[entry_key(e)] = e
    return NodeState.from_entries(entries.values())


# --------------------------------------------------------------------------------------------
# Address helpers used by the planner, the validator and the lab
# --------------------------------------------------------------------------------------------


def canonical_cidr(text: str) -> str:
    """``10.10.1.7/16`` -> ``10.10.0.0/16``: the kernel reports routes in network form, so
    anything we compare against it must be canonical or the diff never converges (a Kosmos
    lesson)."""
    return str(ipaddress.ip_network(text, strict=False))


def cidrs_overlap(a: str, b: str) -> bool:
    na, nb = ipaddress.ip_network(a, strict=False), ipaddress.ip_network(b, strict=False)
    return na.version == nb.version and na.overlaps(nb)


def to_global(text: str, mappings: Iterable[tuple[str, str]]) -> str | None:
    """``text`` (an address or CIDR) seen through the global CIDRs ``(local, global)``: the same
    host bits under the global prefix of the mapping containing it; None when none contains it.

    ``10.10.1.0/24`` with ``(10.10.0.0/16, 100.100.0.0/16)`` -> ``100.100.1.0/24`` (a node's
    global pod CIDR); ``10.10.1.2`` -> ``100.100.1.2`` (a pod's global IP).
    """
    net = ipaddress.ip_network(text, strict=False)
    for local, global_ in mappings:
        lo, gl = ipaddress.ip_network(local), ipaddress.ip_network(global_)
        if lo.version != net.version or net.prefixlen < lo.prefixlen or not net.subnet_of(lo):  # type: ignore[arg-type]
            continue
        moved = int(gl.network_address) | (int(net.network_address) & int(lo.hostmask))
        addr = ipaddress.IPv4Address(moved) if net.version == 4 else ipaddress.IPv6Address(moved)
        return str(addr) if "/" not in text else f"{addr}/{net.prefixlen}"
    return None


def frozen_mapping(m: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A mapping as a sorted tuple of pairs, so it can live in a frozen dataclass."""
    return tuple(sorted(m.items()))
