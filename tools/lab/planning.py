"""Planning, a pure function: topology file -> :class:`~tools.lab.state.LabState` (names,
addresses, interface names), and the merge of a new plan into a running lab that refuses to
change anything that runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
from collections.abc import Sequence

from fabric import topology, types
from tools.lab import schedulers
from tools.lab import tree as labtree
from tools.lab.state import (
    IFNAMSIZ,
    SERVICE_HOST,
    ClusterRecord,
    LabState,
    LabUsageError,
    NodeRecord,
    PodRecord,
    check_lab_name,
)

_log = logging.getLogger(__name__)

# -- planning (pure) -------------------------------------------------------------------------


def _ul_ifname(cluster: str, node: str) -> str:
    """Name of a node's underlay veth end in the lab namespace: unique, stable, <= 15 chars."""
    return "ul" + hashlib.sha256(f"{cluster}/{node}".encode()).hexdigest()[:10]


def plan(name: str, topo: topology.TopologyFile) -> LabState:
    """Names and addresses of everything the lab builds for ``topo`` (no side effects).

    Raises :class:`LabUsageError` when two objects would get the same namespace name (cluster
    ``a-b`` node ``c`` and cluster ``a`` node ``b-c`` both map to ``NAME-a-b-c``).
    """
    check_lab_name(name)
    clusters: list[ClusterRecord] = []
    owners: dict[str, str] = {f"{name}-ul": "the lab namespace"}
    problems: list[str] = []

    def claim(ns: str, what: str) -> str:
        if ns in owners:
            problems.append(f"{what} and {owners[ns]} would both use network namespace {ns!r}")
        owners[ns] = what
        return ns

    for lc in topo.clusters:
        nodes = []
        for ln in lc.nodes:
            node_ns = claim(f"{name}-{lc.name}-{ln.name}", f"node {lc.name}/{ln.name}")
            pods = []
            ips4, ips6 = ln.pod_ips(), ln.pod_ips6()
            for i in range(ln.pods):
                pod = f"p{i}"
                pods.append(
                    PodRecord(
                        name=pod,
                        netns=claim(f"{node_ns}-{pod}", f"pod {lc.name}/{ln.name}/{pod}"),
                        ip=ips4[i] if ips4 else "",
                        ip6=ips6[i] if ips6 else "",
                        host_if=f"veth-{pod}",
                    )
                )
            nodes.append(
                NodeRecord(
                    cluster=lc.name,
                    name=ln.name,
                    netns=node_ns,
                    underlay_ip=ln.underlay_ip,
                    pod_cidr=ln.pod_cidr,
                    ul_if=_ul_ifname(lc.name, ln.name),
                    pods=pods,
                    underlay_ip6=ln.underlay_ip6,
                    pod_cidr6=ln.pod_cidr6,
                    resources=dict(ln.resources),
                )
            )
        service_ip, backend = _lab_service(lc.config.service_cidrs, [p.ip for n in nodes for p in n.pods], 4)
        service_ip6, backend6 = _lab_service(lc.config.service_cidrs, [p.ip6 for n in nodes for p in n.pods], 6)
        if topo.kubernetes:
            # The cluster's API allocates its ClusterIPs and the lab kube-proxy programs them: the
            # lab service is a real Service there (tools/lab/kube.py), recorded once created.
            service_ip = backend = service_ip6 = backend6 = None
        clusters.append(
            ClusterRecord(
                name=lc.name,
                mode=str(lc.config.mode),
                pod_cidrs=list(lc.config.pod_cidrs),
                service_cidrs=list(lc.config.service_cidrs),
                nodes=nodes,
                gateways=list(lc.config.gateways),
                service_ip=service_ip,
                service_backend=backend,
                global_cidrs=dict(lc.config.global_cidrs),
                ip_families=list(lc.config.families),
                service_ip6=service_ip6,
                service_backend6=backend6,
                scheduler=lc.scheduler,
                role=lc.role,
                tree=lc.tree,
            )
        )
        problems += schedulers.problems(lc, topo.kubernetes)
    problems += labtree.problems(topo)
    if problems:
        raise LabUsageError(f"{topo.source}: cannot build this lab: " + "; ".join(problems))
    for n in (n for c in clusters for n in c.nodes):
        assert all(len(x) <= IFNAMSIZ for x in (n.ul_if, *(p.host_if for p in n.pods)))
    return LabState(
        name=name,
        topology_source=topo.source,
        underlay=topo.underlay,
        gateway=topo.underlay_gateway(),
        ul_netns=f"{name}-ul",
        clusters=clusters,
        kubernetes=topo.kubernetes,
        underlay6=topo.underlay6 if topo.uses_ipv6 else "",
        gateway6=topo.underlay_gateway6() if topo.uses_ipv6 else "",
    )


def _lab_service(service_cidrs: Sequence[str], pod_ips: Sequence[str], family: int) -> tuple[str | None, str | None]:
    """The lab service of one family in a lab without Kubernetes (its kube-proxy stand-in):
    host SERVICE_HOST of the cluster's first service CIDR of that family, backed by the first pod
    with an address of it (None, None: no such service)."""
    backends = [ip for ip in pod_ips if ip and types.family_of(ip) == family]
    for c in service_cidrs:
        if types.family_of(c) != family:
            continue
        net = ipaddress.ip_network(c)
        if backends and net.num_addresses > SERVICE_HOST + 1:
            return str(net.network_address + SERVICE_HOST), backends[0]
        break
    return None, None


def merge_plan(current: LabState, wanted: LabState) -> tuple[LabState, list[str], bool]:
    """Fold a newly planned lab into the running one.

    Returns ``(merged state, added node keys, clusters changed)``. Existing records (with their
    process records and ``built`` flags) are kept as they are. Anything ``up`` cannot change
    without disturbing what runs (removed nodes, a node's addresses, a cluster's CIDRs, the
    underlay) raises :class:`LabUsageError` saying exactly what differs.
    """
    problems: list[str] = []
    if wanted.underlay != current.underlay:
        problems.append(f"underlay {current.underlay} -> {wanted.underlay}")
    if current.kubernetes and not wanted.kubernetes:
        problems.append("kubernetes true -> false")
    cur_clusters = {c.name: c for c in current.clusters}
    want_clusters = {c.name: c for c in wanted.clusters}
    for cname in cur_clusters.keys() - want_clusters.keys():
        problems.append(f"cluster {cname} removed")
    added: list[str] = []
    clusters_changed = False
    merged: list[ClusterRecord] = []
    for wc in wanted.clusters:
        cc = cur_clusters.get(wc.name)
        if cc is None:
            clusters_changed = True
            merged.append(wc)
            added.extend(n.key for n in wc.nodes)
            continue
        for attr in ("mode", "pod_cidrs", "service_cidrs", "gateways", "role"):
            if getattr(cc, attr) != getattr(wc, attr):
                problems.append(f"cluster {wc.name}: {attr} {getattr(cc, attr)} -> {getattr(wc, attr)}")
        cur_nodes = {n.name: n for n in cc.nodes}
        want_nodes = {n.name: n for n in wc.nodes}
        for nname in cur_nodes.keys() - want_nodes.keys():
            problems.append(f"node {wc.name}/{nname} removed")
        nodes: list[NodeRecord] = []
        for wn in wc.nodes:
            cn = cur_nodes.get(wn.name)
            if cn is None:
                nodes.append(wn)
                added.append(wn.key)
                continue
            for attr in ("underlay_ip", "pod_cidr"):
                if getattr(cn, attr) != getattr(wn, attr):
                    problems.append(f"node {wn.key}: {attr} {getattr(cn, attr)} -> {getattr(wn, attr)}")
            if len(cn.pods) != len(wn.pods):
                problems.append(f"node {wn.key}: pods {len(cn.pods)} -> {len(wn.pods)}")
            nodes.append(cn)
        # Keep nodes that are missing from the file too, so the refusal below leaves them recorded.
        nodes.extend(cur_nodes[n] for n in cur_nodes if n not in want_nodes)
        # A leaf's model may change (the next join rewrites its clusterTreeOptions).
        merged.append(dataclasses.replace(cc, nodes=nodes, tree=wc.tree))
    if problems:
        raise LabUsageError(
            f"lab {current.name} is running a different topology ({current.topology_source}); "
            f"'lab up' only adds clusters and nodes, it cannot apply: {'; '.join(problems)}. "
            f"Run 'fabric-tool lab down --name {current.name}' first to rebuild from scratch."
        )
    merged_state = dataclasses.replace(
        current, clusters=merged, topology_source=wanted.topology_source, kubernetes=wanted.kubernetes
    )
    return merged_state, added, clusters_changed
