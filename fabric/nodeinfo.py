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
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any


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
