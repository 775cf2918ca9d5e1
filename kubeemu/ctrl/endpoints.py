"""The legacy Endpoints controller (``--controllers endpoint``): one ``v1 Endpoints`` object per
Service with a selector, after upstream's ``pkg/controller/endpoint`` (endpoints_controller.go)
and ``pkg/api/v1/endpoints`` (RepackSubsets). Old clients and tools (``kubectl get endpoints``,
``kubectl describe service``) read it; the lab kube-proxy reads EndpointSlices.

Per Service, in order:

1. pods of its namespace matching the selector that may be endpoints: not Succeeded/Failed,
   with an IP, and not terminating unless ``publishNotReadyAddresses`` (upstream
   ``ShouldPodBeInEndpoints(pod, publishNotReadyAddresses)``);
2. one address per pod, of the Service's primary family (``ipFamilies[0]``), with nodeName and
   targetRef, in ``addresses`` when the pod is Ready (or the Service publishes not-ready
   addresses), else in ``notReadyAddresses``; ports resolved per pod as for EndpointSlices
   (a named targetPort looked up in the pod's containers; a pod without it is left out of that
   port's subset);
3. :func:`repack`: subsets grouped by identical port sets, addresses sorted, an address both
   ready and not ready counted ready (upstream ``RepackSubsets``); more than 1000 addresses are
   truncated and annotated ``endpoints.kubernetes.io/over-capacity: truncated``;
4. create, or update when subsets or labels differ. Upstream sets no owner reference: the
   controller deletes the Endpoints when its Service is gone, and so does this one.

Services without a selector keep user-written Endpoints, untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kubeemu.client import ApiStatusError, Client, Obj, resource_path, split_key
from kubeemu.ctrl.base import Controller, Informers
from kubeemu.ctrl.endpointslice import (
    HEADLESS_LABEL,
    PortNotFound,
    find_port,
    is_pod_ready,
    pod_ips,
    should_pod_be_in_endpoints,
)

_log = logging.getLogger(__name__)

MANAGED_BY_LABEL = "endpoints.kubernetes.io/managed-by"
CONTROLLER_NAME = "endpoint-controller"
OVER_CAPACITY_ANNOTATION = "endpoints.kubernetes.io/over-capacity"
MAX_CAPACITY = 1000


def _primary_family(service: Obj) -> int | None:
    spec = service.get("spec") or {}
    fams = spec.get("ipFamilies") or []
    if fams:
        return 6 if fams[0] == "IPv6" else 4
    cip = spec.get("clusterIP") or ""
    if cip and cip != "None":
        return 6 if ":" in cip else 4
    return None  # headless, not defaulted: the pod's first IP


def endpoint_address(pod: Obj, service: Obj) -> dict[str, Any] | None:
    """Upstream ``podToEndpointAddressForService``."""
    fam = _primary_family(service)
    ips = pod_ips(pod)
    ip = next((i for i in ips if fam is None or (6 if ":" in i else 4) == fam), None)
    if ip is None:
        return None
    meta, spec = pod["metadata"], pod.get("spec") or {}
    addr: dict[str, Any] = {"ip": ip, "targetRef": {"kind": "Pod", "namespace": meta.get("namespace"),
                                                    "name": meta["name"], "uid": meta.get("uid")}}
    if spec.get("nodeName"):
        addr["nodeName"] = spec["nodeName"]
    if (spec.get("hostname") and spec.get("subdomain") == service["metadata"]["name"]
            and meta.get("namespace") == service["metadata"].get("namespace")):
        addr["hostname"] = spec["hostname"]
    return addr


def desired_subsets(service: Obj, pods: Iterable[Obj]) -> tuple[list[dict[str, Any]], bool]:
    """The Service's subsets (repacked) and whether they were truncated to MAX_CAPACITY."""
    spec = service.get("spec") or {}
    publish = bool(spec.get("publishNotReadyAddresses"))
    raw: list[tuple[bool, dict[str, Any], list[dict[str, Any]]]] = []
    for pod in pods:
        if not should_pod_be_in_endpoints(pod, include_terminating=publish):
            continue
        addr = endpoint_address(pod, service)
        if addr is None:
            continue
        ready = publish or is_pod_ready(pod)
        sports = spec.get("ports") or []
        if not sports and spec.get("clusterIP") == "None":
            raw.append((ready, addr, []))
            continue
        for sp in sports:
            try:
                num = find_port(pod, sp)
            except PortNotFound:
                continue
            port: dict[str, Any] = {"name": sp.get("name") or "", "port": num, "protocol": sp.get("protocol") or "TCP"}
            if not port["name"]:
                del port["name"]
            if sp.get("appProtocol"):
                port["appProtocol"] = sp["appProtocol"]
            raw.append((ready, addr, [port]))
    return repack(raw)


def repack(raw: Iterable[tuple[bool, dict[str, Any], list[dict[str, Any]]]]) -> tuple[list[dict[str, Any]], bool]:
    """Upstream ``RepackSubsets``: map each port to the addresses offering it (an address ready
    for a port in any entry is ready for it), then merge the ports whose address sets are equal
    into one subset; sorted. More than MAX_CAPACITY addresses are truncated (reported)."""
    addrs: dict[str, dict[str, Any]] = {}
    port_addrs: dict[tuple[Any, ...], dict[str, bool]] = {}
    ports: dict[tuple[Any, ...], dict[str, Any]] = {}
    for ready, addr, plist in raw:
        akey = f"{addr['ip']}/{(addr.get('targetRef') or {}).get('uid', '')}"
        addrs[akey] = addr
        entries: list[dict[str, Any] | None] = list(plist) or [None]  # None: the no-ports sentinel
        for p in entries:
            pkey = ("",) if p is None else (str(p.get("name") or ""), int(p["port"]), str(p["protocol"]))
            if p is not None:
                ports[pkey] = p
            m = port_addrs.setdefault(pkey, {})
            m[akey] = m.get(akey, False) or ready
    groups: dict[tuple[tuple[str, bool], ...], list[dict[str, Any]]] = {}
    for pkey, m in port_addrs.items():
        g = groups.setdefault(tuple(sorted(m.items())), [])
        if pkey in ports:
            g.append(ports[pkey])
    subsets: list[dict[str, Any]] = []
    total, truncated = 0, False
    for akeys in sorted(groups):
        sub: dict[str, Any] = {}
        for field, want in (("addresses", True), ("notReadyAddresses", False)):
            chosen = sorted((addrs[a] for a, r in akeys if r == want),
                            key=lambda a: (a["ip"], str((a.get("targetRef") or {}).get("uid"))))
            room = max(MAX_CAPACITY - total, 0)
            if len(chosen) > room:
                chosen, truncated = chosen[:room], True
            total += len(chosen)
            if chosen:
                sub[field] = chosen
        if groups[akeys]:
            sub["ports"] = sorted(groups[akeys], key=lambda p: (str(p.get("name") or ""), p["port"], p["protocol"]))
        if sub.get("addresses") or sub.get("notReadyAddresses"):
            subsets.append(sub)
    return subsets, truncated


def endpoints_labels(service: Obj) -> dict[str, str]:
    labels = {k: v for k, v in (service["metadata"].get("labels") or {}).items() if k != MANAGED_BY_LABEL}
    if (service.get("spec") or {}).get("clusterIP") == "None":
        labels[HEADLESS_LABEL] = ""
    else:
        labels.pop(HEADLESS_LABEL, None)
    labels[MANAGED_BY_LABEL] = CONTROLLER_NAME
    return labels


class EndpointsController(Controller):
    """Keeps ``v1 Endpoints`` of every Service with a selector (see the module docstring)."""

    name = "endpoint"

    def __init__(self, client: Client, informers: Informers) -> None:
        super().__init__(client, informers)
        self.services = informers.get("v1", "services")
        self.pods = informers.get("v1", "pods")
        self.endpoints = informers.get("v1", "endpoints")
        self.services.add_handler(lambda t, old, new: self.enqueue(new or old))
        self.endpoints.add_handler(lambda t, old, new: self.enqueue(new or old))
        self.pods.add_handler(self._on_pod)

    def _on_pod(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        for pod in (old, new):
            if pod is None:
                continue
            labels = pod["metadata"].get("labels") or {}
            for svc in self.services.list(pod["metadata"].get("namespace")):
                sel = (svc.get("spec") or {}).get("selector")
                if sel and all(labels.get(k) == v for k, v in sel.items()):
                    self.enqueue(svc)

    async def reconcile(self, key: str) -> None:
        ns, name = split_key(key)
        assert ns is not None
        path = resource_path("v1", "endpoints", ns)
        svc = self.services.get(key)
        cur = self.endpoints.get(key)
        if svc is None:
            # The Service is gone: its Endpoints go too (upstream; no owner reference).
            if cur is not None and (cur["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == CONTROLLER_NAME:
                try:
                    await self.client.delete(f"{path}/{name}", {"preconditions": {"uid": cur["metadata"].get("uid")}})
                except ApiStatusError as e:
                    if not (e.not_found or e.conflict):
                        raise
            return
        spec = svc.get("spec") or {}
        if spec.get("type") == "ExternalName" or spec.get("selector") is None:
            return
        sel = spec["selector"] or {}
        pods = [p for p in self.pods.list(ns)
                if sel and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in sel.items())]
        subsets, truncated = desired_subsets(svc, pods)
        labels = endpoints_labels(svc)
        if cur is None:
            body: Obj = {"apiVersion": "v1", "kind": "Endpoints",
                         "metadata": {"name": name, "namespace": ns, "labels": labels}, "subsets": subsets}
            if truncated:
                body["metadata"]["annotations"] = {OVER_CAPACITY_ANNOTATION: "truncated"}
            try:
                await self.client.create(path, body)
            except ApiStatusError as e:
                if not e.conflict:
                    raise
                self.queue.add_after(key, 0.1)  # created meanwhile (by us, the cache lags): compare again
            return
        annotations = dict(cur["metadata"].get("annotations") or {})
        if truncated:
            annotations[OVER_CAPACITY_ANNOTATION] = "truncated"
        else:
            annotations.pop(OVER_CAPACITY_ANNOTATION, None)
        if ((cur.get("subsets") or []) == subsets and (cur["metadata"].get("labels") or {}) == labels
                and (cur["metadata"].get("annotations") or {}) == annotations):
            return
        new = {**cur, "subsets": subsets,
               "metadata": {**cur["metadata"], "labels": labels, "annotations": annotations}}
        await self.client.replace(f"{path}/{name}", new)
