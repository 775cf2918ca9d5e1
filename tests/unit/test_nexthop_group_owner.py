"""The route owner's resilient nexthop groups (active/active gateways) against the fake kernel:
one group per gateway set, members replaced in place when the set changes, reuse after a
restart, groups deleted before their members, a failed group never aborting the pass, and the
raw group message's layout. The real kernel: tests/privileged/test_nexthop_groups.py."""

from __future__ import annotations

import errno
import socket
import struct

from fabric.netlink import rawnl
from fabric.netlink.dataplane import NexthopGroup
from fabric.netlink.fake import FakeDataplane
from fabric.netlink.objects import RTPROT_FABRIC, Route
from fabric.netlink.report import TableStats
from fabric.netlink.routes import RouteOwner

NAMES = frozenset({"vx-bridge"})
GW = ["10.240.0.2", "10.240.0.3", "10.240.0.4", "10.240.0.5"]


def routes(*group: str, plain: bool = True) -> frozenset[Route]:
    out = {Route(200, "10.50.0.0/16", "vx-bridge", group[0], group=tuple(sorted(group)))} if group else set()
    out |= {Route(200, "10.51.0.0/16", "vx-bridge", group[0], group=tuple(sorted(group)))} if group else set()
    if plain:
        out.add(Route(200, "10.0.2.0/24", "vx-bridge", GW[0]))
    return frozenset(out)


def apply(owner: RouteOwner, want: frozenset[Route]) -> tuple[TableStats, TableStats]:
    nh, rt = TableStats(), TableStats()
    owner.set_desired(want)
    owner.apply_adds(nh, rt)
    owner.apply_deletes(nh, rt)
    return nh, rt


def groups(dp: FakeDataplane) -> dict[int, set[str]]:
    return {i: {dp.nexthops[m].gateway for m in nh.group} for i, nh in dp.nexthops.items() if nh.group}


def setup() -> tuple[FakeDataplane, RouteOwner]:
    dp = FakeDataplane()
    dp.add_plain_link("vx-bridge", kind="vxlan")
    owner = RouteOwner(dp, NAMES, 200)
    owner.resync()
    return dp, owner


def test_one_group_per_gateway_set_shared_by_its_routes() -> None:
    dp, owner = setup()
    nh, rt = apply(owner, routes(GW[0], GW[1]))
    assert nh.failures == 0 and rt.failures == 0
    ((gid, members),) = groups(dp).items()
    assert members == {GW[0], GW[1]}
    assert dp.routes[(200, "10.50.0.0/16")].nhid == gid == dp.routes[(200, "10.51.0.0/16")].nhid
    # the plain route and the group share the member nexthop of GW[0]
    assert dp.routes[(200, "10.0.2.0/24")].nhid in dp.nexthops[gid].group
    assert owner.programmed_counts() == owner.desired_counts() == (3, 3)
    assert owner.group_id("vx-bridge", (GW[1], GW[0])) == gid


def test_changed_members_replace_the_group_in_place() -> None:
    dp, owner = setup()
    apply(owner, routes(GW[0], GW[1], GW[2]))
    ((gid, _),) = groups(dp).items()
    dp.ops.clear()
    nh, rt = apply(owner, routes(GW[0], GW[2], GW[3]))  # GW[1] failed, GW[3] promoted
    assert nh.failures == 0 and rt.failures == 0 and nh.updates == 1
    assert groups(dp) == {gid: {GW[0], GW[2], GW[3]}}
    ops = [op for op, _ in dp.ops]
    assert "replace_route" not in ops and "add_route" not in ops  # the routes did not move
    # the member nexthop of GW[1] is deleted only after the group let go of it
    assert ops.index("set_nexthop_group") < ops.index("del_nexthop")


def test_restart_reuses_the_group_and_changes_nothing() -> None:
    dp, owner = setup()
    apply(owner, routes(GW[0], GW[1]))
    before = dict(dp.nexthops)
    dp.ops.clear()
    again = RouteOwner(dp, NAMES, 200)
    again.resync()
    nh, rt = apply(again, routes(GW[1], GW[0]))
    assert dp.ops == [] and dp.nexthops == before
    assert nh.adds == nh.updates == nh.deletes == 0 and rt.adds == rt.updates == rt.deletes == 0


def test_unused_group_goes_before_its_members() -> None:
    dp, owner = setup()
    apply(owner, routes(GW[1], GW[2]))
    ((gid, _),) = groups(dp).items()
    dp.ops.clear()
    apply(owner, routes(plain=True))
    assert groups(dp) == {}
    dels = [key for op, key in dp.ops if op == "del_nexthop"]
    assert len(dels) == 3  # the group, then its two members (GW[0]'s nexthop stays: a plain route uses it)
    assert dels[0] == str(gid) and dp.routes.keys() == {(200, "10.0.2.0/24")}


def test_a_failed_group_fails_its_routes_only() -> None:
    dp, owner = setup()
    dp.fail_next("set_nexthop_group", errno.EINVAL)
    nh, rt = apply(owner, routes(GW[0], GW[1]))
    assert nh.failures == 1 and rt.failures == 2  # the two routes through the group
    assert (200, "10.0.2.0/24") in dp.routes  # the plain route is programmed all the same
    nh, rt = apply(owner, routes(GW[0], GW[1]))  # next pass: converges
    assert nh.failures == 0 and rt.failures == 0 and len(groups(dp)) == 1


def test_group_message_layout() -> None:
    body = rawnl.nexthop_group_body(0x4B000010, RTPROT_FABRIC, (7, 9), 128, 10.0, 0.0)
    assert rawnl.NHMSG.unpack_from(body) == (socket.AF_UNSPEC, 0, RTPROT_FABRIC, 0, 0)
    attrs = rawnl.parse_attrs(body, 8, len(body))
    assert rawnl.u32(attrs[rawnl.NHA_ID]) == 0x4B000010
    assert rawnl.group_members(attrs[rawnl.NHA_GROUP]) == (7, 9)
    assert struct.unpack("=H", attrs[rawnl.NHA_GROUP_TYPE][:2]) == (rawnl.NEXTHOP_GRP_TYPE_RES,)
    res = rawnl.parse_attrs(attrs[rawnl.NHA_RES_GROUP], 0, len(attrs[rawnl.NHA_RES_GROUP]))
    assert struct.unpack("=H", res[rawnl.NHA_RES_GROUP_BUCKETS][:2]) == (128,)
    assert rawnl.u32(res[rawnl.NHA_RES_GROUP_IDLE_TIMER]) == 10 * rawnl.USER_HZ
    assert NexthopGroup(1, (7,)).buckets == 128
