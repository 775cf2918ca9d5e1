"""TaintToleration (upstream ``plugins/tainttoleration``).

Filter: the first NoSchedule/NoExecute taint of the node that the pod does not tolerate rejects
the node for good (UnschedulableAndUnresolvable), with the reason
``node(s) had untolerated taint {key: value}``.

Score: the number of PreferNoSchedule taints the pod does not tolerate (only tolerations with
effect PreferNoSchedule or empty count), normalized reversed: the node with the most intolerable
soft taints scores 0, nodes with none score 100.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from scheduler.framework import (
    SUCCESS,
    ClusterEvent,
    CycleState,
    Handle,
    NodeInfo,
    Obj,
    PodInfo,
    Status,
    default_normalize,
    unresolvable,
)
from scheduler.selectors import find_untolerated, hard_taint, node_taints, pod_tolerations, tolerated


def untolerated_reason(taint: Mapping[str, Any]) -> str:
    return f"node(s) had untolerated taint {{{taint.get('key', '')}: {taint.get('value') or ''}}}"


class TaintToleration:
    name = "TaintToleration"
    #: Which taints Filter enforces (LeafNodeTaintToleration leaves out the leaf taint).
    enforced: Callable[[Obj], bool] = staticmethod(hard_taint)

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        self._state_key = "PreScore" + self.name

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        taints = (node.node.get("spec") or {}).get("taints")
        if not taints:
            return SUCCESS
        taint = find_untolerated(taints, pod_tolerations(pod.pod), self.enforced)
        if taint is None:
            return SUCCESS
        return unresolvable(untolerated_reason(taint)).with_plugin(self.name)

    def filter_fn(self, state: CycleState, pod: PodInfo) -> Callable[[NodeInfo], Status] | None:
        # The scheduler's snapshot (scheduler.cache.NodeSnapshot) names the tainted nodes: with
        # none, this Filter would pass every node. Other snapshots: check every node.
        tainted = getattr(self.handle.snapshot(), "tainted", None)
        if tainted is not None and not tainted:
            return None
        tols = pod_tolerations(pod.pod)
        enforced = self.enforced
        name = self.name

        def f(node: NodeInfo) -> Status:
            taints = (node.node.get("spec") or {}).get("taints")
            if not taints:
                return SUCCESS
            taint = find_untolerated(taints, tols, enforced)
            if taint is None:
                return SUCCESS
            return unresolvable(untolerated_reason(taint)).with_plugin(name)
        return f

    def pre_score(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> Status:
        tols = [t for t in pod_tolerations(pod.pod) if (t.get("effect") or "PreferNoSchedule") == "PreferNoSchedule"]
        state.write(self._state_key, tols)
        return SUCCESS

    def score(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> tuple[int, Status]:
        tols = state.get(self._state_key)
        if tols is None:
            tols = [t for t in pod_tolerations(pod.pod)
                    if (t.get("effect") or "PreferNoSchedule") == "PreferNoSchedule"]
        n = sum(1 for taint in node_taints(node.node)
                if taint.get("effect") == "PreferNoSchedule" and not tolerated(tols, taint))
        return n, SUCCESS

    def score_nodes(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> list[int]:
        """:meth:`score` for every node; untainted nodes (most) cost one lookup, none when the
        snapshot says no node is tainted."""
        tainted = getattr(self.handle.snapshot(), "tainted", None)
        if tainted is not None and not tainted:
            return [0] * len(nodes)
        tols = state.get(self._state_key)
        if tols is None:
            tols = [t for t in pod_tolerations(pod.pod)
                    if (t.get("effect") or "PreferNoSchedule") == "PreferNoSchedule"]
        out = []
        for n in nodes:
            taints = (n.node.get("spec") or {}).get("taints")
            out.append(sum(1 for taint in taints if taint.get("effect") == "PreferNoSchedule"
                           and not tolerated(tols, taint)) if taints else 0)
        return out

    def normalize_score(self, state: CycleState, pod: PodInfo, scores: dict[str, int]) -> Status:
        default_normalize(scores, reverse=True)
        return SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("Node", "Add"), ClusterEvent("Node", "UpdateNodeTaint"))
