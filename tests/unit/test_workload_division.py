"""Replica division and spread constraints on WorkloadPolicy (issue 19 item 5):
scheduler/division.py's rules as properties against their definitions, the policy's
validation, and LeafNodeWorkloadPolicy placing a workload's pods one by one toward the targets
(static weights, available replicas counted node by node through leaf views, Aggregated,
maxGroups/minGroups), the way the framework runs it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.control.api import Record
from fabric.control.records import RecordsChange
from scheduler.division import StaticWeight, aggregated_targets, divide, dynamic_targets, static_weights
from scheduler.framework import Code, CycleState, NodeInfo, PodInfo, PreFilterPlugin, Resource, ScorePlugin, Status
from scheduler.leafview import RECORD_KIND, RECORD_SCHEMA
from scheduler.leafviews import LeafViews
from scheduler.plugins.kosmos_leaffit import LeafNodeFit
from scheduler.plugins.kosmos_workloadpolicy import LeafNodeWorkloadPolicy
from scheduler.podutil import new_pod_info
from scheduler.policy import PolicyError, WorkloadPolicy
from tests.unit.test_scheduler_kosmos import Snap

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
CLUSTER = "kosmos.io/cluster"
REGION = "topology.kubernetes.io/region"
ZONE = "topology.kubernetes.io/zone"
LEAF_TAINT = {"key": "kosmos.io/node", "value": "true", "effect": "NoSchedule"}
GI = 1 << 30

# ---------------------------------------------------------------------------------------------
# The division rules, as properties
# ---------------------------------------------------------------------------------------------

names = st.lists(st.text("abcdefgh", min_size=1, max_size=3), min_size=1, max_size=8, unique=True)


@st.composite
def weighted(draw: Any, low: int = 0) -> dict[str, int]:
    return {g: draw(st.integers(low, 50)) for g in draw(names)}


@settings(max_examples=300, deadline=None)
@given(weighted(), st.integers(0, 500))
def test_divide_sums_is_proportional_within_one_and_zero_weight_gets_none(w: dict[str, int], r: int) -> None:
    t = divide(r, w)
    assert set(t) == set(w)
    total = sum(w.values())
    if total == 0:
        assert all(v == 0 for v in t.values())
        return
    assert sum(t.values()) == r
    for g, v in t.items():
        exact = Fraction(r * w[g], total)
        assert abs(v - exact) < 1, (g, v, exact)
        if w[g] == 0:
            assert v == 0


@settings(max_examples=300, deadline=None)
@given(weighted(), st.integers(0, 500))
def test_divide_is_largest_remainder_ties_by_weight_then_name(w: dict[str, int], r: int) -> None:
    """The oracle: a group gets the extra replica iff it ranks among the first (r - floors) by
    (fraction desc, weight desc, name asc); independent of the mapping's order."""
    total = sum(w.values())
    if total == 0:
        return
    t = divide(r, w)
    assert t == divide(r, dict(sorted(w.items(), reverse=True)))
    floors = {g: r * x // total for g, x in w.items()}
    left = r - sum(floors.values())
    rank = sorted((g for g in w if w[g] > 0), key=lambda g: (-(Fraction(r * w[g], total) % 1), -w[g], g))
    extra = set(rank[:left])
    assert t == {g: floors[g] + (g in extra) for g in w}


@settings(max_examples=300, deadline=None)
@given(weighted(), st.integers(0, 500))
def test_dynamic_never_targets_more_than_a_groups_room(room: dict[str, int], r: int) -> None:
    t = dynamic_targets(r, room)
    assert all(0 <= t[g] <= room[g] for g in room)
    assert sum(t.values()) == min(r, sum(room.values()))
    if sum(room.values()) > r:
        assert t == divide(r, room)


@settings(max_examples=300, deadline=None)
@given(weighted(), st.integers(0, 500), st.data())
def test_aggregated_uses_the_fewest_groups_in_karmadas_order(room: dict[str, int], r: int, data: Any) -> None:
    used = set(data.draw(st.lists(st.sampled_from(sorted(room)), unique=True)))
    t = aggregated_targets(r, room, used)
    assert all(0 <= t[g] <= room[g] for g in room)
    assert sum(t.values()) == min(r, sum(room.values()))
    order = [g for g in sorted(room, key=lambda g: (g not in used, -room[g], g)) if room[g] > 0]
    k, acc = 0, 0
    while k < len(order) and acc < r:
        acc += room[order[k]]
        k += 1
    assert {g for g, v in t.items() if v} <= set(order[:k])


def test_static_weights_first_match_and_all_zero_falls_back_to_even() -> None:
    a_or_b = StaticWeight(lambda g: g in ("a", "b"), 3)
    only_a = StaticWeight(lambda g: g == "a", 7)
    assert static_weights(["a", "b", "c"], [a_or_b, only_a]) == {"a": 3, "b": 3, "c": 0}  # the first entry wins
    assert static_weights(["a", "b", "c"], [only_a, a_or_b]) == {"a": 7, "b": 3, "c": 0}
    assert static_weights(["x", "y"], [only_a]) == {"x": 1, "y": 1}  # Karmada: nothing matched, divide evenly
    assert divide(4, {"b": 1, "a": 1, "c": 1}) == {"a": 2, "b": 1, "c": 1}  # equal remainders: by name
    assert divide(5, {"a": 1, "z": 2}) == {"a": 2, "z": 3}  # 5/3 and 10/3: the larger fraction (z's 1/3 < a's 2/3)


# ---------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------


def wlp(spec_extra: Mapping[str, Any], name: str = "wp", ns: str = "apps", key: str = CLUSTER,
        atype: str = "Required") -> Obj:
    spec: Obj = {"topologyKey": key, "labelSelector": {"matchLabels": {"app": "web"}}, "allocationType": atype,
                 **spec_extra}
    return {"apiVersion": "kosmos.io/v1alpha1", "kind": "WorkloadPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def static(**weights: int) -> Obj:
    return {"replicaScheduling": {"replicaSchedulingType": "Divided", "replicaDivisionPreference": "Weighted",
                                  "weightPreference": {"staticWeightList": [
                                      {"targetCluster": {"clusterNames": [g]}, "weight": w}
                                      for g, w in weights.items()]}}}


@pytest.mark.parametrize(("extra", "where"), [
    ({"replicaScheduling": {"replicaSchedulingType": "Duplicated"}}, "spec.replicaScheduling.replicaSchedulingType"),
    ({"replicaScheduling": {"replicaDivisionPreference": "Spread"}},
     "spec.replicaScheduling.replicaDivisionPreference"),
    ({"replicaScheduling": {"weightPreference": {"dynamicWeight": "Cpu"}}}, "weightPreference.dynamicWeight"),
    ({"replicaScheduling": {"weightPreference": {"dynamicWeight": "AvailableReplicas", "staticWeightList": [
        {"targetCluster": {}, "weight": 1}]}}}, "not both"),
    ({"replicaScheduling": {"weightPreference": {"staticWeightList": [{"targetCluster": {}, "weight": 0}]}}},
     "staticWeightList[0].weight 0: must be an integer >= 1"),
    ({"replicaScheduling": {"weightPreference": {"staticWeightList": [{"weight": 2}]}}},
     "staticWeightList[0].targetCluster"),
    ({"replicaScheduling": {"weightPreference": {"staticWeightList": [
        {"targetCluster": {"clusterNames": "a"}, "weight": 2}]}}}, "targetCluster.clusterNames 'a'"),
    ({"replicaScheduling": {"weightPreference": {"staticWeightList": [{"targetCluster": {"labelSelector": {
        "matchExpressions": [{"key": "k", "operator": "Near"}]}}, "weight": 2}]}}},
     "staticWeightList[0].targetCluster.labelSelector"),
    ({"replicaScheduling": {"replicaDivisionPreference": "Aggregated",
                            "weightPreference": {"dynamicWeight": "AvailableReplicas"}}}, "only for"),
    ({"replicaScheduling": {"replicas": -1}}, "spec.replicaScheduling.replicas -1"),
    ({"replicaScheduling": {}, "allocationPolicy": [{"name": "a", "replicas": 1}]}, "give one"),
    ({"spreadConstraints": [{"spreadByField": "provider"}]}, "spec.spreadConstraints[0].spreadByField 'provider'"),
    ({"spreadConstraints": [{"spreadByField": "zone", "spreadByLabel": "x"}]}, "exactly one of"),
    ({"spreadConstraints": [{"spreadByField": "zone", "minGroups": 3, "maxGroups": 2}]}, "maxGroups 2 is below"),
    ({"spreadConstraints": [{"spreadByLabel": "x", "maxGroups": "2"}]}, "spreadConstraints[0].maxGroups '2'"),
    ({"spreadConstraints": [{"spreadByField": "zone"}, {"spreadByLabel": ZONE}]}, "spreadConstraints[1]: a second"),
])
def test_invalid_fields_are_refused_naming_the_policy_and_field(extra: Obj, where: str) -> None:
    with pytest.raises(PolicyError) as e:
        WorkloadPolicy.parse(wlp(extra))
    assert "WorkloadPolicy apps/wp: " in str(e.value) and where in str(e.value)


def test_defaults_parse_as_karmadas() -> None:
    p = WorkloadPolicy.parse(wlp({"replicaScheduling": {}, "spreadConstraints": [{"spreadByField": "region"}]}))
    assert p.division is not None and p.division.preference == "Weighted" and not p.division.dynamic
    assert p.division.static == () and p.division.replicas is None
    assert [(c.label, c.min_groups, c.max_groups) for c in p.spread] == [(REGION, 1, 0)]
    assert WorkloadPolicy.parse(wlp({})).division is None  # Kosmos' own policies are unchanged


# ---------------------------------------------------------------------------------------------
# The plugin, pod by pod
# ---------------------------------------------------------------------------------------------


def host(name: str, cluster: str | None, cpu: int = 64, labels: Mapping[str, str] | None = None) -> NodeInfo:
    lab = dict(labels or {})
    if cluster is not None:
        lab[CLUSTER] = cluster
    return NodeInfo(node={"metadata": {"name": name, "labels": lab}, "spec": {}},
                    allocatable=Resource(milli_cpu=cpu * 1000, memory=256 * GI, allowed_pod_number=110))


def virtual(name: str, cluster: str, cpu: int) -> NodeInfo:
    """A virtual node advertising ``cpu`` (its leaf's sum)."""
    ni = host(name, cluster, cpu)
    ni.node["metadata"]["labels"]["kosmos.io/node"] = "true"
    ni.node["spec"]["taints"] = [dict(LEAF_TAINT)]
    return ni


def leaf_record(vnode: str, frees: Mapping[str, int]) -> Record:
    doc = {"schema": RECORD_SCHEMA, "cluster": vnode, "virtualNode": vnode, "ready": True, "mode": "cluster",
           "nodes": [{"name": n, "ready": True, "schedulable": True, "ourPods": 0,
                      "free": {"cpu": str(cpu), "memory": "64Gi", "pods": "110"},
                      "labels": {"kubernetes.io/hostname": n}} for n, cpu in frees.items()]}
    return Record(RECORD_KIND, vnode, 1, json.dumps(doc).encode(), publisher="tree/x")


class Handle:
    """framework.Handle over a node list, listers, and optionally the leaf views."""

    def __init__(self, nodes: list[NodeInfo], views: LeafViews | None = None, **objects: list[Obj]) -> None:
        self.snap = Snap(nodes)
        self.leaf_views = views
        self.listers: dict[str, dict[str, Obj]] = {}
        for resource, objs in objects.items():
            lister = self.listers.setdefault(resource, {})
            for o in objs:
                lister[f"{o['metadata']['namespace']}/{o['metadata']['name']}"] = o

    def snapshot(self) -> Snap:
        return self.snap

    def lister(self, resource: str) -> Mapping[str, Obj]:
        return self.listers.get(resource, {})


def replicaset(name: str, replicas: int, ns: str = "apps", kind: str = "ReplicaSet") -> Obj:
    return {"kind": kind, "metadata": {"name": name, "namespace": ns}, "spec": {"replicas": replicas}}


def web(i: int, cpu: int = 1, owner: tuple[str, str] | None = ("ReplicaSet", "web-7d9c"), ns: str = "apps") -> PodInfo:
    meta: Obj = {"name": f"web-{i}", "namespace": ns, "uid": f"uid-{i}",
                 "labels": {"app": "web", "workload-policy/kosmos.io": "wp"}}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1], "controller": True}]
    return new_pod_info({"metadata": meta, "spec": {"containers": [
        {"name": "c", "resources": {"requests": {"cpu": str(cpu)}}}]}})


def schedule_one(plugins: list[Any], p: PodInfo, nodes: list[NodeInfo]) -> tuple[str | None, dict[str, Status]]:
    """PreFilter, Filter, Score (the best total, ties by name), Reserve, then "bind": the pod joins
    the chosen NodeInfo with its request (the cache's assume)."""
    state = CycleState()
    for pl in plugins:
        if isinstance(pl, PreFilterPlugin):
            _, s = pl.pre_filter(state, p, nodes)
            if s.code == Code.SKIP:
                state.skip_filter.add(pl.name)
            elif not s.ok:
                return None, {n.name: s for n in nodes}
    reasons: dict[str, Status] = {}
    ok = []
    for n in nodes:
        for pl in plugins:
            if pl.name in state.skip_filter:
                continue
            s = pl.filter(state, p, n)
            if not s.ok:
                reasons[n.name] = s
                break
        else:
            ok.append(n)
    if not ok:
        return None, reasons
    total = {n.name: sum(pl.score(state, p, n)[0] for pl in plugins if isinstance(pl, ScorePlugin)) for n in ok}
    best = sorted(ok, key=lambda n: (-total[n.name], n.name))[0]
    for pl in plugins:
        if hasattr(pl, "reserve"):
            assert pl.reserve(state, p, best.name).ok
    best.pods.append(p)
    best.requested.add(p.requests)
    return best.name, reasons


def per_cluster(nodes: list[NodeInfo], key: str = CLUSTER) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in nodes:
        g = n.labels.get(key, "-")
        out[g] = out.get(g, 0) + len(n.pods)
    return out


def three_clusters() -> list[NodeInfo]:
    return [host("a-1", "a"), host("a-2", "a"), host("b-1", "b"), host("c-1", "c"), host("bare", None)]


def test_static_weights_required_land_exactly_on_the_largest_remainder_targets() -> None:
    """Weights a:2 b:1 c:1 over the ReplicaSet's 10 replicas: 5, 2.5, 2.5 -> a 5, b 3, c 2 (equal
    fractions: the name first); the 11th pod has nowhere to go."""
    nodes = three_clusters()
    h = Handle(nodes, workloadpolicies=[wlp(static(a=2, b=1, c=1))], replicasets=[replicaset("web-7d9c", 10)])
    pl = LeafNodeWorkloadPolicy(h, {})
    assert None not in [schedule_one([pl], web(i), nodes)[0] for i in range(10)]
    assert per_cluster(nodes) == {"a": 5, "b": 3, "c": 2, "-": 0}
    chosen, reasons = schedule_one([pl], web(10), nodes)
    assert chosen is None and reasons["c-1"].code == Code.UNSCHEDULABLE
    assert reasons["bare"].code == Code.UNSCHEDULABLE_AND_UNRESOLVABLE


def test_static_weights_preferred_fill_the_targets_first_then_spill() -> None:
    nodes = three_clusters()
    h = Handle(nodes, workloadpolicies=[wlp(static(a=1, b=3), atype="Preferred")],
               replicasets=[replicaset("web-7d9c", 8)])
    pl = LeafNodeWorkloadPolicy(h, {})
    placed = [schedule_one([pl], web(i), nodes)[0] for i in range(8)]
    assert None not in placed and per_cluster(nodes) == {"a": 2, "b": 6, "c": 0, "-": 0}
    assert schedule_one([pl], web(8), nodes)[0] is not None  # beyond the targets: spills over


def test_targets_follow_the_controllers_replicas_as_it_scales() -> None:
    nodes = three_clusters()
    rs = replicaset("web-7d9c", 2)
    h = Handle(nodes, workloadpolicies=[wlp(static(a=1, b=1))], replicasets=[rs])
    pl = LeafNodeWorkloadPolicy(h, {})
    assert [schedule_one([pl], web(i), nodes)[0] for i in range(3)][2] is None
    rs["spec"]["replicas"] = 4
    assert None not in [schedule_one([pl], web(i), nodes)[0] for i in range(3, 5)]
    assert per_cluster(nodes) == {"a": 2, "b": 2, "c": 0, "-": 0}


def test_target_cluster_label_selector_and_exclude() -> None:
    nodes = [host("a-1", "a", labels={REGION: "eu"}), host("b-1", "b", labels={REGION: "eu"}),
             host("c-1", "c", labels={REGION: "us"})]
    rsched = {"weightPreference": {"staticWeightList": [
        {"targetCluster": {"labelSelector": {"matchLabels": {REGION: "eu"}}, "exclude": ["b"]}, "weight": 3},
        {"targetCluster": {"clusterNames": ["b", "c"]}, "weight": 1}]}}
    h = Handle(nodes, workloadpolicies=[wlp({"replicaScheduling": rsched})], replicasets=[replicaset("web-7d9c", 5)])
    pl = LeafNodeWorkloadPolicy(h, {})
    assert None not in [schedule_one([pl], web(i), nodes)[0] for i in range(5)]
    assert per_cluster(nodes) == {"a": 3, "b": 1, "c": 1}


@pytest.mark.parametrize(("owner", "objects", "replicas", "want"), [
    (("StatefulSet", "db"), {"statefulsets": [replicaset("db", 3, kind="StatefulSet")]}, None, 3),
    (("ReplicationController", "old"), {"replicationcontrollers": [replicaset("old", 1)]}, 7, 1),
    (None, {}, 3, 3),  # a bare pod: the policy's replicas
    (("ReplicaSet", "gone"), {}, 2, 2),  # the controller not known: the policy's figure
])
def test_replicas_come_from_the_controller_else_the_policy(owner: tuple[str, str] | None, objects: dict[str, Any],
                                                          replicas: int | None, want: int) -> None:
    nodes = [host("a-1", "a"), host("b-1", "b")]
    pol = wlp({"replicaScheduling": {"replicas": replicas} if replicas is not None else {}})
    pl = LeafNodeWorkloadPolicy(Handle(nodes, workloadpolicies=[pol], **objects), {})
    placed = [schedule_one([pl], web(i, owner=owner), nodes)[0] for i in range(want + 1)]
    assert None not in placed[:want] and placed[want] is None


def test_no_replicas_anywhere_is_a_clear_reason() -> None:
    nodes = [host("a-1", "a")]
    pl = LeafNodeWorkloadPolicy(Handle(nodes, workloadpolicies=[wlp({"replicaScheduling": {}})]), {})
    _, reasons = schedule_one([pl], web(0, owner=None), nodes)
    assert reasons["a-1"].code == Code.UNSCHEDULABLE_AND_UNRESOLVABLE
    assert "workload-policy apps/wp: the pod has no ReplicaSet" in reasons["a-1"].message()
    _, reasons = schedule_one([pl], web(0), nodes)  # a ReplicaSet the lister has not seen yet: retry later
    assert reasons["a-1"].code == Code.UNSCHEDULABLE
    assert "ReplicaSet apps/web-7d9c is not known (yet)" in reasons["a-1"].message()


def dynamic_fleet() -> tuple[list[NodeInfo], LeafViews]:
    """Leaf a: six nodes with 3 free CPUs (sum 18); leaf b: one node with 12; the host cluster:
    one node with 4. For 2-CPU pods: a holds 6 (node by node; its sum would say 9), b 6, host 2."""
    views = LeafViews()
    views.apply(RecordsChange(1, (leaf_record("kosmos-a", {f"a{i}": 3 for i in range(6)}),
                                  leaf_record("kosmos-b", {"b0": 12})), (), resynced=True))
    nodes = [virtual("kosmos-a", "a", 18), virtual("kosmos-b", "b", 12), host("h-1", "host", 4)]
    return nodes, views


DYNAMIC = {"replicaScheduling": {"weightPreference": {"dynamicWeight": "AvailableReplicas"}}}


def test_dynamic_weights_count_available_replicas_node_by_node() -> None:
    """7 replicas over room a 6, b 6, host 2 (of 14): 3, 3, 1. By sums (a 9, b 6, host 2 of 17)
    it would be 4, 2, 1 (3.7, 2.5, 0.8)."""
    nodes, views = dynamic_fleet()
    h = Handle(nodes, views, workloadpolicies=[wlp(DYNAMIC)], replicasets=[replicaset("web-7d9c", 7)])
    plugins = [LeafNodeFit(h, {}), LeafNodeWorkloadPolicy(h, {})]
    assert None not in [schedule_one(plugins, web(i, cpu=2), nodes)[0] for i in range(7)]
    assert per_cluster(nodes) == {"a": 3, "b": 3, "host": 1}
    assert schedule_one(plugins, web(7, cpu=2), nodes)[0] is None  # Required: every target is met


def test_dynamic_without_leaf_views_falls_back_to_the_virtual_nodes_sum() -> None:
    nodes, _ = dynamic_fleet()
    h = Handle(nodes, None, workloadpolicies=[wlp(DYNAMIC)], replicasets=[replicaset("web-7d9c", 7)])
    pl = LeafNodeWorkloadPolicy(h, {})
    assert None not in [schedule_one([pl], web(i, cpu=2), nodes)[0] for i in range(7)]
    assert per_cluster(nodes) == {"a": 4, "b": 2, "host": 1}


def test_dynamic_targets_never_exceed_the_room_when_replicas_exceed_it() -> None:
    """20 replicas, room for 14: every group gets its room, the pods beyond find no node."""
    nodes, views = dynamic_fleet()
    h = Handle(nodes, views, workloadpolicies=[wlp(DYNAMIC)], replicasets=[replicaset("web-7d9c", 20)])
    plugins = [LeafNodeFit(h, {}), LeafNodeWorkloadPolicy(h, {})]
    placed = [schedule_one(plugins, web(i, cpu=2), nodes)[0] for i in range(16)]
    assert placed.count(None) == 2 and None not in placed[:14]
    assert per_cluster(nodes) == {"a": 6, "b": 6, "host": 2}


def test_dynamic_room_honours_the_pods_node_selector_and_taints() -> None:
    nodes = [host("a-1", "a", 8, {"disk": "ssd"}), host("b-1", "b", 8), host("b-2", "b", 8)]
    nodes[2].node["spec"]["taints"] = [{"key": "gpu", "effect": "NoSchedule"}]
    h = Handle(nodes, workloadpolicies=[wlp(DYNAMIC)], replicasets=[replicaset("web-7d9c", 4)])
    pl = LeafNodeWorkloadPolicy(h, {})
    p = web(0, cpu=2)
    state = CycleState()
    assert pl.pre_filter(state, p, nodes)[1].ok
    assert state.get("PreFilterLeafNodeWorkloadPolicy").targets == {"a": 2, "b": 2}  # room 4 and 4 (b-2 tainted)
    p.pod["spec"]["nodeSelector"] = {"disk": "ssd"}
    state = CycleState()
    assert pl.pre_filter(state, p, nodes)[1].ok
    assert state.get("PreFilterLeafNodeWorkloadPolicy").targets == {"a": 4, "b": 0}


def test_aggregated_packs_into_the_fewest_clusters() -> None:
    nodes, views = dynamic_fleet()
    pol = wlp({"replicaScheduling": {"replicaDivisionPreference": "Aggregated"}})
    h = Handle(nodes, views, workloadpolicies=[pol], replicasets=[replicaset("web-7d9c", 5)])
    plugins = [LeafNodeFit(h, {}), LeafNodeWorkloadPolicy(h, {})]
    assert None not in [schedule_one(plugins, web(i, cpu=2), nodes)[0] for i in range(5)]
    assert per_cluster(nodes) == {"a": 5, "b": 0, "host": 0}  # a and b tie on room 6: the name first


def test_max_groups_keeps_the_workload_in_the_groups_it_uses_and_redivides() -> None:
    """Equal weights over a, b, c (6 replicas: 2 each) and at most 2 clusters: once a and b hold
    pods, c is out and the 6 are divided 3/3 over a and b."""
    nodes = three_clusters()[:4]
    pol = wlp({**static(a=1, b=1, c=1), "spreadConstraints": [{"spreadByField": "cluster", "maxGroups": 2}]})
    h = Handle(nodes, workloadpolicies=[pol], replicasets=[replicaset("web-7d9c", 6)])
    pl = LeafNodeWorkloadPolicy(h, {})
    assert None not in [schedule_one([pl], web(i), nodes)[0] for i in range(6)]
    assert per_cluster(nodes) == {"a": 3, "b": 3, "c": 0}
    chosen, reasons = schedule_one([pl], web(6), nodes)
    assert chosen is None
    assert reasons["c-1"].message() == "node(s) were outside the 2 cluster group(s) workload-policy apps/wp already " \
                                       "uses (maxGroups)"


def test_max_groups_by_region_restricts_the_clusters_divided_over() -> None:
    nodes = [host("a-1", "a", labels={REGION: "eu"}), host("b-1", "b", labels={REGION: "eu"}),
             host("c-1", "c", labels={REGION: "us"})]
    pol = wlp({**static(a=1, b=1, c=2), "spreadConstraints": [{"spreadByField": "region", "maxGroups": 1}]},
              atype="Preferred")
    h = Handle(nodes, workloadpolicies=[pol], replicasets=[replicaset("web-7d9c", 4)])
    pl = LeafNodeWorkloadPolicy(h, {})
    # Targets 1, 1, 2: every empty group scores 100 (Balance), the name decides: a, in eu.
    assert schedule_one([pl], web(0), nodes)[0] == "a-1"
    assert None not in [schedule_one([pl], web(i), nodes)[0] for i in range(1, 4)]
    assert per_cluster(nodes) == {"a": 2, "b": 2, "c": 0}  # eu is the one region: 4 over a and b


def test_min_groups_not_reachable_is_unschedulable_with_the_reason() -> None:
    nodes = [host("a-1", "a", labels={ZONE: "z1"}), host("a-2", "a", labels={ZONE: "z2"}),
             host("a-3", "a", 0, labels={ZONE: "z3"})]
    pol = wlp({"replicaScheduling": {"replicas": 3}, "spreadConstraints": [{"spreadByField": "zone", "minGroups": 3}]})
    pl = LeafNodeWorkloadPolicy(Handle(nodes, workloadpolicies=[pol]), {})
    chosen, reasons = schedule_one([pl], web(0, owner=None), nodes)
    assert chosen is None and reasons["a-1"].code == Code.UNSCHEDULABLE
    assert reasons["a-1"].message() == ("workload-policy apps/wp: spreadConstraints[0] wants at least 3 zone "
                                        "group(s), 2 have room for the pod")
    nodes[2].allocatable = Resource(milli_cpu=8000, memory=GI, allowed_pod_number=10)
    assert schedule_one([pl], web(0, owner=None), nodes)[0] is not None


def test_min_groups_prefers_new_groups_until_reached() -> None:
    """One cluster, two zones: with minGroups 2 by zone the second pod goes to the other zone;
    without, both go to the first node by name."""
    for constraint, want in (([{"spreadByField": "zone", "minGroups": 2}], ["a-1", "a-2"]), ([], ["a-1", "a-1"])):
        nodes = [host("a-1", "a", labels={ZONE: "z1"}), host("a-2", "a", labels={ZONE: "z2"})]
        pol = wlp({"replicaScheduling": {"replicas": 4}, "spreadConstraints": constraint}, atype="Preferred")
        pl = LeafNodeWorkloadPolicy(Handle(nodes, workloadpolicies=[pol]), {})
        assert [schedule_one([pl], web(i, owner=None), nodes)[0] for i in range(2)] == want


def test_spread_label_missing_on_a_node_rejects_it() -> None:
    nodes = [host("a-1", "a", labels={ZONE: "z1"}), host("a-2", "a")]
    pol = wlp({"spreadConstraints": [{"spreadByLabel": ZONE}], "allocationPolicy": [{"name": "a", "replicas": 2}]})
    pl = LeafNodeWorkloadPolicy(Handle(nodes, workloadpolicies=[pol]), {})
    chosen, reasons = schedule_one([pl], web(0), nodes)
    assert chosen == "a-1" and reasons["a-2"].code == Code.UNSCHEDULABLE_AND_UNRESOLVABLE
    assert "label 'topology.kubernetes.io/zone' of spreadConstraints[0]" in reasons["a-2"].message()


def test_a_broken_division_is_an_error_naming_the_policy() -> None:
    nodes = [host("a-1", "a")]
    pol = wlp({"replicaScheduling": {"replicaSchedulingType": "Duplicated"}})
    pl = LeafNodeWorkloadPolicy(Handle(nodes, workloadpolicies=[pol]), {})
    _, reasons = schedule_one([pl], web(0), nodes)
    assert reasons["a-1"].code == Code.ERROR and "WorkloadPolicy apps/wp: spec.replicaScheduling" in \
        reasons["a-1"].message()


# ---------------------------------------------------------------------------------------------
# The CRD: the new fields are served, wrong values refused as a real API server would
# ---------------------------------------------------------------------------------------------

DIVIDED_POLICY = """\
apiVersion: kosmos.io/v1alpha1
kind: WorkloadPolicy
metadata: {name: web, namespace: workload-test}
spec:
  topologyKey: kosmos.io/cluster
  labelSelector: {matchLabels: {app: web}}
  allocationType: Required
  replicaScheduling:
    replicaSchedulingType: Divided
    replicaDivisionPreference: Weighted
    weightPreference:
      staticWeightList:
        - targetCluster: {clusterNames: [leaf-a]}
          weight: 2
        - targetCluster: {labelSelector: {matchLabels: {topology.kubernetes.io/region: eu}}, exclude: [leaf-c]}
          weight: 1
  spreadConstraints:
    - {spreadByField: region, minGroups: 1, maxGroups: 2}
    - {spreadByLabel: example.com/rack, maxGroups: 3}
"""


@pytest.fixture(scope="module")
def emu() -> Any:
    import shutil
    import subprocess
    from pathlib import Path

    from kubeemu.runner import ServerThread

    kubectl_bin = shutil.which("kubectl")
    if kubectl_bin is None:
        pytest.skip("kubectl not installed")
    crds = Path(__file__).resolve().parents[2] / "deploy" / "scheduler" / "crds"

    def kubectl(server: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(kubectl_bin), "--server", server, *args], input=stdin, capture_output=True,
                              text=True, timeout=60)

    with ServerThread(name="kosmos-division-crd", service_cidrs=("10.96.0.0/24",)) as s:
        assert kubectl(s.url, "apply", "-f", str(crds)).returncode == 0
        assert kubectl(s.url, "create", "namespace", "workload-test").returncode == 0

        def served() -> bool:
            return "workloadpolicies.kosmos.io" in kubectl(s.url, "api-resources", "--api-group=kosmos.io", "-o",
                                                           "name").stdout.split()

        from tests.waiting import wait_until
        wait_until(served, 30, "workloadpolicies.kosmos.io to be served")
        yield lambda *a, stdin="": kubectl(s.url, *a, stdin=stdin)


def test_crd_serves_the_division_fields_and_they_parse(emu: Any) -> None:
    p = emu("create", "-f", "-", stdin=DIVIDED_POLICY)
    assert p.returncode == 0, p.stderr
    got = emu("get", "wlp", "-n", "workload-test", "web", "-o", "json")
    assert got.returncode == 0, got.stderr
    obj = json.loads(got.stdout)
    assert obj["spec"]["replicaScheduling"]["weightPreference"]["staticWeightList"][1]["targetCluster"]["exclude"] \
        == ["leaf-c"]
    pol = WorkloadPolicy.parse(obj)
    assert pol.division is not None and [w for _, w in pol.division.static] == [2, 1]
    assert [(c.label, c.min_groups, c.max_groups) for c in pol.spread] == [
        (REGION, 1, 2), ("example.com/rack", 1, 3)]  # minGroups defaulted by the schema


@pytest.mark.parametrize(("change", "expect"), [
    (("weight: 2", "weight: 0"), "weight: Invalid value"),
    (("spreadByField: region", "spreadByField: provider"), 'Unsupported value: "provider"'),
    (("replicaSchedulingType: Divided", "replicaSchedulingType: Duplicated"), 'Unsupported value: "Duplicated"'),
    (("maxGroups: 3", "maxGroups: three"), "maxGroups: Invalid value"),
], ids=["weight-0", "unknown-field", "duplicated", "maxGroups-string"])
def test_crd_refuses_bad_division_fields(emu: Any, change: tuple[str, str], expect: str) -> None:
    doc = DIVIDED_POLICY.replace("name: web,", "name: bad,").replace(*change)
    p = emu("create", "-f", "-", stdin=doc)
    assert p.returncode != 0, p.stdout
    assert expect in p.stderr, p.stderr


def test_scaling_the_controller_requeues_the_pods_the_policy_rejected() -> None:
    """A pod rejected at its old target (or before its ReplicaSet was known) is moved when the
    controller changes: the scheduler names the controllers' events, the plugin registers them."""
    from scheduler.scheduler import OTHER_RESOURCES

    names = {res: ev for _, res, ev in OTHER_RESOURCES}
    events = {(e.resource, e.action) for e in LeafNodeWorkloadPolicy(Handle([]), {}).events_to_register()}
    for kind, res in (("ReplicaSet", "replicasets"), ("StatefulSet", "statefulsets"),
                      ("ReplicationController", "replicationcontrollers")):
        assert names[res] == kind
        assert {(kind, "Add"), (kind, "Update")} <= events


def test_min_groups_boost_never_sends_a_pod_to_a_group_without_target() -> None:
    """Spread by zone wants 2 zones; z2 is only in cluster b, whose static weight is 0 (target 0):
    the new-zone boost does not apply there, the pods stay in a (Preferred: nothing rejects b)."""
    nodes = [host("a-1", "a", labels={ZONE: "z1"}), host("b-1", "b", labels={ZONE: "z2"})]
    pol = wlp({**static(a=1), "spreadConstraints": [{"spreadByField": "zone", "minGroups": 2}]}, atype="Preferred")
    pl = LeafNodeWorkloadPolicy(Handle(nodes, workloadpolicies=[pol], replicasets=[replicaset("web-7d9c", 2)]), {})
    assert [schedule_one([pl], web(i), nodes)[0] for i in range(2)] == ["a-1", "a-1"]
