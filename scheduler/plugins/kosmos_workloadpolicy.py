"""LeafNodeWorkloadPolicy: replica quotas per topology value (a cluster, zone, region or any
node label), from Kosmos' release-k8s1.21 WorkloadPolicy. A pod opts in with the label
``workload-policy/kosmos.io: <policy name>``; the policy lives in the pod's namespace.

Per pod, in order (DaemonSet pods and pods without the label are skipped at PreFilter):

1. ``pre_filter`` reads the policy (``workloadpolicies`` lister, ``ns/name``) and counts, per
   value of its ``topologyKey``, the pods already there: on every node of the snapshot (assumed
   pods included, so consecutive pods see each other before their binds land), in the pod's
   namespace, matching the policy's ``labelSelector`` (full LabelSelector semantics; Kosmos read
   only matchLabels), not terminating (no ``deletionTimestamp``). A missing policy, or a pod its
   own policy's selector does not match, is UnschedulableAndUnresolvable with a reason naming
   the policy (a policy change re-queues the pod).
2. ``filter``: a node without the topology label is rejected (UnschedulableAndUnresolvable).
   With ``allocationType: Required`` a node whose topology value already holds its quota is
   rejected (Unschedulable: a deleted pod frees room); a value the policy does not list has quota
   0. ``Preferred`` (the CRD's default) rejects nothing more: pods spill over once the quotas
   are met.
3. ``pre_score`` SKIPs the pods PreFilter skipped (no Score calls for them); ``score``:
   :func:`scheduler.policy.workload_score` of the node's domain, ``Balance`` (default)
   = (1 - count/desired)*100, ``Fill`` = count/desired*100, corrected so that full or unlisted
   domains score 0 and domains with room at least 1 (Kosmos' formula gave a full domain 100
   under Fill). Scores are already 0..100; no normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
    unschedulable,
)
from scheduler.policy import (
    WORKLOAD_POLICY_LABEL,
    PolicyError,
    WorkloadPolicy,
    is_daemonset_pod,
    label_selector_matches,
    workload_score,
)

_log = logging.getLogger(__name__)

_STATE_KEY = "PreFilterLeafNodeWorkloadPolicy"
#: Resource name of the CRD in ClusterEvents.
WORKLOAD_POLICY = "WorkloadPolicy"


@dataclass
class _State:
    policy: WorkloadPolicy
    counts: dict[str, int] = field(default_factory=dict)


def count_pods(policy: WorkloadPolicy, namespace: str, nodes: Iterable[NodeInfo]) -> dict[str, int]:
    """Pods of the policy per topology value (see step 1 of the header)."""
    counts: dict[str, int] = {}
    where = f"WorkloadPolicy {policy.ident}: spec.labelSelector"
    for ni in nodes:
        value = ni.labels.get(policy.topology_key)
        if value is None:
            continue
        n = 0
        for p in ni.pods:
            meta = p.pod.get("metadata") or {}
            if meta.get("namespace", "") != namespace or meta.get("deletionTimestamp"):
                continue
            if label_selector_matches(policy.selector, meta.get("labels") or {}, where):
                n += 1
        counts[value] = counts.get(value, 0) + n
    return counts


class LeafNodeWorkloadPolicy:
    """PreFilter + Filter + Score plugin; see the module header."""

    name = "LeafNodeWorkloadPolicy"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle

    def pre_filter(self, state: CycleState, pod: PodInfo,
                   nodes: list[NodeInfo]) -> tuple[PreFilterResult | None, Status]:
        meta = pod.pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if is_daemonset_pod(pod.pod) or WORKLOAD_POLICY_LABEL not in labels:
            return None, SKIP
        ns = meta.get("namespace", "")
        ident = f"{ns}/{labels[WORKLOAD_POLICY_LABEL]}"
        obj = self.handle.lister("workloadpolicies").get(ident)
        if obj is None:
            return None, unresolvable(f"workload-policy {ident} (pod label {WORKLOAD_POLICY_LABEL}) not found")
        try:
            policy = WorkloadPolicy.parse(obj)
            if not label_selector_matches(policy.selector, labels, f"WorkloadPolicy {ident}: spec.labelSelector"):
                return None, unresolvable(
                    f"the pod's labels don't match the labelSelector of its workload-policy {ident}")
            # Every node of the cluster counts, not only the candidates the scheduler sampled.
            counts = count_pods(policy, ns, self.handle.snapshot().node_infos())
        except PolicyError as e:
            _log.warning("pod %s: %s", pod.key, e)
            return None, error(str(e))
        _log.debug("pod %s: workload-policy %s counts %s quotas %s", pod.key, ident, counts, dict(policy.quotas))
        state.write(_STATE_KEY, _State(policy, counts))
        return None, SUCCESS

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        st: _State | None = state.get(_STATE_KEY)
        if st is None:
            return SUCCESS  # PreFilter skipped the pod
        pol = st.policy
        value = node.labels.get(pol.topology_key)
        if value is None:
            return unresolvable(f"node(s) didn't have the label {pol.topology_key!r} of workload-policy {pol.ident}")
        if pol.required and st.counts.get(value, 0) >= pol.quota(value):
            return unschedulable(f"node(s) were in a topology domain that reached its replicas in "
                                 f"workload-policy {pol.ident}")
        return SUCCESS

    def pre_score(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> Status:
        """SKIP (no Score calls) for pods PreFilter skipped: they have no policy to score by."""
        return SUCCESS if state.get(_STATE_KEY) is not None else SKIP

    def score(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> tuple[int, Status]:
        st: _State | None = state.get(_STATE_KEY)
        if st is None:
            return 0, SUCCESS
        value = node.labels.get(st.policy.topology_key)
        if value is None:
            return 0, SUCCESS
        return workload_score(st.counts.get(value, 0), st.policy.quota(value), st.policy.method), SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return [ClusterEvent(WORKLOAD_POLICY, a) for a in ("Add", "Update", "Delete")] + [
            ClusterEvent("Pod", "Add"), ClusterEvent("Pod", "Update"), ClusterEvent("Pod", "Delete"),
            ClusterEvent("Node", "Add"), ClusterEvent("Node", "Update"),
        ]
