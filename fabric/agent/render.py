"""NodeState (what the reflector planned) -> KernelState (what the kernel tables must hold).

A pure function: the only node-local facts it needs (the underlay interface's ifindex, the
table and rule priority) come in as arguments, so it is unit-testable without a kernel.

Per planned entry:

* ``VxlanDevice`` -> a :class:`~fabric.netlink.objects.VxlanLink` bound to the underlay
  interface, plus its overlay :class:`~fabric.netlink.objects.Address`; the first device of a
  family also brings the ip rule that sends lookups to our table.
* ``Peer`` -> a static :class:`~fabric.netlink.objects.Neighbour` (overlay IP -> MAC) and a
  static :class:`~fabric.netlink.objects.FdbEntry` (MAC -> underlay IP). Learning is off on our
  devices, so these two entries are the whole of the tunnel's L2 knowledge.
* ``RouteEntry`` -> a :class:`~fabric.netlink.objects.Route` in our table, via the peer's
  overlay IP (onlink). A route whose device or next hop is not planned is dropped: programming
  it would make the kernel ARP on a tunnel where nobody answers. A route with ``vias`` (active/
  active gateways) keeps ``group``: the members whose peer is planned.
* ``Program`` on the hairpin device -> a :class:`~fabric.netlink.objects.DeviceLink` (kind ifb),
  and the routes planned to it (via the unspecified address) -> device routes in our table.
* ``Translation`` and ``Program`` entries also make the node's :class:`TranslatorPlan`
  (:func:`translator_plan`): the mappings to load and which programs run on which device. The
  agent hands that to the BPF loader, not to the netlink reconciler.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Mapping

from fabric import types
from fabric.netlink import objects


def render(
    state: types.NodeState,
    *,
    underlay_ifindex: int,
    table: int,
    rule_priority: int,
    underlay_ifindexes: Mapping[str, int] | None = None,
) -> objects.KernelState:
    """``underlay_ifindexes`` maps an underlay address to the interface holding it (a dual-stack
    node may hold its IPv4 and IPv6 underlay addresses on different interfaces); a device whose
    ``local`` address is not in it binds to ``underlay_ifindex``."""
    by_ip = underlay_ifindexes or {}
    links: set[objects.Link] = set()
    addresses: set[objects.Address] = set()
    rules: set[objects.Rule] = set()
    neighbours: set[objects.Neighbour] = set()
    fdb: set[objects.FdbEntry] = set()
    routes: set[objects.Route] = set()

    devices = {d.name for d in state.devices}
    for d in state.devices:
        links.add(
            objects.VxlanLink(
                name=d.name,
                vni=d.vni,
                port=d.port,
                mac=d.mac.lower(),
                local=d.local,
                underlay_ifindex=by_ip.get(d.local, underlay_ifindex),
                mtu=d.mtu,
            )
        )
        addresses.add(objects.Address(link=d.name, address=str(ipaddress.ip_interface(d.address))))
        family = socket.AF_INET if ipaddress.ip_interface(d.address).version == 4 else socket.AF_INET6
        if table != objects.RT_TABLE_MAIN:
            rules.add(objects.Rule(family=family, table=table, priority=rule_priority))

    next_hops: set[tuple[str, str]] = set()
    for p in state.peers:
        if p.device not in devices:
            continue
        neighbours.add(objects.Neighbour(link=p.device, ip=p.overlay_ip, mac=p.mac.lower()))
        fdb.add(objects.FdbEntry(link=p.device, mac=p.mac.lower(), dst=p.underlay_ip))
        next_hops.add((p.device, p.overlay_ip))

    for prog in state.programs:
        if prog.point == types.PROGRAM_HAIRPIN:
            links.add(objects.DeviceLink(prog.device))
            for r in state.routes:
                if r.device == prog.device and ipaddress.ip_address(r.via).is_unspecified:
                    next_hops.add((r.device, r.via))
                    family = socket.AF_INET if ipaddress.ip_address(r.via).version == 4 else socket.AF_INET6
                    if table != objects.RT_TABLE_MAIN:
                        rules.add(objects.Rule(family=family, table=table, priority=rule_priority))

    for r in state.routes:
        if r.vias:
            # Active/active: the members whose peer is planned (a member without its neighbour
            # and FDB entry would black-hole its share of the flows).
            group = tuple(v for v in r.vias if (r.device, v) in next_hops)
            if not group:
                continue
            via = r.via if r.via in group else group[0]
            dst = types.canonical_cidr(r.dst)
            routes.add(objects.Route(table=table, dst=dst, link=r.device, gateway=via, group=group))
            continue
        if (r.device, r.via) not in next_hops:
            continue
        routes.add(objects.Route(table=table, dst=types.canonical_cidr(r.dst), link=r.device, gateway=r.via))

    return objects.KernelState(
        links=frozenset(links),
        addresses=frozenset(addresses),
        rules=frozenset(rules),
        neighbours=frozenset(neighbours),
        fdb=frozenset(fdb),
        routes=frozenset(routes),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class TranslatorPlan:
    """What the node's global-IP translator must hold: ``(local, global)`` mappings (sorted) and
    ``(device, point)`` program attachments (``point``: types.PROGRAM_TUNNEL / PROGRAM_HAIRPIN).
    Empty when the node's cluster has no global CIDRs."""

    mappings: tuple[tuple[str, str], ...] = ()
    attachments: frozenset[tuple[str, str]] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.mappings or self.attachments)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(sorted({d for d, _p in self.attachments}))


def translator_plan(state: types.NodeState) -> TranslatorPlan:
    """The translator part of a planned state. A tunnel program on a device that is not planned
    is left out (it has nowhere to run); the hairpin device comes with its program."""
    devices = {d.name for d in state.devices}
    attachments = frozenset(
        (p.device, p.point)
        for p in state.programs
        if p.point == types.PROGRAM_HAIRPIN or (p.point == types.PROGRAM_TUNNEL and p.device in devices)
    )
    return TranslatorPlan(tuple(sorted((t.local, t.global_) for t in state.translations)), attachments)
