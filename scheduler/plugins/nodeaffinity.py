"""NodeAffinity (upstream ``plugins/nodeaffinity``).

PreFilter compiles ``spec.nodeSelector`` and the required ``nodeSelectorTerms`` once; when every
term pins ``metadata.name`` (``matchFields`` In) the candidates narrow to those names (an empty
intersection: ``pod affinity terms conflict``). Filter: the scheduler-enforced ``addedAffinity``
(pluginConfig) first (``node(s) didn't match scheduler-enforced node affinity``), then the pod's
own (``node(s) didn't match Pod's node affinity/selector``), both UnschedulableAndUnresolvable.

Score: the sum of the weights of the preferred terms the node matches (the pod's and the
addedAffinity's), normalized by the maximum (``DefaultNormalizeScore``).
"""

from __future__ import annotations

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
    default_normalize,
    unresolvable,
)
from scheduler.plugins.helpers import arg
from scheduler.selectors import NodeSelector, RequiredNodeAffinity, compile_term

ERR_REASON_POD = "node(s) didn't match Pod's node affinity/selector"
ERR_REASON_ENFORCED = "node(s) didn't match scheduler-enforced node affinity"
ERR_REASON_CONFLICT = "pod affinity terms conflict"

_PRE_FILTER = "PreFilterNodeAffinity"
_PRE_SCORE = "PreScoreNodeAffinity"


class PreferredTerms:
    """``nodeaffinity.PreferredSchedulingTerms``: (weight, compiled term) pairs."""

    def __init__(self, terms: Iterable[Mapping[str, Any]]) -> None:
        self.terms = []
        for t in terms:
            w = int(t.get("weight") or 0)
            if w == 0:
                continue
            c = compile_term(t.get("preference") or {})
            if c is not None:
                self.terms.append((w, c))

    def score(self, node: NodeInfo) -> int:
        labels = node.labels
        fields = {"metadata.name": node.name}
        total = 0
        for w, (exprs, fs) in self.terms:
            if all(r(labels) for r in exprs) and all(f(fields) for f in fs):
                total += w
        return total


class NodeAffinity:
    name = "NodeAffinity"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        added = arg(args, "addedAffinity", None)
        self.added_selector: NodeSelector | None = None
        self.added_preferred: PreferredTerms | None = None
        if added:
            req = added.get("requiredDuringSchedulingIgnoredDuringExecution")
            if req is not None:
                self.added_selector = NodeSelector(req.get("nodeSelectorTerms") or ())
            pref = added.get("preferredDuringSchedulingIgnoredDuringExecution")
            if pref:
                self.added_preferred = PreferredTerms(pref)

    def pre_filter(self, state: CycleState, pod: PodInfo,
                   nodes: list[NodeInfo]) -> tuple[PreFilterResult | None, Status]:
        spec = pod.pod.get("spec") or {}
        na = (spec.get("affinity") or {}).get("nodeAffinity") or {}
        required = na.get("requiredDuringSchedulingIgnoredDuringExecution")
        if required is None and self.added_selector is None and spec.get("nodeSelector") is None:
            return None, SKIP
        state.write(_PRE_FILTER, RequiredNodeAffinity(pod.pod))
        terms = (required or {}).get("nodeSelectorTerms") or []
        if not terms:
            return None, SUCCESS
        names: set[str] | None = None
        for t in terms:
            term_names: set[str] | None = None
            for r in t.get("matchFields") or ():
                if r.get("key") == "metadata.name" and r.get("operator") == "In":
                    s = set(r.get("values") or ())
                    term_names = s if term_names is None else term_names & s
            if term_names is None:
                return None, SUCCESS  # this term does not pin names; terms are ORed
            names = term_names if names is None else names | term_names
        if names is not None and not names:
            return None, unresolvable(ERR_REASON_CONFLICT).with_plugin(self.name)
        return (PreFilterResult(frozenset(names)) if names else None), SUCCESS

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        if self.added_selector is not None and not self.added_selector.match(node.node):
            return unresolvable(ERR_REASON_ENFORCED).with_plugin(self.name)
        req = state.get(_PRE_FILTER)
        if req is None:
            req = RequiredNodeAffinity(pod.pod)
        if not req.match(node.node):
            return unresolvable(ERR_REASON_POD).with_plugin(self.name)
        return SUCCESS

    def pre_score(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> Status:
        na = ((pod.pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}
        pref = na.get("preferredDuringSchedulingIgnoredDuringExecution")
        if not pref and self.added_preferred is None:
            return SKIP
        state.write(_PRE_SCORE, PreferredTerms(pref or ()))
        return SUCCESS

    def score(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> tuple[int, Status]:
        total = 0
        if self.added_preferred is not None:
            total += self.added_preferred.score(node)
        pref = state.get(_PRE_SCORE)
        if pref is None:
            na = ((pod.pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}
            pref = PreferredTerms(na.get("preferredDuringSchedulingIgnoredDuringExecution") or ())
        total += pref.score(node)
        return total, SUCCESS

    def normalize_score(self, state: CycleState, pod: PodInfo, scores: dict[str, int]) -> Status:
        default_normalize(scores)
        return SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("Node", "Add"), ClusterEvent("Node", "UpdateNodeLabel"))
