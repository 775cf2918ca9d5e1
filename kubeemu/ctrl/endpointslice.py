"""The EndpointSlice controller (``--controllers endpointslice``): after upstream's
``pkg/controller/endpointslice`` and ``staging/src/k8s.io/endpointslice`` (reconciler.go,
utils.go), the API the lab's kube-proxy (:mod:`kubeemu.proxy`) and every other consumer reads.

For each Service **with a selector** (and not ``type: ExternalName``), in this order:

1. the address types it serves (:func:`address_types`): ``spec.ipFamilies``, else the family of
   its ClusterIP, else (headless, not yet defaulted) both;
2. the desired endpoints (:func:`desired_endpoints`): every pod of its namespace matching the
   selector that may be an endpoint (not Succeeded/Failed, has an IP; terminating pods stay with
   ``terminating: true``), one endpoint per address type the pod has an IP of, grouped by the
   pod's resolved ports (a named ``targetPort`` is looked up in each pod's containers, so two
   pods may expose the service on different port numbers: two groups). Conditions as upstream:
   ``serving`` = pod Ready, ``terminating`` = deletionTimestamp set,
   ``ready`` = ``publishNotReadyAddresses`` or (serving and not terminating);
3. the plan (:func:`plan_slices`, pure): existing slices of the service that are ours
   (label ``endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io``) are updated
   in place, keeping the endpoints that are still wanted (minimal churn, as upstream: an
   endpoint never moves between slices just to rebalance); slices left empty, of a port group or
   address type no longer wanted, or owned by an older Service of the same name, are deleted;
   new endpoints fill slices that are being updated anyway, then one unchanged slice with room,
   then new slices of at most ``max_endpoints`` (100, upstream's default). An address type
   left without any slice keeps one empty *placeholder* slice, as upstream; a create and a
   delete of the same address type become one update (upstream's ``finalize``);
4. the writes: creates (``generateName: <service>-``, owner reference to the Service so the
   garbage collector removes the slices with it; none while the Service is being deleted),
   updates, deletes.

Not done (upstream has them): the ``endpoints.kubernetes.io/last-change-trigger-time``
annotation, topology hints / trafficDistribution, and the EndpointSlice mirroring controller
(selector-less Services' Endpoints -> slices).

Restart safety (no duplicate slices): the informer cache is listed before the first reconcile,
so a new controller-manager sees every existing slice. Within one process, a write the informer
has not shown yet would make the next reconcile of the same service act on a stale cache (and
create a second slice); :class:`SliceTracker` remembers what we wrote (upstream's
``EndpointSliceTracker``) and a reconcile that sees a stale cache is retried shortly instead.

Services without a selector are left alone: their slices are written by users (or a mirroring
controller), as upstream.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubeemu.client import ApiStatusError, Client, Obj, object_key, resource_path, split_key
from kubeemu.ctrl.base import Controller, Informers, controller_ref, owner_reference

_log = logging.getLogger(__name__)

API_VERSION = "discovery.k8s.io/v1"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = "topology.kubernetes.io/zone"
#: Upstream's ``--max-endpoints-per-slice`` default.
MAX_ENDPOINTS_PER_SLICE = 100
#: How soon a reconcile that found the informer cache behind our own writes is retried.
STALE_RETRY_S = 0.05

#: Slices of a service keyed by (addressType, port group); a port group is a tuple of
#: (name, protocol, port, appProtocol) in the service's port order.
PortKey = tuple[tuple[str, str, int, str], ...]


# -- pure parts: which pods, which endpoints -------------------------------------------------


def address_types(service: Obj) -> list[str]:
    """The EndpointSlice address types a Service needs (upstream ``getAddressTypesForService``)."""
    spec = service.get("spec") or {}
    fams = [f for f in spec.get("ipFamilies") or [] if f in ("IPv4", "IPv6")]
    if fams:
        return list(dict.fromkeys(fams))
    cip = spec.get("clusterIP") or ""
    if cip and cip != "None":
        return ["IPv6" if ":" in cip else "IPv4"]
    return ["IPv4", "IPv6"]


def is_pod_ready(pod: Obj) -> bool:
    """``podutil.IsPodReady``: the Ready condition is True."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def should_pod_be_in_endpoints(pod: Obj, include_terminating: bool) -> bool:
    """``endpointsliceutil.ShouldPodBeInEndpoints``: not terminal, has an IP, and (unless
    ``include_terminating``) not being deleted."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Failed", "Succeeded"):
        return False
    if not status.get("podIP") and not status.get("podIPs"):
        return False
    return include_terminating or not pod["metadata"].get("deletionTimestamp")


def pod_ips(pod: Obj) -> list[str]:
    status = pod.get("status") or {}
    ips = [str(p.get("ip")) for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    return ips


def endpoint_addresses(pod: Obj, address_type: str) -> list[str]:
    """The pod's IPs of ``address_type`` (upstream ``getEndpointAddresses``: the first of the family)."""
    want = 6 if address_type == "IPv6" else 4
    for ip in pod_ips(pod):
        try:
            if ipaddress.ip_address(ip).version == want:
                return [ip]
        except ValueError:
            continue
    return []


class PortNotFound(LookupError):
    pass


def find_port(pod: Obj, service_port: Mapping[str, Any]) -> int:
    """``podutil.FindPort``: a numeric targetPort as is; a named one from the pod's container
    ports with that name and the service port's protocol."""
    target = service_port.get("targetPort", service_port.get("port"))
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    proto = service_port.get("protocol") or "TCP"
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target and (p.get("protocol") or "TCP") == proto:
                return int(p["containerPort"])
    raise PortNotFound(f"no container port named {target!r} ({proto}) in pod "
                       f"{pod['metadata'].get('namespace')}/{pod['metadata']['name']}")


def endpoint_ports(service: Obj, pod: Obj) -> list[dict[str, Any]]:
    """The slice ports for ``pod`` (upstream ``getEndpointPorts``: ports the pod lacks are left out)."""
    out = []
    for sp in (service.get("spec") or {}).get("ports") or []:
        try:
            num = find_port(pod, sp)
        except PortNotFound as e:
            _log.debug("service %s: %s", object_key(service), e)
            continue
        port: dict[str, Any] = {"name": sp.get("name") or "", "protocol": sp.get("protocol") or "TCP", "port": num}
        if sp.get("appProtocol"):
            port["appProtocol"] = sp["appProtocol"]
        out.append(port)
    return out


def port_key(ports: Iterable[Mapping[str, Any]]) -> PortKey:
    return tuple((str(p.get("name") or ""), str(p.get("protocol") or "TCP"), int(p.get("port") or 0),
                  str(p.get("appProtocol") or "")) for p in ports)


def pod_to_endpoint(pod: Obj, service: Obj, address_type: str, node: Obj | None = None) -> dict[str, Any]:
    """Upstream ``podToEndpoint``."""
    meta, spec = pod["metadata"], pod.get("spec") or {}
    serving = is_pod_ready(pod)
    terminating = bool(meta.get("deletionTimestamp"))
    publish = bool((service.get("spec") or {}).get("publishNotReadyAddresses"))
    ready = publish or (serving and not terminating)
    ep: dict[str, Any] = {
        "addresses": endpoint_addresses(pod, address_type),
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "targetRef": {"kind": "Pod", "namespace": meta.get("namespace"), "name": meta["name"], "uid": meta.get("uid")},
    }
    if spec.get("nodeName"):
        ep["nodeName"] = spec["nodeName"]
    zone = ((node or {}).get("metadata") or {}).get("labels", {}).get(ZONE_LABEL)
    if zone:
        ep["zone"] = zone
    if (spec.get("hostname") and spec.get("subdomain") == service["metadata"]["name"]
            and meta.get("namespace") == service["metadata"].get("namespace")):
        ep["hostname"] = spec["hostname"]
    return ep


def endpoint_key(ep: Mapping[str, Any]) -> tuple[str, ...]:
    """Identity of an endpoint across reconciles: its target pod and addresses (what upstream's
    endpoint hash covers); the conditions may change in place."""
    ref = ep.get("targetRef") or {}
    return (str(ref.get("uid") or ref.get("name") or ""), *sorted(ep.get("addresses") or []))


@dataclass
class Desired:
    """Endpoints wanted for one (addressType, port group), and the group's ports."""

    ports: list[dict[str, Any]]
    endpoints: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)


def desired_endpoints(service: Obj, pods: Iterable[Obj], nodes: Mapping[str, Obj] | None = None,
                      ) -> dict[tuple[str, PortKey], Desired]:
    """(addressType, port group) -> the endpoints wanted, for the pods matching ``service``."""
    out: dict[tuple[str, PortKey], Desired] = {}
    types = address_types(service)
    for pod in sorted(pods, key=lambda p: str(p["metadata"]["name"])):
        if not should_pod_be_in_endpoints(pod, include_terminating=True):
            continue
        node = (nodes or {}).get((pod.get("spec") or {}).get("nodeName") or "")
        ports = endpoint_ports(service, pod)
        pk = port_key(ports)
        for at in types:
            ep = pod_to_endpoint(pod, service, at, node)
            if ep["addresses"]:
                d = out.setdefault((at, pk), Desired(ports))
                d.endpoints[endpoint_key(ep)] = ep
    return out


def slice_labels(service: Obj) -> dict[str, str]:
    """Upstream ``setEndpointSliceLabels``: the service's labels (minus the reserved keys),
    the service name, the manager, and ``headless`` for a headless service."""
    labels = {k: v for k, v in ((service["metadata"].get("labels") or {}).items())
              if k not in (SERVICE_NAME_LABEL, MANAGED_BY_LABEL, HEADLESS_LABEL)}
    if (service.get("spec") or {}).get("clusterIP") == "None":
        labels[HEADLESS_LABEL] = ""
    labels[SERVICE_NAME_LABEL] = service["metadata"]["name"]
    labels[MANAGED_BY_LABEL] = CONTROLLER_NAME
    return labels


def generate_name(service_name: str) -> str:
    """``getEndpointSlicePrefix``: ``<service>-`` (the server truncates and adds 5 characters)."""
    prefix = f"{service_name}-"
    return prefix if len(prefix) <= 253 else prefix[:-1]


def new_slice(service: Obj, address_type: str, ports: list[dict[str, Any]],
              endpoints: list[dict[str, Any]]) -> Obj:
    meta = service["metadata"]
    return {
        "apiVersion": API_VERSION, "kind": "EndpointSlice",
        "metadata": {"generateName": generate_name(meta["name"]), "namespace": meta["namespace"],
                     "labels": slice_labels(service),
                     "ownerReferences": [owner_reference({"apiVersion": "v1", "kind": "Service", **service})]},
        "addressType": address_type, "endpoints": endpoints, "ports": ports,
    }


@dataclass
class Plan:
    """What :func:`plan_slices` decided: whole slice objects to create / update, names to delete."""

    create: list[Obj] = field(default_factory=list)
    update: list[Obj] = field(default_factory=list)
    delete: list[Obj] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.create or self.update or self.delete)


def _sort_eps(eps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(eps, key=endpoint_key)


def plan_slices(service: Obj, existing: Iterable[Obj], desired: Mapping[tuple[str, PortKey], Desired],
                max_endpoints: int = MAX_ENDPOINTS_PER_SLICE) -> Plan:
    """Upstream ``reconciler.reconcile`` (pure): what to write so the slices of ``service`` hold
    exactly ``desired``, changing as few slices as possible. Slices of an address type the
    service no longer has are deleted; each address type it has is planned on its own
    (:func:`_plan_address_type`); then creates are turned into updates of slices that would be
    deleted (upstream ``finalize``: fewer writes, stable names)."""
    plan = Plan()
    types = address_types(service)
    existing = sorted(existing, key=lambda s: str(s["metadata"].get("name")))
    for at in types:
        sub = _plan_address_type(service, at, [s for s in existing if s.get("addressType") == at],
                                 {k: v for k, v in desired.items() if k[0] == at}, max_endpoints)
        plan.create += sub.create
        plan.update += sub.update
        plan.delete += sub.delete
    plan.delete += [s for s in existing if s.get("addressType") not in types]
    uid = service["metadata"].get("uid")
    i = 0
    while i < len(plan.delete) and plan.create:
        old, new = plan.delete[i], plan.create[-1]
        ref = controller_ref(old)
        if old.get("addressType") == new["addressType"] and ref is not None and ref.get("uid") == uid:
            new = copy.deepcopy(new)
            meta = new["metadata"]
            meta.pop("generateName", None)
            meta["name"] = old["metadata"]["name"]
            meta["resourceVersion"] = old["metadata"].get("resourceVersion")
            plan.create.pop()
            plan.update.append(new)
            plan.delete.pop(i)
        else:
            i += 1
    return plan


def _plan_address_type(service: Obj, at: str, existing: list[Obj], desired: Mapping[tuple[str, PortKey], Desired],
                       max_endpoints: int) -> Plan:
    """Upstream ``reconcileByAddressType`` + ``reconcileByPortMapping`` for one address type."""
    plan = Plan()
    labels = slice_labels(service)
    uid = service["metadata"].get("uid")
    groups: dict[PortKey, list[Obj]] = {}
    for s in existing:
        ref = controller_ref(s)
        if ref is None or ref.get("uid") != uid:
            plan.delete.append(s)  # an older Service of the same name: the GC would take it anyway
            continue
        groups.setdefault(port_key(s.get("ports") or []), []).append(s)
    wanted = {k[1]: v for k, v in desired.items()}
    for pk in list(groups) + [k for k in wanted if k not in groups]:
        want = wanted.get(pk)
        remaining = dict(want.endpoints) if want else {}
        ports = want.ports if want else []
        to_update: list[Obj] = []
        unchanged: list[Obj] = []
        # 1. existing slices keep what is still wanted (updated in place), drop what is not
        for s in groups.get(pk, []):
            kept, changed = [], False
            for ep in s.get("endpoints") or []:
                got = remaining.pop(endpoint_key(ep), None)
                if got is None:
                    changed = True  # gone, or a duplicate of one kept in an earlier slice
                    continue
                changed = changed or got != ep
                kept.append(got)
            if not kept:
                plan.delete.append(s)
                continue
            new = copy.deepcopy(s)
            new["endpoints"] = kept
            if (s["metadata"].get("labels") or {}) != labels:
                new["metadata"]["labels"] = dict(labels)
                changed = True
            (to_update if changed else unchanged).append(new)
        # 2. new endpoints fill slices that are written anyway, fullest first
        todo = _sort_eps(list(remaining.values()))
        for s in sorted(to_update, key=lambda x: -len(x["endpoints"])):
            room = max_endpoints - len(s["endpoints"])
            if room > 0 and todo:
                s["endpoints"] += todo[:room]
                todo = todo[room:]
        # 3. the rest: new slices, except that a last chunk that fits an unchanged slice goes there
        chunks = [todo[i:i + max_endpoints] for i in range(0, len(todo), max_endpoints)]
        if chunks and unchanged:
            last = chunks[-1]
            fits = [s for s in unchanged if max_endpoints - len(s["endpoints"]) >= len(last)]
            if fits:
                best = max(fits, key=lambda x: len(x["endpoints"]))
                best["endpoints"] += last
                unchanged.remove(best)
                to_update.append(best)
                chunks.pop()
        plan.update += to_update
        plan.create += [new_slice(service, at, copy.deepcopy(ports), chunk) for chunk in chunks]
    # No slice would be left for this address type: an empty placeholder keeps its place (upstream).
    if len(existing) == len(plan.delete) and not plan.create:
        placeholder = new_slice(service, at, [], [])
        if len(plan.delete) == 1 and _is_placeholder_of(plan.delete[0], placeholder, uid):
            plan.delete.clear()
        else:
            plan.create.append(placeholder)
    return plan


def _is_placeholder_of(s: Obj, placeholder: Obj, uid: Any) -> bool:
    ref = controller_ref(s)
    return (not s.get("endpoints") and not s.get("ports") and s.get("addressType") == placeholder["addressType"]
            and ref is not None and ref.get("uid") == uid
            and (s["metadata"].get("labels") or {}) == placeholder["metadata"]["labels"])


# -- the controller ------------------------------------------------------------------------


class SliceTracker:
    """Our own writes not yet seen by the informer (upstream ``EndpointSliceTracker``):
    slice key -> resourceVersion we wrote (None: deleted). A reconcile waits for the cache."""

    def __init__(self) -> None:
        self._written: dict[str, dict[str, str | None]] = {}

    def wrote(self, service_key: str, obj: Obj, deleted: bool = False) -> None:
        self._written.setdefault(service_key, {})[object_key(obj)] = (
            None if deleted else str(obj["metadata"].get("resourceVersion")))

    def stale(self, service_key: str, cache: Mapping[str, Obj]) -> bool:
        """Whether the cache is behind our writes for this service (and forget what it caught up with)."""
        pending = self._written.get(service_key)
        if not pending:
            return False
        for key, rv in list(pending.items()):
            cur = cache.get(key)
            if rv is None:
                caught_up = cur is None
            else:
                cur_rv = (cur or {}).get("metadata", {}).get("resourceVersion")
                caught_up = cur is not None and _rv_at_least(str(cur_rv), rv)
            if caught_up:
                del pending[key]
        if not pending:
            del self._written[service_key]
        return bool(pending)

    def forget(self, service_key: str) -> None:
        self._written.pop(service_key, None)


def _rv_at_least(have: str, want: str) -> bool:
    try:
        return int(have) >= int(want)
    except ValueError:
        return have == want


class EndpointSliceController(Controller):
    """Keeps the EndpointSlices of every Service with a selector (see the module docstring)."""

    name = "endpointslice"
    workers = 2

    def __init__(self, client: Client, informers: Informers, max_endpoints: int = MAX_ENDPOINTS_PER_SLICE) -> None:
        super().__init__(client, informers)
        self.max_endpoints = max_endpoints
        self.services = informers.get("v1", "services")
        self.pods = informers.get("v1", "pods")
        self.nodes = informers.get("v1", "nodes")
        self.slices = informers.get(API_VERSION, "endpointslices")
        self.tracker = SliceTracker()
        self.services.add_handler(lambda t, old, new: self.enqueue(new or old))
        self.pods.add_handler(self._on_pod)
        self.slices.add_handler(self._on_slice)
        self.nodes.add_handler(self._on_node)

    def _on_pod(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        """Enqueue every service whose selector matched the pod before or matches it now."""
        for pod in (old, new):
            if pod is None:
                continue
            ns, labels = pod["metadata"].get("namespace"), pod["metadata"].get("labels") or {}
            for svc in self.services.list(ns):
                sel = (svc.get("spec") or {}).get("selector")
                if sel and all(labels.get(k) == v for k, v in sel.items()):
                    self.enqueue(svc)

    def _on_slice(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        """A change to one of our slices (ours or someone else's edit) re-checks its service."""
        obj = new or old
        labels = (obj or {}).get("metadata", {}).get("labels") or {}
        if obj is not None and labels.get(MANAGED_BY_LABEL) == CONTROLLER_NAME and labels.get(SERVICE_NAME_LABEL):
            self.queue.add(f"{obj['metadata']['namespace']}/{labels[SERVICE_NAME_LABEL]}")

    def _on_node(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        """A node appearing or changing zone: the services with pods on it."""
        def zone(n: Obj | None) -> Any:
            return ((n or {}).get("metadata", {}).get("labels") or {}).get(ZONE_LABEL)

        if etype == "MODIFIED" and zone(old) == zone(new):
            return
        name = (new or old or {}).get("metadata", {}).get("name")
        for pod in self.pods.cache.values():
            if (pod.get("spec") or {}).get("nodeName") == name:
                self._on_pod("MODIFIED", None, pod)

    def owned_slices(self, namespace: str, name: str) -> list[Obj]:
        """Our slices of the service, from the cache (by label, as upstream's lister)."""
        return [s for s in self.slices.list(namespace)
                if (s["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL) == name
                and (s["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == CONTROLLER_NAME]

    async def reconcile(self, key: str) -> None:
        ns, name = split_key(key)
        assert ns is not None
        svc = self.services.get(key)
        if svc is None:
            # Deleted: the garbage collector removes the slices through their owner reference.
            self.tracker.forget(key)
            return
        svc = {"apiVersion": "v1", "kind": "Service", **svc}
        spec = svc.get("spec") or {}
        if spec.get("type") == "ExternalName" or spec.get("selector") is None:
            return  # no slices from this controller (upstream); a selector-less service's are the user's
        if self.tracker.stale(key, self.slices.cache):
            self.queue.add_after(key, STALE_RETRY_S)
            return
        sel = spec["selector"] or {}
        pods = [p for p in self.pods.list(ns) if sel and all(
            (p["metadata"].get("labels") or {}).get(k) == v for k, v in sel.items())]
        # Pods bound to a node the cache does not know are left out and retried, unless the
        # Service publishes not-ready addresses (upstream).
        missing = [p for p in pods if (p.get("spec") or {}).get("nodeName")
                   and self.nodes.get(p["spec"]["nodeName"]) is None and not spec.get("publishNotReadyAddresses")]
        if missing:
            pods = [p for p in pods if p not in missing]
            self.queue.add_after(key, 1.0)
        nodes = {n["metadata"]["name"]: n for n in self.nodes.cache.values()}
        plan = plan_slices(svc, self.owned_slices(ns, name), desired_endpoints(svc, pods, nodes), self.max_endpoints)
        if not plan:
            return
        path = resource_path(API_VERSION, "endpointslices", ns)
        _log.info("service %s: %d slices to create, %d to update, %d to delete", key, len(plan.create),
                  len(plan.update), len(plan.delete))
        # No new slices for a Service being deleted: the garbage collector is removing them (upstream).
        for s in plan.create if not svc["metadata"].get("deletionTimestamp") else []:
            self.tracker.wrote(key, await self.client.create(path, s))
        for s in plan.update:
            self.tracker.wrote(key, await self.client.replace(f"{path}/{s['metadata']['name']}", s))
        for s in plan.delete:
            try:
                await self.client.delete(f"{path}/{s['metadata']['name']}",
                                         {"preconditions": {"uid": s["metadata"].get("uid")}})
            except ApiStatusError as e:
                if not e.not_found:  # already gone is fine
                    raise
            self.tracker.wrote(key, s, deleted=True)
