"""The scheduler's cache: every node with the pods on it (bound and assumed), after upstream's
``pkg/scheduler/backend/cache`` and the NodeInfo bookkeeping of ``framework/types.go``.

In order:

1. Pods and nodes become PodInfo/NodeInfo through :mod:`scheduler.podutil` (quantities, upstream
   ``resource.PodRequests`` with the non-zero scoring defaults, ``add_pod``/``remove_pod``/
   ``set_node`` keeping the running totals in O(1) per change, and the one global
   ``next_generation`` counter the plugins' per-node caches rely on).
2. :class:`Cache`: the pods' states. ``assume`` (Reserve) puts a pod on its chosen node before the
   bind; ``finish_binding`` starts its expiry clock; the informer's ``add_pod`` for a bound pod
   confirms it; ``forget`` (failed bind) takes it off. With ``ttl == 0`` (upstream's value since
   kubernetes#106361) assumed pods never expire: only the watch or a failed bind ends them.
3. :class:`NodeSnapshot`: the per-cycle view. ``Cache.update_snapshot`` copies only NodeInfos whose
   generation is newer than the snapshot's (nodes are kept in most-recently-changed order, so the
   walk stops at the first unchanged one), and rebuilds the node list (zones interleaved, as
   upstream's nodeTree) only when nodes come or go. The snapshot logs the names it updated
   (:meth:`NodeSnapshot.changes_since`) for plugins that keep cluster-wide tables per node.

Thread-safety: :class:`Cache` methods take its lock; a snapshot belongs to the scheduling thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from scheduler.framework import NodeInfo, Obj, PodInfo, Resource
from scheduler.podutil import add_pod, new_pod_info, next_generation, remove_pod, set_node

_log = logging.getLogger(__name__)


def clone_resource(r: Resource) -> Resource:
    return Resource(r.milli_cpu, r.memory, r.ephemeral_storage, r.allowed_pod_number, dict(r.scalar))


def clone_node_info(ni: NodeInfo) -> NodeInfo:
    """NodeInfo.Snapshot: the lists and totals copied, the pod and node objects shared."""
    return NodeInfo(node=ni.node, pods=list(ni.pods), pods_with_affinity=list(ni.pods_with_affinity),
                    pods_with_required_anti_affinity=list(ni.pods_with_required_anti_affinity),
                    requested=clone_resource(ni.requested), non_zero_requested=clone_resource(ni.non_zero_requested),
                    allocatable=clone_resource(ni.allocatable), used_ports=set(ni.used_ports),
                    pvc_ref_counts=dict(ni.pvc_ref_counts), generation=ni.generation)


def zone_of(node: Obj) -> str:
    """Upstream ``utilnode.GetZoneKey``: region and zone labels (empty when neither is set)."""
    labels = node["metadata"].get("labels") or {}
    region = labels.get("topology.kubernetes.io/region", "")
    zone = labels.get("topology.kubernetes.io/zone", "")
    return f"{region}:\x00:{zone}" if region or zone else ""


def interleave_zones(nodes: Iterable[NodeInfo]) -> list[NodeInfo]:
    """Upstream nodeTree.list(): one node of each zone in turn, so a sample spans zones."""
    by_zone: dict[str, list[NodeInfo]] = {}
    for ni in nodes:
        by_zone.setdefault(zone_of(ni.node), []).append(ni)
    zones = list(by_zone.values())
    out: list[NodeInfo] = []
    i = 0
    while zones:
        nxt = []
        for z in zones:
            if i < len(z):
                out.append(z[i])
                nxt.append(z)
        zones = nxt
        i += 1
    return out


# --- the snapshot -----------------------------------------------------------------------------


class NodeSnapshot:
    """One cycle's view of the nodes (implements :class:`scheduler.framework.Snapshot`)."""

    def __init__(self) -> None:
        self.node_info_map: dict[str, NodeInfo] = {}
        self.node_info_list: list[NodeInfo] = []
        self.with_affinity: list[NodeInfo] = []
        self.with_required_anti_affinity: list[NodeInfo] = []
        #: Names of the cordoned nodes (``spec.unschedulable``): NodeUnschedulable has nothing to
        #: check per node while this is empty, which it nearly always is.
        self.unschedulable: set[str] = set()
        #: Names of the nodes with any taint: TaintToleration has nothing to check per node while
        #: this is empty.
        self.tainted: set[str] = set()
        self.generation = 0
        #: The change log: names of the NodeInfos updated (or gone) since position ``log_base``,
        #: in order; ``epoch`` moves when nodes come or go (or the log is cut), which makes
        #: every reader start over. See :meth:`changes_since`.
        self.log: list[str] = []
        self.log_base = 0
        self.epoch = 0

    def changes_since(self, cursor: tuple[int, int] | None) -> tuple[list[str] | None, tuple[int, int]]:
        """Names of the NodeInfos changed since ``cursor`` (a name may repeat), and the cursor to
        keep for next time; None instead of names when the reader must look at every node (its
        first call, nodes added or removed, or the log cut since).

        Why: plugins that keep per-node tables aggregated over the cluster (InterPodAffinity's
        index of existing pods' terms, PodTopologySpread's domain counts) update them from the
        few nodes that changed between two pods instead of visiting every node per pod."""
        end = (self.epoch, self.log_base + len(self.log))
        if cursor is None or cursor[0] != self.epoch or cursor[1] < self.log_base:
            return None, end
        return self.log[cursor[1] - self.log_base:], end

    def _logged(self, name: str) -> None:
        self.log.append(name)
        if len(self.log) > max(4096, 2 * len(self.node_info_map)):
            self._cut_log()

    def _cut_log(self) -> None:
        self.log_base += len(self.log)
        self.log = []
        self.epoch += 1

    def node_infos(self) -> list[NodeInfo]:
        return self.node_info_list

    def get(self, node_name: str) -> NodeInfo | None:
        return self.node_info_map.get(node_name)

    def have_pods_with_affinity(self) -> list[NodeInfo]:
        return self.with_affinity

    def have_pods_with_required_anti_affinity(self) -> list[NodeInfo]:
        return self.with_required_anti_affinity

    def num_nodes(self) -> int:
        return len(self.node_info_list)


# --- the cache --------------------------------------------------------------------------------


@dataclass
class _PodState:
    info: PodInfo
    node: str
    assumed: bool = False
    binding_finished: bool = False
    deadline: float | None = None


@dataclass
class _Node:
    info: NodeInfo
    #: Pods seen bound to a node the cache does not know yet (upstream keeps an "imaginary" node).
    has_node: bool = True
    pods: set[str] = field(default_factory=set)


class Cache:
    """Nodes and pods, assumed ones included (upstream ``cacheImpl``)."""

    def __init__(self, ttl: float = 0.0, clock: Any = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.RLock()
        #: name -> node, most recently changed last (the snapshot walks from the end).
        self._nodes: OrderedDict[str, _Node] = OrderedDict()
        self._pods: dict[str, _PodState] = {}  # ns/name -> state
        self._assumed: set[str] = set()
        #: Nodes added or removed since the last snapshot: the node list must be rebuilt.
        self._membership_changed = True

    # nodes

    def _touch(self, name: str) -> _Node:
        n = self._nodes.get(name)
        if n is None:
            n = _Node(NodeInfo(node={"metadata": {"name": name}}), has_node=False)
            n.info.generation = next_generation()
            self._nodes[name] = n
        self._nodes.move_to_end(name)
        return n

    def add_node(self, node: Obj) -> None:
        with self._lock:
            name = node["metadata"]["name"]
            n = self._touch(name)
            if not n.has_node:
                self._membership_changed = True
            n.has_node = True
            set_node(n.info, node)

    update_node = add_node

    def remove_node(self, name: str) -> None:
        """Upstream keeps pods of a deleted node until they are deleted too; the node leaves the
        snapshot at once."""
        with self._lock:
            n = self._nodes.get(name)
            if n is None:
                return
            self._membership_changed = True
            if n.pods:
                n.has_node = False
                n.info.node = {"metadata": {"name": name}}
                n.info.generation = next_generation()
                self._nodes.move_to_end(name)
            else:
                del self._nodes[name]

    def node_count(self) -> int:
        with self._lock:
            return sum(1 for n in self._nodes.values() if n.has_node)

    # pods

    def _add(self, pi: PodInfo, node: str) -> None:
        n = self._touch(node)
        add_pod(n.info, pi)
        n.pods.add(pi.key)

    def _remove(self, st: _PodState) -> None:
        node, key = st.node, st.info.key
        n = self._nodes.get(node)
        if n is None:
            return
        remove_pod(n.info, st.info.pod)
        n.pods.discard(key)
        self._nodes.move_to_end(node)
        if not n.has_node and not n.pods:
            del self._nodes[node]
            self._membership_changed = True

    def assume(self, pi: PodInfo, node: str) -> None:
        """Reserve: the pod counts on ``node`` until the watch confirms the bind or it is forgotten."""
        with self._lock:
            if pi.key in self._pods:
                raise ValueError(f"pod {pi.key} is already in the cache (state {self._pods[pi.key]})")
            self._add(pi, node)
            self._pods[pi.key] = _PodState(pi, node, assumed=True)
            self._assumed.add(pi.key)

    def finish_binding(self, key: str) -> None:
        """The bind request returned: the expiry clock (``ttl``) starts now."""
        with self._lock:
            st = self._pods.get(key)
            if st is not None and st.assumed:
                st.binding_finished = True
                st.deadline = self.clock() + self.ttl if self.ttl > 0 else None

    def forget(self, key: str) -> None:
        """The bind failed: the assumed pod leaves its node."""
        with self._lock:
            st = self._pods.get(key)
            if st is None or not st.assumed:
                return
            self._remove(st)
            del self._pods[key]
            self._assumed.discard(key)

    def is_assumed(self, key: str) -> bool:
        with self._lock:
            return key in self._assumed

    def add_pod(self, pod: Obj) -> None:
        """A bound pod from the informer; confirms an assumed one (moving it if the API says it
        landed elsewhere)."""
        pi = new_pod_info(pod)
        node = pod["spec"]["nodeName"]
        with self._lock:
            st = self._pods.get(pi.key)
            if st is not None:
                if st.assumed and st.node == node:
                    # Confirmation: swap in the API's object (same requests), keep the totals.
                    self._remove(st)
                    self._add(pi, node)
                    self._pods[pi.key] = _PodState(pi, node)
                    self._assumed.discard(pi.key)
                    return
                self._remove(st)
                self._assumed.discard(pi.key)
            self._add(pi, node)
            self._pods[pi.key] = _PodState(pi, node)

    def update_pod(self, pod: Obj) -> None:
        self.add_pod(pod)

    def remove_pod(self, key: str) -> None:
        with self._lock:
            st = self._pods.pop(key, None)
            if st is None:
                return
            self._remove(st)
            self._assumed.discard(key)

    def pod_node(self, key: str) -> str | None:
        with self._lock:
            st = self._pods.get(key)
            return None if st is None else st.node

    def cleanup_expired(self) -> list[str]:
        """Drop assumed pods whose bind finished more than ``ttl`` ago without the watch
        confirming it (never with ``ttl == 0``). Returns their keys."""
        if self.ttl <= 0:
            return []
        now = self.clock()
        out = []
        with self._lock:
            for key in list(self._assumed):
                st = self._pods[key]
                if st.binding_finished and st.deadline is not None and now > st.deadline:
                    _log.warning("assumed pod %s expired on node %s: the bind was never confirmed", key, st.node)
                    self._remove(st)
                    del self._pods[key]
                    self._assumed.discard(key)
                    out.append(key)
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"nodes": sum(1 for n in self._nodes.values() if n.has_node), "pods": len(self._pods),
                    "assumed": len(self._assumed)}

    # snapshot

    def update_snapshot(self, snap: NodeSnapshot) -> None:
        """Bring ``snap`` up to date, copying only NodeInfos changed since its generation."""
        with self._lock:
            top = snap.generation
            affinity_changed = False
            for name in reversed(self._nodes):
                n = self._nodes[name]
                if n.info.generation <= snap.generation:
                    break
                top = max(top, n.info.generation)
                snap._logged(name)
                if not n.has_node:
                    snap.unschedulable.discard(name)
                    snap.tainted.discard(name)
                    if snap.node_info_map.pop(name, None) is not None:
                        affinity_changed = True
                    continue
                old = snap.node_info_map.get(name)
                spec = n.info.node.get("spec") or {}
                if spec.get("unschedulable"):
                    snap.unschedulable.add(name)
                else:
                    snap.unschedulable.discard(name)
                if spec.get("taints"):
                    snap.tainted.add(name)
                else:
                    snap.tainted.discard(name)
                clone = clone_node_info(n.info)
                if old is None or bool(old.pods_with_affinity) != bool(clone.pods_with_affinity) or \
                        bool(old.pods_with_required_anti_affinity) != bool(clone.pods_with_required_anti_affinity):
                    affinity_changed = True
                if old is None:
                    snap.node_info_map[name] = clone
                else:
                    # Update in place so the node list keeps pointing at the current object.
                    old.__dict__.update(clone.__dict__)
            snap.generation = top
            if self._membership_changed:
                for name in [k for k in snap.node_info_map if k not in self._nodes or not self._nodes[k].has_node]:
                    del snap.node_info_map[name]
                    snap.unschedulable.discard(name)
                    snap.tainted.discard(name)
                snap.node_info_list = interleave_zones(
                    snap.node_info_map[k] for k in sorted(snap.node_info_map))
                self._membership_changed = False
                affinity_changed = True
                snap._cut_log()
            if affinity_changed:
                snap.with_affinity = [ni for ni in snap.node_info_list if ni.pods_with_affinity]
                snap.with_required_anti_affinity = [ni for ni in snap.node_info_list
                                                    if ni.pods_with_required_anti_affinity]
