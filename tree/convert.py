"""Kosmos' pod convert policies: how a pod is rewritten on its way from the root to a leaf.

The objects (Kosmos' CRDs, unchanged: ``deploy/base/host/crd-podconvertpolicies.yaml`` and
``crd-clusterpodconvertpolicies.yaml``, group ``kosmos.io/v1alpha1``):

- ``PodConvertPolicy`` (namespaced, short name ``pcp``) applies to pods of its own namespace;
  ``ClusterPodConvertPolicy`` (cluster-scoped) to pods of every namespace.
- ``spec.labelSelector`` (required) selects pods by the *root* pod's labels (``{}`` selects
  every pod); ``spec.leafNodeSelector`` (optional; absent selects every node) selects by the
  labels of the virtual node the root pod is bound to (``kosmos.io/cluster=<cluster>`` names a
  leaf cluster; in node mode the virtual node carries the leaf node's labels too). Upstream
  ``metav1.LabelSelector`` semantics (:func:`scheduler.selectors.label_selector`).
- ``spec.converters``: any of ``schedulerNameConverter``, ``nodeNameConverter``,
  ``nodeSelectorConverter``, ``tolerationConverter``, ``affinityConverter``,
  ``topologySpreadConstraintsConverter``, ``hostAliasesConverter``, each with a ``convertType``
  and the value of the pod spec field it names (``schedulerName``, ``nodeName``,
  ``nodeSelector``, ``tolerations``, ``affinity``, ``topologySpreadConstraints``,
  ``hostAliases``). ``add``: set the field only when the leaf pod has none (absent or empty);
  ``remove``: clear it; ``replace``: set it to the value (an empty or absent value clears it).
  Whole fields: ``add`` never merges into a list or map the pod already has (Kosmos' rule).

Which policy applies to a pod (precedence), in order:

1. Only policies that match: ``labelSelector`` matches the root pod's labels and
   ``leafNodeSelector`` (if any) the virtual node's labels; only those with ``converters``
   (a matching policy without ``converters`` is passed over, as in Kosmos); for a
   ``PodConvertPolicy`` only those in the root pod's namespace.
2. A matching ``ClusterPodConvertPolicy`` beats every ``PodConvertPolicy`` (the cluster
   administrator's rule over a namespace's).
3. Within one kind: the policy whose ``metadata.name`` sorts first (byte order).
4. Exactly one policy applies (converters of several policies are never combined); the leaf
   pod is annotated ``kosmos-io/convert-policy=<policy name>`` (Kosmos' key and value).

Where we differ from Kosmos (``pkg/clustertree/cluster-manager/controllers/pod/
root_pod_controller.go`` ``mutatePod``, ``pkg/utils/podutils/pod_convert.go``), and why:

- Kosmos reads ``PodConvertPolicy`` objects only when *no* ``ClusterPodConvertPolicy`` exists at
  all, matching or not: one unrelated cluster policy silently disables every namespace's
  policies. Here a namespaced policy applies whenever no cluster policy matches.
- Kosmos takes "the first" matching policy in its cache's listing order, which is a Go map's
  iteration order: with two matching policies the winner changes from pod to pod. Here: by name.
- One malformed selector in any policy makes Kosmos convert nothing for every pod (the listing
  returns an error). Here that policy alone is ignored, with an error naming the object and the
  field (:class:`PolicyError`); so is a policy with an unknown ``convertType`` or a value of the
  wrong type (the CRD's schema refuses both, so only a hand-made or older CRD lets them in).
- Kosmos' ``topologySpreadConstraintsConverter`` ``add`` tests the pod's *affinity* for
  emptiness (a copy-paste slip); here it tests the pod's topology spread constraints.
- ``add`` treats an empty list or map as absent (in Go a decoded empty JSON list is non-nil only
  when sent explicitly; on the wire both mean "none").
- Kosmos converts with whatever it could list and logs a failure to read the policies or the
  node; a leaf pod's spec cannot be changed afterwards, so here the converter raises
  :class:`ConvertNotReady` (the caller retries the pod with back-off) while the policies have not
  been listed or the virtual node is unknown.

Like Kosmos, the converters run on the leaf pod as the pod syncer has built it from the root pod
(uid, status, ownerRefs cleared, the ``kosmos.io/cluster-selector`` placement applied), so an
``add`` sees what that left. :func:`convert` is pure and deterministic: the same root pod,
policies and node give the same leaf pod on every pass (nothing is remembered between calls).
Policy edits reach only pods created afterwards and what pod updates carry (the annotation):
the converted scheduling fields of a pod are immutable.

:class:`ConvertPolicies` keeps the two kinds (and, unless given a lookup, the virtual nodes) in
root informers and hands out the pod syncer's hook: ``policies.converter(cluster)`` is a
``Callable[[leaf_pod, root_pod], leaf_pod]``.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from scheduler.kube import Api, Informer, wait_synced
from scheduler.policy import LEAF_NODE_LABEL, LEAF_NODE_VALUE
from scheduler.selectors import Matcher, SelectorError, label_selector
from tree.metrics import TreeMetrics

_log = logging.getLogger(__name__)

Obj = dict[str, Any]
#: The pod syncer's hook: (leaf pod as built, root pod) -> the leaf pod to write.
PodConverter = Callable[[Obj, Obj], Obj]
#: A virtual node by name (None when unknown).
NodeLookup = Callable[[str], Mapping[str, Any] | None]

GROUP_VERSION = "kosmos.io/v1alpha1"
POD_POLICIES = "podconvertpolicies"
CLUSTER_POLICIES = "clusterpodconvertpolicies"
POD_KIND = "PodConvertPolicy"
CLUSTER_KIND = "ClusterPodConvertPolicy"
#: The leaf pod's annotation naming the policy applied (Kosmos' ``utils.KosmosConvertLabels``).
POLICY_ANNOTATION = "kosmos-io/convert-policy"
#: Every virtual node of a leaf cluster carries ``kosmos.io/cluster=<cluster>`` (tree.forge).
CLUSTER_LABEL = "kosmos.io/cluster"

ADD, REMOVE, REPLACE = "add", "remove", "replace"
CONVERT_TYPES = (ADD, REMOVE, REPLACE)

#: converter key -> (pod spec field = the converter's value key, JSON type of the value).
CONVERTERS: dict[str, tuple[str, type]] = {
    "schedulerNameConverter": ("schedulerName", str),
    "nodeNameConverter": ("nodeName", str),
    "nodeSelectorConverter": ("nodeSelector", dict),
    "tolerationConverter": ("tolerations", list),
    "affinityConverter": ("affinity", dict),
    "topologySpreadConstraintsConverter": ("topologySpreadConstraints", list),
    "hostAliasesConverter": ("hostAliases", list),
}


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the object (kind, namespace/name) and
    the field. The policy is ignored; every other policy still applies."""


class ConvertNotReady(Exception):
    """The conversion cannot be decided yet (policies not listed, virtual node unknown): retry
    the pod later rather than create a leaf pod whose spec could never be corrected."""


@dataclass(frozen=True)
class Conversion:
    """One converter: what to do (``convert_type``) to which pod spec field, with what value."""

    field: str
    convert_type: str
    #: The converter's value for ``field`` (None when absent); never mutated, copied on use.
    value: Any


@dataclass(frozen=True)
class Policy:
    """A loaded, checked policy."""

    kind: str
    #: The policy's namespace (``None`` for a ClusterPodConvertPolicy).
    namespace: str | None
    name: str
    pods: Matcher
    nodes: Matcher
    #: The policy has a ``leafNodeSelector`` (so the virtual node's labels matter).
    node_selective: bool
    #: None: the policy has no ``converters`` (it matches but is never chosen).
    conversions: tuple[Conversion, ...] | None

    @property
    def cluster_scoped(self) -> bool:
        return self.namespace is None

    @property
    def ident(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"

    def selects_pod(self, namespace: str, pod_labels: Mapping[str, str]) -> bool:
        """The pod side of :meth:`matches` (namespace, ``labelSelector``)."""
        if self.namespace is not None and self.namespace != namespace:
            return False
        return self.pods(pod_labels)

    def matches(self, namespace: str, pod_labels: Mapping[str, str], node_labels: Mapping[str, str]) -> bool:
        return self.selects_pod(namespace, pod_labels) and self.nodes(node_labels)


def _ident(obj: Mapping[str, Any], kind: str) -> str:
    meta = obj.get("metadata") or {}
    ns, name = meta.get("namespace"), meta.get("name", "?")
    return f"{kind} {ns}/{name}" if ns and kind == POD_KIND else f"{kind} {name}"


def load(obj: Mapping[str, Any], kind: str | None = None) -> Policy:
    """A policy object checked and compiled; :class:`PolicyError` naming the object and field."""
    kind = kind or str(obj.get("kind") or "")
    if kind not in (POD_KIND, CLUSTER_KIND):
        raise PolicyError(f"{_ident(obj, kind or '?')}: kind must be {POD_KIND} or {CLUSTER_KIND}")
    who = _ident(obj, kind)
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{who}: metadata.name is missing")
    namespace: str | None = None
    if kind == POD_KIND:
        namespace = meta.get("namespace")
        if not isinstance(namespace, str) or not namespace:
            raise PolicyError(f"{who}: metadata.namespace is missing (a {POD_KIND} is namespaced)")
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise PolicyError(f"{who}: spec is missing or not an object")
    sel = spec.get("labelSelector")
    if not isinstance(sel, Mapping):
        raise PolicyError(f"{who}: spec.labelSelector is required (an object; {{}} selects every pod)")
    try:
        pods = _selector(sel, "spec.labelSelector")
        node_sel = spec.get("leafNodeSelector")
        if node_sel is None:
            nodes = label_selector({})
        elif isinstance(node_sel, Mapping):
            nodes = _selector(node_sel, "spec.leafNodeSelector")
        else:
            raise PolicyError("spec.leafNodeSelector: must be an object")
        conversions = _conversions(spec.get("converters"))
    except (PolicyError, SelectorError) as e:
        raise PolicyError(f"{who}: {e}") from None
    return Policy(kind, namespace, name, pods, nodes, node_sel is not None, conversions)


def _selector(sel: Mapping[str, Any], where: str) -> Matcher:
    ml = sel.get("matchLabels")
    if ml is not None and (not isinstance(ml, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in ml.items())):
        raise PolicyError(f"{where}.matchLabels: must map strings to strings")
    me = sel.get("matchExpressions")
    if me is not None and (not isinstance(me, list) or not all(isinstance(e, Mapping) for e in me)):
        raise PolicyError(f"{where}.matchExpressions: must be a list of requirements")
    return label_selector(sel, where=where)


def _conversions(converters: Any) -> tuple[Conversion, ...] | None:
    if converters is None:
        return None
    if not isinstance(converters, Mapping):
        raise PolicyError("spec.converters: must be an object")
    out: list[Conversion] = []
    for key, (field, typ) in CONVERTERS.items():
        c = converters.get(key)
        if c is None:
            continue
        where = f"spec.converters.{key}"
        if not isinstance(c, Mapping):
            raise PolicyError(f"{where}: must be an object")
        ct = c.get("convertType")
        if ct not in CONVERT_TYPES:
            raise PolicyError(f"{where}.convertType: {ct!r} is not one of {', '.join(CONVERT_TYPES)}")
        value = c.get(field)
        if value is not None and not isinstance(value, typ):
            raise PolicyError(f"{where}.{field}: must be {'a string' if typ is str else 'an ' + _json_type(typ)}")
        if isinstance(value, list) and not all(isinstance(v, Mapping) for v in value):
            raise PolicyError(f"{where}.{field}: every item must be an object")
        if field == "nodeSelector" and isinstance(value, Mapping) and not all(
                isinstance(v, str) for v in value.values()):
            raise PolicyError(f"{where}.{field}: must map strings to strings")
        out.append(Conversion(field, ct, copy.deepcopy(value)))
    # Keys not listed (none in Kosmos' CRD) are pruned by the API server; ignored here too.
    return tuple(out)


def _json_type(typ: type) -> str:
    return "object" if typ is dict else "array"


def load_all(objs: Iterable[Mapping[str, Any]], kind: str | None = None) -> tuple[list[Policy], list[PolicyError]]:
    """Every usable policy of ``objs`` and the errors of the others (each ignored)."""
    good: list[Policy] = []
    bad: list[PolicyError] = []
    for obj in objs:
        try:
            good.append(load(obj, kind))
        except PolicyError as e:
            bad.append(e)
    return good, bad


def choose(policies: Iterable[Policy], namespace: str, pod_labels: Mapping[str, str],
           node_labels: Mapping[str, str]) -> Policy | None:
    """The one policy that applies (module docstring, "precedence"), or None."""
    best: Policy | None = None
    for p in policies:
        if p.conversions is None or not p.matches(namespace, pod_labels, node_labels):
            continue
        if best is None or (not p.cluster_scoped, p.name) < (not best.cluster_scoped, best.name):
            best = p
    return best


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == {} or v == []


def apply(spec: Obj, conv: Conversion) -> None:
    """One converter on a pod spec (in place)."""
    if conv.convert_type == ADD and not _empty(spec.get(conv.field)):
        return
    if conv.convert_type == REMOVE or _empty(conv.value):
        spec.pop(conv.field, None)
    else:
        spec[conv.field] = copy.deepcopy(conv.value)


def convert(leaf_pod: Mapping[str, Any], root_pod: Mapping[str, Any], *, cluster: str,
            node_labels: Mapping[str, str], policies: Iterable[Policy]) -> Obj:
    """The leaf pod with the converters of the policy that applies (a new object; the inputs are
    not changed). ``node_labels``: the labels of the virtual node the root pod is bound to
    (``kosmos.io/cluster=<cluster>`` is assumed when missing); ``policies``: loaded ones of both
    kinds (:func:`load_all`).

    Only what a converter changes is copied: the pod and its spec one level deep (a converter
    sets or drops one spec field, with a copy of its value) and the metadata with its annotations.
    The rest is shared with ``leaf_pod``, so a pod no policy selects costs no copy of its spec
    (that deep copy was a seventh of the pod workers' CPU in a cProfile of 1,000 reflected pods)."""
    meta = root_pod.get("metadata") or {}
    labels = {CLUSTER_LABEL: cluster, **node_labels}
    chosen = choose(policies, str(meta.get("namespace") or ""), meta.get("labels") or {}, labels)
    out: Obj = dict(leaf_pod)
    if chosen is None or chosen.conversions is None:
        return out
    spec = dict(out.get("spec") or {})
    out["spec"] = spec
    for conv in chosen.conversions:
        apply(spec, conv)
    out_meta = dict(out.get("metadata") or {})
    out_meta["annotations"] = {**(out_meta.get("annotations") or {}), POLICY_ANNOTATION: chosen.name}
    out["metadata"] = out_meta
    _log.debug("pod %s/%s to %s: %s applied", meta.get("namespace"), meta.get("name"), cluster, chosen.ident)
    return out


class ConvertPolicies:
    """Root informers on both policy kinds (and on the virtual nodes, unless ``nodes`` looks
    them up elsewhere) and the pod syncer's hook.

    ``nodes``: a virtual node by name, e.g. from the manager's node informer; that store is
    replaced on every change, so pass ``lambda n: manager.nodes.store.get(n)``, not a bound
    ``store.get`` (which would keep reading the first store).

    A policy is loaded once per resourceVersion, when it arrives; an unusable one is logged
    once (warning, the object and the field), listed in :attr:`errors` (key -> message), counted
    in ``fabric_tree_convert_policy_errors``, and ignored. A CRD that is not installed counts as
    no policies (the informer retries it)."""

    def __init__(self, root: Api, *, nodes: NodeLookup | None = None, metrics: TreeMetrics | None = None) -> None:
        self.metrics = metrics
        self.cluster_informer = Informer(root, GROUP_VERSION, CLUSTER_POLICIES, copy_on_write=True)
        self.pod_informer = Informer(root, GROUP_VERSION, POD_POLICIES, copy_on_write=True)
        self.informers = [self.cluster_informer, self.pod_informer]
        for inf in self.informers:
            inf.add_handler(self._on_policy)
        self._node_informer: Informer | None = None
        if nodes is None:
            self._node_informer = Informer(root, "v1", "nodes", label_selector=f"{LEAF_NODE_LABEL}={LEAF_NODE_VALUE}",
                                           copy_on_write=True)
            self.informers.append(self._node_informer)
        self._nodes = nodes or self._own_node
        self._lock = threading.Lock()
        #: (kind, key) -> (resourceVersion, the policy or its error)
        self._loaded: dict[tuple[str, str], tuple[str, Policy | PolicyError]] = {}

    def _on_policy(self, _type: str, _old: Obj | None, _new: Obj | None) -> None:
        """Load (and so log and count) a policy when it arrives, not when a pod first needs it."""
        self.policies()

    def _own_node(self, name: str) -> Mapping[str, Any] | None:
        assert self._node_informer is not None
        return self._node_informer.store.get(name)  # the store is replaced on every change: read it afresh

    def start(self) -> None:
        for inf in self.informers:
            inf.start()

    def stop(self) -> None:
        for inf in self.informers:
            inf.stop()
        for inf in self.informers:
            inf.join(5.0)

    def synced(self) -> bool:
        return all(inf.synced.is_set() for inf in self.informers)

    def wait_synced(self, timeout: float | None = None) -> bool:
        return wait_synced(self.informers, timeout)

    @property
    def errors(self) -> dict[str, str]:
        """The unusable policies now in the root: ``<kind> <key>`` -> why."""
        self.policies()
        with self._lock:
            return {f"{kind} {key}": str(p) for (kind, key), (_rv, p) in self._loaded.items()
                    if isinstance(p, PolicyError)}

    def policies(self) -> list[Policy]:
        """Every usable policy of both kinds, as the informers hold them now."""
        out: list[Policy] = []
        seen: set[tuple[str, str]] = set()
        with self._lock:
            for kind, inf in ((CLUSTER_KIND, self.cluster_informer), (POD_KIND, self.pod_informer)):
                for key, obj in inf.store.items():
                    ident = (kind, key)
                    seen.add(ident)
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                    cached = self._loaded.get(ident)
                    if cached is None or cached[0] != rv or not rv:
                        try:
                            loaded: Policy | PolicyError = load(obj, kind)
                        except PolicyError as e:
                            loaded = e
                            _log.warning("pod convert policy ignored: %s", e)
                        cached = (rv, loaded)
                        self._loaded[ident] = cached
                    if isinstance(cached[1], Policy):
                        out.append(cached[1])
            for ident in [i for i in self._loaded if i not in seen]:
                del self._loaded[ident]
            if self.metrics is not None:
                self.metrics.convert_policy_errors.set(
                    sum(isinstance(p, PolicyError) for _rv, p in self._loaded.values()))
        return out

    def convert(self, leaf_pod: Obj, root_pod: Obj, cluster: str) -> Obj:
        """:func:`convert` with the policies and the virtual node the informers hold;
        :class:`ConvertNotReady` before they have listed or when the node is unknown."""
        meta = root_pod.get("metadata") or {}
        if not self.synced():
            raise ConvertNotReady("pod convert policies not listed yet")
        ns, labels = str(meta.get("namespace") or ""), meta.get("labels") or {}
        # Only the policies that select this pod can apply; the virtual node is needed only
        # when one of them has a leafNodeSelector.
        policies = [p for p in self.policies() if p.conversions is not None and p.selects_pod(ns, labels)]
        node_labels: Mapping[str, str] = {}
        if any(p.node_selective for p in policies):
            node_name = (root_pod.get("spec") or {}).get("nodeName") or ""
            node = self._nodes(node_name) if node_name else None
            if node is None:
                raise ConvertNotReady(f"pod {ns}/{meta.get('name')}: virtual node {node_name or '(none)'} "
                                      "unknown (its labels decide leafNodeSelector)")
            node_labels = (node.get("metadata") or {}).get("labels") or {}
        return convert(leaf_pod, root_pod, cluster=cluster, node_labels=node_labels, policies=policies)

    def converter(self, cluster: str) -> PodConverter:
        """The pod syncer's hook for the leaf ``cluster``."""
        def hook(leaf_pod: Obj, root_pod: Obj) -> Obj:
            return self.convert(leaf_pod, root_pod, cluster)
        return hook
