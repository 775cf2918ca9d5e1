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
    clusters:
      - name: east                     # DNS-1123 label
        mode: p2p                      # or gateway
        podCIDRs: [10.10.0.0/16]
        serviceCIDRs: [10.96.0.0/20]   # optional
        gateways: [e1, e2]             # optional: gateway candidates in order (default: every node)
        globalCIDRs:                   # optional: global IP (see below)
          10.10.0.0/16: 100.100.0.0/16
        nodes:
          - name: e1
            podCIDR: 10.10.1.0/24      # optional: carved in order from podCIDRs when absent
            pods: 2                    # lab pods on this node (p0, p1, ...)
            underlay: 198.18.0.11      # optional

Global IP (``globalCIDRs``): each key is exactly one of the cluster's ``podCIDRs`` or
``serviceCIDRs`` (a whole declared range: translation is per declared CIDR, so to map only part of
a range, declare the parts as separate CIDRs), each value a global CIDR of the same prefix
length. Other clusters then see and route that range only by its global CIDR; the cluster's
nodes translate 1:1 by prefix in eBPF. Global CIDRs must be unique and disjoint from each other,
from every real CIDR of every cluster, from the underlay, ``bridgeCIDRs`` and ``localCIDRs``.
Two clusters whose real CIDRs overlap (the common case: default pod and service ranges) are
accepted only when *both* overlapping CIDRs are mapped: a pod can reach an overlapping remote
range only by its global addresses, and routing the real one would shadow the node's own pods.

Validation is complete before anything is created: every problem is reported at once, each
naming the file, the key path (``clusters[1].nodes[0].podCIDR``) and the reason.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from fabric import types

DEFAULT_UNDERLAY = "198.18.0.0/16"
#: Host index of the first automatically assigned node underlay address; .1 is the lab's own
#: address (the reflector listens there), .2-.10 are kept for lab infrastructure.
FIRST_NODE_HOST = 11
#: Prefix length of node pod CIDRs carved automatically from the cluster's pod CIDRs.
CARVE_PREFIX_V4 = 24
MAX_PODS_PER_NODE = 64

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Node names become parts of namespace and interface names in the lab; keep them short.
_MAX_NAME = 20

_TOP_KEYS = {"underlay", "bridgeCIDRs", "localCIDRs", "clusters"}
_CLUSTER_KEYS = {"name", "mode", "podCIDRs", "serviceCIDRs", "gateways", "globalCIDRs", "nodes"}
_NODE_KEYS = {"name", "podCIDR", "pods", "underlay"}
#: Modes this build can run.
SUPPORTED_MODES = (types.ClusterMode.P2P, types.ClusterMode.GATEWAY)


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

    def pod_ips(self) -> tuple[str, ...]:
        """Pod ``pN`` gets host address N+2 of the node's pod CIDR (.1 is left free)."""
        net = ipaddress.ip_network(self.pod_cidr)
        return tuple(str(net.network_address + 2 + i) for i in range(self.pods))


@dataclasses.dataclass(frozen=True, slots=True)
class LabCluster:
    config: types.ClusterConfig
    nodes: tuple[LabNode, ...]

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
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[tuple[str, str]] = []

    def err(self, path: str, reason: str) -> None:
        self.problems.append((path, reason))

    # -- small typed readers; each records a problem and returns None on bad input ------------

    def _keys(self, obj: dict[str, Any], allowed: set[str], path: str) -> None:
        for k in obj:
            if k not in allowed:
                where = f"{path}.{k}" if path else str(k)
                self.err(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def _name(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str) or not _DNS1123_LABEL.match(value):
            self.err(path, f"{value!r} is not a DNS-1123 label (lower-case letters, digits, '-')")
            return None
        if len(value) > _MAX_NAME:
            self.err(path, f"{value!r} is longer than {_MAX_NAME} characters")
            return None
        return value

    def _cidr(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str):
            self.err(path, f"{value!r} is not a CIDR string")
            return None
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError as e:
            self.err(path, f"{value!r} is not a valid CIDR ({e})")
            return None
        if net.version != 4:
            self.err(path, f"{value} is IPv6; this build supports IPv4 only")
            return None
        return str(net)

    def _cidr_list(self, value: Any, path: str, required: bool) -> list[str]:
        if value is None:
            if required:
                self.err(path, "is required (a list of CIDRs)")
            return []
        if not isinstance(value, list) or (required and not value):
            what = "a non-empty list" if required else "a list"
            self.err(path, f"{value!r} must be {what} of CIDRs")
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
        self._keys(doc, _TOP_KEYS, "")
        underlay = self._cidr(doc.get("underlay", DEFAULT_UNDERLAY), "underlay") or DEFAULT_UNDERLAY
        bridge = self._cidr_list(doc.get("bridgeCIDRs", [types.DEFAULT_BRIDGE_CIDR_V4]), "bridgeCIDRs", required=True)
        local = self._cidr_list(doc.get("localCIDRs", [types.DEFAULT_LOCAL_CIDR_V4]), "localCIDRs", required=True)
        raw_clusters = doc.get("clusters")
        if not isinstance(raw_clusters, list) or not raw_clusters:
            self.err("clusters", "is required: a non-empty list of clusters")
            raw_clusters = []

        clusters: list[tuple[str, dict[str, Any]]] = []
        seen: dict[str, str] = {}
        for i, rc in enumerate(raw_clusters):
            path = f"clusters[{i}]"
            if not isinstance(rc, dict):
                self.err(path, "must be a mapping")
                continue
            self._keys(rc, _CLUSTER_KEYS, path)
            name = self._name(rc.get("name"), f"{path}.name")
            if name is not None:
                if name in seen:
                    self.err(f"{path}.name", f"duplicate cluster name {name!r} (first at {seen[name]})")
                seen[name] = path
            clusters.append((path, rc))

        parsed = [self._cluster(path, rc) for path, rc in clusters]
        self._cross_checks(parsed, underlay, bridge, local)
        self._assign(parsed, underlay)
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
                        global_cidrs=types.frozen_mapping(pc.global_cidrs),
                    ),
                    nodes=tuple(
                        LabNode(n.name, n.pod_cidr, n.pods, n.underlay)  # type: ignore[arg-type]
                        for n in pc.nodes
                    ),
                )
            )
        return TopologyFile(self.source, underlay, tuple(bridge), tuple(result), tuple(local))

    def _cluster(self, path: str, rc: dict[str, Any]) -> _PCluster:
        pc = _PCluster(path=path, name=rc.get("name") if isinstance(rc.get("name"), str) else None)
        mode = rc.get("mode", "p2p")
        try:
            pc.mode = types.ClusterMode(mode)
        except ValueError:
            self.err(f"{path}.mode", f"{mode!r} is not a mode (p2p, gateway)")
        else:
            if pc.mode not in SUPPORTED_MODES:
                supported = ", ".join(m.value for m in SUPPORTED_MODES)
                self.err(f"{path}.mode", f"{mode!r} is not supported by this build (supported: {supported})")
        pc.pod_cidrs = self._cidr_list(rc.get("podCIDRs"), f"{path}.podCIDRs", required=True)
        pc.service_cidrs = self._cidr_list(rc.get("serviceCIDRs"), f"{path}.serviceCIDRs", required=False)
        raw_nodes = rc.get("nodes", [])
        if not isinstance(raw_nodes, list):
            self.err(f"{path}.nodes", "must be a list of nodes")
            raw_nodes = []
        seen: dict[str, str] = {}
        for j, rn in enumerate(raw_nodes):
            npath = f"{path}.nodes[{j}]"
            if not isinstance(rn, dict):
                self.err(npath, "must be a mapping")
                continue
            self._keys(rn, _NODE_KEYS, npath)
            pn = _PNode(path=npath, name=self._name(rn.get("name"), f"{npath}.name") or "")
            if pn.name:
                if pn.name in seen:
                    self.err(f"{npath}.name", f"duplicate node name {pn.name!r} in cluster (first at {seen[pn.name]})")
                seen[pn.name] = npath
            if "podCIDR" in rn:
                pn.pod_cidr = self._cidr(rn["podCIDR"], f"{npath}.podCIDR")
                if pn.pod_cidr and pc.pod_cidrs and not any(
                    ipaddress.ip_network(pn.pod_cidr).subnet_of(ipaddress.ip_network(c))  # type: ignore[arg-type]
                    for c in pc.pod_cidrs
                ):
                    self.err(f"{npath}.podCIDR", f"{pn.pod_cidr} is outside the cluster's podCIDRs {pc.pod_cidrs}")
            pods = rn.get("pods", 0)
            if not isinstance(pods, int) or isinstance(pods, bool) or not 0 <= pods <= MAX_PODS_PER_NODE:
                self.err(f"{npath}.pods", f"{pods!r} must be an integer from 0 to {MAX_PODS_PER_NODE}")
            else:
                pn.pods = pods
            if "underlay" in rn:
                pn.underlay = self._ip(rn["underlay"], f"{npath}.underlay")
            pc.nodes.append(pn)
        self._gateways(pc, rc.get("gateways"), f"{path}.gateways")
        self._global_cidrs(pc, rc.get("globalCIDRs"), f"{path}.globalCIDRs")
        return pc

    def _global_cidrs(self, pc: _PCluster, value: Any, path: str) -> None:
        """``{local: global}``: local is one of the cluster's declared CIDRs, same size both sides.
        Uniqueness and disjointness across the fabric are checked in :meth:`_cross_checks`."""
        if value is None:
            return
        if not isinstance(value, dict) or not value:
            self.err(path, f"{value!r} must be a non-empty mapping of local CIDR to global CIDR")
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
            lp, gp = ipaddress.ip_network(local).prefixlen, ipaddress.ip_network(glob).prefixlen
            if lp != gp:
                self.err(kpath, f"{glob} is a /{gp} but {local} is a /{lp}: a 1:1 translation needs the same size")
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
            self.err(path, f"{value!r} must be a non-empty list of node names (omit it to allow every node)")
            return
        known = {n.name for n in pc.nodes if n.name}
        seen: set[str] = set()
        for i, v in enumerate(value):
            name = self._name(v, f"{path}[{i}]")
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

    def _cross_checks(self, parsed: list[_PCluster], underlay: str, bridge: list[str], local: list[str]) -> None:
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
        infra = [
            (underlay, "underlay"),
            *[(c, f"bridgeCIDRs[{i}]") for i, c in enumerate(bridge)],
            *[(c, f"localCIDRs[{i}]") for i, c in enumerate(local)],
        ]
        for c, p, _ in [*owned, *((g, p, "") for g, p in globals_)]:
            for ic, ip_ in infra:
                if types.cidrs_overlap(c, ic):
                    self.err(p, f"{c} overlaps {ic} ({ip_})")
        for i, c in enumerate(bridge):
            if types.cidrs_overlap(c, underlay):
                self.err(f"bridgeCIDRs[{i}]", f"{c} overlaps the underlay {underlay}")
        for i, c in enumerate(local):
            if types.cidrs_overlap(c, underlay):
                self.err(f"localCIDRs[{i}]", f"{c} overlaps the underlay {underlay}")
            for j, bc in enumerate(bridge):
                if types.cidrs_overlap(c, bc):
                    self.err(f"localCIDRs[{i}]", f"{c} overlaps {bc} (bridgeCIDRs[{j}])")

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
            explicit = {n.pod_cidr: n.path for n in pc.nodes if n.pod_cidr}
            for a, (ca, pa) in enumerate(explicit.items()):
                for cb, pb in list(explicit.items())[a + 1 :]:
                    if types.cidrs_overlap(ca, cb):
                        self.err(f"{pb}.podCIDR", f"{cb} overlaps {ca} of {pa}")
            candidates = _carve(pc.pod_cidrs)
            for pn in pc.nodes:
                if pn.pod_cidr is None:
                    for cand in candidates:
                        if not any(types.cidrs_overlap(cand, e) for e in explicit):
                            pn.pod_cidr = cand
                            explicit[cand] = pn.path
                            break
                    else:
                        if pc.pod_cidrs:
                            self.err(
                                f"{pn.path}.podCIDR", f"no free /{CARVE_PREFIX_V4} left in {pc.pod_cidrs} to carve"
                            )
                        continue
                if pn.pod_cidr is not None:
                    size = ipaddress.ip_network(pn.pod_cidr).num_addresses
                    if pn.pods + 2 > size:
                        self.err(f"{pn.path}.pods", f"{pn.pods} pods do not fit in {pn.pod_cidr}")


def _carve(pod_cidrs: list[str]) -> Iterator[str]:
    for c in pod_cidrs:
        net = ipaddress.ip_network(c)
        if net.prefixlen >= CARVE_PREFIX_V4:
            yield str(net)
        else:
            for sub in net.subnets(new_prefix=CARVE_PREFIX_V4):
                yield str(sub)


@dataclasses.dataclass
class _PNode:
    path: str
    name: str
    pod_cidr: str | None = None
    pods: int = 0
    underlay: str | None = None


@dataclasses.dataclass
class _PCluster:
    path: str
    name: str | None
    mode: types.ClusterMode | None = None
    pod_cidrs: list[str] = dataclasses.field(default_factory=list)
    service_cidrs: list[str] = dataclasses.field(default_factory=list)
    gateways: list[str] = dataclasses.field(default_factory=list)
    global_cidrs: dict[str, str] = dataclasses.field(default_factory=dict)
    nodes: list[_PNode] = dataclasses.field(default_factory=list)
