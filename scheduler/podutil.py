"""Pods and nodes into the framework's typed values: quantities, pod requests, NodeInfo upkeep.

What the cache and the plugins share, after upstream's ``k8s.io/component-helpers/resource``
(``PodRequests``), ``pkg/scheduler/util`` (non-zero defaults) and ``framework/types.go``
(``NewNodeInfo``, ``AddPodInfo``, ``RemovePod``). In the order a pod goes through it:

1. :func:`parse_quantity` / :func:`milli_value` / :func:`value`: ``500m``, ``8Gi``, ``1.5``
   exactly as ``resource.Quantity`` (rounded up), cached because the same strings recur in every
   pod of a Deployment.
2. :func:`pod_requests`: the effective request of a pod (containers summed, restartable init
   containers (sidecars) added, each classic init container taken as a max against what runs
   beside it, pod overhead added), and with ``non_zero=True`` the scoring variant where a
   container that asks for no cpu/memory counts as 100m / 200Mi (upstream
   ``DefaultMilliCPURequest``/``DefaultMemoryRequest``) so empty pods do not all pile on one node.
3. :func:`new_pod_info`: a :class:`~scheduler.framework.PodInfo` with both requests and the pod's
   affinity terms.
4. :func:`new_node_info` (allocatable from ``status.allocatable``), :func:`add_pod` /
   :func:`remove_pod` keeping the running totals, host ports and PVC reference counts of a
   :class:`~scheduler.framework.NodeInfo` that the filters read in O(1).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Any

from scheduler.framework import NodeInfo, Obj, PodInfo, Resource

#: Upstream ``schedutil.DefaultMilliCPURequest`` / ``DefaultMemoryRequest``: what a container
#: with no request counts for in scoring (never in filtering).
DEFAULT_MILLI_CPU_REQUEST = 100
DEFAULT_MEMORY_REQUEST = 200 * 1024 * 1024

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
            "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
            "P": Fraction(10**15), "E": Fraction(10**18)}
_QUANTITY_RE = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")

#: Upstream's ``nextGeneration()``: one counter for all NodeInfos, so a generation never repeats
#: even for a node deleted and added again (caches keyed on (node name, generation) stay right).
_generations = itertools.count(1)


def next_generation() -> int:
    return next(_generations)


CPU = "cpu"
MEMORY = "memory"
EPHEMERAL_STORAGE = "ephemeral-storage"
PODS = "pods"


class QuantityError(ValueError):
    """A string that is not a Kubernetes quantity; the message names it and where it came from."""


@functools.lru_cache(maxsize=4096)
def _parse_str(text: str) -> Fraction:
    m = _QUANTITY_RE.match(text.strip())
    if m is None:
        raise QuantityError(f"{text!r} is not a quantity (expected e.g. '500m', '4', '8Gi', '1.5G', '2e3')")
    number = Fraction(m.group(1))
    suffix = m.group(2) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    return number * Fraction(10) ** int(suffix[1:])


def parse_quantity(q: Any) -> Fraction:
    """The exact value of a quantity (str, or the int/float a YAML manifest may carry)."""
    if isinstance(q, bool):
        raise QuantityError(f"{q!r} is not a quantity")
    if isinstance(q, int):
        return Fraction(q)
    if isinstance(q, float):
        return Fraction(str(q))
    if isinstance(q, str):
        return _parse_str(q)
    raise QuantityError(f"{q!r} is not a quantity")


def value(q: Any) -> int:
    """``Quantity.Value()``: rounded up to an integer (memory, storage, pods, extended)."""
    if isinstance(q, str):
        return _value_str(q)
    return math.ceil(parse_quantity(q))


def milli_value(q: Any) -> int:
    """``Quantity.MilliValue()``: thousandths rounded up (cpu is counted in millicores)."""
    if isinstance(q, str):
        return _milli_value_str(q)
    return math.ceil(parse_quantity(q) * 1000)


# Every pod event parses its requests again (the informer's PodInfo, the cache's on the bind's
# confirmation), nearly always the same few strings: the integers are remembered, not only the
# exact value (Fraction arithmetic costs microseconds per quantity).
@functools.lru_cache(maxsize=4096)
def _value_str(text: str) -> int:
    return math.ceil(_parse_str(text))


@functools.lru_cache(maxsize=4096)
def _milli_value_str(text: str) -> int:
    return math.ceil(_parse_str(text) * 1000)


def is_scalar_resource(name: str) -> bool:
    """Upstream ``schedutil.IsScalarResourceName``: extended (``example.com/gpu``), hugepages,
    attachable volumes and prefixed native resources; everything the Resource keeps in ``scalar``."""
    return name not in (CPU, MEMORY, EPHEMERAL_STORAGE, PODS)


def is_extended_resource(name: str) -> bool:
    """``v1helper.IsExtendedResourceName``: a domain-qualified name outside ``kubernetes.io/``
    (``example.com/gpu``); the only resources ``ignoredResources`` can ignore."""
    if "/" not in name or name.startswith("requests."):
        return False
    domain = name.split("/", 1)[0]
    return not (domain == "kubernetes.io" or domain.endswith(".kubernetes.io"))


def resource_list(rl: Any, where: str = "") -> Resource:
    """A ``ResourceList`` (``{"cpu": "500m", "memory": "1Gi", "pods": "110"}``) as a Resource."""
    r = Resource()
    if not rl:
        return r
    for name, q in rl.items():
        try:
            if name == CPU:
                r.milli_cpu = milli_value(q)
            elif name == MEMORY:
                r.memory = value(q)
            elif name == EPHEMERAL_STORAGE:
                r.ephemeral_storage = value(q)
            elif name == PODS:
                r.allowed_pod_number = value(q)
            else:
                r.scalar[name] = value(q)
        except QuantityError as e:
            raise QuantityError(f"{where}{'.' if where else ''}{name}: {e}") from None
    return r


def _max_into(acc: Resource, other: Resource) -> None:
    acc.milli_cpu = max(acc.milli_cpu, other.milli_cpu)
    acc.memory = max(acc.memory, other.memory)
    acc.ephemeral_storage = max(acc.ephemeral_storage, other.ephemeral_storage)
    for k, v in other.scalar.items():
        if v > acc.scalar.get(k, 0):
            acc.scalar[k] = v


def _copy(r: Resource) -> Resource:
    return Resource(r.milli_cpu, r.memory, r.ephemeral_storage, r.allowed_pod_number, dict(r.scalar))


def _container_request(c: Obj, non_zero: bool, where: str) -> Resource:
    r = resource_list((c.get("resources") or {}).get("requests"), where)
    if non_zero:
        # Upstream's NonMissingContainerRequests: only a *missing* request gets the default;
        # an explicit "0" stays zero.
        reqs = (c.get("resources") or {}).get("requests") or {}
        if CPU not in reqs:
            r.milli_cpu = DEFAULT_MILLI_CPU_REQUEST
        if MEMORY not in reqs:
            r.memory = DEFAULT_MEMORY_REQUEST
    return r


def pod_requests(pod: Obj, non_zero: bool = False) -> Resource:
    """Upstream ``resource.PodRequests``: what the pod needs of a node.

    Regular containers are summed; a restartable init container (``restartPolicy: Always``, a
    sidecar) runs beside everything after it so it is added to the sum; every other init container
    runs alone (beside the sidecars started before it), so the result is the max of the sum and
    each such init container plus the sidecars before it. ``spec.overhead`` is added last."""
    spec = pod.get("spec") or {}
    name = (pod.get("metadata") or {}).get("name", "?")
    total = Resource()
    for c in spec.get("containers") or ():
        total.add(_container_request(c, non_zero, f"pod {name} container {c.get('name')} requests"))
    restartable = Resource()
    init_max = Resource()
    for c in spec.get("initContainers") or ():
        r = _container_request(c, non_zero, f"pod {name} initContainer {c.get('name')} requests")
        if c.get("restartPolicy") == "Always":
            total.add(r)
            restartable.add(r)
            r = _copy(restartable)
        else:
            r.add(restartable)
        _max_into(init_max, r)
    _max_into(total, init_max)
    pod_level = (spec.get("resources") or {}).get("requests")
    if pod_level:
        # PodLevelResources: pod-level requests replace the container totals for the resources
        # they name (cpu, memory, hugepages), defaults included.
        pl = resource_list(pod_level, f"pod {name} spec.resources.requests")
        if CPU in pod_level:
            total.milli_cpu = pl.milli_cpu
        if MEMORY in pod_level:
            total.memory = pl.memory
        for k, v in pl.scalar.items():
            if k.startswith("hugepages-"):
                total.scalar[k] = v
    overhead = spec.get("overhead")
    if overhead:
        total.add(resource_list(overhead, f"pod {name} spec.overhead"))
    return total


def _affinity_terms(pod: Obj) -> tuple[list[Obj], list[Obj], list[Obj], list[Obj]]:
    aff = (pod.get("spec") or {}).get("affinity") or {}
    pa = aff.get("podAffinity") or {}
    paa = aff.get("podAntiAffinity") or {}
    return (list(pa.get("requiredDuringSchedulingIgnoredDuringExecution") or ()),
            list(paa.get("requiredDuringSchedulingIgnoredDuringExecution") or ()),
            list(pa.get("preferredDuringSchedulingIgnoredDuringExecution") or ()),
            list(paa.get("preferredDuringSchedulingIgnoredDuringExecution") or ()))


def new_pod_info(pod: Obj) -> PodInfo:
    """A PodInfo with the filter requests, the scoring (non-zero) requests and the affinity terms."""
    ra, raa, pa, paa = _affinity_terms(pod)
    return PodInfo(pod=pod, requests=pod_requests(pod), non_zero_requests=pod_requests(pod, non_zero=True),
                   required_affinity=ra, required_anti_affinity=raa, preferred_affinity=pa,
                   preferred_anti_affinity=paa)


def allocatable(node: Obj) -> Resource:
    """The node's ``status.allocatable`` (upstream NodeInfo.Allocatable; capacity is not used)."""
    name = (node.get("metadata") or {}).get("name", "?")
    return resource_list((node.get("status") or {}).get("allocatable"), f"node {name} status.allocatable")


def new_node_info(node: Obj, pods: Iterable[PodInfo] = ()) -> NodeInfo:
    """A NodeInfo for ``node`` with ``pods`` already on it (upstream ``NewNodeInfo`` + SetNode)."""
    ni = NodeInfo(node=node, allocatable=allocatable(node), generation=next_generation())
    for p in pods:
        add_pod(ni, p)
    return ni


def set_node(ni: NodeInfo, node: Obj) -> None:
    """The node object changed (labels, taints, allocatable): keep the pods, refresh the rest."""
    ni.node = node
    ni.allocatable = allocatable(node)
    ni.generation = next_generation()


def host_ports(pod: Obj) -> Iterator[tuple[str, str, int]]:
    """(protocol, hostIP, hostPort) the pod wants (upstream ``util.GetHostPorts``: containers and
    restartable init containers; hostPort 0 is no host port; IP defaults to 0.0.0.0, protocol TCP)."""
    spec = pod.get("spec") or {}
    containers = list(spec.get("containers") or ())
    containers += [c for c in spec.get("initContainers") or () if c.get("restartPolicy") == "Always"]
    for c in containers:
        for p in c.get("ports") or ():
            hp = p.get("hostPort") or 0
            if hp <= 0:
                continue
            yield (p.get("protocol") or "TCP", p.get("hostIP") or "0.0.0.0", int(hp))


def pvc_names(pod: Obj) -> Iterator[str]:
    """The claims the pod uses, ``namespace/name``: ``persistentVolumeClaim`` volumes and generic
    ephemeral volumes (whose claim is named ``<pod>-<volume>``, upstream ``ephemeral.VolumeClaimName``)."""
    meta = pod.get("metadata") or {}
    ns = meta.get("namespace", "")
    for v in (pod.get("spec") or {}).get("volumes") or ():
        if v.get("persistentVolumeClaim"):
            yield f"{ns}/{v['persistentVolumeClaim'].get('claimName', '')}"
        elif v.get("ephemeral"):
            yield f"{ns}/{meta.get('name', '')}-{v.get('name', '')}"


def has_affinity(pi: PodInfo) -> bool:
    return bool(pi.required_affinity or pi.required_anti_affinity or pi.preferred_affinity
                or pi.preferred_anti_affinity)


def add_pod(ni: NodeInfo, pi: PodInfo) -> None:
    """Count ``pi`` on the node (upstream ``NodeInfo.AddPodInfo``): requests, ports, claims,
    the affinity indexes."""
    ni.pods.append(pi)
    if has_affinity(pi):
        ni.pods_with_affinity.append(pi)
    if pi.required_anti_affinity:
        ni.pods_with_required_anti_affinity.append(pi)
    ni.requested.add(pi.requests)
    ni.non_zero_requested.add(pi.non_zero_requests)
    for port in host_ports(pi.pod):
        ni.used_ports.add(port)
    for claim in pvc_names(pi.pod):
        ni.pvc_ref_counts[claim] = ni.pvc_ref_counts.get(claim, 0) + 1
    ni.generation = next_generation()


def remove_pod(ni: NodeInfo, pod: Obj) -> bool:
    """Take the pod (matched by UID, else by namespace/name) off the node; False if it was not
    there. Ports and claims are released as upstream ``NodeInfo.RemovePod`` does."""
    meta = pod.get("metadata") or {}
    uid = meta.get("uid")
    key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"

    def same(p: PodInfo) -> bool:
        return (p.uid == uid) if uid else (p.key == key)

    # The cache removes the very object it added: found by identity without building a key
    # per pod on the node; any other caller's copy by UID or name.
    idx = next((i for i, p in enumerate(ni.pods) if p.pod is pod), None)
    if idx is None:
        idx = next((i for i, p in enumerate(ni.pods) if same(p)), None)
    if idx is None:
        return False
    pi = ni.pods.pop(idx)
    ni.pods_with_affinity[:] = [p for p in ni.pods_with_affinity if p is not pi]
    ni.pods_with_required_anti_affinity[:] = [p for p in ni.pods_with_required_anti_affinity if p is not pi]
    ni.requested.sub(pi.requests)
    ni.non_zero_requested.sub(pi.non_zero_requests)
    for port in host_ports(pi.pod):
        ni.used_ports.discard(port)
    for claim in pvc_names(pi.pod):
        n = ni.pvc_ref_counts.get(claim, 0) - 1
        if n > 0:
            ni.pvc_ref_counts[claim] = n
        else:
            ni.pvc_ref_counts.pop(claim, None)
    ni.generation = next_generation()
    return True
