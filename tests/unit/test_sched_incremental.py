"""The tables plugins keep from one pod to the next (InterPodAffinity's ExistingTermIndex, the
DomainCounts of PodTopologySpread and InterPodAffinity, the allocation scorers' per-node scores,
all fed by the snapshot's change log) against a fresh plugin instance that reads the whole
snapshot: through random cache changes (pods assumed, confirmed, removed; nodes relabelled,
added, removed) the long-lived instances must give the same PreFilter/PreScore state and scores
as fresh ones at every step."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from scheduler.cache import Cache, NodeSnapshot
from scheduler.framework import CycleState, Obj
from scheduler.plugins.interpodaffinity import InterPodAffinity
from scheduler.plugins.noderesources import NodeResourcesBalancedAllocation, NodeResourcesFit
from scheduler.plugins.podtopologyspread import PodTopologySpread
from scheduler.podutil import new_pod_info
from tests.sched_builders import node, pod

HOST, ZONE = "kubernetes.io/hostname", "topology.kubernetes.io/zone"


class _Handle:
    def __init__(self, snap: NodeSnapshot) -> None:
        self.snap = snap

    def snapshot(self) -> NodeSnapshot:
        return self.snap

    def lister(self, resource: str) -> Mapping[str, Obj]:
        return {}


def _node(i: int, zone: int) -> Obj:
    return node(f"n{i}", labels={HOST: f"n{i}", ZONE: f"z{zone}"}, cpu="64", memory="256Gi")


def _pod(rng: random.Random, i: int) -> Obj:
    group = f"g{rng.randrange(3)}"
    sel = {"matchLabels": {"group": group}}
    affinity: dict[str, Any] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": sel, "topologyKey": HOST}]}}
    if rng.random() < 0.5:
        affinity["podAffinity"] = {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": rng.randrange(1, 5), "podAffinityTerm": {"labelSelector": {"matchLabels": {
                "group": f"g{rng.randrange(3)}"}}, "topologyKey": ZONE}}]}
    return pod(f"p{i}", labels={"group": group}, cpu=f"{rng.randrange(1, 8) * 100}m",
               memory=f"{rng.randrange(1, 8)}Gi", affinity=affinity,
               topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": ZONE,
                                           "whenUnsatisfiable": "DoNotSchedule", "labelSelector": sel}])


def _states(plugins: list[Any], incoming: Obj, snap: NodeSnapshot) -> list[Any]:
    """Per plugin: its PreFilter state, PreScore state and scores over every node."""
    pi = new_pod_info(incoming)
    nodes = snap.node_infos()
    out = []
    for pl in plugins:
        state = CycleState()
        got: list[Any] = []
        if hasattr(pl, "pre_filter"):
            _res, st = pl.pre_filter(state, pi, nodes)
            # the counts (the compiled terms and constraints hold selector functions)
            got.append((st.code, {k: {f: x for f, x in vars(v).items() if f not in ("terms", "constraints")}
                                  for k, v in state._data.items()}))
        if hasattr(pl, "pre_score"):
            st = pl.pre_score(state, pi, nodes)
            got.append((st.code, state.get("PreScoreInterPodAffinity")))
        if hasattr(pl, "score_nodes"):
            got.append(pl.score_nodes(state, pi, nodes))
        out.append(got)
    return out


def _plugins(handle: _Handle) -> list[Any]:
    return [InterPodAffinity(handle, {}), PodTopologySpread(handle, {}), NodeResourcesFit(handle, {}),
            NodeResourcesBalancedAllocation(handle, {})]


def test_tables_kept_across_pods_match_a_fresh_plugin() -> None:
    rng = random.Random(16)
    cache, snap = Cache(), NodeSnapshot()
    handle = _Handle(snap)
    for i in range(9):
        cache.add_node(_node(i, i % 3))
    kept = _plugins(handle)
    placed: dict[str, str] = {}  # key -> node
    next_node = 9
    for step in range(150):
        action = rng.random()
        names = [ni.name for ni in snap.node_infos()] or ["n0"]
        if action < 0.45 or not placed:
            p = _pod(rng, step)
            target = rng.choice(names)
            pi = new_pod_info({**p, "spec": {**p["spec"], "nodeName": target}})
            cache.assume(pi, target)
            placed[pi.key] = target
            if rng.random() < 0.5:  # the watch confirms the bind
                cache.add_pod(pi.pod)
        elif action < 0.7:
            key = rng.choice(sorted(placed))
            cache.remove_pod(key)
            del placed[key]
        elif action < 0.8:
            i = int(rng.choice(names)[1:])
            cache.update_node(_node(i, rng.randrange(4)))  # relabelled: another zone
        elif action < 0.9:
            cache.add_node(_node(next_node, rng.randrange(3)))
            next_node += 1
        else:
            cache.remove_node(rng.choice(names))
        cache.update_snapshot(snap)
        incoming = _pod(rng, 1000 + step)
        want = _states(_plugins(handle), incoming, snap)
        assert _states(kept, incoming, snap) == want, f"step {step}"
