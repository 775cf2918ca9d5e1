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

It is upstream's :class:`~scheduler.plugins.tainttoleration.TaintToleration` with the enforced
taints narrowed by :func:`scheduler.policy.hard_non_leaf_taint`; one toleration rule
(:mod:`scheduler.selectors`) serves both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from scheduler.framework import ClusterEvent, Obj
from scheduler.plugins.tainttoleration import TaintToleration, untolerated_reason
from scheduler.policy import hard_non_leaf_taint

__all__ = ["LeafNodeTaintToleration", "untolerated_reason"]


class LeafNodeTaintToleration(TaintToleration):
    """TaintToleration that tolerates the leaf taint; see the module header."""

    name = "LeafNodeTaintToleration"
    enforced: Callable[[Obj], bool] = staticmethod(hard_non_leaf_taint)

    def events_to_register(self) -> Iterable[ClusterEvent]:
        # A node's taints change (or a node arrives); the pod's own tolerations change.
        return [ClusterEvent("Node", "Add"), ClusterEvent("Node", "Update"), ClusterEvent("Pod", "Update")]
