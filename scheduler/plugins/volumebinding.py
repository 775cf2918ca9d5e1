"""VolumeBinding and VolumeZone (upstream ``plugins/volumebinding``, ``plugins/volumezone``).

VolumeBinding, one pod's claims through the cycle:

1. PreFilter reads the pod's claims (``persistentVolumeClaim`` volumes and generic ephemeral
   volumes) from the handle's listers. A missing claim, a claim being deleted, or an unbound claim
   of an Immediate class (the PV controller binds those, not us: ``pod has unbound immediate
   PersistentVolumeClaims``) reject the pod outright. Bound claims keep their PV; unbound claims of
   a WaitForFirstConsumer class are "to bind".
2. Filter per node: every bound PV's ``spec.nodeAffinity`` must select the node
   (``node(s) had volume node affinity conflict``; a bound PV that does not exist:
   ``node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)``). Each claim to
   bind needs either an Available static PV that matches it (class, access modes, volumeMode,
   selector, capacity, node affinity to this node; the smallest wins, as ``FindMatchingVolume``)
   or a class with a provisioner whose ``allowedTopologies`` admit the node; a claim already
   carrying ``volume.kubernetes.io/selected-node`` fits only that node. Otherwise
   ``node(s) didn't find available persistent volumes to bind``. All UnschedulableAndUnresolvable.
   The per-node decision is kept in the cycle state; on a ClusterTree virtual node
   (``kosmos.io/node=true``) it is empty: the leaf binds, the tree manager mirrors the PV back.
3. Reserve assumes the chosen static PVs (no other pod may pick them until the bind lands or is
   undone); Unreserve forgets them.
4. PreBind writes through the handle's API client (``handle.api.patch``, or ``handle.api_patch``;
   a JSON merge patch): a static PV gets
   ``spec.claimRef`` (+ ``pv.kubernetes.io/bound-by-controller``) and the PV controller completes
   the binding; a claim to provision gets ``volume.kubernetes.io/selected-node`` and the
   provisioner reacts. Then it waits, bounded by ``bindTimeoutSeconds`` (600), until every claim
   is bound in the lister (``spec.volumeName`` and ``pv.kubernetes.io/bind-completed``); a claim
   whose selected-node annotation vanished means provisioning failed there (error, the pod is
   retried).

VolumeZone: a bound PV labelled with a zone/region (``topology.kubernetes.io/zone`` and the beta
keys; several values joined by ``__``) fits only nodes in one of those zones
(``node(s) had no available volume zone``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scheduler.framework import (
    SKIP,
    SUCCESS,
    ClusterEvent,
    Code,
    CycleState,
    Handle,
    NodeInfo,
    Obj,
    PodInfo,
    PreFilterResult,
    Status,
    error,
    unresolvable,
)
from scheduler.plugins.helpers import arg
from scheduler.podutil import QuantityError, pvc_names, value
from scheduler.policy import is_leaf_node
from scheduler.selectors import NodeSelector, label_selector

_log = logging.getLogger(__name__)

ERR_BIND_CONFLICT = "node(s) didn't find available persistent volumes to bind"
ERR_NODE_CONFLICT = "node(s) had volume node affinity conflict"
ERR_NOT_ENOUGH_SPACE = "node(s) did not have enough free storage"
ERR_PV_NOT_EXIST = "node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)"
ERR_UNBOUND_IMMEDIATE = "pod has unbound immediate PersistentVolumeClaims"
ERR_NO_ZONE = "node(s) had no available volume zone"

ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_BIND_COMPLETED = "pv.kubernetes.io/bind-completed"
ANN_BOUND_BY_CONTROLLER = "pv.kubernetes.io/bound-by-controller"
NO_PROVISIONER = "kubernetes.io/no-provisioner"

ZONE_LABELS = ("topology.kubernetes.io/zone", "topology.kubernetes.io/region",
               "failure-domain.beta.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/region")

_STATE = "PreFilterVolumeBinding"
#: Seconds the lister may lag behind our own PreBind patch before a missing annotation counts.
_LISTER_GRACE = 2.0


def _lister(handle: Handle, resource: str) -> Mapping[str, Obj]:
    try:
        return handle.lister(resource)
    except KeyError:
        return {}


def api_patcher(handle: Any) -> Callable[[str, Obj], Any] | None:
    """How PreBind writes: the handle's ``api_patch(path, body)`` if it has one, else its
    ``api.patch(path, body)`` (the scheduler's client; both send a JSON merge patch)."""
    fn = getattr(handle, "api_patch", None)
    if fn is None:
        fn = getattr(getattr(handle, "api", None), "patch", None)
    return fn if callable(fn) else None


def _ns_name(key: str) -> tuple[str, str]:
    ns, _, name = key.partition("/")
    return ns, name


def claim_request(pvc: Obj) -> int:
    q = (((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
    try:
        return value(q) if q is not None else 0
    except QuantityError:
        return 0


def pv_capacity(pv: Obj) -> int:
    q = ((pv.get("spec") or {}).get("capacity") or {}).get("storage")
    try:
        return value(q) if q is not None else 0
    except QuantityError:
        return 0


def _pv_node_selector(pv: Obj) -> NodeSelector | None:
    req = (((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required"))
    if req is None:
        return None
    return NodeSelector(req.get("nodeSelectorTerms") or ())


def _claim_ref_is(pv: Obj, pvc: Obj) -> bool:
    ref = (pv.get("spec") or {}).get("claimRef")
    if not ref:
        return False
    meta = pvc.get("metadata") or {}
    if ref.get("namespace") != meta.get("namespace") or ref.get("name") != meta.get("name"):
        return False
    return not ref.get("uid") or ref.get("uid") == meta.get("uid")


def _access_ok(pvc: Obj, pv: Obj) -> bool:
    have = set((pv.get("spec") or {}).get("accessModes") or ())
    return all(m in have for m in (pvc.get("spec") or {}).get("accessModes") or ())


@dataclass
class _Candidate:
    pv: Obj
    name: str
    capacity: int
    selector: NodeSelector | None
    prebound: bool


@dataclass
class _ToBind:
    key: str
    pvc: Obj
    selected_node: str | None
    candidates: list[_Candidate]
    provisioner: str
    allowed_topologies: list[Obj]


@dataclass
class _Decision:
    static: list[tuple[str, Obj, str]] = field(default_factory=list)  # (claim key, pvc, pv name)
    provision: list[tuple[str, Obj]] = field(default_factory=list)


@dataclass
class _State:
    bound: list[tuple[str, NodeSelector | None, bool]]  # (pv name, selector, exists)
    to_bind: list[_ToBind]
    decisions: dict[str, _Decision] = field(default_factory=dict)


def _topology_ok(terms: list[Obj], labels: Mapping[str, str]) -> bool:
    """``v1helper.MatchTopologySelectorTerms``: no terms admit everything; terms are ORed,
    ``matchLabelExpressions`` within a term ANDed (key's value in values)."""
    if not terms:
        return True
    for t in terms:
        if all(labels.get(e.get("key", "")) in (e.get("values") or ()) for e in t.get("matchLabelExpressions") or ()):
            return True
    return False


class VolumeBinding:
    name = "VolumeBinding"
    #: A pod without claims (PreFilter answered Skip) has nothing to bind: the framework may
    #: skip PreBind too (upstream's PreBindPreFlight).
    skip_pre_bind_with_pre_filter = True

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        self.bind_timeout = float(arg(args, "bindTimeoutSeconds", 600))
        self.poll_interval = 0.1
        self._lock = threading.Lock()
        #: PV name -> claim key it is assumed for (Reserve .. bind landed or Unreserve).
        self._assumed: dict[str, str] = {}

    # -- prefilter ------------------------------------------------------------------------
    def pre_filter(self, state: CycleState, pod: PodInfo,
                   nodes: list[NodeInfo]) -> tuple[PreFilterResult | None, Status]:
        keys = list(pvc_names(pod.pod))
        if not keys:
            return None, SKIP
        pvcs = _lister(self.handle, "persistentvolumeclaims")
        pvs = _lister(self.handle, "persistentvolumes")
        classes = _lister(self.handle, "storageclasses")
        bound: list[tuple[str, NodeSelector | None, bool]] = []
        to_bind: list[_ToBind] = []
        immediate = False
        for key in keys:
            pvc = pvcs.get(key)
            _, cname = _ns_name(key)
            if pvc is None:
                return None, unresolvable(f'persistentvolumeclaim "{cname}" not found').with_plugin(self.name)
            if (pvc.get("metadata") or {}).get("deletionTimestamp"):
                return None, unresolvable(f'persistentvolumeclaim "{cname}" is being deleted').with_plugin(self.name)
            spec = pvc.get("spec") or {}
            vname = spec.get("volumeName")
            if vname:
                pv = pvs.get(vname)
                bound.append((vname, _pv_node_selector(pv) if pv else None, pv is not None))
                continue
            cls_name = spec.get("storageClassName") or ""
            sc = classes.get(cls_name) if cls_name else None
            if cls_name and sc is None:  # upstream IsDelayBindingMode: an error, retried with back-off
                return None, error(f'storageclass.storage.k8s.io "{cls_name}" not found').with_plugin(self.name)
            if sc is None or sc.get("volumeBindingMode") != "WaitForFirstConsumer":
                immediate = True
                continue
            ann = (pvc.get("metadata") or {}).get("annotations") or {}
            to_bind.append(_ToBind(key, pvc, ann.get(ANN_SELECTED_NODE), self._candidates(pvc, pvs.values()),
                                   str(sc.get("provisioner") or ""), list(sc.get("allowedTopologies") or ())))
        if immediate:
            return None, unresolvable(ERR_UNBOUND_IMMEDIATE).with_plugin(self.name)
        state.write(_STATE, _State(bound, to_bind))
        return None, SUCCESS

    def _candidates(self, pvc: Obj, pvs: Iterable[Obj]) -> list[_Candidate]:
        """The PVs that could take the claim on some node, smallest first (``FindMatchingVolume``
        without the node part, which Filter checks)."""
        spec = pvc.get("spec") or {}
        cls = spec.get("storageClassName") or ""
        mode = spec.get("volumeMode") or "Filesystem"
        request = claim_request(pvc)
        sel = label_selector(spec["selector"]) if spec.get("selector") is not None else None
        out = []
        for pv in pvs:
            pspec = pv.get("spec") or {}
            meta = pv.get("metadata") or {}
            if meta.get("deletionTimestamp") or (pspec.get("storageClassName") or "") != cls:
                continue
            prebound = _claim_ref_is(pv, pvc)
            if pspec.get("claimRef") and not prebound:
                continue
            if not prebound and ((pv.get("status") or {}).get("phase") or "Available") != "Available":
                continue
            if (pspec.get("volumeMode") or "Filesystem") != mode or not _access_ok(pvc, pv):
                continue
            cap = pv_capacity(pv)
            if cap < request:
                continue
            if sel is not None and not prebound and not sel(meta.get("labels") or {}):
                continue
            out.append(_Candidate(pv, meta.get("name", ""), cap, _pv_node_selector(pv), prebound))
        out.sort(key=lambda c: (not c.prebound, c.capacity, c.name))
        return out

    # -- filter ---------------------------------------------------------------------------
    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        s: _State | None = state.get(_STATE)
        if s is None:
            return SUCCESS
        bound_ok = True
        pvs_found = True
        for _name, sel, exists in s.bound:
            if not exists:
                pvs_found = False
            elif sel is not None and not sel.match(node.node):
                bound_ok = False
        unbound_ok = True
        decision = _Decision()
        if s.to_bind and bound_ok and pvs_found:
            chosen: set[str] = set()
            with self._lock:
                assumed = dict(self._assumed)
            for tb in s.to_bind:
                if tb.selected_node is not None:
                    if tb.selected_node != node.name:
                        unbound_ok = False
                        break
                    if not self._can_provision(tb, node):
                        unbound_ok = False
                        break
                    decision.provision.append((tb.key, tb.pvc))
                    continue
                pick = None
                for c in tb.candidates:
                    if c.name in chosen or assumed.get(c.name, tb.key) != tb.key:
                        continue
                    if c.selector is not None and not c.selector.match(node.node):
                        continue
                    pick = c
                    break
                if pick is not None:
                    chosen.add(pick.name)
                    decision.static.append((tb.key, tb.pvc, pick.name))
                elif self._can_provision(tb, node):
                    decision.provision.append((tb.key, tb.pvc))
                else:
                    unbound_ok = False
                    break
        reasons = []
        if not bound_ok:
            reasons.append(ERR_NODE_CONFLICT)
        if not unbound_ok:
            reasons.append(ERR_BIND_CONFLICT)
        if not pvs_found:
            reasons.append(ERR_PV_NOT_EXIST)
        if reasons:
            return Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE, tuple(reasons), self.name)
        # A ClusterTree virtual node: its leaf provisions and binds the claim once the pod is
        # there, and the tree manager mirrors the PV back; nothing to write or wait for here
        # (Kosmos' LeafNodeVolumeBinding skips Reserve and PreBind on leaf nodes). Waiting would
        # deadlock: the pod reaches the leaf only once bound.
        s.decisions[node.name] = _Decision() if is_leaf_node(node.node) else decision
        return SUCCESS

    @staticmethod
    def _can_provision(tb: _ToBind, node: NodeInfo) -> bool:
        if not tb.provisioner or tb.provisioner == NO_PROVISIONER:
            return False
        return _topology_ok(tb.allowed_topologies, node.labels)

    # -- reserve / prebind ----------------------------------------------------------------
    def reserve(self, state: CycleState, pod: PodInfo, node_name: str) -> Status:
        s: _State | None = state.get(_STATE)
        if s is None:
            return SUCCESS
        d = s.decisions.get(node_name)
        if d is None:
            return error(f"VolumeBinding: no volume decision for pod {pod.key} on node {node_name}")
        with self._lock:
            for key, _pvc, pv in d.static:
                owner = self._assumed.get(pv)
                if owner is not None and owner != key:
                    return error(f"VolumeBinding: persistentvolume {pv} is already assumed for claim {owner}")
            for key, _pvc, pv in d.static:
                self._assumed[pv] = key
        return SUCCESS

    def unreserve(self, state: CycleState, pod: PodInfo, node_name: str) -> None:
        s: _State | None = state.get(_STATE)
        d = s.decisions.get(node_name) if s is not None else None
        if d is None:
            return
        with self._lock:
            for key, _pvc, pv in d.static:
                if self._assumed.get(pv) == key:
                    del self._assumed[pv]

    def pre_bind(self, state: CycleState, pod: PodInfo, node_name: str) -> Status:
        s: _State | None = state.get(_STATE)
        if s is None:
            return SUCCESS
        d = s.decisions.get(node_name)
        if d is None or (not d.static and not d.provision):
            return SUCCESS
        patch = api_patcher(self.handle)
        if patch is None:
            return error("VolumeBinding: the scheduler's handle has no API client (api.patch) to bind volumes with")
        try:
            for key, pvc, pv in d.static:
                meta = pvc.get("metadata") or {}
                patch(f"/api/v1/persistentvolumes/{pv}", {
                    "metadata": {"annotations": {ANN_BOUND_BY_CONTROLLER: "yes"}},
                    "spec": {"claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                                          "namespace": meta.get("namespace"), "name": meta.get("name"),
                                          "uid": meta.get("uid"),
                                          "resourceVersion": meta.get("resourceVersion")}}})
                _log.info("pod %s: persistentvolume %s bound to claim %s for node %s", pod.key, pv, key, node_name)
            for key, pvc in d.provision:
                ns, name = _ns_name(key)
                ann = ((pvc.get("metadata") or {}).get("annotations") or {}).get(ANN_SELECTED_NODE)
                if ann != node_name:
                    patch(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}",
                          {"metadata": {"annotations": {ANN_SELECTED_NODE: node_name}}})
                    _log.info("pod %s: claim %s to be provisioned on node %s", pod.key, key, node_name)
        except Exception as e:  # the API said no: retry the pod later, as upstream
            return error(f"binding volumes: {e}")
        return self._wait_bound(pod, d, node_name)

    def _wait_bound(self, pod: PodInfo, d: _Decision, node_name: str) -> Status:
        keys = [k for k, _p, _v in d.static] + [k for k, _p in d.provision]
        provisioned = {k for k, _p in d.provision}
        started = time.monotonic()
        deadline = started + self.bind_timeout
        while True:
            pvcs = _lister(self.handle, "persistentvolumeclaims")
            pending = []
            for k in keys:
                pvc = pvcs.get(k)
                if pvc is None:
                    return error(f'binding volumes: persistentvolumeclaim "{_ns_name(k)[1]}" not found')
                meta = pvc.get("metadata") or {}
                ann = meta.get("annotations") or {}
                if (pvc.get("spec") or {}).get("volumeName") and ANN_BIND_COMPLETED in ann:
                    continue
                # The provisioner drops the annotation when it cannot provision there (after a
                # grace period: the lister may not show our own patch yet).
                if k in provisioned and ann.get(ANN_SELECTED_NODE) != node_name and \
                        time.monotonic() - started > _LISTER_GRACE:
                    return error(f"binding volumes: provisioning failed for PVC {_ns_name(k)[1]!r}")
                pending.append(k)
            if not pending:
                with self._lock:
                    for key, _pvc, pv in d.static:
                        if self._assumed.get(pv) == key:
                            del self._assumed[pv]
                return SUCCESS
            if time.monotonic() >= deadline:
                return error(f"binding volumes: timed out waiting for the condition (claims {', '.join(pending)})")
            time.sleep(self.poll_interval)

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("PersistentVolumeClaim", "Add"), ClusterEvent("PersistentVolumeClaim", "Update"),
                ClusterEvent("PersistentVolume", "Add"), ClusterEvent("PersistentVolume", "Update"),
                ClusterEvent("StorageClass", "Add"), ClusterEvent("StorageClass", "Update"),
                ClusterEvent("Node", "Add"), ClusterEvent("Node", "UpdateNodeLabel"))


class VolumeZone:
    """Bound PVs' zone/region labels against the node's (``plugins/volumezone``)."""

    name = "VolumeZone"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle

    def pre_filter(self, state: CycleState, pod: PodInfo,
                   nodes: list[NodeInfo]) -> tuple[PreFilterResult | None, Status]:
        keys = list(pvc_names(pod.pod))
        if not keys:
            return None, SKIP
        pvcs = _lister(self.handle, "persistentvolumeclaims")
        pvs = _lister(self.handle, "persistentvolumes")
        constraints: list[tuple[str, frozenset[str]]] = []
        for key in keys:
            vname = ((pvcs.get(key) or {}).get("spec") or {}).get("volumeName")
            pv = pvs.get(vname) if vname else None
            if pv is None:
                continue  # unbound or missing: VolumeBinding speaks for those
            labels = (pv.get("metadata") or {}).get("labels") or {}
            for k in ZONE_LABELS:
                if k in labels:
                    constraints.append((k, frozenset(labels[k].split("__"))))
        if not constraints:
            return None, SKIP
        state.write("PreFilterVolumeZone", constraints)
        return None, SUCCESS

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        constraints = state.get("PreFilterVolumeZone")
        if not constraints:
            return SUCCESS
        labels = node.labels
        if not any(k in labels for k in ZONE_LABELS):
            return SUCCESS  # upstream: a node without any zone label is not checked
        for k, values in constraints:
            if labels.get(k) not in values:
                return unresolvable(ERR_NO_ZONE).with_plugin(self.name)
        return SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return (ClusterEvent("PersistentVolumeClaim", "Add"), ClusterEvent("PersistentVolumeClaim", "Update"),
                ClusterEvent("PersistentVolume", "Add"), ClusterEvent("PersistentVolume", "Update"),
                ClusterEvent("StorageClass", "Add"), ClusterEvent("Node", "Add"),
                ClusterEvent("Node", "UpdateNodeLabel"))
