"""A stateful in-memory kernel for unit tests, with fault injection.

It keeps one dict per table and mimics the kernel semantics the owners depend on:

* deleting a link removes its addresses, neighbours, FDB entries, the nexthops on it and the
  routes through those nexthops; setting a link down flushes its neighbours, nexthops and routes
  (IPv4 does that on NETDEV_DOWN; addresses and FDB entries stay);
* deleting a nexthop removes the routes using it and removes it from every group (a group left
  empty goes, with its routes); groups (:meth:`FakeDataplane.set_nexthop_groups`) need existing
  single nexthops as members; a route naming an unknown nexthop id fails
  ``EINVAL`` ("Nexthop id does not exist"); entries on a missing link fail ``ENODEV``;
* delete of a missing entry fails like the kernel: routes ``ESRCH``, neighbours/FDB/nexthops/
  rules ``ENOENT``, addresses ``EADDRNOTAVAIL``, links ``ENODEV``; exclusive creates of an
  existing entry fail ``EEXIST``; a FIB holds one route per (table, dst) whatever its protocol;
* an IPv4 address on an up link brings the kernel's connected route of its prefix into ``main``
  (:attr:`FakeDataplane.connected`, apart from :attr:`FakeDataplane.routes` so tests reading
  ours see only ours): it goes with the address, when the link goes down (back when it comes
  up) and with the link, and it holds its prefix against our adds (``EEXIST``) as in the kernel,
  where both have metric 0. IPv6 prefix routes have metric 256, ours 1024: no clash, not modelled.

Every mutating call is recorded in :attr:`FakeDataplane.ops` as ``(op, key)`` so tests can check
the programming order. Faults: :meth:`fail_next` fails the next ``count`` entries of an op with
an errno; :meth:`fail_when` fails every entry matching a predicate until :meth:`clear_faults`.
Op names: ``add_link update_link del_link add_address del_address add_rule del_rule
set_neighbour del_neighbour add_fdb del_fdb add_nexthop set_nexthop_group del_nexthop add_route
del_route write_sysctl`` and
``list_<table>`` for dumps and ``read_sysctl`` (a failing read raises :class:`DataplaneError`).
Sysctls live in :attr:`FakeDataplane.sysctls` (a kernel's defaults; delete a key to play an
older kernel that lacks it).
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
from collections.abc import Callable, Sequence

from fabric.netlink.dataplane import (
    BatchError,
    DataplaneError,
    KernelNeighbour,
    KernelRule,
    LinkInfo,
    Nexthop,
    NexthopGroup,
    NhRoute,
    UnderlayError,
    UnderlayLink,
    is_flood_mac,
    sysctl_path,
)
from fabric.netlink.objects import RT_TABLE_MAIN, RTPROT_FABRIC, Address, DeviceLink, FdbEntry, Link, Neighbour, Rule

_log = logging.getLogger(__name__)

NUD_PERMANENT = 0x80
NUD_REACHABLE = 0x02


@dataclasses.dataclass
class _Fault:
    errno: int
    count: int | None  # None: until cleared
    predicate: Callable[[object], bool] | None


#: Operation names that faults can target; anything else is a typo in a test, refused loudly.
OPS = frozenset(
    {
        "add_address", "add_fdb", "add_link", "add_nexthop", "add_route", "add_rule",
        "del_address", "del_fdb", "del_link", "del_neighbour", "del_nexthop", "del_route", "del_rule",
        "list_addresses", "list_fdb", "list_links", "list_neighbours", "list_nexthops", "list_routes",
        "list_rules", "read_sysctl", "replace_route", "set_neighbour", "set_nexthop_group", "update_link",
        "write_sysctl",
    }
)


#: ``proto kernel``: the routes the kernel makes itself (connected prefixes of addresses).
RTPROT_KERNEL = 2

#: The sysctls a fresh fake namespace has, at a kernel's defaults (6.11+: the hash seed exists).
DEFAULT_SYSCTLS = {
    "net.ipv4.fib_multipath_hash_policy": "0",
    "net.ipv6.fib_multipath_hash_policy": "0",
    "net.ipv6.fib_multipath_hash_fields": "7",
    "net.ipv4.fib_multipath_hash_seed": "0",
}


class FakeDataplane:
    """:class:`fabric.netlink.dataplane.Dataplane` in memory (see the module docstring)."""

    def __init__(self) -> None:
        self.links: dict[str, LinkInfo] = {}
        self.underlay_addrs: dict[str, str] = {}  # ip -> link name
        self.mtus: dict[str, int] = {}
        self.addresses: dict[str, set[Address]] = {}
        self.rules: list[KernelRule] = []
        self.neighbours: dict[tuple[str, str], KernelNeighbour] = {}
        self.fdb: set[FdbEntry] = set()
        self.nexthops: dict[int, Nexthop] = {}
        self.routes: dict[tuple[int, str], NhRoute] = {}
        #: The kernel's connected routes (see the module docstring), by (table, dst).
        self.connected: dict[tuple[int, str], NhRoute] = {}
        #: Per-namespace sysctls by key (``net.ipv4.fib_multipath_hash_seed``); a key absent here
        #: is one the kernel lacks (read gives None, write ENOENT), as on an older kernel.
        self.sysctls: dict[str, str] = dict(DEFAULT_SYSCTLS)
        self.ops: list[tuple[str, str]] = []
        self._faults: dict[str, list[_Fault]] = {}
        self._next_ifindex = 10

    # --- test set-up ------------------------------------------------------------------------

    def add_plain_link(self, name: str, kind: str = "veth", *, ip: str | None = None, mtu: int = 1500) -> int:
        """A non-vxlan link (underlay or someone else's), optionally holding ``ip``."""
        idx = self._alloc_ifindex()
        self.links[name] = LinkInfo(name, idx, kind, None)
        self.mtus[name] = mtu
        self.addresses[name] = set()
        if ip is not None:
            self.underlay_addrs[ip] = name
            self.addresses[name].add(Address(name, f"{ip}/24"))
        return idx

    def fail_next(self, op: str, errno: int, count: int = 1) -> None:
        self._known(op)
        self._faults.setdefault(op, []).append(_Fault(errno, count, None))

    def fail_when(self, op: str, predicate: Callable[[object], bool], errno: int) -> None:
        self._known(op)
        self._faults.setdefault(op, []).append(_Fault(errno, None, predicate))

    @staticmethod
    def _known(op: str) -> None:
        if op not in OPS:
            raise ValueError(f"unknown fake dataplane operation {op!r}; one of: {', '.join(sorted(OPS))}")

    def clear_faults(self) -> None:
        self._faults.clear()

    def _fault(self, op: str, entry: object) -> int:
        for fault in self._faults.get(op, []):
            if fault.predicate is not None and not fault.predicate(entry):
                continue
            if fault.count is not None:
                if fault.count <= 0:
                    continue
                fault.count -= 1
            return fault.errno
        return 0

    def _check(self, op: str, entry: object) -> None:
        code = self._fault(op, entry)
        if code:
            raise DataplaneError(code, f"injected fault on {op} {entry}: {os.strerror(code)}")

    def _alloc_ifindex(self) -> int:
        self._next_ifindex += 1
        return self._next_ifindex

    def _batch(self, op: str, entries: Sequence[object], fn: Callable[[object], None]) -> list[BatchError]:
        errors = []
        for i, e in enumerate(entries):
            code = self._fault(op, e)
            if code:
                errors.append(BatchError(i, code, f"injected fault on {op}: {os.strerror(code)}"))
                continue
            try:
                fn(e)
            except DataplaneError as exc:
                errors.append(BatchError(i, exc.code, str(exc)))
        return errors

    # --- kernel side effects -----------------------------------------------------------------

    def _flush_link(self, name: str, *, down_only: bool) -> None:
        self.neighbours = {k: v for k, v in self.neighbours.items() if v.link != name}
        dead_nh = {i for i, nh in self.nexthops.items() if nh.link == name}
        for i in dead_nh:
            del self.nexthops[i]
        for i in dead_nh:
            self._drop_member(i)
        self.routes = {
            k: r
            for k, r in self.routes.items()
            if (r.nhid in self.nexthops if r.nhid else r.link != name)
        }
        self.connected = {k: r for k, r in self.connected.items() if r.link != name}
        if not down_only:
            self.addresses.pop(name, None)
            self.fdb = {f for f in self.fdb if f.link != name}

    def _connected(self, address: Address) -> NhRoute | None:
        iface = ipaddress.ip_interface(address.address)
        if iface.version != 4 or iface.network.prefixlen == 32:
            return None
        return NhRoute(RT_TABLE_MAIN, str(iface.network), 0, RTPROT_KERNEL, link=address.link)

    def _add_connected(self, name: str) -> None:
        """The kernel's connected routes of ``name``'s IPv4 addresses (the link just came up or got
        an address). The kernel appends one beside a route of ours for the same prefix; this FIB
        has one route per key, so there ours stays the one the tests see."""
        if not self.links[name].up:
            return
        for address in self.addresses.get(name, ()):
            route = self._connected(address)
            if route is not None and (route.table, route.dst) not in self.routes:
                self.connected.setdefault((route.table, route.dst), route)

    def _require_link(self, name: str) -> LinkInfo:
        link = self.links.get(name)
        if link is None:
            raise DataplaneError(errno.ENODEV, f"link {name!r} does not exist")
        return link

    # --- Dataplane ---------------------------------------------------------------------------

    def close(self) -> None:
        pass

    def underlay_link(self, ip: str) -> UnderlayLink:
        name = self.underlay_addrs.get(str(ipaddress.ip_address(ip)))
        if name is None:
            raise UnderlayError(f"no interface in this network namespace holds underlay address {ip}")
        link = self.links[name]
        return UnderlayLink(link.ifindex, name, self.mtus.get(name, 1500))

    def list_links(self) -> list[LinkInfo]:
        self._check("list_links", None)
        return list(self.links.values())

    def add_link(self, link: Link) -> None:
        self._check("add_link", link)
        self.ops.append(("add_link", link.name))
        if link.name in self.links:
            raise DataplaneError(errno.EEXIST, f"link {link.name} exists")
        if isinstance(link, DeviceLink):
            self.links[link.name] = LinkInfo(link.name, self._alloc_ifindex(), link.kind, None, link.up)
            self.addresses[link.name] = set()
            return
        if link.underlay_ifindex not in {li.ifindex for li in self.links.values()}:
            raise DataplaneError(errno.ENODEV, f"underlay ifindex {link.underlay_ifindex} does not exist")
        self.links[link.name] = LinkInfo(link.name, self._alloc_ifindex(), "vxlan", link, link.up)
        self.addresses[link.name] = set()

    def update_link(self, link: Link) -> None:
        self._check("update_link", link)
        self.ops.append(("update_link", link.name))
        old = self._require_link(link.name)
        if isinstance(link, DeviceLink):
            if old.kind != link.kind:
                raise DataplaneError(errno.EOPNOTSUPP, f"link {link.name} is {old.kind}, not {link.kind}")
            if old.up and not link.up:
                self._flush_link(link.name, down_only=True)
            self.links[link.name] = dataclasses.replace(old, up=link.up)
            self._add_connected(link.name)
            return
        if old.vxlan is None:
            raise DataplaneError(errno.EOPNOTSUPP, f"link {link.name} is not vxlan")
        immutable = dataclasses.replace(link, mtu=old.vxlan.mtu, mac=old.vxlan.mac, learning=old.vxlan.learning,
                                        up=old.vxlan.up)
        if immutable != old.vxlan:
            raise DataplaneError(errno.EOPNOTSUPP, f"cannot change vni/port/local/underlay of {link.name} in place")
        if old.vxlan.up and not link.up:
            self._flush_link(link.name, down_only=True)
        self.links[link.name] = LinkInfo(link.name, old.ifindex, "vxlan", link, link.up)
        self._add_connected(link.name)

    def del_link(self, name: str) -> None:
        self._check("del_link", name)
        self.ops.append(("del_link", name))
        self._require_link(name)
        del self.links[name]
        self._flush_link(name, down_only=False)

    def set_link_down(self, name: str) -> None:
        """What ``ip link set NAME down`` does (a drift source, not part of the interface)."""
        old = self._require_link(name)
        assert old.vxlan is not None
        self.update_link(dataclasses.replace(old.vxlan, up=False))
        self.ops.pop()

    def list_addresses(self, link: str) -> list[Address]:
        self._check("list_addresses", link)
        return sorted(self.addresses.get(link, ()), key=lambda a: a.address)

    def add_address(self, address: Address) -> None:
        self._check("add_address", address)
        self.ops.append(("add_address", address.address))
        self._require_link(address.link)
        have = self.addresses.setdefault(address.link, set())
        if address in have:
            raise DataplaneError(errno.EEXIST, f"address {address.address} exists")
        have.add(address)
        self._add_connected(address.link)

    def del_address(self, address: Address) -> None:
        self._check("del_address", address)
        self.ops.append(("del_address", address.address))
        self._require_link(address.link)
        have = self.addresses.get(address.link, set())
        if address not in have:
            raise DataplaneError(errno.EADDRNOTAVAIL, f"address {address.address} not found")
        have.discard(address)
        route = self._connected(address)
        if route is not None and self.connected.get((route.table, route.dst)) == route:
            del self.connected[(route.table, route.dst)]

    def list_rules(self, family: int) -> list[KernelRule]:
        self._check("list_rules", family)
        return [r for r in self.rules if r.family == family]

    def add_rule(self, rule: Rule) -> None:
        self._check("add_rule", rule)
        self.ops.append(("add_rule", f"{rule.family}/{rule.table}/{rule.priority}"))
        kr = KernelRule(rule.family, rule.table, rule.priority, RTPROT_FABRIC)
        if kr in self.rules:
            raise DataplaneError(errno.EEXIST, "rule exists")
        self.rules.append(kr)

    def del_rule(self, rule: KernelRule) -> None:
        self._check("del_rule", rule)
        self.ops.append(("del_rule", f"{rule.family}/{rule.table}/{rule.priority}"))
        if rule not in self.rules:
            raise DataplaneError(errno.ENOENT, "rule not found")
        self.rules.remove(rule)

    def list_neighbours(self, link: str) -> list[KernelNeighbour]:
        self._check("list_neighbours", link)
        return [n for n in self.neighbours.values() if n.link == link]

    def add_dynamic_neighbour(self, link: str, ip: str, mac: str) -> None:
        """A learnt (non-permanent) entry, as ARP would create it."""
        self.neighbours[(link, ip)] = KernelNeighbour(link, ip, mac, NUD_REACHABLE)

    def set_neighbours(self, entries: Sequence[Neighbour]) -> list[BatchError]:
        def one(e: object) -> None:
            assert isinstance(e, Neighbour)
            self.ops.append(("set_neighbour", e.ip))
            self._require_link(e.link)
            self.neighbours[(e.link, e.ip)] = KernelNeighbour(e.link, e.ip, e.mac, NUD_PERMANENT)

        return self._batch("set_neighbour", entries, one)

    def del_neighbours(self, entries: Sequence[Neighbour]) -> list[BatchError]:
        def one(e: object) -> None:
            assert isinstance(e, Neighbour)
            self.ops.append(("del_neighbour", e.ip))
            self._require_link(e.link)
            if self.neighbours.pop((e.link, e.ip), None) is None:
                raise DataplaneError(errno.ENOENT, f"neighbour {e.ip} not found")

        return self._batch("del_neighbour", entries, one)

    def list_fdb(self, link: str) -> list[FdbEntry]:
        self._check("list_fdb", link)
        return [f for f in self.fdb if f.link == link]

    def add_fdb(self, entries: Sequence[FdbEntry]) -> list[BatchError]:
        def one(e: object) -> None:
            assert isinstance(e, FdbEntry)
            self.ops.append(("add_fdb", f"{e.mac}>{e.dst}"))
            self._require_link(e.link)
            if not is_flood_mac(e.mac):  # unicast: replace the one remote
                self.fdb = {f for f in self.fdb if not (f.link == e.link and f.mac == e.mac)}
            self.fdb.add(e)

        return self._batch("add_fdb", entries, one)

    def del_fdb(self, entries: Sequence[FdbEntry]) -> list[BatchError]:
        def one(e: object) -> None:
            assert isinstance(e, FdbEntry)
            self.ops.append(("del_fdb", f"{e.mac}>{e.dst}"))
            self._require_link(e.link)
            if e not in self.fdb:
                raise DataplaneError(errno.ENOENT, f"fdb {e.mac} dst {e.dst} not found")
            self.fdb.discard(e)

        return self._batch("del_fdb", entries, one)

    def list_nexthops(self) -> list[Nexthop]:
        self._check("list_nexthops", None)
        return list(self.nexthops.values())

    def add_nexthops(self, entries: Sequence[Nexthop]) -> list[BatchError]:
        def one(e: object) -> None:
            assert isinstance(e, Nexthop)
            self.ops.append(("add_nexthop", f"{e.id}:{e.gateway}"))
            if e.id in self.nexthops:
                raise DataplaneError(errno.EEXIST, f"nexthop id {e.id} exists")
            link = self._require_link(e.link)
            if link.vxlan is not None and not link.vxlan.up:
                raise DataplaneError(errno.ENETDOWN, f"nexthop device {e.link} is not up")
            self.nexthops[e.id] = e

        return self._batch("add_nexthop", entries, one)

    def set_nexthop_groups(self, entries: Sequence[NexthopGroup], *, replace: bool) -> list[BatchError]:
        """Like the kernel: members must exist and be single nexthops; an existing id is
        EEXIST unless ``replace``, and a group can only replace a group."""

        def one(e: object) -> None:
            assert isinstance(e, NexthopGroup)
            self.ops.append(("set_nexthop_group", f"{e.id}:{','.join(map(str, e.members))}"))
            if not e.members:
                raise DataplaneError(errno.EINVAL, "Invalid length for nexthop group attribute")
            for m in e.members:
                member = self.nexthops.get(m)
                if member is None or member.group:
                    raise DataplaneError(errno.EINVAL, f"Invalid nexthop id {m} in group")
            old = self.nexthops.get(e.id)
            if old is not None and not replace:
                raise DataplaneError(errno.EEXIST, f"nexthop id {e.id} exists")
            if old is not None and not old.group:
                raise DataplaneError(errno.EINVAL, "Can not replace a nexthop with a nexthop group.")
            self.nexthops[e.id] = Nexthop(e.id, "", "", e.protocol, False, tuple(e.members), True)

        return self._batch("set_nexthop_group", entries, one)

    def del_nexthops(self, ids: Sequence[int]) -> list[BatchError]:
        def one(e: object) -> None:
            assert isinstance(e, int)
            self.ops.append(("del_nexthop", str(e)))
            if self.nexthops.pop(e, None) is None:
                raise DataplaneError(errno.ENOENT, f"nexthop id {e} not found")
            self._drop_member(e)
            self.routes = {k: r for k, r in self.routes.items() if r.nhid in self.nexthops or not r.nhid}

        return self._batch("del_nexthop", ids, one)

    def _drop_member(self, nhid: int) -> None:
        """The kernel removes a deleted nexthop from every group; a group left empty goes too."""
        for gid, g in list(self.nexthops.items()):
            if nhid in g.group:
                rest = tuple(m for m in g.group if m != nhid)
                if rest:
                    self.nexthops[gid] = dataclasses.replace(g, group=rest)
                else:
                    del self.nexthops[gid]

    def list_routes(self, table: int, protocol: int) -> list[NhRoute]:
        self._check("list_routes", table)
        return [r for r in self.routes.values() if table in (0, r.table) and r.protocol == protocol]

    def add_routes(self, entries: Sequence[NhRoute], *, replace: bool = False) -> list[BatchError]:
        def one(e: object) -> None:
            assert isinstance(e, NhRoute)
            self.ops.append(("replace_route" if replace else "add_route", e.dst))
            if e.nhid and e.nhid not in self.nexthops:
                raise DataplaneError(errno.EINVAL, "Nexthop id does not exist")
            key = (e.table, e.dst)
            if (key in self.routes or key in self.connected) and not replace:
                raise DataplaneError(errno.EEXIST, f"route {e.dst} table {e.table} exists")
            self.connected.pop(key, None)  # a replace takes the prefix whoever held it
            self.routes[key] = e

        return self._batch("replace_route" if replace else "add_route", entries, one)

    def del_routes(self, entries: Sequence[NhRoute]) -> list[BatchError]:
        def one(e: object) -> None:
            assert isinstance(e, NhRoute)
            self.ops.append(("del_route", e.dst))
            have = self.routes.get((e.table, e.dst))
            if have is None or have.protocol != e.protocol:
                raise DataplaneError(errno.ESRCH, f"route {e.dst} table {e.table} not found")
            del self.routes[(e.table, e.dst)]

        return self._batch("del_route", entries, one)

    # --- sysctls -----------------------------------------------------------------------------

    def read_sysctl(self, key: str) -> str | None:
        sysctl_path(key)
        self._check("read_sysctl", key)
        return self.sysctls.get(key)

    def write_sysctl(self, key: str, value: str) -> None:
        sysctl_path(key)
        self._check("write_sysctl", key)
        if key not in self.sysctls:
            raise DataplaneError(errno.ENOENT, f"set sysctl {key}={value}: no such sysctl")
        self.ops.append(("write_sysctl", f"{key}={value}"))
        self.sysctls[key] = value
