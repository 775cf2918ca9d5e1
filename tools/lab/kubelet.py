"""``python -m tools.lab.kubelet``: the lab kubelet of one cluster of a lab (``kubernetes: true``).

``fabric-tool lab up`` starts one per cluster, in the root namespace, next to the cluster's
emulated API server (kubeemu). It is :class:`kubeemu.kubelet.LabKubelet` with the lab's own
pod plumbing as its network:

* the nodes come from the lab's state file (read once at start): name, underlay addresses as the
  Node's InternalIPs and its pod CIDRs (one per family the cluster runs; both lists in the
  cluster's ``ipFamilies`` order, primary first), and the static pods' IPs of either family,
  which the kubelet never hands out;
* each node's declared ``resources`` (topology) become its Node's capacity and allocatable,
  and the kubelet admits pods against them;
* a Pod bound to a node becomes a lab pod through :func:`tools.lab.add_pod` (namespace
  ``NAME-<cluster>-<node>-k<hash>``, veth, /32 and /128 routes, proxy ARP, one address per
  family; idempotent), and leaves through
  :func:`tools.lab.remove_pod` (the namespace is deleted, taking the veth and route with it);
* its containers run as processes in that namespace (:mod:`kubeemu.runtime`), with the
  kubelet root ``<lab state dir>/kubelet-<cluster>`` (pod directories, volumes, CRI logs, the
  shims' PID + start time records that a restarted kubelet adopts and ``lab down`` kills).

It changes nothing in the state file, so it needs no lock: the API server holds the pods and the
namespace names derive from the pod keys. ``lab up`` restarts it when nodes are added; the
containers keep running across that restart and are adopted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from kubeemu.kubelet import LabKubelet, LabNode
from kubeemu.process import run_until_signalled
from tools import lab

_log = logging.getLogger(__name__)


class LabPodNetwork:
    """``kubeemu.kubelet.PodNetwork`` over the lab's pod plumbing, for the nodes of one cluster."""

    def __init__(self, cluster: lab.ClusterRecord) -> None:
        self.nodes = {n.name: n for n in cluster.nodes}

    def _node(self, name: str) -> lab.NodeRecord:
        node = self.nodes.get(name)
        if node is None:  # the kubelet only serves nodes it was given; a bug if reached
            raise lab.LabError(f"node {name!r} is not a node of this kubelet ({', '.join(self.nodes)})")
        return node

    def create(self, node: str, pod_key: str, ips: tuple[str, ...]) -> str:
        n = self._node(node)
        pod = lab.kube_pod(n, pod_key, ips)
        lab.add_pod(n, pod)
        return pod.netns

    def create_many(self, node: str, pods: list[tuple[str, tuple[str, ...]]]) -> list[str | Exception | None]:
        """``kubeemu.kubelet.BatchPodNetworks``: :meth:`create` for several pods of ``node``, with
        :func:`tools.lab.add_pods` (the same plumbing, its ``ip`` runs shared)."""
        n = self._node(node)
        recs: list[lab.PodRecord | Exception] = []
        for key, ips in pods:
            try:
                recs.append(lab.kube_pod(n, key, ips))
            except lab.LabError as e:  # this pod's addresses are unusable; the others go on
                recs.append(e)
        good = [r for r in recs if isinstance(r, lab.PodRecord)]
        failed = lab.add_pods(n, good) if good else {}
        return [r if isinstance(r, Exception) else failed.get(r.name) or r.netns for r in recs]

    def node_netns(self, node: str) -> str:
        """``kubeemu.kubelet.NodeNetworks``: where hostNetwork pods of ``node`` run."""
        return self._node(node).netns

    def delete(self, node: str, pod_key: str, ips: tuple[str, ...]) -> None:
        n = self._node(node)
        lab.remove_pod(n, lab.kube_pod(n, pod_key, ips))


def lab_nodes(cluster: lab.ClusterRecord) -> list[LabNode]:
    """The kubelet's view of the cluster's nodes; static pod IPs of both families are reserved.

    Pod CIDRs and node IPs are ordered by the cluster's ``ipFamilies`` (primary first), as a
    dual-stack cluster's node IPAM orders ``spec.podCIDRs`` and its kubelets' ``--node-ip``. A
    node's underlay address of a family the cluster does not run (every node has an IPv4 one)
    still counts as its InternalIP, after those of the cluster's families."""
    order = {f: i for i, f in enumerate(cluster.ip_families)}

    def rank(ip: str) -> int:
        return order.get(6 if ":" in ip else 4, len(order))

    out = []
    for n in cluster.nodes:
        cidrs = tuple(sorted(n.pod_cidrs, key=rank))
        node_ips = sorted((ip for ip in (n.underlay_ip, n.underlay_ip6) if ip), key=rank)
        out.append(LabNode(n.name, node_ips[0], cidrs, reserved=frozenset(ip for p in n.pods for ip in p.ips()),
                           resources=dict(n.resources), secondary_ip=node_ips[1] if len(node_ips) > 1 else ""))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.lab.kubelet",
                                description="The lab kubelet of one lab cluster (started by 'fabric-tool lab up').")
    p.add_argument("--state", required=True, type=Path, help="the lab's state file (state.json)")
    p.add_argument("--cluster", required=True, help="cluster of the lab")
    p.add_argument("--url", required=True, help="the cluster's API server, e.g. http://127.0.0.1:40123")
    p.add_argument("--root", type=Path, default=None,
                   help="kubelet root: pod directories, volumes, logs (default: <state dir>/kubelet-<cluster>)")
    p.add_argument("--api-port", type=int, default=0, help="port of the kubelet API on 127.0.0.1 (default: any)")
    p.add_argument("--cluster-dns", default="",
                   help="comma-separated IPs of the cluster DNS (upstream's --cluster-dns; the lab's kube-dns "
                        "ClusterIP): the nameserver of ClusterFirst pods")
    p.add_argument("--cluster-domain", default="",
                   help="the cluster's DNS domain (upstream's --cluster-domain, e.g. cluster.local): the search path "
                        "of ClusterFirst pods")
    p.add_argument("--resolv-conf", default="/etc/resolv.conf",
                   help="the node's resolver configuration (upstream's --resolv-conf; '' for none): what "
                        "dnsPolicy Default pods get")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        state = lab.LabState.from_json(json.loads(args.state.read_text()))
    except (OSError, ValueError, lab.StateError) as e:
        print(f"lab kubelet: cannot use the lab state {args.state}: {e}", file=sys.stderr)
        return 1
    cluster = next((c for c in state.clusters if c.name == args.cluster), None)
    if cluster is None:
        print(f"lab kubelet: lab {state.name} has no cluster {args.cluster!r} ({args.state})", file=sys.stderr)
        return 2
    nodes = lab_nodes(cluster)
    root = args.root or kubelet_root(args.state.parent, cluster.name)
    _log.info("lab %s cluster %s: serving nodes %s for %s (kubelet root %s)", state.name, cluster.name,
              ", ".join(n.name for n in nodes), args.url, root)
    try:
        kubelet = LabKubelet(args.url, nodes, LabPodNetwork(cluster), root=root, api_port=args.api_port,
                             cluster_dns=args.cluster_dns.split(","), cluster_domain=args.cluster_domain,
                             resolv_conf=args.resolv_conf)
    except ValueError as e:  # a bad capacity or DNS setting (the message names the value and where it came from)
        print(f"lab kubelet: {e}", file=sys.stderr)
        return 2
    asyncio.run(run_until_signalled(kubelet.run(), "stopping"))
    return 0


def kubelet_root(state_dir: Path, cluster: str) -> Path:
    """The kubelet root of a lab cluster (what upstream keeps in /var/lib/kubelet and /var/log/pods)."""
    return state_dir / f"kubelet-{cluster}"


if __name__ == "__main__":
    sys.exit(main())
