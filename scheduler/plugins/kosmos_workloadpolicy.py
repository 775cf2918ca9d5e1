"""LeafNodeWorkloadPolicy: replica quotas per topology value (a cluster, zone, region or any
node label), from Kosmos' release-k8s1.21 WorkloadPolicy, and Karmada's replica division and
spread constraints on the same policy (issue 19 item 5). A pod opts in with the label
``workload-policy/kosmos.io: <policy name>``; the policy lives in the pod's namespace.

The quota of a topology value (a *group*) is either listed (``allocationPolicy``, Kosmos) or
divided from the workload's replicas (``replicaScheduling``, Karmada's rules:
:mod:`scheduler.division`); ``spreadConstraints`` bound how many groups of a label (cluster,
region, zone or any) the workload uses.

Per pod, in order (DaemonSet pods and pods without the label are skipped at PreFilter):

1. ``pre_filter`` reads the policy (``workloadpolicies`` lister, ``ns/name``) and counts, per
   value of its ``topologyKey`` (and of every spread constraint's label), the pods already
   there: on every node of the snapshot (assumed pods included, so consecutive pods see each
   other before their binds land), in the pod's namespace, matching the policy's
   ``labelSelector`` (full LabelSelector semantics; Kosmos read only matchLabels), not
   terminating (no ``deletionTimestamp``). A missing policy, or a pod its own policy's selector
   does not match, is UnschedulableAndUnresolvable with a reason naming the policy (a policy
   change re-queues the pod).

   With ``replicaScheduling`` it then computes the targets per group:

   a. R, the workload's replicas: ``spec.replicas`` of the pod's controller (ReplicaSet,
      StatefulSet or ReplicationController, from the scheduler's listers; a Deployment's pods
      are owned by its ReplicaSet), else ``replicaScheduling.replicas``; neither is
      UnschedulableAndUnresolvable.
   b. The *room* per node, when the targets need it (``dynamicWeight: AvailableReplicas``,
      ``Aggregated``, or ``minGroups``): how many pods of this pod's request fit, node by node.
      A virtual node with a leaf view (``handle.leaf_views``, kosmos-scheduler --reflector) asks
      :meth:`scheduler.leafview.LeafView.count` (per real leaf node, placements in flight
      reserved, the pod's leaf placement honoured); any other node (a host node, or a virtual
      node without a view, whose figure is then its leaf's sum) counts
      ``min over requested resources of floor(free / request)`` from its allocatable minus
      requested, and ``pods`` slots. A node the pod cannot use (``spec.unschedulable``, the pod's
      nodeSelector/required node affinity, an untolerated NoSchedule/NoExecute taint other than
      the leaf taint) has room 0. A group's room = its pods already placed + the sum of its
      nodes' room: the replicas it can hold.
   c. Targets: static weights (:func:`scheduler.division.static_weights` then
      :func:`scheduler.division.divide`), dynamic (:func:`scheduler.division.dynamic_targets`
      by room), or Aggregated (:func:`scheduler.division.aggregated_targets`), over the groups
      a spread constraint still allows (step 2). The targets are the quotas of step 3.

   Spread constraints: a constraint's *used* groups hold pods of the policy. When at least
   ``maxGroups`` are used, only they stay allowed. When fewer than ``minGroups`` groups have
   room or are used, the pod is Unschedulable (``... wants at least N <field> groups, M have
   room``: a node joining or freeing room re-queues it).
2. ``filter``: a node without the topology label, or without a spread constraint's label, is
   rejected (UnschedulableAndUnresolvable). A node in a group a spread constraint no longer
   allows (maxGroups reached) is Unschedulable. With ``allocationType: Required`` a node whose
   topology value already holds its quota is rejected (Unschedulable: a deleted pod frees room);
   a value the policy does not list (or whose target is 0) has quota 0. ``Preferred`` (the CRD's
   default) rejects nothing more: pods spill over once the quotas are met.
3. ``pre_score`` SKIPs the pods PreFilter skipped (no Score calls for them); ``score``:
   :func:`scheduler.policy.workload_score` of the node's domain, ``Balance`` (default)
   = (1 - count/desired)*100, ``Fill`` = count/desired*100, corrected so that full or unlisted
   domains score 0 and domains with room at least 1 (Kosmos' formula gave a full domain 100
   under Fill), so pods go to the groups furthest below their targets first. While a spread
   constraint (``minGroups`` > 1) has fewer than ``minGroups`` groups used, a node in a group it
   does not use yet scores 100 if its domain is below its quota (spread first). Scores are
   already 0..100; no normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scheduler.division import StaticWeight, aggregated_targets, divide, dynamic_targets, static_weights
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
from scheduler.leafview import Demand, Placement, per_node, resource_vector
from scheduler.leafviews import LeafViews
from scheduler.policy import (
    AGGREGATED,
    WORKLOAD_POLICY_LABEL,
    PolicyError,
    ReplicaDivision,
    SpreadConstraint,
    TargetCluster,
    WorkloadPolicy,
    hard_non_leaf_taint,
    is_daemonset_pod,
    is_leaf_node,
    label_selector_matches,
    workload_score,
)
from scheduler.selectors import (
    Matcher,
    RequiredNodeAffinity,
    SelectorError,
    find_untolerated,
    label_selector,
    node_taints,
    pod_tolerations,
)

_log = logging.getLogger(__name__)

_STATE_KEY = "PreFilterLeafNodeWorkloadPolicy"
#: Resource name of the CRD in ClusterEvents.
WORKLOAD_POLICY = "WorkloadPolicy"
#: The pod controllers whose ``spec.replicas`` is the workload's size, by lister.
CONTROLLERS = {"ReplicaSet": "replicasets", "StatefulSet": "statefulsets",
               "ReplicationController": "replicationcontrollers"}


@dataclass
class _Spread:
    """One spread constraint for this pod: the groups used, and the allowed ones (None: all)."""

    constraint: SpreadConstraint
    used: set[str]
    allowed: set[str] | None
    prefer_new: bool


@dataclass
class _State:
    policy: WorkloadPolicy
    counts: dict[str, int] = field(default_factory=dict)
    #: Divided targets per topology value (replaces ``policy.quotas``), None without division.
    targets: dict[str, int] | None = None
    spread: list[_Spread] = field(default_factory=list)

    def quota(self, value: str) -> int:
        return self.targets.get(value, 0) if self.targets is not None else self.policy.quota(value)


def _selector(policy: WorkloadPolicy) -> Matcher:
    """The policy's labelSelector compiled once per cycle (strictly: :class:`PolicyError`)."""
    try:
        return label_selector(policy.selector, f"WorkloadPolicy {policy.ident}: spec.labelSelector")
    except SelectorError as e:
        raise PolicyError(str(e)) from None


def _policy_pods(match: Matcher, namespace: str, ni: NodeInfo) -> int:
    n = 0
    for p in ni.pods:
        meta = p.pod.get("metadata") or {}
        if meta.get("namespace", "") != namespace or meta.get("deletionTimestamp"):
            continue
        if match(meta.get("labels") or {}):
            n += 1
    return n


def count_pods(policy: WorkloadPolicy, namespace: str, nodes: Iterable[NodeInfo]) -> dict[str, int]:
    """Pods of the policy per topology value (step 1 of the header)."""
    match = _selector(policy)
    counts: dict[str, int] = {}
    for ni in nodes:
        value = ni.labels.get(policy.topology_key)
        if value is None:
            continue
        counts[value] = counts.get(value, 0) + _policy_pods(match, namespace, ni)
    return counts


def workload_replicas(handle: Handle, pod: PodInfo, division: ReplicaDivision, ident: str) -> int | Status:
    """The workload's replicas (step 1a of the header), or the Status saying why there is none:
    Unschedulable while the pod's controller is not in the lister yet (it may come),
    UnschedulableAndUnresolvable when there is nothing to read it from."""
    meta = pod.pod.get("metadata") or {}
    ns = meta.get("namespace", "")
    for ref in meta.get("ownerReferences") or []:
        resource = CONTROLLERS.get(ref.get("kind", ""))
        if not ref.get("controller") or resource is None:
            continue
        try:
            owner = handle.lister(resource).get(f"{ns}/{ref.get('name', '')}")
        except KeyError:  # a handle without that lister
            owner = None
        if owner is not None:
            replicas = (owner.get("spec") or {}).get("replicas", 1)  # the API's default
            return replicas if isinstance(replicas, int) and not isinstance(replicas, bool) else 1
        if division.replicas is None:
            return unschedulable(f"workload-policy {ident}: the pod's controller {ref.get('kind')} "
                                 f"{ns}/{ref.get('name')} is not known (yet) to read its replicas")
    if division.replicas is not None:
        return division.replicas
    return unresolvable(f"workload-policy {ident}: the pod has no ReplicaSet/StatefulSet/ReplicationController "
                        f"controller and spec.replicaScheduling.replicas is not set")


def _matcher(tc: TargetCluster, group_labels: Mapping[str, list[Mapping[str, str]]]) -> Callable[[str], bool]:
    return lambda g: tc.matches(g, group_labels.get(g, ()))


class _Room:
    """Pods of one request that fit per node (step 1b of the header)."""

    def __init__(self, handle: Handle, pod: PodInfo) -> None:
        views = getattr(handle, "leaf_views", None)
        self.views = views if isinstance(views, LeafViews) else None
        self.demand = Demand.of(resource_vector(pod.requests))
        self.placement = Placement.of_root_pod(pod.pod)
        self.affinity = RequiredNodeAffinity(pod.pod)
        self.tolerations = pod_tolerations(pod.pod)

    def of(self, ni: NodeInfo) -> int:
        node = ni.node
        if (node.get("spec") or {}).get("unschedulable"):
            return 0
        if not self.affinity.trivial and not self.affinity.match(node):
            return 0
        if find_untolerated(node_taints(node), self.tolerations, hard_non_leaf_taint) is not None:
            return 0
        if self.views is not None and is_leaf_node(node):
            with self.views.lock:
                view = self.views.view(ni.name)
                if view is not None:
                    return view.count(self.demand, self.placement)
        free = resource_vector(ni.allocatable)
        for k, v in resource_vector(ni.requested).items():
            free[k] = free.get(k, 0) - v
        free["pods"] = ni.allocatable.allowed_pod_number - len(ni.pods)
        return per_node(free, self.demand.amounts)


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
            all_nodes = self.handle.snapshot().node_infos()
            if policy.division is None and not policy.spread:
                st = _State(policy, count_pods(policy, ns, all_nodes))
            else:
                st, failure = self._divide(pod, policy, ns, all_nodes)
                if failure is not None:
                    return None, failure
        except PolicyError as e:
            _log.warning("pod %s: %s", pod.key, e)
            return None, error(str(e))
        _log.debug("pod %s: workload-policy %s counts %s quotas %s", pod.key, ident, st.counts,
                    st.targets if st.targets is not None else dict(policy.quotas))
        state.write(_STATE_KEY, st)
        return None, SUCCESS

    def _divide(self, pod: PodInfo, policy: WorkloadPolicy, ns: str,
                nodes: Iterable[NodeInfo]) -> tuple[_State, Status | None]:
        """Counts, room, spread and targets (steps 1a-1c of the header) in one pass over the nodes."""
        div = policy.division
        need_room = (div is not None and div.by_room) or any(c.min_groups > 1 for c in policy.spread)
        room_of = _Room(self.handle, pod) if need_room else None
        key = policy.topology_key
        counts: dict[str, int] = {}
        room: dict[str, int] = {}
        group_labels: dict[str, list[Mapping[str, str]]] = {}
        spread_used: list[set[str]] = [set() for _ in policy.spread]
        spread_room: list[set[str]] = [set() for _ in policy.spread]
        #: per topology value, the spread groups of its nodes (to restrict the division)
        spread_of: dict[str, list[set[str]]] = {}
        match = _selector(policy)
        for ni in nodes:
            lab = ni.labels
            n = _policy_pods(match, ns, ni)
            r = room_of.of(ni) if room_of is not None else 0
            value = lab.get(key)
            if value is not None:
                counts[value] = counts.get(value, 0) + n
                room[value] = room.get(value, 0) + n + r
                group_labels.setdefault(value, []).append(lab)
            for i, c in enumerate(policy.spread):
                g = lab.get(c.label)
                if g is None:
                    continue
                if n:
                    spread_used[i].add(g)
                if n or r:
                    spread_room[i].add(g)
                if value is not None:
                    spread_of.setdefault(value, [set() for _ in policy.spread])[i].add(g)
        st = _State(policy, counts)
        for i, c in enumerate(policy.spread):
            used = spread_used[i]
            allowed = set(used) if c.max_groups and len(used) >= c.max_groups else None
            if c.min_groups > 1 and len(spread_room[i]) < c.min_groups:
                return st, unschedulable(
                    f"workload-policy {policy.ident}: spreadConstraints[{c.index}] wants at least {c.min_groups} "
                    f"{c.name} group(s), {len(spread_room[i])} have room for the pod")
            st.spread.append(_Spread(c, used, allowed, c.min_groups > 1 and len(used) < c.min_groups))
        if div is None:
            return st, None
        replicas = workload_replicas(self.handle, pod, div, policy.ident)
        if isinstance(replicas, Status):
            return st, replicas
        groups = [g for g in sorted(group_labels)
                  if all(s.allowed is None or (spread_of.get(g) or [set()] * len(st.spread))[j] & s.allowed
                         for j, s in enumerate(st.spread))]
        if div.preference == AGGREGATED:
            targets = aggregated_targets(replicas, {g: room[g] for g in groups}, {g for g in groups if counts.get(g)})
        elif div.dynamic:
            targets = dynamic_targets(replicas, {g: room[g] for g in groups})
        else:
            entries = [StaticWeight(_matcher(tc, group_labels), w) for tc, w in div.static]
            targets = divide(replicas, static_weights(groups, entries))
        st.targets = targets
        return st, None

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        st: _State | None = state.get(_STATE_KEY)
        if st is None:
            return SUCCESS  # PreFilter skipped the pod
        pol = st.policy
        value = node.labels.get(pol.topology_key)
        if value is None:
            return unresolvable(f"node(s) didn't have the label {pol.topology_key!r} of workload-policy {pol.ident}")
        for s in st.spread:
            c = s.constraint
            g = node.labels.get(c.label)
            if g is None:
                return unresolvable(f"node(s) didn't have the label {c.label!r} of spreadConstraints[{c.index}] of "
                                    f"workload-policy {pol.ident}")
            if s.allowed is not None and g not in s.allowed:
                return unschedulable(f"node(s) were outside the {c.max_groups} {c.name} group(s) workload-policy "
                                     f"{pol.ident} already uses (maxGroups)")
        if pol.required and st.counts.get(value, 0) >= st.quota(value):
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
        score = workload_score(st.counts.get(value, 0), st.quota(value), st.policy.method)
        if score > 0 and any(s.prefer_new and node.labels.get(s.constraint.label) not in s.used for s in st.spread):
            return 100, SUCCESS  # a group not used yet while minGroups is not reached, its domain below quota
        return score, SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return [ClusterEvent(WORKLOAD_POLICY, a) for a in ("Add", "Update", "Delete")] + [
            ClusterEvent("Pod", "Add"), ClusterEvent("Pod", "Update"), ClusterEvent("Pod", "Delete"),
            ClusterEvent("Node", "Add"), ClusterEvent("Node", "Update"),
        ] + [ClusterEvent(kind, a) for kind in CONTROLLERS for a in ("Add", "Update")]  # replicas scaled
