"""The Reconciler, the raw codec and the event monitor on a real kernel, in a throwaway netns.

Each test gets a fresh namespace (``netns`` fixture) with a veth underlay holding 198.18.0.1/24,
and checks the kernel state with ``ip -j`` / ``bridge -j`` rather than with our own parser.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import threading
from typing import Any

import pytest

from fabric.netlink.dataplane import KernelDataplane, NhRoute, UnderlayError
from fabric.netlink.events import EventMonitor
from fabric.netlink.objects import (
    RT_TABLE_MAIN,
    RTPROT_FABRIC,
    Address,
    FdbEntry,
    KernelState,
    Neighbour,
    Route,
    VxlanLink,
)
from fabric.netlink.reconciler import Reconciler
from tests.privileged.kernelns import TABLE, bridge_state, ipj, sh
from tests.waiting import wait_until

NAMES = frozenset({"vx-bridge"})


def desired(dp: KernelDataplane, peers: int = 3) -> KernelState:
    ul = dp.underlay_link("198.18.0.1")
    link = VxlanLink("vx-bridge", 54, 4876, "02:00:00:00:00:01", "198.18.0.1", ul.ifindex, ul.mtu - 50)
    neigh, fdb, routes = set(), set(), set()
    for i in range(2, 2 + peers):
        mac = f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}"
        overlay = str(ipaddress.ip_address("10.240.0.0") + i)
        neigh.add(Neighbour("vx-bridge", overlay, mac))
        fdb.add(FdbEntry("vx-bridge", mac, str(ipaddress.ip_address("198.18.0.0") + i)))
        fdb.add(FdbEntry("vx-bridge", "00:00:00:00:00:00", str(ipaddress.ip_address("198.18.0.0") + i)))
        routes.add(Route(TABLE, f"10.{i >> 8}.{i & 255}.0/24", "vx-bridge", overlay))
    return bridge_state(link, neigh, fdb, routes)


def kernel_view(netns: str) -> dict[str, Any]:
    """What iproute2 shows of our objects, normalised for comparison with a KernelState."""
    links = {li["ifname"]: li for li in ipj(netns, "-d", "link", "show") if li["ifname"].startswith("vx-")}
    if "vx-bridge" not in links:
        return {"links": links, "nexthops": {nh["id"]: nh for nh in ipj(netns, "nexthop", "show")},
                "rules": {(r.get("priority"), r.get("table"), r.get("protocol")) for r in ipj(netns, "rule", "show")}}
    nhs = {nh["id"]: nh for nh in ipj(netns, "nexthop", "show")}
    routes = set()
    for r in ipj(netns, "route", "show", "table", str(TABLE)):
        if r.get("protocol") not in ("75", 75):
            continue
        nh = nhs[r["nhid"]]
        routes.add(Route(TABLE, r["dst"], nh["dev"], nh["gateway"]))
    return {
        "links": links,
        "addresses": {
            Address(a["ifname"], f"{i['local']}/{i['prefixlen']}")
            for a in ipj(netns, "addr", "show", "dev", "vx-bridge")
            for i in a["addr_info"] if i["family"] == "inet"
        },
        "rules": {(r.get("priority"), r.get("table"), r.get("protocol")) for r in ipj(netns, "rule", "show")},
        "neighbours": {
            Neighbour("vx-bridge", n["dst"], n["lladdr"])
            for n in ipj(netns, "neigh", "show", "dev", "vx-bridge", "nud", "permanent")
        },
        "fdb": {
            FdbEntry("vx-bridge", f["mac"], f["dst"])
            for f in ipj(netns, "fdb", "show", "dev", "vx-bridge", tool="bridge")
        },
        "routes": routes,
        "nexthops": nhs,
    }


def assert_programmed(netns: str, want: KernelState) -> None:
    view = kernel_view(netns)
    vx = view["links"]["vx-bridge"]
    info = vx["linkinfo"]["info_data"]
    (link,) = want.links
    assert (info["id"], info["port"], info["local"], vx["address"], vx["mtu"]) == (
        link.vni, link.port, link.local, link.mac, link.mtu
    )
    assert info["learning"] is False and "UP" in vx["flags"]
    assert view["addresses"] == set(want.addresses)
    assert (200, "200", "75") in {(p, str(t), str(pr)) for p, t, pr in view["rules"]}
    assert view["neighbours"] == set(want.neighbours)
    assert view["fdb"] == set(want.fdb)
    assert view["routes"] == set(want.routes)
    for nh in view["nexthops"].values():
        assert "onlink" in nh["flags"] and str(nh["protocol"]) == "75"


def test_underlay_lookup(dp: KernelDataplane) -> None:
    ul = dp.underlay_link("198.18.0.1")
    assert ul.name == "ul0" and ul.mtu == 1500
    with pytest.raises(UnderlayError, match=r"198\.18\.9\.9"):
        dp.underlay_link("198.18.9.9")


def test_program_drift_repair_and_cleanup(netns: str, dp: KernelDataplane) -> None:
    # someone else's objects in our table and rules: must survive everything below
    sh(netns, "route", "add", "10.99.0.0/16", "via", "198.18.0.254", "dev", "ul0", "table", str(TABLE),
       "proto", "static")
    sh(netns, "rule", "add", "priority", "300", "lookup", str(TABLE))
    want = desired(dp)
    rec = Reconciler(dp, table=TABLE, rule_priority=200, link_names=NAMES)
    rec.set_desired(want)
    report = rec.apply()
    assert report.failures == 0, report.first_error
    assert_programmed(netns, want)
    assert rec.programmed_counts() == rec.desired_counts()

    # drift: delete a route, an FDB entry, a neighbour and a nexthop by hand; add an extraneous FDB
    sh(netns, "route", "del", "10.0.2.0/24", "table", str(TABLE))
    subprocess.run(["bridge", "-n", netns, "fdb", "del", "02:00:00:00:00:03", "dev", "vx-bridge", "dst",
                    "198.18.0.3"], check=True)
    sh(netns, "neigh", "del", "10.240.0.4", "dev", "vx-bridge")
    subprocess.run(["bridge", "-n", netns, "fdb", "append", "00:00:00:00:00:00", "dev", "vx-bridge", "dst",
                    "198.18.0.99"], check=True)
    rec.resync()
    report = rec.apply()
    assert report.failures == 0, report.first_error
    assert report.tables["routes"].adds == 1 and report.tables["fdb"].adds == 1 and report.tables["fdb"].deletes == 1
    assert_programmed(netns, want)

    # the device itself deleted by hand: recreated with everything on it in one pass
    sh(netns, "link", "del", "vx-bridge")
    rec.resync()
    report = rec.apply()
    assert report.failures == 0, report.first_error
    assert_programmed(netns, want)

    # the device set down by hand: the kernel flushed its neighbours, nexthops and routes
    sh(netns, "link", "set", "vx-bridge", "down")
    rec.resync()
    report = rec.apply()
    assert report.failures == 0, report.first_error
    assert report.tables["links"].updates == 1 and report.tables["routes"].adds == 3
    assert_programmed(netns, want)

    # a restarted agent (new Reconciler) reuses nexthop ids and changes nothing
    ids = set(kernel_view(netns)["nexthops"])
    again = Reconciler(dp, table=TABLE, rule_priority=200, link_names=NAMES)
    again.resync()
    assert again.apply().changes == 0  # no desired state yet: nothing may be deleted
    again.set_desired(want)
    assert again.apply().changes == 0
    assert set(kernel_view(netns)["nexthops"]) == ids

    report = again.cleanup_all()
    assert report.failures == 0, report.first_error
    view = kernel_view(netns)
    assert view["links"] == {} and view["nexthops"] == {}
    assert not [r for r in view["rules"] if str(r[2]) == "75"]
    left = ipj(netns, "route", "show", "table", str(TABLE))
    assert [r["dst"] for r in left] == ["10.99.0.0/16"]  # the foreign route
    assert (300, str(TABLE)) in {(r.get("priority"), str(r.get("table"))) for r in ipj(netns, "rule", "show")}


def test_moving_to_the_main_table_takes_our_old_table_and_rule_along(netns: str, dp: KernelDataplane) -> None:
    """An agent upgraded from table 200 with its rule (the default before 2026-12) to ``main``:
    the kernel's dump of every table finds our routes left in 200, they and the rule go, the
    routes are in main (with our protocol), and someone else's route in table 200 stays."""
    old = desired(dp)
    rec = Reconciler(dp, table=TABLE, rule_priority=200, link_names=NAMES)
    rec.set_desired(old)
    assert rec.apply().failures == 0
    sh(netns, "route", "add", "10.99.0.0/16", "via", "198.18.0.254", "dev", "ul0", "table", str(TABLE),
       "proto", "static")  # fmt: skip
    new = dataclasses.replace(
        old, rules=frozenset(), routes=frozenset(dataclasses.replace(r, table=RT_TABLE_MAIN) for r in old.routes)
    )
    rec = Reconciler(dp, table=RT_TABLE_MAIN, rule_priority=200, link_names=NAMES)  # a restarted agent
    rec.set_desired(new)
    report = rec.apply()
    assert report.failures == 0, report.first_error
    assert [r["dst"] for r in ipj(netns, "route", "show", "table", str(TABLE))] == ["10.99.0.0/16"]
    main = {r["dst"] for r in ipj(netns, "route", "show", "table", "main", "proto", str(RTPROT_FABRIC))}
    assert main == {r.dst for r in old.routes}
    assert not [r for r in ipj(netns, "-d", "rule", "show") if str(r.get("protocol")) == str(RTPROT_FABRIC)]
    assert rec.programmed_counts() == rec.desired_counts()
    assert rec.apply().changes == 0  # converged: a second pass changes nothing


def test_route_taking_the_prefix_of_an_address_going_away_lands_in_the_same_pass(
    netns: str, dp: KernelDataplane
) -> None:
    """The kernel's side of a node changing role with routes in ``main``: the connected route of
    vx-bridge's 10.240.0.1/8 holds 10.0.0.0/8 until the address goes (a delete, after the adds),
    so the route that takes the prefix over is refused once and lands after the deletes."""
    old = desired(dp)
    old = dataclasses.replace(
        old, rules=frozenset(), routes=frozenset(dataclasses.replace(r, table=RT_TABLE_MAIN) for r in old.routes)
    )
    rec = Reconciler(dp, table=RT_TABLE_MAIN, rule_priority=200, link_names=NAMES)
    rec.set_desired(old)
    assert rec.apply().failures == 0
    held = ipj(netns, "route", "show", "table", "main", "exact", "10.0.0.0/8")
    assert [str(r.get("protocol")) for r in held] == ["kernel"]
    via_peer = Route(RT_TABLE_MAIN, "10.0.0.0/8", "vx-bridge", "10.240.0.2")
    rec.set_desired(dataclasses.replace(old, addresses=frozenset(), routes=old.routes | {via_peer}))
    report = rec.apply()
    assert report.failures == 0 and not report.resync_needed, report.first_error
    held = ipj(netns, "route", "show", "table", "main", "exact", "10.0.0.0/8")
    assert [str(r.get("protocol")) for r in held] == [str(RTPROT_FABRIC)]
    assert rec.apply().changes == 0


def test_raw_codec_round_trip(netns: str, dp: KernelDataplane) -> None:
    rec = Reconciler(dp, table=TABLE, rule_priority=200, link_names=NAMES)
    want = desired(dp, peers=300)
    rec.set_desired(want)
    assert rec.apply().failures == 0
    permanent = {Neighbour(n.link, n.ip, n.mac) for n in dp.list_neighbours("vx-bridge") if n.state & 0x80}
    assert permanent == set(want.neighbours)
    assert set(dp.list_fdb("vx-bridge")) == set(want.fdb)
    nhs = {nh.id: nh for nh in dp.list_nexthops()}
    got = {Route(r.table, r.dst, nhs[r.nhid].link, nhs[r.nhid].gateway) for r in dp.list_routes(TABLE, RTPROT_FABRIC)}
    assert got == set(want.routes)
    # per-entry errors map back to the right index inside one batch
    errs = dp.add_routes([NhRoute(TABLE, "10.200.0.0/16", 0x7FFFFFF0), NhRoute(TABLE, "10.0.2.0/24", next(iter(nhs))),
                          NhRoute(TABLE, "10.201.0.0/16", next(iter(nhs)))])
    assert [(e.index, e.errno) for e in errs] == [(0, 22), (1, 17)]
    assert "10.201.0.0/16" in {r["dst"] for r in ipj(netns, "route", "show", "table", str(TABLE))}


def test_event_monitor_reports_link_deletion_and_route_loss(netns: str, dp: KernelDataplane) -> None:
    rec = Reconciler(dp, table=TABLE, rule_priority=200, link_names=NAMES)
    rec.set_desired(desired(dp))
    assert rec.apply().failures == 0
    reasons: list[str] = []
    seen = threading.Event()

    def callback(reason: str) -> None:
        reasons.append(reason)
        seen.set()

    mon = EventMonitor(callback, NAMES, TABLE, netns=netns)
    mon.start()
    try:
        # Our own changes through the raw socket are not reported. Proof without a quiet period:
        # the monitor reads one socket in the kernel's order, so the notifications of our deletes
        # (route, nexthop, neighbour, FDB entry) arrive before that of the foreign delete below;
        # when the foreign one is the first reason, none of ours was reported.
        rec.set_desired(desired(dp, peers=2))
        assert rec.apply().tables["routes"].deletes == 1
        sh(netns, "route", "del", "10.0.2.0/24", "table", str(TABLE))
        assert seen.wait(5)
        assert reasons and "route 10.0.2.0/24 deleted" in reasons[0], reasons
        seen.clear()
        sh(netns, "link", "set", "vx-bridge", "down")
        assert seen.wait(5)
        assert any("link vx-bridge set down" in r for r in reasons), reasons
        sh(netns, "link", "del", "vx-bridge")
        wait_until(lambda: any("link vx-bridge deleted" in r for r in reasons), 5, "vx-bridge's deletion reported")
    finally:
        mon.stop()
