"""Network-aware placement (issue 19, item 4): the ``kosmos.io/network-affinity`` annotation and
the pure rules that turn the fabric's per cluster-pair reachability records into Filter and Score
answers. No I/O, no locks: the ``NetworkAffinity`` plugin (scheduler/plugins/kosmos_netaffinity.py)
feeds it the pod, the cycle's pods and nodes, and a map of :class:`PairState` records
(:mod:`scheduler.netaffinity_records`, fed by the reflector's ``fabric.kosmos.io/reachability``
records).

The annotation (JSON, or YAML: it is parsed with a YAML loader, and JSON is YAML): one term, or a
list of at most :data:`MAX_TERMS` terms; every term names one target and says what it wants::

    kosmos.io/network-affinity: |
      [{"service": "db/postgres", "maxRttMs": 5, "weight": 80},
       {"podSelector": {"matchLabels": {"app": "cache"}}, "namespaces": ["shared"], "weight": 20}]

- ``service``: ``NAMESPACE/NAME`` or ``NAME`` (the pod's namespace). Its clusters are where its
  endpoints run: the pods its selector picks in its namespace, and, when the scheduler has an
  EndpointSlice lister, the ready endpoints of its EndpointSlices (an endpoint's ``nodeName``
  gives its cluster; a slice labelled ``multicluster.kubernetes.io/source-cluster``, as
  kosmos-mcs imports them, names its cluster itself).
- ``podSelector`` (a LabelSelector) with optional ``namespaces`` (default: the pod's own): its
  clusters are where the matching assigned, not terminating pods run.
- ``maxRttMs`` (number > 0, optional): Filter. ``weight`` (integer 1-100, optional): Score.
  A term with neither still filters out unreachable clusters.

A pod's *cluster* is its node's: a virtual node's ``kosmos.io/cluster`` label (tree.forge writes
it on every virtual node), any other node is in the root cluster, named by
``kosmos-scheduler --fabric-cluster`` (:data:`ROOT`, a name no fabric cluster has, when unset:
it is still the same cluster as itself, so RTT 0 there, but no record names it).

Per term, between the candidate node's cluster C and one target cluster T (:func:`pair_verdict`):

- C == T: reachable, RTT 0.
- Either record (C -> T or T -> C) says unreachable: unreachable (a one-way cut breaks every
  conversation the pod would have with its target, whichever side measured it).
- Else reachable, RTT the C -> T record's ``rttMs`` (measured by C's nodes, the ones the pod
  will talk from), else the T -> C one's (a tunnel probe is a round trip), else unknown. No
  record at all is no answer (the reflector's startup hold, a pair just configured): reachable,
  RTT unknown, as fabric.control.reachability asks of readers.

Filter (:func:`term_filter`): the candidate passes a term when **at least one** target cluster
is reachable and, with ``maxRttMs``, either within it or of unknown RTT (being near one replica
of the target is being near the target: a client talks to the endpoint it can reach). A term
whose target runs nowhere yet (no matching pod, no endpoint, an unknown Service) constrains
nothing: a client and its server may be created in any order, as upstream's pod affinity lets
the first pod of a group go anywhere. A candidate whose own cluster is unknown (a virtual node
without the label) passes, and scores as unknown. Every term must pass.

Score (:func:`term_closeness`, :func:`raw_score`): per term with a weight, the candidate's best
(lowest) RTT over its reachable target clusters, mapped linearly over the feasible candidates:
``1 + 99 * (worst - rtt) / worst`` where ``worst`` is the highest known best-RTT among the
candidates (every candidate at RTT 0, or the only known RTT: 100); unknown RTT scores 0, below
every measured one. The node's raw score is the sum of ``weight * closeness`` over the terms,
and NormalizeScore scales it to 0..100 by the highest (upstream's DefaultNormalizeScore), so,
as upstream's preferred pod affinity, a term's weight counts relative to the pod's other terms
and the plugin's profile weight counts against the other plugins.

Bounds: at most :data:`MAX_BYTES` characters and :data:`MAX_TERMS` terms, and no YAML aliases
(an alias repeats a subtree without its text), so one pod's annotation costs work linear in its
length. Invalid annotations raise :class:`AnnotationError` naming the pod, the annotation and the field;
the plugin makes the pod unschedulable (unresolvable) with that message until it is fixed, as
upstream does for an invalid affinity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from fabric.control.reachability import PairState
from scheduler.framework import NodeInfo, Obj
from scheduler.policy import is_leaf_node
from scheduler.selectors import Matcher, SelectorError, label_selector, labels_selector

ANNOTATION = "kosmos.io/network-affinity"
#: A virtual node's leaf cluster (tree.forge.CLUSTER_LABEL; the scheduler never imports tree).
CLUSTER_LABEL = "kosmos.io/cluster"
#: An EndpointSlice imported by kosmos-mcs names its source cluster (KEP-1645).
SOURCE_CLUSTER_LABEL = "multicluster.kubernetes.io/source-cluster"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: The root cluster when ``--fabric-cluster`` is not given: no fabric cluster has an empty name.
ROOT = ""
#: Terms per annotation and the annotation's length: bound the work of one pod's cycle (with
#: YAML aliases refused, the parsed value is linear in the text).
MAX_TERMS = 16
MAX_BYTES = 16 * 1024
MIN_WEIGHT, MAX_WEIGHT = 1, 100
_FIELDS = ("service", "podSelector", "namespaces", "maxRttMs", "weight")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

Pairs = Mapping[tuple[str, str], PairState]


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors' aliases: an alias repeats a subtree without repeating its text, so a
    small annotation could make the selectors' work quadratic."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", mark)
        return super().compose_node(parent, index)


class AnnotationError(ValueError):
    """An invalid ``kosmos.io/network-affinity``; the message names the pod, the annotation and
    the field."""


@dataclass(frozen=True)
class Term:
    """One target and what the pod wants of it (see the module docstring)."""

    index: int
    #: ``(namespace, name)`` of the Service, or None for a pod selector.
    service: tuple[str, str] | None
    #: The pod selector (a compiled LabelSelector) and its namespaces, for a pod-selector term.
    selector: Matcher | None
    namespaces: frozenset[str]
    max_rtt_ms: float | None
    weight: int | None

    @property
    def target(self) -> str:
        """The target as a user reads it, for Filter reasons."""
        if self.service is not None:
            return f"service {self.service[0]}/{self.service[1]}"
        return f"pods of term {self.index} in namespace(s) {', '.join(sorted(self.namespaces))}"


def _pod_name(pod: Obj) -> str:
    m = pod.get("metadata") or {}
    return f"{m.get('namespace', '')}/{m.get('name', '')}"


def parse(pod: Obj) -> list[Term] | None:
    """The pod's terms, None when it has no annotation; raises :class:`AnnotationError`."""
    meta = pod.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(ANNOTATION)
    if raw is None:
        return None
    ns = str(meta.get("namespace") or "default")
    where = f"pod {_pod_name(pod)}: annotation {ANNOTATION}"

    def bad(field: str, message: str) -> AnnotationError:
        return AnnotationError(f"{where}: {field}: {message}" if field else f"{where}: {message}")

    if not isinstance(raw, str):
        raise bad("", f"must be a string, got {type(raw).__name__}")
    if len(raw) > MAX_BYTES:
        raise bad("", f"{len(raw)} characters, at most {MAX_BYTES}")
    try:
        doc = yaml.load(raw, Loader=_NoAliasLoader)  # a SafeLoader, without aliases
    except yaml.YAMLError as e:
        raise bad("", f"not JSON or YAML ({' '.join(str(e).split())})") from None
    items: list[Any]
    if isinstance(doc, Mapping):
        items = [doc]
    elif isinstance(doc, list):
        items = doc
    else:
        raise bad("", f"must be a term (an object) or a list of terms, got {doc!r}")
    if not items:
        raise bad("", "the list of terms is empty")
    if len(items) > MAX_TERMS:
        raise bad("", f"{len(items)} terms, at most {MAX_TERMS}")
    return [_term(i, t, ns, bad) for i, t in enumerate(items)]


def _term(i: int, t: Any, ns: str, bad: Any) -> Term:
    at = f"[{i}]"
    if not isinstance(t, Mapping):
        raise bad(at, f"a term must be an object, got {t!r}")
    unknown = sorted(str(k) for k in t if k not in _FIELDS)
    if unknown:
        raise bad(at, f"unknown field(s) {unknown} (known: {', '.join(_FIELDS)})")
    has_svc, has_sel = "service" in t, "podSelector" in t
    if has_svc == has_sel:
        raise bad(at, "give exactly one target: service or podSelector")
    service = None
    selector = None
    namespaces: frozenset[str] = frozenset()
    if has_svc:
        if "namespaces" in t:
            raise bad(f"{at}.namespaces", "only with podSelector (a service names its namespace: NAMESPACE/NAME)")
        v = t["service"]
        parts = v.split("/") if isinstance(v, str) else []
        if len(parts) == 1:
            parts = [ns, parts[0]]
        if len(parts) != 2 or not all(_DNS_LABEL.match(p) for p in parts):
            raise bad(f"{at}.service", f"must be NAMESPACE/NAME or NAME (DNS labels), got {v!r}")
        service = (parts[0], parts[1])
    else:
        sel = t["podSelector"]
        if not isinstance(sel, Mapping):
            raise bad(f"{at}.podSelector", f"must be a LabelSelector object, got {sel!r}")
        extra = sorted(str(k) for k in sel if k not in ("matchLabels", "matchExpressions"))
        if extra:
            raise bad(f"{at}.podSelector", f"unknown field(s) {extra} (known: matchLabels, matchExpressions)")
        ml = sel.get("matchLabels") or {}
        if not isinstance(ml, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ml.items()):
            raise bad(f"{at}.podSelector.matchLabels", f"must map label keys to string values, got {ml!r}")
        me = sel.get("matchExpressions") or []
        if not isinstance(me, list) or not all(isinstance(e, Mapping) for e in me):
            raise bad(f"{at}.podSelector.matchExpressions", f"must be a list of requirements, got {me!r}")
        try:
            selector = label_selector(sel, f"{at}.podSelector")
        except SelectorError as e:
            raise bad("", str(e)) from None
        nss = t.get("namespaces", [ns])
        if (not isinstance(nss, list) or not nss
                or not all(isinstance(n, str) and _DNS_LABEL.match(n) for n in nss)):
            raise bad(f"{at}.namespaces", f"must be a non-empty list of namespace names, got {nss!r}")
        namespaces = frozenset(nss)
    max_rtt = t.get("maxRttMs")
    if max_rtt is not None and (isinstance(max_rtt, bool) or not isinstance(max_rtt, int | float)
                                or not math.isfinite(max_rtt) or max_rtt <= 0):
        raise bad(f"{at}.maxRttMs", f"must be a number of milliseconds > 0, got {max_rtt!r}")
    weight = t.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int)
                               or not MIN_WEIGHT <= weight <= MAX_WEIGHT):
        raise bad(f"{at}.weight", f"must be an integer from {MIN_WEIGHT} to {MAX_WEIGHT}, got {weight!r}")
    return Term(i, service, selector, namespaces, None if max_rtt is None else float(max_rtt), weight)


# --- clusters -----------------------------------------------------------------------------------


def node_cluster(node: Mapping[str, Any], root: str = ROOT) -> str | None:
    """The fabric cluster of a node: a virtual node's ``kosmos.io/cluster`` (None when it has
    none: unknown), any other node's is the root's (``root``)."""
    if is_leaf_node(node):
        c = ((node.get("metadata") or {}).get("labels") or {}).get(CLUSTER_LABEL)
        return str(c) if c else None
    return root


def _assigned_live(pod: Obj) -> bool:
    return not (pod.get("metadata") or {}).get("deletionTimestamp")


def target_clusters(term: Term, nodes: Iterable[NodeInfo], services: Mapping[str, Obj],
                    slices: Iterable[Obj] | None = None, root: str = ROOT, skip_uid: str = "") -> frozenset[str]:
    """The clusters where ``term``'s target runs (see the module docstring), from the cycle's
    nodes with their pods, the Services by ``ns/name`` and, when given, every EndpointSlice.
    ``skip_uid``: the pod being scheduled (never its own target)."""
    nodes = list(nodes)
    by_name = {ni.name: ni for ni in nodes}
    if term.service is not None:
        ns, name = term.service
        svc = services.get(f"{ns}/{name}")
        sel = ((svc or {}).get("spec") or {}).get("selector") or None
        matcher = labels_selector(sel) if sel else None
        namespaces = frozenset({ns})
    else:
        matcher, namespaces = term.selector, term.namespaces
    out: set[str] = set()
    if matcher is not None:
        for ni in nodes:
            c = node_cluster(ni.node, root)
            if c is None or c in out:  # a cluster is found once: the other nodes there add nothing
                continue
            for pi in ni.pods:
                m = pi.pod.get("metadata") or {}
                if (m.get("namespace") in namespaces and (not skip_uid or m.get("uid") != skip_uid)
                        and _assigned_live(pi.pod) and matcher(m.get("labels") or {})):
                    out.add(c)
                    break
    if term.service is not None and slices is not None:
        ns, name = term.service
        for s in slices:
            m = s.get("metadata") or {}
            labels = m.get("labels") or {}
            if m.get("namespace") != ns or labels.get(SERVICE_NAME_LABEL) != name:
                continue
            ready = [e for e in s.get("endpoints") or () if ((e.get("conditions") or {}).get("ready") is not False)]
            if not ready:
                continue
            if labels.get(SOURCE_CLUSTER_LABEL):
                out.add(str(labels[SOURCE_CLUSTER_LABEL]))
                continue
            for e in ready:
                host = by_name.get(str(e.get("nodeName") or ""))
                c = node_cluster(host.node, root) if host is not None else None
                if c is not None:
                    out.add(c)
    return frozenset(out)


# --- filter and score -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One (candidate cluster, target cluster) answer: reachable, and the RTT when known."""

    reachable: bool
    rtt_ms: float | None
    reason: str = ""


def pair_verdict(candidate: str, target: str, pairs: Pairs) -> Verdict:
    """See the module docstring: same cluster 0; either direction cut is a cut; the candidate's
    measurement first, the reverse one next; no record is no answer (reachable, unknown)."""
    if candidate == target:
        return Verdict(True, 0.0)
    fwd, rev = pairs.get((candidate, target)), pairs.get((target, candidate))
    for st in (fwd, rev):
        if st is not None and not st.reachable:
            return Verdict(False, None, st.reason)
    for st in (fwd, rev):
        if st is not None and st.rtt_ms is not None:
            return Verdict(True, st.rtt_ms)
    return Verdict(True, None)


@dataclass(frozen=True)
class TermAnswer:
    """A term's answer for one candidate cluster: whether it passes the Filter, why not, and the
    best known RTT over the reachable target clusters (None: unknown, or nothing reachable)."""

    passes: bool
    best_rtt_ms: float | None
    reason: str = ""


def term_filter(term: Term, candidate: str | None, targets: frozenset[str], pairs: Pairs) -> TermAnswer:
    """The Filter of one term (see the module docstring): at least one target cluster reachable
    and, with ``maxRttMs``, within it or of unknown RTT."""
    if not targets or candidate is None:
        return TermAnswer(True, None)
    verdicts = [pair_verdict(candidate, t, pairs) for t in sorted(targets)]
    reachable = [v for v in verdicts if v.reachable]
    known = [v.rtt_ms for v in reachable if v.rtt_ms is not None]
    best = min(known, default=None)
    if not reachable:
        return TermAnswer(False, None, f"node(s) were unreachable through the fabric from the pod's network-affinity "
                                       f"target ({term.target})")
    if term.max_rtt_ms is not None:
        within = [r for r in known if r <= term.max_rtt_ms]
        if within:
            best = min(within)
        elif len(known) < len(reachable):
            best = None  # passes on the clusters of unknown RTT only: scores as unknown
        else:
            return TermAnswer(False, best, f"node(s) were more than {term.max_rtt_ms:g} ms RTT from the pod's "
                                           f"network-affinity target ({term.target})")
    return TermAnswer(True, best)


def term_closeness(best: Mapping[str, float | None]) -> dict[str, int]:
    """Per candidate (any key: node or cluster), 0..100 from its best RTT (see the module
    docstring): linear over the candidates' known RTTs, 1 at the worst, 100 at RTT 0 (and for
    every candidate when the worst is 0); unknown 0."""
    worst = max((r for r in best.values() if r is not None), default=None)
    out: dict[str, int] = {}
    for k, r in best.items():
        if r is None or worst is None:
            out[k] = 0
        elif worst <= 0:
            out[k] = 100
        else:
            out[k] = 1 + int(99 * (worst - min(r, worst)) / worst)
    return out


def raw_score(terms: Sequence[Term], closeness: Sequence[Mapping[str, int]], key: str) -> int:
    """The candidate ``key``'s raw score: the sum of ``weight * closeness`` over the weighted
    terms (``closeness[i]`` is term ``i``'s :func:`term_closeness`)."""
    return sum((t.weight or 0) * c.get(key, 0) for t, c in zip(terms, closeness, strict=True) if t.weight)
