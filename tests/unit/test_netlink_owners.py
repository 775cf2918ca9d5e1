"""Table owners on their own: the never-delete-before-desired guard, the raw codec's encodings."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest

from fabric.netlink import rawnl, tolerated
from fabric.netlink.addresses import AddressOwner
from fabric.netlink.dataplane import KernelNeighbour, KernelRule, Nexthop, NhRoute, is_flood_mac
from fabric.netlink.fake import NUD_PERMANENT, FakeDataplane
from fabric.netlink.fdb import FdbOwner
from fabric.netlink.links import LinkOwner
from fabric.netlink.neighbours import NeighbourOwner
from fabric.netlink.objects import RTPROT_FABRIC, Address, FdbEntry, Neighbour, Rule
from fabric.netlink.report import TableStats
from fabric.netlink.routes import RouteOwner
from fabric.netlink.rules import RuleOwner

NAMES = frozenset({"vx-bridge"})


def populated() -> FakeDataplane:
    dp = FakeDataplane()
    dp.add_plain_link("vx-bridge", kind="vxlan")
    dp.addresses["vx-bridge"] = {Address("vx-bridge", "10.240.0.1/8")}
    dp.neighbours[("vx-bridge", "10.240.0.2")] = KernelNeighbour("vx-bridge", "10.240.0.2", "02:00:00:00:00:02",
                                                                NUD_PERMANENT)
    dp.fdb.add(FdbEntry("vx-bridge", "02:00:00:00:00:02", "198.18.0.2"))
    dp.nexthops[7] = Nexthop(7, "vx-bridge", "10.240.0.2")
    dp.routes[(200, "10.2.0.0/16")] = NhRoute(200, "10.2.0.0/16", 7)
    dp.rules.append(KernelRule(socket.AF_INET, 200, 200, RTPROT_FABRIC))
    return dp


@pytest.mark.parametrize(
    "make",
    [
        lambda dp: LinkOwner(dp, NAMES),
        lambda dp: AddressOwner(dp, NAMES),
        lambda dp: RuleOwner(dp),
        lambda dp: NeighbourOwner(dp, NAMES),
        lambda dp: FdbOwner(dp, NAMES),
    ],
)
def test_owner_never_deletes_before_set_desired(make: object) -> None:
    dp = populated()
    owner = make(dp)  # type: ignore[operator]
    owner.resync()
    owner.apply_deletes(TableStats())
    assert dp.ops == []
    owner.clear_desired()
    owner.apply_deletes(TableStats())
    assert dp.ops != []


def test_route_owner_never_deletes_before_set_desired() -> None:
    dp = populated()
    owner = RouteOwner(dp, NAMES, 200)
    owner.resync()
    owner.apply_deletes(TableStats(), TableStats())
    assert dp.ops == [] and dp.routes
    owner.set_desired(frozenset())
    owner.apply_deletes(TableStats(), TableStats())
    assert [op for op, _ in dp.ops] == ["del_route", "del_nexthop"]


def test_neighbour_mac_change_is_one_update() -> None:
    dp = populated()
    owner = NeighbourOwner(dp, NAMES)
    owner.resync()
    owner.set_desired(frozenset({Neighbour("vx-bridge", "10.240.0.2", "02:00:00:00:00:99")}))
    stats = TableStats()
    owner.apply_adds(stats)
    owner.apply_deletes(stats)
    assert (stats.adds, stats.updates, stats.deletes) == (0, 1, 0)
    assert dp.neighbours[("vx-bridge", "10.240.0.2")].mac == "02:00:00:00:00:99"


def test_fdb_moved_vtep_replaces_unicast_and_appends_flood() -> None:
    dp = populated()
    owner = FdbOwner(dp, NAMES)
    owner.resync()
    want = {
        FdbEntry("vx-bridge", "02:00:00:00:00:02", "198.18.0.9"),
        FdbEntry("vx-bridge", "00:00:00:00:00:00", "198.18.0.9"),
        FdbEntry("vx-bridge", "00:00:00:00:00:00", "198.18.0.10"),
    }
    owner.set_desired(frozenset(want))
    stats = TableStats()
    owner.apply_adds(stats)
    owner.apply_deletes(stats)
    assert stats.failures == 0 and dp.fdb == want


def test_flood_mac_detection() -> None:
    assert is_flood_mac("00:00:00:00:00:00") and is_flood_mac("01:00:5e:00:00:01")
    assert not is_flood_mac("02:00:00:00:00:01")


def test_codec_encodings_match_uapi_layout() -> None:
    body = rawnl.neigh_body(socket.AF_INET, 5, rawnl.NUD_PERMANENT, 0, socket.inet_aton("10.0.0.2"),
                            bytes.fromhex("020000000002"))
    assert struct.unpack_from("=BBHiHBB", body) == (socket.AF_INET, 0, 0, 5, 0x80, 0, 0)
    assert rawnl.parse_attrs(body, 12, len(body)) == {
        rawnl.NDA_DST: socket.inet_aton("10.0.0.2"), rawnl.NDA_LLADDR: bytes.fromhex("020000000002")
    }
    assert len(body) % 4 == 0
    route = rawnl.route_body(socket.AF_INET, 200, socket.inet_aton("10.2.0.0"), 16, RTPROT_FABRIC, 0x4B000001)
    fam, dst_len, _, _, table, proto, scope, rtype, _ = rawnl.RTMSG.unpack_from(route)
    assert (fam, dst_len, table, proto, scope, rtype) == (socket.AF_INET, 16, 200, 75, 0, rawnl.RTN_UNICAST)
    attrs = rawnl.parse_attrs(route, 12, len(route))
    assert rawnl.u32(attrs[rawnl.RTA_TABLE]) == 200 and rawnl.u32(attrs[rawnl.RTA_NH_ID]) == 0x4B000001
    big = rawnl.route_body(socket.AF_INET, 1000, socket.inet_aton("10.2.0.0"), 16, RTPROT_FABRIC, 0)
    assert rawnl.RTMSG.unpack_from(big)[4] == 252  # RT_TABLE_COMPAT; the real id is in RTA_TABLE
    nh = rawnl.nexthop_body(9, socket.AF_INET, 75, 4, socket.inet_aton("10.240.0.2"), True)
    assert rawnl.NHMSG.unpack_from(nh) == (socket.AF_INET, 0, 75, 0, rawnl.RTNH_F_ONLINK)
    nh_attrs = rawnl.parse_attrs(nh, 8, len(nh))
    assert rawnl.u32(nh_attrs[rawnl.NHA_ID]) == 9 and rawnl.u32(nh_attrs[rawnl.NHA_OIF]) == 4
    with pytest.raises(ValueError, match="zz"):
        rawnl.mac_bytes("zz:00")


# -- tolerated errnos: one table, every owner reads it ---------------------------------------

_DELETERS: dict[str, tuple[str, Callable[[FakeDataplane], Any]]] = {
    "links": ("del_link", lambda dp: LinkOwner(dp, NAMES)),
    "addresses": ("del_address", lambda dp: AddressOwner(dp, NAMES)),
    "rules": ("del_rule", lambda dp: RuleOwner(dp)),
    "neighbours": ("del_neighbour", lambda dp: NeighbourOwner(dp, NAMES)),
    "fdb": ("del_fdb", lambda dp: FdbOwner(dp, NAMES)),
}


def _delete_all(table: str, code: int) -> TableStats:
    """Resync a populated fake kernel, then delete everything while the kernel answers ``code``."""
    dp = populated()
    stats = TableStats()
    if table in ("routes", "nexthops"):
        routes = RouteOwner(dp, NAMES, 200)
        routes.resync()
        routes.set_desired(frozenset())
        dp.fail_when("del_route" if table == "routes" else "del_nexthop", lambda e: True, code)
        other = TableStats()
        nh, rt = (stats, other) if table == "nexthops" else (other, stats)
        routes.apply_deletes(nh, rt)
        return stats
    op, make = _DELETERS[table]
    owner = make(dp)
    owner.resync()
    owner.clear_desired()
    dp.fail_when(op, lambda e: True, code)
    owner.apply_deletes(stats)
    return stats


@pytest.mark.parametrize(
    ("table", "code"),
    [pytest.param(t, c, id=f"{t}-{errno.errorcode[c]}") for t, codes in tolerated.GONE_ON_DELETE.items()
     for c in sorted(codes)],
)
def test_already_gone_on_delete_is_success(table: str, code: int) -> None:
    stats = _delete_all(table, code)
    assert (stats.failures, stats.deletes) == (0, 1), f"{table}: {errno.errorcode[code]} counted as a failure"


@pytest.mark.parametrize("table", sorted(tolerated.GONE_ON_DELETE))
def test_other_errnos_on_delete_are_failures(table: str) -> None:
    stats = _delete_all(table, errno.EPERM)
    assert (stats.failures, stats.deletes, stats.errnos) == (1, 0, {errno.EPERM: 1})


def test_every_owned_table_has_an_entry_and_gone_is_common() -> None:
    owned = {"links", "addresses", "rules", "neighbours", "fdb", "nexthops", "routes"}
    assert set(tolerated.GONE_ON_DELETE) == owned == set(tolerated.THERE_ON_ADD)
    # the object went with its device, for every kind
    assert all({errno.ENOENT, errno.ESRCH, errno.ENODEV} <= v for v in tolerated.GONE_ON_DELETE.values())


@pytest.mark.parametrize(
    ("table", "make", "op", "code", "tolerated_"),
    [
        ("addresses", lambda dp: AddressOwner(dp, NAMES), "add_address", errno.EEXIST, True),
        ("rules", lambda dp: RuleOwner(dp), "add_rule", errno.EEXIST, True),
        ("addresses", lambda dp: AddressOwner(dp, NAMES), "add_address", errno.EPERM, False),
        ("rules", lambda dp: RuleOwner(dp), "add_rule", errno.EPERM, False),
    ],
)
def test_already_there_on_add(table: str, make: object, op: str, code: int, tolerated_: bool) -> None:
    dp = FakeDataplane()
    dp.add_plain_link("vx-bridge", kind="vxlan")
    owner = make(dp)  # type: ignore[operator]
    owner.resync()
    want: frozenset[object] = frozenset(
        {Address("vx-bridge", "10.240.0.9/8")} if table == "addresses" else {Rule(socket.AF_INET, 200, 200)}
    )
    owner.set_desired(want)
    dp.fail_when(op, lambda e: True, code)
    stats = TableStats()
    owner.apply_adds(stats)
    assert (stats.failures, stats.adds) == ((0, 1) if tolerated_ else (1, 0))


def test_route_eexist_on_add_stays_a_failure() -> None:
    # A route of another protocol holds the destination: not ours, so not "already there".
    assert not tolerated.already_there("routes", errno.EEXIST)
    assert not tolerated.already_there("links", errno.EEXIST)
