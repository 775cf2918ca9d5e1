"""The lab kube-proxy's ruleset: a pure function of (Services, EndpointSlices, the Node, the
cluster CIDRs, the address family) -> the text of one nftables table, after upstream's
``pkg/proxy/nftables/proxier.go`` (same table name, chain names, sets, maps and rules).

Order of computation:

1. :func:`service_ports` turns each Service into one :class:`ServicePort` per port and family
   it has a ClusterIP of (ExternalName and headless services have none), with its endpoints
   from the Service's EndpointSlices of that family: the slice port with the service port's
   name gives the target port; an endpoint is used when ready, else (if no endpoint is ready)
   when serving and terminating, as upstream's ``CategorizeEndpoints``. A traffic policy of
   ``Local`` keeps only this node's endpoints for that traffic.
2. :func:`ruleset` writes the table ``<family> kube-proxy``::

       nat-prerouting / nat-output      -> services: daddr . proto . port vmap @service-ips
                                                     (NodePorts: daddr @nodeport-ips ... @service-nodeports)
       service-<hash>-ns/svc/proto/port -> Cluster policy: masquerade mark unless the source is a
                                           cluster CIDR (a client outside the cluster: replies must
                                           come back through this node), session affinity, then
                                           numgen random mod N vmap { i : goto endpoint-... }
       local-<hash>-...                 -> Local policy: the same over this node's endpoints
       endpoint-<hash>-...__ip/port     -> hairpin masquerade mark (ip saddr = the endpoint), dnat
       external-<hash>-...              -> NodePort: masquerade mark, goto the Cluster chain; with
                                           externalTrafficPolicy Local: pods and the node itself
                                           short-circuit to the Cluster chain, others go Local
       filter-input/forward/output      -> new connections to a service without endpoints are
        -> service-endpoints-check         rejected (reject-chain), to a Local-policy service
                                           without a local endpoint dropped
       filter-forward/-output-post-dnat -> cluster-ips-check: other ports of a ClusterIP are
                                           rejected, unallocated service-CIDR addresses dropped
       nat-postrouting -> masquerading  -> what carries the mark is masqueraded (fully-random)

The table text is applied as a whole in one transaction (see :mod:`kubeemu.proxy.apply`); the
table's comment carries a hash of the text so a restarted proxy (or a periodic check) can tell
whether the kernel already has exactly this ruleset.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_log = logging.getLogger(__name__)

Obj = dict[str, Any]

TABLE = "kube-proxy"
MASQ_MARK = "0x4000"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: Upstream's default ``sessionAffinityConfig.clientIP.timeoutSeconds`` (3 hours).
DEFAULT_AFFINITY_TIMEOUT_S = 10800
_L4 = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}


@dataclass(frozen=True, order=True)
class Endpoint:
    ip: str
    port: int
    node: str = ""
    ready: bool = True
    serving: bool = True
    terminating: bool = False


@dataclass
class ServicePort:
    """One port of one Service in one family, with what kube-proxy needs to program it."""

    namespace: str
    name: str
    port_name: str
    protocol: str  # TCP / UDP / SCTP
    cluster_ip: str
    port: int
    node_port: int = 0
    affinity_timeout_s: int = 0  # 0: no session affinity
    internal_local: bool = False  # internalTrafficPolicy: Local
    external_local: bool = False  # externalTrafficPolicy: Local
    endpoints: list[Endpoint] = field(default_factory=list)

    @property
    def key(self) -> str:
        """``ns/svc/proto/portname``: upstream's ``servicePortChainName`` suffix."""
        return f"{self.namespace}/{self.name}/{self.protocol.lower()}/{self.port_name}"

    def usable(self, node: str, local_only: bool) -> list[Endpoint]:
        """Upstream ``CategorizeEndpoints`` for one traffic policy: ready endpoints, else the
        serving terminating ones; ``local_only`` keeps this node's."""
        eps = [e for e in self.endpoints if not local_only or e.node == node]
        ready = [e for e in eps if e.ready]
        if ready:
            return sorted(set(ready))
        return sorted({e for e in eps if e.serving and e.terminating})


def family_of(ip: str) -> int:
    return ipaddress.ip_address(ip.split("/")[0]).version


def service_ports(services: Iterable[Obj], slices: Iterable[Obj], family: int) -> list[ServicePort]:
    """Every (Service, port) of ``family`` with its endpoints (see the module docstring)."""
    by_service: dict[tuple[str, str], list[Obj]] = {}
    want_type = "IPv6" if family == 6 else "IPv4"
    for s in slices:
        meta = s.get("metadata") or {}
        svc_name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if svc_name and s.get("addressType") == want_type:
            by_service.setdefault((str(meta.get("namespace")), svc_name), []).append(s)
    out: list[ServicePort] = []
    for svc in services:
        meta, spec = svc["metadata"], svc.get("spec") or {}
        if spec.get("type") == "ExternalName":
            continue
        ips = [ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip and ip != "None"]
        cip = next((ip for ip in ips if family_of(ip) == family), None)
        if cip is None:
            continue
        affinity = 0
        if spec.get("sessionAffinity") == "ClientIP":
            cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
            affinity = int(cfg.get("timeoutSeconds") or DEFAULT_AFFINITY_TIMEOUT_S)
        ns = str(meta.get("namespace"))
        for p in spec.get("ports") or []:
            proto = str(p.get("protocol") or "TCP")
            if proto not in _L4:
                continue
            sp = ServicePort(ns, meta["name"], str(p.get("name") or ""), proto, cip, int(p["port"]),
                             int(p.get("nodePort") or 0) if spec.get("type") in ("NodePort", "LoadBalancer") else 0,
                             affinity, spec.get("internalTrafficPolicy") == "Local",
                             spec.get("externalTrafficPolicy") == "Local")
            seen: set[tuple[str, int]] = set()
            for sl in by_service.get((ns, meta["name"]), []):
                port = next((q for q in sl.get("ports") or [] if (q.get("name") or "") == sp.port_name
                             and (q.get("protocol") or "TCP") == proto), None)
                if port is None or port.get("port") is None:
                    continue
                for ep in sl.get("endpoints") or []:
                    cond = ep.get("conditions") or {}
                    ready = cond.get("ready") is not False
                    serving = ready if cond.get("serving") is None else bool(cond["serving"])
                    for addr in (ep.get("addresses") or [])[:1]:
                        if (addr, int(port["port"])) in seen:
                            continue
                        seen.add((addr, int(port["port"])))
                        sp.endpoints.append(Endpoint(addr, int(port["port"]), str(ep.get("nodeName") or ""),
                                                     ready, serving, bool(cond.get("terminating"))))
            out.append(sp)
    return sorted(out, key=lambda x: (x.key, x.cluster_ip))


def _hash(name: str) -> str:
    """Upstream ``hashAndTruncate``-style prefix: 8 base32 characters of the SHA-256 of the name."""
    return base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()[:8]


def _chain_base(sp: ServicePort, ep: Endpoint | None = None) -> str:
    """Upstream ``servicePortChainNameBase`` / ``servicePortEndpointChainNameBase``: 8 base32
    characters of the SHA-256 of ``ns/svc/proto/port[__ip/port]``, a dash, the name itself (an
    IPv6 address's ``:`` become ``.``: nft identifiers cannot hold them)."""
    name = sp.key if ep is None else f"{sp.key}__{ep.ip.replace(':', '.')}/{ep.port}"
    return f"{_hash(name)}-{name}"


def service_chain(sp: ServicePort) -> str:
    """The chain of the Cluster traffic policy (all usable endpoints)."""
    return f"service-{_chain_base(sp)}"


def local_chain(sp: ServicePort) -> str:
    """The chain of the Local traffic policy (this node's endpoints)."""
    return f"local-{_chain_base(sp)}"


def external_chain(sp: ServicePort) -> str:
    return f"external-{_chain_base(sp)}"


def endpoint_chain(sp: ServicePort, ep: Endpoint) -> str:
    return f"endpoint-{_chain_base(sp, ep)}"


def affinity_set(sp: ServicePort, ep: Endpoint) -> str:
    return f"affinity-{_chain_base(sp, ep)}"


def _q(name: str) -> str:
    """A chain or set name as nft reads it: nft takes no quoted names, and an identifier holds
    letters, digits and ``/ - _ .`` only, so an IPv6 address's ``:`` becomes ``.``."""
    return name.replace(":", ".")


@dataclass(frozen=True)
class NodeInfo:
    """What the ruleset needs of the node it is for."""

    name: str
    #: The node's addresses NodePorts answer on (its InternalIPs, upstream's ``primary`` default).
    addresses: tuple[str, ...] = ()


def node_info(node: Obj | None, name: str) -> NodeInfo:
    addrs = tuple(str(a["address"]) for a in ((node or {}).get("status") or {}).get("addresses") or []
                  if a.get("type") == "InternalIP" and a.get("address"))
    return NodeInfo(name, addrs)


def ruleset(ports: Sequence[ServicePort], node: NodeInfo, family: int, cluster_cidrs: Sequence[str] = (),
            service_cidrs: Sequence[str] = ()) -> str:
    """The whole ``<family> kube-proxy`` table for ``node`` (see the module docstring). The text
    starts by (re)creating the table, so it is applied as one atomic replacement."""
    fam = "ip6" if family == 6 else "ip"
    addr_type = "ipv6_addr" if family == 6 else "ipv4_addr"
    cidrs = [c for c in cluster_cidrs if family_of(c) == family]
    svc_cidrs = [c for c in service_cidrs if family_of(c) == family]
    node_addrs = sorted(a for a in node.addresses if family_of(a) == family)
    lines: list[str] = []
    chains: dict[str, list[str]] = {}
    sets: list[str] = []
    service_ips: list[str] = []
    nodeports: list[str] = []
    no_ep_services: list[str] = []
    no_ep_nodeports: list[str] = []
    cluster_ips = sorted({sp.cluster_ip for sp in ports})

    not_local = f"{fam} saddr != {{ {', '.join(cidrs)} }}" if cidrs else ""
    for sp in ports:
        # Upstream syncProxyRules, per service port (LoadBalancer VIPs and externalIPs aside).
        l4 = _L4[sp.protocol]
        svc_key = f"{sp.cluster_ip} . {l4} . {sp.port}"
        cluster_eps = sp.usable(node.name, local_only=False)
        local_eps = sp.usable(node.name, local_only=True)
        has_endpoints = bool(cluster_eps)
        externally = bool(sp.node_port)
        internal_chain = _q(local_chain(sp) if sp.internal_local else service_chain(sp))
        has_internal = has_endpoints and (not sp.internal_local or bool(local_eps))
        has_external = has_endpoints and (not sp.external_local or bool(local_eps))
        uses_cluster = bool(cluster_eps) and (not sp.internal_local or externally)
        uses_local = bool(local_eps) and (sp.internal_local or (sp.external_local and externally))
        # A service without endpoints anywhere is rejected; one whose Local policy finds no
        # endpoint on this node drops (upstream).
        internal_verdict = "goto reject-chain" if not has_endpoints else "drop"
        if has_internal:
            service_ips.append(f"{svc_key} : goto {internal_chain}")
            rules = []
            if not_local:
                # Off-cluster clients (another cluster's pods, a node): masquerade, so the reply
                # comes back through this node (upstream's ClusterCIDR local detector).
                rules.append(f"{fam} daddr {sp.cluster_ip} {l4} dport {sp.port} {not_local} jump mark-for-masquerade")
            chains.setdefault(internal_chain, []).extend(rules)
        else:
            no_ep_services.append(f"{svc_key} : {internal_verdict}")
        if externally:
            ext = _q(external_chain(sp))
            if has_endpoints:
                nodeports.append(f"{l4} . {sp.node_port} : goto {ext}")
                ext_rules: list[str] = []
                if not sp.external_local:
                    ext_rules.append("jump mark-for-masquerade")
                else:
                    if cidrs:
                        ext_rules.append(f"{fam} saddr {{ {', '.join(cidrs)} }} goto {_q(service_chain(sp))}")
                    ext_rules += ["fib saddr type local jump mark-for-masquerade",
                                  f"fib saddr type local goto {_q(service_chain(sp))}"]
                if has_external:
                    ext_rules.append(f"goto {_q(local_chain(sp) if sp.external_local else service_chain(sp))}")
                chains[ext] = ext_rules
            if not has_external:
                no_ep_nodeports.append(f"{l4} . {sp.node_port} : {internal_verdict}")
        if uses_cluster:
            chains.setdefault(_q(service_chain(sp)), []).extend(_balance(sp, cluster_eps, fam))
        if uses_local:
            chains.setdefault(_q(local_chain(sp)), []).extend(_balance(sp, local_eps, fam))
        for ep in sorted(set(cluster_eps) | set(local_eps)):
            rules = [f"{fam} saddr {ep.ip} jump mark-for-masquerade"]
            if sp.affinity_timeout_s:
                rules.append(f"update @{_q(affinity_set(sp, ep))} {{ {fam} saddr }}")
                sets.append(f"  set {_q(affinity_set(sp, ep))} {{ type {addr_type}; flags dynamic,timeout; "
                            f"timeout {sp.affinity_timeout_s}s; }}")
            target = f"[{ep.ip}]:{ep.port}" if family == 6 else f"{ep.ip}:{ep.port}"
            rules.append(f"meta l4proto {l4} dnat to {target}")
            chains[_q(endpoint_chain(sp, ep))] = rules

    def elements(items: Sequence[str]) -> str:
        return f" elements = {{ {', '.join(items)} }};" if items else ""

    lines.append(f"table {fam} {TABLE} {{")
    lines.append('  comment "{HASH}";')
    lines.append(f"  set cluster-ips {{ type {addr_type};{elements(cluster_ips)} }}")
    lines.append(f"  set nodeport-ips {{ type {addr_type};{elements(node_addrs)} }}")
    lines.append(f"  map service-ips {{ type {addr_type} . inet_proto . inet_service : verdict;"
                 f"{elements(service_ips)} }}")
    lines.append(f"  map service-nodeports {{ type inet_proto . inet_service : verdict;{elements(nodeports)} }}")
    lines.append(f"  map no-endpoint-services {{ type {addr_type} . inet_proto . inet_service : verdict;"
                 f"{elements(no_ep_services)} }}")
    lines.append(f"  map no-endpoint-nodeports {{ type inet_proto . inet_service : verdict;"
                 f"{elements(no_ep_nodeports)} }}")
    lines.extend(sets)
    base = [
        ("filter-input", "type filter hook input priority -110;", ["ct state new jump service-endpoints-check"]),
        ("filter-forward", "type filter hook forward priority -110;",
         ["ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"]),
        ("filter-output", "type filter hook output priority -110;", ["ct state new jump service-endpoints-check"]),
        ("filter-output-post-dnat", "type filter hook output priority -90;", ["ct state new jump cluster-ips-check"]),
        ("nat-prerouting", "type nat hook prerouting priority dstnat;", ["jump services"]),
        ("nat-output", "type nat hook output priority -100;", ["jump services"]),
        ("nat-postrouting", "type nat hook postrouting priority srcnat;", ["jump masquerading"]),
    ]
    for name, hook, rules in base:
        lines.append(f"  chain {name} {{ {hook} policy accept; {'; '.join(rules)}; }}")
    cluster_check = [f"{fam} daddr @cluster-ips reject"]
    if svc_cidrs:
        cluster_check.append(f"{fam} daddr {{ {', '.join(svc_cidrs)} }} drop")
    helpers = {
        "reject-chain": ["reject"],
        "mark-for-masquerade": [f"meta mark set meta mark or {MASQ_MARK}"],
        "masquerading": [f"meta mark & {MASQ_MARK} == 0 return", f"meta mark set meta mark xor {MASQ_MARK}",
                         "masquerade fully-random"],
        "services": [f"{fam} daddr . meta l4proto . th dport vmap @service-ips",
                     f"{fam} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"],
        "service-endpoints-check": [f"{fam} daddr . meta l4proto . th dport vmap @no-endpoint-services",
                                    f"{fam} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"],
        "cluster-ips-check": cluster_check,
    }
    for name, rules in [*helpers.items(), *sorted(chains.items())]:
        lines.append(f"  chain {_q(name)} {{")
        lines.extend(f"    {r}" for r in rules)
        lines.append("  }")
    lines.append("}")
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    return body.replace("{HASH}", f"kubeemu-proxy {digest}", 1)


def _balance(sp: ServicePort, eps: Sequence[Endpoint], fam: str) -> list[str]:
    """Affinity lookups, then a random pick: ``numgen random mod N vmap { i : goto endpoint }``."""
    rules = []
    if sp.affinity_timeout_s:
        rules += [f"{fam} saddr @{_q(affinity_set(sp, ep))} goto {_q(endpoint_chain(sp, ep))}" for ep in eps]
    vmap = ", ".join(f"{i} : goto {_q(endpoint_chain(sp, ep))}" for i, ep in enumerate(eps))
    rules.append(f"numgen random mod {len(eps)} vmap {{ {vmap} }}")
    return rules


def table_hash(text: str) -> str | None:
    """The ``kubeemu-proxy <hash>`` a ruleset (or ``nft list table`` output) carries, if any."""
    marker = "kubeemu-proxy "
    i = text.find(marker)
    if i < 0:
        return None
    return text[i + len(marker):i + len(marker) + 16]


def replace_script(text: str, family: int) -> str:
    """``nft -f`` input replacing our table atomically: create (so the delete cannot fail),
    delete, define. One transaction: the kernel never runs without the table or with half."""
    fam = "ip6" if family == 6 else "ip"
    return f"add table {fam} {TABLE}\ndelete table {fam} {TABLE}\n{text}"


def delete_script(family: int) -> str:
    fam = "ip6" if family == 6 else "ip"
    return f"add table {fam} {TABLE}\ndelete table {fam} {TABLE}\n"


def summary(ports: Sequence[ServicePort], node: str) -> Mapping[str, int]:
    """Counts for the log: service ports, with endpoints, endpoints used."""
    return {"service_ports": len(ports), "with_endpoints": sum(1 for p in ports if p.usable(node, p.internal_local)),
            "endpoints": sum(len(p.usable(node, p.internal_local)) for p in ports)}
