"""PodTopologySpread (upstream ``plugins/podtopologyspread``).

Constraints come from ``spec.topologySpreadConstraints``; a pod with none gets the cluster-level
defaults (``defaultingType: System``: hostname maxSkew 3 and zone maxSkew 5, both ScheduleAnyway,
or the ``defaultConstraints`` of ``defaultingType: List``) with a selector built from the
Services, ReplicaSets, StatefulSets and ReplicationControllers that select it
(``helper.DefaultSelector``); a pod nothing selects gets no default constraint. ``matchLabelKeys``
adds ``key in (pod's value)`` to the selector. ``minDomains`` defaults to 1,
``nodeAffinityPolicy`` to Honor and ``nodeTaintsPolicy`` to Ignore.

PreFilter (DoNotSchedule constraints): over every node that carries all the constraints' keys and
passes the inclusion policies, count the matching pods (same namespace, not terminating) per
topology value, and keep each constraint's global minimum (0 when there are fewer domains than
``minDomains``). A constraint no inclusion policy can narrow for this pod keeps those sums in a
:class:`~scheduler.plugins.helpers.DomainCounts` per selector, updated from the nodes changed
since the previous pod (the snapshot's change log) instead of visiting every node per pod.
Filter per node is then O(constraints): a node without the key is
UnschedulableAndUnresolvable (``... (missing required label)``); otherwise
``count[value] + selfMatch - min > maxSkew`` is Unschedulable
(``node(s) didn't match pod topology spread constraints``).

Score (ScheduleAnyway constraints): per constraint ``count * log(domains + 2) + maxSkew - 1``
summed (hostname counts are taken per node in Score), then normalized so the least loaded node
gets 100: ``100 * (max + min - s) / max``. Nodes missing a key (non-default constraints) score 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scheduler.framework import (
    MAX_NODE_SCORE,
    SKIP,
    SUCCESS,
    ClusterEvent,
    CycleState,
    Handle,
    NodeInfo,
    Obj,
    PodInfo,
    PreFilterResult,
    Status,
    unresolvable,
    unschedulable,
)
from scheduler.plugins.helpers import DomainCountsCache, NodeCountCache, arg
from scheduler.selectors import (
    Matcher,
    RequiredNodeAffinity,
    find_untolerated,
    label_selector,
    labels_selector,
    pod_tolerations,
)

ERR_CONSTRAINTS = "node(s) didn't match pod topology spread constraints"
ERR_NODE_LABEL = ERR_CONSTRAINTS + " (missing required label)"

LABEL_HOSTNAME = "kubernetes.io/hostname"
LABEL_ZONE = "topology.kubernetes.io/zone"

SYSTEM_DEFAULT_CONSTRAINTS: list[Obj] = [
    {"topologyKey": LABEL_HOSTNAME, "whenUnsatisfiable": "ScheduleAnyway", "maxSkew": 3},
    {"topologyKey": LABEL_ZONE, "whenUnsatisfiable": "ScheduleAnyway", "maxSkew": 5},
]

_PRE_FILTER = "PreFilterPodTopologySpread"
#: How many distinct (namespace, selector) count caches to keep (oldest dropped first).
_COUNT_CACHE_SELECTORS = 16
_PRE_SCORE = "PreScorePodTopologySpread"


@dataclass
class Constraint:
    max_skew: int
    topology_key: str
    selector: Matcher
    min_domains: int = 1
    honor_affinity: bool = True
    honor_taints: bool = False
    #: Identifies (namespace, selector) for the per-node count cache; None: not cacheable.
    cache_key: str | None = None

    def includes(self, node: Obj, affinity: RequiredNodeAffinity, tolerations: list[Obj]) -> bool:
        """``matchNodeInclusionPolicies``."""
        if self.honor_affinity and not affinity.match(node):
            return False
        if self.honor_taints:
            taints = (node.get("spec") or {}).get("taints") or ()
            if find_untolerated(taints, tolerations) is not None:
                return False
        return True


def _and(a: Matcher, b: Matcher) -> Matcher:
    return lambda lb: a(lb) and b(lb)


def count_matching(pods: list[PodInfo], selector: Matcher, namespace: str) -> int:
    """``countPodsMatchSelector``: same namespace, not terminating, labels selected."""
    n = 0
    for p in pods:
        meta = p.pod.get("metadata") or {}
        if meta.get("deletionTimestamp") or meta.get("namespace", "") != namespace:
            continue
        if selector(meta.get("labels") or {}):
            n += 1
    return n


def _has_all_keys(labels: Mapping[str, str], constraints: list[Constraint]) -> bool:
    return all(c.topology_key in labels for c in constraints)


@dataclass
class _FilterState:
    constraints: list[Constraint]
    counts: list[dict[str, int]]
    minimum: list[int]
    self_match: list[int]


@dataclass
class _ScoreState:
    constraints: list[Constraint]
    counts: list[dict[str, int]]
    weights: list[float]
    ignored: set[str] = field(default_factory=set)


class PodTopologySpread:
    name = "PodTopologySpread"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        self._counts = NodeCountCache(_COUNT_CACHE_SELECTORS)
        #: PreFilter's per-domain sums per (selector key, topology key, the pod's keys).
        self._domains = DomainCountsCache(_COUNT_CACHE_SELECTORS)
        defaulting = arg(args, "defaultingType", "System")
        if defaulting == "System":
            self.default_constraints = SYSTEM_DEFAULT_CONSTRAINTS
            self.system_defaulted = True
        elif defaulting == "List":
            self.default_constraints = list(arg(args, "defaultConstraints", []))
            self.system_defaulted = False
            for c in self.default_constraints:
                if c.get("labelSelector") is not None:
                    raise ValueError("PodTopologySpreadArgs.defaultConstraints[].labelSelector must not be set")
        else:
            raise ValueError(f"PodTopologySpreadArgs.defaultingType {defaulting!r} is not System or List")

    # -- constraints ----------------------------------------------------------------------
    def _parse(self, raw: Iterable[Obj], pod_labels: Mapping[str, str], action: str, namespace: str,
               selector: Matcher | None = None, selector_key: str | None = None) -> list[Constraint]:
        out = []
        for c in raw:
            if (c.get("whenUnsatisfiable") or "DoNotSchedule") != action:
                continue
            sel = selector if selector is not None else label_selector(c.get("labelSelector"))
            keys = {k: pod_labels[k] for k in c.get("matchLabelKeys") or () if k in pod_labels}
            if keys:
                sel = _and(sel, labels_selector(keys))
            md = c.get("minDomains")
            # what the selector selects, the same for every replica of a workload: the count key
            if selector is None:
                cache_key: str | None = json.dumps([namespace, c.get("labelSelector"), keys], sort_keys=True)
            else:
                cache_key = None if selector_key is None else json.dumps([selector_key, keys], sort_keys=True)
            out.append(Constraint(int(c.get("maxSkew") or 1), c.get("topologyKey", ""), sel,
                                  int(md) if md is not None else 1,
                                  (c.get("nodeAffinityPolicy") or "Honor") == "Honor",
                                  (c.get("nodeTaintsPolicy") or "Ignore") == "Honor", cache_key))
        return out

    def _count(self, ni: NodeInfo, c: Constraint, namespace: str) -> int:
        """Matching pods on the node (``countPodsMatchSelector``), cached per selector and node
        generation when the selector is the pod's own (see :class:`NodeCountCache`)."""
        if c.cache_key is None:
            return count_matching(ni.pods, c.selector, namespace)
        sel = c.selector

        def pred(meta: Obj) -> bool:
            return (not meta.get("deletionTimestamp") and meta.get("namespace", "") == namespace
                    and sel(meta.get("labels") or {}))
        return self._counts.count(ni, c.cache_key, pred)

    def _contribution(self, c: Constraint, key: str, keys: tuple[str, ...], namespace: str
                      ) -> Callable[[NodeInfo], tuple[str, int] | None]:
        """A node's (domain, matching pods) for the PreFilter counts of ``c``; None when the node
        lacks one of the pod's constraints' keys (it counts in no domain)."""

        def contribute(ni: NodeInfo) -> tuple[str, int] | None:
            labels = ni.node["metadata"].get("labels") or {}
            if not all(k in labels for k in keys):
                return None
            return labels[key], self._count(ni, c, namespace)
        return contribute

    def constraints(self, pod: Obj, action: str) -> list[Constraint]:
        spec = pod.get("spec") or {}
        labels = (pod.get("metadata") or {}).get("labels") or {}
        ns = (pod.get("metadata") or {}).get("namespace", "")
        if spec.get("topologySpreadConstraints"):
            return self._parse(spec["topologySpreadConstraints"], labels, action, ns)
        if not any((c.get("whenUnsatisfiable") or "DoNotSchedule") == action for c in self.default_constraints):
            return []
        found = self.default_selector(pod)
        if found is None:
            return []
        return self._parse(self.default_constraints, labels, action, ns, found[0], found[1])

    def _list(self, resource: str) -> Mapping[str, Obj]:
        try:
            return self.handle.lister(resource)
        except KeyError:
            return {}

    def default_selector(self, pod: Obj) -> tuple[Matcher, str] | None:
        """``helper.DefaultSelector``: the Services' selectors merged, AND the controller's
        (ReplicationController/ReplicaSet/StatefulSet) selector; None when nothing selects. With
        it a key naming what it selects (the replicas of a workload share it: count caches)."""
        meta = pod.get("metadata") or {}
        ns = meta.get("namespace", "")
        labels = meta.get("labels") or {}
        merged: dict[str, str] = {}
        for svc in self._list("services").values():
            smeta = svc.get("metadata") or {}
            sel = (svc.get("spec") or {}).get("selector")
            if smeta.get("namespace") != ns or not sel:
                continue
            if all(labels.get(k) == v for k, v in sel.items()):
                merged.update(sel)
        matchers: list[Matcher] = []
        parts: list[Any] = [ns, dict(merged)]
        if merged:
            matchers.append(labels_selector(merged))
        owner = next((o for o in meta.get("ownerReferences") or () if o.get("controller")), None)
        if owner is not None:
            group = owner.get("apiVersion", "").rpartition("/")[0]
            kind = owner.get("kind")
            key = f"{ns}/{owner.get('name', '')}"
            if kind == "ReplicationController" and group == "":
                rc = self._list("replicationcontrollers").get(key)
                sel = ((rc or {}).get("spec") or {}).get("selector")
                if sel:
                    merged.update(sel)
                    matchers = [labels_selector(merged)]
                    parts.append(["rc", sel])
            elif (kind, group) in (("ReplicaSet", "apps"), ("StatefulSet", "apps")):
                obj = self._list("replicasets" if kind == "ReplicaSet" else "statefulsets").get(key)
                sel = ((obj or {}).get("spec") or {}).get("selector")
                if sel and (sel.get("matchLabels") or sel.get("matchExpressions")):
                    matchers.append(label_selector(sel))
                    parts.append(["set", sel])
        if not matchers:
            return None
        key = "default" + json.dumps(parts, sort_keys=True)
        if len(matchers) == 1:
            return matchers[0], key
        first, second = matchers[0], matchers[1]
        return _and(first, second), key

    # -- filter ---------------------------------------------------------------------------
    def pre_filter(self, state: CycleState, pod: PodInfo,
                   nodes: list[NodeInfo]) -> tuple[PreFilterResult | None, Status]:
        constraints = self.constraints(pod.pod, "DoNotSchedule")
        if not constraints:
            return None, SKIP
        meta = pod.pod.get("metadata") or {}
        ns = meta.get("namespace", "")
        pod_labels = meta.get("labels") or {}
        affinity = RequiredNodeAffinity(pod.pod)
        tolerations = pod_tolerations(pod.pod)
        counts: list[dict[str, int]] = [{} for _ in constraints]
        # The hot loop (every node, every pod with constraints): per constraint, whether the
        # inclusion policies can exclude anything, and its count table, resolved once.
        plan = [(i, c.topology_key, c, (c.honor_affinity and not affinity.trivial) or c.honor_taints,
                 self._counts.table(c.cache_key) if c.cache_key is not None else None)
                for i, c in enumerate(constraints)]
        keys = [c.topology_key for c in constraints]
        # A constraint whose count does not depend on the incoming pod's node inclusion (no
        # policy to check) and whose selector is keyed takes its sums from a DomainCounts kept
        # up to date from the snapshot's change log; the others are counted node by node.
        snap = self.handle.snapshot()
        whole = nodes is snap.node_infos()
        keys_t = tuple(sorted(set(keys)))
        loop_plan = []
        for i, key, c, check, table in plan:
            if whole and not check and c.cache_key is not None:
                dc = self._domains.get((c.cache_key, key, keys_t))
                if dc.update(snap, self._contribution(c, key, keys_t, ns)):
                    counts[i] = {v: t[1] for v, t in dc.totals.items()}
                    continue
            loop_plan.append((i, key, c, check, table))
        for ni in nodes if loop_plan else ():
            labels = ni.node["metadata"].get("labels") or {}
            if not all(k in labels for k in keys):
                continue
            for i, key, c, check, table in loop_plan:
                if check and not c.includes(ni.node, affinity, tolerations):
                    continue
                hit = table.get(ni.name) if table is not None else None
                n = hit[1] if hit is not None and hit[0] == ni.generation else self._count(ni, c, ns)
                v = labels[key]
                counts[i][v] = counts[i].get(v, 0) + n
        minimum = []
        for i, c in enumerate(constraints):
            m = min(counts[i].values()) if counts[i] else 0
            if len(counts[i]) < c.min_domains:
                m = 0
            minimum.append(m)
        self_match = [1 if c.selector(pod_labels) else 0 for c in constraints]
        state.write(_PRE_FILTER, _FilterState(constraints, counts, minimum, self_match))
        return None, SUCCESS

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        fn = self.filter_fn(state, pod)
        return SUCCESS if fn is None else fn(node)

    def filter_fn(self, state: CycleState, pod: PodInfo) -> Callable[[NodeInfo], Status] | None:
        """Filter for this pod: per constraint (key, counts, the count a node may have at most
        = minimum + maxSkew - selfMatch), read once from the PreFilter state."""
        s: _FilterState | None = state.get(_PRE_FILTER)
        if s is None:
            return None
        plan = [(c.topology_key, s.counts[i], s.minimum[i] + c.max_skew - s.self_match[i])
                for i, c in enumerate(s.constraints)]
        no_label = unresolvable(ERR_NODE_LABEL).with_plugin(self.name)
        skewed = unschedulable(ERR_CONSTRAINTS).with_plugin(self.name)

        def f(node: NodeInfo) -> Status:
            labels = node.node["metadata"].get("labels") or {}
            for key, counts, most in plan:
                v = labels.get(key)
                if v is None:
                    return no_label
                if counts.get(v, 0) > most:
                    return skewed
            return SUCCESS
        return f

    # -- score ----------------------------------------------------------------------------
    def pre_score(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> Status:
        all_nodes = self.handle.snapshot().node_infos()
        if not nodes or not all_nodes:
            return SKIP
        constraints = self.constraints(pod.pod, "ScheduleAnyway")
        if not constraints:
            return SKIP
        spec = pod.pod.get("spec") or {}
        require_all = bool(spec.get("topologySpreadConstraints")) or not self.system_defaulted
        s = _ScoreState(constraints, [{} for _ in constraints], [])
        sizes = [0] * len(constraints)
        for ni in nodes:
            labels = ni.labels
            if require_all and not _has_all_keys(labels, constraints):
                s.ignored.add(ni.name)
                continue
            for i, c in enumerate(constraints):
                if c.topology_key == LABEL_HOSTNAME:
                    continue
                v = labels.get(c.topology_key, "")
                if v not in s.counts[i]:
                    s.counts[i][v] = 0
                    sizes[i] += 1
        for i, c in enumerate(constraints):
            size = len(nodes) - len(s.ignored) if c.topology_key == LABEL_HOSTNAME else sizes[i]
            s.weights.append(math.log(size + 2))
        ns = (pod.pod.get("metadata") or {}).get("namespace", "")
        affinity = RequiredNodeAffinity(pod.pod)
        tolerations = pod_tolerations(pod.pod)
        for ni in all_nodes:
            labels = ni.labels
            if require_all and not _has_all_keys(labels, constraints):
                continue
            for i, c in enumerate(constraints):
                if c.topology_key == LABEL_HOSTNAME or not c.includes(ni.node, affinity, tolerations):
                    continue
                v = labels.get(c.topology_key, "")
                if v in s.counts[i]:
                    s.counts[i][v] += self._count(ni, c, ns)
        state.write(_PRE_SCORE, s)
        return SUCCESS

    def score(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> tuple[int, Status]:
        s: _ScoreState | None = state.get(_PRE_SCORE)
        if s is None or node.name in s.ignored:
            return 0, SUCCESS
        labels = node.labels
        ns = (pod.pod.get("metadata") or {}).get("namespace", "")
        total = 0.0
        for i, c in enumerate(s.constraints):
            v = labels.get(c.topology_key)
            if v is None:
                continue
            cnt = self._count(node, c, ns) if c.topology_key == LABEL_HOSTNAME else s.counts[i].get(v, 0)
            total += cnt * s.weights[i] + (c.max_skew - 1)
        return math.floor(total + 0.5), SUCCESS

    def normalize_score(self, state: CycleState, pod: PodInfo, scores: dict[str, int]) -> Status:
        s: _ScoreState | None = state.get(_PRE_SCORE)
        if s is None:
            return SUCCESS
        valid = {k: v for k, v in scores.items() if k not in s.ignored}
        lo = min(valid.values(), default=0)
        hi = max(valid.values(), default=0)
        for k in scores:
            if k in s.ignored:
                scores[k] = 0
            elif hi == 0:
                scores[k] = MAX_NODE_SCORE
            else:
                scores[k] = MAX_NODE_SCORE * (hi + lo - scores[k]) // hi
        return SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("Pod", "All"), ClusterEvent("Node", "Add"), ClusterEvent("Node", "Delete"),
                ClusterEvent("Node", "UpdateNodeLabel"), ClusterEvent("Node", "UpdateNodeTaint"))
