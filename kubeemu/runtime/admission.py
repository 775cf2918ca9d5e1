"""Node capacity and the kubelet's resource admission (upstream ``lifecycle.PredicateAdmitHandler``).

A lab node declares its capacity (``cpu``, ``memory``, ``pods``, ``ephemeral-storage`` and any
extended resource such as ``example.com/gpu``); the kubelet reports it as the Node's
``status.capacity`` and, with nothing reserved, as ``status.allocatable``. Before running a Pod
bound to the node the kubelet checks, as upstream's ``noderesources.Fits`` does when called by
the kubelet's admit handler, in this order:

1. the pod count: admitted non-terminal pods + 1 must not exceed ``pods``;
2. each requested resource (cpu in millicores, everything else as an integer): the requests of
   the admitted pods plus this pod's must not exceed allocatable. A pod's request per resource
   is ``max(sum over app containers (+ sidecars), max over init containers) + overhead``
   (``resourcehelper.PodRequests``); a container's missing request defaults to its limit as
   the API server's defaulting does. Extended resources the node does not have are dropped
   before the check (``removeMissingExtendedResources``: the scheduler judged those).

The first failure rejects the pod: ``phase: Failed``, ``reason: OutOf<resource>``, message
``Pod was rejected: Node didn't have enough resource: cpu, requested: 5000, used: 0, capacity: 4000``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubeemu import quantity

#: A lab node's capacity when the topology declares none (and the base the declared one extends).
DEFAULT_CAPACITY: dict[str, str] = {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi"}

STANDARD = ("cpu", "memory", "ephemeral-storage")
_EXTENDED_RE = re.compile(r"^(?:[a-z0-9]([-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)/[A-Za-z0-9]"
                          r"(?:[-A-Za-z0-9_.]*[A-Za-z0-9])?$")


class CapacityError(ValueError):
    """A node's declared capacity is unusable; the message names the node, resource and value."""


def is_extended(name: str) -> bool:
    """Upstream ``IsExtendedResourceName``: a domain-prefixed name outside ``kubernetes.io``."""
    return "/" in name and not name.split("/", 1)[0].endswith("kubernetes.io") and bool(_EXTENDED_RE.match(name))


def node_capacity(node: str, declared: Mapping[str, Any] | None) -> dict[str, int]:
    """The node's capacity as kubelet integers (cpu in millicores): defaults, then ``declared``."""
    merged: dict[str, Any] = {**DEFAULT_CAPACITY, **(declared or {})}
    out: dict[str, int] = {}
    for name, raw in merged.items():
        if name not in (*STANDARD, "pods") and not name.startswith("hugepages-") and not is_extended(name):
            raise CapacityError(f"node {node}: resource {name!r} is neither cpu, memory, pods, ephemeral-storage, "
                                "hugepages-<size> nor an extended resource (domain/name, e.g. example.com/gpu)")
        try:
            amount = quantity.parse(raw)
        except quantity.QuantityError as e:
            raise CapacityError(f"node {node}: resources.{name}: {e}") from e
        if amount < 0:
            raise CapacityError(f"node {node}: resources.{name}: {raw!r} is negative")
        if (name == "pods" or is_extended(name)) and amount.denominator != 1:
            raise CapacityError(f"node {node}: resources.{name}: {raw!r} must be a whole number")
        out[name] = quantity.scaled(name, amount)
    return out


def render(capacity: Mapping[str, int]) -> dict[str, str]:
    """Capacity integers as the quantity strings a Node's status carries."""
    return {k: quantity.format_value(k, v) for k, v in sorted(capacity.items())}


def _container_requests(c: Mapping[str, Any]) -> dict[str, int]:
    res = c.get("resources") or {}
    merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}  # request defaults to limit
    out: dict[str, int] = {}
    for name, raw in merged.items():
        try:
            out[name] = quantity.scaled(name, raw)
        except quantity.QuantityError:
            continue  # the API server validates quantities; an unparsable one requests nothing here
    return out


def _add(into: dict[str, int], more: Mapping[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def pod_requests(pod: Mapping[str, Any]) -> dict[str, int]:
    """Upstream ``resourcehelper.PodRequests``: max(app + sidecars, each init + sidecars so far) + overhead."""
    spec = pod.get("spec") or {}
    total: dict[str, int] = {}
    for c in spec.get("containers") or []:
        _add(total, _container_requests(c))
    sidecars: dict[str, int] = {}
    init_max: dict[str, int] = {}
    for c in spec.get("initContainers") or []:
        req = _container_requests(c)
        if c.get("restartPolicy") == "Always":  # a sidecar keeps running next to the app containers
            _add(sidecars, req)
            cur = dict(sidecars)
        else:
            cur = dict(req)
            _add(cur, sidecars)
        for k, v in cur.items():
            init_max[k] = max(init_max.get(k, 0), v)
    _add(total, sidecars)
    for k, v in init_max.items():
        total[k] = max(total.get(k, 0), v)
    overhead = spec.get("overhead") or {}
    _add(total, {k: quantity.scaled(k, v) for k, v in overhead.items()})
    return total


@dataclass(frozen=True)
class Rejection:
    """Why a pod does not fit: the status ``reason`` and ``message`` upstream writes."""

    resource: str
    requested: int
    used: int
    capacity: int

    @property
    def reason(self) -> str:
        return f"OutOf{self.resource}"

    @property
    def message(self) -> str:
        return (f"Pod was rejected: Node didn't have enough resource: {self.resource}, requested: {self.requested}, "
                f"used: {self.used}, capacity: {self.capacity}")


def fits(pod: Mapping[str, Any], admitted: Iterable[Mapping[str, Any]],
         allocatable: Mapping[str, int]) -> Rejection | None:
    """None if ``pod`` fits next to the ``admitted`` (non-terminal) pods of the node, else the first shortfall."""
    admitted = list(admitted)
    allowed = allocatable.get("pods", 0)
    if len(admitted) + 1 > allowed:
        return Rejection("pods", 1, len(admitted), allowed)
    want = {k: v for k, v in pod_requests(pod).items() if not is_extended(k) or k in allocatable}
    if not any(want.values()):
        return None
    used: dict[str, int] = {}
    for p in admitted:
        _add(used, pod_requests(p))
    extended = sorted(k for k in want if k not in STANDARD)
    for name in (*STANDARD, *extended):
        req = want.get(name, 0)
        if req == 0:
            continue
        cap = allocatable.get(name, 0)
        if req > cap - used.get(name, 0):
            return Rejection(name, req, used.get(name, 0), cap)
    return None
