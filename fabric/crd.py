"""The ``Cluster`` custom resource (``kosmos.io/v1alpha1``) as fabric configuration: defaults,
validation with field paths, and the fabric-wide resolution of many Clusters into one
:class:`~fabric.types.FabricConfig`.

The CRD (``deploy/base/host/crd-clusters.yaml``) does what an API server can do per object:
enums, CIDR patterns, sizes, and (CEL) the global CIDR prefix lengths. This module checks the
same schema (:mod:`fabric.crd_schema`, generated from the CRD, with ``jsonschema``: one schema,
see :mod:`fabric.validation`) for Clusters that never went through an API server (files,
``join --dry-run``), repeats the CEL rule (no API server without CEL, nor the emulator, runs
it) and adds what no schema can: CIDRs that parse, checks against the CIDRs discovered from
Nodes and across Clusters. It is pure (dicts in, values out) so that the reflector's Kubernetes topology
source, ``fabric-tool join --dry-run`` and the tests share one
implementation.

Resolution keeps working clusters working. Clusters are taken oldest first (creation timestamp,
then name); a Cluster whose CIDRs conflict with one already accepted is left out of the fabric
and gets the problems, with field paths, for its status. A newly created bad Cluster therefore
never disturbs the ones that were running.

Which pod CIDRs a cluster uses: the spec's ``podCIDRs`` when it has any (every node's pod CIDR
must then lie inside them); a Cluster without ``podCIDRs`` is in *discovery mode*: its pod CIDRs
are the union (collapsed) of the pod CIDRs its admitted nodes announced (the agents read them
from their Node objects; the reflector has no credentials for member clusters), passed in as
``discovered`` by the Kubernetes topology source. Such a Cluster is accepted with no nodes yet
(its status says it waits for them), and a node that joins later with a range outside the
union is admitted (:func:`fabric.control.admission.validate_announcement` checks it against the
other clusters instead) and widens the union. Service CIDRs: those discovered from the
ServiceCIDR API when there are any, else the spec's ``serviceCIDRs``. A key of
``globalCIDRsMap`` maps every CIDR in use that it contains (a /16 key covers the nodes' /24s); no
CIDR in use may be only partly covered, and a key must contain at least one CIDR in use, except
in discovery mode (the nodes it is meant for may not have announced themselves yet: such a key
counts as a pod range). The cluster's configured ranges are then the keys plus the CIDRs no key
covers, so the planner sees exactly one range per translation, as with the topology file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fabric import nodeinfo, types, validation

_log = logging.getLogger(__name__)

GROUP = "kosmos.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Cluster"
PLURAL = "clusters"

#: The schema's defaults (a unit test checks they equal the CRD's ``default`` values). Kosmos
#: ships contradictory ones (CRD: p2p, all families; kosmosctl: gateway, ipv4); ours are the
#: CRD's p2p, families derived from the pod CIDRs, and an underlay found through the Node's
#: InternalIP instead of a probe towards 8.8.8.8 (air-gapped clusters have no route there).
DEFAULTS: dict[str, Any] = {
    "namespace": "kosmos-system",
    "clusterLinkOptions": {
        "enable": True,
        "networkType": "p2p",
        "activeGateways": 1,
        "defaultNICName": "*",
        "autodetectionMethod": "kubernetes-internal-ip",
    },
    "clusterTreeOptions": {"enable": False},
}
#: ``defaultNICName`` meaning "choose by ``autodetectionMethod``" (Kosmos' convention).
AUTO_NIC = nodeinfo.AUTO_NIC

_LINK_KEYS = frozenset({
    "enable", "networkType", "ipFamilies", "podCIDRs", "serviceCIDRs", "nodeCIDRs", "globalCIDRsMap",
    "gatewayCandidates", "activeGateways", "defaultNICName", "nicNodeNames", "autodetectionMethod",
})
_SPEC_KEYS = frozenset({"namespace", "clusterLinkOptions", "clusterTreeOptions"})
_FAMILIES = {name: fam for fam, name in types.FAMILY_NAMES.items()}
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: Linux interface names: 1-15 bytes, no '/', no whitespace, not "." or "..".
_LINK = "spec.clusterLinkOptions"


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """One reason (part of) a Cluster is not in effect: for the status' ``conflicts`` list."""

    cluster: str
    field: str
    reason: str
    #: The other Cluster involved in a conflict ("" for a problem of this Cluster alone).
    other: str = ""

    def __str__(self) -> str:
        return f"Cluster {self.cluster!r} {self.field}: {self.reason}"

    def to_status(self) -> dict[str, str]:
        out = {"field": self.field, "reason": self.reason}
        if self.other:
            out["cluster"] = self.other
        return out


class ClusterSpecError(ValueError):
    """A Cluster that cannot be used; ``problems`` lists every reason with its field path."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterSpec:
    """A validated Cluster resource (defaults applied), before discovery and cross-checks."""

    name: str
    namespace: str
    enable: bool
    mode: types.ClusterMode
    #: Families by number, primary first; empty = derived from the pod CIDRs.
    ip_families: tuple[int, ...]
    pod_cidrs: tuple[str, ...]
    service_cidrs: tuple[str, ...]
    #: ``(key, global CIDR)`` pairs as written (keys canonical), sorted.
    global_cidrs: tuple[tuple[str, str], ...]
    gateway_candidates: tuple[str, ...]
    #: ``activeGateways`` (gateway mode; 1 elsewhere): see :attr:`fabric.types.ClusterConfig.active_gateways`.
    active_gateways: int
    default_nic: str
    #: ``(node name, interface)`` per-node overrides, sorted.
    nic_overrides: tuple[tuple[str, str], ...]
    autodetection_method: str
    tree_enable: bool
    #: ``metadata.creationTimestamp`` (RFC 3339; sorts chronologically), "" when absent.
    created: str = ""
    #: ``nodeCIDRs`` (gateway mode): see :attr:`fabric.types.ClusterConfig.node_cidrs`.
    node_cidrs: tuple[str, ...] = ()

    @property
    def discovers_pod_cidrs(self) -> bool:
        """Discovery mode: no ``podCIDRs`` in the spec, the nodes' announced ones are used."""
        return not self.pod_cidrs

    def interface_for(self, node: str) -> str:
        """The underlay interface of ``node``: its override, else ``defaultNICName`` (``*`` = auto)."""
        return nodeinfo.nic_for(node, self.default_nic, self.nic_overrides)


@dataclasses.dataclass(frozen=True, slots=True)
class Discovered:
    """What the fabric learnt about a cluster: the pod CIDRs its admitted nodes announced (used
    in discovery mode only) and its ServiceCIDR objects."""

    pod_cidrs: tuple[str, ...] = ()
    service_cidrs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Resolution:
    """The fabric configuration from every Cluster, plus why each left-out one is left out."""

    config: types.FabricConfig
    #: Cluster name -> its problems (invalid spec, conflict with an accepted cluster).
    problems: Mapping[str, tuple[Problem, ...]]
    #: Clusters with ``clusterLinkOptions.enable: false``.
    disabled: tuple[str, ...] = ()
    #: Cluster name -> the CIDRs in use with their source, for the status (pods, services).
    in_use: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Defaults and per-object validation
# --------------------------------------------------------------------------------------------


def with_defaults(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """``spec`` with the schema's defaults filled in, as an API server stores it (a new dict).

    Only absent keys get a default; present values, even wrong ones, are kept for validation.
    """
    out: dict[str, Any] = dict(spec or {})
    for key, default in DEFAULTS.items():
        if isinstance(default, dict):
            cur = out.get(key)
            if cur is None:
                cur = {}
            if isinstance(cur, dict):
                out[key] = {**default, **cur}
        else:
            out.setdefault(key, default)
    return out


class _Checker:
    """Collects problems for one Cluster; each reader returns None (or empty) on bad input."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.problems: list[Problem] = []

    def err(self, path: str, reason: str) -> None:
        self.problems.append(Problem(self.cluster, path, reason))

    def cidr(self, value: Any, path: str, families: tuple[int, ...]) -> str | None:
        try:
            net = ipaddress.ip_network(validation.parse_cidr(value))
        except ValueError as e:
            self.err(path, str(e))
            return None
        if families and net.version not in families:
            names = ", ".join(types.FAMILY_NAMES[f] for f in families)
            self.err(path, f"{value} is {types.FAMILY_NAMES[net.version]} but ipFamilies is [{names}]")
            return None
        return str(net)

    def cidr_list(self, value: Any, path: str, families: tuple[int, ...]) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.err(path, f"{value!r} must be a list of CIDRs")
            return ()
        out: list[str] = []
        for i, v in enumerate(value):
            c = self.cidr(v, f"{path}[{i}]", families)
            if c is None:
                continue
            clash = next((j for j, o in enumerate(out) if types.cidrs_overlap(o, c)), None)
            if clash is not None:
                self.err(f"{path}[{i}]", f"{c} overlaps {out[clash]} ({path}[{clash}]) of the same list")
                continue
            out.append(c)
        return tuple(out)

    def name_list(self, value: Any, path: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.err(path, f"{value!r} must be a list of node names")
            return ()
        out: list[str] = []
        for i, v in enumerate(value):
            if not isinstance(v, str) or not _DNS1123_SUBDOMAIN.match(v) or len(v) > 253:
                self.err(f"{path}[{i}]", f"{v!r} is not a node name (DNS-1123 subdomain)")
            elif v in out:
                self.err(f"{path}[{i}]", f"duplicate node name {v!r}")
            else:
                out.append(v)
        return tuple(out)

    def ifname(self, value: Any, path: str, auto_ok: bool) -> str | None:
        """An interface name as the agent will take it (one check: :func:`fabric.nodeinfo.check_ifname`)."""
        try:
            return nodeinfo.check_ifname(value if isinstance(value, str) else "", auto_ok)
        except ValueError as e:
            self.err(path, f"{value!r} {e}")
            return None

    def keys(self, obj: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
        for k in obj:
            if k not in allowed:
                self.err(f"{path}.{k}", f"unknown field (known: {', '.join(sorted(allowed))})")


def parse_cluster(obj: Mapping[str, Any]) -> ClusterSpec:
    """A Cluster resource (``apiVersion``/``kind``/``metadata``/``spec`` dict) as a
    :class:`ClusterSpec`, schema defaults applied; raises :class:`ClusterSpecError` with every
    problem found, each with its field path (``spec.clusterLinkOptions.podCIDRs[1]``)."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    assert isinstance(meta, Mapping)
    name = meta.get("name")
    ck = _Checker(name if isinstance(name, str) else "?")
    if obj.get("apiVersion", API_VERSION) != API_VERSION or obj.get("kind", KIND) != KIND:
        ck.err("apiVersion", f"{obj.get('apiVersion')}/{obj.get('kind')} is not {API_VERSION}/{KIND}")
    if not isinstance(name, str) or not _DNS1123_LABEL.match(name) or len(name) > 63:
        ck.err("metadata.name", f"{name!r} is not a cluster name (DNS-1123 label: lower-case letters, digits, '-')")
    raw_spec = obj.get("spec")
    if raw_spec is not None and not isinstance(raw_spec, Mapping):
        ck.err("spec", f"{raw_spec!r} must be a mapping")
        raise ClusterSpecError(ck.problems)
    spec = with_defaults(raw_spec)
    # Types, enums, patterns and sizes: the CRD's schema (what an API server refuses), checked
    # here too for Clusters that never went through one (files, join --dry-run, old servers).
    structural = validation.schema_problems("cluster", {**obj, "spec": spec}, unknown="unknown field")
    ck.keys(spec, _SPEC_KEYS, "spec")
    namespace = spec["namespace"]
    link = spec["clusterLinkOptions"]
    tree = spec["clusterTreeOptions"]
    for key, val in (("clusterLinkOptions", link), ("clusterTreeOptions", tree)):
        if not isinstance(val, dict):
            ck.err(f"spec.{key}", f"{val!r} must be a mapping")
    if ck.problems and not (isinstance(link, dict) and isinstance(tree, dict)):
        raise ClusterSpecError(_merged(ck, structural))
    ck.keys(link, _LINK_KEYS, _LINK)

    enable = link["enable"]
    tree_enable = tree.get("enable", False)

    mode: types.ClusterMode | None = None
    with contextlib.suppress(ValueError, TypeError):  # not in the schema's enum: reported
        mode = types.ClusterMode(link["networkType"])

    families: list[int] = []
    raw_fams = link.get("ipFamilies")
    if isinstance(raw_fams, list) and 1 <= len(raw_fams) <= 2:
        for i, f in enumerate(raw_fams):
            fam = _FAMILIES.get(f) if isinstance(f, str) else None
            if fam is None:
                continue  # not in the schema's enum: reported
            if fam in families:  # x-kubernetes-list-type: set, which JSON Schema cannot say
                ck.err(f"{_LINK}.ipFamilies[{i}]", f"duplicate family {f}")
            else:
                families.append(fam)

    fams = tuple(families)
    pods = ck.cidr_list(link.get("podCIDRs"), f"{_LINK}.podCIDRs", fams)
    svcs = ck.cidr_list(link.get("serviceCIDRs"), f"{_LINK}.serviceCIDRs", fams)
    for i, s in enumerate(svcs):
        clash = next((p for p in pods if types.cidrs_overlap(p, s)), None)
        if clash is not None:
            ck.err(f"{_LINK}.serviceCIDRs[{i}]", f"{s} overlaps pod CIDR {clash} of the same cluster")

    global_cidrs = _global_map(ck, link.get("globalCIDRsMap"), fams)
    node_cidrs = ck.cidr_list(link.get("nodeCIDRs"), f"{_LINK}.nodeCIDRs", fams)
    if node_cidrs and mode is not None and mode != types.ClusterMode.GATEWAY:
        ck.err(f"{_LINK}.nodeCIDRs", f"node subnets are for gateway mode (networkType: {mode.value}): "
                                    "only a gateway-mode cluster's vx-local addresses are routed by them")
    gateways = ck.name_list(link.get("gatewayCandidates"), f"{_LINK}.gatewayCandidates")
    active_gateways = _active_gateways(ck, link["activeGateways"], mode, gateways)
    default_nic = ck.ifname(link["defaultNICName"], f"{_LINK}.defaultNICName", auto_ok=True) or AUTO_NIC
    overrides = _nic_overrides(ck, link.get("nicNodeNames"))
    method = _autodetection(ck, link["autodetectionMethod"])

    if ck.problems or structural or mode is None:
        raise ClusterSpecError(_merged(ck, structural))
    assert isinstance(name, str) and isinstance(namespace, str) and isinstance(enable, bool)
    created = meta.get("creationTimestamp")
    return ClusterSpec(
        name=name, namespace=namespace, enable=enable, mode=mode, ip_families=fams, pod_cidrs=pods,
        service_cidrs=svcs, global_cidrs=global_cidrs, gateway_candidates=gateways,
        active_gateways=active_gateways, default_nic=default_nic,
        nic_overrides=overrides, autodetection_method=method, tree_enable=bool(tree_enable),
        created=created if isinstance(created, str) else "", node_cidrs=node_cidrs,
    )


def _active_gateways(
    ck: _Checker, value: Any, mode: types.ClusterMode | None, candidates: tuple[str, ...]
) -> int:
    """``activeGateways``: its type and range are the schema's (reported there; 1 meanwhile).
    Only a gateway-mode cluster has gateways that carry its traffic, and listed candidates must
    be at least as many (with none listed every node is a candidate: the election takes the
    actives among those present, fewer while fewer are up)."""
    path = f"{_LINK}.activeGateways"
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= types.MAX_ACTIVE_GATEWAYS:
        return 1
    if value > 1 and mode is not None and mode != types.ClusterMode.GATEWAY:
        ck.err(path, f"{value} active gateways asked for, but only gateway mode has them (networkType: {mode.value})")
        return 1
    if value > 1 and candidates and value > len(candidates):
        ck.err(path, f"{value} active gateways asked for, but gatewayCandidates names only {len(candidates)}")
        return 1
    return value


def _merged(ck: _Checker, structural: list[tuple[str, str]]) -> list[Problem]:
    """The semantic problems, then the schema's for paths they do not already cover (one
    problem per value: a semantic reason is the more precise, e.g. which IP is missing)."""
    reported = [p.field for p in ck.problems]
    extra = [Problem(ck.cluster, path, reason) for path, reason in structural
             if not validation.suppressed(path, reported)]
    return [*ck.problems, *extra]


def _global_map(ck: _Checker, value: Any, fams: tuple[int, ...]) -> tuple[tuple[str, str], ...]:
    path = f"{_LINK}.globalCIDRsMap"
    if value is None:
        return ()
    if not isinstance(value, dict):
        ck.err(path, f"{value!r} must be a mapping of CIDR to global CIDR")
        return ()
    out: dict[str, str] = {}
    for k, v in value.items():
        kpath = f"{path}[{k}]"
        local = ck.cidr(k, f"{kpath} (key)", fams)
        glob = ck.cidr(v, kpath, fams)
        if local is None or glob is None:
            continue
        problem = validation.mapping_problem(local, glob)
        if problem is not None:
            ck.err(kpath, problem)
        elif local in out:
            ck.err(f"{kpath} (key)", f"{k} is the same CIDR as another key ({local})")
        else:
            clash = next((o for o in out if types.cidrs_overlap(o, local)), None)
            if clash is not None:
                ck.err(f"{kpath} (key)", f"{local} overlaps key {clash}")
                continue
            gclash = next((o for o, g in out.items() if types.cidrs_overlap(g, glob)), None)
            if gclash is not None:
                ck.err(kpath, f"{glob} overlaps {out[gclash]} (the global CIDR of {gclash})")
                continue
            out[local] = glob
    return types.frozen_mapping(out)


def _nic_overrides(ck: _Checker, value: Any) -> tuple[tuple[str, str], ...]:
    path = f"{_LINK}.nicNodeNames"
    if value is None:
        return ()
    if not isinstance(value, list):
        ck.err(path, f"{value!r} must be a list of {{interfaceName, nodeName: [...]}}")
        return ()
    out: dict[str, str] = {}
    where: dict[str, str] = {}
    for i, entry in enumerate(value):
        epath = f"{path}[{i}]"
        if not isinstance(entry, dict):
            ck.err(epath, "must be a mapping with interfaceName and nodeName")
            continue
        ck.keys(entry, frozenset({"interfaceName", "nodeName"}), epath)
        nic = ck.ifname(entry.get("interfaceName"), f"{epath}.interfaceName", auto_ok=False)
        nodes = entry.get("nodeName")
        if not isinstance(nodes, list) or not nodes:
            ck.err(f"{epath}.nodeName", f"{nodes!r} must be a non-empty list of node names")
            continue
        for j, node in enumerate(ck.name_list(nodes, f"{epath}.nodeName")):
            if node in where:
                ck.err(f"{epath}.nodeName[{j}]", f"node {node!r} already has an interface at {where[node]}")
            elif nic is not None:
                out[node], where[node] = nic, epath
    return tuple(sorted(out.items()))


def _autodetection(ck: _Checker, value: Any) -> str:
    """The method as the agent will read it (one parser: :func:`fabric.nodeinfo.check_method`)."""
    try:
        return nodeinfo.check_method(value if isinstance(value, str) else "")
    except ValueError as e:
        ck.err(f"{_LINK}.autodetectionMethod", f"{value!r}: {e}")
        return ""


# --------------------------------------------------------------------------------------------
# Fabric-wide resolution
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Candidate:
    spec: ClusterSpec
    #: (CIDR, field path it came from) for pods and services in use.
    pods: list[tuple[str, str]]
    services: list[tuple[str, str]]
    config: types.ClusterConfig | None = None


def _in_use(spec: ClusterSpec, found: Discovered) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The CIDRs in use with the path reported for them: the spec's pod CIDRs, or in discovery
    mode the discovered ones (collapsed); discovered service CIDRs, else the spec's."""

    def pick(discovered: tuple[str, ...], declared: tuple[str, ...], field: str, source: str) -> list[tuple[str, str]]:
        if discovered:
            v4 = [ipaddress.IPv4Network(c, strict=False) for c in discovered if types.family_of(c) == 4]
            v6 = [ipaddress.IPv6Network(c, strict=False) for c in discovered if types.family_of(c) == 6]
            merged = [str(n) for n in ipaddress.collapse_addresses(v4)]
            merged += [str(n) for n in ipaddress.collapse_addresses(v6)]
            return [(c, f"status.clusterLinkStatus.{field} ({source})") for c in merged]
        return [(c, f"{_LINK}.{field}[{i}]") for i, c in enumerate(declared)]

    pods = found.pod_cidrs if spec.discovers_pod_cidrs else ()
    return (pick(pods, spec.pod_cidrs, "podCIDRs", "discovered from the nodes' announcements"),
            pick(found.service_cidrs, spec.service_cidrs, "serviceCIDRs", "discovered from ServiceCIDRs"))


def _own_checks(cand: _Candidate) -> list[Problem]:
    """Checks of one cluster against what was discovered for it; builds its ClusterConfig."""
    spec = cand.spec
    problems: list[Problem] = []
    path = f"{_LINK}.globalCIDRsMap"
    used = [c for c, _ in cand.pods + cand.services]
    discovery = spec.discovers_pod_cidrs
    if spec.ip_families:
        for c, p in cand.pods + cand.services:
            if types.family_of(c) not in spec.ip_families:
                problems.append(Problem(spec.name, p, f"{c} is not of the families in ipFamilies"))
    covered: set[str] = set()
    for key, _glob in spec.global_cidrs:
        kn = ipaddress.ip_network(key)
        inside = [c for c in used if types.cidrs_overlap(c, key) and ipaddress.ip_network(c).subnet_of(kn)]  # type: ignore[arg-type]
        partial = [c for c in used if types.cidrs_overlap(c, key) and c not in inside]
        if partial:
            problems.append(Problem(spec.name, f"{path}[{key}] (key)",
                                    f"{key} covers only part of {', '.join(partial)} in use: map whole ranges"))
        elif not inside and not discovery:
            problems.append(Problem(spec.name, f"{path}[{key}] (key)",
                                    f"{key} contains none of the cluster's CIDRs in use ({', '.join(used) or 'none'})"))
        covered.update(inside)
    if problems:
        return problems
    keys = {k for k, _ in spec.global_cidrs}
    pod_keys = {k for k in keys if any(c in covered and types.cidrs_overlap(c, k) for c, _ in cand.pods)}
    if discovery:  # a key containing nothing in use yet is for pods still to be announced
        pod_keys |= {k for k in keys if not any(types.cidrs_overlap(c, k) for c in used)}
    pods = tuple(sorted({c for c, _ in cand.pods if c not in covered} | pod_keys))
    svcs = tuple(sorted({c for c, _ in cand.services if c not in covered} | (keys - pod_keys)))
    cand.config = types.ClusterConfig(
        name=spec.name, mode=spec.mode, pod_cidrs=pods, service_cidrs=svcs, gateways=spec.gateway_candidates,
        active_gateways=spec.active_gateways, node_cidrs=spec.node_cidrs,
        global_cidrs=spec.global_cidrs, ip_families=spec.ip_families, discover_pod_cidrs=discovery,
    )
    return []


def _ranges(cand: _Candidate) -> list[tuple[str, str, bool]]:
    """(CIDR, path, mapped) of every real range of an accepted or candidate cluster."""
    assert cand.config is not None
    mapped = {k for k, _ in cand.config.global_cidrs}
    return [(c, p, any(types.cidrs_overlap(c, k) for k in mapped)) for c, p in cand.pods + cand.services]


def _globals(cand: _Candidate) -> list[tuple[str, str]]:
    return [(g, f"{_LINK}.globalCIDRsMap[{k}]") for k, g in cand.spec.global_cidrs]


def _cross_checks(cand: _Candidate, accepted: list[_Candidate], infra: list[tuple[str, str]]) -> list[Problem]:
    name = cand.spec.name
    problems: list[Problem] = []
    mine, my_globals = _ranges(cand), _globals(cand)
    for c, p, _ in mine:
        for ic, what in infra:
            if types.cidrs_overlap(c, ic):
                problems.append(Problem(name, p, f"{c} overlaps the fabric's {what} {ic}"))
    for g, p in my_globals:
        for ic, what in infra:
            if types.cidrs_overlap(g, ic):
                problems.append(Problem(name, p, f"global CIDR {g} overlaps the fabric's {what} {ic}"))
        for c, cp, _ in mine:
            if types.cidrs_overlap(g, c):
                problems.append(Problem(name, p, f"global CIDR {g} overlaps {c} in use by this cluster ({cp})"))
    for other in accepted:
        oname = other.spec.name
        for c, p, mapped in mine:
            for oc, _op, omapped in _ranges(other):
                if not types.cidrs_overlap(c, oc):
                    continue
                if mapped and omapped:
                    continue
                missing = [f"{x} of cluster {cl!r}" for x, cl, m in ((c, name, mapped), (oc, oname, omapped)) if not m]
                problems.append(Problem(
                    name, p, f"{c} overlaps {oc} of cluster {oname!r}: overlapping clusters reach each other only by "
                    f"global IP, so both CIDRs must be mapped in globalCIDRsMap; not mapped: {', '.join(missing)}",
                    oname))
            for og, ogp in _globals(other):
                if types.cidrs_overlap(c, og):
                    problems.append(Problem(name, p, f"{c} overlaps global CIDR {og} of cluster {oname!r} ({ogp})",
                                            oname))
        for g, p in my_globals:
            for oc, _op, _m in _ranges(other):
                if types.cidrs_overlap(g, oc):
                    problems.append(Problem(name, p, f"global CIDR {g} overlaps {oc} in use by cluster {oname!r}",
                                            oname))
            for og, _ogp in _globals(other):
                if types.cidrs_overlap(g, og):
                    problems.append(Problem(name, p, f"global CIDR {g} overlaps global CIDR {og} of cluster {oname!r}",
                                            oname))
    return problems


def _gateway_families(accepted: Sequence[_Candidate]) -> set[int]:
    return {f for a in accepted if a.config is not None and a.config.mode is types.ClusterMode.GATEWAY
            for f in a.config.families}


def _used_local_defaults(
    cand: _Candidate, accepted: Sequence[_Candidate], defaults: Sequence[str]
) -> list[tuple[str, str]]:
    """The vx-local defaults in use once ``cand`` joins (a family some gateway-mode cluster runs)."""
    assert cand.config is not None
    used = _gateway_families(accepted)
    if cand.config.mode is types.ClusterMode.GATEWAY:
        used |= set(cand.config.families)
    return [(c, "default local CIDR") for c in defaults if types.family_of(c) in used]


def _local_default_clashes(cand: _Candidate, accepted: Sequence[_Candidate], defaults: Sequence[str]) -> list[Problem]:
    """A gateway-mode newcomer that starts using a vx-local default overlapping what an accepted
    cluster already uses: the newcomer is left out (working clusters are never disturbed)."""
    assert cand.config is not None
    if cand.config.mode is not types.ClusterMode.GATEWAY:
        return []
    before = _gateway_families(accepted)
    newly = [c for c in defaults if types.family_of(c) in cand.config.families and types.family_of(c) not in before]
    problems: list[Problem] = []
    for c in newly:
        for other in accepted:
            theirs = [(oc, "in use") for oc, _p, _m in _ranges(other)]
            theirs += [(g, "global CIDR") for g, _p in _globals(other)]
            for oc, what in theirs:
                if types.cidrs_overlap(c, oc):
                    problems.append(Problem(
                        cand.spec.name, f"{_LINK}.networkType",
                        f"gateway mode gives the nodes vx-local addresses from the default local CIDR {c} (no local "
                        f"CIDRs are configured), which overlaps {oc} ({what}) of cluster {other.spec.name!r}",
                        other.spec.name))
    return problems


def _node_cidr_clashes(cand: _Candidate, accepted: Sequence[_Candidate], local: tuple[str, ...]) -> list[Problem]:
    """A newcomer whose ``nodeCIDRs`` map onto vx-local addresses an accepted cluster's already
    map to (see :func:`fabric.validation.node_cidr_clashes`): the newcomer is left out."""
    owners = {a.spec.name: a.config for a in (*accepted, cand) if a.config is not None}
    owned = [(name, n) for name, c in owners.items() if c.mode is types.ClusterMode.GATEWAY for n in c.node_cidrs]
    return [Problem(cand.spec.name, f"{_LINK}.nodeCIDRs", why, other)
            for name, other, why in validation.node_cidr_clashes(owned, local) if name == cand.spec.name]


def _is_cidr(value: object) -> bool:
    try:
        validation.parse_cidr(value, strict=False)
    except ValueError:
        return False
    return True


def status_pod_cidrs(objects: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, ...]]:
    """The pod CIDRs in use that the statuses of discovery-mode Clusters list (written by the
    reflector that ran before): what a restarted reflector or a new leader keeps while it holds,
    and what ``fabric-tool join`` checks a new Cluster against."""
    out: dict[str, tuple[str, ...]] = {}
    for obj in objects:
        link = ((obj.get("spec") or {}).get("clusterLinkOptions") or {}) if isinstance(obj.get("spec"), dict) else {}
        status = obj.get("status")
        lstat = status.get("clusterLinkStatus") if isinstance(status, dict) else None
        if not isinstance(link, dict) or link.get("podCIDRs") or not isinstance(lstat, dict):
            continue
        pods = lstat.get("podCIDRs")
        # Anyone who may write the status may write anything: only a list of CIDRs counts (a
        # bad entry made resolve() raise; found by tests/unit/test_fuzz_config.py).
        if isinstance(pods, list) and pods and all(_is_cidr(p) for p in pods):
            meta = obj.get("metadata")
            name = meta.get("name") if isinstance(meta, dict) else None
            if isinstance(name, str):
                out[name] = tuple(pods)
    return out


def resolve(
    clusters: Sequence[Mapping[str, Any]],
    discovered: Mapping[str, Discovered] | None = None,
    bridge_cidrs: Sequence[str] = (),
    local_cidrs: Sequence[str] = (),
) -> Resolution:
    """Every Cluster resource into one fabric configuration, leaving out (with reasons) those
    that are invalid or conflict with a cluster accepted before them (oldest first).

    ``discovered`` holds what agents and ServiceCIDR objects reported per cluster name (pod
    CIDRs count for Clusters in discovery mode only: without ``podCIDRs`` in the spec);
    ``bridge_cidrs``/``local_cidrs`` are the fabric-wide overlay ranges (each family missing
    takes the default of :mod:`fabric.types`).
    """
    found = discovered or {}
    bridge = tuple(bridge_cidrs) or (types.DEFAULT_BRIDGE_CIDR_V4,)
    local = tuple(local_cidrs) or (types.DEFAULT_LOCAL_CIDR_V4,)
    # Checks cover the defaults of the families not given, as the planner uses them. A bridge
    # range of a family is used by every cluster running it (only ranges of that family can
    # overlap it); a vx-local default only once a gateway-mode cluster runs its family, so it is
    # checked only from then on (validation.overlay_ranges' rule), on the newcomer.
    infra = [(c, "bridge CIDR") for c in types.with_defaults(bridge, validation.BRIDGE_DEFAULTS)]
    infra += [(c, "local CIDR") for c in local_cidrs]
    local_defaults = [c for c in types.with_defaults(local_cidrs, validation.LOCAL_DEFAULTS) if c not in local_cidrs]
    problems: dict[str, tuple[Problem, ...]] = {}
    disabled: list[str] = []
    candidates: list[_Candidate] = []
    seen: set[str] = set()
    for obj in clusters:
        try:
            spec = parse_cluster(obj)
        except ClusterSpecError as e:
            cname = e.problems[0].cluster if e.problems else "?"
            problems[cname] = e.problems
            continue
        if spec.name in seen:  # a list from an API server never has this; a hand-made one may
            problems[spec.name] = (Problem(spec.name, "metadata.name", "duplicate Cluster name"),)
            continue
        seen.add(spec.name)
        if not spec.enable:
            disabled.append(spec.name)
            continue
        pods, svcs = _in_use(spec, found.get(spec.name, Discovered()))
        candidates.append(_Candidate(spec, pods, svcs))

    accepted: list[_Candidate] = []
    for cand in sorted(candidates, key=lambda c: (c.spec.created, c.spec.name)):
        own = _own_checks(cand)
        errs = own or _cross_checks(cand, accepted, infra + _used_local_defaults(cand, accepted, local_defaults))
        errs = errs or _local_default_clashes(cand, accepted, local_defaults)
        errs = errs or _node_cidr_clashes(cand, accepted, local)
        if errs:
            problems[cand.spec.name] = tuple(errs)
            _log.info("Cluster %s left out of the fabric: %s", cand.spec.name, "; ".join(str(p) for p in errs))
            continue
        accepted.append(cand)
    configs = tuple(sorted((c.config for c in accepted if c.config is not None), key=lambda c: c.name))
    return Resolution(
        config=types.FabricConfig(clusters=configs, bridge_cidrs=bridge, local_cidrs=local),
        problems=problems,
        disabled=tuple(sorted(disabled)),
        in_use={c.spec.name: (tuple(x for x, _ in c.pods), tuple(x for x, _ in c.services)) for c in candidates},
    )
