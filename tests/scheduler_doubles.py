"""Test doubles for the scheduler's plugins, until (and besides) the real ones in
``scheduler/plugins``: small, obviously correct stand-ins with upstream's names and reason texts,
so the loop, queue and message tests do not depend on the plugin implementations.

- :class:`FitDouble` (``NodeResourcesFit``): cpu, memory and pod count against allocatable,
  reasons ``Insufficient cpu`` / ``Insufficient memory`` / ``Too many pods``; re-queues on node
  add/allocatable change and pod delete (as upstream's EventsToRegister).
- :class:`LeastAllocatedDouble` (``NodeResourcesBalancedAllocation`` slot): prefers free cpu.
- :class:`TaintDouble` (``TaintToleration``): NoSchedule taints without a matching toleration,
  reason ``node(s) had untolerated taint {key: value}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from scheduler.framework import (
    SUCCESS,
    ClusterEvent,
    CycleState,
    Handle,
    NodeInfo,
    PodInfo,
    Status,
    unresolvable,
    unschedulable,
)


class FitDouble:
    name = "NodeResourcesFit"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        self.args = dict(args)

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        reasons = []
        if node.allocatable.allowed_pod_number and len(node.pods) + 1 > node.allocatable.allowed_pod_number:
            reasons.append("Too many pods")
        if pod.requests.milli_cpu and node.requested.milli_cpu + pod.requests.milli_cpu > node.allocatable.milli_cpu:
            reasons.append("Insufficient cpu")
        if pod.requests.memory and node.requested.memory + pod.requests.memory > node.allocatable.memory:
            reasons.append("Insufficient memory")
        return unschedulable(*reasons) if reasons else SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("Node", "Add"), ClusterEvent("Node", "UpdateNodeAllocatable"),
                ClusterEvent("Pod", "Delete"))


class LeastAllocatedDouble:
    name = "NodeResourcesBalancedAllocation"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        pass

    def score(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> tuple[int, Status]:
        alloc = node.allocatable.milli_cpu or 1
        free = max(0, alloc - node.requested.milli_cpu - pod.requests.milli_cpu)
        return 100 * free // alloc, SUCCESS


class TaintDouble:
    name = "TaintToleration"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        pass

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        tols = (pod.pod.get("spec") or {}).get("tolerations") or []
        for t in (node.node.get("spec") or {}).get("taints") or []:
            if t.get("effect") not in ("NoSchedule", "NoExecute"):
                continue
            if not any((tol.get("operator") == "Exists" and tol.get("key") in (None, t["key"])) or
                       (tol.get("key") == t["key"] and tol.get("value", "") == t.get("value", "")) for tol in tols):
                return unresolvable(f"node(s) had untolerated taint {{{t['key']}: {t.get('value', '')}}}")
        return SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("Node", "Add"), ClusterEvent("Node", "UpdateNodeTaint"))


REGISTRY: dict[str, type] = {c.name: c for c in (FitDouble, LeastAllocatedDouble, TaintDouble)}


def node(name: str, cpu: str = "4", memory: str = "8Gi", pods: int = 110, labels: dict[str, str] | None = None,
         taints: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """A Ready Node object (the scheduler's view: allocatable, labels, taints)."""
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "spec": {"taints": taints or []},
            "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": str(pods)},
                       "capacity": {"cpu": cpu, "memory": memory, "pods": str(pods)},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def pod(name: str, ns: str = "default", cpu: str | None = "100m", memory: str | None = None, priority: int = 0,
        scheduler: str | None = None, node_name: str | None = None) -> dict[str, Any]:
    req = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "busybox",
                                            "resources": {"requests": req} if req else {}}]}
    if priority:
        spec["priority"] = priority
    if scheduler:
        spec["schedulerName"] = scheduler
    if node_name:
        spec["nodeName"] = node_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"},
            "spec": spec}
