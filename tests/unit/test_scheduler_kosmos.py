"""The Kosmos plugins (scheduler/plugins/kosmos_*.py) and scheduler/policy.py, table-driven.

Each plugin runs the way the framework runs it, through a tiny driver here (:func:`feasible`):
PreFilter once (SKIP = nothing to filter; a rejection rejects every node with its reason; a
PreFilterResult narrows the nodes), then Filter per node. The WorkloadPolicy acceptance
schedules pods one by one (PreFilter, Filter, Score, pick the best, "bind" by adding the pod to
its NodeInfo, as the cache's assume does), against a hand-built snapshot.

Scenarios: Kosmos' e2e DistributionPolicy cases (test/e2e/framework/distribution_policy_sample.go:
name -> leaf, namePrefix -> host, label -> mix, cluster-scoped fallback) and the cases Kosmos
gets wrong (the last policy in the list wins, matchLabels read as "any one label", matchExpressions
ignored, adv tolerations never matching).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest

from scheduler.framework import (
    Code,
    CycleState,
    EnqueueExtensions,
    FilterPlugin,
    NodeInfo,
    PodInfo,
    PreFilterPlugin,
    Resource,
    ScorePlugin,
    Status,
)
from scheduler.plugins import REGISTRY
from scheduler.plugins.kosmos_distribution import LeafNodeDistribution
from scheduler.plugins.kosmos_tainttoleration import LeafNodeTaintToleration
from scheduler.plugins.kosmos_volumebinding import LeafNodeVolumeBinding
from scheduler.plugins.kosmos_workloadpolicy import LeafNodeWorkloadPolicy
from scheduler.policy import (
    PolicyError,
    label_selector_matches,
    node_selector_matches,
    workload_score,
)
from scheduler.selectors import tolerates

Obj = dict[str, Any]
LEAF_TAINT = {"key": "kosmos.io/node", "value": "true", "effect": "NoSchedule"}

# ---------------------------------------------------------------------------------------------
# Builders and the driver
# ---------------------------------------------------------------------------------------------


def node(name: str, leaf: bool = False, labels: Mapping[str, str] | None = None,
         taints: list[Obj] | None = None, annotations: Mapping[str, str] | None = None) -> NodeInfo:
    lab = dict(labels or {})
    tts = list(taints or [])
    if leaf:
        lab["kosmos.io/node"] = "true"
        tts.append(dict(LEAF_TAINT))
    return NodeInfo(node={"metadata": {"name": name, "labels": lab, "annotations": dict(annotations or {})},
                          "spec": {"taints": tts}})


def pod(name: str, ns: str = "default", labels: Mapping[str, str] | None = None, **spec: Any) -> PodInfo:
    meta: Obj = {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}", "labels": dict(labels or {})}
    if spec.pop("daemonset", False):
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "controller": True}]
    if spec.pop("terminating", False):
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return PodInfo(pod={"metadata": meta, "spec": spec}, requests=Resource(), non_zero_requests=Resource())


class Snap:
    def __init__(self, nodes: list[NodeInfo]) -> None:
        self.nodes = nodes

    def node_infos(self) -> list[NodeInfo]:
        return self.nodes

    def get(self, node_name: str) -> NodeInfo | None:
        return next((n for n in self.nodes if n.name == node_name), None)

    def have_pods_with_affinity(self) -> list[NodeInfo]:
        return []

    def have_pods_with_required_anti_affinity(self) -> list[NodeInfo]:
        return []


class Handle:
    """framework.Handle over hand-built listers (keys ``ns/name`` or ``name``, as the informers')."""

    def __init__(self, nodes: list[NodeInfo] | None = None, **objects: list[Obj]) -> None:
        self.snap = Snap(nodes or [])
        self.listers: dict[str, dict[str, Obj]] = {}
        for resource, objs in objects.items():
            lister = self.listers.setdefault(resource, {})
            for o in objs:
                m = o["metadata"]
                lister[f"{m['namespace']}/{m['name']}" if m.get("namespace") else m["name"]] = o

    def snapshot(self) -> Snap:
        return self.snap

    def lister(self, resource: str) -> Mapping[str, Obj]:
        return self.listers.get(resource, {})


def feasible(plugin: Any, p: PodInfo, nodes: list[NodeInfo],
             state: CycleState | None = None) -> tuple[list[str], dict[str, Status]]:
    """Run PreFilter and Filter as the framework would: (feasible node names, rejections)."""
    state = state or CycleState()
    rejected: dict[str, Status] = {}
    if isinstance(plugin, PreFilterPlugin):
        result, st = plugin.pre_filter(state, p, nodes)
        if st.code == Code.SKIP:
            return [n.name for n in nodes], {}
        if not st.ok:
            return [], {n.name: st for n in nodes}
        if result is not None and result.node_names is not None:
            for n in nodes:
                if n.name not in result.node_names:
                    rejected[n.name] = Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE,
                                              (f"node(s) didn't satisfy plugin(s) [{plugin.name}]",))
    ok = []
    for n in nodes:
        if n.name in rejected:
            continue
        st = plugin.filter(state, p, n)
        if st.ok:
            ok.append(n.name)
        else:
            rejected[n.name] = st
    return ok, rejected


def test_registry_names_every_plugin_and_each_implements_its_points() -> None:
    kosmos = {"LeafNodeTaintToleration", "LeafNodeDistribution", "LeafNodeVolumeBinding", "LeafNodeWorkloadPolicy"}
    assert kosmos <= set(REGISTRY)
    h = Handle()
    for name in kosmos:
        pl = REGISTRY[name](h, {})
        assert pl.name == name
        assert isinstance(pl, FilterPlugin) and isinstance(pl, EnqueueExtensions)
    assert isinstance(REGISTRY["LeafNodeWorkloadPolicy"](h, {}), ScorePlugin)
    assert isinstance(REGISTRY["LeafNodeTaintToleration"](h, {}), ScorePlugin)


@pytest.mark.parametrize(("cls", "resource"), [(LeafNodeDistribution, "DistributionPolicy"),
                                               (LeafNodeDistribution, "ClusterDistributionPolicy"),
                                               (LeafNodeWorkloadPolicy, "WorkloadPolicy")])
def test_policy_changes_requeue_unschedulable_pods(cls: type, resource: str) -> None:
    events = {(e.resource, e.action) for e in cls(Handle(), {}).events_to_register()}
    assert {(resource, a) for a in ("Add", "Update", "Delete")} <= events


# ---------------------------------------------------------------------------------------------
# LeafNodeTaintToleration
# ---------------------------------------------------------------------------------------------

T_GPU = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
T_EXEC = {"key": "maintenance", "value": "", "effect": "NoExecute"}
T_PREFER = {"key": "spot", "value": "yes", "effect": "PreferNoSchedule"}


@pytest.mark.parametrize(("taints", "tolerations", "reason"), [
    ([LEAF_TAINT], [], None),  # the leaf taint is tolerated implicitly
    ([], [], None),
    ([T_GPU], [], "node(s) had untolerated taint {dedicated: gpu}"),
    ([LEAF_TAINT, T_GPU], [], "node(s) had untolerated taint {dedicated: gpu}"),  # only the leaf taint is free
    ([T_GPU], [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}], None),
    ([T_GPU], [{"key": "dedicated", "value": "gpu"}], None),  # empty operator = Equal, empty effect = any
    ([T_GPU], [{"key": "dedicated", "value": "cpu"}], "node(s) had untolerated taint {dedicated: gpu}"),
    ([T_GPU], [{"key": "dedicated", "operator": "Exists"}], None),
    ([T_GPU], [{"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}],
     "node(s) had untolerated taint {dedicated: gpu}"),  # effect must match when given
    ([T_GPU, T_EXEC], [{"operator": "Exists"}], None),  # empty key + Exists tolerates everything
    ([T_EXEC], [], "node(s) had untolerated taint {maintenance: }"),
    ([T_PREFER], [], None),  # PreferNoSchedule only scores
    # The implicit toleration is for exactly kosmos.io/node=true:NoSchedule, nothing wider.
    ([{"key": "kosmos.io/node", "value": "true", "effect": "NoExecute"}], [],
     "node(s) had untolerated taint {kosmos.io/node: true}"),
    ([{"key": "kosmos.io/node", "value": "false", "effect": "NoSchedule"}], [],
     "node(s) had untolerated taint {kosmos.io/node: false}"),
], ids=lambda v: repr(v)[:60])
def test_taint_toleration_filter(taints: list[Obj], tolerations: list[Obj], reason: str | None) -> None:
    pl = LeafNodeTaintToleration(Handle(), {})
    st = pl.filter(CycleState(), pod("p", tolerations=tolerations), node("n", taints=taints))
    if reason is None:
        assert st.ok, st
    else:
        assert st.code == Code.UNSCHEDULABLE_AND_UNRESOLVABLE and st.reasons == (reason,)


def test_taint_toleration_scores_prefer_no_schedule_taints_reversed() -> None:
    pl = LeafNodeTaintToleration(Handle(), {})
    nodes = [node("clean", leaf=True), node("one", taints=[T_PREFER]),
             node("two", taints=[T_PREFER, {"key": "old", "value": "", "effect": "PreferNoSchedule"}])]
    for tolerations, want in [([], {"clean": 100, "one": 50, "two": 0}),
                              ([{"key": "spot", "operator": "Exists", "effect": "PreferNoSchedule"}],
                               {"clean": 100, "one": 100, "two": 0}),
                              ([{"operator": "Exists"}], {"clean": 100, "one": 100, "two": 100})]:
        p = pod("p", tolerations=tolerations)
        state = CycleState()
        assert pl.pre_score(state, p, nodes).ok
        scores = {n.name: pl.score(state, p, n)[0] for n in nodes}
        assert pl.normalize_score(state, p, scores).ok
        assert scores == want, tolerations


# ---------------------------------------------------------------------------------------------
# LeafNodeDistribution
# ---------------------------------------------------------------------------------------------

TERMS = [{"name": "host", "nodeType": "host"}, {"name": "leaf", "nodeType": "leaf"},
         {"name": "mix", "nodeType": "mix"}, {"name": "adv", "nodeType": "adv",
                                              "advancedTerm": {"nodeSelector": {"advNode": "true"}}}]


def dp(name: str, ns: str, *selectors: Obj, terms: list[Obj] | None = None) -> Obj:
    return {"apiVersion": "kosmos.io/v1alpha1", "kind": "DistributionPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"resourceSelectors": list(selectors), "policyTerms": copy.deepcopy(terms or TERMS)}}


def cdp(name: str, *selectors: Obj, terms: list[Obj] | None = None) -> Obj:
    return {"apiVersion": "kosmos.io/v1alpha1", "kind": "ClusterDistributionPolicy", "metadata": {"name": name},
            "spec": {"resourceSelectors": list(selectors), "policyTerms": copy.deepcopy(terms or TERMS)}}


# Kosmos' e2e policies (test/e2e/framework/distribution_policy_sample.go).
E2E_DP = dp("kosmos-namespace-distribution-policy", "test-name-scope",
            {"policyName": "leaf", "name": "nginx"},
            {"policyName": "host", "namePrefix": "nginx-prefix"},
            {"policyName": "mix", "labelSelector": {"matchLabels": {"example-distribution-policy": "nginx"}}})
E2E_CDP = cdp("kosmos-cluster-distribution-policy",
              {"policyName": "mix", "name": "cluster-nginx"},
              {"policyName": "host", "namePrefix": "cluster-nginx-prefix"},
              {"policyName": "leaf",
               "labelSelector": {"matchLabels": {"example-distribution-policy": "cluster-nginx"}}})

HOSTS = ["host-1", "host-2"]
LEAVES = ["kosmos-member1", "kosmos-member2"]
ALL = HOSTS + LEAVES


def dist_nodes() -> list[NodeInfo]:
    return [node("host-1", labels={"advNode": "true"}), node("host-2", taints=[T_GPU]),
            node("kosmos-member1", leaf=True, labels={"advNode": "true"}), node("kosmos-member2", leaf=True)]


def sel_name(policy: str, name: str) -> Obj:
    return {"policyName": policy, "name": name}


def sel_prefix(policy: str, prefix: str) -> Obj:
    return {"policyName": policy, "namePrefix": prefix}


def sel_labels(policy: str, labels: Obj | None = None, exprs: list[Obj] | None = None) -> Obj:
    s: Obj = {}
    if labels is not None:
        s["matchLabels"] = labels
    if exprs is not None:
        s["matchExpressions"] = exprs
    return {"policyName": policy, "labelSelector": s}


WEB = {"app": "web"}
DIST_CASES: list[tuple[str, list[Obj], list[Obj], PodInfo, list[str]]] = [
    # --- Kosmos' e2e scenarios ---
    ("e2e: name -> leaf", [E2E_DP], [E2E_CDP], pod("nginx", "test-name-scope"), LEAVES),
    ("e2e: namePrefix -> host", [E2E_DP], [E2E_CDP], pod("nginx-prefix-01", "test-name-scope"), HOSTS),
    ("e2e: label -> mix", [E2E_DP], [E2E_CDP],
     pod("nginx-test-name-label-scope-x1", "test-name-scope", {"example-distribution-policy": "nginx"}), ALL),
    ("e2e: cluster-scoped fallback, name -> mix", [E2E_DP], [E2E_CDP], pod("cluster-nginx", "test-namespace-scope"),
     ALL),
    ("e2e: cluster-scoped namePrefix -> host", [E2E_DP], [E2E_CDP],
     pod("cluster-nginx-prefix-7", "test-namespace-scope"), HOSTS),
    ("e2e: cluster-scoped label -> leaf", [E2E_DP], [E2E_CDP],
     pod("any", "test-namespace-scope", {"example-distribution-policy": "cluster-nginx"}), LEAVES),
    ("no policy matches -> mix", [E2E_DP], [E2E_CDP], pod("other", "test-name-scope"), ALL),
    ("a DistributionPolicy of another namespace does not apply", [E2E_DP], [], pod("nginx", "elsewhere"), ALL),
    # --- namespaced before cluster-scoped, whatever the precision ---
    ("namespaced label beats cluster name",
     [dp("ns-labels", "apps", sel_labels("host", WEB))], [cdp("c", sel_name("leaf", "web-0"))],
     pod("web-0", "apps", WEB), HOSTS),
    # --- what Kosmos gets wrong: the last policy in the list must not win ---
    ("two policies, the less precise last (and sorting first)",
     [dp("z-by-name", "apps", sel_name("leaf", "web-0")), dp("a-by-labels", "apps", sel_labels("host", WEB))], [],
     pod("web-0", "apps", WEB), LEAVES),
    ("two policies, the less precise first",
     [dp("a-by-labels", "apps", sel_labels("host", WEB)), dp("z-by-name", "apps", sel_name("leaf", "web-0"))], [],
     pod("web-0", "apps", WEB), LEAVES),
    ("two cluster policies, the less precise last", [],
     [cdp("z-prefix", sel_prefix("leaf", "web-")), cdp("a-labels", sel_labels("host", WEB))],
     pod("web-0", "apps", WEB), LEAVES),
    ("one policy: name beats an earlier namePrefix and label",
     [dp("p", "apps", sel_labels("host", WEB), sel_prefix("mix", "web"), sel_name("leaf", "web-0"))], [],
     pod("web-0", "apps", WEB), LEAVES),
    # --- label selectors with upstream semantics ---
    ("matchExpressions-only selector matches",
     [dp("p", "apps", sel_labels("leaf", exprs=[{"key": "tier", "operator": "In", "values": ["db", "cache"]}]))], [],
     pod("x", "apps", {"tier": "cache"}), LEAVES),
    ("matchExpressions-only selector does not match",
     [dp("p", "apps", sel_labels("leaf", exprs=[{"key": "tier", "operator": "In", "values": ["db"]}]))], [],
     pod("x", "apps", {"tier": "web"}), ALL),
    ("matchExpressions NotIn/DoesNotExist",
     [dp("p", "apps", sel_labels("leaf", exprs=[{"key": "tier", "operator": "NotIn", "values": ["db"]},
                                                {"key": "canary", "operator": "DoesNotExist"}]))], [],
     pod("x", "apps", {"tier": "web"}), LEAVES),
    ("labels that match only partly do not match (AND, not OR)",
     [dp("p", "apps", sel_labels("leaf", {"app": "web", "tier": "db"}))], [], pod("x", "apps", WEB), ALL),
    ("matchLabels AND matchExpressions both hold",
     [dp("p", "apps", sel_labels("leaf", WEB, [{"key": "tier", "operator": "Exists"}]))], [],
     pod("x", "apps", {"app": "web", "tier": "x"}), LEAVES),
    ("matchLabels holds, matchExpressions not",
     [dp("p", "apps", sel_labels("leaf", WEB, [{"key": "tier", "operator": "Exists"}]))], [],
     pod("x", "apps", WEB), ALL),
    ("empty labelSelector matches every pod (LabelSelectorAsSelector)",
     [dp("p", "apps", sel_labels("host"))], [], pod("x", "apps"), HOSTS),
    ("selector with nothing set selects every pod, below labelSelector",
     [dp("p", "apps", {"policyName": "host"}, sel_labels("leaf", WEB))], [], pod("x", "apps", WEB), LEAVES),
    ("name set: its labelSelector is ignored",
     [dp("p", "apps", {"policyName": "leaf", "name": "web-0", "labelSelector": {"matchLabels": {"no": "such"}}})],
     [], pod("web-0", "apps"), LEAVES),
    ("namePrefix with labelSelector needs both",
     [dp("p", "apps", {"policyName": "leaf", "namePrefix": "web-", "labelSelector": {"matchLabels": WEB}})],
     [], pod("web-0", "apps", {"app": "db"}), ALL),
    # --- longest prefix wins, in either order ---
    ("longest prefix wins (short first)",
     [dp("p", "apps", sel_prefix("host", "web-"), sel_prefix("leaf", "web-front-"))], [],
     pod("web-front-1", "apps"), LEAVES),
    ("longest prefix wins (long first, other policy)",
     [dp("z", "apps", sel_prefix("leaf", "web-front-")), dp("a", "apps", sel_prefix("host", "web-"))], [],
     pod("web-front-1", "apps"), LEAVES),
    ("the shorter prefix for the others",
     [dp("p", "apps", sel_prefix("host", "web-"), sel_prefix("leaf", "web-front-"))], [],
     pod("web-back-1", "apps"), HOSTS),
    # --- ties: policy name, then selector index; never list order ---
    ("tie: the policy name sorting first wins",
     [dp("zeta", "apps", sel_labels("host", WEB)), dp("alpha", "apps", sel_labels("leaf", WEB))], [],
     pod("x", "apps", WEB), LEAVES),
    ("tie: the lower selector index wins",
     [dp("p", "apps", sel_labels("leaf", WEB), sel_labels("host", {"app": "web"}))], [], pod("x", "apps", WEB), LEAVES),
    # --- terms ---
    ("nodeType omitted defaults to mix",
     [dp("p", "apps", sel_name("t", "x"), terms=[{"name": "t"}])], [], pod("x", "apps"), ALL),
    ("adv: nodeSelector", [dp("p", "apps", sel_name("adv", "x"))], [], pod("x", "apps"), ["host-1", "kosmos-member1"]),
    ("adv: nodeName narrows to that node",
     [dp("p", "apps", sel_name("a", "x"), terms=[{"name": "a", "nodeType": "adv",
                                                   "advancedTerm": {"nodeName": "kosmos-member2"}}])], [],
     pod("x", "apps"), ["kosmos-member2"]),
    ("adv: nodeName and nodeSelector must both hold",
     [dp("p", "apps", sel_name("a", "x"), terms=[{"name": "a", "nodeType": "adv", "advancedTerm": {
         "nodeName": "kosmos-member2", "nodeSelector": {"advNode": "true"}}}])], [], pod("x", "apps"), []),
    ("adv: tolerations admit nodes whose taints they tolerate (leaf taint free)",
     [dp("p", "apps", sel_name("a", "x"), terms=[{"name": "a", "nodeType": "adv", "advancedTerm": {
         "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "cpu", "effect": "NoSchedule"}]}}])],
     [], pod("x", "apps"), ["host-1", "kosmos-member1", "kosmos-member2"]),
    ("adv: a toleration of the gpu taint admits the gpu node",
     [dp("p", "apps", sel_name("a", "x"), terms=[{"name": "a", "nodeType": "adv", "advancedTerm": {
         "tolerations": [{"key": "dedicated", "operator": "Exists"}], "nodeSelector": {}}}])],
     [], pod("x", "apps"), ALL),
    ("adv: no part given admits every node",
     [dp("p", "apps", sel_name("a", "x"), terms=[{"name": "a", "nodeType": "adv"}])], [], pod("x", "apps"), ALL),
    # --- DaemonSet pods are never restricted ---
    ("DaemonSet pods ignored", [E2E_DP], [], pod("nginx", "test-name-scope", daemonset=True), ALL),
]


@pytest.mark.parametrize(("policies", "cluster_policies", "p", "want"),
                         [c[1:] for c in DIST_CASES], ids=[c[0] for c in DIST_CASES])
def test_distribution(policies: list[Obj], cluster_policies: list[Obj], p: PodInfo, want: list[str]) -> None:
    nodes = dist_nodes()
    pl = LeafNodeDistribution(Handle(nodes, distributionpolicies=policies,
                                     clusterdistributionpolicies=cluster_policies), {})
    ok, rejected = feasible(pl, p, nodes)
    assert ok == want, {k: v.reasons for k, v in rejected.items()}
    for st in rejected.values():
        assert st.code == Code.UNSCHEDULABLE_AND_UNRESOLVABLE


def test_distribution_reason_names_policy_and_term() -> None:
    nodes = dist_nodes()
    pl = LeafNodeDistribution(Handle(nodes, distributionpolicies=[E2E_DP], clusterdistributionpolicies=[E2E_CDP]), {})
    _, rejected = feasible(pl, pod("nginx", "test-name-scope"), nodes)
    assert rejected["host-1"].reasons == (
        "node(s) didn't match the pod's distribution policy test-name-scope/kosmos-namespace-distribution-policy "
        "(term 'leaf')",)
    _, rejected = feasible(pl, pod("cluster-nginx-prefix-1", "x"), nodes)
    assert rejected["kosmos-member1"].reasons == (
        "node(s) didn't match the pod's distribution policy kosmos-cluster-distribution-policy (term 'host')",)


def test_distribution_policy_name_without_term_is_unresolvable_and_named() -> None:
    nodes = dist_nodes()
    bad = dp("broken", "apps", sel_name("nowhere", "x"))
    pl = LeafNodeDistribution(Handle(nodes, distributionpolicies=[bad]), {})
    ok, rejected = feasible(pl, pod("x", "apps"), nodes)
    assert ok == []
    (st,) = {v for v in rejected.values()}
    assert st.code == Code.UNSCHEDULABLE_AND_UNRESOLVABLE
    assert "DistributionPolicy apps/broken" in st.message() and "'nowhere' names no policyTerm" in st.message()


def test_distribution_bad_operator_is_an_error_naming_the_field() -> None:
    nodes = dist_nodes()
    bad = dp("broken", "apps", sel_labels("leaf", exprs=[{"key": "a", "operator": "Like", "values": ["x"]}]))
    pl = LeafNodeDistribution(Handle(nodes, distributionpolicies=[bad]), {})
    _, st = pl.pre_filter(CycleState(), pod("x", "apps"), nodes)
    assert st.code == Code.ERROR
    assert "DistributionPolicy apps/broken: spec.resourceSelectors[0].labelSelector.matchExpressions[0]" in st.message()
    assert "'Like'" in st.message()


def test_distribution_filter_without_prefilter_decides_alone() -> None:
    nodes = dist_nodes()
    pl = LeafNodeDistribution(Handle(nodes, distributionpolicies=[E2E_DP]), {})
    assert not pl.filter(CycleState(), pod("nginx", "test-name-scope"), nodes[0]).ok
    assert pl.filter(CycleState(), pod("nginx", "test-name-scope"), nodes[2]).ok


# ---------------------------------------------------------------------------------------------
# Selector and toleration helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "labels", "want"), [
    (None, {"a": "1"}, False),
    ({}, {}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1", "b": "3"}}, {"a": "1", "b": "2"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
])
def test_label_selector_semantics(selector: Obj | None, labels: dict[str, str], want: bool) -> None:
    assert label_selector_matches(selector, labels) is want


@pytest.mark.parametrize("req", [{"key": "a", "operator": "In", "values": []},
                                 {"key": "a", "operator": "Exists", "values": ["x"]},
                                 {"key": "a", "operator": "Gt", "values": ["1"]}])
def test_label_selector_refuses_malformed_requirements(req: Obj) -> None:
    with pytest.raises(PolicyError, match=r"where\.matchExpressions\[0\]"):
        label_selector_matches({"matchExpressions": [req]}, {"a": "1"}, "where")


def test_node_selector_terms_or_requirements_and() -> None:
    n = {"metadata": {"name": "n1", "labels": {"zone": "a", "cpus": "8"}}}
    term = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]},
                                 {"key": "cpus", "operator": "Gt", "values": ["4"]}]}
    assert node_selector_matches({"nodeSelectorTerms": [term]}, n)
    assert not node_selector_matches({"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "cpus", "operator": "Lt", "values": ["4"]}]}]}, n)
    assert node_selector_matches({"nodeSelectorTerms": [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]}, n)
    assert not node_selector_matches({"nodeSelectorTerms": [{}]}, n)  # an empty term matches nothing
    assert not node_selector_matches({"nodeSelectorTerms": []}, n)


def test_tolerates_is_upstream_toleratestaint() -> None:
    assert tolerates({"operator": "Exists"}, T_GPU)
    assert not tolerates({"key": "dedicated", "operator": "Lt", "value": "z"}, T_GPU)
    assert tolerates({"key": "maintenance", "effect": "NoExecute"}, T_EXEC)  # Equal, both values empty


# ---------------------------------------------------------------------------------------------
# LeafNodeVolumeBinding
# ---------------------------------------------------------------------------------------------


def pvc(name: str, ns: str = "apps", owners: str | None = None, volume: str = "") -> Obj:
    ann = {} if owners is None else {"kosmos-io/cluster-owners": owners}
    return {"metadata": {"name": name, "namespace": ns, "annotations": ann}, "spec": {"volumeName": volume}}


def pv(name: str, owners: str | None = None, host: str | None = None) -> Obj:
    ann = {} if owners is None else {"kosmos-io/cluster-owners": owners}
    spec: Obj = {}
    if host:
        spec = {"local": {"path": "/mnt/disk"}, "nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [host]}]}]}}}
    return {"metadata": {"name": name, "annotations": ann}, "spec": spec}


def vol_nodes() -> list[NodeInfo]:
    return [node("host-1", labels={"kubernetes.io/hostname": "host-1"}),
            node("host-2", labels={"kubernetes.io/hostname": "host-2"}),
            node("kosmos-c1", leaf=True, annotations={"kosmos-io/owned-by-cluster": "c1"}),
            node("kosmos-c2", leaf=True, annotations={"kosmos-io/owned-by-cluster": "c2"})]


def claim(name: str) -> Obj:
    return {"name": name, "persistentVolumeClaim": {"claimName": name}}


OWNER_REASON = "node(s) were not in the leaf cluster owning the pod's volumes (kosmos-io/cluster-owners: {})"
VOL_CASES: list[tuple[str, list[Obj], list[Obj], list[Obj], list[str], str | None]] = [
    ("no claims: skipped", [], [], [], ["host-1", "host-2", "kosmos-c1", "kosmos-c2"], None),
    ("claim of no leaf, unbound: left to VolumeBinding", [claim("d")], [pvc("d")], [],
     ["host-1", "host-2", "kosmos-c1", "kosmos-c2"], None),
    ("leaf-owned claim stays in its leaf", [claim("d")], [pvc("d", owners="c1")], [], ["kosmos-c1"],
     OWNER_REASON.format("c1")),
    ("owner read from the bound PV", [claim("d")], [pvc("d", volume="pv-d")], [pv("pv-d", owners="c2")],
     ["kosmos-c2"], OWNER_REASON.format("c2")),
    ("owners listed comma-separated", [claim("d")], [pvc("d", owners="c1, c2")], [], ["kosmos-c1", "kosmos-c2"],
     OWNER_REASON.format("c1,c2")),
    ("bound local PV pins the pod", [claim("d")], [pvc("d", volume="local-1")], [pv("local-1", host="host-2")],
     ["host-2"], "node(s) had volume node affinity conflict"),
    ("generic ephemeral volume's claim", [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {}}}],
     [pvc("p-scratch", owners="c2")], [], ["kosmos-c2"], OWNER_REASON.format("c2")),
    ("missing claim: VolumeBinding's business", [claim("nope")], [], [],
     ["host-1", "host-2", "kosmos-c1", "kosmos-c2"], None),
]


@pytest.mark.parametrize(("volumes", "pvcs", "pvs", "want", "reason"), [c[1:] for c in VOL_CASES],
                         ids=[c[0] for c in VOL_CASES])
def test_volume_binding(volumes: list[Obj], pvcs: list[Obj], pvs: list[Obj], want: list[str],
                        reason: str | None) -> None:
    nodes = vol_nodes()
    pl = LeafNodeVolumeBinding(Handle(nodes, persistentvolumeclaims=pvcs, persistentvolumes=pvs), {})
    ok, rejected = feasible(pl, pod("p", "apps", volumes=volumes), nodes)
    assert ok == want, {k: v.reasons for k, v in rejected.items()}
    for st in rejected.values():
        assert st.code == Code.UNSCHEDULABLE_AND_UNRESOLVABLE and st.reasons == (reason,)


def test_volume_binding_claims_of_different_leaves_fit_nowhere() -> None:
    nodes = vol_nodes()
    pl = LeafNodeVolumeBinding(Handle(nodes, persistentvolumeclaims=[pvc("a", owners="c1"), pvc("b", owners="c2")]),
                               {})
    _, st = pl.pre_filter(CycleState(), pod("p", "apps", volumes=[claim("a"), claim("b")]), nodes)
    assert st.code == Code.UNSCHEDULABLE_AND_UNRESOLVABLE
    assert "apps/a, apps/b are owned by no common leaf cluster" in st.message()


# ---------------------------------------------------------------------------------------------
# LeafNodeWorkloadPolicy
# ---------------------------------------------------------------------------------------------

TOPO = "kosmos.io/cluster"


def wlp(name: str, quotas: Mapping[str, int], atype: str | None, method: str | None = None, ns: str = "apps",
        selector: Obj | None = None, key: str = TOPO) -> Obj:
    spec: Obj = {"topologyKey": key, "labelSelector": selector if selector is not None else {"matchLabels": WEB},
                 "allocationPolicy": [{"name": k, "replicas": v} for k, v in quotas.items()]}
    if atype:
        spec["allocationType"] = atype
    if method:
        spec["allocationMethod"] = method
    return {"apiVersion": "kosmos.io/v1alpha1", "kind": "WorkloadPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def wl_nodes(extra: bool = False) -> list[NodeInfo]:
    nodes = [node("a-1", labels={TOPO: "a"}), node("a-2", labels={TOPO: "a"}),
             node("b-1", leaf=True, labels={TOPO: "b"}), node("b-2", leaf=True, labels={TOPO: "b"})]
    if extra:
        nodes += [node("c-1", labels={TOPO: "c"}), node("bare")]
    return nodes


def web_pod(i: int, policy: str = "wp", ns: str = "apps") -> PodInfo:
    return pod(f"web-{i}", ns, {"app": "web", "workload-policy/kosmos.io": policy})


def schedule_one(plugins: list[Any], p: PodInfo, nodes: list[NodeInfo]) -> tuple[str | None, dict[str, Status]]:
    """A tiny scheduling cycle: PreFilter, Filter, Score of every plugin, the best total (ties: node
    name), then "bind" by adding the pod to the chosen NodeInfo (the cache's assume)."""
    state = CycleState()
    reasons: dict[str, Status] = {}
    candidates = list(nodes)
    for pl in plugins:
        if isinstance(pl, PreFilterPlugin):
            _, st = pl.pre_filter(state, p, candidates)
            if st.code == Code.SKIP:
                state.skip_filter.add(pl.name)
                state.skip_score.add(pl.name)
            elif not st.ok:
                return None, {n.name: st for n in nodes}
    ok = []
    for n in candidates:
        for pl in plugins:
            if pl.name in state.skip_filter:
                continue
            st = pl.filter(state, p, n)
            if not st.ok:
                reasons[n.name] = st
                break
        else:
            ok.append(n)
    if not ok:
        return None, reasons
    total = {n.name: 0 for n in ok}
    for pl in plugins:
        if isinstance(pl, ScorePlugin) and pl.name not in state.skip_score:
            for n in ok:
                total[n.name] += pl.score(state, p, n)[0]
    best = sorted(ok, key=lambda n: (-total[n.name], n.name))[0]
    best.pods.append(p)
    return best.name, reasons


def per_domain(nodes: list[NodeInfo]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in nodes:
        out[n.labels.get(TOPO, "-")] = out.get(n.labels.get(TOPO, "-"), 0) + len(n.pods)
    return out


@pytest.mark.parametrize("method", ["Balance", "Fill", None])
def test_workload_required_quotas_land_exactly(method: str | None) -> None:
    """Acceptance: 10 replicas with quotas {a: 3, b: 7} (Required) land exactly so; the 11th has
    nowhere to go, with a reason per node."""
    nodes = wl_nodes(extra=True)
    h = Handle(nodes, workloadpolicies=[wlp("wp", {"a": 3, "b": 7}, "Required", method)])
    plugins = [LeafNodeTaintToleration(h, {}), LeafNodeWorkloadPolicy(h, {})]
    for i in range(10):
        chosen, reasons = schedule_one(plugins, web_pod(i), nodes)
        assert chosen is not None, {k: v.reasons for k, v in reasons.items()}
    assert per_domain(nodes) == {"a": 3, "b": 7, "c": 0, "-": 0}
    chosen, reasons = schedule_one(plugins, web_pod(10), nodes)
    assert chosen is None
    full = "node(s) were in a topology domain that reached its replicas in workload-policy apps/wp"
    assert {k: (v.code, v.reasons) for k, v in reasons.items()} == {
        "a-1": (Code.UNSCHEDULABLE, (full,)), "a-2": (Code.UNSCHEDULABLE, (full,)),
        "b-1": (Code.UNSCHEDULABLE, (full,)), "b-2": (Code.UNSCHEDULABLE, (full,)),
        "c-1": (Code.UNSCHEDULABLE, (full,)),  # unlisted value: quota 0
        "bare": (Code.UNSCHEDULABLE_AND_UNRESOLVABLE,
                 ("node(s) didn't have the label 'kosmos.io/cluster' of workload-policy apps/wp",))}


@pytest.mark.parametrize("method", ["Balance", "Fill"])
def test_workload_preferred_fills_quotas_first_then_spills(method: str) -> None:
    """Quotas {a: 3, b: 2}: Required stops at 5; Preferred (also the default) places the same
    first 5 exactly by quota, then spills the other 5 over."""
    for atype in ("Required", "Preferred", None):
        nodes = wl_nodes()
        h = Handle(nodes, workloadpolicies=[wlp("wp", {"a": 3, "b": 2}, atype, method)])
        plugins = [LeafNodeTaintToleration(h, {}), LeafNodeWorkloadPolicy(h, {})]
        placed = [schedule_one(plugins, web_pod(i), nodes)[0] for i in range(10)]
        if atype == "Required":
            assert placed[5:] == [None] * 5 and None not in placed[:5]
            assert per_domain(nodes) == {"a": 3, "b": 2}
        else:
            assert None not in placed
            firsts = {"a": sum(1 for n in placed[:5] if n and n.startswith("a")),
                      "b": sum(1 for n in placed[:5] if n and n.startswith("b"))}
            assert firsts == {"a": 3, "b": 2}, (atype, placed)
            assert sum(per_domain(nodes).values()) == 10


def test_workload_counts_only_the_policys_live_pods_in_its_namespace() -> None:
    nodes = wl_nodes()
    # Already in domain a: one counted pod and three that must not count.
    nodes[0].pods += [pod("old-0", "apps", WEB), pod("other-ns", "prod", WEB), pod("db", "apps", {"app": "db"}),
                      pod("dying", "apps", WEB, terminating=True)]
    h = Handle(nodes, workloadpolicies=[wlp("wp", {"a": 2, "b": 1}, "Required")])
    plugins = [LeafNodeWorkloadPolicy(h, {})]
    placed = [schedule_one(plugins, web_pod(i), nodes)[0] for i in range(3)]
    assert [p[0] if p else None for p in placed].count("a") == 1
    assert [p[0] if p else None for p in placed].count("b") == 1
    assert placed[2] is None


def test_workload_selector_uses_match_expressions() -> None:
    nodes = wl_nodes()
    nodes[0].pods.append(pod("old", "apps", {"app": "web", "track": "stable"}))
    sel = {"matchLabels": WEB, "matchExpressions": [{"key": "track", "operator": "In", "values": ["stable"]}]}
    h = Handle(nodes, workloadpolicies=[wlp("wp", {"a": 1, "b": 1}, "Required", selector=sel)])
    pl = LeafNodeWorkloadPolicy(h, {})
    p = pod("new", "apps", {"app": "web", "track": "stable", "workload-policy/kosmos.io": "wp"})
    assert feasible(pl, p, nodes)[0] == ["b-1", "b-2"]
    # A pod its own policy's selector does not match cannot be placed: it would not count itself.
    ok, rejected = feasible(pl, pod("canary", "apps", {"app": "web", "workload-policy/kosmos.io": "wp"}), nodes)
    assert ok == [] and "don't match the labelSelector of its workload-policy apps/wp" in rejected["a-1"].message()


def test_workload_missing_policy_and_opt_out() -> None:
    nodes = wl_nodes()
    pl = LeafNodeWorkloadPolicy(Handle(nodes, workloadpolicies=[wlp("wp", {"a": 1}, "Required", ns="other")]), {})
    ok, rejected = feasible(pl, web_pod(0), nodes)
    assert ok == [] and rejected["a-1"].code == Code.UNSCHEDULABLE_AND_UNRESOLVABLE
    assert rejected["a-1"].reasons == ("workload-policy apps/wp (pod label workload-policy/kosmos.io) not found",)
    assert feasible(pl, pod("plain", "apps", WEB), nodes)[0] == [n.name for n in nodes]
    ds = pod("ds", "apps", {"workload-policy/kosmos.io": "wp"}, daemonset=True)
    assert feasible(pl, ds, nodes)[0] == [n.name for n in nodes]


@pytest.mark.parametrize(("count", "desired", "method", "want"), [
    (0, 4, "Balance", 100), (1, 4, "Balance", 75), (3, 4, "Balance", 25), (4, 4, "Balance", 0), (9, 4, "Balance", 0),
    (0, 4, "Fill", 1), (1, 4, "Fill", 25), (3, 4, "Fill", 75), (4, 4, "Fill", 0), (9, 4, "Fill", 0),
    (0, 0, "Balance", 0), (0, 0, "Fill", 0), (200, 201, "Balance", 1), (200, 201, "Fill", 99),
])
def test_workload_score_edges(count: int, desired: int, method: str, want: int) -> None:
    assert workload_score(count, desired, method) == want
