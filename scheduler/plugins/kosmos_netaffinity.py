"""NetworkAffinity: place a pod near what it talks to, by the RTT the fabric measures between
clusters (issue 19, item 4). The annotation, the cluster of a node and the filter and score rules
are in :mod:`scheduler.netaffinity`; the pair table comes from the reflector's reachability
records (:mod:`scheduler.netaffinity_records`, set by ``kosmos-scheduler --reflector`` as
``handle.reachability``; without it every pair is reachable at an unknown RTT).

Per pod, in order:

1. ``pre_filter``: no ``kosmos.io/network-affinity`` annotation: SKIP (Filter and Score never
   run). An invalid one: UnschedulableAndUnresolvable with the parser's message (naming the pod,
   the annotation and the field); the pod is tried again when it changes. Else the terms, each
   term's target clusters (from the cycle's snapshot, the Services and, when the scheduler has
   one, the EndpointSlice lister), the pair table and the root's fabric cluster (``fabricCluster``
   arg, else ``handle.fabric_cluster``) go to the cycle state, computed once.
2. ``filter`` per node: every term must pass (:func:`scheduler.netaffinity.term_filter`);
   answers are memoised per cluster, so a fleet of thousands of nodes in a few clusters costs a
   few pair lookups. Rejections are Unschedulable (the network may heal), with a reason naming
   the target, so FailedScheduling counts them by target.
3. ``pre_score``/``score``/``normalize_score``: the weighted closeness of
   :func:`scheduler.netaffinity.raw_score` over the feasible nodes, scaled to 0..100 by the
   highest (upstream's DefaultNormalizeScore). A pod without weighted terms scores every node 0.

Requeue: pods it rejected move on Pod add/update/delete (a target appears or moves), Node
add/update (a virtual node's cluster), Service and EndpointSlice changes and
:data:`REACHABILITY_EVENT` (``kosmos-scheduler`` raises it when a pair's record moves).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fabric.control.reachability import PairState
from scheduler import netaffinity as na
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
    default_normalize,
    unresolvable,
    unschedulable,
)
from scheduler.netaffinity_records import Reachability

#: The cluster event ``kosmos-scheduler`` raises when the fabric's reachability records move.
REACHABILITY_EVENT = ClusterEvent("FabricReachability", "Update")


@dataclass
class _State:
    terms: list[na.Term]
    targets: list[frozenset[str]]
    pairs: Mapping[tuple[str, str], PairState]
    root: str
    #: cluster (None: unknown) -> (Status, per-term best RTT)
    memo: dict[str | None, tuple[Status, tuple[float | None, ...]]] = field(default_factory=dict)
    #: node name -> raw score, from pre_score
    scores: dict[str, int] = field(default_factory=dict)


class NetworkAffinity:
    name = "NetworkAffinity"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        self._key = "PreFilter" + self.name
        fc = args.get("fabricCluster")
        if fc is not None and (not isinstance(fc, str) or not fc or "/" in fc):
            raise ValueError(f"NetworkAffinity args.fabricCluster: a fabric cluster name, got {fc!r}")
        self.fabric_cluster: str | None = fc

    def _root(self) -> str:
        if self.fabric_cluster:
            return self.fabric_cluster
        fc = getattr(self.handle, "fabric_cluster", None)
        return fc if isinstance(fc, str) and fc else na.ROOT

    def _pairs(self) -> Mapping[tuple[str, str], PairState]:
        r = getattr(self.handle, "reachability", None)
        return r.pairs() if isinstance(r, Reachability) else {}

    def _lister(self, resource: str) -> Mapping[str, Any] | None:
        try:
            return self.handle.lister(resource)
        except (KeyError, NotImplementedError):
            return None

    def pre_filter(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> tuple[PreFilterResult | None,
                                                                                          Status]:
        try:
            terms = na.parse(pod.pod)
        except na.AnnotationError as e:
            return None, unresolvable(str(e))
        if terms is None:
            return None, SKIP
        root = self._root()
        services = self._lister("services") or {}
        slices = self._lister("endpointslices")
        infos = self.handle.snapshot().node_infos()
        targets = [na.target_clusters(t, infos, services, None if slices is None else list(slices.values()),
                                      root, pod.uid) for t in terms]
        state.write(self._key, _State(terms, targets, self._pairs(), root))
        return None, SUCCESS

    def _answer(self, st: _State, node: NodeInfo) -> tuple[Status, tuple[float | None, ...]]:
        cluster = na.node_cluster(node.node, st.root)
        got = st.memo.get(cluster)
        if got is None:
            best: list[float | None] = []
            status = SUCCESS
            for term, targets in zip(st.terms, st.targets, strict=True):
                a = na.term_filter(term, cluster, targets, st.pairs)
                if not a.passes:
                    status = unschedulable(a.reason).with_plugin(self.name)
                    break
                best.append(a.best_rtt_ms)
            got = st.memo[cluster] = (status, tuple(best))
        return got

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        st: _State | None = state.get(self._key)
        if st is None:
            return SUCCESS
        return self._answer(st, node)[0]

    def pre_score(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> Status:
        st: _State | None = state.get(self._key)
        if st is None or not any(t.weight for t in st.terms):
            return SKIP
        best = {n.name: self._answer(st, n)[1] for n in nodes}
        closeness = [na.term_closeness({k: (v[i] if i < len(v) else None) for k, v in best.items()})
                     for i in range(len(st.terms))]
        st.scores = {n: na.raw_score(st.terms, closeness, n) for n in best}
        return SUCCESS

    def score(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> tuple[int, Status]:
        st: _State | None = state.get(self._key)
        return (st.scores.get(node.name, 0) if st is not None else 0), SUCCESS

    def normalize_score(self, state: CycleState, pod: PodInfo, scores: dict[str, int]) -> Status:
        default_normalize(scores)
        return SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("Pod", "Add"), ClusterEvent("Pod", "Update"), ClusterEvent("Pod", "Delete"),
                ClusterEvent("Node", "Add"), ClusterEvent("Node", "Update"), ClusterEvent("Service", "All"),
                ClusterEvent("EndpointSlice", "All"), REACHABILITY_EVENT)
