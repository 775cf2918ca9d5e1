"""The fragmentation score's caches against the uncached computation, on random fleets (issue 19,
"decision p99 < 5 ms at 5,000 leaf nodes"), and the leaf node it chooses for LeafNodeFit's
Reserve.

The caches (:class:`scheduler.fragmentation.DeltaCache`: the integer ``lost`` figures per (free,
demand, shape); :meth:`LeafView.candidate_shapes`: per view and per class, kept across pods) must
never change an answer: every figure here is compared with ``==`` (bit-identical floats) to a
brute force that keeps nothing between questions, while the fleet changes under the caches
(records, reservations, releases, nodes coming and going)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from scheduler.fragmentation import DeltaCache, ShapeHistogram, Workload
from scheduler.framework import CycleState
from scheduler.leafview import Demand, LeafView, Placement, Vector, make_node, per_node
from scheduler.leafviews import LeafViews
from scheduler.plugins.kosmos_fragmentation import LEAF_NODE_CHOICE, LeafNodeFragmentation
from scheduler.plugins.kosmos_leaffit import LeafNodeFit
from scheduler.podutil import new_node_info, new_pod_info

pytestmark = pytest.mark.unit

GI = 1 << 30
ZONES = ("a", "b", "c")
TAINT = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
TOLERATE = [{"key": "dedicated", "operator": "Exists"}]


def random_shape(rng: random.Random) -> dict[str, int]:
    cpu = rng.choice((250, 500, 1000, 2000, 4000, 8000))
    out = {"cpu": cpu, "memory": cpu * rng.choice((1, 2, 4, 8)) * (GI // 1000)}
    if rng.random() < 0.15:
        out["nvidia.com/gpu"] = rng.choice((1, 2))
    return out


def random_free(rng: random.Random) -> dict[str, int]:
    cpu = rng.randrange(0, 33) * 500
    free = {"cpu": cpu, "memory": rng.randrange(0, 129) * GI // 2, "pods": rng.choice((0, 1, 3, 110))}
    if rng.random() < 0.3:
        free["nvidia.com/gpu"] = rng.randrange(0, 5)
    return free


def random_node(rng: random.Random, name: str) -> Any:
    gpu = rng.random() < 0.2
    return make_node(name, random_free(rng), {"topology.kubernetes.io/zone": rng.choice(ZONES),
                                              "kubernetes.io/hostname": name},
                     [TAINT] if gpu else (), usable=rng.random() > 0.05)


def random_placement(rng: random.Random) -> Placement:
    return Placement({"topology.kubernetes.io/zone": rng.choice(ZONES)} if rng.random() < 0.3 else None,
                     tolerations=TOLERATE if rng.random() < 0.3 else ())


def random_workload(rng: random.Random, shapes: list[Vector]) -> Workload:
    hist = ShapeHistogram(bound=rng.choice((1, 4, 16)), half_life=rng.choice((4.0, 64.0)))
    for _ in range(rng.randrange(1, 60)):
        hist.observe(rng.choice(shapes))
    return Workload.of(hist.distribution(rng.choice(shapes)))


@pytest.mark.parametrize("seed", range(6))
def test_delta_cache_is_bit_identical_to_the_uncached_delta(seed: int) -> None:
    rng = random.Random(seed)
    shapes = [Demand.of(random_shape(rng)).amounts for _ in range(30)]
    frees = [random_free(rng) for _ in range(40)]
    # a small universe and bound, so that resets and clears happen along the way
    cache = DeltaCache(bound=rng.choice((8, 50, 10_000)), universe=rng.choice((16, 24, 64)))
    for _ in range(300):
        wl = random_workload(rng, shapes)
        demand = rng.choice(shapes)
        cands = [(tuple(sorted(f.items())), f) for f in rng.sample(frees, rng.randrange(1, 12))]
        want = [wl.delta(f, demand) for _k, f in cands]
        known = [d for d in want if d is not None]
        best, at = cache.best(wl, cands, demand)
        assert best == (min(known) if known else None)
        assert at == (want.index(best) if known else -1)
        k, f = rng.choice(cands)
        assert cache.delta(wl, k, f, demand) == wl.delta(f, demand)
    assert cache.hits > 0 and cache.misses > 0


def brute_candidates(view: LeafView, d: Demand, p: Placement, limit: int) -> list[tuple[Vector, dict[str, int]]]:
    """The candidate lists computed again with every cache of the view emptied first."""
    view._cand_cache.clear()
    for cl in view._classes.values():
        cl.cands.clear()
    return [(k, dict(f)) for k, f in view.candidate_shapes(d, p, limit)]


def mutate(rng: random.Random, view: LeafView, names: list[str], step: int) -> None:
    """One change of the fleet under the caches: a node's record, a reservation, a release, a
    node gone or back."""
    r = rng.random()
    if r < 0.4:
        view.upsert_node(random_node(rng, rng.choice(names)))
    elif r < 0.7:
        view.assume(f"k{step}", Demand.of(random_shape(rng)), random_placement(rng))
    elif r < 0.9 and view.reservations:
        view.forget(rng.choice(sorted(view.reservations)))
    else:
        view.remove_node(rng.choice(names))


@pytest.mark.parametrize("seed", range(4))
def test_cached_candidates_match_a_cold_computation_as_the_fleet_changes(seed: int) -> None:
    rng = random.Random(100 + seed)
    names = [f"n{i:03d}" for i in range(rng.choice((20, 120)))]
    view = LeafView("v")
    for n in names:
        view.upsert_node(random_node(rng, n))
    asks = [(Demand.of(random_shape(rng)), random_placement(rng), rng.choice((1, 4, 16))) for _ in range(12)]
    for step in range(400):
        mutate(rng, view, names, step)
        for d, p, limit in rng.sample(asks, 4):  # warm answers, some of them reused across changes
            warm = [(k, dict(f)) for k, f in view.candidate_shapes(d, p, limit)]
            assert warm == brute_candidates(view, d, p, limit)
            for k, f in warm:
                assert dict(k) == f and per_node(f, d.amounts) > 0


class Handle:
    def __init__(self, views: LeafViews) -> None:
        self.leaf_views = views

    def snapshot(self) -> Any:
        raise NotImplementedError

    def lister(self, resource: str) -> dict[str, Any]:
        return {}


def vnode(name: str) -> Any:
    return new_node_info({"metadata": {"name": name, "labels": {"kosmos.io/node": "true"}}, "spec": {},
                          "status": {"allocatable": {"cpu": "512", "memory": str(2048 * GI), "pods": "5000"}}})


def root_pod(i: int, req: dict[str, int], p: Placement) -> Any:
    import json

    requests = {k: (f"{v}m" if k == "cpu" else str(v)) for k, v in req.items()}
    sel: dict[str, Any] = {}
    if p.node_selector:
        sel["nodeSelector"] = dict(p.node_selector)
    if p.tolerations:
        sel["tolerations"] = p.tolerations
    return new_pod_info({"metadata": {"name": f"p{i}", "namespace": "ns", "uid": f"u{i}",
                                      "annotations": {"kosmos.io/cluster-selector": json.dumps(sel)}},
                         "spec": {"containers": [{"name": "c", "resources": {"requests": requests}}]}})


@pytest.mark.parametrize("seed", range(3))
def test_the_plugins_deltas_and_choices_match_brute_force_over_every_leaf_node(seed: int) -> None:
    """With ``candidates`` above the fleet's size the score's delta of a virtual node is, by
    definition, the lowest delta over every admitted leaf node with room: brute force over the
    nodes, no cache. The chosen leaf node reaches it, and LeafNodeFit reserves there."""
    rng = random.Random(200 + seed)
    views = LeafViews()
    names: dict[str, list[str]] = {}
    for v in ("v1", "v2", "v3"):
        view = LeafView(v)
        names[v] = [f"{v}-n{i:02d}" for i in range(rng.choice((5, 40)))]
        for n in names[v]:
            view.upsert_node(random_node(rng, n))
        views._views[v] = view
    plugin = LeafNodeFragmentation(Handle(views), {"candidates": 10_000, "shapes": 6})
    fit = LeafNodeFit(Handle(views), {})
    nodes = [vnode(v) for v in ("v1", "v2", "v3")]
    for i in range(150):
        for v in ("v1", "v2", "v3"):
            mutate(rng, views._views[v], names[v], 10_000 + i)
        req, p = random_shape(rng), random_placement(rng)
        pi = root_pod(i, req, p)
        d = Demand.of(req)
        choices: dict[str, str] = {}
        got = plugin.deltas(pi, nodes, views, choices)
        wl = plugin.workload(d)
        for vi, v in enumerate(("v1", "v2", "v3")):
            view = views._views[v]
            brute = [wl.delta(view.free_of(n.name), d.amounts) for n in view.nodes()
                     if n.usable and p.admits(dict(n.labels), n.name, n.taints)]
            known = [x for x in brute if x is not None]
            assert got[vi] == (min(known) if known else None)
            if known:
                assert view.admits_fit(choices[v], d, p)
                assert wl.delta(view.free_of(choices[v]), d.amounts) == got[vi]
            else:
                assert v not in choices
        state = CycleState()
        plugin.score_nodes(state, pi, nodes)
        assert state.get(LEAF_NODE_CHOICE) == choices
        target = rng.choice(("v1", "v2", "v3"))
        if target in choices and fit.reserve(state, pi, target).ok:
            assert views._views[target].reservations[f"{pi.key}/{pi.uid}"].node == choices[target]
            plugin.reserve(state, pi, target)


def test_assume_takes_the_preferred_node_only_while_it_still_fits() -> None:
    view = LeafView("v")
    for name, cpu in (("big", 8000), ("small", 2000), ("gpu", 8000)):
        view.upsert_node(make_node(name, {"cpu": cpu, "memory": 16 * GI, "pods": 10},
                                   {"kubernetes.io/hostname": name}, [TAINT] if name == "gpu" else ()))
    d = Demand.of({"cpu": 2000})
    assert view.assume("a", d, prefer="big") == "big"  # best fit would be "small"
    assert view.assume("b", d, prefer="gpu") == "small"  # the taint is not tolerated: best fit
    assert view.assume("c", d, prefer="small") == "big"  # "small" is full now
    assert view.assume("d", d, prefer="gone") == "big"  # not a node of the view


def test_reserve_without_a_choice_keeps_the_best_fit() -> None:
    views = LeafViews()
    view = LeafView("v")
    for name, cpu in (("big", 8000), ("small", 2000)):
        view.upsert_node(make_node(name, {"cpu": cpu, "memory": 16 * GI, "pods": 10}))
    views._views["v"] = view
    fit = LeafNodeFit(Handle(views), {})
    pi = new_pod_info({"metadata": {"name": "p", "namespace": "ns", "uid": "u"},
                       "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "2"}}}]}})
    assert fit.reserve(CycleState(), pi, "v").ok
    assert view.reservations["ns/p/u"].node == "small"
    state = CycleState()
    state.write(LEAF_NODE_CHOICE, {"v": "big"})
    assert fit.reserve(state, pi, "v").ok  # again: released, then held on the chosen node
    assert view.reservations["ns/p/u"].node == "big"


def test_choose_leaf_node_false_leaves_no_choice() -> None:
    views = LeafViews()
    view = LeafView("v")
    view.upsert_node(make_node("n", {"cpu": 8000, "memory": 16 * GI, "pods": 10}))
    views._views["v"] = view
    plugin = LeafNodeFragmentation(Handle(views), {"chooseLeafNode": False})
    state = CycleState()
    plugin.score_nodes(state, root_pod(0, {"cpu": 1000}, Placement()), [vnode("v")])
    assert state.get(LEAF_NODE_CHOICE) is None
    with pytest.raises(ValueError, match="chooseLeafNode"):
        LeafNodeFragmentation(Handle(views), {"chooseLeafNode": "yes"})
