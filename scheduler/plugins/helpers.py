"""Selectors and tolerations, compiled once and matched many times (per node, per pod).

Upstream's semantics (``apimachinery/pkg/labels``, ``component-helpers/scheduling/corev1``):

- :func:`label_selector`: a ``metav1.LabelSelector``; ``None`` selects nothing, ``{}`` selects
  everything; ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist) are ANDed;
  NotIn and DoesNotExist match objects without the label.
- :class:`NodeSelector`: ``nodeSelectorTerms`` ORed, requirements within a term ANDed; a term with
  no requirements matches nothing; operators In, NotIn, Exists, DoesNotExist, Gt, Lt (an integer
  label compared to one integer value); ``matchFields`` only on ``metadata.name``. A term that
  does not parse (Gt with two values, an unknown operator) matches nothing, as upstream's lazy
  error handling.
- :func:`tolerates`: ``ToleratesTaint`` (empty effect = any effect, empty key + Exists = any key).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from scheduler.framework import Obj

Labels = Mapping[str, str]
Matcher = Callable[[Labels], bool]


def _nothing(_labels: Labels) -> bool:
    return False


def _everything(_labels: Labels) -> bool:
    return True


def _requirement(key: str, op: str, values: Sequence[str]) -> Matcher | None:
    vs = frozenset(values)
    if op == "In":
        return lambda lb: lb.get(key) in vs
    if op == "NotIn":
        return lambda lb: lb.get(key) not in vs
    if op == "Exists":
        return lambda lb: key in lb
    if op == "DoesNotExist":
        return lambda lb: key not in lb
    return None


def _equals(key: str, val: str) -> Matcher:
    return lambda lb: lb.get(key) == val


def label_selector(sel: Obj | None) -> Matcher:
    """A ``metav1.LabelSelector`` as a predicate on a label map (``None`` -> nothing)."""
    if sel is None:
        return _nothing
    reqs: list[Matcher] = []
    for k, v in (sel.get("matchLabels") or {}).items():
        reqs.append(_equals(k, v))
    for e in sel.get("matchExpressions") or ():
        r = _requirement(e.get("key", ""), e.get("operator", ""), e.get("values") or ())
        if r is None:
            return _nothing  # an invalid selector selects nothing (LabelSelectorAsSelector error)
        reqs.append(r)
    if not reqs:
        return _everything
    if len(reqs) == 1:
        return reqs[0]
    return lambda lb: all(r(lb) for r in reqs)


def labels_selector(labels: Mapping[str, str]) -> Matcher:
    """``labels.SelectorFromSet``: every key=value present (empty map selects everything)."""
    items = tuple(labels.items())
    return lambda lb: all(lb.get(k) == v for k, v in items)


def _node_requirement(e: Obj) -> Matcher | None:
    key = e.get("key", "")
    op = e.get("operator", "")
    values = e.get("values") or []
    if op in ("Gt", "Lt"):
        if len(values) != 1:
            return None
        try:
            bound = int(values[0])
        except ValueError:
            return None

        def cmp(lb: Labels) -> bool:
            v = lb.get(key)
            if v is None:
                return False
            try:
                n = int(v)
            except ValueError:
                return False
            return n > bound if op == "Gt" else n < bound
        return cmp
    if op in ("In", "NotIn") and not values:
        return None
    if op in ("Exists", "DoesNotExist") and values:
        return None
    return _requirement(key, op, values)


class NodeSelector:
    """``v1.NodeSelector`` compiled (``nodeaffinity.NewLazyErrorNodeSelector``)."""

    __slots__ = ("terms",)

    def __init__(self, terms: Iterable[Obj]) -> None:
        self.terms: list[tuple[list[Matcher], list[Matcher]]] = []
        for t in terms:
            c = compile_term(t)
            if c is not None:
                self.terms.append(c)

    def match(self, node: Obj) -> bool:
        meta = node.get("metadata") or {}
        return self.match_labels(meta.get("labels") or {}, meta.get("name", ""))

    def match_labels(self, labels: Labels, name: str) -> bool:
        fields = {"metadata.name": name}
        return any(all(r(labels) for r in exprs) and all(f(fields) for f in fs) for exprs, fs in self.terms)


def compile_term(t: Obj) -> tuple[list[Matcher], list[Matcher]] | None:
    exprs: list[Matcher] = []
    fields: list[Matcher] = []
    me = t.get("matchExpressions") or []
    mf = t.get("matchFields") or []
    if not me and not mf:
        return None  # an empty term matches no objects
    for e in me:
        r = _node_requirement(e)
        if r is None:
            return None
        exprs.append(r)
    for e in mf:
        if e.get("key") != "metadata.name" or e.get("operator") not in ("In", "NotIn"):
            return None
        vals = e.get("values") or []
        if len(vals) != 1:  # upstream: a field requirement takes exactly one value
            return None
        r = _requirement("metadata.name", e["operator"], vals)
        assert r is not None
        fields.append(r)
    return exprs, fields


def node_selector_term_matches(term: Obj, labels: Labels, name: str) -> bool:
    """One ``NodeSelectorTerm`` (preferred scheduling terms are weighed one by one)."""
    c = compile_term(term)
    if c is None:
        return False
    fields = {"metadata.name": name}
    return all(r(labels) for r in c[0]) and all(f(fields) for f in c[1])


def tolerates(tol: Obj, taint: Obj) -> bool:
    """``Toleration.ToleratesTaint``."""
    eff = tol.get("effect") or ""
    if eff and eff != taint.get("effect"):
        return False
    key = tol.get("key") or ""
    if key and key != taint.get("key"):
        return False
    op = tol.get("operator") or "Equal"
    if op == "Exists":
        return True
    if op == "Equal":
        return (tol.get("value") or "") == (taint.get("value") or "")
    return False


def tolerated(tolerations: Sequence[Obj], taint: Obj) -> bool:
    return any(tolerates(t, taint) for t in tolerations)


def pod_tolerations(pod: Obj) -> list[Obj]:
    return list((pod.get("spec") or {}).get("tolerations") or ())


def node_taints(node: Obj) -> list[Obj]:
    return list((node.get("spec") or {}).get("taints") or ())


def find_untolerated(taints: Sequence[Obj], tolerations: Sequence[Obj],
                     effects: tuple[str, ...] = ("NoSchedule", "NoExecute")) -> Obj | None:
    """``FindMatchingUntoleratedTaint``: the first taint of ``effects`` no toleration covers."""
    for taint in taints:
        if taint.get("effect") in effects and not tolerated(tolerations, taint):
            return taint
    return None


def arg(args: Mapping[str, Any], name: str, default: Any) -> Any:
    """A pluginConfig arg with upstream's default when absent or null."""
    v = args.get(name) if args else None
    return default if v is None else v


class RequiredNodeAffinity:
    """``nodeaffinity.GetRequiredNodeAffinity``: ``spec.nodeSelector`` AND the required
    ``nodeSelectorTerms`` (what PodTopologySpread's nodeAffinityPolicy and NodeAffinity honour)."""

    __slots__ = ("node_selector", "required", "trivial")

    def __init__(self, pod: Obj) -> None:
        spec = pod.get("spec") or {}
        ns = spec.get("nodeSelector") or {}
        self.node_selector: tuple[tuple[str, str], ...] = tuple(ns.items())
        na = ((spec.get("affinity") or {}).get("nodeAffinity") or {})
        req = na.get("requiredDuringSchedulingIgnoredDuringExecution")
        self.required: NodeSelector | None = None
        if req is not None:
            self.required = NodeSelector(req.get("nodeSelectorTerms") or ())
        #: Matches every node (no nodeSelector, no required affinity): callers may skip match().
        self.trivial = not self.node_selector and self.required is None

    def match(self, node: Obj) -> bool:
        meta = node.get("metadata") or {}
        labels = meta.get("labels") or {}
        for k, v in self.node_selector:
            if labels.get(k) != v:
                return False
        if self.required is not None:
            return self.required.match_labels(labels, meta.get("name", ""))
        return True


class NodeCountCache:
    """Pods on a node that satisfy a predicate, remembered per (predicate key, node) until the
    node's ``generation`` moves (``scheduler.podutil`` draws generations from one global counter,
    as upstream's ``nextGeneration``, so a stale entry can never match).

    Why: PodTopologySpread and InterPodAffinity count matching pods over every node for every
    pod; the replicas of one workload carry the same selector, so a burst of them re-counts only
    the nodes that changed since the previous replica. At most ``max_keys`` predicates are kept
    (the oldest goes first): each costs an entry per node, so at 5,000 nodes 16 keys stay in the
    order of 10 MB."""

    def __init__(self, max_keys: int = 16) -> None:
        self.max_keys = max_keys
        self._counts: dict[str, dict[str, tuple[int, int]]] = {}

    def table(self, key: str) -> Mapping[str, tuple[int, int]]:
        """node name -> (generation, count) for ``key``, for callers that look up inline in a
        hot loop (a hit is valid only when the generation equals the node's)."""
        return self._counts.get(key) or {}

    def count(self, ni: Any, key: str | None, pred: Callable[[Obj], bool]) -> int:
        """How many pods of ``ni`` whose ``metadata`` satisfies ``pred``."""
        if key is None:
            return self._count(ni, pred)
        per = self._counts.get(key)
        if per is None:
            if len(self._counts) >= self.max_keys:
                with contextlib.suppress(RuntimeError, StopIteration):  # another thread was quicker
                    self._counts.pop(next(iter(self._counts)), None)
            per = self._counts[key] = {}
        hit = per.get(ni.name)
        if hit is not None and hit[0] == ni.generation:
            return hit[1]
        n = self._count(ni, pred)
        per[ni.name] = (ni.generation, n)
        return n

    @staticmethod
    def _count(ni: Any, pred: Callable[[Obj], bool]) -> int:
        return sum(1 for p in ni.pods if pred(p.pod["metadata"]))
