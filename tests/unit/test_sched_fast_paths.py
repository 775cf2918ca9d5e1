"""The hot-path forms of the plugins give exactly what their plain forms give: for every plugin
of the REGISTRY with ``filter_fn`` (FilterFactoryPlugin) or ``score_nodes`` (BatchScorePlugin),
over a fleet of nodes that exercises each branch (cordoned, tainted with the leaf taint and
others, full, no allocatable memory, extended resources, pod limits reached) and pods that do
too (no requests, large requests, GPUs, tolerations, nodeName), ``filter_fn(state, pod)(node)``
equals ``filter(state, pod, node)`` (None only where filter passes every node) and
``score_nodes`` equals ``score`` node by node. The scheduling loop uses only the fast forms,
the plugin tables test the plain ones.
"""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.framework import Code, CycleState, NodeInfo, Obj
from scheduler.plugins import REGISTRY
from scheduler.podutil import add_pod, new_node_info, new_pod_info

pytestmark = pytest.mark.unit

LEAF_TAINT = {"key": "kosmos.io/node", "value": "true", "effect": "NoSchedule"}


class _Handle:
    def __init__(self, infos: list[NodeInfo]) -> None:
        self.infos = infos

    def snapshot(self) -> Any:
        return self

    def node_infos(self) -> list[NodeInfo]:
        return self.infos

    def have_pods_with_affinity(self) -> list[NodeInfo]:
        return [n for n in self.infos if n.pods_with_affinity]

    def have_pods_with_required_anti_affinity(self) -> list[NodeInfo]:
        return [n for n in self.infos if n.pods_with_required_anti_affinity]

    def lister(self, resource: str) -> dict[str, Obj]:
        return {}


def _pod(name: str, requests: dict[str, str] | None = None, **spec: Any) -> Obj:
    c: Obj = {"name": "c", "image": "i"}
    if requests is not None:
        c["resources"] = {"requests": requests}
    return {"metadata": {"name": name, "namespace": "d", "uid": name}, "spec": {"containers": [c], **spec}}


def fleet() -> list[NodeInfo]:
    out = []
    variants: list[tuple[Obj, Obj, int]] = [
        ({}, {"cpu": "4", "memory": "8Gi", "pods": "110"}, 0),
        ({"unschedulable": True}, {"cpu": "4", "memory": "8Gi", "pods": "110"}, 0),
        ({"taints": [LEAF_TAINT]}, {"cpu": "4", "memory": "8Gi", "pods": "110"}, 0),
        ({"taints": [{"key": "gpu", "value": "x", "effect": "NoSchedule"},
                     {"key": "soft", "effect": "PreferNoSchedule"}]},
         {"cpu": "8", "memory": "16Gi", "pods": "110", "example.com/gpu": "2"}, 0),
        ({"taints": [{"key": "soft", "effect": "PreferNoSchedule"}]}, {"cpu": "2", "memory": "1Gi", "pods": "3"}, 3),
        ({}, {"cpu": "1", "pods": "110"}, 0),  # no memory
        ({}, {"memory": "1Gi", "pods": "110"}, 0),  # no cpu
        ({}, {"cpu": "500m", "memory": "512Mi", "pods": "110", "ephemeral-storage": "1Gi"}, 2),
    ]
    for i, (spec, alloc, n_pods) in enumerate(variants):
        name = f"n{i}"
        labels = {"kubernetes.io/hostname": name, **({"zone": f"z{i % 3}"} if i != 5 else {})}
        ni = new_node_info({"metadata": {"name": name, "labels": labels},
                            "spec": spec, "status": {"allocatable": alloc}})
        for j in range(n_pods):
            p = _pod(f"{name}-p{j}", {"cpu": "200m", "memory": "100Mi"}, nodeName=name)
            p["metadata"]["labels"] = {"app": "db"}
            add_pod(ni, new_pod_info(p))
        out.append(ni)
    return out


PODS = [
    _pod("empty"),
    _pod("small", {"cpu": "100m", "memory": "128Mi"}),
    _pod("cpu-only", {"cpu": "300m"}),
    _pod("big", {"cpu": "3", "memory": "6Gi"}),
    _pod("huge", {"cpu": "64"}),
    _pod("eph", {"cpu": "100m", "ephemeral-storage": "2Gi"}),
    _pod("gpu", {"cpu": "100m", "example.com/gpu": "1"},
         tolerations=[{"key": "gpu", "operator": "Exists"}]),
    _pod("tolerates-all", {"cpu": "100m"}, tolerations=[{"operator": "Exists"}]),
    _pod("tolerates-soft", {"memory": "1Gi"}, tolerations=[{"key": "soft", "effect": "PreferNoSchedule"}]),
    _pod("pinned", {"cpu": "100m"}, nodeName="n3"),
    _pod("cordon-ok", tolerations=[{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]),
    _pod("spread", {"cpu": "100m"}, topologySpreadConstraints=[
        {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
         "labelSelector": {"matchLabels": {"app": "db"}}},
        {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {}}]),
    _pod("anti", {"cpu": "100m"}, affinity={"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "kubernetes.io/hostname"}]}}),
]


@pytest.mark.parametrize("name", sorted(n for n, c in REGISTRY.items() if hasattr(c, "filter_fn")))
def test_filter_fn_equals_filter(name: str) -> None:
    infos = fleet()
    plugin = REGISTRY[name](_Handle(infos), {})
    checked = 0
    for p in PODS:
        pi = new_pod_info(p)
        state = CycleState()
        if hasattr(plugin, "pre_filter"):
            plugin.pre_filter(state, pi, infos)
        fn = plugin.filter_fn(state, pi)
        for ni in infos:
            want = plugin.filter(state, pi, ni)
            if fn is None:
                assert want.code == Code.SUCCESS, (p["metadata"]["name"], ni.name, want)
                continue
            got = fn(ni)
            assert (got.code, got.reasons, got.plugin) == (want.code, want.reasons, want.plugin), \
                (p["metadata"]["name"], ni.name)
            checked += 1
    assert checked  # the fleet exercised the compiled form


@pytest.mark.parametrize("name", sorted(n for n, c in REGISTRY.items() if hasattr(c, "score_nodes")))
@pytest.mark.parametrize("strategy", ["LeastAllocated", "MostAllocated"])
def test_score_nodes_equals_score(name: str, strategy: str) -> None:
    infos = fleet()
    args = {"scoringStrategy": {"type": strategy}} if name == "NodeResourcesFit" else {}
    plugin = REGISTRY[name](_Handle(infos), args)
    for p in PODS:
        pi = new_pod_info(p)
        state = CycleState()
        if hasattr(plugin, "pre_score"):
            plugin.pre_score(state, pi, infos)
        want = [plugin.score(state, pi, ni)[0] for ni in infos]
        assert plugin.score_nodes(state, pi, infos) == want, p["metadata"]["name"]
