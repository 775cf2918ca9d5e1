"""Pod/node builders and a fake framework handle for the scheduler plugin tests and benchmark
(the shape of upstream's ``st.MakePod()`` / ``st.MakeNode()`` testing helpers, as dicts).

A test builds nodes and pods, places existing pods with :func:`snapshot`, then drives a plugin
through :func:`run_filter` / :func:`run_scores` exactly as the scheduler does (PreFilter once,
Filter per node; PreScore, Score per node, NormalizeScore).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from scheduler.framework import (
    SUCCESS,
    Code,
    CycleState,
    NodeInfo,
    Obj,
    PodInfo,
    Status,
)
from scheduler.podutil import add_pod, new_node_info, new_pod_info

_uid = 0


def pod(name: str = "p", ns: str = "default", *, labels: Mapping[str, str] | None = None,
        node: str = "", cpu: str | None = None, memory: str | None = None,
        containers: list[Obj] | None = None, **spec: Any) -> Obj:
    """A pod; ``cpu``/``memory`` make one container requesting them; ``spec`` keys go to spec."""
    global _uid
    _uid += 1
    if containers is None:
        reqs = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
        containers = [{"name": "c", "image": "i", "resources": {"requests": reqs} if reqs else {}}]
    s: Obj = {"containers": containers, **spec}
    if node:
        s["nodeName"] = node
    return {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{_uid}", "labels": dict(labels or {})},
            "spec": s}


def node(name: str, *, labels: Mapping[str, str] | None = None, cpu: str = "4", memory: str = "32Gi",
         pods: str = "110", taints: list[Obj] | None = None, unschedulable: bool = False,
         **alloc: str) -> Obj:
    allocatable = {"cpu": cpu, "memory": memory, "pods": pods, **{k.replace("__", "/"): v for k, v in alloc.items()}}
    spec: Obj = {}
    if taints:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    return {"metadata": {"name": name, "labels": dict(labels or {})}, "spec": spec,
            "status": {"allocatable": allocatable, "capacity": dict(allocatable)}}


class FakeSnapshot:
    def __init__(self, infos: list[NodeInfo]) -> None:
        self.infos = infos
        self.by_name = {n.name: n for n in infos}

    def node_infos(self) -> list[NodeInfo]:
        return self.infos

    def get(self, node_name: str) -> NodeInfo | None:
        return self.by_name.get(node_name)

    def have_pods_with_affinity(self) -> list[NodeInfo]:
        return [n for n in self.infos if n.pods_with_affinity]

    def have_pods_with_required_anti_affinity(self) -> list[NodeInfo]:
        return [n for n in self.infos if n.pods_with_required_anti_affinity]


class FakeHandle:
    """The framework handle: a snapshot, listers by resource, and ``api`` recording patches."""

    def __init__(self, infos: list[NodeInfo] | None = None,
                 listers: Mapping[str, Iterable[Obj]] | None = None) -> None:
        self.snap = FakeSnapshot(infos or [])
        self.listers: dict[str, dict[str, Obj]] = {}
        for res, objs in (listers or {}).items():
            self.listers[res] = {}
            for o in objs:
                self.add(res, o)
        self.patches: list[tuple[str, Obj]] = []
        self.api = self  # the scheduler's handle exposes its client as ``api`` (``api.patch``)

    def add(self, resource: str, obj: Obj) -> None:
        m = obj["metadata"]
        key = f"{m['namespace']}/{m['name']}" if m.get("namespace") is not None else m["name"]
        self.listers.setdefault(resource, {})[key] = obj

    def snapshot(self) -> FakeSnapshot:
        return self.snap

    def lister(self, resource: str) -> Mapping[str, Obj]:
        """Like the scheduler's: an unknown resource is a KeyError (plugins must cope)."""
        if resource not in self.listers:
            raise KeyError(resource)
        return self.listers[resource]

    def patch(self, path: str, body: Obj) -> Obj:
        self.patches.append((path, body))
        return body


def snapshot(nodes: list[Obj], existing: Iterable[Obj] = ()) -> list[NodeInfo]:
    """NodeInfos for ``nodes`` with the ``existing`` pods placed by their ``spec.nodeName``."""
    infos = {n["metadata"]["name"]: new_node_info(n) for n in nodes}
    for p in existing:
        ni = infos.get(p["spec"].get("nodeName", ""))
        if ni is not None:
            add_pod(ni, new_pod_info(p))
    return list(infos.values())


def run_filter(plugin: Any, p: Obj, infos: list[NodeInfo], state: CycleState | None = None) -> dict[str, Status]:
    """PreFilter once, then Filter on every node; a PreFilter rejection is every node's status."""
    state = state or CycleState()
    pi = new_pod_info(p)
    pre = getattr(plugin, "pre_filter", None)
    if pre is not None:
        _res, st = pre(state, pi, infos)
        if st.code == Code.SKIP:
            return {n.name: SUCCESS for n in infos}
        if not st.ok:
            return {n.name: st for n in infos}
    return {n.name: plugin.filter(state, pi, n) for n in infos}


def run_scores(plugin: Any, p: Obj, filtered: list[NodeInfo], state: CycleState | None = None,
               normalize: bool = True) -> dict[str, int]:
    state = state or CycleState()
    pi = new_pod_info(p)
    pre = getattr(plugin, "pre_score", None)
    if pre is not None:
        st = pre(state, pi, filtered)
        if st.code == Code.SKIP:
            return {n.name: 0 for n in filtered}
        assert st.ok, st
    scores = {}
    for n in filtered:
        s, st = plugin.score(state, pi, n)
        assert st.ok, st
        scores[n.name] = s
    if normalize and hasattr(plugin, "normalize_score"):
        assert plugin.normalize_score(state, pi, scores).ok
    return scores


def pod_info(p: Obj) -> PodInfo:
    return new_pod_info(p)
