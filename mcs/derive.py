"""What each member cluster imports, from what every member exports: pure functions, no I/O.

The inputs are plain immutable values read from the members' API servers (each ServiceExport,
the Service it names and that Service's EndpointSlices) and from the fabric (each cluster's
global CIDRs; per importer, the address families it reaches and the clusters it cannot reach
now). The outputs are the desired state: one :class:`Import` per exported namespace/name (the
ServiceImport, the derived Service's shape and the imported EndpointSlices, one per source
cluster and address family) and the ``Valid`` and ``Conflict`` conditions of every
ServiceExport. Appliers diff them against the API servers and write only the delta.

The rules are KEP-1645's ("Constraints and Conflict Resolution"):

- An export is *valid* when its Service exists and is not ``ExternalName`` (which cannot be
  merged across clusters); ``NodePort`` and ``LoadBalancer`` Services export as ClusterSetIP
  services, their node ports and load balancers staying local. An invalid export contributes
  nothing and says why in its ``Valid`` condition.
- Exports of one namespace/name in several clusters are one service (namespace sameness): their
  endpoints merge. Properties that cannot merge (headlessness, session affinity) take the value
  of the export with precedence: the oldest ServiceExport by ``creationTimestamp``, then the
  cluster name, so every member computes the same winner whatever order it read them in.
- Ports are the union of the exports' ports, merged by name first, then by protocol and port
  number: a port whose name is taken by a different port, or whose protocol and number are taken
  under another name, is left out in favour of the export with precedence.
- Any such conflict sets ``Conflict=True`` on *every* export of the service, naming the fields
  under contention and the cluster whose value won; otherwise ``Conflict=False``.
- An endpoint keeps its source cluster, the exporting member (the applier labels each imported
  slice with ``multicluster.kubernetes.io/source-cluster``), and names the fabric cluster its pod
  runs in (:attr:`Endpoint.cluster`): the exporter itself, or, for a ClusterTree root's pod bound
  to a virtual node, the leaf that node stands for (:func:`mcs.kube.export_from` reads it from the
  node). An endpoint running in a cluster that maps its pod CIDRs to global CIDRs is published
  with its global IP (:func:`fabric.types.to_global`) under *that* cluster's mapping (a root's pod
  in leaf L has an IP of L's pod CIDR), so an importer with an overlapping pod CIDR reaches it
  through the fabric's translation.

Per importer, :func:`view` then leaves out slices of an address family the importer cannot
reach, with a condition that says which and why, and publishes the endpoints running in a
cluster the fabric reports unreachable from it as not ready: clients stop sending to a black hole
as soon as the fabric knows, instead of after a lease runs out, and the endpoints are ready again
when the path heals. The gate is per endpoint, on the cluster it runs in: cutting a leaf turns a
root export's endpoints in that leaf not ready, and cutting the root leaves them ready (traffic
to them never crosses the root).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from fabric.types import to_global

#: ServiceImport types.
CLUSTERSET_IP, HEADLESS = "ClusterSetIP", "Headless"
#: Service types that export (as ClusterSetIP unless headless).
EXPORTABLE_TYPES = frozenset({"ClusterIP", "NodePort", "LoadBalancer"})

#: ServiceExport condition types and reasons (mcs-api's names).
VALID, CONFLICT = "Valid", "Conflict"
REASON_VALID = "Valid"
SERVICE_NOT_FOUND = "ServiceNotFound"
INVALID_SERVICE_TYPE = "InvalidServiceType"
NO_CONFLICTS = "NoConflicts"
PORT_CONFLICT = "PortConflict"
TYPE_CONFLICT = "TypeConflict"
SESSION_AFFINITY_CONFLICT = "SessionAffinityConflict"
#: The ServiceImport condition of an importer that leaves slices of a family out.
FAMILY_UNREACHABLE = "IPFamilyUnreachable"

#: EndpointSlice address types that carry IP addresses (FQDN slices do not import).
ADDRESS_TYPES = ("IPv4", "IPv6")


@dataclass(frozen=True)
class Port:
    """A Service port (or an EndpointSlice's target port)."""

    name: str
    protocol: str
    port: int
    app_protocol: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of a slice. ``cluster``: the fabric cluster its pod runs in, when not the
    exporting one (a ClusterTree root's pod bound to a virtual node runs in the leaf the node
    stands for, with that leaf's pod IP); empty: the exporting cluster. :func:`derive` fills it
    in, so every imported endpoint names its cluster: :func:`view` gates it on that cluster's
    reachability, and its address is translated with that cluster's global CIDRs."""

    addresses: tuple[str, ...]
    ready: bool = True
    hostname: str | None = None
    zone: str | None = None
    cluster: str = ""


@dataclass(frozen=True)
class Slice:
    """One EndpointSlice's content: its address type (``IPv4``/``IPv6``), ports and endpoints."""

    address_type: str
    ports: tuple[Port, ...]
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class Export:
    """A ServiceExport in ``cluster`` with what it exports.

    ``created`` is the ServiceExport's ``creationTimestamp`` as the API server writes it
    (RFC 3339 in UTC, ``2026-12-06T04:00:00Z``: such strings order as the times do);
    ``service_type`` is the Service's ``spec.type``, None when there is no such Service;
    ``slices`` are the Service's EndpointSlices in the exporting cluster; ``global_cidrs`` the
    cluster's ``(local, global)`` CIDR mapping (empty: its pod IPs are unique in the fabric).
    """

    cluster: str
    namespace: str
    name: str
    created: str
    service_type: str | None
    headless: bool = False
    ports: tuple[Port, ...] = ()
    session_affinity: str = "None"
    slices: tuple[Slice, ...] = ()
    global_cidrs: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False"
    reason: str
    message: str


@dataclass(frozen=True)
class SourceSlice:
    """An imported EndpointSlice: ``slice`` of source cluster ``cluster``, addresses as published."""

    cluster: str
    slice: Slice


@dataclass(frozen=True)
class Import:
    """One multi-cluster service: the ServiceImport, the derived Service's shape, its slices.

    ``clusters`` are the exporting clusters it is derived from (the ServiceImport's
    ``status.clusters``); ``conditions`` are the importer's own (set by :func:`view`)."""

    namespace: str
    name: str
    type: str
    ports: tuple[Port, ...]
    session_affinity: str
    clusters: tuple[str, ...]
    slices: tuple[SourceSlice, ...]
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class Derived:
    """:func:`derive`'s result: the imports by ``(namespace, name)``, and the ``(Valid,
    Conflict)`` conditions of every export by ``(cluster, namespace, name)``."""

    imports: Mapping[tuple[str, str], Import]
    export_conditions: Mapping[tuple[str, str, str], tuple[Condition, Condition]]


def _precedence(e: Export) -> tuple[str, str]:
    return e.created, e.cluster


def _port_order(p: Port) -> tuple[str, str, int, str]:
    return p.name, p.protocol, p.port, p.app_protocol or ""


def _endpoint_order(ep: Endpoint) -> tuple[tuple[str, ...], bool, str, str, str]:
    return ep.addresses, ep.ready, ep.hostname or "", ep.zone or "", ep.cluster


def _invalid(e: Export) -> Condition | None:
    """The ``Valid=False`` condition of an export that cannot be exported, else None."""
    if e.service_type is None:
        return Condition(VALID, "False", SERVICE_NOT_FOUND,
                         f"cluster {e.cluster} has no Service {e.namespace}/{e.name} to export")
    if e.service_type not in EXPORTABLE_TYPES:
        return Condition(VALID, "False", INVALID_SERVICE_TYPE,
                         f"Service {e.namespace}/{e.name} in cluster {e.cluster} is of type {e.service_type}, "
                         f"which cannot be exported (only {', '.join(sorted(EXPORTABLE_TYPES))})")
    return None


def _port_text(p: Port) -> str:
    return f"{p.name or '(unnamed)'} {p.port}/{p.protocol}"


def merge_ports(exports: Iterable[Export]) -> tuple[tuple[Port, ...], list[str]]:
    """The union of the ports of ``exports`` (in precedence order), merged by name, then by
    protocol and port number; and one line per port left out for a conflict."""
    by_name: dict[str, tuple[Port, str]] = {}
    by_number: dict[tuple[str, int], tuple[Port, str]] = {}
    dropped: list[str] = []
    for e in exports:
        for p in e.ports:
            named = by_name.get(p.name)
            numbered = by_number.get((p.protocol, p.port))
            if named is not None and named[0] == p:
                continue  # the same port again
            if named is not None:
                dropped.append(f"port {_port_text(p)} of {e.cluster} (name taken by {_port_text(named[0])} "
                               f"of {named[1]})")
            elif numbered is not None:
                dropped.append(f"port {_port_text(p)} of {e.cluster} ({p.port}/{p.protocol} taken by "
                               f"{_port_text(numbered[0])} of {numbered[1]})")
            else:
                by_name[p.name] = by_number[(p.protocol, p.port)] = (p, e.cluster)
    return tuple(sorted((p for p, _ in by_name.values()), key=_port_order)), dropped


GlobalCIDRs = tuple[tuple[str, str], ...]


def _published(s: Slice, e: Export, fabric_cidrs: Mapping[str, GlobalCIDRs]) -> Slice:
    """``s`` (a slice of export ``e``) with each endpoint naming the cluster it runs in and its
    addresses seen through that cluster's global CIDRs (``e.global_cidrs`` for the exporting
    cluster, ``fabric_cidrs`` for another; unchanged where none maps them)."""
    eps = []
    for ep in s.endpoints:
        where = ep.cluster or e.cluster
        cidrs = e.global_cidrs if where == e.cluster else fabric_cidrs.get(where, ())
        addresses = tuple(to_global(a, cidrs) or a for a in ep.addresses) if cidrs else ep.addresses
        eps.append(replace(ep, addresses=addresses, cluster=where))
    return Slice(s.address_type, tuple(sorted(s.ports, key=_port_order)), tuple(sorted(eps, key=_endpoint_order)))


def _single(values: list[tuple[str, str]], what: str, reason: str) -> tuple[str, str] | None:
    """``(reason, message)`` when the exports (in precedence order, ``(cluster, value)``)
    disagree on ``what``; the first one's value wins."""
    winner_cluster, winner = values[0]
    losers = [f"{v} in {c}" for c, v in values[1:] if v != winner]
    if not losers:
        return None
    return reason, (f"{what} {winner} of {winner_cluster} (the oldest export) wins over "
                    f"{', '.join(losers)}")


def derive(exports: Iterable[Export], global_cidrs: Mapping[str, GlobalCIDRs] | None = None) -> Derived:
    """The imports and export conditions of the clusterset, from every member's exports (see
    the module docstring); ``global_cidrs``: the mappings of the fabric clusters endpoints run
    in that are not their exporter (a ClusterTree root's leaves, members or not; one not given
    maps nothing). Raises ValueError for two exports of one service in one cluster."""
    fabric_cidrs = global_cidrs or {}
    groups: dict[tuple[str, str], list[Export]] = {}
    for e in exports:
        group = groups.setdefault(e.key, [])
        if any(o.cluster == e.cluster for o in group):
            raise ValueError(f"two exports of {e.namespace}/{e.name} from cluster {e.cluster}")
        group.append(e)
    imports: dict[tuple[str, str], Import] = {}
    conditions: dict[tuple[str, str, str], tuple[Condition, Condition]] = {}
    for key, group in sorted(groups.items()):
        group.sort(key=_precedence)
        valid = [e for e in group if _invalid(e) is None]
        no_conflict = Condition(CONFLICT, "False", NO_CONFLICTS, "")
        for e in group:
            bad = _invalid(e)
            if bad is not None:
                conditions[(e.cluster, *key)] = (bad, no_conflict)
        if not valid:
            continue
        ports, dropped = merge_ports(valid)
        contention = [c for c in (
            _single([(e.cluster, HEADLESS if e.headless else CLUSTERSET_IP) for e in valid], "type", TYPE_CONFLICT),
            _single([(e.cluster, e.session_affinity) for e in valid], "sessionAffinity", SESSION_AFFINITY_CONFLICT),
            (PORT_CONFLICT, "left out: " + "; ".join(dropped)) if dropped else None,
        ) if c is not None]
        conflict = (Condition(CONFLICT, "True", contention[0][0], ". ".join(m for _, m in contention))
                    if contention else no_conflict)
        ok = Condition(VALID, "True", REASON_VALID, "")
        for e in valid:
            conditions[(e.cluster, *key)] = (ok, conflict)
        winner = valid[0]
        slices = sorted((SourceSlice(e.cluster, _published(s, e, fabric_cidrs)) for e in valid for s in e.slices
                         if s.address_type in ADDRESS_TYPES),
                        key=lambda ss: (ss.cluster, ss.slice.address_type, [_port_order(p) for p in ss.slice.ports],
                                        [_endpoint_order(ep) for ep in ss.slice.endpoints]))
        imports[key] = Import(key[0], key[1], HEADLESS if winner.headless else CLUSTERSET_IP, ports,
                              winner.session_affinity, tuple(sorted(e.cluster for e in valid)), tuple(slices))
    return Derived(MappingProxyType(imports), MappingProxyType(conditions))


def view(derived: Derived, importer: str, families: Iterable[str], unreachable: Iterable[str] = ()) -> dict[
        tuple[str, str], Import]:
    """What cluster ``importer`` imports: every import of ``derived`` with only the slices of
    address ``families`` (``IPv4``/``IPv6``) it reaches, a ``FAMILY_UNREACHABLE`` condition
    naming what was left out, and the endpoints running in the clusters in ``unreachable`` (as
    the fabric reports them from ``importer``; never itself) not ready: each endpoint is gated on
    its own cluster (:attr:`Endpoint.cluster`), not on the slice's exporter."""
    reach, cut = frozenset(families), frozenset(unreachable) - {importer}
    out: dict[tuple[str, str], Import] = {}
    for key, imp in derived.imports.items():
        kept: list[SourceSlice] = []
        left: dict[str, set[str]] = {}
        for ss in imp.slices:
            if ss.slice.address_type not in reach:
                left.setdefault(ss.slice.address_type, set()).add(ss.cluster)
                continue
            if any((ep.cluster or ss.cluster) in cut for ep in ss.slice.endpoints):
                ss = SourceSlice(ss.cluster, replace(ss.slice, endpoints=tuple(
                    replace(ep, ready=False) if (ep.cluster or ss.cluster) in cut else ep
                    for ep in ss.slice.endpoints)))
            kept.append(ss)
        conds = tuple(Condition(FAMILY_UNREACHABLE, "True", FAMILY_UNREACHABLE,
                                f"{fam} endpoints of {', '.join(sorted(cs))} left out: cluster {importer} "
                                f"reaches no {fam} address over the fabric")
                      for fam, cs in sorted(left.items()))
        out[key] = replace(imp, slices=tuple(kept), conditions=conds)
    return out
