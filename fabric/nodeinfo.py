"""Node facts from the node's own Kubernetes ``Node`` object (``fabric-agent --in-cluster``).

In a cluster the agent runs as a DaemonSet: the node name comes from the downward API
(``--node=$(NODE_NAME)``), and what the lab passes as flags comes from the Node instead:

* pod CIDRs: ``spec.podCIDRs`` (or the older single ``spec.podCIDR``);
* underlay addresses: the first ``InternalIP`` of each family in ``status.addresses`` (the
  address the cluster itself uses to reach the node; an IPv4 one is the primary underlay, an
  IPv6 one rides along for dual stack).

Flags still win: an operator can pin ``--underlay-ip`` where the InternalIP is not the address
tunnels should use. :func:`facts_from_node` is pure (a Node as a dict in, facts or an error
naming the node and the missing field out); :func:`read_node` does the one API call.

Underlay choice (the Cluster's ``defaultNICName``, ``nicNodeNames`` and ``autodetectionMethod``,
which ``fabric-tool join`` copies into the member's agent ConfigMap): :func:`choose_underlay`
is pure, the kernel facts it needs come from :mod:`fabric.netlink.underlay`. Precedence, highest
first: ``--underlay-ip``; the node's NIC override; ``defaultNICName`` when not ``*``; the
method. Per address family the node has an InternalIP for (IPv4 primary, IPv6 riding along on a
dual-stack node), same rules for each family:

* an interface by name: that interface's first global address of the family;
* ``interface=REGEX``: the first interface (by name) that is up, matches REGEX (searched, as
  Calico does: anchor it with ``^...$`` to match whole names) and has a global address;
* ``first-found``: the first interface in kernel (ifindex) order that is up, not loopback and
  not one of :data:`FIRST_FOUND_SKIP` (ours, container bridges and veths, other CNIs' tunnels),
  with a global address;
* ``can-reach=IP``: the source address the kernel would use towards IP (``ip route get``) for
  IP's family; the other family falls back to the Node's InternalIP;
* ``kubernetes-internal-ip`` (the default): the Node's InternalIP.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fabric import types

# The chooser's host values live in fabric.types (the dataplane fills them and must not import
# this module); re-exported here, where their readers have always found them.
from fabric.types import HostAddress as HostAddress
from fabric.types import HostLink as HostLink
from fabric.types import RouteHint as RouteHint

#: ``defaultNICName`` / ``--underlay-interface`` meaning "choose by the autodetection method".
AUTO_NIC = "*"
DEFAULT_METHOD = "kubernetes-internal-ip"
#: Interfaces ``first-found`` never picks: ours (vx-*), the host side of pod veths, container
#: runtimes' and other CNIs' bridges and tunnels (Calico's exclusion list plus Cilium, Weave,
#: Flannel and kube-proxy's IPVS dummy). Matched at the start of the name.
FIRST_FOUND_SKIP = (
    "vx-", "veth", "docker", "cni", "cbr", "virbr", "lxcbr", "lxc", "dummy", "flannel", "cali", "tunl",
    "vxlan", "wg", "wireguard", "cilium", "weave", "genev", "kube-", "nodelocaldns", "podman",
)
#: Linux interface names: 1-15 bytes, no '/', ':', ',' (lists in the environment) or whitespace.
IFNAME_RE = re.compile(r"^[^/\s:,=]{1,15}$")
_NODE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class NodeInfoError(ValueError):
    """The Node cannot give the agent what it needs; the message names node and field."""


@dataclasses.dataclass(frozen=True, slots=True)
class NodeFacts:
    underlay_ip: str
    underlay_ip6: str
    pod_cidrs: tuple[str, ...]


def facts_from_node(node: dict[str, Any]) -> NodeFacts:
    name = (node.get("metadata") or {}).get("name", "?")
    spec = node.get("spec") or {}
    cidrs = list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))
    if not cidrs:
        raise NodeInfoError(f"node {name}: spec.podCIDRs is empty (is the controller-manager allocating node CIDRs?)")
    pod_cidrs = []
    for i, c in enumerate(cidrs):
        try:
            pod_cidrs.append(str(ipaddress.ip_network(c, strict=True)))
        except ValueError as e:
            raise NodeInfoError(f"node {name}: spec.podCIDRs[{i}] {c!r} is not a CIDR ({e})") from None
    by_family: dict[int, str] = {}
    for a in (node.get("status") or {}).get("addresses") or []:
        if a.get("type") != "InternalIP":
            continue
        try:
            ip = ipaddress.ip_address(a.get("address", ""))
        except ValueError:
            continue
        by_family.setdefault(ip.version, str(ip))
    if not by_family:
        raise NodeInfoError(f"node {name}: status.addresses has no InternalIP")
    primary = by_family.get(4) or by_family[6]
    return NodeFacts(underlay_ip=primary, underlay_ip6=by_family.get(6, "") if 4 in by_family else "",
                     pod_cidrs=tuple(pod_cidrs))


def read_node(name: str, kubeconfig: str = "") -> dict[str, Any]:
    """The Node ``name`` as a dict, through the in-cluster service account (or ``kubeconfig``)."""
    from kubernetes import client, config  # the agent imports Kubernetes only in this mode

    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        else:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        api = client.CoreV1Api()
        node: dict[str, Any] = api.api_client.sanitize_for_serialization(api.read_node(name))
    except Exception as e:  # config errors, 404, 403, connection refused: all end the start-up
        raise NodeInfoError(f"node {name}: cannot read the Node object: {e}") from e
    return node


# --------------------------------------------------------------------------------------------
# Underlay choice
# --------------------------------------------------------------------------------------------


def check_method(text: str) -> str:
    """``text`` if it is an autodetection method, else ValueError saying which forms exist."""
    if text in (DEFAULT_METHOD, "first-found"):
        return text
    kind, sep, arg = text.partition("=")
    if sep and kind == "can-reach":
        try:
            return f"can-reach={ipaddress.ip_address(arg)}"
        except ValueError:
            raise ValueError("can-reach needs an IP address (can-reach=192.0.2.1)") from None
    if sep and kind == "interface" and arg:
        try:
            re.compile(arg)
        except re.error as e:
            raise ValueError(f"the interface pattern is not a regular expression ({e})") from None
        return text
    raise ValueError("must be kubernetes-internal-ip, first-found, can-reach=IP or interface=REGEX")


def check_ifname(text: str, auto_ok: bool = False) -> str:
    if auto_ok and text == AUTO_NIC:
        return text
    if not IFNAME_RE.match(text) or text in (".", ".."):
        raise ValueError("is not an interface name (1-15 characters, none of '/', ':', ',', '=' or spaces)"
                         + (f" or {AUTO_NIC!r} (autodetect)" if auto_ok else ""))
    return text


def parse_nic_override(text: str) -> tuple[str, str]:
    """``NODE=IFNAME`` of ``--nic-override`` (and of the ConfigMap's ``nicNodeNames`` list)."""
    node, sep, nic = text.partition("=")
    if not sep or not _NODE.match(node) or len(node) > 253:
        raise ValueError("expected NODE=IFNAME with a node name (DNS-1123 subdomain), e.g. e1=eth1")
    try:
        return node, check_ifname(nic)
    except ValueError as e:
        raise ValueError(f"{nic!r} {e}") from None


def nic_for(node: str, default_nic: str, overrides: Sequence[tuple[str, str]]) -> str:
    """The interface ``node`` must use: its override, else ``default_nic`` (``*`` = the method)."""
    return next((nic for n, nic in overrides if n == node), default_nic)


@dataclasses.dataclass(frozen=True, slots=True)
class Underlay:
    """The chosen underlay: ``ip`` primary (IPv4 when the node has one), ``ip6`` for dual stack."""

    ip: str
    ip6: str
    #: Why, for the start-up log: ``IPv4 192.168.1.11 on eth1 (interface=eth.*)``...
    how: str


def _global(link: HostLink, family: int) -> str:
    return next((a.address for a in link.addresses if a.family == family and a.scope == "global"), "")


def _seen(links: Sequence[HostLink], family: int) -> str:
    """The interfaces, with why each was unusable, for error messages."""
    parts = []
    for ln in links:
        notes = [w for w, bad in (("down", not ln.up), ("loopback", ln.loopback),
                                  (f"no global {types.FAMILY_NAMES[family]}", not _global(ln, family))) if bad]
        parts.append(ln.name + (f" ({', '.join(notes)})" if notes else ""))
    return ", ".join(parts) or "none"


def choose_underlay(node: str, method: str, nic: str, links: Sequence[HostLink], route: RouteHint | None,
                    internal: Mapping[int, str]) -> Underlay:
    """The underlay addresses of ``node`` by ``nic`` (``*``: by ``method``); ``internal`` are the
    Node's InternalIPs by family, which also decide the families wanted. Raises
    :class:`NodeInfoError` naming node, method or interface, and what was missing."""
    if not internal:
        raise NodeInfoError(f"node {node}: status.addresses has no InternalIP: no address family to choose for")
    chosen: dict[int, str] = {}
    notes: list[str] = []
    for fam in sorted(internal):
        name = types.FAMILY_NAMES[fam]
        if nic != AUTO_NIC:
            link = next((ln for ln in links if ln.name == nic), None)
            if link is None:
                raise NodeInfoError(f"node {node}: underlay interface {nic!r} does not exist "
                                    f"(interfaces: {', '.join(ln.name for ln in links) or 'none'})")
            ip = _global(link, fam)
            if not ip:
                raise NodeInfoError(f"node {node}: underlay interface {nic!r} has no global {name} address "
                                    f"(the node has an {name} InternalIP {internal[fam]})")
            chosen[fam] = ip
            notes.append(f"{name} {ip} on {nic} (interface {nic})")
            continue
        where = f"node {node}: autodetection method {method}"
        if method == DEFAULT_METHOD:
            chosen[fam] = internal[fam]
            notes.append(f"{name} {internal[fam]} (the Node's InternalIP)")
        elif method == "first-found":
            link = next((ln for ln in links if ln.up and not ln.loopback and not ln.name.startswith(FIRST_FOUND_SKIP)
                         and _global(ln, fam)), None)
            if link is None:
                raise NodeInfoError(f"{where}: no up, non-loopback interface outside {'*, '.join(FIRST_FOUND_SKIP)}* "
                                    f"has a global {name} address (interfaces: {_seen(links, fam)})")
            chosen[fam] = _global(link, fam)
            notes.append(f"{name} {chosen[fam]} on {link.name} ({method})")
        elif method.startswith("interface="):
            pattern = re.compile(method.partition("=")[2])
            link = next((ln for ln in sorted(links, key=lambda ln: ln.name)
                         if ln.up and pattern.search(ln.name) and _global(ln, fam)), None)
            if link is None:
                matching = [ln for ln in links if pattern.search(ln.name)]
                raise NodeInfoError(f"{where}: no up interface matching {pattern.pattern!r} has a global {name} "
                                    f"address (matching: {_seen(matching, fam)})")
            chosen[fam] = _global(link, fam)
            notes.append(f"{name} {chosen[fam]} on {link.name} ({method})")
        elif method.startswith("can-reach="):
            target = ipaddress.ip_address(method.partition("=")[2])
            if target.version != fam:
                chosen[fam] = internal[fam]
                other = types.FAMILY_NAMES[target.version]
                notes.append(f"{name} {internal[fam]} (the Node's InternalIP: {method} is {other})")
                continue
            if route is None or route.target != str(target):
                raise NodeInfoError(f"{where}: no route lookup towards {target} was made")
            if route.error or not route.source:
                raise NodeInfoError(f"{where}: the kernel has no source address towards {target}: "
                                    f"{route.error or 'no preferred source'}")
            chosen[fam] = route.source
            notes.append(f"{name} {route.source} on {route.interface or '?'} ({method})")
        else:
            raise NodeInfoError(f"{where}: unknown method")
    primary = chosen.get(4) or chosen[6]
    return Underlay(ip=primary, ip6=chosen.get(6, "") if 4 in chosen else "", how="; ".join(notes))
