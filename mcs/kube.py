"""Kubernetes objects in and out of :mod:`mcs.derive`'s values: pure functions, no I/O.

In: :func:`export_from` reads a ServiceExport, the Service of its name and that Service's
EndpointSlices (as an API server returns them) into an :class:`~mcs.derive.Export`, refusing
malformed input with the object and field named. Each endpoint's ``nodeName`` says where it
runs: on a ClusterTree virtual node (:func:`virtual_node_clusters`) the pod runs in the leaf
cluster the node names, which becomes the endpoint's :attr:`~mcs.derive.Endpoint.cluster`.

Out, per importing cluster and :class:`~mcs.derive.Import` (what an applier creates, then
keeps equal, and deletes by the ``managed-by`` label and owner, never by name alone):

- the ServiceImport (``multicluster.x-k8s.io/v1alpha1``): type, ports, session affinity, the
  derived Service's cluster IPs, ``status.clusters``;
- the derived Service, :func:`derived_name` (``<name>-clusterset``): the service's ports, no
  selector (so no controller of the importer writes its endpoints), ``clusterIP: None`` when
  headless, else one the importer allocates. Never the service's own name: a member that
  imports a service must stay free to create its own Service of that name and export it too
  (a second exporting cluster), and an exporter's own Service has that name already. Clients
  use the clusterset name, which resolves to the ServiceImport's IPs (:mod:`mcs.dns`);
- one EndpointSlice per exported one (each of one source cluster and address family), labelled as KEP-1645 asks
  (``multicluster.kubernetes.io/source-cluster`` and ``/service-name``) and with
  ``kubernetes.io/service-name`` naming the derived Service, so kube-proxy and DNS serve them,
  and ``endpointslice.kubernetes.io/managed-by`` ours, so the importer's EndpointSlice
  controller leaves them alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from mcs.derive import ADDRESS_TYPES, HEADLESS, Condition, Endpoint, Export, Import, Port, Slice

Obj = dict[str, Any]

GROUP_VERSION = "multicluster.x-k8s.io/v1alpha1"
#: Our mark on every object we create in an importer (label values).
MANAGED_BY = "kosmos-fabric-mcs"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
APP_MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
SOURCE_CLUSTER_LABEL = "multicluster.kubernetes.io/source-cluster"
MCS_SERVICE_NAME_LABEL = "multicluster.kubernetes.io/service-name"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: Longest object name we write (DNS label: Service names must be one).
MAX_NAME = 63


def _where(kind: str, obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{kind} {meta.get('namespace', '')}/{meta.get('name', '')}"


def _port(raw: Any, where: str) -> Port:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: a port is {raw!r}, not an object")
    number = raw.get("port")
    if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 65536:
        raise ValueError(f"{where}: port {raw.get('name') or '(unnamed)'} has port {number!r}, not 1-65535")
    return Port(str(raw.get("name") or ""), str(raw.get("protocol") or "TCP"), number, raw.get("appProtocol"))


#: A ClusterTree virtual node's labels (:mod:`tree.forge`: ``kosmos.io/node=true`` and the leaf's
#: fabric cluster name in ``kosmos.io/cluster``). Spelled here, not imported: add-ons do not
#: depend on each other; a unit test holds them equal to the tree manager's.
VIRTUAL_NODE_LABEL = "kosmos.io/node"
VIRTUAL_NODE_CLUSTER_LABEL = "kosmos.io/cluster"
#: The label selector of a member's Node informer: its virtual nodes only.
VIRTUAL_NODE_SELECTOR = f"{VIRTUAL_NODE_LABEL}=true"


def virtual_node_clusters(nodes: Iterable[Obj]) -> dict[str, str]:
    """Node name -> the fabric cluster its pods run in, for the virtual nodes among ``nodes``
    (labelled :data:`VIRTUAL_NODE_LABEL` ``true`` and naming a cluster in
    :data:`VIRTUAL_NODE_CLUSTER_LABEL`). A node not here is a real node of its own cluster."""
    out = {}
    for n in nodes:
        meta = n.get("metadata") or {}
        labels = meta.get("labels") or {}
        leaf = labels.get(VIRTUAL_NODE_CLUSTER_LABEL)
        if labels.get(VIRTUAL_NODE_LABEL) == "true" and isinstance(leaf, str) and leaf and meta.get("name"):
            out[str(meta["name"])] = leaf
    return out


def _endpoint(raw: Any, where: str, cluster: str, node_clusters: Mapping[str, str]) -> Endpoint:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("addresses"), list):
        raise ValueError(f"{where}: an endpoint without an addresses list: {raw!r}")
    cond = raw.get("conditions") or {}
    runs_in = node_clusters.get(str(raw.get("nodeName") or ""), "")
    # As kube-proxy reads it: an unset ``ready`` is ready.
    return Endpoint(tuple(str(a) for a in raw["addresses"]), cond.get("ready") is not False,
                    raw.get("hostname"), raw.get("zone"), "" if runs_in == cluster else runs_in)


def export_from(cluster: str, export: Obj, service: Obj | None, slices: Iterable[Obj],
                global_cidrs: tuple[tuple[str, str], ...] = (),
                node_clusters: Mapping[str, str] | None = None) -> Export:
    """The :class:`Export` of ``export`` (a ServiceExport of ``cluster``), with ``service`` (the
    Service of its name; None: none) and that Service's EndpointSlices among ``slices`` (others,
    and FQDN slices, are skipped). ``node_clusters``: ``cluster``'s virtual nodes
    (:func:`virtual_node_clusters`); an endpoint whose ``nodeName`` is one runs in that node's
    cluster (:attr:`~mcs.derive.Endpoint.cluster`), any other (no ``nodeName``, a real node) in
    ``cluster``. Raises ValueError naming the object and field at fault."""
    node_clusters = node_clusters or {}
    meta = export.get("metadata") or {}
    ns, name, created = meta.get("namespace"), meta.get("name"), meta.get("creationTimestamp")
    if not (isinstance(ns, str) and isinstance(name, str) and isinstance(created, str)):
        raise ValueError(f"{_where('ServiceExport', export)} in cluster {cluster}: "
                         "metadata needs namespace, name and creationTimestamp")
    if service is None:
        return Export(cluster, ns, name, created, None)
    where = f"{_where('Service', service)} in cluster {cluster}"
    spec = service.get("spec") or {}
    ports = tuple(_port(p, where) for p in spec.get("ports") or [])
    own: list[Slice] = []
    for s in slices:
        if ((s.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL) != name:
            continue
        if s.get("addressType") not in ADDRESS_TYPES:
            continue
        sw = f"{_where('EndpointSlice', s)} in cluster {cluster}"
        own.append(Slice(s["addressType"], tuple(_port(p, sw) for p in s.get("ports") or []),
                         tuple(_endpoint(ep, sw, cluster, node_clusters) for ep in s.get("endpoints") or [])))
    return Export(cluster, ns, name, created, str(spec.get("type") or "ClusterIP"),
                  headless=spec.get("clusterIP") == "None", ports=ports,
                  session_affinity=str(spec.get("sessionAffinity") or "None"), slices=tuple(own),
                  global_cidrs=global_cidrs)


def _short(text: str, limit: int = MAX_NAME) -> str:
    """``text`` if it fits ``limit``, else cut with a hash of the whole (stays unique)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{text[: limit - 11].rstrip('-')}-{digest}"


def derived_name(name: str) -> str:
    """The derived Service's name in every importer (module docstring)."""
    return _short(f"{name}-clusterset")


def owned(obj: Mapping[str, Any]) -> bool:
    """True for an object :mod:`mcs` created (an applier updates and deletes only these)."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(APP_MANAGED_BY_LABEL) == MANAGED_BY


def _labels(imp: Import) -> dict[str, str]:
    return {APP_MANAGED_BY_LABEL: MANAGED_BY, MCS_SERVICE_NAME_LABEL: imp.name}


def _ports(ports: Iterable[Port]) -> list[Obj]:
    out = []
    for p in ports:
        o: Obj = {"protocol": p.protocol, "port": p.port}
        if p.name:
            o["name"] = p.name
        if p.app_protocol:
            o["appProtocol"] = p.app_protocol
        out.append(o)
    return out


def render_service(imp: Import) -> Obj:
    """The derived Service of ``imp`` (:func:`derived_name`; selector-less; headless stays headless).

    ``PreferDualStack``: a dual-stack importer gets a cluster IP of each family, so endpoints of
    either family have a cluster IP of theirs (an IPv6-only exporter's, imported into an IPv4-
    primary dual-stack cluster, would otherwise sit behind an IPv4 cluster IP kube-proxy has no
    IPv4 endpoint for); a single-stack importer gets its one. Not the families of the exporters'
    slices: those come and go, and a Service's primary family cannot change."""
    spec: Obj = {"type": "ClusterIP", "ports": _ports(imp.ports), "sessionAffinity": imp.session_affinity}
    if imp.type == HEADLESS:
        spec["clusterIP"] = "None"
    else:
        spec["ipFamilyPolicy"] = "PreferDualStack"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": imp.namespace, "name": derived_name(imp.name), "labels": _labels(imp)},
            "spec": spec}


def conditions(new: Iterable[Condition], current: Iterable[Mapping[str, Any]], now: str) -> list[Obj]:
    """``new`` as status conditions, each ``lastTransitionTime`` kept from ``current`` (what the
    object has) while its status is unchanged and ``now`` when it changes, as upstream's
    ``meta.SetStatusCondition``: a rewrite with nothing changed is no write at all."""
    old = {c.get("type"): c for c in current if isinstance(c, Mapping)}
    out = []
    for c in new:
        was = old.get(c.type)
        since = was.get("lastTransitionTime") if was is not None and was.get("status") == c.status else None
        out.append({"type": c.type, "status": c.status, "reason": c.reason, "message": c.message,
                    "lastTransitionTime": since or now})
    return out


def render_service_import(imp: Import, ips: Iterable[str] = (), *, current: Obj | None = None,
                          now: str = "") -> Obj:
    """The ServiceImport of ``imp``; ``ips``: the derived Service's cluster IPs (none if headless);
    ``current``: the importer's ServiceImport now (its condition times are kept, :func:`conditions`),
    ``now``: the time of a condition that changes (RFC 3339)."""
    spec: Obj = {"type": imp.type, "ports": _ports(imp.ports), "sessionAffinity": imp.session_affinity}
    if imp.type != HEADLESS and list(ips):
        spec["ips"] = list(ips)
    status: Obj = {"clusters": [{"cluster": c} for c in imp.clusters]}
    if imp.conditions:
        had = ((current or {}).get("status") or {}).get("conditions") or []
        status["conditions"] = conditions(imp.conditions, had, now)
    return {"apiVersion": GROUP_VERSION, "kind": "ServiceImport",
            "metadata": {"namespace": imp.namespace, "name": imp.name, "labels": _labels(imp)},
            "spec": spec, "status": status}


def _endpoint_obj(ep: Endpoint) -> Obj:
    o: Obj = {"addresses": list(ep.addresses), "conditions": {"ready": ep.ready}}
    if ep.hostname:
        o["hostname"] = ep.hostname
    if ep.zone:
        o["zone"] = ep.zone
    return o


def render_slices(imp: Import) -> list[Obj]:
    """The imported EndpointSlices of ``imp``, one per exported slice (each of one source cluster
    and address family), serving its derived Service."""
    out = []
    seen: dict[tuple[str, str], int] = {}
    for ss in imp.slices:
        family = ss.slice.address_type.lower()
        # An exporter splits many endpoints over several slices of one family: numbered here.
        index = seen[(ss.cluster, family)] = seen.get((ss.cluster, family), -1) + 1
        labels = {**_labels(imp), MANAGED_BY_LABEL: MANAGED_BY, SOURCE_CLUSTER_LABEL: ss.cluster,
                  SERVICE_NAME_LABEL: derived_name(imp.name)}
        name = _short(f"{imp.name}-{ss.cluster}-{family}-{index}")
        out.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"namespace": imp.namespace, "name": name, "labels": labels},
                    "addressType": ss.slice.address_type, "ports": _ports(ss.slice.ports),
                    "endpoints": [_endpoint_obj(ep) for ep in ss.slice.endpoints]})
    return out


#: A Service annotated so (value ``"true"``) is exported without a ServiceExport of the user's
#: (Kosmos' annotation: issue 18 item 1); the controller creates the ServiceExport, ours.
AUTO_CREATE_ANNOTATION = "kosmos.io/auto-create-mcs"


def auto_export_asked(service: Obj, prefixes: Iterable[str], annotation: bool = True) -> bool:
    """Whether auto-export asks for ``service`` to be exported: its namespace starts with one of
    ``prefixes``, or (``annotation``) it carries :data:`AUTO_CREATE_ANNOTATION` ``"true"``. An
    ``ExternalName`` Service never is (it cannot be exported: it would only get ``Valid=False``)."""
    meta = service.get("metadata") or {}
    if (service.get("spec") or {}).get("type") == "ExternalName":
        return False
    if annotation and str((meta.get("annotations") or {}).get(AUTO_CREATE_ANNOTATION, "")).lower() == "true":
        return True
    ns = str(meta.get("namespace") or "")
    return any(p and ns.startswith(p) for p in prefixes)


def render_service_export(namespace: str, name: str) -> Obj:
    """The ServiceExport auto-export creates (labelled ours, so only ours are ever deleted)."""
    return {"apiVersion": GROUP_VERSION, "kind": "ServiceExport",
            "metadata": {"namespace": namespace, "name": name,
                         "labels": {APP_MANAGED_BY_LABEL: MANAGED_BY}}}


def auto_exports(services: Iterable[Obj], exports: Iterable[Obj], prefixes: Iterable[str],
                 annotation: bool = True) -> list[Obj]:
    """The ServiceExports auto-export wants in one member: one per Service it asks for
    (:func:`auto_export_asked`) that has no ServiceExport of the user's (a user's own is left
    as it is, and is the export)."""
    prefixes = tuple(prefixes)
    users = {((o.get("metadata") or {}).get("namespace"), (o.get("metadata") or {}).get("name"))
             for o in exports if not owned(o)}
    out = []
    for s in services:
        meta = s.get("metadata") or {}
        k = (meta.get("namespace"), meta.get("name"))
        if k not in users and auto_export_asked(s, prefixes, annotation):
            out.append(render_service_export(str(k[0]), str(k[1])))
    return sorted(out, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))
