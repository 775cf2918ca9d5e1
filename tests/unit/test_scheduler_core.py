"""The scheduling loop's parts without an API server: queue, cache (assume/forget/expiry, requests
arithmetic, incremental snapshot), sampling arithmetic, FailedScheduling message format, profile
configuration and its errors."""

from __future__ import annotations

import random
from typing import Any

import pytest

from scheduler.cache import Cache, NodeSnapshot
from scheduler.framework import ClusterEvent, Status, unresolvable, unschedulable
from scheduler.podutil import milli_value, new_pod_info, parse_quantity, value
from scheduler.profile import (
    DEFAULT_PLUGINS,
    ConfigError,
    build_profiles,
    default_config,
    kosmos_plugins,
    parse_config,
)
from scheduler.queue import SchedulingQueue, backoff_duration, event_matches
from scheduler.scheduler import fit_error_message, num_feasible_nodes_to_find, select_host
from tests.scheduler_doubles import REGISTRY, node, pod


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --- quantities and requests ----------------------------------------------------------------


def test_quantities_round_up_as_upstream() -> None:
    assert milli_value("100m") == 100
    assert milli_value("1") == 1000
    assert milli_value("0.5") == 500
    assert milli_value("1u") == 1  # MilliValue rounds up
    assert value("1Gi") == 2**30
    assert value("1G") == 10**9
    assert value("1e3") == 1000
    assert value("1.5Ki") == 1536
    assert parse_quantity(2) == 2
    with pytest.raises(ValueError, match="'12xyz' is not a quantity"):
        parse_quantity("12xyz")


def _pod_with(containers: list[dict[str, Any]], init: list[dict[str, Any]] | None = None,
              overhead: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": f"c{i}", "resources": {"requests": r}} for i, r in
                                           enumerate(containers)]}
    if init:
        spec["initContainers"] = [{"name": f"i{i}", **c} for i, c in enumerate(init)]
    if overhead:
        spec["overhead"] = overhead
    return {"metadata": {"name": "p", "namespace": "ns"}, "spec": spec}


def test_pod_requests_include_init_sidecars_and_overhead() -> None:
    # Two containers 100m + 200m; a regular init container of 500m dominates cpu.
    pi = new_pod_info(_pod_with([{"cpu": "100m", "memory": "100Mi"}, {"cpu": "200m"}],
                            init=[{"resources": {"requests": {"cpu": "500m", "memory": "50Mi"}}}]))
    assert pi.requests.milli_cpu == 500
    assert pi.requests.memory == 100 * 2**20
    # A restartable (sidecar) init container adds to the sum and to later init containers.
    pi = new_pod_info(_pod_with([{"cpu": "100m"}],
                            init=[{"restartPolicy": "Always", "resources": {"requests": {"cpu": "50m"}}},
                                  {"resources": {"requests": {"cpu": "120m"}}}]))
    assert pi.requests.milli_cpu == 170  # max(100+50, 120+50)
    pi = new_pod_info(_pod_with([{"cpu": "100m", "example.com/gpu": "2"}], overhead={"cpu": "10m", "memory": "1Mi"}))
    assert pi.requests.milli_cpu == 110
    assert pi.requests.memory == 2**20
    assert pi.requests.scalar == {"example.com/gpu": 2}


def test_non_zero_requests_use_upstream_defaults() -> None:
    pi = new_pod_info(_pod_with([{}]))
    assert (pi.requests.milli_cpu, pi.requests.memory) == (0, 0)
    assert (pi.non_zero_requests.milli_cpu, pi.non_zero_requests.memory) == (100, 200 * 2**20)
    pi = new_pod_info(_pod_with([{"cpu": "300m"}]))
    assert (pi.non_zero_requests.milli_cpu, pi.non_zero_requests.memory) == (300, 200 * 2**20)


# --- cache ------------------------------------------------------------------------------------


def test_assume_then_confirm_keeps_totals_once() -> None:
    c = Cache()
    c.add_node(node("n1"))
    p = pod("a", cpu="500m")
    pi = new_pod_info({**p, "spec": {**p["spec"], "nodeName": "n1"}})
    c.assume(pi, "n1")
    snap = NodeSnapshot()
    c.update_snapshot(snap)
    assert snap.get("n1").requested.milli_cpu == 500  # type: ignore[union-attr]
    c.finish_binding(pi.key)
    c.add_pod({**p, "spec": {**p["spec"], "nodeName": "n1"}})  # the watch confirms
    assert not c.is_assumed(pi.key)
    c.update_snapshot(snap)
    assert snap.get("n1").requested.milli_cpu == 500  # type: ignore[union-attr]
    assert len(snap.get("n1").pods) == 1  # type: ignore[union-attr]
    c.remove_pod(pi.key)
    c.update_snapshot(snap)
    assert snap.get("n1").requested.milli_cpu == 0  # type: ignore[union-attr]


def test_forget_releases_the_node() -> None:
    c = Cache()
    c.add_node(node("n1"))
    pi = new_pod_info(pod("a", cpu="1"))
    c.assume(pi, "n1")
    with pytest.raises(ValueError, match="already in the cache"):
        c.assume(pi, "n1")
    c.forget(pi.key)
    snap = NodeSnapshot()
    c.update_snapshot(snap)
    assert snap.get("n1").requested.milli_cpu == 0  # type: ignore[union-attr]
    assert c.pod_node(pi.key) is None


def test_confirmed_elsewhere_moves_the_pod() -> None:
    c = Cache()
    c.add_node(node("n1"))
    c.add_node(node("n2"))
    p = pod("a", cpu="1")
    c.assume(new_pod_info(p), "n1")
    c.add_pod({**p, "spec": {**p["spec"], "nodeName": "n2"}})
    snap = NodeSnapshot()
    c.update_snapshot(snap)
    assert snap.get("n1").requested.milli_cpu == 0  # type: ignore[union-attr]
    assert snap.get("n2").requested.milli_cpu == 1000  # type: ignore[union-attr]


def test_assumed_pods_expire_only_after_binding_finished_and_ttl() -> None:
    clock = Clock()
    c = Cache(ttl=30.0, clock=clock)
    c.add_node(node("n1"))
    pi = new_pod_info(pod("a", cpu="1"))
    c.assume(pi, "n1")
    clock.t += 3600
    assert c.cleanup_expired() == []  # binding not finished: never expires
    c.finish_binding(pi.key)
    clock.t += 29
    assert c.cleanup_expired() == []
    clock.t += 2
    assert c.cleanup_expired() == [pi.key]
    assert c.pod_node(pi.key) is None


def test_ttl_zero_never_expires() -> None:
    clock = Clock()
    c = Cache(ttl=0.0, clock=clock)
    c.add_node(node("n1"))
    pi = new_pod_info(pod("a"))
    c.assume(pi, "n1")
    c.finish_binding(pi.key)
    clock.t += 10**6
    assert c.cleanup_expired() == []
    assert c.is_assumed(pi.key)


def test_snapshot_copies_only_changed_nodes() -> None:
    c = Cache()
    for i in range(5):
        c.add_node(node(f"n{i}"))
    snap = NodeSnapshot()
    c.update_snapshot(snap)
    before = {ni.name: ni for ni in snap.node_infos()}
    gens = {n: ni.generation for n, ni in before.items()}
    c.add_pod({**pod("a"), "spec": {**pod("a")["spec"], "nodeName": "n3"}})
    c.update_snapshot(snap)
    changed = [n for n, ni in before.items() if ni.generation != gens[n]]
    assert changed == ["n3"]
    # The cache's own NodeInfo is not the snapshot's (a cycle sees a stable view).
    c.add_pod({**pod("b"), "spec": {**pod("b")["spec"], "nodeName": "n3"}})
    assert len(snap.get("n3").pods) == 1  # type: ignore[union-attr]
    c.remove_node("n0")
    c.update_snapshot(snap)
    assert sorted(snap.node_info_map) == ["n1", "n2", "n3", "n4"]
    assert len(snap.node_infos()) == 4


def test_snapshot_interleaves_zones() -> None:
    c = Cache()
    for i in range(3):
        c.add_node(node(f"a{i}", labels={"topology.kubernetes.io/zone": "za"}))
    c.add_node(node("b0", labels={"topology.kubernetes.io/zone": "zb"}))
    snap = NodeSnapshot()
    c.update_snapshot(snap)
    assert [ni.name for ni in snap.node_infos()] == ["a0", "b0", "a1", "a2"]


def test_affinity_lists() -> None:
    c = Cache()
    c.add_node(node("n1"))
    c.add_node(node("n2"))
    p = pod("a")
    p["spec"]["nodeName"] = "n2"
    p["spec"]["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "x"}}, "topologyKey": "kubernetes.io/hostname"}]}}
    c.add_pod(p)
    snap = NodeSnapshot()
    c.update_snapshot(snap)
    assert [ni.name for ni in snap.have_pods_with_affinity()] == ["n2"]
    assert [ni.name for ni in snap.have_pods_with_required_anti_affinity()] == ["n2"]


# --- queue ------------------------------------------------------------------------------------


def _q(clock: Clock, events: dict[str, tuple[ClusterEvent, ...]] | None = None) -> SchedulingQueue:
    return SchedulingQueue(lambda name: (events or {}).get(name, ()), clock=clock)


def test_active_queue_orders_by_priority_then_time() -> None:
    clock = Clock()
    q = _q(clock)
    q.add(new_pod_info(pod("low")))
    clock.t += 1
    q.add(new_pod_info(pod("high", priority=10)))
    clock.t += 1
    q.add(new_pod_info(pod("low2")))
    order = [q.pop(timeout=0).key for _ in range(3)]  # type: ignore[union-attr]
    assert order == ["default/high", "default/low", "default/low2"]
    assert q.pop(timeout=0) is None


def test_backoff_doubles_to_ten_seconds() -> None:
    assert [backoff_duration(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_error_goes_to_backoff_then_active() -> None:
    clock = Clock()
    q = _q(clock)
    q.add(new_pod_info(pod("a")))
    qp = q.pop(timeout=0)
    assert qp is not None
    q.add_unschedulable(qp, (), q.scheduling_cycle, error=True)
    assert q.lengths() == {"active": 0, "backoff": 1, "unschedulable": 0}
    clock.t += 0.5
    q.flush()
    assert q.lengths()["backoff"] == 1
    clock.t += 0.6
    q.flush()
    assert q.lengths() == {"active": 1, "backoff": 0, "unschedulable": 0}


def test_unschedulable_moves_only_on_registered_events() -> None:
    clock = Clock()
    q = _q(clock, {"NodeResourcesFit": (ClusterEvent("Node", "Add"), ClusterEvent("Node", "UpdateNodeAllocatable"))})
    q.add(new_pod_info(pod("a")))
    qp = q.pop(timeout=0)
    assert qp is not None
    cycle = q.scheduling_cycle
    q.add_unschedulable(qp, {"NodeResourcesFit"}, cycle)
    assert q.lengths()["unschedulable"] == 1
    assert q.move_on_event(ClusterEvent("Node", "UpdateNodeLabel")) == 0
    assert q.move_on_event(ClusterEvent("PersistentVolumeClaim", "Add")) == 0
    clock.t += 20  # past its back-off
    assert q.move_on_event(ClusterEvent("Node", "Add")) == 1
    assert q.lengths() == {"active": 1, "backoff": 0, "unschedulable": 0}


def test_moved_while_backing_off_goes_to_backoff() -> None:
    clock = Clock()
    q = _q(clock, {"F": (ClusterEvent("Node", "Add"),)})
    q.add(new_pod_info(pod("a")))
    qp = q.pop(timeout=0)
    assert qp is not None
    q.add_unschedulable(qp, {"F"}, q.scheduling_cycle)
    assert q.move_on_event(ClusterEvent("Node", "Add")) == 1
    assert q.lengths() == {"active": 0, "backoff": 1, "unschedulable": 0}


def test_event_during_cycle_sends_pod_to_backoff() -> None:
    """upstream moveRequestCycle: a move request while the pod was in flight must not be lost."""
    clock = Clock()
    q = _q(clock, {"F": (ClusterEvent("Node", "Add"),)})
    q.add(new_pod_info(pod("a")))
    qp = q.pop(timeout=0)
    assert qp is not None
    cycle = q.scheduling_cycle
    q.move_on_event(ClusterEvent("Node", "Add"))
    q.add_unschedulable(qp, {"F"}, cycle)
    assert q.lengths() == {"active": 0, "backoff": 1, "unschedulable": 0}


def test_update_of_unschedulable_pod_requeues_it_and_flush_after_five_minutes() -> None:
    clock = Clock()
    q = _q(clock, {"F": (ClusterEvent("Node", "Add"),)})
    q.add(new_pod_info(pod("a")))
    qp = q.pop(timeout=0)
    assert qp is not None
    q.add_unschedulable(qp, {"F"}, q.scheduling_cycle)
    q.update(new_pod_info(pod("a")), spec_changed=False)
    assert q.lengths()["unschedulable"] == 1
    clock.t += 20
    q.update(new_pod_info(pod("a", cpu="50m")), spec_changed=True)
    assert q.lengths() == {"active": 1, "backoff": 0, "unschedulable": 0}
    qp = q.pop(timeout=0)
    assert qp is not None
    q.add_unschedulable(qp, {"F"}, q.scheduling_cycle)
    clock.t += 299
    q.flush()
    assert q.lengths()["unschedulable"] == 1
    clock.t += 2
    q.flush()
    assert q.lengths() == {"active": 1, "backoff": 0, "unschedulable": 0}


def test_delete_and_event_matching() -> None:
    q = _q(Clock())
    q.add(new_pod_info(pod("a")))
    q.delete("default/a")
    assert q.pop(timeout=0) is None
    assert event_matches(ClusterEvent("Node", "Update"), ClusterEvent("Node", "UpdateNodeTaint"))
    assert not event_matches(ClusterEvent("Node", "UpdateNodeTaint"), ClusterEvent("Node", "UpdateNodeLabel"))
    assert event_matches(ClusterEvent("*", "All"), ClusterEvent("Pod", "Delete"))
    assert not event_matches(ClusterEvent("Pod", "Add"), ClusterEvent("Node", "Add"))


# --- sampling, selection, message -------------------------------------------------------------


@pytest.mark.parametrize(("pct", "nodes", "want"), [
    (None, 50, 50),         # fewer than 100 nodes: all of them
    (None, 99, 99),
    (None, 100, 100),       # 50 - 0 = 50 % of 100 = 50 -> at least 100
    (None, 1000, 420),      # 50 - 8 = 42 %
    (None, 5000, 500),      # 50 - 40 = 10 %
    (None, 6000, 300),      # 50 - 48 = 2 % -> 5 %
    (None, 10000, 500),     # 5 %
    (0, 5000, 500),         # 0 means adaptive
    (30, 1000, 300),
    (100, 5000, 5000),
    (1, 5000, 100),         # never fewer than 100
])
def test_num_feasible_nodes_to_find(pct: int | None, nodes: int, want: int) -> None:
    assert num_feasible_nodes_to_find(pct, nodes) == want


def test_select_host_is_random_among_ties_only() -> None:
    rng = random.Random(1)
    seen = {select_host({"a": 5, "b": 9, "c": 9, "d": 1}, rng) for _ in range(200)}
    assert seen == {"b", "c"}
    assert select_host({"only": 0}) == "only"


def test_fit_error_message_matches_upstream() -> None:
    # The example, upstream's sorting (by the "<count> <reason>" string).
    statuses = [unschedulable("Insufficient cpu")] * 3 + \
        [unresolvable("node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }")] * 2 + \
        [unresolvable("node(s) didn't match Pod's node affinity/selector")] * 2
    assert fit_error_message(7, statuses) == (
        "0/7 nodes are available: 2 node(s) didn't match Pod's node affinity/selector, "
        "2 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, 3 Insufficient cpu.")
    # String sort, as Go's sort.Strings: "10 ..." before "2 ...".
    msg = fit_error_message(12, [unschedulable("Insufficient cpu")] * 10 + [unschedulable("Too many pods")] * 2)
    assert msg == "0/12 nodes are available: 10 Insufficient cpu, 2 Too many pods."
    # A node failing two resources counts once per reason (upstream texts from one Status).
    assert fit_error_message(1, [unschedulable("Insufficient cpu", "Insufficient memory")]) == \
        "0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient memory."
    # PreFilter rejection: its message only.
    assert fit_error_message(3, pre_filter_msg="node(s) didn't satisfy plugin VolumeBinding") == \
        "0/3 nodes are available: node(s) didn't satisfy plugin VolumeBinding."
    # Nodes PreFilter ruled out count under "didn't satisfy plugin(s) [...]".
    assert fit_error_message(5, [unschedulable("Insufficient cpu")], absent_reasons=(
        "node(s) didn't satisfy plugin(s) [NodeAffinity]",), absent_count=4) == \
        "0/5 nodes are available: 1 Insufficient cpu, 4 node(s) didn't satisfy plugin(s) [NodeAffinity]."
    # With upstream's DefaultPreemption the suffix would follow; without preemption there is none.
    assert fit_error_message(1, [Status()]) == "0/1 nodes are available:"


# --- profiles ---------------------------------------------------------------------------------


class _H:
    def snapshot(self) -> Any:
        return NodeSnapshot()

    def lister(self, resource: str) -> Any:
        return {}


def test_builtin_profiles_use_registered_plugins_with_upstream_weights() -> None:
    profs = build_profiles(default_config(), _H(), REGISTRY)
    assert set(profs) == {"default-scheduler", "kosmos-scheduler"}
    d = profs["default-scheduler"]
    assert [p.name for p in d.filter] == ["TaintToleration", "NodeResourcesFit"]  # upstream order
    assert d.weights == {"NodeResourcesBalancedAllocation": 1}
    k = profs["kosmos-scheduler"]
    assert [p.name for p in k.filter] == ["NodeResourcesFit"]  # TaintToleration replaced by the leaf one
    assert dict(DEFAULT_PLUGINS)["TaintToleration"] == 3
    assert ("LeafNodeTaintToleration", 3) in kosmos_plugins()
    assert ("LeafNodeVolumeBinding", 0) in kosmos_plugins() and ("VolumeBinding", 0) in kosmos_plugins()
    assert ("TaintToleration", 3) not in kosmos_plugins()


def test_config_enables_disables_and_weighs() -> None:
    cfg = parse_config({"apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration",
                        "percentageOfNodesToScore": 30,
                        "profiles": [{"schedulerName": "default-scheduler",
                                      "plugins": {"filter": {"disabled": [{"name": "TaintToleration"}]},
                                                  "score": {"enabled": [{"name": "NodeResourcesBalancedAllocation",
                                                                         "weight": 5}]}},
                                      "pluginConfig": [{"name": "NodeResourcesFit", "args": {
                                          "apiVersion": "kubescheduler.config.k8s.io/v1",
                                          "kind": "NodeResourcesFitArgs",
                                          "scoringStrategy": {"type": "MostAllocated"}}}]},
                                     {"schedulerName": "mine", "percentageOfNodesToScore": 70,
                                      "plugins": {"multiPoint": {"disabled": [{"name": "*"}],
                                                                 "enabled": [{"name": "NodeResourcesFit"}]}}}],
                        "leaderElection": {"leaderElect": True, "leaseDuration": "20s", "renewDeadline": "15s",
                                           "retryPeriod": "3s", "resourceName": "x"}})
    profs = build_profiles(cfg, _H(), REGISTRY)
    d = profs["default-scheduler"]
    assert [p.name for p in d.filter] == ["NodeResourcesFit"]
    assert d.weights == {"NodeResourcesBalancedAllocation": 5}
    assert d.percentage_of_nodes_to_score == 30
    assert d.plugins["NodeResourcesFit"].args == {"scoringStrategy": {"type": "MostAllocated"}}
    m = profs["mine"]
    assert [p.name for p in m.filter] == ["NodeResourcesFit"] and m.score == []
    assert m.percentage_of_nodes_to_score == 70
    assert (cfg.leader_election.lease_duration, cfg.leader_election.renew_deadline,
            cfg.leader_election.retry_period, cfg.leader_election.resource_name) == (20, 15, 3, "x")


@pytest.mark.parametrize(("doc", "match"), [
    ({"kind": "Nope"}, "kind 'Nope' is not KubeSchedulerConfiguration"),
    ({"apiVersion": "v9"}, "apiVersion 'v9' is not one of"),
    ({"percentageOfNodesToScore": 120}, "percentageOfNodesToScore: 120 is not a percentage"),
    ({"profiles": []}, "profiles must be a non-empty list"),
    ({"profiles": [{"schedulerName": "a"}, {"schedulerName": "a"}]}, "duplicate schedulerName 'a'"),
    ({"profiles": [{"plugins": {"permit": {}}}]}, "extension point 'permit' is not supported"),
    ({"profiles": [{"plugins": {"filter": {"enabled": [{"weight": 1}]}}}]}, r"filter.enabled\[0\]"),
    ({"profiles": [{"plugins": {"score": {"enabled": [{"name": "X", "weight": -1}]}}}]}, "weight -1"),
    ({"profiles": [{"pluginConfig": [{"name": "A"}, {"name": "A"}]}]}, "duplicate config for plugin 'A'"),
    ({"leaderElection": {"leaseDuration": "5s", "renewDeadline": "10s"}}, r"lease duration \(5 s\) must be greater"),
    ({"leaderElection": {"leaseDuration": "fast"}}, "'fast' is not a duration"),
])
def test_config_errors_name_the_field(doc: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(doc, "test.yaml")


def test_unknown_plugin_is_a_clear_error() -> None:
    cfg = parse_config({"profiles": [{"plugins": {"filter": {"enabled": [{"name": "NodeResourcesFitt"}]}}}]})
    with pytest.raises(ConfigError, match=r"plugin 'NodeResourcesFitt' \(filter\) is not registered; known plugins: "
                                          r"NodeResourcesBalancedAllocation, NodeResourcesFit, TaintToleration"):
        build_profiles(cfg, _H(), REGISTRY)
    cfg = parse_config({"profiles": [{"plugins": {"filter": {"enabled": [
        {"name": "NodeResourcesBalancedAllocation"}]}}}]})
    with pytest.raises(ConfigError, match="does not implement filter"):
        build_profiles(cfg, _H(), REGISTRY)


def test_prefilter_narrowing_and_empty_intersection() -> None:
    from scheduler.framework import CycleState, PreFilterResult
    from scheduler.profile import Profile

    class Narrow:
        def __init__(self, name: str, names: set[str]) -> None:
            self.name, self.names = name, frozenset(names)

        def pre_filter(self, state: Any, pod: Any, nodes: Any) -> tuple[PreFilterResult, Status]:
            return PreFilterResult(self.names), Status()

    p = Profile("x", None, pre_filter=[Narrow("A", {"n1", "n2"}), Narrow("B", {"n2", "n3"})])
    res, st, narrowed = p.run_pre_filter(CycleState(), new_pod_info(pod("a")), [])
    assert st.ok and res is not None and res.node_names == {"n2"} and narrowed == {"A", "B"}
    p = Profile("x", None, pre_filter=[Narrow("A", {"n1"}), Narrow("B", {"n3"})])
    res, st, _ = p.run_pre_filter(CycleState(), new_pod_info(pod("a")), [])
    assert st.rejected and st.message() == "node(s) didn't satisfy plugin(s) [A B] simultaneously"
    p = Profile("x", None, pre_filter=[Narrow("A", set())])
    res, st, _ = p.run_pre_filter(CycleState(), new_pod_info(pod("a")), [])
    assert st.message() == "node(s) didn't satisfy plugin A"


def test_filter_sampling_rotates_the_start_index_as_upstream() -> None:
    """findNodesThatPassFilters: from nextStartNodeIndex round the list, stop at the wanted
    number of feasible nodes; the index advances by the nodes processed (feasible + rejected)."""
    from scheduler.framework import CycleState, NodeInfo
    from scheduler.profile import Profile
    from scheduler.scheduler import Scheduler

    class EveryThirdRejected:
        name = "R"

        def filter(self, state: Any, pod: Any, node: NodeInfo) -> Status:
            return unschedulable("nope") if int(node.name[1:]) % 3 == 0 else Status()

    nodes = [NodeInfo(node={"metadata": {"name": f"n{i}"}}) for i in range(300)]
    s = Scheduler.__new__(Scheduler)
    s.next_start_node_index = 0
    prof = Profile("p", 50, filter=[EveryThirdRejected()])  # 50 % of 300 -> 150 feasible wanted
    feasible, rejected = s._find_feasible(prof, CycleState(), new_pod_info(pod("a")), nodes)
    assert len(feasible) == 150
    assert feasible[0].name == "n1" and feasible[-1].name == "n224"  # 225 processed: 150 ok, 75 rejected
    assert len(rejected) == 75
    assert s.next_start_node_index == 225
    feasible, rejected = s._find_feasible(prof, CycleState(), new_pod_info(pod("a")), nodes)
    assert feasible[0].name == "n226"  # n225 is rejected; started at 225, wrapped past 299
    assert s.next_start_node_index == (225 + 225) % 300
    # Without filter plugins: the next `want` nodes from the index, all feasible.
    s.next_start_node_index = 290
    feasible, rejected = s._find_feasible(Profile("p", 50), CycleState(), new_pod_info(pod("a")), nodes)
    assert [n.name for n in feasible[:12]] == [f"n{i}" for i in (*range(290, 300), 0, 1)]
    assert s.next_start_node_index == (290 + 150) % 300


def test_pod_level_requests_replace_the_container_totals() -> None:
    p = _pod_with([{"cpu": "100m"}, {"cpu": "100m", "memory": "1Mi"}])
    p["spec"]["resources"] = {"requests": {"cpu": "1"}}
    pi = new_pod_info(p)
    assert (pi.requests.milli_cpu, pi.requests.memory) == (1000, 2**20)
    assert pi.non_zero_requests.milli_cpu == 1000


def test_snapshot_tracks_cordoned_nodes_for_node_unschedulable() -> None:
    """NodeUnschedulable drops out of the filter loop while the snapshot has no cordoned node,
    and rejects the cordoned one as soon as the cache sees the cordon (and not after uncordon)."""
    from scheduler.framework import Code, CycleState
    from scheduler.plugins.nodebasic import NodeUnschedulable

    c = Cache()
    snap = NodeSnapshot()
    c.add_node(node("n1"))
    c.add_node(node("n2"))
    c.update_snapshot(snap)

    class _H:
        def snapshot(self) -> NodeSnapshot:
            return snap

    plugin = NodeUnschedulable(_H(), {})  # type: ignore[arg-type]
    pi = new_pod_info(pod("a"))
    assert snap.unschedulable == set()
    assert plugin.filter_fn(CycleState(), pi) is None
    cordoned = node("n2")
    cordoned["spec"]["unschedulable"] = True
    c.update_node(cordoned)
    c.update_snapshot(snap)
    assert snap.unschedulable == {"n2"}
    fn = plugin.filter_fn(CycleState(), pi)
    assert fn is not None
    assert fn(snap.get("n1")).code == Code.SUCCESS  # type: ignore[arg-type]
    assert fn(snap.get("n2")).reasons == ("node(s) were unschedulable",)  # type: ignore[arg-type]
    c.update_node(node("n2"))
    c.remove_node("n1")
    c.update_snapshot(snap)
    assert snap.unschedulable == set() and plugin.filter_fn(CycleState(), pi) is None


def test_snapshot_tracks_tainted_nodes_for_taint_toleration() -> None:
    from scheduler.framework import CycleState
    from scheduler.plugins.tainttoleration import TaintToleration

    c = Cache()
    snap = NodeSnapshot()
    c.add_node(node("n1"))
    c.update_snapshot(snap)

    class _H:
        def snapshot(self) -> NodeSnapshot:
            return snap

    plugin = TaintToleration(_H(), {})  # type: ignore[arg-type]
    pi = new_pod_info(pod("a"))
    assert plugin.filter_fn(CycleState(), pi) is None
    c.add_node(node("n2", taints=[{"key": "k", "value": "v", "effect": "NoSchedule"}]))
    c.update_snapshot(snap)
    assert snap.tainted == {"n2"}
    fn = plugin.filter_fn(CycleState(), pi)
    assert fn is not None
    assert fn(snap.get("n2")).reasons == ("node(s) had untolerated taint {k: v}",)  # type: ignore[arg-type]
    c.remove_node("n2")
    c.update_snapshot(snap)
    assert snap.tainted == set() and plugin.filter_fn(CycleState(), pi) is None
