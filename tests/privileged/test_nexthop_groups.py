"""Resilient nexthop groups (active/active gateways, issue 21 section 2) on a real kernel, in a
throwaway netns: the route owner creates one resilient group for a route with ``group``,
replaces its members in place when a gateway leaves (the survivors' buckets do not move), reuses
it after an agent restart and removes it with everything else.

The kernel state is read with iproute2 (``ip -j nexthop``, ``ip -j nexthop bucket``), not with
our own parser.
"""

from __future__ import annotations

import ipaddress

from fabric.netlink.dataplane import KernelDataplane
from fabric.netlink.objects import FdbEntry, KernelState, Neighbour, Route, VxlanLink
from fabric.netlink.reconciler import Reconciler
from tests.privileged.kernelns import TABLE, bridge_state, ipj

NAMES = frozenset({"vx-bridge"})
GROUP_DST = "10.50.0.0/16"


def overlay(i: int) -> str:
    return str(ipaddress.ip_address("10.240.0.0") + i)


def state(dp: KernelDataplane, members: tuple[int, ...], peers: int = 4) -> KernelState:
    """vx-bridge with ``peers`` peers (10.240.0.2...), one plain route per peer and
    ``GROUP_DST`` through the group of ``members`` (peer numbers)."""
    ul = dp.underlay_link("198.18.0.1")
    link = VxlanLink("vx-bridge", 54, 4876, "02:00:00:00:00:01", "198.18.0.1", ul.ifindex, ul.mtu - 50)
    neigh, fdb, routes = set(), set(), set()
    for i in range(2, 2 + peers):
        mac = f"02:00:00:00:00:{i:02x}"
        neigh.add(Neighbour("vx-bridge", overlay(i), mac))
        fdb.add(FdbEntry("vx-bridge", mac, f"198.18.0.{i}"))
        routes.add(Route(TABLE, f"10.0.{i}.0/24", "vx-bridge", overlay(i)))
    gws = tuple(sorted(overlay(m) for m in members))
    routes.add(Route(TABLE, GROUP_DST, "vx-bridge", gws[0], group=gws))
    return bridge_state(link, neigh, fdb, routes)


def group_view(netns: str) -> tuple[int, dict[int, str], dict[int, int]]:
    """(group id, member id -> gateway, bucket index -> member id) of the route to GROUP_DST."""
    (route,) = [r for r in ipj(netns, "route", "show", "table", str(TABLE)) if r["dst"] == GROUP_DST]
    nhs = {nh["id"]: nh for nh in ipj(netns, "nexthop", "show")}
    gid = route["nhid"]
    grp = nhs[gid]
    assert grp.get("type") == "resilient", grp
    assert str(grp["protocol"]) == "75"
    members = {m["id"]: nhs[m["id"]]["gateway"] for m in grp["group"]}
    dump = ipj(netns, "nexthop", "bucket", "show", "id", str(gid))
    buckets = {b["bucket"]["index"]: b["bucket"]["nhid"] for b in dump}
    return gid, members, buckets


def apply(rec: Reconciler) -> int:
    report = rec.apply()
    assert report.failures == 0, report.first_error
    return report.changes


def test_resilient_group_members_replaced_in_place(netns: str, dp: KernelDataplane) -> None:
    rec = Reconciler(dp, table=TABLE, rule_priority=200, link_names=NAMES)
    rec.set_desired(state(dp, (2, 3, 4)))
    apply(rec)
    gid, members, buckets = group_view(netns)
    assert sorted(members.values()) == [overlay(2), overlay(3), overlay(4)]
    assert set(buckets.values()) == set(members), "every member holds buckets"
    by_gw = {gw: nhid for nhid, gw in members.items()}
    # The group's members are the very nexthop objects of the plain routes (one per gateway).
    plain = {r["dst"]: r["nhid"] for r in ipj(netns, "route", "show", "table", str(TABLE))}
    assert by_gw[overlay(3)] == plain["10.0.3.0/24"]

    # Gateway 3 fails: its buckets move to the survivors, and no survivor's bucket moves.
    rec.set_desired(state(dp, (2, 4)))
    apply(rec)
    gid2, members2, buckets2 = group_view(netns)
    assert gid2 == gid, "the group is replaced in place, not swapped for a new one"
    assert sorted(members2.values()) == [overlay(2), overlay(4)]
    gone = by_gw[overlay(3)]
    moved = {i for i in buckets if buckets[i] != buckets2[i]}
    assert moved == {i for i, nh in buckets.items() if nh == gone}
    assert set(buckets2.values()) == set(members2)

    # A standby promoted into the group (3 -> 5): again in place. The new member takes only
    # idle buckets (no traffic here, so every bucket is idle and it gets its share at once; a
    # busy bucket would wait for the idle timer), and buckets never move between survivors.
    rec.set_desired(state(dp, (2, 4, 5)))
    apply(rec)
    gid3, members3, buckets3 = group_view(netns)
    assert gid3 == gid and sorted(members3.values()) == [overlay(2), overlay(4), overlay(5)]
    new = next(nhid for nhid, gw in members3.items() if gw == overlay(5))
    moved = {i for i in buckets2 if buckets3[i] != buckets2[i]}
    assert moved and all(buckets3[i] == new for i in moved)

    # A restarted agent finds the group (exact member match) and changes nothing.
    again = Reconciler(dp, table=TABLE, rule_priority=200, link_names=NAMES)
    again.resync()
    again.set_desired(state(dp, (2, 4, 5)))
    assert apply(again) == 0
    assert group_view(netns) == (gid3, members3, buckets3)
    assert again.programmed_counts() == again.desired_counts()

    # Back to one route per gateway: the group goes, then everything goes on cleanup.
    plain_only = state(dp, (2,))
    plain_only = KernelState(
        plain_only.links, plain_only.addresses, plain_only.rules, plain_only.neighbours, plain_only.fdb,
        frozenset(r for r in plain_only.routes if not r.group),
    )
    again.set_desired(plain_only)
    apply(again)
    assert not [nh for nh in ipj(netns, "nexthop", "show") if "group" in nh]
    report = again.cleanup_all()
    assert report.failures == 0, report.first_error
    assert ipj(netns, "nexthop", "show") == []
