"""Owner of our routes and of the nexthop objects they point at.

Ownership: routes with protocol ``RTPROT_FABRIC`` (a route with another protocol is someone
else's, in our table too: never replaced, never deleted; our delete messages carry the protocol
so the kernel enforces it too), and nexthop objects with protocol ``RTPROT_FABRIC``. Ours are
programmed in one table (``main`` by default); ours found in any other table were left by an
earlier ``--table`` (before 2026-12, the default was a table 200 of our own) and are deleted
like any route we no longer want.

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

Groups (active/active gateways, issue 21 section 2): a route with ``group`` (two or more equal
gateways) points at a *resilient* nexthop group over the members' ordinary nexthop objects
(``ip nexthop add id G group a/b type resilient``, kernel >= 5.13; pyroute2 0.9 has no nexthop
messages at all, so :mod:`fabric.netlink.rawnl` encodes them). A group's identity is the group
object the routes already use, not its member set: when the members change, the owned group
that shares the most members with the new set is *replaced in place* (``NLM_F_REPLACE``), so
the kernel moves only the buckets of the members that left and the flows on the others see no
change; an exact member match is preferred, so a resync or an agent restart changes nothing.
Groups are ours by protocol, like nexthops; unused ones are deleted after the routes moved off
them and before their members.

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
from fabric.netlink.dataplane import Dataplane, Nexthop, NexthopGroup, NhRoute
from fabric.netlink.objects import RTPROT_FABRIC, Route
from fabric.netlink.report import TableStats

_log = logging.getLogger(__name__)
#: ``list_routes`` of this table lists every table.
RT_TABLE_UNSPEC = 0
NH_ID_BASE = 0x4B000000
NH_ID_LIMIT = 0x4C000000

NhKey = tuple[str, str]  # (link, gateway)
GroupKey = tuple[str, tuple[str, ...]]  # (link, gateways)
RouteKey = tuple[int, str]  # (table, dst)


class RouteOwner:
    def __init__(self, dp: Dataplane, names: frozenset[str], table: int) -> None:
        self._dp = dp
        self._names = names
        self._table = table
        self._desired: dict[RouteKey, NhKey] | None = None
        #: Routes through a group: their group key (disjoint from ``_desired``'s keys).
        self._desired_groups: dict[RouteKey, GroupKey] = {}
        #: Owned groups in the kernel: id -> member nexthop ids.
        self._groups: dict[int, tuple[int, ...]] = {}
        #: The group each desired group key uses, as of the last apply_adds.
        self._group_for: dict[GroupKey, int] = {}
        self._nh_owned: dict[int, NhKey] = {}
        self._nh_by_key: dict[NhKey, int] = {}
        self._nh_taken: set[int] = set()
        self._routes: dict[RouteKey, int] = {}
        #: Adds refused with ``EEXIST`` in this pass, tried again after the deletes.
        self._clashed: list[NhRoute] = []
        self._next_id = NH_ID_BASE

    def set_desired(self, routes: frozenset[Route]) -> None:
        desired: dict[RouteKey, NhKey] = {}
        groups: dict[RouteKey, GroupKey] = {}
        for r in routes:
            if r.table != self._table:
                raise ValueError(f"desired route {r.dst} is in table {r.table}, but we own table {self._table}")
            if r.link not in self._names:
                raise ValueError(f"desired route {r.dst} goes out of link {r.link!r}, which is not ours")
            key = (r.table, r.dst)
            if r.group:
                gkey = (r.link, tuple(sorted(set(r.group))))
                if key in desired or groups.setdefault(key, gkey) != gkey:
                    raise ValueError(f"two next hops desired for route {r.dst}, one of them the group {gkey}")
                continue
            if key in groups or desired.setdefault(key, (r.link, r.gateway)) != (r.link, r.gateway):
                raise ValueError(f"two next hops desired for route {r.dst}: {desired[key]} and {(r.link, r.gateway)}")
        for table, dst in [*desired, *groups]:  # the kernel canonicalises; a non-canonical dst would never converge
            if str(ipaddress.ip_network(dst, strict=False)) != dst:
                raise ValueError(f"desired route destination {dst!r} (table {table}) is not a canonical CIDR")
        self._desired = desired
        self._desired_groups = groups

    def resync(self) -> None:
        nhs = self._dp.list_nexthops()
        self._nh_taken = {nh.id for nh in nhs}
        self._nh_owned = {
            nh.id: (nh.link, nh.gateway)
            for nh in nhs
            if nh.protocol == RTPROT_FABRIC and nh.link and nh.gateway
        }
        self._groups = {nh.id: nh.group for nh in nhs if nh.protocol == RTPROT_FABRIC and nh.group}
        self._nh_by_key = {}
        for nhid in sorted(self._nh_owned):
            self._nh_by_key.setdefault(self._nh_owned[nhid], nhid)
        # Every table (RT_TABLE_UNSPEC): ours left in another table are not desired, so they go.
        self._routes = {(r.table, r.dst): r.nhid for r in self._dp.list_routes(RT_TABLE_UNSPEC, RTPROT_FABRIC)}

    def desired_counts(self) -> tuple[int, int]:
        """(nexthops, routes) we want."""
        desired = self._desired or {}
        groups = set(self._desired_groups.values())
        return len(self._needed_nexthops()) + len(groups), len(desired) + len(self._desired_groups)

    def programmed_counts(self) -> tuple[int, int]:
        return len(self._nh_owned) + len(self._groups), len(self._routes)

    def _needed_nexthops(self) -> set[NhKey]:
        """Single nexthops the desired routes need: their own and every group's members."""
        needed = set((self._desired or {}).values())
        for link, gws in self._desired_groups.values():
            needed.update((link, gw) for gw in gws)
        return needed

    def group_id(self, link: str, gateways: tuple[str, ...]) -> int | None:
        """The group programmed for ``gateways`` on ``link`` (None: none yet)."""
        return self._group_for.get((link, tuple(sorted(set(gateways)))))

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
        needed = self._needed_nexthops()
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

        self._apply_groups(nh_stats)

        routes = self._routes
        by_key = self._nh_by_key
        adds: list[NhRoute] = []
        updates: list[NhRoute] = []
        targets: list[tuple[RouteKey, int | None, str]] = [
            (rk, by_key.get(nhkey), f"no nexthop object for {nhkey[1]} dev {nhkey[0]}")
            for rk, nhkey in desired.items()
        ]
        targets += [
            (rk, self._group_for.get(gkey), f"no nexthop group for {', '.join(gkey[1])} dev {gkey[0]}")
            for rk, gkey in self._desired_groups.items()
        ]
        for (table, dst), nhid, missing_what in targets:
            if nhid is None:
                route_stats.fail("routes", errno.ENOENT, f"route {dst}: {missing_what}")
                continue
            have = routes.get((table, dst))
            if have is None:
                adds.append(NhRoute(table, dst, nhid))
            elif have != nhid:
                updates.append(NhRoute(table, dst, nhid))
        self._clashed = []
        self._add(adds, route_stats, replace=False, clash_later=True)
        self._add(updates, route_stats, replace=True)

    def apply_clashed(self, route_stats: TableStats) -> None:
        """Try once more the adds the kernel refused with ``EEXIST`` earlier in this pass, now that
        the deletes ran: the prefix may have been held by the connected route of an address that
        went away in them (a node changing role gives up its ``vx-bridge`` address and routes
        that prefix through a tunnel instead; adds run first, so the route would wait for the
        next resync). Whatever still clashes is someone else's route: a failure, reported."""
        batch, self._clashed = self._clashed, []
        self._add(batch, route_stats, replace=False)

    def _add(self, batch: list[NhRoute], route_stats: TableStats, *, replace: bool, clash_later: bool = False) -> None:
        if not batch:
            return
        failed = set()
        for e in self._dp.add_routes(batch, replace=replace):
            failed.add(e.index)
            if e.errno == errno.EEXIST and clash_later:
                self._clashed.append(batch[e.index])
                continue
            msg = e.message
            if e.errno == errno.EEXIST:
                msg = f"route {batch[e.index].dst} table {self._table} is held by a route of another protocol"
            route_stats.fail("routes", e.errno, msg)
        for i, r in enumerate(batch):
            if i in failed:
                continue
            if replace:
                route_stats.updates += 1
            else:
                route_stats.adds += 1
            self._routes[(r.table, r.dst)] = r.nhid

    def _apply_groups(self, nh_stats: TableStats) -> None:
        """Create or replace the desired groups (see the module docstring: a changed member set
        replaces the members of the owned group that shares the most with it)."""
        self._group_for = {}
        wanted: dict[GroupKey, tuple[int, ...]] = {}
        for gkey in sorted(set(self._desired_groups.values())):
            link, gws = gkey
            members = tuple(nhid for gw in gws if (nhid := self._nh_by_key.get((link, gw))) is not None)
            if members:
                wanted[gkey] = members
            else:
                nh_stats.fail("nexthops", errno.ENOENT, f"nexthop group {', '.join(gws)} dev {link}: no member exists")
        free = dict(self._groups)
        for gkey, members in wanted.items():  # exact matches first: nothing to do
            for gid, have in free.items():
                if set(have) == set(members):
                    self._group_for[gkey] = gid
                    del free[gid]
                    break
        todo: dict[bool, list[tuple[GroupKey, NexthopGroup]]] = {True: [], False: []}
        for gkey, members in wanted.items():
            if gkey in self._group_for:
                continue
            best = max(free, key=lambda gid: (len(set(free[gid]) & set(members)), -gid), default=None)
            if best is not None and set(free[best]) & set(members):
                del free[best]
                todo[True].append((gkey, NexthopGroup(best, members)))
            else:
                todo[False].append((gkey, NexthopGroup(self._allocate(), members)))
        for replace in (True, False):
            batch = todo[replace]
            if not batch:
                continue
            failed = set()
            for e in self._dp.set_nexthop_groups([g for _, g in batch], replace=replace):
                nh_stats.fail("nexthops", e.errno, e.message)
                failed.add(e.index)
            for i, (gkey, g) in enumerate(batch):
                if i in failed:
                    continue
                if replace:
                    nh_stats.updates += 1
                else:
                    nh_stats.adds += 1
                self._groups[g.id] = g.members
                self._group_for[gkey] = g.id

    def apply_deletes(self, nh_stats: TableStats, route_stats: TableStats) -> None:
        if self._desired is None:
            return
        desired = self._desired
        groups = self._desired_groups
        gone = [NhRoute(*rk, nhid) for rk, nhid in self._routes.items() if rk not in desired and rk not in groups]
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
        self._delete_groups(nh_stats)
        needed = self._needed_nexthops()
        keep = {self._nh_by_key[k] for k in needed if k in self._nh_by_key}
        dead = self._del_nexthops([nhid for nhid in self._nh_owned if nhid not in keep], nh_stats)
        for nhid in dead:
            key = self._nh_owned.pop(nhid)
            if self._nh_by_key.get(key) == nhid:
                del self._nh_by_key[key]
            self._nh_taken.discard(nhid)
        if dead:  # the kernel drops routes through a deleted nexthop; keep our view honest
            self._routes = {rk: rid for rk, rid in self._routes.items() if rid not in dead}
            # ... and removes it from every group (a group left empty goes, with its routes)
            for gid, members in list(self._groups.items()):
                rest = tuple(m for m in members if m not in dead)
                if rest:
                    self._groups[gid] = rest
                else:
                    del self._groups[gid]
                    self._nh_taken.discard(gid)
                    self._routes = {rk: rid for rk, rid in self._routes.items() if rid != gid}

    def _delete_groups(self, nh_stats: TableStats) -> None:
        """Delete the owned groups no desired route uses (after the routes moved off them,
        before their members: a member deleted first would shrink a group still routed)."""
        used = set(self._group_for.values())
        for gid in self._del_nexthops([gid for gid in self._groups if gid not in used], nh_stats):
            del self._groups[gid]
            self._nh_taken.discard(gid)
            self._routes = {rk: rid for rk, rid in self._routes.items() if rid != gid}

    def _del_nexthops(self, ids: list[int], nh_stats: TableStats) -> set[int]:
        """Delete nexthop objects (single or group) by id; the ids now gone from the kernel (one
        already gone counts as deleted: someone did it for us), each counted in ``nh_stats``."""
        if not ids:
            return set()
        failed = set()
        for e in self._dp.del_nexthops(ids):
            if not tolerated.already_gone("nexthops", e.errno):
                nh_stats.fail("nexthops", e.errno, e.message)
                failed.add(e.index)
        nh_stats.deletes += len(ids) - len(failed)
        return {nhid for i, nhid in enumerate(ids) if i not in failed}

    def clear_desired(self) -> None:
        self._desired = {}
        self._desired_groups = {}
