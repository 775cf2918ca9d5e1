"""The topology file: the fabric's configuration and, for the lab, the nodes and pods to build.

One file format serves two readers:

* ``fabric-reflector --config FILE`` takes the fabric configuration from it (clusters, their
  mode and CIDRs; the node list, when present, only tells a restarted reflector whom to wait
  for before it sends END_OF_SNAPSHOT);
* ``fabric-tool lab up FILE`` additionally builds every listed node and its pods.

Example (``examples/lab.yaml`` is the default lab)::

    underlay: 198.18.0.0/16            # optional; lab underlay range
    bridgeCIDRs: [100.64.0.0/10]       # optional; vx-bridge overlay addresses come from here
    localCIDRs: [198.19.0.0/16]        # optional; vx-local overlay addresses (gateway mode)
    kubernetes: false                  # optional; the lab runs an emulated API server per cluster
    clusters:
      - name: east                     # DNS-1123 label
        mode: p2p                      # or gateway
        podCIDRs: [10.10.0.0/16]
        serviceCIDRs: [10.96.0.0/20]   # optional
        gateways: [e1, e2]             # optional: gateway candidates in order (default: every node)
        activeGateways: 2              # optional (gateway mode): gateways carrying traffic at once (default 1)
        nodeCIDRs: [198.18.0.0/24]     # optional (gateway mode): the nodes' underlay subnets (see below)
        globalCIDRs:                   # optional: global IP (see below)
          10.10.0.0/16: 100.100.0.0/16
        nodes:
          - name: e1
            podCIDR: 10.10.1.0/24      # optional: carved in order from podCIDRs when absent
            pods: 2                    # lab pods on this node (p0, p1, ...)
            underlay: 198.18.0.11      # optional
            resources:                 # optional (kubernetes: true): the Node's capacity
              cpu: "4"                 # defaults: cpu 4, memory 8Gi, pods 110, ephemeral-storage 50Gi
              memory: 8Gi
              example.com/gpu: 2       # extended resources: domain/name, whole numbers

ClusterTree (``kubernetes: true``): ``role: host`` marks the root cluster, ``tree: cluster``,
``tree: node`` or ``tree: "party=<label selector>"`` a leaf and its leaf model; the lab checks
them (tools.lab.planning) and joins the leaves to the host.

With ``kubernetes: true`` a cluster may name its ``scheduler``: ``kosmos`` (the default: the Kosmos
scheduler binds pods without ``nodeName``) or ``none`` (they stay Pending); the lab decides which
it can run (tools.lab.schedulers).

Global IP (``globalCIDRs``): each key is exactly one of the cluster's ``podCIDRs`` or
``serviceCIDRs`` (a whole declared range: translation is per declared CIDR, so to map only part of
a range, declare the parts as separate CIDRs), each value a global CIDR of the same prefix
length. Other clusters then see and route that range only by its global CIDR; the cluster's
nodes translate 1:1 by prefix in eBPF. Global CIDRs must be unique and disjoint from each other,
from every real CIDR of every cluster, from the underlay, ``bridgeCIDRs`` and ``localCIDRs``.
Two clusters whose real CIDRs overlap (the common case: default pod and service ranges) are
accepted only when *both* overlapping CIDRs are mapped: a pod can reach an overlapping remote
range only by its global addresses, and routing the real one would shadow the node's own pods.

Node subnets (``nodeCIDRs``, gateway mode): the subnets the cluster's nodes' underlay addresses
are in. Every other cluster routes a gateway-mode cluster's ``vx-local`` addresses (the return
path of its nodes' host-network traffic) via its gateway; with ``nodeCIDRs`` that is the fixed
image of these subnets in ``localCIDRs``, so a node joining or leaving changes no other cluster's
routes, and no other cluster's node splits them (without it, the widest prefixes around the
nodes' addresses that hold no other cluster's: a join inside them moves nothing, but where the
clusters' addresses interleave they are host routes and each join reaches every node of the
fabric). A node outside them is routed by the prefix around it too. The images of two
clusters' ``nodeCIDRs`` in ``localCIDRs`` must not overlap.

Dual stack (``ipFamilies``): a cluster runs ``[IPv4]``, ``[IPv6]`` or both (``[IPv4, IPv6]`` or
``[IPv6, IPv4]``; the first is its primary family). Absent, it is derived from ``podCIDRs`` (the
families in order of appearance), so a file written before dual stack means what it meant.
Every family listed needs a pod CIDR of that family; every pod, service and global CIDR must be
of a listed family (and a global CIDR of the family of the CIDR it maps). A node's ``podCIDR``
is one CIDR or a list of one per family; families not given are carved (/24 for IPv4, /64 for
IPv6). The lab gives every node an IPv4 underlay address (its management network: the agent
talks to the reflector over it) and, when its cluster runs IPv6, an IPv6 one from ``underlay6``
(default ``fd00:198:18::/64``, a unique-local range mirroring 198.18.0.0/16; optional per node,
``underlay6:``) with the same host number as its IPv4 one. The fabric carries a family only
over the underlay of that family (``vx-bridge-6``/``vx-local-6`` ride on IPv6), and only
between clusters that both run it: two clusters that share no family cannot talk, and
``fabric-tool status`` says so. ``bridgeCIDRs``/``localCIDRs`` may list one CIDR per family; a
family not listed takes its default (IPv6: ``fd00:100:64::/64`` and ``fd00:198:19::/64``). A
default is checked for overlaps only where it is used (a bridge default: some cluster runs its
family; a ``localCIDRs`` default: some *gateway-mode* cluster does; the ``underlay6`` default:
some cluster runs IPv6), so a file never fails on a default it does not use; a collision names
the default and the key to set. Ranges the file sets are always checked.

Validation is complete before anything is created: every problem is reported at once, each
naming the file, the key path (``clusters[1].nodes[0].podCIDR``) and the reason. Structure
(keys, types, enums, CIDR syntax, sizes) is one schema, built from the Cluster CRD's (see
:mod:`fabric.validation`); the parser adds what a schema cannot say.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from fabric import types, validation

DEFAULT_UNDERLAY = "198.18.0.0/16"
#: The lab's IPv6 underlay (nodes of clusters that run IPv6); see the module docstring.
DEFAULT_UNDERLAY6 = "fd00:198:18::/64"
#: Host index of the first automatically assigned node underlay address; .1 is the lab's own
#: address (the reflector listens there), .2-.10 are kept for lab infrastructure.
FIRST_NODE_HOST = 11
#: Prefix length of node pod CIDRs carved automatically from the cluster's pod CIDRs.
CARVE_PREFIX_V4 = 24
CARVE_PREFIX_V6 = 64
_FAMILY_BY_NAME = {name: f for f, name in types.FAMILY_NAMES.items()}
MAX_PODS_PER_NODE = validation.MAX_PODS_PER_NODE

_DNS1123_LABEL = re.compile(validation.DNS1123_LABEL)
_QUANTITY = re.compile(validation.QUANTITY)
#: An extended resource name (upstream ``IsExtendedResourceName``): a DNS subdomain outside
#: ``kubernetes.io``, ``/``, a name.
_EXTENDED_RESOURCE = re.compile(r"^(?![a-z0-9.-]*kubernetes\.io/)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*"
                                r"[a-z0-9])?)*/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_MAX_NAME = validation.MAX_LAB_NAME

#: Modes this build can run.
SUPPORTED_MODES = (types.ClusterMode.P2P, types.ClusterMode.GATEWAY)
#: A cluster's ``scheduler`` when the file names none: the Kosmos scheduler (issue 16).
DEFAULT_SCHEDULER = "kosmos"


class TopologyError(ValueError):
    """The topology file is invalid. ``problems`` lists ``(key path, reason)`` pairs."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = tuple(problems)
        lines = [f"{source}: {path}: {reason}" if path else f"{source}: {reason}" for path, reason in self.problems]
        super().__init__("invalid topology:\n  " + "\n  ".join(lines))


@dataclasses.dataclass(frozen=True, slots=True)
class LabNode:
    name: str
    pod_cidr: str
    pods: int
    underlay_ip: str
    #: Dual stack: the node's IPv6 pod CIDR and IPv6 underlay address ("" when its cluster does
    #: not run IPv6). ``pod_cidr`` is "" when the cluster does not run IPv4; ``underlay_ip`` is
    #: always the IPv4 (management) address.
    pod_cidr6: str = ""
    underlay_ip6: str = ""
    #: Declared capacity of the node's kubelet (``resources:``), as written: ``(name, quantity)``
    #: pairs; the lab kubelet adds its defaults (cpu 4, memory 8Gi, pods 110, ephemeral-storage 50Gi).
    resources: tuple[tuple[str, str], ...] = ()

    def pod_ips(self) -> tuple[str, ...]:
        """Pod ``pN`` gets host address N+2 of the node's pod CIDR (.1 is left free); empty when
        the node has no IPv4 pod CIDR."""
        return _pod_ips(self.pod_cidr, self.pods)

    def pod_ips6(self) -> tuple[str, ...]:
        """The pods' IPv6 addresses, numbered as :meth:`pod_ips`."""
        return _pod_ips(self.pod_cidr6, self.pods)

    @property
    def pod_cidrs(self) -> tuple[str, ...]:
        return tuple(c for c in (self.pod_cidr, self.pod_cidr6) if c)


def _pod_ips(cidr: str, pods: int) -> tuple[str, ...]:
    if not cidr:
        return ()
    net = ipaddress.ip_network(cidr)
    return tuple(str(net.network_address + 2 + i) for i in range(pods))


@dataclasses.dataclass(frozen=True, slots=True)
class LabCluster:
    config: types.ClusterConfig
    nodes: tuple[LabNode, ...]
    #: ``kubernetes: true`` labs: the scheduler the lab runs for the cluster (``kosmos`` by
    #: default; ``none``: pods without ``nodeName`` stay Pending). Only the lab reads it.
    scheduler: str = DEFAULT_SCHEDULER
    #: ClusterTree in the lab, as written (``role: host``; a leaf's ``tree``: its leaf model);
    #: "" when absent. Only the lab reads them (tools.lab.planning checks the values).
    role: str = ""
    tree: str = ""

    @property
    def name(self) -> str:
        return self.config.name


@dataclasses.dataclass(frozen=True, slots=True)
class TopologyFile:
    source: str
    underlay: str
    bridge_cidrs: tuple[str, ...]
    clusters: tuple[LabCluster, ...]
    local_cidrs: tuple[str, ...] = (types.DEFAULT_LOCAL_CIDR_V4,)
    #: The lab runs one emulated Kubernetes API server (kubeemu) and lab kubelet per cluster.
    #: Only the lab reads it; the fabric itself never talks to Kubernetes through this file.
    kubernetes: bool = False
    #: The lab's IPv6 underlay range (used when a cluster runs IPv6).
    underlay6: str = DEFAULT_UNDERLAY6

    def fabric_config(self) -> types.FabricConfig:
        return types.FabricConfig(
            clusters=tuple(c.config for c in self.clusters),
            bridge_cidrs=self.bridge_cidrs,
            local_cidrs=self.local_cidrs,
            expected_nodes=tuple(f"{c.name}/{n.name}" for c in self.clusters for n in c.nodes),
        )

    def nodes(self) -> Iterator[tuple[LabCluster, LabNode]]:
        for c in self.clusters:
            for n in c.nodes:
                yield c, n

    def underlay_gateway(self) -> str:
        """The lab's own underlay address (host .1): the reflector listens here."""
        return str(ipaddress.ip_network(self.underlay).network_address + 1)

    def underlay_gateway6(self) -> str:
        """The lab's own IPv6 underlay address (host ::1)."""
        return str(ipaddress.ip_network(self.underlay6).network_address + 1)

    @property
    def uses_ipv6(self) -> bool:
        """Does any cluster run IPv6 (the lab then builds its IPv6 underlay)?"""
        return any(6 in c.config.families for c in self.clusters)


def load(path: str | Path) -> TopologyFile:
    """Read and validate a topology file; raises :class:`TopologyError` naming every problem."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise TopologyError(source, [("", f"cannot read file: {e.strerror or e}")]) from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TopologyError(source, [("", f"not valid YAML: {e}")]) from e
    return parse(doc, source)


def parse(doc: Any, source: str = "<topology>") -> TopologyFile:
    """Validate an already-parsed document (see :func:`load`)."""
    return _Parser(source).parse(doc)


class _Parser:
    """Structure is the schema's (:func:`fabric.validation.topology_schema`, checked first); the
    parser reads the values and adds the semantic checks. A value the schema refused is read as
    absent and gets no second problem (:func:`fabric.validation.suppressed`)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[tuple[str, str]] = []
        self.structural: list[str] = []

    def err(self, path: str, reason: str) -> None:
        if not validation.suppressed(path, self.structural):
            self.problems.append((path, reason))

    # -- small typed readers; each returns None on bad input (the schema has said why) ---------

    @staticmethod
    def _name(value: Any) -> str | None:
        ok = isinstance(value, str) and _DNS1123_LABEL.match(value) and len(value) <= _MAX_NAME
        return value if ok else None

    def _cidr(self, value: Any, path: str) -> str | None:
        try:
            return validation.parse_cidr(value)
        except ValueError as e:
            self.err(path, str(e))
            return None

    def _cidr_of(self, value: Any, path: str, family: int) -> str | None:
        c = self._cidr(value, path)
        if c is not None and types.family_of(c) != family:
            self.err(path, f"{c} is not an IPv{family} CIDR")
            return None
        return c

    def _cidr_list(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, list):
            return []
        out = []
        for i, v in enumerate(value):
            c = self._cidr(v, f"{path}[{i}]")
            if c is not None:
                out.append(c)
        return out

    def _ip(self, value: Any, path: str) -> str | None:
        try:
            ip = ipaddress.ip_address(value) if isinstance(value, str) else None
        except ValueError:
            ip = None
        if ip is None:
            self.err(path, f"{value!r} is not an IP address")
            return None
        return str(ip)

    # -- the document ---------------------------------------------------------------------------

    def parse(self, doc: Any) -> TopologyFile:
        if not isinstance(doc, dict):
            raise TopologyError(self.source, [("", "the document must be a mapping with a 'clusters' list")])
        self.problems = validation.schema_problems("topology", doc)
        self.structural = [p for p, _ in self.problems]
        underlay = self._cidr_of(doc.get("underlay", DEFAULT_UNDERLAY), "underlay", 4) or DEFAULT_UNDERLAY
        underlay6 = self._cidr_of(doc.get("underlay6", DEFAULT_UNDERLAY6), "underlay6", 6) or DEFAULT_UNDERLAY6
        # Absent overlay keys stay empty here: their defaults are checked only where used.
        bridge = self._cidr_list(doc["bridgeCIDRs"], "bridgeCIDRs") if "bridgeCIDRs" in doc else []
        local = self._cidr_list(doc["localCIDRs"], "localCIDRs") if "localCIDRs" in doc else []
        kubernetes = doc.get("kubernetes", False)
        if not isinstance(kubernetes, bool):
            kubernetes = False
        raw_clusters = doc.get("clusters")
        if not isinstance(raw_clusters, list):
            raw_clusters = []

        clusters: list[tuple[str, dict[str, Any]]] = []
        seen: dict[str, str] = {}
        for i, rc in enumerate(raw_clusters):
            path = f"clusters[{i}]"
            if not isinstance(rc, dict):
                continue
            name = self._name(rc.get("name"))
            if name is not None:
                if name in seen:
                    self.err(f"{path}.name", f"duplicate cluster name {name!r} (first at {seen[name]})")
                seen[name] = path
            clusters.append((path, rc))

        parsed = [self._cluster(path, rc) for path, rc in clusters]
        for pc, (path, rc) in zip(parsed, clusters, strict=True):
            sched = rc.get("scheduler")
            if isinstance(sched, str) and sched in validation.LAB_SCHEDULERS:
                pc.scheduler = sched
                if not kubernetes:
                    self.err(f"{path}.scheduler", "a scheduler runs only in a lab with 'kubernetes: true'")
            pc.role = rc["role"] if isinstance(rc.get("role"), str) else ""
            pc.tree = rc["tree"] if isinstance(rc.get("tree"), str) else ""
        self._cross_checks(parsed, underlay, bridge, local, underlay6, underlay6_default="underlay6" not in doc)
        self._assign(parsed, underlay)
        self._assign6(parsed, underlay, underlay6)
        if self.problems:
            raise TopologyError(self.source, self.problems)
        result = []
        for pc in parsed:
            assert pc.name is not None and pc.mode is not None
            result.append(
                LabCluster(
                    config=types.ClusterConfig(
                        name=pc.name,
                        mode=pc.mode,
                        pod_cidrs=tuple(pc.pod_cidrs),
                        service_cidrs=tuple(pc.service_cidrs),
                        gateways=tuple(pc.gateways),
                        active_gateways=pc.active_gateways,
                        node_cidrs=tuple(pc.node_cidrs),
                        global_cidrs=types.frozen_mapping(pc.global_cidrs),
                        ip_families=tuple(pc.ip_families),
                    ),
                    nodes=tuple(
                        LabNode(
                            n.name, n.pod_cidr or "", n.pods, n.underlay,  # type: ignore[arg-type]
                            pod_cidr6=n.pod_cidr6 or "", underlay_ip6=n.underlay6 or "",
                            resources=tuple(n.resources),
                        )
                        for n in pc.nodes
                    ),
                    scheduler=pc.scheduler,
                    role=pc.role,
                    tree=pc.tree,
                )
            )
        return TopologyFile(
            self.source, underlay, tuple(bridge) or (types.DEFAULT_BRIDGE_CIDR_V4,), tuple(result),
            tuple(local) or (types.DEFAULT_LOCAL_CIDR_V4,), kubernetes, underlay6=underlay6,
        )

    def _cluster(self, path: str, rc: dict[str, Any]) -> _PCluster:
        pc = _PCluster(path=path, name=rc.get("name") if isinstance(rc.get("name"), str) else None)
        mode = rc.get("mode", "p2p")
        try:
            pc.mode = types.ClusterMode(mode)
        except (ValueError, TypeError):
            pass  # not in the schema's enum: reported
        else:
            if pc.mode not in SUPPORTED_MODES:
                supported = ", ".join(m.value for m in SUPPORTED_MODES)
                self.err(f"{path}.mode", f"{mode!r} is not supported by this build (supported: {supported})")
        pc.pod_cidrs = self._cidr_list(rc.get("podCIDRs"), f"{path}.podCIDRs")
        pc.service_cidrs = self._cidr_list(rc.get("serviceCIDRs"), f"{path}.serviceCIDRs")
        pc.node_cidrs = self._cidr_list(rc.get("nodeCIDRs"), f"{path}.nodeCIDRs")
        self._families(pc, rc.get("ipFamilies"), f"{path}.ipFamilies")
        raw_nodes = rc.get("nodes", [])
        if not isinstance(raw_nodes, list):
            raw_nodes = []
        seen: dict[str, str] = {}
        for j, rn in enumerate(raw_nodes):
            npath = f"{path}.nodes[{j}]"
            if not isinstance(rn, dict):
                continue
            pn = _PNode(path=npath, name=self._name(rn.get("name")) or "")
            if pn.name:
                if pn.name in seen:
                    self.err(f"{npath}.name", f"duplicate node name {pn.name!r} in cluster (first at {seen[pn.name]})")
                seen[pn.name] = npath
            if "podCIDR" in rn:
                self._node_pod_cidrs(pc, pn, rn["podCIDR"], f"{npath}.podCIDR")
            pods = rn.get("pods", 0)
            if isinstance(pods, int) and not isinstance(pods, bool) and 0 <= pods <= MAX_PODS_PER_NODE:
                pn.pods = pods
            if "underlay" in rn:
                pn.underlay = self._ip(rn["underlay"], f"{npath}.underlay")
                if pn.underlay is not None and types.family_of(pn.underlay) != 4:
                    self.err(f"{npath}.underlay", f"{pn.underlay} is not an IPv4 address (IPv6: underlay6)")
                    pn.underlay = None
            if "underlay6" in rn:
                pn.underlay6 = self._ip(rn["underlay6"], f"{npath}.underlay6")
                if pn.underlay6 is not None and types.family_of(pn.underlay6) != 6:
                    self.err(f"{npath}.underlay6", f"{pn.underlay6} is not an IPv6 address")
                    pn.underlay6 = None
                elif pn.underlay6 is not None and 6 not in pc.families:
                    self.err(f"{npath}.underlay6", "the cluster does not run IPv6 (ipFamilies)")
                    pn.underlay6 = None
            if isinstance(rn.get("resources"), dict):
                self._node_resources(pn, rn["resources"], f"{npath}.resources")
            pc.nodes.append(pn)
        self._gateways(pc, rc.get("gateways"), f"{path}.gateways")
        self._active_gateways(pc, rc.get("activeGateways"), f"{path}.activeGateways")
        self._global_cidrs(pc, rc.get("globalCIDRs"), f"{path}.globalCIDRs")
        return pc

    def _families(self, pc: _PCluster, value: Any, path: str) -> None:
        """``ipFamilies``: 1-2 distinct names, consistent with the pod and service CIDRs; absent =
        the families of ``podCIDRs`` in order (``ClusterConfig`` then leaves it empty)."""
        pc.families = list(types.derive_families(pc.pod_cidrs))
        if value is not None:
            if not isinstance(value, list) or not 1 <= len(value) <= 2:
                return
            fams: list[int] = []
            for i, v in enumerate(value):
                f = _FAMILY_BY_NAME.get(v) if isinstance(v, str) else None
                if f is None:
                    return
                if f in fams:
                    self.err(f"{path}[{i}]", f"duplicate address family {v}")
                    return
                fams.append(f)
            pc.families = fams
            pc.ip_families = fams
            for f in fams:
                if pc.pod_cidrs and not any(types.family_of(c) == f for c in pc.pod_cidrs):
                    fname = types.FAMILY_NAMES[f]
                    self.err(f"{pc.path}.podCIDRs", f"the cluster runs {fname} ({path}) but has no {fname} pod CIDR")
        run = ", ".join(types.FAMILY_NAMES[f] for f in pc.families)
        declared = (("podCIDRs", pc.pod_cidrs), ("serviceCIDRs", pc.service_cidrs), ("nodeCIDRs", pc.node_cidrs))
        for key, cidrs in declared:
            for k, c in enumerate(cidrs):
                if types.family_of(c) not in pc.families:
                    fname = types.FAMILY_NAMES[types.family_of(c)]
                    self.err(f"{pc.path}.{key}[{k}]", f"{c} is {fname} but the cluster runs only {run} (ipFamilies)")

    def _node_resources(self, pn: _PNode, value: dict[str, Any], path: str) -> None:
        """A node's ``resources``: what the schema cannot say (resource names, whole counts)."""
        for name, q in value.items():
            p = validation.join(path, name)
            if not isinstance(q, (str, int)) or isinstance(q, bool) or not _QUANTITY.match(str(q)):
                continue  # the schema reported it
            standard = name in ("cpu", "memory", "pods", "ephemeral-storage") or name.startswith("hugepages-")
            if not standard and not _EXTENDED_RESOURCE.match(name):
                self.err(p, f"node {pn.name or '?'}: {name!r} is neither cpu, memory, pods, ephemeral-storage, "
                            "hugepages-<size> nor an extended resource (domain/name, e.g. example.com/gpu)")
                continue
            if (name == "pods" or not standard) and not re.fullmatch(r"\+?[0-9]+", str(q)):
                self.err(p, f"node {pn.name or '?'}: {name} must be a whole number, not {q!r}")
                continue
            pn.resources.append((name, str(q)))

    def _node_pod_cidrs(self, pc: _PCluster, pn: _PNode, value: Any, path: str) -> None:
        """A node's ``podCIDR``: one CIDR, or a list with at most one per family."""
        items = value if isinstance(value, list) else [value]
        for i, v in enumerate(items):
            p = f"{path}[{i}]" if isinstance(value, list) else path
            c = self._cidr(v, p)
            if c is None:
                continue
            f = types.family_of(c)
            if f not in pc.families:
                self.err(p, f"{c} is IPv{f} but the cluster does not run IPv{f} (ipFamilies)")
                continue
            if (pn.pod_cidr if f == 4 else pn.pod_cidr6) is not None:
                self.err(p, f"{c}: a second IPv{f} pod CIDR for the node (one per family)")
                continue
            if pc.pod_cidrs and not any(
                ipaddress.ip_network(c).subnet_of(ipaddress.ip_network(o))  # type: ignore[arg-type]
                for o in pc.pod_cidrs
                if types.family_of(o) == f
            ):
                self.err(p, f"{c} is outside the cluster's podCIDRs {pc.pod_cidrs}")
            if f == 4:
                pn.pod_cidr = c
            else:
                pn.pod_cidr6 = c

    def _global_cidrs(self, pc: _PCluster, value: Any, path: str) -> None:
        """``{local: global}``: local is one of the cluster's declared CIDRs, same size both sides.
        Uniqueness and disjointness across the fabric are checked in :meth:`_cross_checks`."""
        if value is None:
            return
        if not isinstance(value, dict) or not value:
            return
        declared = set(pc.pod_cidrs) | set(pc.service_cidrs)
        for k, v in value.items():
            kpath = f"{path}[{k}]"
            local = self._cidr(k, f"{kpath} (key)")
            glob = self._cidr(v, kpath)
            if local is None or glob is None:
                continue
            if local not in declared:
                self.err(
                    f"{kpath} (key)",
                    f"{local} is not one of the cluster's podCIDRs/serviceCIDRs {sorted(declared)} (map a whole "
                    "declared CIDR; split the range in podCIDRs to map part of it)",
                )
                continue
            problem = validation.mapping_problem(local, glob)
            if problem is not None:
                self.err(kpath, problem)
                continue
            pc.global_cidrs[local] = glob

    def _gateways(self, pc: _PCluster, value: Any, path: str) -> None:
        """Gateway candidates: node names of this cluster, no repeats (absent = every node).

        The file's node list is what the lab builds; a real fabric may list no nodes at all, so
        candidates are checked against the node list only when the cluster has one.
        """
        if value is None:
            return
        if not isinstance(value, list) or not value:
            return
        known = {n.name for n in pc.nodes if n.name}
        seen: set[str] = set()
        for i, v in enumerate(value):
            name = self._name(v)
            if name is None:
                continue
            if name in seen:
                self.err(f"{path}[{i}]", f"duplicate gateway candidate {name!r}")
                continue
            seen.add(name)
            if pc.nodes and name not in known:
                self.err(
                    f"{path}[{i}]",
                    f"{name!r} is not a node of cluster {pc.name!r} (nodes: {', '.join(sorted(known)) or 'none'})",
                )
                continue
            pc.gateways.append(name)

    def _active_gateways(self, pc: _PCluster, value: Any, path: str) -> None:
        """``activeGateways`` (active/active, issue 21 section 2): the type and range are the
        schema's; only a gateway-mode cluster has gateways that carry its traffic, and it cannot
        have more actives than candidates (the listed ones, or its nodes when none are listed)."""
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return
        if value > 1 and pc.mode is not None and pc.mode != types.ClusterMode.GATEWAY:
            self.err(
                path, f"{value} active gateways asked for, but only gateway mode has them (mode: {pc.mode.value})"
            )
            return
        room = len(pc.gateways) if pc.gateways else len(pc.nodes)
        if value > 1 and pc.nodes and value > room:
            what = "gateway candidates" if pc.gateways else "nodes"
            self.err(path, f"{value} active gateways asked for, but cluster {pc.name!r} has only {room} {what}")
            return
        pc.active_gateways = value

    def _cross_checks(
        self, parsed: list[_PCluster], underlay: str, bridge: list[str], local: list[str], underlay6: str,
        underlay6_default: bool,
    ) -> None:
        # Every CIDR of every cluster, with where it came from.
        owned: list[tuple[str, str, str]] = []  # (cidr, path, cluster)
        for pc in parsed:
            for k, c in enumerate(pc.pod_cidrs):
                owned.append((c, f"{pc.path}.podCIDRs[{k}]", pc.name or pc.path))
            for k, c in enumerate(pc.service_cidrs):
                owned.append((c, f"{pc.path}.serviceCIDRs[{k}]", pc.name or pc.path))
        mapped = {(pc.name or pc.path, local) for pc in parsed for local in pc.global_cidrs}
        for a in range(len(owned)):
            for b in range(a + 1, len(owned)):
                ca, pa, cla = owned[a]
                cb, pb, clb = owned[b]
                if not types.cidrs_overlap(ca, cb):
                    continue
                if cla == clb:
                    self.err(pb, f"{cb} overlaps {ca} at {pa}: overlaps another CIDR of the same cluster")
                    continue
                unmapped = [f"{c} of cluster {cl!r}" for c, cl in ((ca, cla), (cb, clb)) if (cl, c) not in mapped]
                if unmapped:
                    self.err(
                        pb,
                        f"{cb} overlaps {ca} at {pa}: clusters with overlapping CIDRs reach each other only by "
                        f"global IP, so both must be mapped in globalCIDRs; not mapped: {', '.join(unmapped)}",
                    )
        # Global CIDRs: unique, disjoint from each other and from every real CIDR.
        globals_: list[tuple[str, str]] = [
            (g, f"{pc.path}.globalCIDRs[{local}]") for pc in parsed for local, g in pc.global_cidrs.items()
        ]
        for a in range(len(globals_)):
            for b in range(a + 1, len(globals_)):
                (ga, pa), (gb, pb) = globals_[a], globals_[b]
                if types.cidrs_overlap(ga, gb):
                    self.err(pb, f"global CIDR {gb} overlaps global CIDR {ga} at {pa}")
            for c, p, _ in owned:
                if types.cidrs_overlap(globals_[a][0], c):
                    self.err(globals_[a][1], f"global CIDR {globals_[a][0]} overlaps {c} at {p}")
        # Infrastructure ranges; a default (a family the file does not set) only where it is used.
        run = {f for pc in parsed for f in pc.families}
        gateway_run = {f for pc in parsed if pc.mode is types.ClusterMode.GATEWAY for f in pc.families}
        underlays = [validation.Range(underlay, "underlay", "underlay")]
        if not underlay6_default or 6 in run:
            underlays.append(validation.Range(underlay6, "underlay6", "underlay6", default=underlay6_default))
        problems = validation.infra_problems(
            [*((c, p) for c, p, _ in owned), *globals_],
            underlays,
            validation.overlay_ranges("bridgeCIDRs", bridge, validation.BRIDGE_DEFAULTS, run),
            validation.overlay_ranges("localCIDRs", local, validation.LOCAL_DEFAULTS, gateway_run),
        )
        for path, reason in problems:
            self.err(path, reason)
        # nodeCIDRs: gateway mode only; their vx-local images disjoint across clusters.
        subnets: list[tuple[str, str]] = []
        path_of: dict[str, str] = {}
        for pc in parsed:
            if pc.node_cidrs and pc.mode is not None and pc.mode is not types.ClusterMode.GATEWAY:
                self.err(f"{pc.path}.nodeCIDRs", f"node subnets are for gateway mode (mode: {pc.mode.value}): "
                                                 "only a gateway-mode cluster's vx-local addresses use them")
                continue
            owner = f"cluster {pc.name or pc.path!r}"
            path_of[owner] = f"{pc.path}.nodeCIDRs"
            subnets += [(owner, n) for n in pc.node_cidrs]
        for owner, _other, why in validation.node_cidr_clashes(subnets, local):
            self.err(path_of[owner], why)

    def _assign(self, parsed: list[_PCluster], underlay: str) -> None:
        """Fill in absent node pod CIDRs and underlay addresses, deterministically, in file order."""
        net = ipaddress.ip_network(underlay)
        taken_ul: dict[str, str] = {}
        for pc in parsed:
            for pn in pc.nodes:
                if pn.underlay is None:
                    continue
                addr = ipaddress.ip_address(pn.underlay)
                if addr not in net:
                    self.err(f"{pn.path}.underlay", f"{pn.underlay} is outside the underlay {underlay}")
                elif int(addr) - int(net.network_address) < FIRST_NODE_HOST or addr == net.broadcast_address:
                    self.err(
                        f"{pn.path}.underlay",
                        f"{pn.underlay} is reserved (host numbers below {FIRST_NODE_HOST} and the broadcast "
                        "address belong to the lab)",
                    )
                elif pn.underlay in taken_ul:
                    self.err(f"{pn.path}.underlay", f"{pn.underlay} is already used by {taken_ul[pn.underlay]}")
                taken_ul[pn.underlay] = pn.path
        host = FIRST_NODE_HOST
        for pc in parsed:
            for pn in pc.nodes:
                if pn.underlay is not None:
                    continue
                while str(net.network_address + host) in taken_ul:
                    host += 1
                addr = net.network_address + host
                if addr not in net or addr == net.broadcast_address:
                    self.err(f"{pn.path}", f"no free underlay address left in {underlay}")
                    break
                pn.underlay = str(addr)
                taken_ul[pn.underlay] = pn.path

        for pc in parsed:
            for family, attr, prefix in ((4, "pod_cidr", CARVE_PREFIX_V4), (6, "pod_cidr6", CARVE_PREFIX_V6)):
                if family not in pc.families:
                    continue
                self._carve_family(pc, attr, [c for c in pc.pod_cidrs if types.family_of(c) == family], prefix)

    def _carve_family(self, pc: _PCluster, attr: str, pod_cidrs: list[str], prefix: int) -> None:
        """Fill in the nodes' absent pod CIDRs of one family (``attr`` of :class:`_PNode`)."""
        explicit: dict[str, str] = {getattr(n, attr): n.path for n in pc.nodes if getattr(n, attr)}
        for a, (ca, pa) in enumerate(explicit.items()):
            for cb, pb in list(explicit.items())[a + 1 :]:
                if types.cidrs_overlap(ca, cb):
                    self.err(f"{pb}.podCIDR", f"{cb} overlaps {ca} of {pa}")
        candidates = _carve(pod_cidrs, prefix)
        for pn in pc.nodes:
            if getattr(pn, attr) is None:
                for cand in candidates:
                    if not any(types.cidrs_overlap(cand, e) for e in explicit):
                        setattr(pn, attr, cand)
                        explicit[cand] = pn.path
                        break
                else:
                    if pod_cidrs:
                        self.err(f"{pn.path}.podCIDR", f"no free /{prefix} left in {pod_cidrs} to carve")
                    continue
            cidr = getattr(pn, attr)
            if cidr is not None:
                size = ipaddress.ip_network(cidr).num_addresses
                if pn.pods + 2 > size:
                    self.err(f"{pn.path}.pods", f"{pn.pods} pods do not fit in {cidr}")

    def _assign6(self, parsed: list[_PCluster], underlay: str, underlay6: str) -> None:
        """IPv6 underlay addresses of the nodes of clusters that run IPv6: explicit ones are
        checked; absent ones take the host number of the node's IPv4 underlay address."""
        net4, net6 = ipaddress.ip_network(underlay), ipaddress.ip_network(underlay6)
        taken: dict[str, str] = {}
        for pc in parsed:
            for pn in pc.nodes:
                if pn.underlay6 is None:
                    continue
                addr = ipaddress.ip_address(pn.underlay6)
                if addr not in net6:
                    self.err(f"{pn.path}.underlay6", f"{pn.underlay6} is outside underlay6 {underlay6}")
                elif int(addr) - int(net6.network_address) < FIRST_NODE_HOST:
                    self.err(f"{pn.path}.underlay6", f"{pn.underlay6} is reserved (host numbers below "
                             f"{FIRST_NODE_HOST} belong to the lab)")  # fmt: skip
                elif str(addr) in taken:
                    self.err(f"{pn.path}.underlay6", f"{pn.underlay6} is already used by {taken[str(addr)]}")
                taken[str(addr)] = pn.path
        for pc in parsed:
            if 6 not in pc.families:
                continue
            for pn in pc.nodes:
                if pn.underlay6 is not None or pn.underlay is None:
                    continue
                host = int(ipaddress.ip_address(pn.underlay)) - int(net4.network_address)
                addr = net6.network_address + host
                if addr not in net6 or str(addr) in taken:
                    self.err(pn.path, f"no IPv6 underlay address for host number {host} in {underlay6} (set underlay6)")
                    continue
                pn.underlay6 = str(addr)
                taken[pn.underlay6] = pn.path


def _carve(pod_cidrs: list[str], prefix: int = CARVE_PREFIX_V4) -> Iterator[str]:
    for c in pod_cidrs:
        net = ipaddress.ip_network(c)
        if net.prefixlen >= prefix:
            yield str(net)
        else:
            for sub in net.subnets(new_prefix=prefix):
                yield str(sub)


@dataclasses.dataclass
class _PNode:
    path: str
    name: str
    pod_cidr: str | None = None
    pods: int = 0
    underlay: str | None = None
    pod_cidr6: str | None = None
    underlay6: str | None = None
    resources: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _PCluster:
    path: str
    name: str | None
    mode: types.ClusterMode | None = None
    pod_cidrs: list[str] = dataclasses.field(default_factory=list)
    service_cidrs: list[str] = dataclasses.field(default_factory=list)
    node_cidrs: list[str] = dataclasses.field(default_factory=list)
    gateways: list[str] = dataclasses.field(default_factory=list)
    active_gateways: int = 1
    global_cidrs: dict[str, str] = dataclasses.field(default_factory=dict)
    nodes: list[_PNode] = dataclasses.field(default_factory=list)
    scheduler: str = DEFAULT_SCHEDULER
    role: str = ""
    tree: str = ""
    #: The families the cluster runs (given or derived) and what the file said (empty: absent).
    families: list[int] = dataclasses.field(default_factory=lambda: [4])
    ip_families: list[int] = dataclasses.field(default_factory=list)
