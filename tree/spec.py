"""ClusterTree's part of a ``Cluster`` (``spec.clusterTreeOptions``) read into a :class:`TreeSpec`.

Kosmos' field names are kept (``enable``, ``leafModels[]{leafNodeName, labels, taints,
nodeSelector{nodeName, labelSelector}}``), so its manifests apply unchanged; two fields are ours:
``kubeconfigSecretRef {namespace, name}`` (the leaf's kubeconfig, key ``kubeconfig`` of that
Secret, instead of Kosmos' inline ``spec.kubeconfig`` bytes that anyone who may read Clusters
could read) and ``leafNodeMode`` (``cluster``/``node``/``party``). In order:

1. The leaf mode: ``leafNodeMode`` when given; otherwise Kosmos' rule over ``leafModels``: none
   (or one with an empty ``nodeSelector``) -> ``cluster``, ``nodeSelector.nodeName`` -> ``node``,
   ``nodeSelector.labelSelector`` -> ``party``. Kosmos looks at ``leafModels[0]`` only and
   silently ignores a mix; a mix is refused here, naming the model.
2. The models, checked with field paths: party models need a ``leafNodeName`` (a DNS label, the
   virtual node is ``kosmos-<cluster>-<leafNodeName>``, unique) and a valid ``labelSelector``;
   node models select leaf nodes by ``nodeName`` or ``labelSelector`` (no model: every leaf
   node); a cluster-mode Cluster takes at most one model (its labels and taints). Labels may not
   set the keys the tree manager owns (``kosmos.io/node``, ``kosmos.io/cluster``).
3. :meth:`TreeSpec.model_for`: the model a leaf node belongs to, the *first* matching one, so a
   leaf node is counted in one virtual node only even when party selectors overlap.

A disabled tree is read without further checks (its other fields do not matter then).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scheduler.selectors import Matcher, SelectorError, label_selector

Obj = dict[str, Any]

GROUP_VERSION = "kosmos.io/v1alpha1"
PLURAL = "clusters"
#: The Secret key holding the leaf kubeconfig.
KUBECONFIG_KEY = "kubeconfig"
#: Label keys the tree manager sets itself; a model's labels may not override them.
RESERVED_LABELS = ("kosmos.io/node", "kosmos.io/cluster")

_TREE = "spec.clusterTreeOptions"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


class Mode(enum.StrEnum):
    CLUSTER = "cluster"
    NODE = "node"
    PARTY = "party"


class SpecError(ValueError):
    """A ``clusterTreeOptions`` the tree manager cannot act on; ``problems`` are (field path, reason)."""

    def __init__(self, cluster: str, problems: list[tuple[str, str]]) -> None:
        self.cluster = cluster
        self.problems = problems
        super().__init__(f"Cluster {cluster}: " + "; ".join(f"{p}: {r}" for p, r in problems))


@dataclass(frozen=True)
class LeafModel:
    """One ``leafModels`` item: which leaf nodes it takes and what its virtual node carries."""

    index: int
    #: ``leafNodeName``: the party's name (party mode), "" otherwise.
    name: str = ""
    #: ``nodeSelector.nodeName`` ("" when absent).
    node_name: str = ""
    #: ``nodeSelector.labelSelector`` compiled; None when absent.
    selector: Matcher | None = field(default=None, compare=False)
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Obj, ...] = ()

    def selects(self, node: Obj) -> bool:
        meta = node.get("metadata") or {}
        if self.node_name and meta.get("name") != self.node_name:
            return False
        if self.selector is not None and not self.selector(meta.get("labels") or {}):
            return False
        return bool(self.node_name) or self.selector is not None


@dataclass(frozen=True)
class TreeSpec:
    """What the tree manager does for one Cluster."""

    cluster: str
    uid: str
    enable: bool
    mode: Mode = Mode.CLUSTER
    models: tuple[LeafModel, ...] = ()
    secret_namespace: str = ""
    secret_name: str = ""
    #: The raw ``clusterTreeOptions``, to tell whether anything changed.
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def party_node_name(self, model: LeafModel) -> str:
        return f"kosmos-{self.cluster}-{model.name}"

    @property
    def cluster_node_name(self) -> str:
        return f"kosmos-{self.cluster}"

    def model_for(self, node: Obj) -> LeafModel | None:
        """The first model selecting ``node`` (cluster mode: the one model, if any)."""
        if self.mode is Mode.CLUSTER:
            return self.models[0] if self.models else None
        return next((m for m in self.models if m.selects(node)), None)


def read(cluster: Obj) -> TreeSpec:
    """``cluster``'s tree settings; :class:`SpecError` lists every problem with its field path."""
    meta = cluster.get("metadata") or {}
    name = str(meta.get("name") or "")
    uid = str(meta.get("uid") or "")
    raw = ((cluster.get("spec") or {}).get("clusterTreeOptions")) or {}
    problems: list[tuple[str, str]] = []
    if not isinstance(raw, Mapping):
        raise SpecError(name, [(_TREE, f"{raw!r} must be a mapping")])
    enable = raw.get("enable", False)
    if not isinstance(enable, bool):
        raise SpecError(name, [(f"{_TREE}.enable", f"{enable!r} must be true or false")])
    if not enable:
        return TreeSpec(name, uid, False, raw=raw)
    if not name or not _DNS_LABEL.match(name) or len(name) > 63:
        problems.append(("metadata.name", f"{name!r} must be a DNS label (it becomes the label kosmos.io/cluster)"))
    ref = raw.get("kubeconfigSecretRef")
    ns = sname = ""
    if not isinstance(ref, Mapping) or not ref.get("namespace") or not ref.get("name"):
        problems.append((f"{_TREE}.kubeconfigSecretRef", "is required with namespace and name when enable is true"))
    else:
        ns, sname = str(ref["namespace"]), str(ref["name"])
    raw_models = raw.get("leafModels") or []
    if not isinstance(raw_models, list):
        raise SpecError(name, [*problems, (f"{_TREE}.leafModels", f"{raw_models!r} must be a list")])
    models = [_model(i, m, problems) for i, m in enumerate(raw_models)]
    mode = _mode(raw.get("leafNodeMode"), models, problems)
    if mode is Mode.CLUSTER and len(models) > 1:
        problems.append((f"{_TREE}.leafModels", f"cluster mode takes at most one model (its labels and taints), "
                                                f"got {len(models)}"))
    seen: dict[str, int] = {}
    for m in models:
        where = f"{_TREE}.leafModels[{m.index}]"
        if mode is Mode.PARTY:
            if not m.name or not _DNS_LABEL.match(m.name):
                problems.append((f"{where}.leafNodeName", f"{m.name!r} must be a DNS label in party mode "
                                                          f"(the virtual node is kosmos-{name}-<leafNodeName>)"))
            elif len(f"kosmos-{name}-{m.name}") > 253:
                problems.append((f"{where}.leafNodeName", f"kosmos-{name}-{m.name} is longer than 253 characters"))
            elif m.name in seen:
                problems.append((f"{where}.leafNodeName", f"{m.name!r} is also leafModels[{seen[m.name]}]'s"))
            else:
                seen[m.name] = m.index
            if m.selector is None:
                problems.append((f"{where}.nodeSelector.labelSelector", "is required in party mode"))
        elif mode is Mode.NODE and not (m.node_name or m.selector is not None):
            problems.append((f"{where}.nodeSelector", "needs nodeName or labelSelector in node mode"))
    if problems:
        raise SpecError(name, problems)
    return TreeSpec(name, uid, True, mode, tuple(models), ns, sname, raw=raw)


def _mode(given: Any, models: list[LeafModel], problems: list[tuple[str, str]]) -> Mode:
    if given is not None:
        try:
            return Mode(given)
        except ValueError:
            problems.append((f"{_TREE}.leafNodeMode", f"{given!r} is not one of cluster, node, party"))
            return Mode.CLUSTER
    kinds = {("node" if m.node_name else "party" if m.selector is not None else "cluster") for m in models}
    if len(kinds) > 1:
        problems.append((f"{_TREE}.leafModels", "mixes nodeSelector.nodeName, nodeSelector.labelSelector and empty "
                                                "nodeSelectors; set leafNodeMode or use one kind"))
        return Mode.CLUSTER
    return Mode(kinds.pop()) if kinds else Mode.CLUSTER


def _model(i: int, raw: Any, problems: list[tuple[str, str]]) -> LeafModel:
    where = f"{_TREE}.leafModels[{i}]"
    if not isinstance(raw, Mapping):
        problems.append((where, f"{raw!r} must be a mapping"))
        return LeafModel(i)
    sel = raw.get("nodeSelector") or {}
    node_name = str(sel.get("nodeName") or "") if isinstance(sel, Mapping) else ""
    selector: Matcher | None = None
    raw_sel = sel.get("labelSelector") if isinstance(sel, Mapping) else None
    if raw_sel is not None:
        try:
            selector = label_selector(raw_sel, where=f"{where}.nodeSelector.labelSelector")
        except SelectorError as e:
            problems.append((f"{where}.nodeSelector.labelSelector", str(e)))
    labels = raw.get("labels") or {}
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in labels.items()):
        problems.append((f"{where}.labels", f"{labels!r} must map strings to strings"))
        labels = {}
    for k in RESERVED_LABELS:
        if k in labels:
            problems.append((f"{where}.labels[{k}]", "is set by the tree manager"))
    taints: list[Obj] = []
    for j, t in enumerate(raw.get("taints") or []):
        if not isinstance(t, Mapping) or not t.get("key") or t.get("effect") not in _EFFECTS:
            problems.append((f"{where}.taints[{j}]", f"{t!r} needs a key and an effect ({', '.join(_EFFECTS)})"))
            continue
        taints.append({k: t[k] for k in ("key", "value", "effect") if t.get(k) is not None})
    return LeafModel(i, str(raw.get("leafNodeName") or ""), node_name, selector, dict(labels), tuple(taints))
