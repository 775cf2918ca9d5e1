"""Active/active gateways in the control plane (issue 21 section 2): the election of N actives,
the plan's nexthop groups (``RouteEntry.vias``) on remote and internal nodes, what a failure of
one active changes, and the incremental planner against ``plan()`` with active/active clusters.

No root needed. The kernel side (resilient nexthop groups) is in
tests/privileged/test_nexthop_groups.py.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from fabric import topology as topology_file
from fabric import types
from fabric.control import active_active, codec, election, incremental, planner
from tests.unit import test_incremental_planner as rand

GW = types.ClusterMode.GATEWAY
P2P = types.ClusterMode.P2P

CONFIG = types.FabricConfig(
    clusters=(
        types.ClusterConfig("east", P2P, ("10.10.0.0/16",), ("10.96.0.0/20",)),
        types.ClusterConfig(
            "west", GW, ("10.20.0.0/16",), ("10.97.0.0/20",), gateways=("w1", "w2", "w3"), active_gateways=2
        ),
        types.ClusterConfig("north", GW, ("10.30.0.0/16",), ("10.98.0.0/20",), gateways=("n1", "n2")),
    )
)
E1 = types.NodeAnnouncement("east", "e1", "198.18.0.11", ("10.10.1.0/24",))
W = [types.NodeAnnouncement("west", f"w{i}", f"198.18.0.2{i}", (f"10.20.{i}.0/24",)) for i in range(1, 5)]
N1 = types.NodeAnnouncement("north", "n1", "198.18.0.31", ("10.30.1.0/24",))
N2 = types.NodeAnnouncement("north", "n2", "198.18.0.32", ("10.30.2.0/24",))
NODES = (E1, *W, N1, N2)


def build(
    nodes: tuple[types.NodeAnnouncement, ...] = NODES,
    unreachable: dict[types.NodeKey, int] | None = None,
    before: types.Topology | None = None,
) -> types.Topology:
    t = types.Topology(CONFIG)
    for n in nodes:
        t = t.with_node(n)
    if before is not None:
        t = t.with_roles(before.roles)
    return t.with_roles(election.elect(t, {n.key for n in nodes}, unreachable or {}))


def bridge_ip(n: types.NodeAnnouncement) -> str:
    return planner.overlay_address(n.underlay_ip, types.DEFAULT_BRIDGE_CIDR_V4).partition("/")[0]


def local_ip(n: types.NodeAnnouncement) -> str:
    return planner.overlay_address(n.underlay_ip, types.DEFAULT_LOCAL_CIDR_V4).partition("/")[0]


def route(state: types.NodeState, dst: str) -> types.RouteEntry:
    found = [r for r in state.routes if r.dst == dst]
    assert found, f"no route to {dst} in {[r.dst for r in state.routes]}"
    return found[0]


# -- the pure pieces -------------------------------------------------------------------------


def test_pick_also_active_is_sticky_and_takes_only_healthy_candidates() -> None:
    order = {"a": 0, "b": 1, "c": 2, "d": 3}

    def rank(n: str) -> tuple[int, ...]:
        return (order[n],)

    cands = ["a", "b", "c", "d"]
    assert active_active.pick_also_active(1, cands, "a", (), set(cands), rank) == ()
    assert active_active.pick_also_active(3, cands, "a", (), set(cands), rank) == ("b", "c")
    # "d" holds the place while healthy, though "b" ranks better: its flows must not move.
    assert active_active.pick_also_active(2, cands, "a", ("d",), set(cands), rank) == ("d",)
    # "d" reported: dropped at once, the best healthy candidate takes the place; never "c" (unhealthy).
    assert active_active.pick_also_active(3, cands, "a", ("d", "b"), {"a", "b"}, rank) == ("b",)
    # The active itself is never also-active; a candidate that left the topology neither.
    assert active_active.pick_also_active(2, ["a", "c"], "a", ("a", "b"), {"a", "b", "c"}, rank) == ("c",)


def test_route_vias_sorts_numerically_and_keeps_a_group_of_one() -> None:
    assert active_active.route_vias(["10.0.0.9", "10.0.0.10"], 2) == ("10.0.0.9", ("10.0.0.9", "10.0.0.10"))
    assert active_active.route_vias(["10.0.0.10", "10.0.0.9"], 2) == ("10.0.0.10", ("10.0.0.9", "10.0.0.10"))
    assert active_active.route_vias(["10.0.0.10"], 3) == ("10.0.0.10", ("10.0.0.10",))
    assert active_active.route_vias(["10.0.0.10", "10.0.0.9"], 1) == ("10.0.0.10", ())
    with pytest.raises(ValueError, match="at least one active gateway"):
        active_active.route_vias([], 2)


# -- election --------------------------------------------------------------------------------


def test_election_picks_two_actives_and_a_standby_outside_them() -> None:
    t = build()
    west = t.role("west")
    assert west is not None
    assert (west.active, west.also_active, west.standby) == ("w1", ("w2",), "w3")
    north = t.role("north")
    assert north is not None and north.also_active == () and north.standby == "n2"


def test_a_failed_also_active_is_replaced_by_the_standby_and_the_active_stays() -> None:
    t = build()
    t2 = build(unreachable={W[1].key: 3}, before=t)
    west = t2.role("west")
    assert west is not None
    assert (west.active, west.also_active) == ("w1", ("w3",))
    # A failed primary: the other active takes over the first place and keeps serving.
    t3 = build(unreachable={W[0].key: 3}, before=t)
    west = t3.role("west")
    assert west is not None
    assert west.active == "w2" and "w1" not in west.actives and len(west.actives) == 2


# -- the plan --------------------------------------------------------------------------------


def test_remote_nodes_route_the_cluster_over_every_active_gateway() -> None:
    t = build()
    plans = planner.plan_all(t)
    e1 = plans[E1.key]
    want = tuple(sorted((bridge_ip(W[0]), bridge_ip(W[1])), key=lambda ip: tuple(map(int, ip.split(".")))))
    for dst in ("10.20.0.0/16", "10.97.0.0/20"):
        r = route(e1, dst)
        assert r.device == "vx-bridge" and r.vias == want and r.via == bridge_ip(W[0])
    # Both actives (and the standby) are bridge peers the remote node probes; not the internal w4.
    probed = {p.overlay_ip for p in e1.peers if p.device == "vx-bridge" and p.probe}
    assert {bridge_ip(W[0]), bridge_ip(W[1]), bridge_ip(W[2])} <= probed
    assert bridge_ip(W[3]) not in {p.overlay_ip for p in e1.peers}
    # A single-active cluster is planned as before: no group.
    assert route(e1, "10.30.0.0/16").vias == ()
    assert route(e1, "10.30.0.0/16").via == bridge_ip(N1)


def test_internal_nodes_and_the_standby_route_over_every_active_gateway() -> None:
    plans = planner.plan_all(build())
    want = (local_ip(W[0]), local_ip(W[1]))
    for n in (W[2], W[3]):
        for dst in ("10.10.0.0/16", "10.30.0.0/16", "10.96.0.0/20"):
            r = route(plans[n.key], dst)
            assert (r.device, r.via, r.vias) == ("vx-local", local_ip(W[0]), want), (n.name, dst)
    # Each active routes over vx-bridge, straight to the owners.
    for n in W[:2]:
        assert {r.device for r in plans[n.key].routes} == {"vx-bridge"}
        assert route(plans[n.key], "10.10.1.0/24").via == bridge_ip(E1)
    # The internal node peers with every hot node (two actives + standby) and nothing else.
    w4_peers = {p.node for p in plans[W[3].key].peers}
    assert w4_peers == {"west/w1", "west/w2", "west/w3"}


def test_losing_one_active_removes_only_it_from_every_group() -> None:
    t = build()
    before = planner.plan_all(t)
    after = planner.plan_all(build(unreachable={W[1].key: 3}, before=t))
    for viewer, dev, addr in ((E1, "vx-bridge", bridge_ip), (W[3], "vx-local", local_ip)):
        old = {r.dst: r for r in before[viewer.key].routes if r.vias}
        new = {r.dst: r for r in after[viewer.key].routes if r.vias}
        assert old and set(old) == set(new), viewer.name
        for dst, r in old.items():
            assert set(r.vias) - set(new[dst].vias) == {addr(W[1])}, (viewer.name, dst)
            assert addr(W[0]) in new[dst].vias and new[dst].device == dev
            assert new[dst].via == r.via  # the first active did not change


def test_default_config_plans_no_group() -> None:
    config = dataclasses.replace(
        CONFIG, clusters=tuple(dataclasses.replace(c, active_gateways=1) for c in CONFIG.clusters)
    )
    t = types.Topology(config)
    for n in NODES:
        t = t.with_node(n)
    t = t.with_roles(election.elect(t, {n.key for n in NODES}, {}))
    assert all(r.also_active == () for r in t.roles)
    assert all(not r.vias for s in planner.plan_all(t).values() for r in s.routes)


def test_route_groups_survive_the_wire() -> None:
    e1 = planner.plan_all(build())[E1.key]
    grouped = [r for r in e1.routes if r.vias]
    assert grouped
    for r in e1.routes:
        assert codec.entry_from_pb(codec.entry_to_pb(r)) == r


def test_incremental_planner_equals_plan_with_active_active_clusters() -> None:
    steps = grouped = 0
    for seed in range(12):
        rng = random.Random(1000 + seed)
        config = rand.random_config(rng)
        config = dataclasses.replace(
            config,
            clusters=tuple(
                dataclasses.replace(c, active_gateways=rng.randint(2, 3)) if c.mode == GW else c
                for c in config.clusters
            ),
        )
        topo = types.Topology(config)
        inc = incremental.IncrementalPlanner()
        for _ in range(10):
            topo = rand.with_valid(topo, rand.random_node(rng, topo.config))
        topo = rand.elected(rng, topo)
        before = rand.check(inc, {}, topo, inc.update(topo))
        for _ in range(20):
            topo = rand.elected(rng, rand.with_valid(topo, rand.random_node(rng, topo.config)))
            if rng.random() < 0.3 and topo.nodes:
                topo = rand.elected(rng, topo.without_node(rng.choice(topo.nodes).key))
            before = rand.check(inc, before, topo, inc.update(topo))
            steps += 1
            grouped += any(r.vias for s in before.values() for r in s.routes)
    assert steps == 240
    assert grouped > steps // 3, f"only {grouped} of {steps} steps planned a nexthop group: the test is vacuous"


# -- the topology file -----------------------------------------------------------------------


def _doc(**west: object) -> dict[str, object]:
    return {"clusters": [
        {"name": "west", "mode": "gateway", "podCIDRs": ["10.20.0.0/16"],
         "nodes": [{"name": "w1"}, {"name": "w2"}, {"name": "w3"}], **west},
        {"name": "east", "mode": "p2p", "podCIDRs": ["10.10.0.0/16"], "nodes": [{"name": "e1"}]},
    ]}  # fmt: skip


def test_topology_file_active_gateways() -> None:
    parsed = topology_file.parse(_doc(activeGateways=2))
    assert [c.config.active_gateways for c in parsed.clusters] == [2, 1]
    assert [c.config.active_gateways for c in topology_file.parse(_doc()).clusters] == [1, 1]
    for bad, words in (
        ({"activeGateways": 0}, "an integer from 1 to"),
        ({"activeGateways": 4}, "has only 3 nodes"),
        ({"activeGateways": 3, "gateways": ["w1", "w2"]}, "has only 2 gateway candidates"),
        ({"activeGateways": "2"}, "an integer from 1 to"),
    ):
        with pytest.raises(topology_file.TopologyError, match=words):
            topology_file.parse(_doc(**bad))
    doc = _doc()
    doc["clusters"][1]["activeGateways"] = 2  # type: ignore[index]
    with pytest.raises(topology_file.TopologyError, match="only gateway mode has them"):
        topology_file.parse(doc)


# -- the agent's rendering -------------------------------------------------------------------


def test_render_keeps_the_group_members_that_have_a_peer() -> None:
    from fabric.agent import render

    e1 = planner.plan_all(build())[E1.key]
    ks = render.render(e1, underlay_ifindex=7, table=200, rule_priority=200)
    (west,) = [r for r in ks.routes if r.dst == "10.20.0.0/16"]
    assert west.group == route(e1, "10.20.0.0/16").vias and west.gateway == bridge_ip(W[0])
    # A member whose peer is not planned is left out of the group, never programmed blind.
    missing = bridge_ip(W[1])
    cut = dataclasses.replace(e1, peers=tuple(p for p in e1.peers if p.overlay_ip != missing))
    (west,) = [r for r in render.render(cut, underlay_ifindex=7, table=200, rule_priority=200).routes
               if r.dst == "10.20.0.0/16"]  # fmt: skip
    assert west.group == (bridge_ip(W[0]),)


def test_probe_targets_include_every_active_gateway() -> None:
    from fabric.control import reachability_rules
    from tests.unit.test_reachability import planned_probes

    t = build()
    targets = reachability_rules.probe_targets(t)
    assert targets == planned_probes(t)
    assert {W[0].key, W[1].key, W[2].key} <= targets[E1.key]  # both actives and the standby


def test_status_names_every_active_gateway() -> None:
    """The status carries the actives beside ``active_gateway`` over the wire; ``role_of`` calls
    each of them active and ``fabric-tool status`` lists them all."""
    from fabric.control import api
    from fabric.control.generated import fabric_pb2 as pb
    from tools import cli

    west = api.ClusterStatus(name="west", mode="gateway", pod_cidrs=("10.20.0.0/16",), service_cidrs=(), nodes=(),
                             active_gateway="w1", standby_gateway="w3", gateways=("w1", "w2", "w3"),
                             also_active_gateways=("w2",))
    status = api.FabricStatus(epoch="e", generation=1, holding=False, clusters=(west,))
    back = codec.status_from_pb(pb.GetStatusResponse.FromString(codec.status_to_pb(status).SerializeToString()))
    assert back == status
    assert [west.role_of(n) for n in ("w1", "w2", "w3", "w4")] == ["active", "active", "standby", ""]
    assert "cluster west: active gateways w1, w2, standby w3," in cli.render_fabric_status("t", status)
    single = dataclasses.replace(west, also_active_gateways=())
    text = cli.render_fabric_status("t", dataclasses.replace(status, clusters=(single,)))
    assert "cluster west: active gateway w1, standby w3," in text


def test_an_also_active_gateway_dropping_out_counts_as_a_move_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reflector counts every active gateway that lost its role (``gateway_moves``), not
    only the first one, and says which one went and why."""
    from fabric.control import reflector

    refl = reflector.Reflector(CONFIG, startup_hold=0)
    before = types.Topology(CONFIG, (), (types.GatewayRole("west", "w1", "w3", ("w2",)),))
    after = types.Topology(CONFIG, (), (types.GatewayRole("west", "w1", "w2", ("w3",)),))
    with caplog.at_level("INFO", logger="fabric.control.reflector"):
        refl._log_moves(before, after)
    assert refl._gateway_moves == {"west": 1}
    assert "cluster west: active gateway w2 drops out (it left the topology); active now w1, w3" in caplog.text
    refl._log_moves(after, after)  # nothing changed: nothing counted
    assert refl._gateway_moves == {"west": 1}
