"""Kosmos' scheduling policies as pure functions: which policy term a pod falls under, and the
Kubernetes matching rules the Kosmos plugins build on (label selectors, node selectors,
taints and tolerations). No I/O, no framework state: the plugins in
``scheduler/plugins/kosmos_*.py`` feed it the objects from their listers.

In the order a pod meets them:

1. :func:`match_distribution` picks the ResourceSelector that governs a pod among the
   DistributionPolicies of its namespace and the ClusterDistributionPolicies. The rule (Kosmos'
   proposal ``docs/proposals/distributionpolicy``, made deterministic; Kosmos itself lets the
   *last* policy in the list win and reads ``matchLabels`` as "any one label equal"):

   a. A namespaced DistributionPolicy (only those in the pod's namespace) beats every
      ClusterDistributionPolicy, whatever either selector's kind.
   b. Within one scope (across all its policies and all their selectors) the most precise
      selector wins: ``name`` > ``namePrefix`` > ``labelSelector`` > a selector with none of the
      three (the CRD: "Default is empty, which means selecting all resources").
   c. Between ``namePrefix`` matches the longest prefix wins.
   d. Remaining ties: the policy whose name sorts first (byte order), then the lower selector
      index within that policy. Never the order the lister returned them in.

   What one selector matches: if ``name`` is set, exactly the pod named so (``namePrefix`` and
   ``labelSelector`` are then ignored, as the CRD's field doc says); else if ``namePrefix`` is
   set, pods whose name starts with it *and*, when a ``labelSelector`` is also given, whose
   labels match it; else the ``labelSelector`` with upstream's LabelSelector semantics (every
   ``matchLabels`` pair AND every ``matchExpressions`` requirement; ``{}`` matches every pod, as
   ``metav1.LabelSelectorAsSelector`` does); else (nothing set) every pod. A pod is matched by
   ``metadata.name`` (for a pod of a Deployment that is the generated ``web-7d9c-xk2p`` name,
   hence ``namePrefix``).

2. The matched selector's ``policyName`` names a ``policyTerm`` of the same policy (the first
   term with that name). :func:`term_admits` decides a node for the term's ``nodeType``:
   ``host`` -> nodes without the label ``kosmos.io/node=true``; ``leaf`` -> only nodes with it
   (virtual nodes standing for leaf clusters); ``mix`` (also the default when ``nodeType`` is
   empty, as the CRD's default, and when no selector matches) -> any node; ``adv`` -> the
   ``advancedTerm``, every part that is given must hold: ``nodeName`` equals the node's name,
   every ``nodeSelector`` pair equals a node label (pod ``spec.nodeSelector`` semantics), and
   every NoSchedule/NoExecute taint of the node is tolerated by ``tolerations`` (the leaf taint
   ``kosmos.io/node=true:NoSchedule`` excepted: this scheduler tolerates it everywhere). An
   ``adv`` term with no part given admits every node. A ``policyName`` naming no term is an
   error the pod cannot get past until the policy changes (:class:`PolicyError`).

3. A pod labelled ``workload-policy/kosmos.io`` follows a :class:`WorkloadPolicy` of its namespace
   (:meth:`WorkloadPolicy.parse`, every refusal a :class:`PolicyError` naming ``ns/name`` and the
   field): quotas per ``topologyKey`` value listed in ``allocationPolicy`` (Kosmos), or divided
   from the workload's replicas by ``replicaScheduling`` (:class:`ReplicaDivision`, Karmada's
   ReplicaSchedulingStrategy: Divided, Weighted by ``staticWeightList`` entries of
   :class:`TargetCluster` and weight or by ``dynamicWeight: AvailableReplicas``, or Aggregated;
   the arithmetic is :mod:`scheduler.division`), never both; and ``spreadConstraints``
   (:class:`SpreadConstraint`, Karmada's: a node label, minGroups, maxGroups). The plugin
   ``scheduler/plugins/kosmos_workloadpolicy.py`` applies them pod by pod.

The Kubernetes matching rules themselves (label and node selectors, ``ToleratesTaint``) are
:mod:`scheduler.selectors`, shared with the upstream plugins; here they are compiled strictly
(:func:`label_selector_matches`, :func:`node_selector_matches`: a malformed selector is a
:class:`PolicyError` naming the field, not a silent "matches nothing"). Kosmos' own rules stay
here: the leaf taint and leaf node (:func:`is_leaf_taint`, :func:`hard_non_leaf_taint`,
:func:`is_leaf_node`), distribution matching and workload quotas.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scheduler.selectors import (
    NodeSelector,
    SelectorError,
    find_untolerated,
    hard_taint,
    label_selector,
    node_taints,
)

_log = logging.getLogger(__name__)

Obj = dict[str, Any]

#: The label marking a virtual node (a leaf cluster or one of its nodes), and the taint Kosmos'
#: ClusterTree puts on it so stock schedulers keep away (pkg/utils/constants.go).
LEAF_NODE_LABEL = "kosmos.io/node"
LEAF_NODE_VALUE = "true"
LEAF_TAINT = {"key": "kosmos.io/node", "value": "true", "effect": "NoSchedule"}

HOST, LEAF, MIX, ADV = "host", "leaf", "mix", "adv"
NODE_TYPES = (HOST, LEAF, MIX, ADV)

# Precision of a matched selector, higher wins (rule 1b).
RANK_ALL, RANK_LABELS, RANK_PREFIX, RANK_NAME = 0, 1, 2, 3
RANK_NAMES = {RANK_ALL: "empty selector", RANK_LABELS: "labelSelector", RANK_PREFIX: "namePrefix",
              RANK_NAME: "name"}


class PolicyError(ValueError):
    """A policy that cannot be applied as written (bad selector operator, a policyName naming no
    term); the message names the policy and the field."""


class MissingTermError(PolicyError):
    """A selector's ``policyName`` names no ``policyTerm`` of its policy."""


# ---------------------------------------------------------------------------------------------
# Label selectors, node selectors
# ---------------------------------------------------------------------------------------------


def label_selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str],
                           where: str = "labelSelector") -> bool:
    """metav1.LabelSelector (:func:`scheduler.selectors.label_selector`, compiled strictly):
    every matchLabels pair and every matchExpressions requirement must hold. ``None`` matches
    nothing, ``{}`` everything. A malformed requirement raises :class:`PolicyError` naming
    ``where`` (a policy's author must hear of it, not see it silently match nothing)."""
    try:
        return label_selector(selector, where)(labels)
    except SelectorError as e:
        raise PolicyError(str(e)) from None


def node_selector_matches(selector: Mapping[str, Any] | None, node: Mapping[str, Any],
                          where: str = "nodeSelector") -> bool:
    """v1.NodeSelector (:class:`scheduler.selectors.NodeSelector`, compiled strictly): any term
    matches; within a term every matchExpressions (node labels) and matchFields
    (``metadata.name``) requirement holds; a term with neither matches nothing. ``None``
    matches every node. A malformed requirement raises :class:`PolicyError`."""
    if selector is None:
        return True
    try:
        return NodeSelector(selector.get("nodeSelectorTerms") or (), where).match(node)
    except SelectorError as e:
        raise PolicyError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Taints and tolerations
# ---------------------------------------------------------------------------------------------


def is_leaf_taint(taint: Mapping[str, Any]) -> bool:
    return all((taint.get(k) or "") == v for k, v in LEAF_TAINT.items())


def hard_non_leaf_taint(taint: Obj) -> bool:
    """The taints this scheduler's filters enforce: NoSchedule/NoExecute, the leaf taint excepted."""
    return hard_taint(taint) and not is_leaf_taint(taint)


def is_leaf_node(node: Mapping[str, Any]) -> bool:
    labels = (node.get("metadata") or {}).get("labels") or {}
    return labels.get(LEAF_NODE_LABEL) == LEAF_NODE_VALUE


def is_daemonset_pod(pod: Mapping[str, Any]) -> bool:
    """Owned by a DaemonSet: the DaemonSet controller places it, policies do not apply."""
    return any(ref.get("kind") == "DaemonSet" for ref in (pod.get("metadata") or {}).get("ownerReferences") or [])


# ---------------------------------------------------------------------------------------------
# Distribution policies
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributionMatch:
    """The selector that governs a pod and the term it names. ``policy`` is ``ns/name`` for a
    DistributionPolicy, ``name`` for a ClusterDistributionPolicy; ``term`` is the policyTerm dict
    (``nodeType`` defaulted to mix)."""

    kind: str  # "DistributionPolicy" | "ClusterDistributionPolicy"
    policy: str
    selector_index: int
    rank: int
    policy_name: str  # the selector's policyName
    term: Obj = field(default_factory=dict)

    @property
    def node_type(self) -> str:
        return str(self.term.get("nodeType") or MIX)


def selector_rank(sel: Mapping[str, Any], pod_name: str, pod_labels: Mapping[str, str],
                  where: str) -> tuple[int, int] | None:
    """(rank, prefix length) if the ResourceSelector matches the pod, else None (see header)."""
    name = sel.get("name") or ""
    prefix = sel.get("namePrefix") or ""
    labels = sel.get("labelSelector")
    if name:
        return (RANK_NAME, 0) if pod_name == name else None
    if prefix:
        if not pod_name.startswith(prefix):
            return None
        if labels is not None and not label_selector_matches(labels, pod_labels, f"{where}.labelSelector"):
            return None
        return (RANK_PREFIX, len(prefix))
    if labels is not None:
        return (RANK_LABELS, 0) if label_selector_matches(labels, pod_labels, f"{where}.labelSelector") else None
    return (RANK_ALL, 0)


def _best_in_scope(policies: Iterable[Mapping[str, Any]], kind: str, namespaced: bool,
                   pod_name: str, pod_labels: Mapping[str, str]) -> DistributionMatch | None:
    best: tuple[tuple[int, int, str, int], Mapping[str, Any], int, str] | None = None
    for pol in policies:
        meta = pol.get("metadata") or {}
        pname = str(meta.get("name", ""))
        ident = f"{meta.get('namespace', '')}/{pname}" if namespaced else pname
        for i, sel in enumerate(((pol.get("spec") or {}).get("resourceSelectors")) or []):
            where = f"{kind} {ident}: spec.resourceSelectors[{i}]"
            hit = selector_rank(sel, pod_name, pod_labels, where)
            if hit is None:
                continue
            # Sort key: higher rank, longer prefix, then policy name, then index (ascending).
            key = (-hit[0], -hit[1], pname, i)
            if best is None or key < best[0]:
                best = (key, pol, i, ident)
    if best is None:
        return None
    key, pol, i, ident = best
    sel = pol["spec"]["resourceSelectors"][i]
    policy_name = str(sel.get("policyName") or "")
    for term in (pol.get("spec") or {}).get("policyTerms") or []:
        if term.get("name") == policy_name:
            break
    else:
        raise MissingTermError(f"{kind} {ident}: spec.resourceSelectors[{i}].policyName {policy_name!r} names no "
                          f"policyTerm (terms: {[t.get('name') for t in pol['spec'].get('policyTerms') or []]})")
    return DistributionMatch(kind, ident, i, -key[0], policy_name, dict(term))


def match_distribution(pod: Mapping[str, Any], policies: Iterable[Mapping[str, Any]],
                       cluster_policies: Iterable[Mapping[str, Any]]) -> DistributionMatch | None:
    """The governing selector for ``pod`` (rules 1a-1d of the header), None when nothing
    matches (the pod is then ``mix``). ``policies`` may hold DistributionPolicies of any
    namespace: only the pod's own count. Raises :class:`PolicyError` for a policy that cannot be
    applied (a malformed selector met on the way, a policyName naming no term)."""
    meta = pod.get("metadata") or {}
    ns = meta.get("namespace", "")
    name = str(meta.get("name", ""))
    labels: Mapping[str, str] = meta.get("labels") or {}
    own = [p for p in policies if (p.get("metadata") or {}).get("namespace", "") == ns]
    return (_best_in_scope(own, "DistributionPolicy", True, name, labels)
            or _best_in_scope(cluster_policies, "ClusterDistributionPolicy", False, name, labels))


def adv_term_admits(term: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """``advancedTerm``: every given part holds (see header)."""
    adv = term.get("advancedTerm") or {}
    meta = node.get("metadata") or {}
    if adv.get("nodeName") and adv["nodeName"] != meta.get("name"):
        return False
    labels = meta.get("labels") or {}
    if any(labels.get(k) != v for k, v in (adv.get("nodeSelector") or {}).items()):
        return False
    tolerations = [t for t in adv.get("tolerations") or [] if t]
    if tolerations:
        hard = find_untolerated(node_taints(node), tolerations, hard_non_leaf_taint)
        if hard is not None:
            return False
    return True


def term_admits(term: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """Whether a node may take a pod governed by ``term`` (its ``nodeType``, default mix)."""
    node_type = term.get("nodeType") or MIX
    if node_type == MIX:
        return True
    if node_type == HOST:
        return not is_leaf_node(node)
    if node_type == LEAF:
        return is_leaf_node(node)
    if node_type == ADV:
        return adv_term_admits(term, node)
    raise PolicyError(f"policyTerm {term.get('name')!r}: nodeType {node_type!r} is none of {', '.join(NODE_TYPES)}")


# ---------------------------------------------------------------------------------------------
# Workload policies (release-k8s1.21 WorkloadPolicy)
# ---------------------------------------------------------------------------------------------

#: The pod label naming its WorkloadPolicy (in the pod's namespace).
WORKLOAD_POLICY_LABEL = "workload-policy/kosmos.io"
REQUIRED, PREFERRED = "Required", "Preferred"
FILL, BALANCE = "Fill", "Balance"


#: ``spec.replicaScheduling`` (Karmada's ReplicaSchedulingStrategy, see :mod:`scheduler.division`).
DIVIDED, DUPLICATED = "Divided", "Duplicated"
WEIGHTED, AGGREGATED = "Weighted", "Aggregated"
AVAILABLE_REPLICAS = "AvailableReplicas"
#: ``spreadByField`` -> the node label holding the group (a virtual node carries its leaf
#: cluster's name in ``kosmos.io/cluster``, and region/zone when its leaf nodes agree).
SPREAD_FIELDS = {"cluster": "kosmos.io/cluster", "region": "topology.kubernetes.io/region",
                 "zone": "topology.kubernetes.io/zone"}


@dataclass(frozen=True)
class TargetCluster:
    """Karmada's ClusterAffinity as a ``staticWeightList`` entry's ``targetCluster``, over groups
    (values of the policy's topologyKey): not in ``exclude``, in ``clusterNames`` when given, and,
    when ``labelSelector`` is given, some node of the group has matching labels (the virtual node
    stands for its cluster, as Karmada's Cluster object). Nothing given matches every group."""

    names: frozenset[str]
    exclude: frozenset[str]
    selector: Obj | None
    where: str

    def matches(self, group: str, labels: Iterable[Mapping[str, str]]) -> bool:
        if group in self.exclude or (self.names and group not in self.names):
            return False
        if self.selector is None:
            return True
        return any(label_selector_matches(self.selector, lab, self.where) for lab in labels)


@dataclass(frozen=True)
class ReplicaDivision:
    """``spec.replicaScheduling``, parsed: ``Divided`` replicas, ``Weighted`` by ``static``
    (entries of (target, weight)) or by available replicas (``dynamic``), or ``Aggregated``;
    ``replicas``: the workload's size when the pod has no controller to read it from."""

    preference: str
    static: tuple[tuple[TargetCluster, int], ...]
    dynamic: bool
    replicas: int | None

    @property
    def by_room(self) -> bool:
        """Targets depend on the room per group (dynamic weights or Aggregated)."""
        return self.dynamic or self.preference == AGGREGATED


@dataclass(frozen=True)
class SpreadConstraint:
    """One ``spec.spreadConstraints`` entry: the node label whose values are the groups, at least
    ``min_groups`` groups must have room, at most ``max_groups`` (0: no maximum) hold pods."""

    index: int
    label: str
    name: str  # the spreadByField value, or the label for spreadByLabel
    min_groups: int
    max_groups: int


def _int_field(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(f"{where} {value!r}: must be an integer >= {minimum}")
    return value


def _parse_division(raw: Any, ident: str) -> ReplicaDivision:
    where = f"WorkloadPolicy {ident}: spec.replicaScheduling"
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: must be an object, got {raw!r}")
    stype = raw.get("replicaSchedulingType") or DIVIDED
    if stype != DIVIDED:
        raise PolicyError(f"{where}.replicaSchedulingType {stype!r}: only {DIVIDED} is supported (pods are placed "
                          f"one at a time in one cluster: {DUPLICATED} has no meaning here)")
    pref = raw.get("replicaDivisionPreference") or WEIGHTED
    if pref not in (WEIGHTED, AGGREGATED):
        raise PolicyError(f"{where}.replicaDivisionPreference {pref!r} is neither {WEIGHTED} nor {AGGREGATED}")
    wp = raw.get("weightPreference")
    if wp is not None and not isinstance(wp, Mapping):
        raise PolicyError(f"{where}.weightPreference: must be an object, got {wp!r}")
    wp = wp or {}
    if pref == AGGREGATED and wp:
        raise PolicyError(f"{where}.weightPreference: only for replicaDivisionPreference {WEIGHTED}")
    dyn = wp.get("dynamicWeight") or ""
    if dyn and dyn != AVAILABLE_REPLICAS:
        raise PolicyError(f"{where}.weightPreference.dynamicWeight {dyn!r}: only {AVAILABLE_REPLICAS} is supported")
    lst = wp.get("staticWeightList") or []
    if dyn and lst:
        raise PolicyError(f"{where}.weightPreference: give staticWeightList or dynamicWeight, not both")
    if not isinstance(lst, list):
        raise PolicyError(f"{where}.weightPreference.staticWeightList: must be a list, got {lst!r}")
    static: list[tuple[TargetCluster, int]] = []
    for i, e in enumerate(lst):
        ew = f"{where}.weightPreference.staticWeightList[{i}]"
        if not isinstance(e, Mapping):
            raise PolicyError(f"{ew}: must be an object, got {e!r}")
        weight = _int_field(e.get("weight"), f"{ew}.weight", 1)
        tc = e.get("targetCluster")
        if not isinstance(tc, Mapping):
            raise PolicyError(f"{ew}.targetCluster: must be an object, got {tc!r}")
        names, excl = tc.get("clusterNames") or [], tc.get("exclude") or []
        for fname, val in (("clusterNames", names), ("exclude", excl)):
            if not isinstance(val, list) or not all(isinstance(n, str) and n for n in val):
                raise PolicyError(f"{ew}.targetCluster.{fname} {val!r}: must be a list of names")
        sel = tc.get("labelSelector")
        sw = f"{ew}.targetCluster.labelSelector"
        if sel is not None:
            label_selector_matches(sel, {}, sw)  # compile once: a malformed selector is refused now
        static.append((TargetCluster(frozenset(names), frozenset(excl), sel, sw), weight))
    replicas = raw.get("replicas")
    if replicas is not None:
        replicas = _int_field(replicas, f"{where}.replicas", 0)
    return ReplicaDivision(pref, tuple(static), bool(dyn), replicas)


def _parse_spread(raw: Any, ident: str) -> tuple[SpreadConstraint, ...]:
    where = f"WorkloadPolicy {ident}: spec.spreadConstraints"
    if not isinstance(raw, list):
        raise PolicyError(f"{where}: must be a list, got {raw!r}")
    out: list[SpreadConstraint] = []
    for i, c in enumerate(raw):
        cw = f"{where}[{i}]"
        if not isinstance(c, Mapping):
            raise PolicyError(f"{cw}: must be an object, got {c!r}")
        by_field, by_label = c.get("spreadByField") or "", c.get("spreadByLabel") or ""
        if bool(by_field) == bool(by_label):
            raise PolicyError(f"{cw}: give exactly one of spreadByField and spreadByLabel")
        if by_field and by_field not in SPREAD_FIELDS:
            raise PolicyError(f"{cw}.spreadByField {by_field!r} is none of {', '.join(SPREAD_FIELDS)}")
        if by_label and not isinstance(by_label, str):
            raise PolicyError(f"{cw}.spreadByLabel {by_label!r}: must be a label key")
        lo = _int_field(c.get("minGroups", 1), f"{cw}.minGroups", 0)
        hi = _int_field(c.get("maxGroups", 0), f"{cw}.maxGroups", 0)
        if hi and hi < lo:
            raise PolicyError(f"{cw}: maxGroups {hi} is below minGroups {lo}")
        label = SPREAD_FIELDS[by_field] if by_field else str(by_label)
        if any(s.label == label for s in out):
            raise PolicyError(f"{cw}: a second constraint on {by_field or by_label!r}")
        out.append(SpreadConstraint(i, label, by_field or by_label, lo, hi))
    return tuple(out)


@dataclass(frozen=True)
class WorkloadPolicy:
    """A WorkloadPolicy's spec, parsed and defaulted as the CRD defaults it
    (allocationType Preferred, allocationMethod Balance). ``division``: the replicas per
    topology value come from ``spec.replicaScheduling`` instead of ``allocationPolicy`` (never
    both); ``spread``: ``spec.spreadConstraints``."""

    ident: str  # ns/name
    topology_key: str
    selector: Obj
    quotas: Mapping[str, int]
    required: bool
    method: str
    division: ReplicaDivision | None = None
    spread: tuple[SpreadConstraint, ...] = ()

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> WorkloadPolicy:
        meta = obj.get("metadata") or {}
        ident = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        spec = obj.get("spec") or {}
        key = spec.get("topologyKey") or ""
        if not key:
            raise PolicyError(f"WorkloadPolicy {ident}: spec.topologyKey is empty")
        atype = spec.get("allocationType") or PREFERRED
        if atype not in (REQUIRED, PREFERRED):
            raise PolicyError(
                f"WorkloadPolicy {ident}: spec.allocationType {atype!r} is neither Required nor Preferred")
        method = spec.get("allocationMethod") or BALANCE
        if method not in (FILL, BALANCE):
            raise PolicyError(f"WorkloadPolicy {ident}: spec.allocationMethod {method!r} is neither Fill nor Balance")
        quotas: dict[str, int] = {}
        for i, a in enumerate(spec.get("allocationPolicy") or []):
            try:
                quotas[str(a["name"])] = int(a["replicas"])
            except (KeyError, TypeError, ValueError) as e:
                raise PolicyError(f"WorkloadPolicy {ident}: spec.allocationPolicy[{i}] {a!r}: needs name and "
                                  f"integer replicas") from e
        division = None
        if spec.get("replicaScheduling") is not None:
            if quotas:
                raise PolicyError(f"WorkloadPolicy {ident}: spec.allocationPolicy and spec.replicaScheduling both "
                                  f"set the replicas per {key!r} value; give one")
            division = _parse_division(spec["replicaScheduling"], ident)
        spread = _parse_spread(spec.get("spreadConstraints") or [], ident)
        return cls(ident, key, dict(spec.get("labelSelector") or {}), quotas, atype == REQUIRED, method,
                   division, spread)

    def quota(self, value: str) -> int:
        """Desired replicas for a topology value: a value the policy does not list wants none."""
        return self.quotas.get(value, 0)


def workload_score(count: int, desired: int, method: str) -> int:
    """Score of a topology domain holding ``count`` of the policy's pods out of ``desired``.

    Kosmos: Balance = (1 - count/desired)*100, Fill = count/desired*100. Corrected at the edges:
    a domain that wants nothing or is full (count >= desired) scores 0 (Kosmos scored a full
    domain 100 under Fill, and divided by zero for unlisted values); a domain with room scores at
    least 1, so with Fill an empty domain with room (count/desired = 0) still beats a full one.
    Balance rounds up for the same reason. Always within 0..100."""
    if desired <= 0 or count >= desired:
        return 0
    if method == FILL:
        return 1 + (99 * count) // desired
    return -((-100 * (desired - count)) // desired)  # ceil(100 * (1 - count/desired))
