"""Label and field selectors, parsed the way kube-apiserver parses them.

Label selector grammar (``k8s.io/apimachinery/pkg/labels``): a comma-separated list of
requirements, each one of ``key=value``, ``key==value``, ``key!=value``, ``key in (a,b)``,
``key notin (a,b)``, ``key`` (exists) and ``!key`` (does not exist). ``!=`` and ``notin`` match
objects that lack the key, exactly as upstream does.

Field selectors (``k8s.io/apimachinery/pkg/fields``) support only ``=``, ``==`` and ``!=`` over
a per-resource set of field labels; an unsupported label is a 400 BadRequest upstream and here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_log = logging.getLogger(__name__)

_KEY = r"[A-Za-z0-9./_-]+"
_SET_RE = re.compile(rf"^\s*(!?)\s*({_KEY})\s+(in|notin)\s*\(([^)]*)\)\s*$")
_BIN_RE = re.compile(rf"^\s*({_KEY})\s*(==|=|!=)\s*([A-Za-z0-9._-]*)\s*$")
_EXISTS_RE = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")


class SelectorError(ValueError):
    """A selector string that does not parse; the message names the offending text."""


@dataclass(frozen=True)
class Requirement:
    """One label requirement: ``op`` is one of =, !=, in, notin, exists, !exists."""

    key: str
    op: str
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        has = self.key in labels
        if self.op == "exists":
            return has
        if self.op == "!exists":
            return not has
        if self.op in ("=", "in"):
            return has and labels[self.key] in self.values
        # != and notin match objects without the key (upstream semantics)
        return not has or labels[self.key] not in self.values


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside parentheses (``in (a,b)`` keeps its commas)."""
    parts: list[str] = []
    depth = 0
    cur: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p.strip()]


def parse_labels(text: str | None) -> list[Requirement]:
    """Parse a labelSelector query value; empty or None selects everything."""
    if not text:
        return []
    reqs: list[Requirement] = []
    for part in _split_top(text):
        m = _SET_RE.match(part)
        if m:
            if m.group(1):
                raise SelectorError(f"unable to parse requirement: {part!r}: '!' cannot precede a set operator")
            values = frozenset(v.strip() for v in m.group(4).split(",") if v.strip())
            reqs.append(Requirement(m.group(2), "in" if m.group(3) == "in" else "notin", values))
            continue
        m = _BIN_RE.match(part)
        if m:
            op = "!=" if m.group(2) == "!=" else "="
            reqs.append(Requirement(m.group(1), op, frozenset([m.group(3)])))
            continue
        m = _EXISTS_RE.match(part)
        if m:
            reqs.append(Requirement(m.group(2), "!exists" if m.group(1) else "exists", frozenset()))
            continue
        raise SelectorError(f"unable to parse requirement: {part!r} in labelSelector {text!r}")
    return reqs


def labels_match(reqs: list[Requirement], obj: Mapping[str, Any]) -> bool:
    """True when the object's metadata.labels satisfy every requirement."""
    if not reqs:
        return True
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(r.matches(labels) for r in reqs)


_SELECTOR_OPS = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}


def from_label_selector(selector: Mapping[str, Any]) -> list[Requirement]:
    """The requirements of a ``metav1.LabelSelector`` object (``matchLabels`` AND
    ``matchExpressions``), as ``metav1.LabelSelectorAsSelector`` builds them. An empty selector
    selects everything; callers that treat a *missing* selector as "nothing" (workload
    controllers) must check for None themselves, as upstream does."""
    reqs = [Requirement(str(k), "=", frozenset([str(v)])) for k, v in (selector.get("matchLabels") or {}).items()]
    for i, expr in enumerate(selector.get("matchExpressions") or []):
        op = _SELECTOR_OPS.get(str(expr.get("operator")))
        if op is None:
            raise SelectorError(f"matchExpressions[{i}].operator: {expr.get('operator')!r} is not a valid "
                                "label selector operator (In, NotIn, Exists, DoesNotExist)")
        reqs.append(Requirement(str(expr.get("key")), op, frozenset(str(v) for v in expr.get("values") or [])))
    return reqs


def label_selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """True when ``labels`` satisfy a ``metav1.LabelSelector`` object (empty selects all)."""
    return all(r.matches(labels) for r in from_label_selector(selector))


@dataclass(frozen=True)
class FieldRequirement:
    """One field requirement: ``path`` is the field label (e.g. spec.nodeName)."""

    path: str
    negate: bool
    value: str


def parse_fields(text: str | None, supported: frozenset[str], resource: str) -> list[FieldRequirement]:
    """Parse a fieldSelector; labels outside ``supported`` raise (400 upstream)."""
    if not text:
        return []
    reqs: list[FieldRequirement] = []
    for part in _split_top(text):
        m = re.match(r"^\s*([A-Za-z0-9._/-]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise SelectorError(f"invalid selector: {part!r} in fieldSelector {text!r}")
        path = m.group(1)
        if path not in supported:
            raise SelectorError(f'field label not supported: {path} (resource "{resource}")')
        reqs.append(FieldRequirement(path, m.group(2) == "!=", m.group(3)))
    return reqs


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string value of a dotted field path; missing fields read as the empty string."""
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def fields_match(reqs: list[FieldRequirement], obj: Mapping[str, Any]) -> bool:
    """True when every field requirement holds for ``obj``."""
    for r in reqs:
        equal = field_value(obj, r.path) == r.value
        if equal == r.negate:
            return False
    return True


Predicate = Callable[[Mapping[str, Any]], bool]


def predicate(labels: list[Requirement], fields: list[FieldRequirement], namespace: str | None) -> Predicate:
    """One callable combining namespace, label and field filtering (used by list and watch)."""

    def match(obj: Mapping[str, Any]) -> bool:
        if namespace is not None and obj.get("metadata", {}).get("namespace") != namespace:
            return False
        return labels_match(labels, obj) and fields_match(fields, obj)

    return match
