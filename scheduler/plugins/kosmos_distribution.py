"""LeafNodeDistribution: DistributionPolicy / ClusterDistributionPolicy decide whether a pod may
run on host nodes, on leaf (virtual) nodes, on both, or on the nodes an advanced term names.

The matching rule and the node types are :mod:`scheduler.policy`'s (its header states them:
namespaced before cluster-scoped; ``name`` > ``namePrefix`` > ``labelSelector``; longest
prefix; full LabelSelector semantics; ties by policy name then selector index; no match =
``mix``). DaemonSet pods are never restricted (their controller picks the node).

Per pod, in order:

1. ``pre_filter`` matches the pod once against the policies from the ``distributionpolicies``
   and ``clusterdistributionpolicies`` listers and stores the result. No match or ``mix``:
   SKIP (Filter has nothing to do). A ``policyName`` naming no ``policyTerm``, or an unknown
   ``nodeType``: the pod is UnschedulableAndUnresolvable with a reason naming the policy (it
   waits for a policy change). A malformed selector (bad operator): ERROR naming the field. An
   ``adv`` term with ``nodeName`` narrows the candidates to that node.
2. ``filter`` admits or rejects each node for the matched term:
   ``node(s) didn't match the pod's distribution policy NS/NAME (term "leaf")``,
   UnschedulableAndUnresolvable (only a policy change helps, which re-queues the pod).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
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
    error,
    unresolvable,
)
from scheduler.policy import (
    ADV,
    MIX,
    NODE_TYPES,
    DistributionMatch,
    MissingTermError,
    PolicyError,
    is_daemonset_pod,
    match_distribution,
    term_admits,
)

_log = logging.getLogger(__name__)

_STATE_KEY = "PreFilterLeafNodeDistribution"

#: Resource names of the policy CRDs in ClusterEvents (their kinds, as ``Pod``/``Node``).
DISTRIBUTION_POLICY = "DistributionPolicy"
CLUSTER_DISTRIBUTION_POLICY = "ClusterDistributionPolicy"


def mismatch_reason(match: DistributionMatch) -> str:
    return f"node(s) didn't match the pod's distribution policy {match.policy} (term {match.policy_name!r})"


class LeafNodeDistribution:
    """PreFilter + Filter plugin; see the module header."""

    name = "LeafNodeDistribution"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle

    def _match(self, pod: PodInfo) -> tuple[DistributionMatch | None, Status]:
        """The pod's governing match (None: unrestricted) or the status that stops it."""
        if is_daemonset_pod(pod.pod):
            return None, SUCCESS
        try:
            match = match_distribution(pod.pod, self.handle.lister("distributionpolicies").values(),
                                       self.handle.lister("clusterdistributionpolicies").values())
        except MissingTermError as e:
            _log.warning("pod %s: %s", pod.key, e)
            return None, unresolvable(str(e))
        except PolicyError as e:
            _log.warning("pod %s: %s", pod.key, e)
            return None, error(str(e))
        if match is None:
            return None, SUCCESS
        if match.node_type not in NODE_TYPES:
            return None, unresolvable(f"{match.kind} {match.policy}: policyTerm {match.policy_name!r} has nodeType "
                                      f"{match.node_type!r}, none of {', '.join(NODE_TYPES)}")
        _log.debug("pod %s: %s %s selector %d -> term %r (%s)", pod.key, match.kind, match.policy,
                   match.selector_index, match.policy_name, match.node_type)
        return match, SUCCESS

    def pre_filter(self, state: CycleState, pod: PodInfo,
                   nodes: list[NodeInfo]) -> tuple[PreFilterResult | None, Status]:
        match, status = self._match(pod)
        if not status.ok:
            return None, status
        state.write(_STATE_KEY, match)
        if match is None or match.node_type == MIX:
            return None, SKIP
        node_name = (match.term.get("advancedTerm") or {}).get("nodeName")
        if match.node_type == ADV and node_name:
            return PreFilterResult(frozenset({node_name})), SUCCESS
        return None, SUCCESS

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        try:
            match = state.read(_STATE_KEY)
        except KeyError:  # PreFilter did not run (a caller filtering one node): decide here
            match, status = self._match(pod)
            if not status.ok:
                return status
        if match is None or term_admits(match.term, node.node):
            return SUCCESS
        return unresolvable(mismatch_reason(match))

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return [ClusterEvent(r, a) for r in (DISTRIBUTION_POLICY, CLUSTER_DISTRIBUTION_POLICY)
                for a in ("Add", "Update", "Delete")] + [
            ClusterEvent("Node", "Add"), ClusterEvent("Node", "Update"),  # labels/taints decide host/leaf/adv
            ClusterEvent("Pod", "Update"),  # the pod's own labels decide the match
        ]
