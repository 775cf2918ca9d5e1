"""The fragmentation measure and the LeafNodeFragmentation score (issue 19, item 3): hand-computed
cases, and properties that must always hold. (Whether it strands fewer pods than LeastAllocated is
a comparison: ``fabric-tool bench frag`` prints it.)"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from fabric.control.api import Record
from fabric.control.records import RecordsChange
from scheduler.cache import NodeSnapshot
from scheduler.fragmentation import ShapeHistogram, Workload, scores
from scheduler.framework import CycleState, NodeInfo
from scheduler.leafview import RECORD_KIND, RECORD_SCHEMA, Demand, LeafView, Placement, vector
from scheduler.leafviews import LeafViews
from scheduler.plugins import REGISTRY
from scheduler.plugins.kosmos_fragmentation import LeafNodeFragmentation
from scheduler.podutil import new_node_info, new_pod_info
from scheduler.profile import KOSMOS_SCHEDULER, build_profiles, default_config

pytestmark = pytest.mark.unit

GI = 1 << 30
M = Demand.of({"cpu": 2000, "memory": 4 * GI})  # the common shape


def free(cpu: int, mem_gi: float, pods: int = 100, **ext: int) -> dict[str, int]:
    return dict(vector({"cpu": cpu, "memory": int(mem_gi * GI), "pods": pods, **ext}))


# --- the measure, by hand ---------------------------------------------------------------------


def test_single_shape_by_hand() -> None:
    wl = Workload.of([(M.amounts, 1.0)])
    # c_cpu = (1/2) / 2000, c_mem = (1/2) / 4Gi
    assert dict(wl.coef) == pytest.approx({"cpu": 0.5 / 2000, "memory": 0.5 / (4 * GI)})
    assert wl.node(free(3000, 6)) == pytest.approx(0.5 * 1000 / 2000 + 0.5 * 2 / 4)  # one fits, (1 cpu, 2Gi) left
    assert wl.node(free(1000, 8)) == pytest.approx(0.5 * 1000 / 2000 + 0.5 * 8 / 4)  # none fits: all of it
    assert wl.node(free(4000, 8)) == 0  # exactly two
    assert wl.node(free(8000, 16, pods=1)) == pytest.approx(0.5 * 6000 / 2000 + 0.5 * 12 / 4)  # one pod slot


def test_two_shapes_and_a_delta_by_hand() -> None:
    small = Demand.of({"cpu": 1000, "memory": 1 * GI})
    wl = Workload.of([(M.amounts, 0.75), (small.amounts, 0.25)])
    mean_cpu, mean_mem = 0.75 * 2000 + 0.25 * 1000, 0.75 * 4 + 0.25 * 1  # 1750 m, 3.25 Gi
    c_cpu, c_mem = 0.5 / mean_cpu, 0.5 / (mean_mem * GI)
    n = free(3000, 5)
    # M: one fits, (1000 m, 1Gi) left; small: three fit, (0, 2Gi) left
    want = 0.75 * (c_cpu * 1000 + c_mem * GI) + 0.25 * (c_mem * 2 * GI)
    assert wl.node(n) == pytest.approx(want)
    # placing `small` leaves (2000 m, 4Gi): M fits exactly, small: two fit, 2Gi left
    after = 0.25 * (c_mem * 2 * GI)
    assert wl.delta(n, small.amounts) == pytest.approx(after - want)
    assert wl.delta(free(500, 5), small.amounts) is None


def test_extended_resources_are_scored_when_a_shape_asks_for_them() -> None:
    gpu = Demand.of({"cpu": 1000, "memory": GI, "nvidia.com/gpu": 1})
    wl = Workload.of([(gpu.amounts, 1.0)])
    assert dict(wl.coef) == pytest.approx({"cpu": 1 / 3 / 1000, "memory": 1 / 3 / GI, "nvidia.com/gpu": 1 / 3})
    # cpu for 4 copies, 2 GPUs: two fit, 2 cpu and 2Gi are stranded, no GPU
    assert wl.node(free(4000, 4, **{"nvidia.com/gpu": 2})) == pytest.approx(2 / 3 + 2 / 3)
    # weights from scoringStrategy.resources: memory not named, not scored
    only_cpu = Workload.of([(M.amounts, 1.0)], {"cpu": 1})
    assert dict(only_cpu.coef) == pytest.approx({"cpu": 1 / 2000})


def test_scores_map_the_lowest_delta_to_100() -> None:
    assert scores([-1.0, 0.0, 1.0, None]) == [100, 50, 0, 50]
    assert scores([0.3, 0.3]) == [100, 100]
    assert scores([None, None]) == [50, 50]


# --- the histogram ----------------------------------------------------------------------------


def test_histogram_is_bounded_and_decays() -> None:
    a, b, c = (Demand.of({"cpu": x}).amounts for x in (100, 200, 300))
    h = ShapeHistogram(bound=2, half_life=10)
    h.observe(a)
    for _ in range(10):
        h.observe(b)
    dist = dict(h.distribution())
    # a is 10 observations old: it weighs half of the newest b
    newest = 2 ** (11 / 10)
    b_total = sum(2 ** (i / 10) for i in range(2, 12))
    assert dist[a] == pytest.approx((newest / 2) / (newest / 2 + b_total))
    h.observe(c)  # full: the lightest (a) goes, never the one just seen
    assert len(h) == 2 and set(dict(h.distribution())) == {b, c}
    assert sum(p for _, p in h.distribution(extra=a)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="bound"):
        ShapeHistogram(bound=0)


def test_histogram_weights_stay_finite_over_long_runs() -> None:
    h = ShapeHistogram(bound=4, half_life=1)
    s = Demand.of({"cpu": 100}).amounts
    for _ in range(5000):
        h.observe(s)
    assert h.distribution() == [(s, pytest.approx(1.0))]


# --- properties that always hold --------------------------------------------------------------


def test_one_shape_workload_placing_that_shape_changes_nothing() -> None:
    rng = random.Random(7)
    for _ in range(300):
        m = Demand.of({"cpu": rng.randint(1, 8) * 250, "memory": rng.randint(1, 16) * GI // 2})
        wl = Workload.of([(m.amounts, 1.0)])
        n = free(rng.randint(0, 64) * 250, rng.randint(0, 128) / 2)
        d = wl.delta(n, m.amounts)
        assert d is None or d == pytest.approx(0.0, abs=1e-9)


def test_exact_fill_for_the_common_shape_never_loses_to_a_useless_remainder() -> None:
    """Pod p smaller than the common shape m (p <= m, p != m). Node A: p + j*m free (placing p
    leaves exactly j copies of m); node B: p + j'*m + r, r a remainder m cannot use. Then
    delta_A <= delta_B (module docstring of scheduler.fragmentation)."""
    rng = random.Random(11)
    checked = 0
    for _ in range(500):
        m = {"cpu": rng.randint(2, 16) * 250, "memory": rng.randint(2, 32) * GI // 4}
        p = {k: rng.randint(1, v // (250 if k == "cpu" else GI // 4)) * (250 if k == "cpu" else GI // 4)
             for k, v in m.items()}
        if p == m:
            continue
        r = {k: rng.randint(0, v - 1) for k, v in m.items()}
        if not any(r.values()):
            continue
        j, j2 = rng.randint(0, 6), rng.randint(0, 6)
        wl = Workload.of([(Demand.of(m).amounts, 1.0)])
        a = {k: p[k] + j * m[k] for k in m} | {"pods": 100}
        b = {k: p[k] + j2 * m[k] + r[k] for k in m} | {"pods": 100}
        da, db = wl.delta(a, Demand.of(p).amounts), wl.delta(b, Demand.of(p).amounts)
        assert da is not None and db is not None and da <= db + 1e-9, (m, p, r, j, j2, da, db)
        checked += 1
    assert checked > 300


# --- the view's candidates --------------------------------------------------------------------


def leaf_doc(vnode: str, nodes: dict[str, tuple[int, float]], taints: dict[str, list[Any]] | None = None) -> bytes:
    return json.dumps({"schema": RECORD_SCHEMA, "cluster": "c1", "virtualNode": vnode, "ready": True,
                       "nodes": [{"name": n, "ready": True, "schedulable": True, "ourPods": 0,
                                  "free": {"cpu": f"{cpu}m", "memory": str(int(mem * GI)), "pods": "110"},
                                  "labels": {"kubernetes.io/hostname": n},
                                  "taints": (taints or {}).get(n, [])}
                                 for n, (cpu, mem) in nodes.items()]}).encode()


def test_candidates_are_the_tightest_fitting_admitted_nodes() -> None:
    view = LeafView("v")
    view.apply_record(leaf_doc("v", {f"n{i}": (1000 * i, 4 * i) for i in range(1, 11)},
                                {"n3": [{"key": "x", "value": "", "effect": "NoSchedule"}]}))
    got = view.candidates(Demand.of({"cpu": 2500}), limit=3)
    assert [f["cpu"] for f in got] == [4000, 5000, 6000]  # n3 is tainted, n1/n2 too small
    tol = Placement(tolerations=[{"key": "x", "operator": "Exists"}])
    assert [f["cpu"] for f in view.candidates(Demand.of({"cpu": 2500}), tol, limit=2)] == [3000, 4000]
    assert view.candidates(Demand.of({"cpu": 20000})) == []


# --- the plugin -------------------------------------------------------------------------------


class Handle:
    def __init__(self, views: LeafViews | None) -> None:
        if views is not None:
            self.leaf_views = views

    def snapshot(self) -> Any:
        return NodeSnapshot()

    def lister(self, resource: str) -> Any:
        return {}


def views_of(leaves: dict[str, dict[str, tuple[int, float]]]) -> LeafViews:
    views = LeafViews()
    recs = tuple(Record(RECORD_KIND, v, 1, leaf_doc(v, nodes), publisher="tree/c1") for v, nodes in leaves.items())
    views.apply(RecordsChange(1, recs, (), resynced=True))
    return views


def vnode(name: str, cpu: int = 16000, mem_gi: int = 64, leaf: bool = True) -> NodeInfo:
    labels = {"kosmos.io/node": "true"} if leaf else {}
    return new_node_info({"metadata": {"name": name, "labels": labels}, "spec": {},
                          "status": {"allocatable": {"cpu": f"{cpu}m", "memory": str(mem_gi * GI), "pods": "110"}}})


def pod(name: str, cpu: int, mem_gi: float) -> Any:
    return new_pod_info({"metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}"},
                         "spec": {"containers": [{"name": "c", "resources": {"requests": {
                             "cpu": f"{cpu}m", "memory": str(int(mem_gi * GI))}}}]}})


def test_without_leaf_views_every_node_scores_zero() -> None:
    plugin = LeafNodeFragmentation(Handle(None), {})
    assert plugin.score_nodes(CycleState(), pod("p", 1000, 2), [vnode("a"), vnode("b")]) == [0, 0]


def test_the_leaf_left_exactly_usable_scores_highest() -> None:
    # common shape M (2 cpu, 4Gi); the pod (1 cpu, 2Gi): on leaf "exact" it leaves 2 copies of M,
    # on leaf "waste" a node (4 cpu, 8Gi) would keep (3, 6): one M and a useless (1, 2).
    views = views_of({"exact": {"e1": (5000, 10)}, "waste": {"w1": (4000, 8)}})
    plugin = LeafNodeFragmentation(Handle(views), {"fragmentationWeight": 100})
    for i in range(20):
        plugin.reserve(CycleState(), pod(f"m{i}", 2000, 4), "x")
    nodes = [vnode("exact"), vnode("waste"), vnode("real", leaf=False), vnode("unknown")]
    assert plugin.score_nodes(CycleState(), pod("p", 1000, 2), nodes) == [100, 0, 50, 50]
    # blended half and half with LeastAllocated of the virtual nodes (all alike here: 1 cpu, 2Gi of 16/64)
    half = LeafNodeFragmentation(Handle(views), {"fragmentationWeight": 50})
    half.histogram = plugin.histogram  # the same recent shapes (alone, the pod's own shape: all equal)
    least = half.scorer.score(pod("p", 1000, 2), vnode("exact"))
    assert least == ((16000 - 1000) * 100 // 16000 + (64 - 2) * 100 // 64) // 2
    assert half.score_nodes(CycleState(), pod("p", 1000, 2), nodes[:2]) == [(100 + least + 1) // 2, (least + 1) // 2]
    most = LeafNodeFragmentation(Handle(views), {"fragmentationWeight": 0,
                                                 "scoringStrategy": {"type": "MostAllocated"}})
    packed = (1000 * 100 // 16000 + 2 * 100 // 64) // 2
    assert most.score_nodes(CycleState(), pod("p", 1000, 2), nodes[:2]) == [packed, packed]


def test_the_best_leaf_node_decides_a_virtual_nodes_delta() -> None:
    views = views_of({"mixed": {"w1": (4000, 8), "e1": (5000, 10)}, "waste": {"w1": (4000, 8)}})
    plugin = LeafNodeFragmentation(Handle(views), {"fragmentationWeight": 100})
    for i in range(5):
        plugin.reserve(CycleState(), pod(f"m{i}", 2000, 4), "x")
    assert plugin.score_nodes(CycleState(), pod("p", 1000, 2), [vnode("mixed"), vnode("waste")]) == [100, 0]


@pytest.mark.parametrize("args, field", [({"fragmentationWeight": 101}, "fragmentationWeight"),
                                         ({"fragmentationWeight": True}, "fragmentationWeight"),
                                         ({"scoringStrategy": {"type": "RequestedToCapacityRatio"}}, "type"),
                                         ({"candidates": 0}, "candidates"),
                                         ({"shapes": 0}, "bound")])
def test_bad_args_are_refused_naming_the_field(args: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LeafNodeFragmentation(Handle(None), args)


def test_the_kosmos_profile_scores_with_it() -> None:
    k = build_profiles(default_config(), Handle(None), REGISTRY)[KOSMOS_SCHEDULER]
    assert "LeafNodeFragmentation" in [p.name for p in k.score] and k.weights["LeafNodeFragmentation"] == 1
    assert "LeafNodeFragmentation" in [p.name for p in k.reserve]


def test_candidates_of_a_placement_naming_a_node_are_that_node_only() -> None:
    view = LeafView("v")
    view.apply_record(leaf_doc("v", {"a": (4000, 8), "b": (4000, 8), "c": (8000, 16)}))
    one = Placement({"kubernetes.io/hostname": "c"})
    assert [f["cpu"] for f in view.candidates(Demand.of({"cpu": 1000}), one)] == [8000]
    # a and b share one free vector: one candidate for both
    assert sorted(f["cpu"] for f in view.candidates(Demand.of({"cpu": 1000}))) == [4000, 8000]
