"""InterPodAffinity (upstream ``plugins/interpodaffinity``).

Terms are compiled once per pod (:func:`pod_terms`, cached on the PodInfo) into
:class:`AffinityTerm`: a label selector, the namespaces it applies to (the pod's own when neither
``namespaces`` nor ``namespaceSelector`` is given; ``namespaceSelector: {}`` means all) and the
``topologyKey``.

PreFilter counts, per topology pair (key, value):

1. ``existing``: pods already placed whose required anti-affinity terms match the incoming pod,
   at their node's value of the term's key. Those terms are kept grouped (identical terms of a
   workload's replicas together) with their pods per topology value in an
   :class:`ExistingTermIndex`, re-read only for nodes changed since the last cycle, so a cycle
   matches each distinct term once instead of every existing pod's;
2. ``affinity``: existing pods matching *all* of the incoming pod's required affinity terms;
3. ``anti``: existing pods matching each of the incoming pod's required anti-affinity terms
   (summed per topology value in a :class:`~scheduler.plugins.helpers.DomainCounts` per term,
   updated from the nodes changed since the previous pod).

Filter then is a few dict lookups per node, in upstream's order and codes:

- affinity: the node must carry every term's key and each pair must count > 0, except the first
  pod of a group: when nothing in the cluster matches and the pod matches its own terms
  (UnschedulableAndUnresolvable, ``node(s) didn't match pod affinity rules``);
- anti-affinity: no pair of the node may count > 0 (``node(s) didn't match pod anti-affinity rules``);
- existing pods' anti-affinity: no pair of the node's labels may count > 0
  (``node(s) didn't satisfy existing pods anti-affinity rules``).

Score (PreScore builds topology scores, Score sums them for the node's labels): the incoming
pod's preferred terms (+weight / -weight for anti) for each existing pod they match; existing pods'
required affinity terms matching the incoming pod (+``hardPodAffinityWeight``) and their preferred
terms (+/- weight), through a second :class:`ExistingTermIndex`. NormalizeScore maps min..max to
0..100.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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
    Snapshot,
    Status,
    unresolvable,
    unschedulable,
)
from scheduler.plugins.helpers import DomainCountsCache, NodeCountCache, arg
from scheduler.selectors import Matcher, label_selector

ERR_AFFINITY = "node(s) didn't match pod affinity rules"
ERR_ANTI_AFFINITY = "node(s) didn't match pod anti-affinity rules"
ERR_EXISTING_ANTI_AFFINITY = "node(s) didn't satisfy existing pods anti-affinity rules"

_PRE_FILTER = "PreFilterInterPodAffinity"
_PRE_SCORE = "PreScoreInterPodAffinity"
_CACHE_ATTR = "_interpodaffinity_terms"

Counts = dict[str, dict[str, int]]  # topologyKey -> value -> count


@dataclass
class AffinityTerm:
    """``framework.AffinityTerm`` (+ weight for preferred terms)."""

    topology_key: str
    namespaces: frozenset[str]
    ns_selector: Matcher | None
    selector: Matcher
    weight: int = 0
    #: What the term selects (namespaces, namespaceSelector, labelSelector), for count caches.
    key: str = ""

    def matches(self, pod: Obj, ns_labels: Mapping[str, str] | None) -> bool:
        meta = pod.get("metadata") or {}
        return self.matches_nl(meta.get("namespace", ""), meta.get("labels") or {}, ns_labels)

    def matches_nl(self, namespace: str, labels: Mapping[str, str], ns_labels: Mapping[str, str] | None) -> bool:
        """``AffinityTerm.Matches`` on a pod's namespace and labels already taken out."""
        if namespace in self.namespaces or (
                self.ns_selector is not None and ns_labels is not None and self.ns_selector(ns_labels)):
            return self.selector(labels)
        return False


def new_term(pod: Obj, term: Obj, weight: int = 0) -> AffinityTerm:
    ns_sel = term.get("namespaceSelector")
    namespaces = term.get("namespaces") or []
    if not namespaces and ns_sel is None:
        namespaces = [(pod.get("metadata") or {}).get("namespace", "")]
    key = json.dumps([sorted(namespaces), ns_sel, term.get("labelSelector")], sort_keys=True)
    return AffinityTerm(term.get("topologyKey", ""), frozenset(namespaces),
                        label_selector(ns_sel) if ns_sel is not None else None,
                        label_selector(term.get("labelSelector")), weight, key)


@dataclass
class PodTerms:
    required_affinity: list[AffinityTerm]
    required_anti: list[AffinityTerm]
    preferred_affinity: list[AffinityTerm]
    preferred_anti: list[AffinityTerm]


def pod_terms(pi: PodInfo) -> PodTerms:
    """The pod's compiled terms, cached on the PodInfo (existing pods are matched again and again)."""
    cached = pi.__dict__.get(_CACHE_ATTR)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    p = pi.pod
    pt = PodTerms([new_term(p, t) for t in pi.required_affinity],
                  [new_term(p, t) for t in pi.required_anti_affinity],
                  [new_term(p, t.get("podAffinityTerm") or {}, int(t.get("weight") or 0))
                   for t in pi.preferred_affinity],
                  [new_term(p, t.get("podAffinityTerm") or {}, int(t.get("weight") or 0))
                   for t in pi.preferred_anti_affinity])
    pi.__dict__[_CACHE_ATTR] = pt
    return pt


def _term_pred(t: AffinityTerm) -> Callable[[Obj], bool]:
    return lambda meta: t.matches_nl(meta.get("namespace", ""), meta.get("labels") or {}, None)


def _inc(counts: Counts, key: str, value: str, n: int) -> None:
    per = counts.setdefault(key, {})
    per[value] = per.get(value, 0) + n


def _matches_all(terms: list[AffinityTerm], pod: Obj) -> bool:
    """``podMatchesAllAffinityTerms`` (the incoming pod's namespaceSelectors are already merged
    into ``namespaces``, so no namespace labels are needed)."""
    if not terms:
        return False
    return all(t.matches(pod, None) for t in terms)


@dataclass
class _PreFilterState:
    terms: PodTerms
    existing: Counts
    affinity: Counts
    anti: Counts


#: One group of identical terms of existing pods: (term key, topology key, signed weight). Terms
#: with the same key select the same pods (namespaces, namespaceSelector and labelSelector are in
#: the key), so one match decides for the whole group.
GroupId = tuple[str, str, int]


class ExistingTermIndex:
    """Existing pods' terms of one kind, grouped by identical term, with the number of pods per
    topology value of their nodes; kept up to date from the nodes whose NodeInfo changed.

    Why: upstream visits every existing pod with such terms in every PreFilter/PreScore, which
    is O(pods) per cycle (10,000 replicas with anti-affinity: 10,000 term matches per pod). The
    replicas of a workload carry the same term, so grouped there are only as many matches per
    cycle as distinct terms, and a cycle re-reads only the nodes changed since the previous one
    (a NodeInfo is recognised by identity and ``generation``, which moves on every change).

    ``terms`` picks the (term, signed weight) pairs of one existing pod; ``totals`` maps a group
    to {topology value: pods}, ``term`` a group to one of its (identical) terms."""

    def __init__(self, terms: Callable[[PodInfo], Iterable[tuple[AffinityTerm, int]]]) -> None:
        self._terms = terms
        self._per_node: dict[str, tuple[NodeInfo, int, list[tuple[GroupId, str]]]] = {}
        self._cursor: tuple[int, int] | None = None
        self.totals: dict[GroupId, dict[str, int]] = {}
        self.term: dict[GroupId, AffinityTerm] = {}

    def _apply(self, contributions: list[tuple[GroupId, str]], sign: int) -> None:
        for gid, value in contributions:
            per = self.totals.setdefault(gid, {})
            n = per.get(value, 0) + sign
            if n:
                per[value] = n
            else:
                del per[value]
                if not per:
                    del self.totals[gid]
                    del self.term[gid]

    def _contributions(self, ni: NodeInfo, pods: list[PodInfo]) -> list[tuple[GroupId, str]]:
        labels = ni.labels
        out = []
        for ep in pods:
            for t, w in self._terms(ep):
                v = labels.get(t.topology_key)
                if v is not None:
                    gid = (t.key, t.topology_key, w)
                    out.append((gid, v))
                    self.term.setdefault(gid, t)
        return out

    def update(self, snap: Snapshot, nodes: list[NodeInfo], pods_of: Callable[[NodeInfo], list[PodInfo]]) -> None:
        """Bring the totals up to the snapshot: ``nodes`` are every node holding such pods
        (``pods_of`` gives them). Only the nodes changed since the last call are read when the
        snapshot keeps a change log (``changes_since``), else every node of ``nodes``."""
        since = getattr(snap, "changes_since", None)
        changed: list[str] | None = None
        if since is not None:
            changed, self._cursor = since(self._cursor)
        if changed is None:
            self._scan(nodes, pods_of)
            return
        for name in changed:
            ni = snap.get(name)
            if ni is None:
                hit = self._per_node.pop(name, None)
                if hit is not None:
                    self._apply(hit[2], -1)
            else:
                self._node(ni, pods_of)

    def _scan(self, nodes: list[NodeInfo], pods_of: Callable[[NodeInfo], list[PodInfo]]) -> None:
        per_node = self._per_node
        names = {ni.name for ni in nodes}
        for name in [n for n in per_node if n not in names]:
            self._apply(per_node.pop(name)[2], -1)
        for ni in nodes:
            self._node(ni, pods_of)

    def _node(self, ni: NodeInfo, pods_of: Callable[[NodeInfo], list[PodInfo]]) -> None:
        hit = self._per_node.get(ni.name)
        if hit is not None and hit[0] is ni and hit[1] == ni.generation:
            return
        if hit is not None:
            self._apply(hit[2], -1)
        contrib = self._contributions(ni, pods_of(ni))
        self._apply(contrib, 1)
        if contrib:
            self._per_node[ni.name] = (ni, ni.generation, contrib)
        else:
            self._per_node.pop(ni.name, None)


def _required_anti(ep: PodInfo) -> list[tuple[AffinityTerm, int]]:
    return [(t, 1) for t in pod_terms(ep).required_anti]


def _term_contribution(cache: NodeCountCache, topology_key: str, key: str, pred: Callable[[Obj], bool]
                       ) -> Callable[[NodeInfo], tuple[str, int] | None]:
    """A node's (value of ``topology_key``, pods matching the term) for a DomainCounts; None for
    a node without the key."""

    def contribute(ni: NodeInfo) -> tuple[str, int] | None:
        v = (ni.node["metadata"].get("labels") or {}).get(topology_key)
        return None if v is None else (v, cache.count(ni, key, pred))
    return contribute


def _pods_with_required_anti(ni: NodeInfo) -> list[PodInfo]:
    return ni.pods_with_required_anti_affinity


def _pods_with_affinity(ni: NodeInfo) -> list[PodInfo]:
    return ni.pods_with_affinity


class InterPodAffinity:
    name = "InterPodAffinity"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        self.hard_weight = int(arg(args, "hardPodAffinityWeight", 1))
        if not 0 <= self.hard_weight <= 100:
            raise ValueError(f"InterPodAffinityArgs.hardPodAffinityWeight {self.hard_weight} is not in 0..100")
        self.ignore_existing_preferred = bool(arg(args, "ignorePreferredTermsOfExistingPods", False))
        #: Per-node counts of pods matching the incoming pods' terms (replicas share terms).
        self._cache = NodeCountCache()
        #: Per (incoming term's count key, topology key): pods matching it per topology value.
        self._domains = DomainCountsCache()
        #: Existing pods' required anti-affinity terms (PreFilter) and the terms by which they
        #: score the incoming pod (PreScore: required affinity at hardPodAffinityWeight,
        #: preferred affinity/anti-affinity at +/- their weight).
        self._existing_anti = ExistingTermIndex(_required_anti)
        self._existing_scoring = ExistingTermIndex(self._scoring_terms)

    def _scoring_terms(self, ep: PodInfo) -> list[tuple[AffinityTerm, int]]:
        et = pod_terms(ep)
        out = [(t, self.hard_weight) for t in et.required_affinity] if self.hard_weight > 0 else []
        return out + [(t, t.weight) for t in et.preferred_affinity] + [(t, -t.weight) for t in et.preferred_anti]

    # -- namespaces -----------------------------------------------------------------------
    def _namespaces(self) -> Mapping[str, Obj]:
        try:
            return self.handle.lister("namespaces")
        except KeyError:
            return {}

    def _ns_labels(self, ns: str) -> Mapping[str, str]:
        lister = self._namespaces()
        obj = lister.get(ns)
        return ((obj or {}).get("metadata") or {}).get("labels") or {}

    def _merge_namespaces(self, terms: list[AffinityTerm]) -> list[AffinityTerm]:
        """``mergeAffinityTermNamespacesIfNotEmpty``: resolve the incoming pod's namespaceSelector
        to names now, so matching existing pods needs no namespace labels."""
        if not any(t.ns_selector is not None for t in terms):
            return terms
        all_ns = [((o.get("metadata") or {}).get("name", ""), ((o.get("metadata") or {}).get("labels") or {}))
                  for o in self._namespaces().values()]
        out = []
        for t in terms:
            if t.ns_selector is None:
                out.append(t)
                continue
            sel = t.ns_selector
            names = set(t.namespaces) | {n for n, lb in all_ns if sel(lb)}
            key = json.dumps([sorted(names), None, json.loads(t.key)[2]], sort_keys=True)
            out.append(AffinityTerm(t.topology_key, frozenset(names), None, t.selector, t.weight, key))
        return out

    def _incoming_terms(self, pod: PodInfo) -> PodTerms:
        pt = pod_terms(pod)
        return PodTerms(self._merge_namespaces(pt.required_affinity), self._merge_namespaces(pt.required_anti),
                        self._merge_namespaces(pt.preferred_affinity), self._merge_namespaces(pt.preferred_anti))

    # -- filter ---------------------------------------------------------------------------
    def pre_filter(self, state: CycleState, pod: PodInfo,
                   nodes: list[NodeInfo]) -> tuple[PreFilterResult | None, Status]:
        snap = self.handle.snapshot()
        with_anti = snap.have_pods_with_required_anti_affinity()
        if not pod.required_affinity and not pod.required_anti_affinity and not with_anti:
            return None, SKIP
        terms = self._incoming_terms(pod)
        incoming = pod.pod
        ns_labels = self._ns_labels((incoming.get("metadata") or {}).get("namespace", ""))
        existing: Counts = {}
        index = self._existing_anti
        index.update(snap, with_anti, _pods_with_required_anti)
        for gid, per in index.totals.items():
            if index.term[gid].matches(incoming, ns_labels):
                for value, n in per.items():
                    _inc(existing, gid[1], value, n)
        affinity: Counts = {}
        anti: Counts = {}
        req_aff, req_anti = terms.required_affinity, terms.required_anti
        aff_key = "all" + json.dumps([t.key for t in req_aff])

        def aff_pred(meta: Obj) -> bool:
            ns, plabels = meta.get("namespace", ""), meta.get("labels") or {}
            return all(t.matches_nl(ns, plabels, None) for t in req_aff)

        if req_aff or req_anti:
            cache = self._cache
            aff_keys = [t.topology_key for t in req_aff]
            # per anti-affinity term, resolved once: its count key, predicate and cached table
            anti_plan = [(t.topology_key, "anti" + t.key, _term_pred(t)) for t in req_anti]
            # An anti-affinity term's sums per topology value come from a DomainCounts kept up to
            # date from the snapshot's change log (when filtering the whole snapshot); what is
            # left is counted node by node.
            whole = nodes is snap.node_infos()
            loop_anti = []
            for tk, key, pred in anti_plan:
                dc = self._domains.get((key, tk)) if whole else None
                if dc is not None and dc.update(snap, _term_contribution(cache, tk, key, pred)):
                    for value, t in dc.totals.items():
                        if t[1]:
                            _inc(anti, tk, value, t[1])
                else:
                    loop_anti.append((tk, key, pred))
            anti_plan_t = [(tk, key, pred, cache.table(key)) for tk, key, pred in loop_anti]
            aff_table = cache.table(aff_key) if req_aff else {}
            for ni in nodes if req_aff or anti_plan_t else ():
                labels = ni.node["metadata"].get("labels") or {}
                name, gen = ni.name, ni.generation
                if aff_keys and any(k in labels for k in aff_keys):
                    hit = aff_table.get(name)
                    n = hit[1] if hit is not None and hit[0] == gen else cache.count(ni, aff_key, aff_pred)
                    if n:
                        for k in aff_keys:
                            if k in labels:
                                _inc(affinity, k, labels[k], n)
                for tk, key, pred, table in anti_plan_t:
                    v = labels.get(tk)
                    if v is None:
                        continue
                    hit = table.get(name)
                    n = hit[1] if hit is not None and hit[0] == gen else cache.count(ni, key, pred)
                    if n:
                        _inc(anti, tk, v, n)
        state.write(_PRE_FILTER, _PreFilterState(terms, existing, affinity, anti))
        return None, SUCCESS

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        fn = self.filter_fn(state, pod)
        return SUCCESS if fn is None else fn(node)

    def filter_fn(self, state: CycleState, pod: PodInfo) -> Callable[[NodeInfo], Status] | None:
        """Filter for this pod, the PreFilter counts looked up once per term (upstream's order:
        affinity, the pod's anti-affinity, existing pods' anti-affinity)."""
        s: _PreFilterState | None = state.get(_PRE_FILTER)
        if s is None:
            return None  # PreFilter skipped: nothing constrains this pod
        with_affinity = bool(s.terms.required_affinity)
        anti = [(t.topology_key, s.anti.get(t.topology_key, {})) for t in s.terms.required_anti]
        existing = [(key, per) for key, per in s.existing.items() if per]
        no_affinity = unresolvable(ERR_AFFINITY).with_plugin(self.name)
        anti_st = unschedulable(ERR_ANTI_AFFINITY).with_plugin(self.name)
        existing_st = unschedulable(ERR_EXISTING_ANTI_AFFINITY).with_plugin(self.name)
        satisfy = self._satisfy_affinity

        def f(node: NodeInfo) -> Status:
            labels = node.node["metadata"].get("labels") or {}
            if with_affinity and not satisfy(s, pod, labels):
                return no_affinity
            for key, per in anti:
                v = labels.get(key)
                if v is not None and per.get(v, 0) > 0:
                    return anti_st
            for key, per in existing:
                v = labels.get(key)
                if v is not None and per.get(v, 0) > 0:
                    return existing_st
            return SUCCESS
        return f

    @staticmethod
    def _satisfy_affinity(s: _PreFilterState, pod: PodInfo, labels: Mapping[str, str]) -> bool:
        pods_exist = True
        for t in s.terms.required_affinity:
            v = labels.get(t.topology_key)
            if v is None:
                return False  # every topology key must be on the node
            if s.affinity.get(t.topology_key, {}).get(v, 0) <= 0:
                pods_exist = False
        if pods_exist:
            return True
        # The first pod of a group with affinity to itself: nothing matches anywhere yet.
        return not s.affinity and _matches_all(s.terms.required_affinity, pod.pod)

    # -- score ----------------------------------------------------------------------------
    def pre_score(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> Status:
        if not nodes:
            return SKIP
        has_constraints = bool(pod.preferred_affinity or pod.preferred_anti_affinity)
        if self.ignore_existing_preferred and not has_constraints:
            return SKIP
        snap = self.handle.snapshot()
        terms = self._incoming_terms(pod)
        incoming = pod.pod
        ns_labels = self._ns_labels((incoming.get("metadata") or {}).get("namespace", ""))
        scores: Counts = {}
        # The incoming pod's preferred terms, over every labelled node: counted per node (cached
        # across replicas), weighed once per node.
        if has_constraints:
            preferred = [(t, 1, _term_pred(t)) for t in terms.preferred_affinity] + \
                        [(t, -1, _term_pred(t)) for t in terms.preferred_anti]
            for ni in snap.node_infos():
                labels = ni.labels
                if not labels:
                    continue
                for t, sign, pred in preferred:
                    if t.topology_key in labels:
                        n = self._cache.count(ni, "pref" + t.key, pred)
                        if n:
                            _inc(scores, t.topology_key, labels[t.topology_key], sign * t.weight * n)
        # Existing pods' terms about the incoming pod (only pods with affinity have any), one
        # match per group of identical terms, weighed by the pods per topology value.
        index = self._existing_scoring
        index.update(snap, snap.have_pods_with_affinity(), _pods_with_affinity)
        for gid, per in index.totals.items():
            if index.term[gid].matches(incoming, ns_labels):
                key, weight = gid[1], gid[2]
                for v, n in per.items():
                    _inc(scores, key, v, weight * n)
        scores = {k: {v: n for v, n in per.items()} for k, per in scores.items() if per}
        if not scores:
            return SKIP
        state.write(_PRE_SCORE, scores)
        return SUCCESS

    def score(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> tuple[int, Status]:
        scores: Counts | None = state.get(_PRE_SCORE)
        if not scores:
            return 0, SUCCESS
        labels = node.labels
        total = 0
        for key, per in scores.items():
            v = labels.get(key)
            if v is not None:
                total += per.get(v, 0)
        return total, SUCCESS

    def normalize_score(self, state: CycleState, pod: PodInfo, scores: dict[str, int]) -> Status:
        if not state.get(_PRE_SCORE) or not scores:
            return SUCCESS
        lo = min(scores.values())
        hi = max(scores.values())
        diff = hi - lo
        for k, v in scores.items():
            scores[k] = int(MAX_NODE_SCORE * ((v - lo) / diff)) if diff > 0 else 0
        return SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("Pod", "All"), ClusterEvent("Node", "Add"), ClusterEvent("Node", "UpdateNodeLabel"))
