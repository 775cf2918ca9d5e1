"""LeafNodeVolumeBinding (filter): keeps stateful pods where their data is. It complements the
upstream VolumeBinding plugin (binding, provisioning, WaitForFirstConsumer), deciding only the
two things Kosmos adds:

* **Leaf-owned claims stay in their leaf.** ClusterTree marks a PVC (and its PV) that lives in a
  leaf cluster with the annotation ``kosmos-io/cluster-owners: <cluster>[,<cluster>...]``; a
  virtual node names its leaf cluster in the annotation ``kosmos-io/owned-by-cluster`` (Kosmos'
  pkg/utils/constants.go; a label of the same key is accepted too). A pod using such claims may
  only go to a virtual node whose cluster every one of them lists: real nodes and other leaves
  are rejected (Kosmos compared the whole annotation string; we read the comma-separated list).
* **Pods with bound local volumes never move.** For a claim bound to a PV that no leaf owns,
  the PV's ``spec.nodeAffinity.required`` (every local PV has one) must match the node, virtual
  nodes included (Kosmos skipped this on leaf nodes).

Per pod, in order: ``pre_filter`` resolves the pod's claims (``spec.volumes[].persistentVolumeClaim``
and generic ephemeral volumes, ``<pod>-<volume>``) through the ``persistentvolumeclaims`` and
``persistentvolumes`` listers into the owner set and the node affinities, SKIP when neither
applies; ``filter`` rejects nodes, UnschedulableAndUnresolvable. A claim that does not exist yet
or is unbound without an owner is upstream VolumeBinding's business, not ours.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
    error,
    unresolvable,
)
from scheduler.policy import PolicyError, is_leaf_node, node_selector_matches

_log = logging.getLogger(__name__)

CLUSTER_OWNERS = "kosmos-io/cluster-owners"
OWNED_BY_CLUSTER = "kosmos-io/owned-by-cluster"
#: Upstream VolumeBinding's reason for a bound PV whose node affinity excludes the node.
ERR_NODE_CONFLICT = "node(s) had volume node affinity conflict"
_STATE_KEY = "PreFilterLeafNodeVolumeBinding"


def owners_of(obj: Mapping[str, Any]) -> frozenset[str] | None:
    """The leaf clusters an object's ``kosmos-io/cluster-owners`` lists, None without it."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(CLUSTER_OWNERS)
    if raw is None:
        return None
    return frozenset(p.strip() for p in str(raw).split(",") if p.strip())


def node_cluster(node: Mapping[str, Any]) -> str | None:
    meta = node.get("metadata") or {}
    return (meta.get("annotations") or {}).get(OWNED_BY_CLUSTER) or (meta.get("labels") or {}).get(OWNED_BY_CLUSTER)


def pod_claim_names(pod: Mapping[str, Any]) -> list[str]:
    name = (pod.get("metadata") or {}).get("name", "")
    out = []
    for v in (pod.get("spec") or {}).get("volumes") or []:
        if v.get("persistentVolumeClaim"):
            out.append(str(v["persistentVolumeClaim"].get("claimName", "")))
        elif v.get("ephemeral"):
            out.append(f"{name}-{v.get('name', '')}")
    return out


@dataclass
class _State:
    #: Clusters allowed by every leaf-owned claim (None: no claim is leaf-owned).
    owners: frozenset[str] | None = None
    #: Which claims made the owner set, for the reason text.
    owned_claims: list[str] = field(default_factory=list)
    #: (pv name, nodeAffinity.required) of bound PVs no leaf owns.
    affinities: list[tuple[str, Mapping[str, Any]]] = field(default_factory=list)


class LeafNodeVolumeBinding:
    """PreFilter + Filter plugin; see the module header."""

    name = "LeafNodeVolumeBinding"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle

    def _compute(self, pod: PodInfo) -> _State:
        ns = (pod.pod.get("metadata") or {}).get("namespace", "")
        pvcs = self.handle.lister("persistentvolumeclaims")
        pvs = self.handle.lister("persistentvolumes")
        st = _State()
        for claim in pod_claim_names(pod.pod):
            pvc = pvcs.get(f"{ns}/{claim}")
            if pvc is None:
                continue  # upstream VolumeBinding reports a missing claim
            pv_name = (pvc.get("spec") or {}).get("volumeName") or ""
            pv = pvs.get(pv_name) if pv_name else None
            owners = owners_of(pvc)
            if owners is None and pv is not None:
                owners = owners_of(pv)
            if owners is not None:
                st.owners = owners if st.owners is None else st.owners & owners
                st.owned_claims.append(f"{ns}/{claim}")
                continue
            required = (((pv or {}).get("spec") or {}).get("nodeAffinity") or {}).get("required")
            if required is not None:
                st.affinities.append((pv_name, required))
        return st

    def pre_filter(self, state: CycleState, pod: PodInfo,
                   nodes: list[NodeInfo]) -> tuple[PreFilterResult | None, Status]:
        st = self._compute(pod)
        state.write(_STATE_KEY, st)
        if st.owners is None and not st.affinities:
            return None, SKIP
        if st.owners is not None and not st.owners:
            return None, unresolvable(f"the pod's claims {', '.join(st.owned_claims)} are owned by no common "
                                      f"leaf cluster ({CLUSTER_OWNERS})")
        return None, SUCCESS

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        st = state.get(_STATE_KEY)
        if st is None:
            st = self._compute(pod)
        if st.owners is not None:
            cluster = node_cluster(node.node)
            if not is_leaf_node(node.node) or cluster not in st.owners:
                return unresolvable(f"node(s) were not in the leaf cluster owning the pod's volumes "
                                    f"({CLUSTER_OWNERS}: {','.join(sorted(st.owners))})")
        for pv_name, required in st.affinities:
            try:
                ok = node_selector_matches(required, node.node,
                                           f"PersistentVolume {pv_name}: spec.nodeAffinity.required")
            except PolicyError as e:
                return error(str(e))
            if not ok:
                return unresolvable(ERR_NODE_CONFLICT)
        return SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return [ClusterEvent("PersistentVolumeClaim", "Add"), ClusterEvent("PersistentVolumeClaim", "Update"),
                ClusterEvent("PersistentVolume", "Add"), ClusterEvent("PersistentVolume", "Update"),
                ClusterEvent("Node", "Add"), ClusterEvent("Node", "Update")]
