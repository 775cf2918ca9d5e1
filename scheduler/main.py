"""``kosmos-scheduler``: the command line of the scheduler (console script).

In order: parse flags (kube-scheduler's names where they exist), read ``--config``, connect to
the API server, build the scheduler (profiles from the plugin registry), serve ``/metrics`` and
``/healthz``, start (informers, then leader election or the loop), and run until SIGTERM/SIGINT
or until the lease is lost (exit 1, as kube-scheduler, so a supervisor restarts it with a fresh
cache).

Leader election is on by default, with kube-scheduler's timings (15 s lease, 10 s renew
deadline, 2 s retry period), a ``coordination.k8s.io/v1`` Lease (``--leader-elect-resource-lock
leases``, upstream's default and the only lock it still has) named ``kube-system/kosmos-scheduler``
(Kosmos' own resource name; kube-scheduler's is ``kube-scheduler``, so both can run side by side)
and the identity ``<hostname>_<uuid>``, unique per process as upstream's.

SIGTERM/SIGINT is a clean stop: binds in flight finish, then the lease is released (upstream's
``ReleaseOnCancel``), so a standby, or this scheduler restarted by its supervisor, takes over at
its next try instead of waiting out the lease. After SIGKILL the lease lapses, as upstream.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from fabric import health, logs
from fabric.cli_types import grpc_target
from fabric.control import tls
from scheduler import election
from scheduler.kube import connect
from scheduler.profile import ConfigError, default_config, load_config

_log = logging.getLogger("scheduler")

EPILOG = """\
examples:
  # schedule for both built-in profiles (default-scheduler, kosmos-scheduler) of a lab cluster
  kosmos-scheduler --kubeconfig /run/lab/c1/kubeconfig

  # without leader election, against an insecure API server URL
  kosmos-scheduler --master http://127.0.0.1:6443 --leader-elect=false

  # a second replica: both campaign for the Lease kube-system/kosmos-scheduler, only its holder
  # binds; the other takes over when the holder releases it (SIGTERM) or lets it lapse (15 s)
  kosmos-scheduler --kubeconfig /run/lab/c1/kubeconfig --listen 127.0.0.1:10260

  # with the fabric: per-leaf-node views (LeafNodeFit) and cluster-pair RTT (NetworkAffinity),
  # the root's own nodes being in fabric cluster "host"
  kosmos-scheduler --kubeconfig kc --reflector 10.0.0.5:4880 --tls-dir /etc/kosmos/tls --fabric-cluster host

  # a KubeSchedulerConfiguration with own profiles, plugins and weights
  kosmos-scheduler --kubeconfig kc --config sched.yaml

  sched.yaml:
    apiVersion: kubescheduler.config.k8s.io/v1
    kind: KubeSchedulerConfiguration
    percentageOfNodesToScore: 0          # adaptive, as upstream
    profiles:
    - schedulerName: default-scheduler
    - schedulerName: kosmos-scheduler
      plugins:
        score:
          enabled: [{name: NodeResourcesBalancedAllocation, weight: 2}]
          disabled: [{name: InterPodAffinity}]
      pluginConfig:
      - name: NodeResourcesFit
        args: {scoringStrategy: {type: MostAllocated}}

endpoints: /metrics (fabric_scheduler_*), /healthz, /readyz on --listen.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kosmos-scheduler", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="A Kubernetes scheduler (upstream framework semantics) with Kosmos' leaf-cluster plugins.")
    election.add_flags(p, lease_name="kosmos-scheduler", acts="schedule", config_file=True)
    p.add_argument("--config", help="KubeSchedulerConfiguration YAML (profiles, plugins, weights, pluginConfig)")
    p.add_argument("--listen", default="127.0.0.1:10259", help="HOST:PORT for /metrics and /healthz")
    p.add_argument("--bind-workers", type=int, default=16, help="concurrent pods/binding requests")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    p.add_argument("--reflector", type=grpc_target, metavar="TARGET",
                   help="gRPC target of fabric-reflector (HOST:PORT or unix:/path): the tree manager's per-leaf-node "
                   "records feed the LeafNodeFit plugin (without it, a virtual node's sum decides), the fabric's "
                   "cluster-pair reachability records the NetworkAffinity plugin")
    p.add_argument("--fabric-cluster", metavar="NAME",
                   help="the root cluster's own name in the Kosmos fabric (its non-virtual nodes are there): "
                   "NetworkAffinity measures RTT from and to it by the fabric's reachability records; needs "
                   "--reflector (without it, the root is only known to be itself: RTT 0 to itself, unknown to others)")
    tls.add_flags(p, "client certificate of the scheduler's identity; needed with --reflector")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        logs.setup(args.log_level)
    except ValueError as e:
        print(f"kosmos-scheduler: --log-level: {e}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config) if args.config else default_config()
    except ConfigError as e:
        print(f"kosmos-scheduler: {e}", file=sys.stderr)
        return 2
    le = cfg.leader_election
    if args.leader_elect is not None:
        le.leader_elect = args.leader_elect
    for attr in ("resource_namespace", "resource_name", "lease_duration", "renew_deadline", "retry_period"):
        flag = {"resource_namespace": "leader_elect_resource_namespace", "resource_name": "leader_elect_resource_name"
                }.get(attr, f"leader_elect_{attr}")
        v = getattr(args, flag)
        if v is not None:
            setattr(le, attr, v)
    problem = None
    if le.leader_elect:
        problem = election.timing_problem(le.lease_duration, le.renew_deadline, le.retry_period)
    if problem:
        print(f"kosmos-scheduler: leader election (--leader-elect-* flags or the config's leaderElection): "
              f"{problem}", file=sys.stderr)
        return 2
    from scheduler.scheduler import Scheduler

    if args.fabric_cluster is not None and (not args.fabric_cluster or "/" in args.fabric_cluster):
        print(f"kosmos-scheduler: --fabric-cluster {args.fabric_cluster!r}: not a fabric cluster name", file=sys.stderr)
        return 2
    if args.fabric_cluster and not args.reflector:
        print("kosmos-scheduler: --fabric-cluster needs --reflector (the fabric's reachability comes from it)",
              file=sys.stderr)
        return 2
    tls_dir = None
    if args.reflector:
        try:
            tls_dir = tls.from_args(args)
        except tls.TLSError as e:
            print(f"kosmos-scheduler: --reflector: {e}", file=sys.stderr)
            return 2

    try:
        api = connect(args.master, args.kubeconfig, args.context)
        sched = Scheduler(api, cfg, identity=args.identity, bind_workers=args.bind_workers)
    except ConfigError as e:
        print(f"kosmos-scheduler: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bad kubeconfig: say so, no traceback
        print(f"kosmos-scheduler: connecting: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:
        server = health.serve(args.listen, sched.healthy, sched.healthy, registry=sched.metrics.registry)
    except (OSError, ValueError) as e:
        print(f"kosmos-scheduler: --listen {args.listen}: {e}", file=sys.stderr)
        return 1
    feeds = None
    if args.reflector:
        from scheduler.leafviews import LeafViews
        from scheduler.leafwatch import RecordFeeds, leaf_feed, reachability_feed
        from scheduler.netaffinity_records import Reachability
        from scheduler.plugins.kosmos_netaffinity import REACHABILITY_EVENT

        views = LeafViews()
        sched.handle.leaf_views = views  # read by LeafNodeFit and LeafNodeFragmentation
        # read by NetworkAffinity; a pair that moves re-tries the pods it left unschedulable
        reach = Reachability(on_change=lambda: sched.queue.move_on_event(REACHABILITY_EVENT))
        sched.handle.reachability = reach
        sched.handle.fabric_cluster = args.fabric_cluster
        feeds = RecordFeeds(args.reflector, tls_dir, [leaf_feed(views), reachability_feed(reach)])
        feeds.start()
    host, port = server.server_address[:2]
    _log.info("/metrics and /healthz on http://%s:%s", host, port)  # the real port when --listen ...:0
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    _log.info("kosmos-scheduler %s: profiles %s, leader election %s", sched.identity, ", ".join(sched.profiles),
              f"on lease {le.resource_namespace}/{le.resource_name}" if sched.leader_elect else "off")
    try:
        sched.start(sync_timeout=None)
    except Exception as e:
        print(f"kosmos-scheduler: starting: {e}", file=sys.stderr)
        return 1
    while not done.wait(0.5):
        if sched.lost.is_set():
            _log.error("leaderelection lost")
            sched.kill()
            server.shutdown()
            return 1
    sched.stop()
    if feeds is not None:
        feeds.stop()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
