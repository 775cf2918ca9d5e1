"""The small node filters: NodeName, NodeUnschedulable, NodePorts (upstream ``plugins/nodename``,
``plugins/nodeunschedulable``, ``plugins/nodeports``).

- NodeName: a pod with ``spec.nodeName`` fits only that node (UnschedulableAndUnresolvable
  elsewhere).
- NodeUnschedulable: a cordoned node (``spec.unschedulable``) takes only pods tolerating the
  ``node.kubernetes.io/unschedulable:NoSchedule`` taint (DaemonSet pods do).
- NodePorts: the pod's host ports (PreFilter collects them once) must be free on the node; a
  wildcard IP 0.0.0.0 conflicts with every IP of the same protocol and port.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from scheduler.framework import (
    SKIP,
    SUCCESS,
    ClusterEvent,
    CycleState,
    Handle,
    NodeInfo,
    PodInfo,
    PreFilterResult,
    Status,
    unresolvable,
    unschedulable,
)
from scheduler.podutil import host_ports
from scheduler.selectors import pod_tolerations, tolerated

ERR_NODE_NAME = "node(s) didn't match the requested node name"
ERR_UNSCHEDULABLE = "node(s) were unschedulable"
ERR_PORTS = "node(s) didn't have free ports for the requested pod ports"
TAINT_NODE_UNSCHEDULABLE = "node.kubernetes.io/unschedulable"


class NodeName:
    name = "NodeName"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        want = (pod.pod.get("spec") or {}).get("nodeName")
        if want and want != node.name:
            return unresolvable(ERR_NODE_NAME).with_plugin(self.name)
        return SUCCESS

    def filter_fn(self, state: CycleState, pod: PodInfo) -> Callable[[NodeInfo], Status] | None:
        want = (pod.pod.get("spec") or {}).get("nodeName")
        if not want:
            return None
        fail = unresolvable(ERR_NODE_NAME).with_plugin(self.name)
        return lambda node: fail if node.node["metadata"]["name"] != want else SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("Node", "Add"),)


_UNSCHEDULABLE_TAINT = {"key": TAINT_NODE_UNSCHEDULABLE, "effect": "NoSchedule"}


class NodeUnschedulable:
    name = "NodeUnschedulable"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        if not (node.node.get("spec") or {}).get("unschedulable"):
            return SUCCESS
        if tolerated(pod_tolerations(pod.pod), _UNSCHEDULABLE_TAINT):
            return SUCCESS
        return unresolvable(ERR_UNSCHEDULABLE).with_plugin(self.name)

    def filter_fn(self, state: CycleState, pod: PodInfo) -> Callable[[NodeInfo], Status] | None:
        if tolerated(pod_tolerations(pod.pod), _UNSCHEDULABLE_TAINT):
            return None
        # The scheduler's snapshot (scheduler.cache.NodeSnapshot) names the cordoned nodes: with
        # none, this Filter would pass every node. Other snapshots: check every node.
        cordoned = getattr(self.handle.snapshot(), "unschedulable", None)
        if cordoned is not None and not cordoned:
            return None
        fail = unresolvable(ERR_UNSCHEDULABLE).with_plugin(self.name)
        return lambda node: fail if (node.node.get("spec") or {}).get("unschedulable") else SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("Node", "Add"), ClusterEvent("Node", "UpdateNodeTaint"))


_STATE_PORTS = "PreFilterNodePorts"


def ports_conflict(wanted: list[tuple[str, str, int]], used: set[tuple[str, str, int]]) -> bool:
    """``HostPortInfo.CheckConflict``: same protocol and port, and same IP or either is 0.0.0.0."""
    if not used:
        return False
    for proto, ip, port in wanted:
        if (proto, ip, port) in used or (proto, "0.0.0.0", port) in used:
            return True
        if ip == "0.0.0.0" and any(p == proto and n == port for p, _, n in used):
            return True
    return False


class NodePorts:
    name = "NodePorts"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle

    def pre_filter(self, state: CycleState, pod: PodInfo,
                   nodes: list[NodeInfo]) -> tuple[PreFilterResult | None, Status]:
        ports = list(host_ports(pod.pod))
        if not ports:
            return None, SKIP
        state.write(_STATE_PORTS, ports)
        return None, SUCCESS

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        ports = state.get(_STATE_PORTS)
        if ports is None:
            ports = list(host_ports(pod.pod))
        if ports and ports_conflict(ports, node.used_ports):
            return unschedulable(ERR_PORTS).with_plugin(self.name)
        return SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("Pod", "Delete"), ClusterEvent("Node", "Add"), ClusterEvent("Node", "Update"))
