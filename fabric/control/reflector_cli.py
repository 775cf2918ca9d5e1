"""``fabric-reflector``'s command line: flags, the topology source (a file, or ``Cluster``
resources with a leader Lease), the metrics endpoint, and serving until SIGTERM or a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from fabric import health, logs
from fabric import topology as topology_file
from fabric.control import bootstrap, bounds, pki, quiet_gc, reflector_metrics, tls
from fabric.control.record_store import DEFAULT_RECORDS_GRACE_PERIOD_S, DEFAULT_RECORDS_STARTUP_HOLD_S
from fabric.control.reflector import (
    DEAD_AFTER_INTERVALS,
    DEFAULT_GRACE_PERIOD_S,
    DEFAULT_KEEPALIVE_INTERVAL_S,
    DEFAULT_LISTEN,
    Reflector,
)
from fabric.control.reflector_service import ListenError, parse_listen

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# fabric-reflector
# --------------------------------------------------------------------------------------------


def log_level(text: str) -> str:
    try:
        return logs.parse_level(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_LIMITS = bounds.Limits()
#: Flag help of every :class:`~fabric.control.bounds.Limits` field (a test checks all are here).
_LIMIT_HELP: dict[str, tuple[str, str]] = {
    "max_pending_streams": ("N", "new streams gRPC holds until the reflector takes them up; more at once are refused "
                            "with CANCELLED (a fleet's agents reconnecting at once after a restart)"),
    "max_receive_message_bytes": ("B", "largest message read from a client"),
    "max_send_message_bytes": ("B", "largest message written to a client"),
    "send_queue_bytes": ("B", "bytes queued to one SyncNode or WatchTopology stream after its snapshot; a client that "
                         "falls further behind is cut off and reconnects to a fresh snapshot"),
    "max_streams_per_identity": ("N", "streaming RPCs open at once per client identity"),
    "announce_rate": ("PER_S", "SyncNode announcements per second per identity, after the burst"),
    "announce_burst": ("N", "SyncNode announcements per identity at once"),
    "max_streams_per_host": ("N", "streaming RPCs open at once per host of plaintext (--insecure) peers"),
    "host_announce_rate": ("PER_S", "SyncNode announcements per second per plaintext host, after the burst"),
    "host_announce_burst": ("N", "SyncNode announcements per plaintext host at once"),
    "keepalive_min_s": ("S", "shortest keepalive interval an agent may propose (shorter ones are raised to it)"),
    "keepalive_max_s": ("S", "longest keepalive interval an agent may propose (longer ones are cut to it); the "
                        "session runs at the smaller of the agent's and --keepalive-interval"),
}


def limits_of(args: argparse.Namespace) -> bounds.Limits:
    """The :class:`~fabric.control.bounds.Limits` of the parsed flags (raises ValueError)."""
    return bounds.Limits(**{f: getattr(args, f"limit_{f}") for f in _LIMIT_HELP})


def build_parser() -> argparse.ArgumentParser:
    """fabric-reflector's flags (also read by the manifests' test: every flag they pass exists)."""
    p = argparse.ArgumentParser(
        prog="fabric-reflector",
        description="Route reflector of the Kosmos fabric: plans every node's tunnels and routes and streams them.",
        epilog=(
            "example: fabric-reflector --config examples/lab.yaml --listen 198.18.0.1:4880 "
            "--listen unix:/run/kosmos-fabric/lab/reflector.sock --tls-dir /etc/kosmos-fabric/reflector-tls"
        ),
    )
    p.add_argument("--config", metavar="FILE", help="topology file (clusters, CIDRs, expected nodes); "
                   "required with --topology-source=file")
    p.add_argument("--topology-source", choices=("file", "kubernetes"), default="file",
                   help="where clusters come from: the --config file, or the Cluster resources (clusters.kosmos.io) "
                   "of the host cluster, watched, with status written back (default %(default)s)")
    p.add_argument("--kubeconfig", metavar="FILE",
                   help="kubernetes source: the host cluster's kubeconfig (its current context; default: in-cluster "
                   "service account, else ~/.kube/config)")
    p.add_argument("--kube-netns", metavar="FILE",
                   help="kubernetes source: reach the API server from this network namespace (/proc/PID/ns/net); "
                   "the lab runs the reflector in its underlay namespace and the API servers in the root namespace")
    p.add_argument("--resync-period", type=float, default=300.0, metavar="S",
                   help="kubernetes source: seconds between full relists of the Clusters (default %(default)g)")
    p.add_argument("--status-lease", metavar="NS/NAME",
                   help="kubernetes source: the leader Lease of replicas running active/standby: its holder is the "
                   "one replica that serves agents and writes Cluster status; the others keep their view hot and "
                   "refuse agents with UNAVAILABLE naming the leader (default: no Lease, always serving)")
    p.add_argument("--status-lease-identity", metavar="ID", default="",
                   help="this replica's identity in the leader Lease (e.g. the pod name)")
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help=f"HOST:PORT or unix:/path, repeatable (default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--grace-period",
        type=float,
        default=DEFAULT_GRACE_PERIOD_S,
        metavar="S",
        help="seconds a node whose session died stays in the topology (default %(default)g)",
    )
    p.add_argument(
        "--records-grace-period",
        type=float,
        default=DEFAULT_RECORDS_GRACE_PERIOD_S,
        metavar="S",
        help="seconds the add-on records of a publisher whose session ended are kept; the same identity "
        "reconnecting in time takes them back without subscribers seeing a change (default %(default)g)",
    )
    p.add_argument(
        "--records-startup-hold",
        type=float,
        default=DEFAULT_RECORDS_STARTUP_HOLD_S,
        metavar="S",
        help="seconds a starting (or newly leading) reflector withholds END_OF_SNAPSHOT from record subscribers "
        "while publishers reconnect and re-put, so nobody sees records vanish and come back (default %(default)g; "
        "0 disables)",
    )
    p.add_argument(
        "--keepalive-interval",
        type=float,
        default=DEFAULT_KEEPALIVE_INTERVAL_S,
        metavar="S",
        help=f"seconds between keepalives; {DEAD_AFTER_INTERVALS} silent intervals = dead (default %(default)g)",
    )
    p.add_argument(
        "--startup-hold",
        type=float,
        default=None,
        metavar="S",
        help="seconds to withhold END_OF_SNAPSHOT after start unless all expected nodes announced "
        "(default: the grace period; 0 disables)",
    )
    tls.add_flags(p, "the reflector's server certificate, 'fabric-tool cert issue-server'; every listen "
                  "address requires a client certificate of the CA")
    limits = p.add_argument_group(
        "bounds", "what one client can make the reflector hold or do (fabric/control/bounds.py); a stream over a "
        "bound ends with RESOURCE_EXHAUSTED naming it (past --max-pending-streams gRPC itself ends it with "
        "CANCELLED); the metrics fabric_reflector_limit{limit} show them")
    for field, (metavar, text) in _LIMIT_HELP.items():
        default = getattr(_LIMITS, field)
        limits.add_argument(bounds.flag(field), dest=f"limit_{field}", type=type(default), default=default,
                            metavar=metavar, help=f"{text} (default %(default)s)")  # fmt: skip
    p.add_argument("--ca-dir", metavar="DIR",
                   help="sign node certificates (IssueCertificate: agents with their cluster's bootstrap certificate "
                   "or their own) with the fabric CA in DIR (ca.crt, ca.key); default: issue none")  # fmt: skip
    p.add_argument("--node-cert-lifetime", type=float, default=pki.DEFAULT_CLIENT_LIFETIME.total_seconds(),
                   metavar="S", help="seconds a node certificate it signs is valid; agents renew at about 2/3 of it "
                   "(default %(default)g)")  # fmt: skip
    p.add_argument("--gc", choices=("quiet", "interpreter"), default="quiet",
                   help="when the cyclic garbage collector's full collections run: 'quiet' (when no change is being "
                   "flushed or fanned out, or once one has waited 10 s; fabric/control/quiet_gc.py) or "
                   "'interpreter' (Python's own schedule) (default %(default)s)")  # fmt: skip
    p.add_argument("--log-level", default="info", type=log_level, help="debug, info, warning or error (default: info)")
    p.add_argument("--metrics-listen", metavar="ADDR:PORT", help="serve Prometheus metrics here (default: off)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.keepalive_interval <= 0:
        p.error(f"--keepalive-interval {args.keepalive_interval:g}: must be positive")
    if args.grace_period < 0:
        p.error(f"--grace-period {args.grace_period:g}: must not be negative")
    if args.records_grace_period < 0:
        p.error(f"--records-grace-period {args.records_grace_period:g}: must not be negative")
    if args.records_startup_hold < 0:
        p.error(f"--records-startup-hold {args.records_startup_hold:g}: must not be negative")
    if args.startup_hold is not None and args.startup_hold < 0:
        p.error(f"--startup-hold {args.startup_hold:g}: must not be negative")
    if args.topology_source == "file" and not args.config:
        p.error("--config FILE is required with --topology-source=file")
    if args.topology_source == "kubernetes":
        if args.config:
            p.error(f"--config {args.config}: the kubernetes topology source reads Cluster resources, not a file")
        if args.resync_period <= 0:
            p.error(f"--resync-period {args.resync_period:g}: must be positive")
    elif args.kubeconfig or args.kube_netns or args.status_lease:
        p.error("--kubeconfig, --kube-netns and --status-lease need --topology-source=kubernetes")
    try:
        args.limits = limits_of(args)
    except ValueError as e:
        p.error(str(e))
    args.lease = None
    if args.status_lease:
        from fabric.control import k8s_source

        try:
            args.lease = k8s_source.LeaseSpec.parse(args.status_lease, args.status_lease_identity)
        except ValueError as e:
            p.error(str(e))
    try:
        args.listen = [parse_listen(a) for a in (args.listen or [DEFAULT_LISTEN])]
        if args.metrics_listen is not None:
            if args.metrics_listen.startswith("unix:"):
                raise ValueError(f"--metrics-listen {args.metrics_listen!r}: must be ADDR:PORT")
            parse_listen(args.metrics_listen)
    except ValueError as e:
        p.error(str(e))
    return args


async def serve_until_stopped(
    reflector: Reflector, listen: Sequence[str], credentials: grpc.ServerCredentials | None = None
) -> None:
    """Serve until SIGTERM/SIGINT or a bug (:meth:`Reflector.crash`), then stop."""
    await reflector.start(listen, credentials)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(reflector.wait_crashed())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    _log.info("stopping" if reflector.crashed is None else "stopping after a bug")
    await reflector.stop()


def main(argv: Sequence[str] | None = None) -> int:
    from fabric.control import k8s_source

    args = parse_args(argv)
    logs.setup(args.log_level)
    try:
        tls_dir = tls.from_args(args)
        served = reflector_metrics.ServedCertificate()
        credentials = tls.server_credentials(tls_dir, served.update) if tls_dir is not None else None
        signer = None
        if args.ca_dir:
            if tls_dir is None:
                raise tls.TLSError("--ca-dir needs --tls-dir: certificates are issued only over mutual TLS")
            signer = bootstrap.Signer.load(Path(args.ca_dir), datetime.timedelta(seconds=args.node_cert_lifetime))
    except (tls.TLSError, pki.PKIError, ValueError) as e:
        print(f"fabric-reflector: {e}", file=sys.stderr)
        return 2
    source: k8s_source.KubernetesSource | None = None
    if args.topology_source == "kubernetes":
        try:
            netns_fd = k8s_source.open_netns(args.kube_netns) if args.kube_netns else None
            source = k8s_source.KubernetesSource(
                k8s_source.load_api_client(args.kubeconfig), resync_s=args.resync_period, lease=args.lease,
                netns_fd=netns_fd,
            )  # fmt: skip
        except k8s_source.SourceError as e:
            print(f"fabric-reflector: {e}", file=sys.stderr)
            return 2
        # The first list before serving: a restarted reflector knows its clusters (and, from
        # their status, the nodes to wait for) before any agent reconnects.
        source.initial_list()
        config = source.initial_config()
        args.config = f"Cluster resources ({args.kubeconfig or 'in-cluster'})"
    else:
        try:
            config = topology_file.load(args.config).fabric_config()
        except topology_file.TopologyError as e:
            print(f"fabric-reflector: {e}", file=sys.stderr)
            return 2
    # Full collections at the reflector's quiet moments (fabric/control/quiet_gc.py): installed
    # for the time it serves, as they are this process's collector's settings.
    gc_policy = quiet_gc.QuietCollector() if args.gc == "quiet" else None
    reflector = Reflector(
        config,
        grace_period=args.grace_period,
        keepalive_interval=args.keepalive_interval,
        startup_hold=args.startup_hold,
        records_grace_period=args.records_grace_period,
        records_startup_hold=args.records_startup_hold,
        limits=args.limits,
        gc_policy=gc_policy,
    )
    reflector.signer = signer
    if args.lease is not None:  # serve only once the Lease is ours (KubernetesSource decides)
        reflector.set_leader(False, f"standby replica; waiting for the leader Lease "
                                    f"{args.lease.namespace}/{args.lease.name}")  # fmt: skip
    _log.info(
        "config %s: %d clusters, %d expected nodes; grace %gs, keepalive %gs, startup hold %gs",
        args.config,
        len(config.clusters),
        len(config.expected_nodes),
        reflector.grace_period,
        reflector.keepalive_interval,
        reflector.startup_hold,
    )
    if args.metrics_listen:
        registry = CollectorRegistry()
        registry.register(reflector.collector())
        registry.register(served)
        health.serve(args.metrics_listen, reflector.healthy, reflector.ready, registry=registry)

    async def run() -> None:
        watch = asyncio.create_task(source.run(reflector)) if source is not None else None
        if watch is not None:

            def stopped(t: asyncio.Task[None]) -> None:
                if not t.cancelled():
                    _log.error("the Kubernetes topology source stopped: %r", t.exception())

            watch.add_done_callback(stopped)
        try:
            await serve_until_stopped(reflector, args.listen, credentials)
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)

    if gc_policy is not None:
        gc_policy.install()
    try:
        asyncio.run(run())
    except ListenError as e:
        print(f"fabric-reflector: {e}", file=sys.stderr)
        return 1
    finally:
        if gc_policy is not None:
            gc_policy.uninstall()
    if reflector.crashed is not None:  # logged with its traceback when it happened
        print(f"fabric-reflector: stopped after a bug: {reflector.crashed!r}", file=sys.stderr)
        return 1
    return 0



if __name__ == "__main__":
    sys.exit(main())
