"""LeafNodeTaintToleration: upstream TaintToleration, except that the leaf taint
``kosmos.io/node=true:NoSchedule`` (which ClusterTree puts on every virtual node so stock
schedulers keep off) counts as tolerated by every pod. Kosmos' own plugin does the same, so a
pod of the kosmos-scheduler profile may land on leaf clusters without adding a toleration.

Per pod, in order:

1. ``filter``: the first NoSchedule/NoExecute taint of the node that the pod does not tolerate
   (the leaf taint skipped) rejects the node, UnschedulableAndUnresolvable, with upstream's
   reason ``node(s) had untolerated taint {key: value}``.
2. ``pre_score`` keeps the pod's tolerations of effect PreferNoSchedule or empty; ``score``
   counts the node's PreferNoSchedule taints none of them tolerates; ``normalize_score`` is
   upstream's reversed DefaultNormalizeScore (fewest such taints -> 100).

The toleration rule itself is :func:`scheduler.policy.tolerates` (``ToleratesTaint``); the
upstream TaintToleration plugin may bring its own, to be folded into one.
"""

from __future__ import annotations

import logging
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
    default_normalize,
    unresolvable,
)
from scheduler.policy import find_untolerated_taint, is_leaf_taint, node_taints, tolerates

_log = logging.getLogger(__name__)

_PRESCORE_KEY = "PreScoreLeafNodeTaintToleration"


def untolerated_reason(taint: Mapping[str, Any]) -> str:
    """Upstream's Filter reason (tainttoleration.Filter)."""
    return f"node(s) had untolerated taint {{{taint.get('key', '')}: {taint.get('value') or ''}}}"


class LeafNodeTaintToleration:
    """Filter + score plugin; see the module header."""

    name = "LeafNodeTaintToleration"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        tolerations = (pod.pod.get("spec") or {}).get("tolerations") or []
        taint = find_untolerated_taint(
            node_taints(node.node), tolerations,
            lambda t: t.get("effect") in ("NoSchedule", "NoExecute") and not is_leaf_taint(t))
        if taint is None:
            return SUCCESS
        return unresolvable(untolerated_reason(taint))

    def pre_score(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> Status:
        tolerations = (pod.pod.get("spec") or {}).get("tolerations") or []
        state.write(_PRESCORE_KEY, [t for t in tolerations if (t.get("effect") or "") in ("", "PreferNoSchedule")])
        return SUCCESS

    def score(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> tuple[int, Status]:
        tolerations = state.get(_PRESCORE_KEY)
        if tolerations is None:  # PreScore did not run: compute as it would have
            tolerations = [t for t in (pod.pod.get("spec") or {}).get("tolerations") or []
                           if (t.get("effect") or "") in ("", "PreferNoSchedule")]
        n = sum(1 for taint in node_taints(node.node)
                if taint.get("effect") == "PreferNoSchedule" and not any(tolerates(t, taint) for t in tolerations))
        return n, SUCCESS

    def normalize_score(self, state: CycleState, pod: PodInfo, scores: dict[str, int]) -> Status:
        default_normalize(scores, reverse=True)
        return SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        # A node's taints change (or a node arrives); the pod's own tolerations change.
        return [ClusterEvent("Node", "Add"), ClusterEvent("Node", "Update"), ClusterEvent("Pod", "Update")]
