"""The scheduler's cache: every node with the pods on it (bound and assumed), after upstream's
``pkg/scheduler/backend/cache`` and the NodeInfo bookkeeping of ``framework/types.go``.

In order:

1. Quantities and pod requests: :func:`parse_quantity`, :func:`pod_info` (upstream
   ``resource.PodRequests``: containers plus restartable init containers, the largest init
   container, pod overhead; ``non_zero_requests`` with upstream's defaults for scoring).
2. NodeInfo arithmetic: :func:`add_pod`, :func:`remove_pod`, :func:`set_node` keep the running
   totals in O(1) per change and bump ``generation`` from one global counter.
3. :class:`Cache`: the pods' states. ``assume`` (Reserve) puts a pod on its chosen node before the
   bind; ``finish_binding`` starts its expiry clock; the informer's ``add_pod`` for a bound pod
   confirms it; ``forget`` (failed bind) takes it off. With ``ttl == 0`` (upstream's value since
   kubernetes#106361) assumed pods never expire: only the watch or a failed bind ends them.
4. :class:`NodeSnapshot`: the per-cycle view. ``Cache.update_snapshot`` copies only NodeInfos whose
   generation is newer than the snapshot's (nodes are kept in most-recently-changed order, so the
   walk stops at the first unchanged one), and rebuilds the node list (zones interleaved, as
   upstream's nodeTree) only when nodes come or go.

Thread-safety: :class:`Cache` methods take its lock; a snapshot belongs to the scheduling thread.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from scheduler.framework import NodeInfo, Obj, PodInfo, Resource

_log = logging.getLogger(__name__)

#: Upstream's defaults for containers that request nothing (``util.DefaultMilliCPURequest`` and
#: ``DefaultMemoryRequest``): only for scoring, so zero-request pods do not all pile on one node.
DEFAULT_MILLI_CPU_REQUEST = 100
DEFAULT_MEMORY_REQUEST = 200 * 1024 * 1024

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
            "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
            "P": Fraction(10**15), "E": Fraction(10**18)}
_qcache: dict[str, Fraction] = {}


def parse_quantity(q: Any) -> Fraction:
    """A resource quantity (``"500m"``, ``"1Gi"``, ``"1e3"``, ``2``) as an exact fraction;
    ValueError names the bad text."""
    if isinstance(q, int | float | Fraction):
        return Fraction(q)
    s = str(q).strip()
    hit = _qcache.get(s)
    if hit is not None:
        return hit
    num, mult = s, Fraction(1)
    if s[-2:] in _BINARY:
        num, mult = s[:-2], Fraction(_BINARY[s[-2:]])
    elif s and s[-1] in _DECIMAL and s[-1] not in "0123456789":
        num, mult = s[:-1], _DECIMAL[s[-1]]
    try:
        val = Fraction(Decimal(num)) * mult
    except (InvalidOperation, ValueError) as e:
        raise ValueError(f"quantity {q!r} is not a Kubernetes quantity") from e
    if len(_qcache) < 4096:
        _qcache[s] = val
    return val


def milli_value(q: Any) -> int:
    """Upstream ``Quantity.MilliValue``: thousandths, rounded up."""
    return math.ceil(parse_quantity(q) * 1000)


def value(q: Any) -> int:
    """Upstream ``Quantity.Value``: rounded up to an integer."""
    return math.ceil(parse_quantity(q))


def is_scalar_resource(name: str) -> bool:
    """Upstream ``IsScalarResourceName``: extended (domain-prefixed), hugepages, attachable volumes."""
    return "/" in name or name.startswith(("hugepages-", "attachable-volumes-"))


def resource_from_list(rl: Mapping[str, Any] | None) -> Resource:
    """``framework.NewResource`` of a ResourceList (requests, allocatable)."""
    r = Resource()
    for k, v in (rl or {}).items():
        if k == "cpu":
            r.milli_cpu += milli_value(v)
        elif k == "memory":
            r.memory += value(v)
        elif k == "pods":
            r.allowed_pod_number += value(v)
        elif k == "ephemeral-storage":
            r.ephemeral_storage += value(v)
        elif is_scalar_resource(k):
            r.scalar[k] = r.scalar.get(k, 0) + value(v)
    return r


def _add_list(acc: dict[str, Fraction], rl: Mapping[str, Any]) -> None:
    for k, v in rl.items():
        acc[k] = acc.get(k, Fraction(0)) + parse_quantity(v)


def _max_list(acc: dict[str, Fraction], rl: Mapping[str, Fraction]) -> None:
    for k, v in rl.items():
        if v > acc.get(k, Fraction(0)):
            acc[k] = v


def pod_requests(pod: Obj, defaults: Mapping[str, Fraction] | None = None) -> dict[str, Fraction]:
    """Upstream ``resource.PodRequests``: sum of the containers and restartable (sidecar) init
    containers, at least each regular init container (plus the sidecars started before it), plus
    ``spec.overhead``. Pod-level ``spec.resources.requests`` replace the container totals for the
    resources they name (PodLevelResources). ``defaults`` fill keys a container leaves out
    (``NonMissingContainerRequests``, used for the non-zero requests)."""
    spec = pod.get("spec") or {}

    def creq(c: Obj) -> Mapping[str, Any]:
        r: Mapping[str, Any] = (c.get("resources") or {}).get("requests") or {}
        if defaults:
            merged: dict[str, Any] = dict(r)
            for k, v in defaults.items():
                merged.setdefault(k, v)
            return merged
        return r

    reqs: dict[str, Fraction] = {}
    for c in spec.get("containers") or []:
        _add_list(reqs, creq(c))
    restartable: dict[str, Fraction] = {}
    init_max: dict[str, Fraction] = {}
    for c in spec.get("initContainers") or []:
        cr = creq(c)
        if c.get("restartPolicy") == "Always":
            _add_list(reqs, cr)
            _add_list(restartable, cr)
            cur = dict(restartable)
        else:
            cur = {}
            _add_list(cur, cr)
            for k, v in restartable.items():
                cur[k] = cur.get(k, Fraction(0)) + v
        _max_list(init_max, cur)
    _max_list(reqs, init_max)
    pod_level = (spec.get("resources") or {}).get("requests") or {}
    for k, v in pod_level.items():
        if k in ("cpu", "memory") or k.startswith("hugepages-"):
            reqs[k] = parse_quantity(v)
    _add_list(reqs, spec.get("overhead") or {})
    return reqs


def _to_resource(reqs: Mapping[str, Fraction]) -> Resource:
    r = Resource()
    for k, v in reqs.items():
        if k == "cpu":
            r.milli_cpu = math.ceil(v * 1000)
        elif k == "memory":
            r.memory = math.ceil(v)
        elif k == "pods":
            r.allowed_pod_number = math.ceil(v)
        elif k == "ephemeral-storage":
            r.ephemeral_storage = math.ceil(v)
        elif is_scalar_resource(k):
            r.scalar[k] = math.ceil(v)
    return r


def pod_info(pod: Obj) -> PodInfo:
    """Parse a pod once: its effective requests, non-zero requests and pod-affinity terms."""
    reqs = pod_requests(pod)
    requests = _to_resource(reqs)
    non_zero = Resource(milli_cpu=requests.milli_cpu, memory=requests.memory)
    pod_level = ((pod.get("spec") or {}).get("resources") or {}).get("requests") or {}
    if not pod_level:
        missing: dict[str, Fraction] = {}
        if requests.milli_cpu == 0:
            missing["cpu"] = Fraction(DEFAULT_MILLI_CPU_REQUEST, 1000)
        if requests.memory == 0:
            missing["memory"] = Fraction(DEFAULT_MEMORY_REQUEST)
        if missing:
            nz = _to_resource(pod_requests(pod, missing))
            non_zero = Resource(milli_cpu=nz.milli_cpu, memory=nz.memory)
    aff = (pod.get("spec") or {}).get("affinity") or {}
    pa, paa = aff.get("podAffinity") or {}, aff.get("podAntiAffinity") or {}
    return PodInfo(
        pod=pod, requests=requests, non_zero_requests=non_zero,
        required_affinity=list(pa.get("requiredDuringSchedulingIgnoredDuringExecution") or []),
        required_anti_affinity=list(paa.get("requiredDuringSchedulingIgnoredDuringExecution") or []),
        preferred_affinity=list(pa.get("preferredDuringSchedulingIgnoredDuringExecution") or []),
        preferred_anti_affinity=list(paa.get("preferredDuringSchedulingIgnoredDuringExecution") or []),
    )


# --- NodeInfo bookkeeping ---------------------------------------------------------------------

_generation = itertools.count(1)


def next_generation() -> int:
    """Upstream's global ``nextGeneration``: every NodeInfo change gets a fresh, larger number."""
    return next(_generation)


def _has_affinity(pi: PodInfo) -> bool:
    aff = (pi.pod.get("spec") or {}).get("affinity") or {}
    return bool(aff.get("podAffinity") or aff.get("podAntiAffinity"))


def host_ports(pod: Obj) -> list[tuple[str, str, int]]:
    """(protocol, hostIP, hostPort) per container port with a hostPort (defaults TCP, 0.0.0.0)."""
    out = []
    spec = pod.get("spec") or {}
    for c in itertools.chain(spec.get("initContainers") or [], spec.get("containers") or []):
        for p in c.get("ports") or []:
            hp = p.get("hostPort") or 0
            if hp > 0:
                out.append((p.get("protocol") or "TCP", p.get("hostIP") or "0.0.0.0", int(hp)))
    return out


def pvc_keys(pod: Obj) -> list[str]:
    ns = pod["metadata"].get("namespace", "")
    return [f"{ns}/{v['persistentVolumeClaim']['claimName']}" for v in (pod.get("spec") or {}).get("volumes") or []
            if v.get("persistentVolumeClaim")]


def add_pod(ni: NodeInfo, pi: PodInfo) -> None:
    """NodeInfo.AddPodInfo: the pod and its requests, ports and claims count on the node."""
    ni.pods.append(pi)
    if _has_affinity(pi):
        ni.pods_with_affinity.append(pi)
    if pi.required_anti_affinity:
        ni.pods_with_required_anti_affinity.append(pi)
    _update(ni, pi, 1)


def remove_pod(ni: NodeInfo, key: str) -> PodInfo | None:
    """NodeInfo.RemovePod by ``ns/name``; the removed PodInfo (None: it was not there)."""
    found = None
    for i, p in enumerate(ni.pods):
        if p.key == key:
            found = ni.pods.pop(i)
            break
    if found is None:
        return None
    ni.pods_with_affinity = [p for p in ni.pods_with_affinity if p.key != key]
    ni.pods_with_required_anti_affinity = [p for p in ni.pods_with_required_anti_affinity if p.key != key]
    _update(ni, found, -1)
    return found


def _update(ni: NodeInfo, pi: PodInfo, sign: int) -> None:
    if sign > 0:
        ni.requested.add(pi.requests)
        ni.non_zero_requested.milli_cpu += pi.non_zero_requests.milli_cpu
        ni.non_zero_requested.memory += pi.non_zero_requests.memory
        for port in host_ports(pi.pod):
            ni.used_ports.add(port)
        for k in pvc_keys(pi.pod):
            ni.pvc_ref_counts[k] = ni.pvc_ref_counts.get(k, 0) + 1
    else:
        ni.requested.sub(pi.requests)
        ni.non_zero_requested.milli_cpu -= pi.non_zero_requests.milli_cpu
        ni.non_zero_requested.memory -= pi.non_zero_requests.memory
        for port in host_ports(pi.pod):
            ni.used_ports.discard(port)
        for k in pvc_keys(pi.pod):
            n = ni.pvc_ref_counts.get(k, 0) - 1
            if n > 0:
                ni.pvc_ref_counts[k] = n
            else:
                ni.pvc_ref_counts.pop(k, None)
    ni.generation = next_generation()


def set_node(ni: NodeInfo, node: Obj) -> None:
    """NodeInfo.SetNode: the node object and its allocatable."""
    ni.node = node
    ni.allocatable = resource_from_list((node.get("status") or {}).get("allocatable"))
    ni.generation = next_generation()


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
        self.generation = 0

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

    def _remove(self, key: str, node: str) -> None:
        n = self._nodes.get(node)
        if n is None:
            return
        remove_pod(n.info, key)
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
            self._remove(key, st.node)
            del self._pods[key]
            self._assumed.discard(key)

    def is_assumed(self, key: str) -> bool:
        with self._lock:
            return key in self._assumed

    def add_pod(self, pod: Obj) -> None:
        """A bound pod from the informer; confirms an assumed one (moving it if the API says it
        landed elsewhere)."""
        pi = pod_info(pod)
        node = pod["spec"]["nodeName"]
        with self._lock:
            st = self._pods.get(pi.key)
            if st is not None:
                if st.assumed and st.node == node:
                    # Confirmation: swap in the API's object (same requests), keep the totals.
                    self._remove(pi.key, st.node)
                    self._add(pi, node)
                    self._pods[pi.key] = _PodState(pi, node)
                    self._assumed.discard(pi.key)
                    return
                self._remove(pi.key, st.node)
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
            self._remove(key, st.node)
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
                    self._remove(key, st.node)
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
                if not n.has_node:
                    if snap.node_info_map.pop(name, None) is not None:
                        affinity_changed = True
                    continue
                old = snap.node_info_map.get(name)
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
                snap.node_info_list = interleave_zones(
                    snap.node_info_map[k] for k in sorted(snap.node_info_map))
                self._membership_changed = False
                affinity_changed = True
            if affinity_changed:
                snap.with_affinity = [ni for ni in snap.node_info_list if ni.pods_with_affinity]
                snap.with_required_anti_affinity = [ni for ni in snap.node_info_list
                                                    if ni.pods_with_required_anti_affinity]
