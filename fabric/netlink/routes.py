"""Owner of our routes and of the nexthop objects they point at.

Ownership: routes in our table with protocol ``RTPROT_FABRIC`` (a route in our table with
another protocol is someone else's: never replaced, never deleted; our delete messages carry
the protocol so the kernel enforces it too), and nexthop objects with protocol
``RTPROT_FABRIC``.

Why nexthop objects: a P2P node has one route per remote node, each with its own gateway, and
the kernel slows down badly with many distinct gateways (5.8k routes/s at 10,000, measured in
shared/reference/perf-baseline.md) but not with routes pointing at nexthop ids. So every
distinct (link, gateway) of the desired routes becomes one ``onlink`` nexthop object and every
route is ``dst nhid N``. A gateway that is the unspecified address (``0.0.0.0``, ``::``) makes a
device nexthop (``ip nexthop add id N dev L``): the hairpin device's routes.

Nexthop ids: read back at resync and reused for the same (link, gateway), so an agent restart
changes nothing in the kernel; new ids come from a high range (from ``NH_ID_BASE``) skipping
every id in use by anyone. Duplicated owned nexthops for one (link, gateway) keep the lowest id;
the others are removed after the routes moved off them.

Order: nexthops are added (after neighbours and FDB, so the first packet finds its MAC and VTEP)
before the routes that use them; on delete, routes go first, then the nexthops nobody needs.
Deleting a nexthop makes the kernel drop the routes using it, and bringing a link down or
deleting it drops its nexthops: the Reconciler re-reads this table after touching a link.
"""

from __future__ import annotations

import errno
import ipaddress
import logging

from fabric.netlink import tolerated
from fabric.netlink.dataplane import Dataplane, Nexthop, NhRoute
from fabric.netlink.objects import RTPROT_FABRIC, Route
from fabric.netlink.report import TableStats

_log = logging.getLogger(__name__)
NH_ID_BASE = 0x4B000000
NH_ID_LIMIT = 0x4C000000

NhKey = tuple[str, str]  # (link, gateway)
RouteKey = tuple[int, str]  # (table, dst)


class RouteOwner:
    def __init__(self, dp: Dataplane, names: frozenset[str], table: int) -> None:
        self._dp = dp
        self._names = names
        self._table = table
        self._desired: dict[RouteKey, NhKey] | None = None
        self._nh_owned: dict[int, NhKey] = {}
        self._nh_by_key: dict[NhKey, int] = {}
        self._nh_taken: set[int] = set()
        self._routes: dict[RouteKey, int] = {}
        self._next_id = NH_ID_BASE

    def set_desired(self, routes: frozenset[Route]) -> None:
        desired: dict[RouteKey, NhKey] = {}
        for r in routes:
            if r.table != self._table:
                raise ValueError(f"desired route {r.dst} is in table {r.table}, but we own table {self._table}")
            if r.link not in self._names:
                raise ValueError(f"desired route {r.dst} goes out of link {r.link!r}, which is not ours")
            key = (r.table, r.dst)
            if desired.setdefault(key, (r.link, r.gateway)) != (r.link, r.gateway):
                raise ValueError(f"two next hops desired for route {r.dst}: {desired[key]} and {(r.link, r.gateway)}")
        for table, dst in desired:  # the kernel canonicalises; a non-canonical dst would never converge
            if str(ipaddress.ip_network(dst, strict=False)) != dst:
                raise ValueError(f"desired route destination {dst!r} (table {table}) is not a canonical CIDR")
        self._desired = desired

    def resync(self) -> None:
        nhs = self._dp.list_nexthops()
        self._nh_taken = {nh.id for nh in nhs}
        self._nh_owned = {
            nh.id: (nh.link, nh.gateway)
            for nh in nhs
            if nh.protocol == RTPROT_FABRIC and nh.link and nh.gateway
        }
        self._nh_by_key = {}
        for nhid in sorted(self._nh_owned):
            self._nh_by_key.setdefault(self._nh_owned[nhid], nhid)
        self._routes = {(r.table, r.dst): r.nhid for r in self._dp.list_routes(self._table, RTPROT_FABRIC)}

    def desired_counts(self) -> tuple[int, int]:
        """(nexthops, routes) we want."""
        desired = self._desired or {}
        return len(set(desired.values())), len(desired)

    def programmed_counts(self) -> tuple[int, int]:
        return len(self._nh_owned), len(self._routes)

    def nexthop_id(self, link: str, gateway: str) -> int | None:
        return self._nh_by_key.get((link, gateway))

    def _allocate(self) -> int:
        nhid = self._next_id
        while nhid in self._nh_taken:
            nhid += 1
            if nhid >= NH_ID_LIMIT:
                nhid = NH_ID_BASE
            if nhid == self._next_id:
                raise RuntimeError("nexthop id range exhausted")  # 16M ids: a bug, not a load
        self._nh_taken.add(nhid)
        self._next_id = nhid + 1 if nhid + 1 < NH_ID_LIMIT else NH_ID_BASE
        return nhid

    def apply_adds(self, nh_stats: TableStats, route_stats: TableStats) -> None:
        desired = self._desired or {}
        needed = set(desired.values())
        missing = [k for k in needed if k not in self._nh_by_key]
        if missing:
            todo = [Nexthop(self._allocate(), link, gw) for link, gw in missing]
            failed = set()
            for e in self._dp.add_nexthops(todo):
                nh_stats.fail("nexthops", e.errno, e.message)
                failed.add(e.index)
            for i, nh in enumerate(todo):
                if i in failed:
                    continue
                nh_stats.adds += 1
                self._nh_owned[nh.id] = (nh.link, nh.gateway)
                self._nh_by_key[(nh.link, nh.gateway)] = nh.id

        routes = self._routes
        by_key = self._nh_by_key
        adds: list[NhRoute] = []
        updates: list[NhRoute] = []
        for (table, dst), nhkey in desired.items():
            nhid = by_key.get(nhkey)
            if nhid is None:
                route_stats.fail(
                    "routes", errno.ENOENT, f"route {dst}: no nexthop object for {nhkey[1]} dev {nhkey[0]}"
                )
                continue
            have = routes.get((table, dst))
            if have is None:
                adds.append(NhRoute(table, dst, nhid))
            elif have != nhid:
                updates.append(NhRoute(table, dst, nhid))
        for batch, replace in ((adds, False), (updates, True)):
            if not batch:
                continue
            failed = set()
            for e in self._dp.add_routes(batch, replace=replace):
                msg = e.message
                if e.errno == errno.EEXIST:
                    msg = f"route {batch[e.index].dst} table {self._table} is held by a route of another protocol"
                route_stats.fail("routes", e.errno, msg)
                failed.add(e.index)
            for i, r in enumerate(batch):
                if i in failed:
                    continue
                if replace:
                    route_stats.updates += 1
                else:
                    route_stats.adds += 1
                routes[(r.table, r.dst)] = r.nhid

    def apply_deletes(self, nh_stats: TableStats, route_stats: TableStats) -> None:
        if self._desired is None:
            return
        desired = self._desired
        gone = [NhRoute(t, d, nhid) for (t, d), nhid in self._routes.items() if (t, d) not in desired]
        if gone:
            failed = set()
            for e in self._dp.del_routes(gone):
                if not tolerated.already_gone("routes", e.errno):
                    route_stats.fail("routes", e.errno, e.message)
                    failed.add(e.index)
            for i, r in enumerate(gone):
                if i not in failed:
                    route_stats.deletes += 1
                    del self._routes[(r.table, r.dst)]
        needed = set(desired.values())
        keep = {self._nh_by_key[k] for k in needed if k in self._nh_by_key}
        unused = [nhid for nhid in self._nh_owned if nhid not in keep]
        if not unused:
            return
        failed = set()
        for e in self._dp.del_nexthops(unused):
            if not tolerated.already_gone("nexthops", e.errno):
                nh_stats.fail("nexthops", e.errno, e.message)
                failed.add(e.index)
        dead = set()
        for i, nhid in enumerate(unused):
            if i in failed:
                continue
            nh_stats.deletes += 1
            dead.add(nhid)
            key = self._nh_owned.pop(nhid)
            if self._nh_by_key.get(key) == nhid:
                del self._nh_by_key[key]
            self._nh_taken.discard(nhid)
        if dead:  # the kernel drops routes through a deleted nexthop; keep our view honest
            self._routes = {rk: rid for rk, rid in self._routes.items() if rid not in dead}

    def clear_desired(self) -> None:
        self._desired = {}
