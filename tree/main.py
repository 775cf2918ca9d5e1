"""``kosmos-tree``: the command line of the tree manager (console script).

In order: parse flags (``kosmos-scheduler``'s names for the shared ones, the agent's
``--reflector``), connect to the root cluster's API server, resolve this root's id
(``--root-id``, default the UID of the root's ``kube-system`` namespace: stable across
restarts, distinct per cluster), set up the link to the reflector when one is named (records
published as ``tree/<root id>``; ``NetworkUnavailable`` only with ``--fabric-cluster``), bind the
virtual nodes' kubelet server (:mod:`tree.kubelet`; its port goes on the virtual nodes, so it is
bound before the first pass, and serves once the manager exists), serve ``/metrics``,
``/healthz`` and ``/readyz``, start (informers, then leader election or the passes), and run until
SIGTERM/SIGINT (clean stop, the Lease released) or until the Lease is lost (exit 1).
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Sequence

from fabric import health, logs
from fabric.cli_types import grpc_target, positive_seconds
from fabric.control import tls
from scheduler import election
from scheduler.kube import Api, connect, resource_path
from tree import forge
from tree.fabric_link import FabricLink
from tree.kubelet import KubeletServer, PodResolver
from tree.leaf import Options
from tree.manager import TreeManager

_log = logging.getLogger("tree")

EPILOG = """\
examples:
  # keep the virtual nodes of every Cluster with spec.clusterTreeOptions.enable: true
  kosmos-tree --kubeconfig /run/lab/host/kubeconfig

  # one replica, no leader election, a short unreachability threshold
  kosmos-tree --master http://127.0.0.1:6443 --leader-elect=false --leaf-unreachable-after 20

  # publish each virtual node's leaf resources (kind tree.kosmos.io/leaf-resources) and set
  # NetworkUnavailable from the fabric, the root being fabric cluster "host"
  kosmos-tree --kubeconfig root.kubeconfig --reflector 10.0.0.5:4880 --fabric-cluster host

a leaf Cluster:
  spec:
    clusterTreeOptions:
      enable: true
      kubeconfigSecretRef: {namespace: kosmos-system, name: leaf1-kubeconfig}   # key "kubeconfig"
      leafNodeMode: party          # cluster (default) | node | party
      leafModels:
      - leafNodeName: gpu          # virtual node kosmos-leaf1-gpu
        nodeSelector: {labelSelector: {matchLabels: {pool: gpu}}}

endpoints: /metrics (fabric_tree_*), /healthz, /readyz on --listen; the virtual nodes' kubelet
(/containerLogs, /exec, /healthz: kubectl logs/exec reach the leaf pods) on --kubelet-address:--kubelet-port.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kosmos-tree", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="ClusterTree's manager: leaf clusters as virtual nodes of the root (host) cluster.")
    election.add_flags(p, lease_name="kosmos-tree", acts="act", root=True)
    p.add_argument("--root-id", help="this root cluster's id, carried by what it puts into leaves "
                                     "(default: the UID of the root's kube-system namespace); records are published as "
                                     "tree/<root id>, so lowercase letters, digits and -./ only")
    p.add_argument("--leaf-unreachable-after", type=positive_seconds, default=40.0,
                   help="seconds without an answer from a leaf before its virtual nodes turn NotReady (default 40)")
    p.add_argument("--leaf-timeout", type=positive_seconds, default=10.0,
                   help="seconds a leaf request may take (default 10)")
    p.add_argument("--node-lease-period", type=positive_seconds, default=10.0,
                   help="seconds between leaf probes and virtual node Lease renewals (default 10)")
    p.add_argument("--node-status-period", type=positive_seconds, default=60.0,
                   help="seconds after which an unchanged virtual node status is written again (default 60)")
    p.add_argument("--resync-period", type=positive_seconds, default=30.0,
                   help="seconds between full passes and re-reads of the kubeconfig Secrets (default 30)")
    p.add_argument("--pod-workers", type=int, default=8,
                   help="pods of one leaf synced at once (default 8; each leaf has its own)")
    p.add_argument("--stranded-after", type=positive_seconds, default=30.0,
                   help="seconds a leaf copy may stay Pending and Unschedulable in its leaf before it counts as "
                        "stranded: a copy pinned to a leaf node is created again without the pin, an unpinned one has "
                        "its root pod evicted (when a controller owns it) for re-placement (default 30)")
    p.add_argument("--reflector", type=grpc_target, metavar="TARGET",
                   help="gRPC target of fabric-reflector, HOST:PORT or unix:/path (mutual TLS with --tls-dir, "
                        "plaintext with --insecure); absent: no add-on records, no NetworkUnavailable")
    tls.add_flags(p, "client certificate of identity tree/<root id>; needed with --reflector")
    p.add_argument("--fabric-cluster", metavar="NAME",
                   help="the root cluster's name in the fabric: NetworkUnavailable of each virtual node says "
                        "whether the fabric reaches its leaf from there (needs --reflector)")
    # Deprecated: NetworkUnavailable follows the reflector's reachability records as they change
    # (tree.fabric_link), nothing is polled. Still accepted, so a command line that passes it starts.
    p.add_argument("--fabric-status-period", type=positive_seconds, default=None, help=argparse.SUPPRESS)
    p.add_argument("--kubelet-address", default="127.0.0.1",
                   help="IP the virtual nodes' kubelet server listens on and the virtual nodes advertise as their "
                        "InternalIP: where the root API server sends kubectl logs/exec (in a pod: its pod IP; "
                        "default 127.0.0.1, the lab's API servers dial kubelets there)")
    p.add_argument("--kubelet-port", type=int, default=10250,
                   help="port of the kubelet server, advertised as daemonEndpoints.kubeletEndpoint.Port "
                        "(default 10250; 0: no kubelet server, no endpoint on the virtual nodes)")
    p.add_argument("--kubelet-cert", metavar="FILE", help="serving certificate of the kubelet server (PEM); with "
                   "--kubelet-key it serves HTTPS, which a real kube-apiserver requires; without, plain HTTP")
    p.add_argument("--kubelet-key", metavar="FILE", help="private key of --kubelet-cert")
    p.add_argument("--kubelet-client-ca", metavar="FILE",
                   help="CA that signs the root API server's kubelet client certificate: clients must present one "
                        "(as virtual-kubelet's --client-verify-ca); absent: clients are not authenticated")
    p.add_argument("--listen", default="127.0.0.1:10269", help="HOST:PORT for /metrics, /healthz and /readyz")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return p


def root_id(api: Api) -> str:
    """The UID of the root's kube-system namespace."""
    uid = (api.get(resource_path("v1", "namespaces", name="kube-system")).get("metadata") or {}).get("uid")
    if not uid:
        raise ValueError("the root's kube-system namespace has no metadata.uid; pass --root-id")
    return str(uid)


#: The collector's first threshold (Python's default: 700 allocations). Every watch event and
#: request decodes a pod into hundreds of containers, and the informers keep thousands of pods,
#: so the default collected every few events: 0.26-0.38 ms of CPU per reflected pod (gc
#: callbacks, 1,000 pods over 2 leaves), 0.15 ms at 10,000. Nearly everything is freed by
#: reference counting; the collector only finds the rare cycle, a little later.
GC_THRESHOLD0 = 10000


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])
    try:
        logs.setup(args.log_level)
    except ValueError as e:
        print(f"kosmos-tree: --log-level: {e}", file=sys.stderr)
        return 2
    problem = election.timing_problem(args.leader_elect_lease_duration, args.leader_elect_renew_deadline,
                                      args.leader_elect_retry_period)
    if problem:  # client-go's rules, as kosmos-scheduler and kosmos-mcs check them
        print(f"kosmos-tree: leader election: {problem}", file=sys.stderr)
        return 2
    if args.fabric_cluster and not args.reflector:
        print("kosmos-tree: --fabric-cluster needs --reflector (the fabric's reachability comes from it)",
              file=sys.stderr)
        return 2
    if args.fabric_status_period is not None:
        _log.warning("--fabric-status-period is deprecated and ignored: NetworkUnavailable follows the fabric's "
                     "reachability records as the reflector publishes them; nothing is polled")
    tls_dir = None
    if args.reflector:
        try:
            tls_dir = tls.from_args(args)
        except tls.TLSError as e:
            print(f"kosmos-tree: --reflector: {e}", file=sys.stderr)
            return 2
    if bool(args.kubelet_cert) != bool(args.kubelet_key) or (args.kubelet_client_ca and not args.kubelet_cert):
        print("kosmos-tree: --kubelet-cert and --kubelet-key go together, and --kubelet-client-ca needs them",
              file=sys.stderr)
        return 2
    try:
        api = connect(args.master, args.kubeconfig, args.context)
        api.user_agent = "kosmos-tree"
        rid = args.root_id or root_id(api)
    except Exception as e:  # a bad kubeconfig or an unreachable root: say so, no traceback
        print(f"kosmos-tree: connecting to the root cluster: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    resolver: list[PodResolver] = []  # set once the manager exists; the server starts before it
    kubelet_server = None
    if args.kubelet_port:
        try:
            kubelet_server = KubeletServer(lambda ns, name: resolver[0](ns, name), args.kubelet_address,
                                           args.kubelet_port, cert_file=args.kubelet_cert, key_file=args.kubelet_key,
                                           client_ca=args.kubelet_client_ca, timeout=args.leaf_timeout)
        except (OSError, ValueError, ssl.SSLError) as e:
            print(f"kosmos-tree: the kubelet server on {args.kubelet_address}:{args.kubelet_port}: {e}",
                  file=sys.stderr)
            return 1
    options = Options(root_id=rid, leaf_timeout=args.leaf_timeout, unreachable_after=args.leaf_unreachable_after,
                      lease_period=args.node_lease_period, status_period=args.node_status_period,
                      resync_period=args.resync_period, pod_workers=max(1, args.pod_workers),
                      stranded_after=args.stranded_after,
                      kubelet_address=args.kubelet_address if kubelet_server else "",
                      kubelet_port=kubelet_server.port if kubelet_server else 0)
    link = None
    if args.reflector:
        link = FabricLink(args.reflector, rid, args.fabric_cluster, startup_wait=args.resync_period, tls_dir=tls_dir)
        _log.info("add-on records to the reflector at %s as %s (kind %s); NetworkUnavailable %s", args.reflector,
                  link.identity, forge.RECORD_KIND,
                  f"from the fabric's view of cluster {args.fabric_cluster}" if args.fabric_cluster
                  else "not set (no --fabric-cluster)")
    else:
        _log.info("no --reflector: no add-on records are published and NetworkUnavailable is not set")
    mgr = TreeManager(api, options, leader_elect=args.leader_elect, identity=args.identity, link=link,
                      lease_namespace=args.leader_elect_resource_namespace, lease_name=args.leader_elect_resource_name,
                      lease_duration=args.leader_elect_lease_duration,
                      renew_deadline=args.leader_elect_renew_deadline, retry_period=args.leader_elect_retry_period)
    resolver.append(PodResolver(api, rid, mgr.nodes, mgr.leaf_api, timeout=args.leaf_timeout))
    if kubelet_server is not None:
        kubelet_server.count = lambda kind, code: mgr.metrics.kubelet_requests.labels(kind, str(code)).inc()
        kubelet_server.start()
        _log.info("virtual nodes' kubelet server (kubectl logs/exec) on %s%s", kubelet_server.url,
                  "" if kubelet_server.tls else " (plain HTTP: a real kube-apiserver needs --kubelet-cert/-key)")
    try:
        server = health.serve(args.listen, mgr.healthy, mgr.ready, registry=mgr.metrics.registry)
    except (OSError, ValueError) as e:
        print(f"kosmos-tree: --listen {args.listen}: {e}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    _log.info("/metrics and /healthz on http://%s:%s", host, port)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    _log.info("kosmos-tree %s: root id %s, leader election %s", mgr.identity, rid,
              f"on lease {args.leader_elect_resource_namespace}/{args.leader_elect_resource_name}"
              if args.leader_elect else "off")
    mgr.start(sync_timeout=None)
    while not done.wait(0.5):
        if mgr.lost.is_set():
            _log.error("leaderelection lost")
            mgr.stop(release=False)
            server.shutdown()
            if kubelet_server is not None:
                kubelet_server.stop()
            return 1
    mgr.stop()
    server.shutdown()
    if kubelet_server is not None:
        kubelet_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
