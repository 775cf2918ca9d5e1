"""Label selectors, node selectors and tolerations: compiled once, matched many times (per node,
per pod). The one implementation the upstream plugins (``scheduler.plugins``) and the Kosmos
policies (:mod:`scheduler.policy`) share.

Upstream's semantics (``apimachinery/pkg/labels``, ``component-helpers/scheduling/corev1``):

- :func:`label_selector`: a ``metav1.LabelSelector``; ``None`` selects nothing, ``{}`` selects
  everything; ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist) are ANDed;
  NotIn and DoesNotExist match objects without the label.
- :class:`NodeSelector`: ``nodeSelectorTerms`` ORed, requirements within a term ANDed; a term with
  no requirements matches nothing; operators In, NotIn, Exists, DoesNotExist, Gt, Lt (an integer
  label compared to one integer value); ``matchFields`` only on ``metadata.name``.
- Malformed requirements (In without values, Exists with values, Gt with two values, an unknown
  operator): by default the selector (or the term) matches nothing, as upstream's lazy error
  handling in the scheduler's hot paths; with ``where=...`` compilation raises
  :class:`SelectorError` naming the field instead (what the Kosmos policies report to the user).
- :func:`tolerates`: ``ToleratesTaint`` (empty effect = any effect, empty key + Exists = any key);
  :func:`find_untolerated`: ``FindMatchingUntoleratedTaint`` over the taints a filter selects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from scheduler.framework import Obj


class SelectorError(ValueError):
    """A malformed selector requirement, compiled with ``where``: the message names the field."""


Labels = Mapping[str, str]
Matcher = Callable[[Labels], bool]


def _nothing(_labels: Labels) -> bool:
    return False


def _everything(_labels: Labels) -> bool:
    return True


def _bad(where: str | None, message: str) -> None:
    """A malformed requirement: raise naming ``where`` when strict; else the caller returns None
    (matches nothing)."""
    if where is not None:
        raise SelectorError(f"{where}: {message}")


def _requirement(req: Mapping[str, Any], where: str | None, numeric: bool = False) -> Matcher | None:
    """One ``matchExpressions`` requirement (``numeric``: a node selector, Gt/Lt allowed); None
    (or SelectorError with ``where``) when it does not parse."""
    key = req.get("key", "")
    op = req.get("operator", "")
    values = list(req.get("values") or ())
    if op in ("In", "NotIn"):
        if not values:
            _bad(where, f"operator {op!r} of key {key!r} needs values")
            return None
        vs = frozenset(values)
        if op == "In":
            return lambda lb: lb.get(key) in vs
        return lambda lb: lb.get(key) not in vs
    if op in ("Exists", "DoesNotExist"):
        if values:
            _bad(where, f"operator {op!r} of key {key!r} takes no values (got {values})")
            return None
        if op == "Exists":
            return lambda lb: key in lb
        return lambda lb: key not in lb
    if numeric and op in ("Gt", "Lt"):
        if len(values) != 1:
            _bad(where, f"operator {op} of key {key!r} needs exactly one value")
            return None
        try:
            bound = int(values[0])
        except ValueError:
            _bad(where, f"operator {op} of key {key!r}: {values[0]!r} is not an integer")
            return None
        gt = op == "Gt"

        def cmp(lb: Labels) -> bool:
            v = lb.get(key)
            if v is None:
                return False
            try:
                n = int(v)
            except ValueError:
                return False  # upstream: a non-integer label never matches
            return n > bound if gt else n < bound
        return cmp
    ops = "In, NotIn, Exists, DoesNotExist, Gt, Lt" if numeric else "In, NotIn, Exists, DoesNotExist"
    _bad(where, f"unsupported operator {op!r} ({ops})")
    return None


def _equals(key: str, val: str) -> Matcher:
    return lambda lb: lb.get(key) == val


def label_selector(sel: Mapping[str, Any] | None, where: str | None = None) -> Matcher:
    """A ``metav1.LabelSelector`` as a predicate on a label map (``None`` -> nothing). A
    malformed one selects nothing (``LabelSelectorAsSelector`` fails), or raises
    :class:`SelectorError` naming ``where`` when given."""
    if sel is None:
        return _nothing
    reqs: list[Matcher] = []
    for k, v in (sel.get("matchLabels") or {}).items():
        reqs.append(_equals(k, v))
    for i, e in enumerate(sel.get("matchExpressions") or ()):
        r = _requirement(e, None if where is None else f"{where}.matchExpressions[{i}]")
        if r is None:
            return _nothing
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


class NodeSelector:
    """``v1.NodeSelector`` compiled (``nodeaffinity.NewLazyErrorNodeSelector``; with ``where`` a
    malformed term raises :class:`SelectorError` instead of matching nothing)."""

    __slots__ = ("terms",)

    def __init__(self, terms: Iterable[Obj], where: str | None = None) -> None:
        self.terms: list[tuple[list[Matcher], list[Matcher]]] = []
        for t, term in enumerate(terms):
            c = compile_term(term, None if where is None else f"{where}.nodeSelectorTerms[{t}]")
            if c is not None:
                self.terms.append(c)

    def match(self, node: Mapping[str, Any]) -> bool:
        meta = node.get("metadata") or {}
        return self.match_labels(meta.get("labels") or {}, meta.get("name", ""))

    def match_labels(self, labels: Labels, name: str) -> bool:
        fields = {"metadata.name": name}
        return any(all(r(labels) for r in exprs) and all(f(fields) for f in fs) for exprs, fs in self.terms)


def compile_term(t: Obj, where: str | None = None) -> tuple[list[Matcher], list[Matcher]] | None:
    """One ``NodeSelectorTerm``: (label matchers, field matchers), None when it matches nothing
    (no requirements, or a malformed one without ``where``)."""
    exprs: list[Matcher] = []
    fields: list[Matcher] = []
    me = t.get("matchExpressions") or []
    mf = t.get("matchFields") or []
    if not me and not mf:
        return None  # an empty term matches no objects
    for i, e in enumerate(me):
        r = _requirement(e, None if where is None else f"{where}.matchExpressions[{i}]", numeric=True)
        if r is None:
            return None
        exprs.append(r)
    for i, e in enumerate(mf):
        fw = None if where is None else f"{where}.matchFields[{i}]"
        if e.get("key") != "metadata.name":
            _bad(fw, f"field {e.get('key')!r} is not supported (only metadata.name)")
            return None
        vals = e.get("values") or []
        if e.get("operator") in ("In", "NotIn") and len(vals) != 1:
            # upstream: a field requirement takes exactly one value
            _bad(fw, f"operator {e.get('operator')!r} of field metadata.name needs exactly one value")
            return None
        r = _requirement(e, fw)
        if r is None or e.get("operator") not in ("In", "NotIn"):
            _bad(fw, f"unsupported field operator {e.get('operator')!r} (In, NotIn)")
            return None
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


def node_taints(node: Mapping[str, Any]) -> list[Obj]:
    return list((node.get("spec") or {}).get("taints") or ())


def hard_taint(taint: Obj) -> bool:
    """What Filter looks at: NoSchedule and NoExecute taints."""
    return taint.get("effect") in ("NoSchedule", "NoExecute")


def find_untolerated(taints: Iterable[Obj], tolerations: Sequence[Obj],
                     include: Callable[[Obj], bool] = hard_taint) -> Obj | None:
    """``FindMatchingUntoleratedTaint``: the first taint ``include`` selects (by default those
    of effect NoSchedule/NoExecute) that no toleration covers."""
    for taint in taints:
        if include(taint) and not tolerated(tolerations, taint):
            return taint
    return None


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
