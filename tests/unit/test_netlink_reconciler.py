"""The Reconciler and its table owners against the stateful fake kernel."""

from __future__ import annotations

import dataclasses
import errno
import socket

import pytest

from fabric.netlink.dataplane import KernelRule, Nexthop, NhRoute
from fabric.netlink.fake import FakeDataplane
from fabric.netlink.objects import (
    RT_TABLE_MAIN,
    RTPROT_FABRIC,
    Address,
    FdbEntry,
    KernelState,
    Neighbour,
    Route,
    Rule,
    VxlanLink,
)
from fabric.netlink.reconciler import Reconciler
from fabric.netlink.routes import NH_ID_BASE

NAMES = frozenset({"vx-bridge"})
TABLE = 200


def make_dp() -> tuple[FakeDataplane, int]:
    dp = FakeDataplane()
    idx = dp.add_plain_link("eth0", ip="198.18.0.1")
    return dp, idx


def state(underlay: int, peers: int = 3, *, mtu: int = 1450, vni: int = 54) -> KernelState:
    link = VxlanLink("vx-bridge", vni, 4876, "02:00:00:00:00:01", "198.18.0.1", underlay, mtu)
    neigh, fdb, routes = set(), set(), set()
    for i in range(2, 2 + peers):
        mac = f"02:00:00:00:00:{i:02x}"
        neigh.add(Neighbour("vx-bridge", f"10.240.0.{i}", mac))
        fdb.add(FdbEntry("vx-bridge", mac, f"198.18.0.{i}"))
        fdb.add(FdbEntry("vx-bridge", "00:00:00:00:00:00", f"198.18.0.{i}"))
        routes.add(Route(TABLE, f"10.{i}.0.0/16", "vx-bridge", f"10.240.0.{i}"))
    return KernelState(
        links=frozenset({link}),
        addresses=frozenset({Address("vx-bridge", "10.240.0.1/8")}),
        rules=frozenset({Rule(socket.AF_INET, TABLE, 200)}),
        neighbours=frozenset(neigh),
        fdb=frozenset(fdb),
        routes=frozenset(routes),
    )


def in_main(st: KernelState) -> KernelState:
    """``st`` laid out as the agent does by default: routes in ``main``, no rule."""
    return dataclasses.replace(
        st, rules=frozenset(), routes=frozenset(dataclasses.replace(rt, table=RT_TABLE_MAIN) for rt in st.routes)
    )


def reconciler(dp: FakeDataplane) -> Reconciler:
    return Reconciler(dp, table=TABLE, rule_priority=200, link_names=NAMES)


def assert_kernel_matches(dp: FakeDataplane, want: KernelState) -> None:
    assert {li.vxlan for li in dp.links.values() if li.vxlan} == set(want.links)
    assert dp.addresses["vx-bridge"] == set(want.addresses)
    assert {(r.family, r.table, r.priority) for r in dp.rules if r.protocol == RTPROT_FABRIC} == {
        (r.family, r.table, r.priority) for r in want.rules
    }
    assert {Neighbour(n.link, n.ip, n.mac) for n in dp.neighbours.values()} == set(want.neighbours)
    assert dp.fdb == set(want.fdb)
    ours = {k: r for k, r in dp.routes.items() if r.protocol == RTPROT_FABRIC}
    got = {Route(r.table, r.dst, dp.nexthops[r.nhid].link, dp.nexthops[r.nhid].gateway) for r in ours.values()}
    assert got == set(want.routes)


def test_programs_everything_in_order() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    want = state(ul)
    r.set_desired(want)
    report = r.apply()
    assert report.failures == 0 and not report.resync_needed
    assert_kernel_matches(dp, want)
    kinds = [op for op, _ in dp.ops]
    order = ["add_link", "add_address", "add_rule", "set_neighbour", "add_fdb", "add_nexthop", "add_route"]
    firsts = [kinds.index(k) for k in order]
    lasts = [len(kinds) - 1 - kinds[::-1].index(k) for k in order]
    for a, b in zip(lasts, firsts[1:], strict=False):
        assert a < b, f"programming order broken: {dp.ops}"
    assert report.tables["routes"].adds == 3 and report.tables["nexthops"].adds == 3
    assert report.changes == 1 + 1 + 1 + 3 + 6 + 3 + 3
    # one nexthop object per distinct gateway, all onlink, in our high id range
    assert all(nh.onlink and nh.id >= NH_ID_BASE for nh in dp.nexthops.values())
    assert r.desired_counts() == r.programmed_counts() == {
        "links": 1, "addresses": 1, "rules": 1, "neighbours": 3, "fdb": 6, "nexthops": 3, "routes": 3,
    }
    # second pass is a no-op
    dp.ops.clear()
    assert r.apply().changes == 0 and dp.ops == []


def test_deletes_run_in_reverse_order() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    r.set_desired(state(ul))
    r.apply()
    dp.ops.clear()
    r.set_desired(KernelState())
    report = r.apply()
    assert report.failures == 0
    kinds = [op for op, _ in dp.ops]
    order = ["del_route", "del_nexthop", "del_fdb", "del_neighbour", "del_rule", "del_address", "del_link"]
    assert [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k] == order
    assert dp.routes == {} and dp.nexthops == {} and dp.fdb == set() and not dp.rules
    assert "vx-bridge" not in dp.links and "eth0" in dp.links


def test_nothing_deleted_before_first_set_desired() -> None:
    dp, ul = make_dp()
    first = reconciler(dp)
    first.set_desired(state(ul))
    first.apply()
    before = (dict(dp.links), dict(dp.routes), set(dp.fdb), dict(dp.neighbours))
    dp.ops.clear()
    restarted = reconciler(dp)
    restarted.resync()
    report = restarted.apply()
    assert report.changes == 0 and dp.ops == []
    assert (dict(dp.links), dict(dp.routes), set(dp.fdb), dict(dp.neighbours)) == before


def test_restart_reuses_nexthop_ids_and_changes_nothing() -> None:
    dp, ul = make_dp()
    want = state(ul)
    first = reconciler(dp)
    first.set_desired(want)
    first.apply()
    ids = {nh.id: (nh.link, nh.gateway) for nh in dp.nexthops.values()}
    dp.ops.clear()
    second = reconciler(dp)
    second.set_desired(want)
    report = second.apply()
    assert report.changes == 0 and dp.ops == []
    assert {nh.id: (nh.link, nh.gateway) for nh in dp.nexthops.values()} == ids
    assert second.nexthop_id("vx-bridge", "10.240.0.2") == first.nexthop_id("vx-bridge", "10.240.0.2")


def test_nexthop_ids_skip_ids_taken_by_anyone() -> None:
    dp, ul = make_dp()
    dp.add_plain_link("eth1")
    dp.nexthops[NH_ID_BASE] = Nexthop(NH_ID_BASE, "eth1", "192.0.2.1", protocol=4)
    dp.nexthops[NH_ID_BASE + 1] = Nexthop(NH_ID_BASE + 1, "eth1", "192.0.2.2", protocol=4)
    r = reconciler(dp)
    r.set_desired(state(ul))
    assert r.apply().failures == 0
    ours = {i for i, nh in dp.nexthops.items() if nh.protocol == RTPROT_FABRIC}
    assert ours == {NH_ID_BASE + 2, NH_ID_BASE + 3, NH_ID_BASE + 4}
    assert dp.nexthops[NH_ID_BASE].protocol == 4  # foreign nexthops untouched


def test_foreign_entries_untouched() -> None:
    dp, ul = make_dp()
    dp.add_plain_link("eth1")
    foreign_route = NhRoute(TABLE, "10.99.0.0/16", 0, protocol=4, link="eth1", gateway="192.0.2.1")
    dp.routes[(TABLE, "10.99.0.0/16")] = foreign_route
    main_route = NhRoute(254, "10.98.0.0/16", 0, protocol=4, link="eth1", gateway="192.0.2.1")
    dp.routes[(254, "10.98.0.0/16")] = main_route  # someone else's, in another table
    foreign_rule = KernelRule(socket.AF_INET, TABLE, 300, 4)
    dp.rules.append(foreign_rule)
    dp.add_plain_link("vx-other", kind="vxlan")  # a vxlan not in our names
    r = reconciler(dp)
    r.set_desired(state(ul))
    r.apply()
    dp.add_dynamic_neighbour("vx-bridge", "10.240.9.9", "02:00:00:00:09:09")
    r.set_desired(KernelState())
    assert r.apply().failures == 0
    assert dp.routes == {(TABLE, "10.99.0.0/16"): foreign_route, (254, "10.98.0.0/16"): main_route}
    assert dp.rules == [foreign_rule]
    assert "vx-other" in dp.links


def test_ours_left_in_another_table_by_an_earlier_table_setting_are_deleted() -> None:
    """An agent that used table 200 with its rule (the default before 2026-12) and now runs with
    ``main``: its old routes and rule go, someone else's route in table 200 stays."""
    dp, ul = make_dp()
    dp.add_plain_link("eth1")
    old = reconciler(dp)  # our TABLE, with its rule
    old.set_desired(state(ul))
    assert old.apply().failures == 0
    assert any(t == TABLE for t, _ in dp.routes) and dp.rules
    foreign = NhRoute(TABLE, "10.99.0.0/16", 0, protocol=4, link="eth1", gateway="192.0.2.1")
    dp.routes[(TABLE, "10.99.0.0/16")] = foreign
    new = Reconciler(dp, table=254, rule_priority=200, link_names=NAMES)
    desired = state(ul)
    new.set_desired(dataclasses.replace(
        desired,
        rules=frozenset(),
        routes=frozenset(dataclasses.replace(r, table=254) for r in desired.routes),
    ))  # fmt: skip
    assert new.apply().failures == 0
    assert {k for k in dp.routes if k[0] == TABLE} == {(TABLE, "10.99.0.0/16")}
    assert {r.dst for r in desired.routes} == {dst for t, dst in dp.routes if t == 254}
    assert not [r for r in dp.rules if r.protocol == RTPROT_FABRIC]


def test_dynamic_neighbour_ignored_but_extraneous_fdb_removed() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    want = state(ul)
    r.set_desired(want)
    r.apply()
    dp.add_dynamic_neighbour("vx-bridge", "10.240.7.7", "02:00:00:00:07:07")
    dp.fdb.add(FdbEntry("vx-bridge", "00:00:00:00:00:00", "198.18.0.77"))
    dp.neighbours[("vx-bridge", "10.240.8.8")] = dataclasses.replace(
        dp.neighbours[("vx-bridge", "10.240.0.2")], ip="10.240.8.8"
    )  # a permanent one we did not ask for
    r.resync()
    report = r.apply()
    assert report.tables["fdb"].deletes == 1 and report.tables["neighbours"].deletes == 1
    assert ("vx-bridge", "10.240.7.7") in dp.neighbours and ("vx-bridge", "10.240.8.8") not in dp.neighbours
    assert FdbEntry("vx-bridge", "00:00:00:00:00:00", "198.18.0.77") not in dp.fdb


def test_refuses_non_vxlan_link_with_our_name() -> None:
    dp, ul = make_dp()
    dp.add_plain_link("vx-bridge", kind="bridge")
    r = reconciler(dp)
    r.set_desired(state(ul))
    report = r.apply()
    assert report.resync_needed and report.tables["links"].failures == 1
    assert report.first_error is not None and "not vxlan" in report.first_error
    assert dp.links["vx-bridge"].kind == "bridge"
    r.set_desired(KernelState())
    r.apply()
    assert dp.links["vx-bridge"].kind == "bridge"  # never deleted


def test_injected_failure_does_not_stop_the_pass_and_next_apply_repairs() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    want = state(ul, peers=5)
    r.set_desired(want)
    dp.fail_next("set_neighbour", errno.EBUSY)
    dp.fail_next("add_route", errno.ENOBUFS, count=2)
    dp.fail_when("add_fdb", lambda e: isinstance(e, FdbEntry) and e.dst == "198.18.0.4", errno.EINVAL)
    report = r.apply()
    assert report.resync_needed
    assert report.tables["neighbours"].failures == 1 and report.tables["neighbours"].errnos == {errno.EBUSY: 1}
    assert report.tables["routes"].failures == 2 and report.tables["routes"].adds == 3
    assert report.tables["fdb"].failures == 2 and report.tables["fdb"].adds == 8
    assert report.failures == 5
    assert report.first_error is not None and report.first_error.startswith("neighbours: [EBUSY]")
    assert len(dp.neighbours) == 4 and len(dp.routes) == 3
    dp.clear_faults()
    again = r.apply()
    assert again.failures == 0 and not again.resync_needed
    assert again.tables["neighbours"].adds == 1 and again.tables["routes"].adds == 2
    assert_kernel_matches(dp, want)


def test_failed_nexthop_fails_its_routes_only() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    r.set_desired(state(ul))
    dp.fail_next("add_nexthop", errno.ENOMEM)
    report = r.apply()
    assert report.tables["nexthops"].failures == 1 and report.tables["routes"].failures == 1
    assert report.tables["routes"].adds == 2
    assert r.apply().failures == 0 and len(dp.routes) == 3


def test_drift_is_repaired_after_resync() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    want = state(ul)
    r.set_desired(want)
    r.apply()
    some_route = next(iter(dp.routes))
    del dp.routes[some_route]
    dp.fdb.pop()
    dp.neighbours.popitem()
    dp.del_nexthops([next(iter(dp.nexthops))])  # also drops its route
    r.resync()
    report = r.apply()
    assert report.failures == 0 and report.tables["nexthops"].adds == 1
    assert_kernel_matches(dp, want)


def test_deleted_link_recreated_with_everything_in_one_pass() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    want = state(ul)
    r.set_desired(want)
    r.apply()
    dp.del_link("vx-bridge")
    r.resync()
    report = r.apply()
    assert report.failures == 0
    assert_kernel_matches(dp, want)


def test_immutable_change_recreates_and_readds_dependents_same_pass() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    r.set_desired(state(ul))
    r.apply()
    dp.ops.clear()
    want = state(ul, vni=99)
    r.set_desired(want)
    report = r.apply()
    assert report.failures == 0 and report.tables["links"].updates == 1
    assert dp.ops[:2] == [("del_link", "vx-bridge"), ("add_link", "vx-bridge")]
    assert report.tables["routes"].adds == 3 and report.tables["fdb"].adds == 6
    assert_kernel_matches(dp, want)


def test_mutable_change_is_in_place() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    r.set_desired(state(ul))
    r.apply()
    dp.ops.clear()
    want = state(ul, mtu=1400)
    r.set_desired(want)
    report = r.apply()
    assert dp.ops == [("update_link", "vx-bridge")] and report.changes == 1
    assert_kernel_matches(dp, want)


def test_link_set_down_is_brought_up_and_flushed_entries_readded() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    want = state(ul)
    r.set_desired(want)
    r.apply()
    dp.set_link_down("vx-bridge")
    assert dp.routes == {} and dp.neighbours == {}
    r.resync()
    assert r.apply().failures == 0
    assert_kernel_matches(dp, want)


def test_route_gateway_change_replaces_route_and_drops_old_nexthop() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    base = state(ul)
    r.set_desired(base)
    r.apply()
    moved = {rt for rt in base.routes if rt.dst != "10.2.0.0/16"} | {
        Route(TABLE, "10.2.0.0/16", "vx-bridge", "10.240.0.3")
    }
    r.set_desired(dataclasses.replace(base, routes=frozenset(moved)))
    dp.ops.clear()
    report = r.apply()
    assert report.tables["routes"].updates == 1 and report.tables["nexthops"].deletes == 1
    assert [op for op, _ in dp.ops] == ["replace_route", "del_nexthop"]
    assert len(dp.nexthops) == 2


def test_foreign_route_holding_our_prefix_is_reported() -> None:
    dp, ul = make_dp()
    dp.routes[(TABLE, "10.2.0.0/16")] = NhRoute(TABLE, "10.2.0.0/16", 0, protocol=4, link="eth0", gateway="1.2.3.4")
    r = reconciler(dp)
    r.set_desired(state(ul))
    report = r.apply()
    assert report.tables["routes"].failures == 1
    assert "another protocol" in (report.first_error or "")
    assert dp.routes[(TABLE, "10.2.0.0/16")].protocol == 4


def test_route_taking_the_prefix_of_an_address_going_away_lands_in_the_same_pass() -> None:
    """A node changing role (a gateway-mode gateway becoming internal): ``vx-bridge`` loses its
    address, whose connected route holds 10.0.0.0/8 in ``main``, and that prefix is now routed
    through a peer. Adds run before deletes, so the kernel refuses the route (EEXIST) until the
    address is gone: the add is tried again after the deletes, and the pass ends clean."""
    dp, ul = make_dp()
    r = Reconciler(dp, table=RT_TABLE_MAIN, rule_priority=200, link_names=NAMES)
    main = in_main(state(ul))
    r.set_desired(main)
    assert r.apply().failures == 0
    assert (RT_TABLE_MAIN, "10.0.0.0/8") in dp.connected
    via_peer = Route(RT_TABLE_MAIN, "10.0.0.0/8", "vx-bridge", "10.240.0.2")
    moved = dataclasses.replace(main, addresses=frozenset(), routes=main.routes | {via_peer})
    r.set_desired(moved)
    dp.ops.clear()
    report = r.apply()
    assert report.failures == 0 and not report.resync_needed, report.first_error
    assert report.tables["routes"].adds == 1
    assert [op for op in dp.ops if op[1] in ("10.0.0.0/8", "10.240.0.1/8")] == [
        ("add_route", "10.0.0.0/8"), ("del_address", "10.240.0.1/8"), ("add_route", "10.0.0.0/8")
    ]
    assert dp.routes[(RT_TABLE_MAIN, "10.0.0.0/8")].protocol == RTPROT_FABRIC
    assert r.apply().changes == 0


def test_route_clashing_with_an_address_that_stays_is_reported_once() -> None:
    """The retry after the deletes is one retry: a connected route that stays (an address still
    wanted) keeps the prefix, and the route is one failure with the usual message."""
    dp, ul = make_dp()
    r = Reconciler(dp, table=RT_TABLE_MAIN, rule_priority=200, link_names=NAMES)
    via_peer = Route(RT_TABLE_MAIN, "10.0.0.0/8", "vx-bridge", "10.240.0.2")
    want = dataclasses.replace(in_main(state(ul)), routes=frozenset({via_peer}))
    r.set_desired(want)
    report = r.apply()
    assert report.tables["routes"].failures == 1 and report.resync_needed
    assert "another protocol" in (report.first_error or "")
    assert [op for op in dp.ops if op == ("add_route", "10.0.0.0/8")] == [("add_route", "10.0.0.0/8")] * 2


def test_delete_of_missing_entries_counts_as_success() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    r.set_desired(state(ul))
    r.apply()
    r.set_desired(KernelState(links=state(ul).links))
    # someone else removes entries between our resync and our deletes: ENOENT/ESRCH are fine
    dp.fail_when("del_route", lambda e: True, errno.ESRCH)
    dp.fail_when("del_neighbour", lambda e: True, errno.ENOENT)
    report = r.apply()
    assert report.failures == 0 and report.tables["routes"].deletes == 3


def test_cleanup_all_removes_only_ours() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    r.set_desired(state(ul))
    r.apply()
    dp.rules.append(KernelRule(socket.AF_INET, 100, 100, 3))
    fresh = reconciler(dp)  # as `fabric-agent --cleanup` would: a new process, no desired state
    report = fresh.cleanup_all()
    assert report.failures == 0
    assert set(dp.links) == {"eth0"} and dp.routes == {} and dp.nexthops == {}
    assert dp.rules == [KernelRule(socket.AF_INET, 100, 100, 3)]
    assert fresh.programmed_counts() == dict.fromkeys(fresh.programmed_counts(), 0)


def test_dump_failure_is_reported_not_raised() -> None:
    dp, ul = make_dp()
    r = reconciler(dp)
    r.set_desired(state(ul))
    dp.fail_next("list_routes", errno.EINTR)
    report = r.apply()
    assert report.resync_needed and report.failures == 1 and dp.ops == []
    assert r.apply().failures == 0


def test_bad_desired_state_is_a_programming_error() -> None:
    dp, _ul = make_dp()
    r = reconciler(dp)
    with pytest.raises(ValueError, match="vx-foo"):
        r.set_desired(KernelState(neighbours=frozenset({Neighbour("vx-foo", "10.0.0.1", "02:00:00:00:00:01")})))
    with pytest.raises(ValueError, match="table 201"):
        r.set_desired(KernelState(routes=frozenset({Route(201, "10.0.0.0/8", "vx-bridge", "10.240.0.2")})))
    with pytest.raises(ValueError, match="canonical"):
        r.set_desired(KernelState(routes=frozenset({Route(TABLE, "10.0.0.1/8", "vx-bridge", "10.240.0.2")})))
