"""Kernel objects the agent owns, as plain frozen values.

These are the *desired* and *observed* entries of each kernel table the fabric programs. They
are deliberately close to what netlink carries, so an applier can diff them by equality:
every address and CIDR here is canonical text (``ipaddress`` ``str()`` form), MACs are
lower-case ``aa:bb:cc:dd:ee:ff``.

Tables and what we own in each (ownership is how we avoid touching anything that is not ours):

========== ================================================= ==================================
table      object                                            owned when
========== ================================================= ==================================
links      :class:`VxlanLink`, :class:`DeviceLink`           name is one of ours (``vx-*``,
                                                             ``kf-hairpin``), kind vxlan or ifb
addresses  :class:`Address`                                  on one of our links (IPv6
                                                             link-local ignored)
rules      :class:`Rule`                                     protocol == our RTPROT
neighbours :class:`Neighbour`                                on our link, NUD_PERMANENT
fdb        :class:`FdbEntry`                                 on our link (AF_BRIDGE, NTF_SELF)
routes     :class:`Route` (+ one nexthop object per          table == ours and protocol == ours
           distinct gateway and one resilient group per      (nexthops: protocol == ours)
           distinct gateway set, managed by the route owner)
========== ================================================= ==================================

Programming order (add): link, address, rule, neighbour, FDB, nexthop, route. Delete runs the
reverse. A route must never exist before the neighbour and FDB entry of its next hop, otherwise
the kernel ARPs on the tunnel (learning is off, nobody answers) and the first packets are lost.
"""

from __future__ import annotations

import dataclasses

#: Route protocol number that marks routes, nexthops and rules as ours (rt_protos has 0-4,
#: 8-16, 18, 42, 99, 186-192 taken; 75 is free and reads as 'K' for Kosmos).
RTPROT_FABRIC = 75
#: The kernel's main table. Our routes live there by default, owned by their protocol like
#: Calico's and Cilium's, and no ip rule is needed. A table of our own (Kosmos used 200, with a
#: rule at priority 200) is an option (``--table``), at a price measured by ``bench datapath``
#: (its ``routes_only_*`` rows, BENCHMARKS.md): any rule besides the kernel's own three makes
#: every IPv4 lookup walk the rule list and look up ``local`` and our table apart instead of one
#: merged trie, and makes source validation do a full lookup too. On a forwarding node that was
#: 5-7 % of all CPU under load and cost the cross-cluster path 5-8 % of its throughput.
RT_TABLE_MAIN = 254
#: Where fabric routes go unless configured otherwise, and the priority of the rule that selects
#: any other table (below main's 32766, so our routes win over main's for the same prefix).
DEFAULT_TABLE = RT_TABLE_MAIN
DEFAULT_RULE_PRIORITY = 200


@dataclasses.dataclass(frozen=True, slots=True)
class VxlanLink:
    name: str
    vni: int
    port: int
    mac: str
    #: Underlay source address (IFLA_VXLAN_LOCAL / LOCAL6).
    local: str
    #: ifindex of the underlay interface (IFLA_VXLAN_LINK).
    underlay_ifindex: int
    mtu: int
    learning: bool = False
    up: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceLink:
    """A link of ours that is not a tunnel: the global-IP hairpin device (kind ``ifb``: NOARP,
    needs no peer or carrier; this kernel has no ``dummy`` module). Only up/down can change."""

    name: str
    kind: str = "ifb"
    up: bool = True


Link = VxlanLink | DeviceLink
#: Link kinds we create; a link with one of our names and another kind is someone else's.
OWNED_KINDS = frozenset({"vxlan", "ifb"})


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    link: str
    #: ``ip/prefixlen``
    address: str


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    family: int  # socket.AF_INET / AF_INET6
    table: int
    priority: int


@dataclasses.dataclass(frozen=True, slots=True)
class Neighbour:
    link: str
    ip: str
    mac: str


@dataclasses.dataclass(frozen=True, slots=True)
class FdbEntry:
    link: str
    mac: str
    #: Underlay address of the remote VTEP.
    dst: str


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """``dst`` via ``gateway`` (onlink) on ``link`` in ``table``. A ``gateway`` that is the
    unspecified address of its family (``0.0.0.0``, ``::``) makes a device route (``dev link``,
    no next-hop address: the hairpin device's routes).

    The route owner programs these through nexthop objects (``ip nexthop``), one per distinct
    (link, gateway): the kernel slows down badly on many routes with distinct gateways, not on
    routes pointing at nexthop ids (see shared/reference/perf-baseline.md). Nexthop ids are the
    route owner's business, reused from the kernel across agent restarts.
    """

    table: int
    dst: str
    link: str
    gateway: str
    #: Active/active gateways: every gateway of an equal-cost group (sorted, ``gateway`` among
    #: them); empty for a single next hop. The route owner programs the group as one resilient
    #: nexthop group over the members' nexthop objects and, when the members change, replaces
    #: the members of the group the route uses (flows on the members that stay do not move).
    group: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class KernelState:
    """Desired content of every table we own on one node."""

    links: frozenset[Link] = frozenset()
    addresses: frozenset[Address] = frozenset()
    rules: frozenset[Rule] = frozenset()
    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()
    routes: frozenset[Route] = frozenset()
