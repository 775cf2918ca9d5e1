"""InterPodAffinity and PodTopologySpread: filters with upstream's reasons and codes, scores
(PodTopologySpread's expectations are upstream's scoring_test.go cases)."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.framework import Code, Status
from scheduler.plugins.interpodaffinity import InterPodAffinity
from scheduler.plugins.podtopologyspread import PodTopologySpread
from scheduler.podutil import add_pod, new_node_info, new_pod_info
from tests.sched_builders import FakeHandle, FakeSnapshot, node, pod, run_filter, run_scores, snapshot

AFF = "node(s) didn't match pod affinity rules"
ANTI = "node(s) didn't match pod anti-affinity rules"
EXISTING = "node(s) didn't satisfy existing pods anti-affinity rules"
SPREAD = "node(s) didn't match pod topology spread constraints"
SPREAD_LABEL = "node(s) didn't match pod topology spread constraints (missing required label)"


def term(key: str, *values: str, topology: str = "zone", **extra: Any) -> dict:
    return {"labelSelector": {"matchExpressions": [{"key": key, "operator": "In", "values": list(values)}]},
            "topologyKey": topology, **extra}


def affinity(required: list | None = None, anti: list | None = None, preferred: list | None = None,
             preferred_anti: list | None = None) -> dict:
    a: dict = {}
    if required or preferred:
        a["podAffinity"] = {}
        if required:
            a["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = required
        if preferred:
            a["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] = preferred
    if anti or preferred_anti:
        a["podAntiAffinity"] = {}
        if anti:
            a["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = anti
        if preferred_anti:
            a["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] = preferred_anti
    return a


def zones() -> list[dict]:
    return [node("a1", labels={"zone": "z1", "kubernetes.io/hostname": "a1"}),
            node("a2", labels={"zone": "z1", "kubernetes.io/hostname": "a2"}),
            node("b1", labels={"zone": "z2", "kubernetes.io/hostname": "b1"}),
            node("nolabel", labels={"kubernetes.io/hostname": "nolabel"})]


def codes(statuses: dict[str, Status]) -> dict[str, tuple]:
    return {k: (v.code, v.reasons) for k, v in statuses.items()}


def ipa(p: dict, existing: list, nodes: list | None = None, namespaces: list | None = None) -> dict[str, tuple]:
    infos = snapshot(nodes or zones(), existing)
    h = FakeHandle(infos, {"namespaces": namespaces or []})
    return codes(run_filter(InterPodAffinity(h, {}), p, infos))


OK = (Code.SUCCESS, ())


def test_required_affinity() -> None:
    p = pod(affinity=affinity(required=[term("app", "db")]))
    got = ipa(p, [pod("db", labels={"app": "db"}, node="a2")])
    assert got == {"a1": OK, "a2": OK, "b1": (Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (AFF,)),
                   "nolabel": (Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (AFF,))}


def test_required_affinity_first_pod_of_group() -> None:
    # nothing matches anywhere and the pod matches its own term: any node with the key will do
    p = pod(labels={"app": "web"}, affinity=affinity(required=[term("app", "web")]))
    got = ipa(p, [pod("other", labels={"app": "x"}, node="a1")])
    assert got == {"a1": OK, "a2": OK, "b1": OK, "nolabel": (Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (AFF,))}
    # a pod that does not match its own term gets no such pass
    p = pod(labels={"app": "other"}, affinity=affinity(required=[term("app", "web")]))
    assert all(v[0] == Code.UNSCHEDULABLE_AND_UNRESOLVABLE for v in ipa(p, []).values())


def test_required_affinity_namespaces() -> None:
    existing = [pod("db", ns="data", labels={"app": "db"}, node="a1")]
    # default: the pod's own namespace only
    p = pod(affinity=affinity(required=[term("app", "db")]))
    got = ipa(p, existing)
    # nothing matched in the pod's namespace and the pod does not match itself: nowhere
    assert got["a1"] == (Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (AFF,))
    p = pod(affinity=affinity(required=[term("app", "db", namespaces=["data"])]))
    assert ipa(p, existing)["a1"] == OK
    nss = [{"metadata": {"name": "data", "labels": {"team": "t"}}},
           {"metadata": {"name": "default", "labels": {}}}]
    p = pod(affinity=affinity(required=[term("app", "db", namespaceSelector={"matchLabels": {"team": "t"}})]))
    got = ipa(p, existing, namespaces=nss)
    assert (got["a1"], got["b1"][0]) == (OK, Code.UNSCHEDULABLE_AND_UNRESOLVABLE)
    p = pod(affinity=affinity(required=[term("app", "db", namespaceSelector={})]))  # {}: all namespaces
    assert ipa(p, existing, namespaces=nss)["a2"] == OK


def test_required_anti_affinity() -> None:
    p = pod(labels={"app": "web"}, affinity=affinity(anti=[term("app", "web", topology="kubernetes.io/hostname")]))
    got = ipa(p, [pod("w1", labels={"app": "web"}, node="a1")])
    assert got == {"a1": (Code.UNSCHEDULABLE, (ANTI,)), "a2": OK, "b1": OK, "nolabel": OK}
    p = pod(labels={"app": "web"}, affinity=affinity(anti=[term("app", "web")]))
    got = ipa(p, [pod("w1", labels={"app": "web"}, node="a1")])
    assert got == {"a1": (Code.UNSCHEDULABLE, (ANTI,)), "a2": (Code.UNSCHEDULABLE, (ANTI,)), "b1": OK,
                   "nolabel": OK}


def test_existing_pods_anti_affinity() -> None:
    guard = pod("guard", labels={"app": "guard"}, node="b1", affinity=affinity(anti=[term("app", "web")]))
    got = ipa(pod(labels={"app": "web"}), [guard])
    assert got == {"a1": OK, "a2": OK, "b1": (Code.UNSCHEDULABLE, (EXISTING,)), "nolabel": OK}
    # the existing pod's term is in its own namespace: a pod elsewhere is not concerned
    assert ipa(pod(ns="other", labels={"app": "web"}), [guard])["b1"] == OK


def test_affinity_score_preferred_and_hard_weight() -> None:
    nodes = [node("m1", labels={"region": "China"}), node("m2", labels={"region": "India"}),
             node("m3", labels={"region": "China"})]
    existing = [pod("s1", labels={"security": "S1"}, node="m1")]
    infos = snapshot(nodes, existing)
    pref = [{"weight": 5, "podAffinityTerm": term("security", "S1", topology="region")}]
    plugin = InterPodAffinity(FakeHandle(infos), {})
    assert run_scores(plugin, pod(affinity=affinity(preferred=pref)), infos) == {"m1": 100, "m2": 0, "m3": 100}
    assert run_scores(plugin, pod(affinity=affinity(preferred_anti=pref)), infos) == {"m1": 0, "m2": 100, "m3": 0}
    # an existing pod's required affinity matching the incoming pod pulls it (hardPodAffinityWeight)
    holder = pod("h", labels={"x": "y"}, node="m2", affinity=affinity(required=[term("app", "web", topology="region")]))
    infos = snapshot(nodes, [holder])
    assert run_scores(InterPodAffinity(FakeHandle(infos), {}), pod(labels={"app": "web"}), infos) == {
        "m1": 0, "m2": 100, "m3": 0}
    assert run_scores(InterPodAffinity(FakeHandle(infos), {"hardPodAffinityWeight": 0}),
                      pod(labels={"app": "web"}), infos) == {"m1": 0, "m2": 0, "m3": 0}


# -- PodTopologySpread -------------------------------------------------------------------------

FOO = {"matchExpressions": [{"key": "foo", "operator": "Exists"}]}
BAR = {"matchExpressions": [{"key": "bar", "operator": "Exists"}]}


def spread(max_skew: int, key: str, when: str = "DoNotSchedule", selector: dict | None = None, **extra: Any) -> dict:
    return {"maxSkew": max_skew, "topologyKey": key, "whenUnsatisfiable": when,
            "labelSelector": FOO if selector is None else selector, **extra}


def foo(name: str, node_name: str, **labels: str) -> dict:
    return pod(name, labels={"foo": "", **labels}, node=node_name)


def pts(p: dict, existing: list, nodes: list | None = None, listers: dict | None = None) -> dict[str, tuple]:
    infos = snapshot(nodes or zones(), existing)
    return codes(run_filter(PodTopologySpread(FakeHandle(infos, listers), {}), p, infos))


def test_spread_filter_zone_skew() -> None:
    p = pod(labels={"foo": ""}, topologySpreadConstraints=[spread(1, "zone")])
    got = pts(p, [foo("x1", "a1"), foo("x2", "a2"), foo("y1", "b1")])
    assert got == {"a1": (Code.UNSCHEDULABLE, (SPREAD,)), "a2": (Code.UNSCHEDULABLE, (SPREAD,)), "b1": OK,
                   "nolabel": (Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (SPREAD_LABEL,))}
    # maxSkew 2 allows z1 too
    p = pod(labels={"foo": ""}, topologySpreadConstraints=[spread(2, "zone")])
    assert pts(p, [foo("x1", "a1"), foo("x2", "a2"), foo("y1", "b1")])["a1"] == OK
    # a pod the selector does not match does not count itself
    p = pod(labels={"other": ""}, topologySpreadConstraints=[spread(1, "zone")])
    assert pts(p, [foo("x1", "a1"), foo("y1", "b1"), foo("x2", "a2")])["a1"] == OK


def test_spread_ignores_other_namespaces_and_terminating() -> None:
    p = pod(labels={"foo": ""}, topologySpreadConstraints=[spread(1, "zone")])
    gone = foo("x3", "a1")
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    existing = [foo("x1", "a1"), pod("x2", ns="other", labels={"foo": ""}, node="a2"), gone]
    assert pts(p, existing)["a1"] == (Code.UNSCHEDULABLE, (SPREAD,))
    assert pts(p, existing)["b1"] == OK
    existing = [pod("x2", ns="other", labels={"foo": ""}, node="a2"), gone]
    assert pts(p, existing)["a1"] == OK


def test_spread_min_domains() -> None:
    # two zones with 1/0 pods; minDomains 3 > 2 domains: global minimum is 0
    p = pod(labels={"foo": ""}, topologySpreadConstraints=[spread(1, "zone", minDomains=3)])
    got = pts(p, [foo("x1", "a1")])
    assert got["a1"] == (Code.UNSCHEDULABLE, (SPREAD,)) and got["b1"] == OK
    got = pts(p, [foo("x1", "a1"), foo("y1", "b1")])
    assert got["a1"] == (Code.UNSCHEDULABLE, (SPREAD,)) and got["b1"] == (Code.UNSCHEDULABLE, (SPREAD,))
    p = pod(labels={"foo": ""}, topologySpreadConstraints=[spread(1, "zone", minDomains=2)])
    assert pts(p, [foo("x1", "a1"), foo("y1", "b1")])["b1"] == OK


def test_spread_node_inclusion_policies() -> None:
    c1 = node("c1", labels={"zone": "z3", "kubernetes.io/hostname": "c1", "pool": "other"},
              taints=[{"key": "t", "effect": "NoSchedule"}])
    nodes = [*zones(), c1]
    for n in nodes[:3]:
        n["metadata"]["labels"]["pool"] = "main"
    existing = [foo("x1", "a1"), foo("y1", "b1")]
    # Honor (default) nodeAffinityPolicy: z3 does not match the pod's nodeSelector -> not a domain
    p = pod(labels={"foo": ""}, nodeSelector={"pool": "main"}, topologySpreadConstraints=[spread(1, "zone")])
    assert pts(p, existing, nodes)["a1"] == OK
    p = pod(labels={"foo": ""}, nodeSelector={"pool": "main"},
            topologySpreadConstraints=[spread(1, "zone", nodeAffinityPolicy="Ignore")])
    assert pts(p, existing, nodes)["a1"] == (Code.UNSCHEDULABLE, (SPREAD,))
    # Ignore (default) nodeTaintsPolicy: the tainted z3 node counts as an empty domain
    p = pod(labels={"foo": ""}, topologySpreadConstraints=[spread(1, "zone")])
    assert pts(p, existing, nodes)["a1"] == (Code.UNSCHEDULABLE, (SPREAD,))
    p = pod(labels={"foo": ""}, topologySpreadConstraints=[spread(1, "zone", nodeTaintsPolicy="Honor")])
    assert pts(p, existing, nodes)["a1"] == OK


def test_spread_match_label_keys() -> None:
    # only pods of the same revision count
    p = pod(labels={"foo": "", "rev": "2"}, topologySpreadConstraints=[spread(1, "zone", matchLabelKeys=["rev"])])
    existing = [foo("x1", "a1", rev="1"), foo("x2", "a2", rev="1")]
    assert pts(p, existing)["a1"] == OK
    existing = [foo("x1", "a1", rev="2"), foo("x2", "a2", rev="2")]
    assert pts(p, existing)["a1"] == (Code.UNSCHEDULABLE, (SPREAD,))


def test_spread_default_constraints_are_soft_only() -> None:
    svc = {"metadata": {"name": "s", "namespace": "default"}, "spec": {"selector": {"foo": ""}}}
    p = pod(labels={"foo": ""})
    got = pts(p, [foo("x1", "a1"), foo("x2", "a1"), foo("x3", "a1")], listers={"services": [svc]})
    assert all(v == OK for v in got.values())  # system defaults are ScheduleAnyway


def _score(p: dict, nodes: list, failed: list, existing: list, listers: dict | None = None) -> dict[str, int]:
    all_infos = snapshot(nodes + failed, existing)
    names = {n["metadata"]["name"] for n in nodes}
    filtered = [i for i in all_infos if i.name in names]
    return run_scores(PodTopologySpread(FakeHandle(all_infos, listers), {}), p, filtered)


def hn(name: str, **labels: str) -> dict:
    return node(name, labels={"kubernetes.io/hostname": name, **labels})


SOFT = "ScheduleAnyway"


def test_spread_score_upstream_hostname_max_skew_2() -> None:
    p = pod(labels={"foo": ""}, topologySpreadConstraints=[spread(2, "kubernetes.io/hostname", SOFT)])
    existing = [foo("a1", "node-a"), foo("a2", "node-a"), foo("b1", "node-b"),
                foo("d1", "node-d"), foo("d2", "node-d"), foo("d3", "node-d")]
    got = _score(p, [hn("node-a"), hn("node-b"), hn("node-c"), hn("node-d")], [], existing)
    assert got == {"node-a": 33, "node-b": 66, "node-c": 100, "node-d": 16}


def _four_three_two_one() -> list:
    return [foo(f"{n}{i}", f"node-{n}") for n, k in (("a", 4), ("b", 3), ("c", 2), ("d", 1)) for i in range(k)]


def test_spread_score_upstream_system_defaulting_service() -> None:
    svc = {"metadata": {"name": "s", "namespace": "default"}, "spec": {"selector": {"foo": ""}}}
    got = _score(pod(labels={"foo": ""}), [hn("node-a"), hn("node-b"), hn("node-c"), hn("node-d")], [],
                 _four_three_two_one(), {"services": [svc]})
    assert got == {"node-a": 44, "node-b": 66, "node-c": 77, "node-d": 100}
    # nothing selects the pod: no default constraints, nothing to score
    got = _score(pod(labels={"foo": ""}), [hn("node-a"), hn("node-b")], [], _four_three_two_one())
    assert got == {"node-a": 0, "node-b": 0}


def test_spread_score_upstream_default_selector_from_replicaset() -> None:
    rs = {"metadata": {"name": "rs", "namespace": "default"}, "spec": {"selector": {"matchLabels": {"foo": ""}}}}
    p = pod(labels={"foo": ""})
    p["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                                         "controller": True, "uid": "u"}]
    got = _score(p, [hn("node-a"), hn("node-b"), hn("node-c"), hn("node-d")], [], _four_three_two_one(),
                 {"replicasets": [rs]})
    assert got == {"node-a": 44, "node-b": 66, "node-c": 77, "node-d": 100}


def test_spread_score_upstream_zone_three_of_four() -> None:
    existing = [foo("a1", "node-a"), foo("a2", "node-a"), foo("a3", "node-a"), foo("a4", "node-a"),
                foo("b1", "node-b"), foo("b2", "node-b"), foo("x1", "node-x"),
                foo("y1", "node-y"), foo("y2", "node-y"), foo("y3", "node-y")]
    p = pod(labels={"foo": ""}, topologySpreadConstraints=[spread(1, "zone", SOFT)])
    got = _score(p, [hn("node-a", zone="zone1"), hn("node-b", zone="zone1"), hn("node-x", zone="zone2")],
                 [hn("node-y", zone="zone2")], existing)
    assert got == {"node-a": 75, "node-b": 75, "node-x": 100}
    # one node without the topology key is ignored (score 0)
    p = pod(labels={"foo": ""}, topologySpreadConstraints=[spread(1, "kubernetes.io/hostname", SOFT)])
    got = _score(p, [hn("node-a"), node("node-b", labels={"n": "node-b"}), hn("node-x")], [hn("node-y")], existing)
    assert got == {"node-a": 16, "node-b": 0, "node-x": 100}


def test_spread_score_upstream_two_constraints_different_selectors() -> None:
    p = pod(labels={"foo": "", "bar": ""}, topologySpreadConstraints=[
        spread(1, "zone", SOFT), spread(1, "kubernetes.io/hostname", SOFT, BAR)])
    existing = [foo("a1", "node-a"), foo("b1", "node-b", bar=""), foo("y1", "node-y"),
                pod("y2", labels={"bar": ""}, node="node-y")]
    nodes = [hn("node-a", zone="zone1"), hn("node-b", zone="zone1"), hn("node-x", zone="zone2"),
             hn("node-y", zone="zone2")]
    assert _score(p, nodes, [], existing) == {"node-a": 60, "node-b": 20, "node-x": 100, "node-y": 60}


@pytest.mark.parametrize("bad", [{"defaultingType": "Nope"},
                                 {"defaultingType": "List", "defaultConstraints": [dict(spread(1, "zone"))]}])
def test_spread_args_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        PodTopologySpread(FakeHandle(), bad)


def test_count_caches_follow_node_changes() -> None:
    """The per-node count caches (shared by the replicas of a workload) must see every change:
    a pod added to a node, and a node replaced by a new one of the same name."""
    infos = snapshot(zones(), [foo("x1", "a1")])
    h = FakeHandle(infos)
    spread_plugin = PodTopologySpread(h, {})
    anti_plugin = InterPodAffinity(h, {})
    p = pod(labels={"foo": ""}, topologySpreadConstraints=[spread(1, "zone")],
            affinity=affinity(anti=[{"labelSelector": FOO, "topologyKey": "kubernetes.io/hostname"}]))
    assert codes(run_filter(spread_plugin, p, infos))["b1"] == OK
    assert codes(run_filter(anti_plugin, p, infos))["b1"] == OK
    add_pod(infos[2], new_pod_info(foo("y1", "b1")))
    add_pod(infos[2], new_pod_info(foo("y2", "b1")))
    assert codes(run_filter(spread_plugin, p, infos))["b1"] == (Code.UNSCHEDULABLE, (SPREAD,))
    assert codes(run_filter(anti_plugin, p, infos))["b1"] == (Code.UNSCHEDULABLE, (ANTI,))
    infos[2] = new_node_info(infos[2].node)  # b1 deleted and added again, empty
    h.snap = FakeSnapshot(infos)
    assert codes(run_filter(spread_plugin, p, infos))["b1"] == OK
    assert codes(run_filter(anti_plugin, p, infos))["b1"] == OK


# upstream interpodaffinity/scoring_test.go TestPreferredAffinity, case by case
def _sel(*exprs: tuple) -> dict:
    return {"matchExpressions": [{"key": k, "operator": op, **({"values": list(v)} if v else {})}
                                 for k, op, *v in exprs]}


def _wterm(weight: int, sel: dict, topology: str, **extra: Any) -> dict:
    return {"weight": weight, "podAffinityTerm": {"labelSelector": sel, "topologyKey": topology, **extra}}


S1, S2 = {"security": "S1"}, {"security": "S2"}
CHINA, INDIA, AZ1, AZ2 = {"region": "China"}, {"region": "India"}, {"az": "az1"}, {"az": "az2"}
STAY_S1_REGION = affinity(preferred=[_wterm(5, _sel(("security", "In", "S1")), "region")])
STAY_S2_REGION = affinity(preferred=[_wterm(6, _sel(("security", "In", "S2")), "region")])
AFFINITY3 = affinity(preferred=[
    _wterm(8, _sel(("security", "NotIn", "S1"), ("security", "In", "S2")), "region"),
    _wterm(2, _sel(("security", "Exists"), ("wrongkey", "DoesNotExist")), "region")])
HARD = affinity(required=[{"labelSelector": _sel(("security", "In", "S1", "value2")), "topologyKey": "region"},
                          {"labelSelector": _sel(("security", "Exists"), ("wrongkey", "DoesNotExist")),
                           "topologyKey": "region"}])
AWAY_S1_AZ = affinity(preferred_anti=[_wterm(5, _sel(("security", "In", "S1")), "az")])
AWAY_S2_AZ = affinity(preferred_anti=[_wterm(5, _sel(("security", "In", "S2")), "az")])
STAY_S1_AWAY_S2 = {**affinity(preferred=[_wterm(8, _sel(("security", "In", "S1")), "region")]),
                   **affinity(preferred_anti=[_wterm(5, _sel(("security", "In", "S2")), "az")])}
NS_SEL = {"namespaces": ["subteam2.team2"], "namespaceSelector": _sel(("team", "In", "team1"))}
AFF_NS = affinity(preferred=[_wterm(5, _sel(("security", "In", "S1")), "region", **NS_SEL)])
ANTI_NS = affinity(preferred_anti=[_wterm(5, _sel(("security", "In", "S1")), "region", **NS_SEL)])
NAMESPACES = [{"metadata": {"name": n, "labels": {"team": t}}}
              for n, t in (("subteam1.team1", "team1"), ("subteam2.team1", "team1"),
                           ("subteam1.team2", "team2"), ("subteam2.team2", "team2"))]


def _p(labels: dict, aff: dict | None = None, node_name: str = "", ns: str = "default") -> dict:
    return pod(labels=labels, node=node_name, ns=ns, **({"affinity": aff} if aff else {}))


PREFERRED_CASES = [
    ("matching topology key and pods", _p(S1, STAY_S1_REGION),
     [_p(S1, None, "node1"), _p(S2, None, "node2"), _p(S1, None, "node3")], [CHINA, INDIA, AZ1], [100, 0, 0]),
    ("same topology value same score", _p({}, STAY_S1_REGION), [_p(S1, None, "node1")],
     [CHINA, {**CHINA, **AZ1}, INDIA], [100, 100, 0]),
    ("region with more matches", _p(S1, STAY_S2_REGION),
     [_p(S2, None, n) for n in ("node1", "node1", "node2", "node3", "node4", "node5")],
     [CHINA, INDIA, CHINA, CHINA, INDIA], [100, 0, 100, 100, 0]),
    ("label operators", _p(S1, AFFINITY3), [_p(S1, None, "node1"), _p(S2, None, "node2"), _p(S1, None, "node3")],
     [CHINA, INDIA, AZ1], [20, 100, 0]),
    ("symmetry preferred", _p(S2), [_p(S1, STAY_S1_REGION, "node1"), _p(S2, STAY_S2_REGION, "node2")],
     [CHINA, INDIA, AZ1], [0, 100, 0]),
    ("symmetry with namespace selector", _p(S1, ns="subteam1.team1"),
     [_p(S1, AFF_NS, "node1"), _p(S2, STAY_S2_REGION, "node2")], [CHINA, INDIA, AZ1], [100, 0, 0]),
    ("anti symmetry with namespace selector", _p(S1, ns="subteam1.team1"),
     [_p(S1, ANTI_NS, "node1"), _p(S2, STAY_S2_REGION, "node2")], [CHINA, INDIA, AZ1], [0, 100, 100]),
    ("symmetry required (hardPodAffinityWeight)", _p(S1), [_p(S1, HARD, "node1"), _p(S2, HARD, "node2")],
     [CHINA, INDIA, AZ1], [100, 100, 0]),
    ("anti: not matching gets high", _p(S1, AWAY_S1_AZ), [_p(S1, None, "node1"), _p(S2, None, "node2")],
     [AZ1, CHINA], [0, 100]),
    ("anti: more matches lower", _p(S1, AWAY_S1_AZ),
     [_p(S1, None, "node1"), _p(S1, None, "node1"), _p(S2, None, "node2")], [AZ1, INDIA], [0, 100]),
    ("anti symmetry", _p(S2), [_p(S1, AWAY_S2_AZ, "node1"), _p(S2, AWAY_S1_AZ, "node2")], [AZ1, AZ2], [0, 100]),
    ("affinity and anti-affinity", _p(S1, STAY_S1_AWAY_S2), [_p(S1, None, "node1"), _p(S1, None, "node2")],
     [CHINA, AZ1], [100, 0]),
    ("affinity, anti-affinity and symmetry", _p(S1, STAY_S1_AWAY_S2),
     [_p(S1, None, "node1"), _p(S2, None, "node2"), _p({}, STAY_S1_AWAY_S2, "node3"), _p({}, AWAY_S1_AZ, "node4")],
     [CHINA, AZ1, INDIA, AZ2], [100, 0, 100, 0]),
    ("partial nodes without affinity pods", _p(S1), [_p(S1, None, "node1"), _p({}, STAY_S1_AWAY_S2, "node2")],
     [CHINA, CHINA], [0, 0]),
]


@pytest.mark.parametrize(("name", "p", "existing", "labels", "want"), PREFERRED_CASES,
                         ids=[c[0] for c in PREFERRED_CASES])
def test_inter_pod_affinity_score_upstream(name: str, p: dict, existing: list, labels: list, want: list) -> None:
    nodes = [node(f"node{i + 1}", labels=lb) for i, lb in enumerate(labels)]
    infos = snapshot(nodes, existing)
    got = run_scores(InterPodAffinity(FakeHandle(infos, {"namespaces": NAMESPACES}), {}), p, infos)
    assert got == {f"node{i + 1}": w for i, w in enumerate(want)}
