"""Incremental planning (incremental.IncrementalPlanner and the plan parts) against the reference
``plan()``: random sequences of joins, leaves, re-announcements, role moves and configuration
changes over random P2P / gateway-mode / dual-stack / global-IP fabrics. After every step the
state held for every node must equal ``plan(topology, node)``, every delta returned must equal
``diff_states(previous plan, new plan)``, and the parts of every plan must be disjoint and add up
to it. A second group counts planner work (parts computed, full plans) per join, so O(1) per
viewer is proven by counting, not by timing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random

import pytest

from fabric import types
from fabric.control import admission, election, incremental, planner

P2P, GW = types.ClusterMode.P2P, types.ClusterMode.GATEWAY
FAMILY_CHOICES = ((4,), (6,), (4, 6), (6, 4))
NODES_PER_CLUSTER = 5


def _cluster(rng: random.Random, i: int) -> types.ClusterConfig:
    fams = rng.choice(FAMILY_CHOICES)
    pods = {4: f"10.{10 + i}.0.0/16", 6: f"fd00:10:{10 + i:x}::/48"}
    svcs = {4: f"10.{96 + i}.0.0/20", 6: f"fd00:10:{96 + i:x}::/112"}
    globs = {4: f"172.{20 + i}.0.0/16", 6: f"fd00:e0:{i:x}::/48"}
    services = tuple(svcs[f] for f in fams) if rng.random() < 0.7 else ()
    glob: tuple[tuple[str, str], ...] = ()
    if rng.random() < 0.4:
        glob = types.frozen_mapping({pods[f]: globs[f] for f in fams if rng.random() < 0.8})
    gateways: tuple[str, ...] = ()
    if rng.random() < 0.5:
        gateways = tuple(rng.sample([f"n{j}" for j in range(NODES_PER_CLUSTER)], 3))
    mode = rng.choice((P2P, GW))
    # Node subnets that hold some of the cluster's nodes (random_node's underlays) and leave the
    # others (and every re-announced variant) outside: both kinds of vx-local route.
    subnets = {4: f"198.18.0.{(10 + 10 * i) & ~7}/29", 6: str(ipaddress.ip_network(f"fd00:198:18::{10 + 10 * i:x}/126",
                                                                                   strict=False))}
    nodes = tuple(subnets[f] for f in fams) if mode is GW and rng.random() < 0.5 else ()
    return types.ClusterConfig(
        name=f"c{i}",
        mode=mode,
        node_cidrs=nodes,
        pod_cidrs=tuple(pods[f] for f in fams),
        service_cidrs=services,
        gateways=gateways,
        global_cidrs=glob,
        ip_families=fams,
    )


def random_config(rng: random.Random) -> types.FabricConfig:
    return types.FabricConfig(clusters=tuple(_cluster(rng, i) for i in range(rng.randint(2, 4))))


def random_node(
    rng: random.Random, config: types.FabricConfig, variant: int = 0, key: types.NodeKey | None = None
) -> types.NodeAnnouncement:
    """Node ``n<j>`` of a random cluster (or node ``key``); ``variant`` changes its underlay
    address and MTU (a re-announcement); a dual-stack node sometimes lacks one family's underlay."""
    names = [c.name for c in config.clusters]
    i = names.index(key.cluster) if key is not None else rng.randrange(len(config.clusters))
    c = config.clusters[i]
    j = int(key.name[1:]) if key is not None else rng.randrange(NODES_PER_CLUSTER)
    host = 10 + i * 10 + j + 100 * variant
    fams = list(c.families)
    if len(fams) == 2 and rng.random() < 0.2:
        fams = [fams[0]]
    underlays = [f"198.18.{variant}.{host % 250 + 1}" if f == 4 else f"fd00:198:18::{host:x}" for f in fams]
    pods = []
    for f in fams:
        if rng.random() < 0.9:
            pods.append(f"10.{10 + i}.{j}.0/24" if f == 4 else f"fd00:10:{10 + i:x}:{j}::/64")
    return types.NodeAnnouncement(
        c.name, f"n{j}", underlays[0], tuple(pods), underlay_mtu=1500 - 10 * variant,
        extra_underlay_ips=tuple(underlays[1:]),
    )  # fmt: skip


def with_valid(topo: types.Topology, ann: types.NodeAnnouncement) -> types.Topology:
    """What the reflector does with an announcement: adopt it if valid, ignore it if refused."""
    return topo if admission.validate_announcement(topo, ann) else topo.with_node(ann)


def revalidated(config: types.FabricConfig, topo: types.Topology) -> types.Topology:
    """A configuration change: keep the nodes still valid (in key order), keep the roles."""
    out = dataclasses.replace(topo, config=config, nodes=())
    for n in topo.nodes:
        out = with_valid(out, n)
    return out


def elected(rng: random.Random, topo: types.Topology) -> types.Topology:
    """Roles from a random liveness view (some nodes disconnected, some reported)."""
    connected = {n.key for n in topo.nodes if rng.random() < 0.8}
    scores = {n.key: rng.randint(1, 3) for n in topo.nodes if rng.random() < 0.15}
    return topo.with_roles(election.elect(topo, connected, scores))


def step(rng: random.Random, topo: types.Topology) -> types.Topology:
    op = rng.random()
    if op < 0.45:
        topo = with_valid(topo, random_node(rng, topo.config))
    elif op < 0.55 and topo.nodes:
        topo = topo.without_node(rng.choice(topo.nodes).key)
    elif op < 0.7 and topo.nodes:
        key = rng.choice(topo.nodes).key
        topo = with_valid(topo, random_node(rng, topo.config, variant=rng.randint(0, 2), key=key))
    elif op < 0.95:
        pass  # only the roles change (below)
    else:
        config = topo.config
        clusters = list(config.clusters)
        k = rng.randrange(len(clusters))
        clusters[k] = dataclasses.replace(_cluster(rng, k), name=clusters[k].name)
        topo = revalidated(dataclasses.replace(config, clusters=tuple(clusters)), topo)
    return elected(rng, topo)


def check(inc: incremental.IncrementalPlanner, before: dict[types.NodeKey, types.NodeState], topo: types.Topology,
          deltas: dict[types.NodeKey, types.StateDelta]) -> dict[types.NodeKey, types.NodeState]:  # fmt: skip
    after = planner.plan_all(topo)
    for key, want in after.items():
        assert inc.state(key) == want, f"incremental state of {key} differs from plan()"
        prev = before.get(key, types.NodeState())
        expect = types.diff_states(prev, want)
        assert deltas.get(key, types.StateDelta()) == expect, f"delta of {key} is not diff_states(previous, new)"
        parts = incremental.plan_parts(topo, key)
        keys = [k for p in parts.values() for k in p]
        assert len(keys) == len(set(keys)), f"parts of {key} overlap"
        assert incremental.state_from_entries({k: e for p in parts.values() for k, e in p.items()}) == want
    assert set(deltas) <= set(after)
    return after


def test_incremental_equals_plan_over_random_changes() -> None:
    steps = 0
    for seed in range(30):
        rng = random.Random(seed)
        topo = types.Topology(random_config(rng))
        inc = incremental.IncrementalPlanner()
        for _ in range(8):
            topo = with_valid(topo, random_node(rng, topo.config))
        topo = elected(rng, topo)
        before = check(inc, {}, topo, inc.update(topo))
        for _ in range(30):
            topo = step(rng, topo)
            before = check(inc, before, topo, inc.update(topo))
            steps += 1
    assert steps == 900


def test_shared_deltas_for_one_class() -> None:
    """Viewers of one class get one StateDelta object (one message can serve them all)."""
    a, b = types.ClusterConfig("a", P2P, ("10.10.0.0/16",)), types.ClusterConfig("b", P2P, ("10.20.0.0/16",))
    cfg = types.FabricConfig(clusters=(a, b))
    topo = types.Topology(cfg)
    for i in range(6):
        topo = topo.with_node(types.NodeAnnouncement("b", f"b{i}", f"198.18.1.{i + 1}", (f"10.20.{i}.0/24",)))
    inc = incremental.IncrementalPlanner()
    inc.update(topo)
    deltas = inc.update(topo.with_node(types.NodeAnnouncement("a", "a1", "198.18.0.1", ("10.10.1.0/24",))))
    assert len({id(deltas[types.NodeKey("b", f"b{i}")]) for i in range(6)}) == 1
    assert len(deltas[types.NodeKey("b", "b0")]) == 2  # the joiner's peer and route


def test_equal_entries_of_different_plans_are_one_object() -> None:
    """Plans hold one object per distinct entry value (issue 21: memory per agent), whether the
    entry came from a full plan or a delta; the table forgets entries no plan holds once it has
    been rebuilt."""
    topo = _fabric(60)
    inc = incremental.IncrementalPlanner()
    inc.update(topo)
    joiner = types.NodeAnnouncement("p", "joiner", "198.18.200.1", ("10.127.0.0/24",))
    new = topo.with_node(joiner)
    inc.update(new.with_roles(election.elect(new, {x.key for x in new.nodes}, {})))
    by_value: dict[types.Entry, set[int]] = {}
    for x in new.nodes:
        for e in inc.entries(x.key).values():
            by_value.setdefault(e, set()).add(id(e))
    shared = [e for e, ids in by_value.items() if len(ids) > 1]
    assert not shared, f"{len(shared)} entry values held as several objects, e.g. {shared[0]}"
    assert sum(len(inc.entries(x.key)) for x in new.nodes) > 3 * len(by_value)  # the case is one of sharing
    # The joiner leaves: once rebuilt, the table holds only what the plans hold.
    gone = {e for e in inc.entries(joiner.key).values()}
    inc.update(topo.with_roles(election.elect(topo, {x.key for x in topo.nodes}, {})))
    held = {e for x in topo.nodes for e in inc.entries(x.key).values()}
    assert gone - held <= set(inc._canon), "not rebuilt yet: the table still holds them"
    inc._canon_rebuild_at = 0  # as if it had doubled
    inc._maybe_rebuild_canon()
    assert set(inc._canon) == held
    assert gone - held, "the joiner's own entries (its device, say) are held by nobody now"


# -- work per change, counted ------------------------------------------------------------------


def _fabric(n: int) -> types.Topology:
    """n nodes over a P2P cluster, a dual-stack P2P cluster and a gateway-mode cluster."""
    cfg = types.FabricConfig(clusters=(
        types.ClusterConfig("p", P2P, ("10.0.0.0/9",), ("10.200.0.0/20",)),
        types.ClusterConfig("d", P2P, ("10.128.0.0/10", "fd00:10::/48"), ip_families=(4, 6),
                            global_cidrs=(("10.128.0.0/10", "172.64.0.0/10"),)),
        types.ClusterConfig("g", GW, ("10.192.0.0/10",), ("10.201.0.0/20",)),
    ))  # fmt: skip
    topo = types.Topology(cfg)
    nodes = []
    for i in range(n):
        c = ("p", "d", "g")[i % 3]
        base = {"p": 0, "d": 128, "g": 192}[c]
        ul = f"198.18.{i // 250}.{i % 250 + 1}"
        pods: tuple[str, ...] = (f"10.{base + i // 3 // 256}.{i // 3 % 256}.0/24",)
        extra: tuple[str, ...] = ()
        if c == "d":
            pods += (f"fd00:10:0:{i:x}::/64",)
            extra = (f"fd00:198:18::{i + 1:x}",)
        nodes.append(types.NodeAnnouncement(c, f"{c}{i}", ul, pods, extra_underlay_ips=extra))
    topo = dataclasses.replace(topo, nodes=tuple(sorted(nodes, key=lambda x: x.key)))
    return topo.with_roles(election.elect(topo, {x.key for x in nodes}, {}))


def _work(n: int, change: str) -> tuple[int, int, int]:
    """(parts computed, full plans, delta entries of the busiest viewer already in the fabric)
    for one change."""
    topo = _fabric(n)
    inc = incremental.IncrementalPlanner()
    inc.update(topo)
    parts0, full0 = inc.counter.parts, inc.counter.full_plans
    if change == "join":
        new = topo.with_node(types.NodeAnnouncement("d", "joiner", "198.18.200.1", ("10.191.0.0/24",),
                                                    extra_underlay_ips=("fd00:198:18::ffff",)))  # fmt: skip
    elif change == "leave":
        new = topo.without_node(topo.nodes[len(topo.nodes) // 2].key)
    else:  # the P2P cluster's service gateway moves (its active gateway is disconnected)
        role = topo.role("p")
        assert role is not None
        connected = {x.key for x in topo.nodes} - {types.NodeKey("p", role.active)}
        new = topo.with_roles(election.elect(topo, connected, {}))
        assert new.role("p") != role
    new = new.with_roles(election.elect(new, {x.key for x in new.nodes}, {})) if change != "move" else new
    deltas = inc.update(new)
    for x in new.nodes[:: max(1, n // 20)]:  # spot-check against the reference
        assert inc.state(x.key) == planner.plan(new, x.key)
    old = {x.key for x in topo.nodes}
    busiest = max(len(d) for k, d in deltas.items() if k in old)
    return inc.counter.parts - parts0, inc.counter.full_plans - full0, busiest


def test_planner_work_per_change_does_not_grow_with_the_fabric() -> None:
    for change, full in (("join", 1), ("leave", 0), ("move", 0)):
        small, large = _work(24, change), _work(240, change)
        # Parts are computed once per viewer class (a handful), whatever the number of viewers.
        assert small[0] == large[0] and large[0] <= 40, (change, small, large)
        # Only the joiner is planned in full; nobody on a leave or a P2P service-gateway move.
        assert small[1] == large[1] == full, (change, small, large)
        # And what a viewer is sent does not grow with the fabric either.
        assert small[2] == large[2] <= 6, (change, small, large)



def _join_work(n: int, joins: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int]:
    """(parts computed, full plans, calls of ``planner.plan``) to adopt ``joins`` new nodes of the
    existing classes at once into a fabric of ``n`` (a flush of a bring-up), checked against the
    reference."""
    reference = planner.plan
    calls: list[types.NodeKey] = []

    def counted(topology: types.Topology, key: types.NodeKey) -> types.NodeState:
        calls.append(key)
        return reference(topology, key)

    topo = _fabric(n)
    inc = incremental.IncrementalPlanner()
    inc.update(topo)
    parts0, full0 = inc.counter.parts, inc.counter.full_plans
    new = topo
    for j in range(joins):
        c = ("p", "g")[j % 2]
        pod = f"10.{127 if c == 'p' else 250}.{j}.0/24"
        new = new.with_node(types.NodeAnnouncement(c, f"join{j}", f"198.18.{200 + j // 250}.{j % 250 + 1}", (pod,)))
    new = new.with_roles(election.elect(new, {x.key for x in new.nodes}, {}))
    with monkeypatch.context() as m:
        m.setattr(planner, "plan", counted)
        m.setattr(incremental, "plan", counted, raising=False)  # where it was imported by name
        inc.update(new)
    for x in new.nodes:
        assert inc.state(x.key) == reference(new, x.key), x.key
    return inc.counter.parts - parts0, inc.counter.full_plans - full0, len(calls)


def test_new_nodes_are_planned_from_their_class_without_visiting_every_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new node of a class the planner holds is planned from the class's union of parts (kept
    current by every update), not by :func:`planner.plan`, a walk over every node: adopting 6
    joins costs the same planner work in a fabric of 24 nodes as in one of 240 (issue 21: full
    plans of new nodes were the largest cost of a bring-up)."""
    small, large = _join_work(24, 6, monkeypatch), _join_work(240, 6, monkeypatch)
    assert small == large and large[1] == 6 and large[2] == 0, (small, large)


def _held_per_node(n: int) -> tuple[int, int]:
    """(the most entries any node's plan holds of its own, the largest plan) after a join into
    a fabric of ``n``."""
    topo = _fabric(n)
    inc = incremental.IncrementalPlanner()
    inc.update(topo)
    new = topo.with_node(types.NodeAnnouncement("p", "joiner", "198.18.200.1", ("10.127.0.0/24",)))
    new = new.with_roles(election.elect(new, {x.key for x in new.nodes}, {}))
    inc.update(new)
    for x in new.nodes[:: max(1, n // 20)]:
        assert inc.state(x.key) == planner.plan(new, x.key)
        assert inc.size(x.key) == len(planner.plan(new, x.key))
    own = max(len(p.own) + len(p.mine) for p in inc._plans.values())
    return own, max(inc.size(x.key) for x in new.nodes)


def test_a_node_holds_only_what_differs_from_its_class() -> None:
    """Per node the planner holds its self part and the keys of its own part; the rest of its
    plan is its class's union, one for all the nodes of the class (issue 21: memory per agent).
    The plans grow with the fabric (P2P nodes see every node), what a node holds does not."""
    small, large = _held_per_node(24), _held_per_node(240)
    assert large[1] > 5 * small[1], (small, large)
    assert small[0] == large[0] and large[0] < 20, (small, large)


def _gateway_fabric(clusters: int, per: int = 6) -> types.Topology:
    """``clusters`` gateway-mode clusters of ``per`` nodes (the bench's gateway shape, small)."""
    cfg = types.FabricConfig(clusters=tuple(
        types.ClusterConfig(f"c{k}", GW, (f"10.{k}.0.0/16",), (f"10.{128 + k}.0.0/20",)) for k in range(clusters)
    ))  # fmt: skip
    nodes = [
        types.NodeAnnouncement(f"c{k}", f"n{k}-{p}", f"198.18.{k}.{p + 1}", (f"10.{k}.{p}.0/24",))
        for k in range(clusters) for p in range(per)
    ]  # fmt: skip
    topo = dataclasses.replace(types.Topology(cfg), nodes=tuple(sorted(nodes, key=lambda x: x.key)))
    return topo.with_roles(election.elect(topo, {x.key for x in nodes}, {}))


def _cluster_work(clusters: int) -> tuple[int, int, int]:
    """(whole-cluster destination lists computed, routes made, viewer classes) for a join of an
    internal node into cluster c0 of a gateway fabric of ``clusters`` clusters."""
    topo = _gateway_fabric(clusters)
    inc = incremental.IncrementalPlanner()
    inc.update(topo)
    for x in topo.nodes:  # every class's union held, as in a reflector after a bring-up
        inc.entries(x.key)
    routes0 = len(inc._routes)
    # Outside c0's vx-local prefix (198.19.0.0/24, bounded by c1's nodes) and beyond every other
    # cluster's: c0's part gains a prefix, no other cluster's moves.
    new = topo.with_node(types.NodeAnnouncement("c0", "joiner", "198.18.200.1", ("10.0.200.0/24",)))
    new = new.with_roles(election.elect(new, {x.key for x in new.nodes}, {}))
    assert new.roles == topo.roles
    inc.update(new)
    for x in new.nodes[:: max(1, len(new.nodes) // 25)]:
        assert inc.state(x.key) == planner.plan(new, x.key), x.key
    dsts = planner.VIEWS.get(new).cluster_dsts
    assert {name for name, _f, _local in dsts} == {"c0"}, "only the changed cluster's destinations"
    return len(dsts), len(inc._routes) - routes0, len(inc._unions)


def test_a_changed_cluster_is_computed_once_for_every_viewer_class() -> None:
    """A join into a gateway-mode cluster outside its vx-local prefixes changes that cluster's
    part (its vx-local prefixes) for every viewer class of the fabric, three per cluster, each with its own next
    hop. The destinations are computed once per update (per family and kind of next hop), and
    a route made once is reused by the next update (the joiner's new vx-local prefix is the only
    new route per next hop): at 100 clusters recomputing them per class was most of a flush of
    a bring-up (issue 21). The work is the same at 6 and 30 clusters; the classes are not."""
    small, large = _cluster_work(6), _cluster_work(30)
    assert large[2] > 4 * small[2], (small, large)  # the case is one of many viewer classes
    assert small[0] == large[0] <= 2, (small, large)
    # New routes: the changed destinations per distinct next hop (a cluster's own active
    # gateway; the active gateways' bridge route), not per class and not every route of the part.
    assert small[1] <= 2 * 6 and large[1] <= 2 * 30, (small, large)
