"""``fabric-tool``: the lab, connectivity checks, reflector status and benchmarks.

Exit status: 0 success, 1 the operation failed (a lab that does not come up in sync, a failed
pair in ``check``), 2 bad input (arguments, topology file, a change ``lab up`` refuses). User
errors print one clear message naming the bad value and where it came from, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fabric import logs
from fabric.cli_types import positive_seconds
from fabric.control import api, tls
from tools import certs, lab
from tools import mcs as mcs_tool
from tools.lab import labpki
from tools.vm import cli as vm_cli

_log = logging.getLogger(__name__)

_MAIN_EPILOG = """\
examples:
  fabric-tool lab up                      build the default lab (examples/lab.yaml) and wait for sync
  fabric-tool check                       probe every pod pair of the lab, print the matrix
  fabric-tool lab status --json           namespaces, PIDs and sync state for scripts
  fabric-tool lab exec east/e1/p0 -- ping -c1 10.20.0.2
  fabric-tool lab down                    remove everything the lab made
  fabric-tool pending --context east      why pods of the lab's cluster east are Pending
  fabric-tool status --reflector 127.0.0.1:4880
  fabric-tool records --kind tree.kosmos.io/free
  fabric-tool export web -n shop --cluster east    import east's Service shop/web everywhere (kosmos-mcs)
  fabric-tool services                    multi-cluster services: exports, imports, endpoints, conflicts
  fabric-tool bench netlink --repeat 3
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _pod_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} must be from 0 to 64")
    return value


def _lab_name(text: str) -> str:
    try:
        return lab.check_lab_name(text)
    except lab.LabUsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fabric-tool",
        description="Kosmos Fabric tool: one-machine lab, connectivity check, reflector status, benchmarks.",
        epilog=_MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # -- lab ---------------------------------------------------------------------------------
    name_opt = argparse.ArgumentParser(add_help=False)
    name_opt.add_argument(
        "--name", type=_lab_name, default=lab.DEFAULT_NAME, help=f"lab name (default {lab.DEFAULT_NAME})"
    )
    lp = sub.add_parser(
        "lab",
        help="build and run clusters of network namespaces on this machine",
        description="Whole clusters on one machine: nodes and pods are network namespaces, the underlay is a "
        "bridge in the lab namespace NAME-ul. Nothing is changed in the root namespace. Needs root.",
        epilog="examples:\n  fabric-tool lab up\n  fabric-tool lab up examples/lab.yaml --name demo --timeout 120\n"
        "  fabric-tool lab status\n  fabric-tool lab stop-agent east/e1\n"
        "  fabric-tool lab up examples/gateway.yaml --name gw && fabric-tool lab fail west/w1 --name gw\n"
        "  fabric-tool lab down --name demo",
        formatter_class=_Formatter,
    )
    lsub = lp.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)

    up = lsub.add_parser(
        "up",
        parents=[name_opt],
        help="build the lab (or add what is missing) and wait until every agent is in sync",
        description="Validate TOPOLOGY, build every namespace and link, start the reflector and one agent per node, "
        "and wait until every node reports its planned state applied. On a running lab it adds new clusters, nodes "
        "and stopped processes and leaves everything else untouched.",
        epilog="examples:\n  fabric-tool lab up\n  fabric-tool lab up my-topology.yaml --name big --timeout 180\n"
        "  fabric-tool lab up --resync-period 5 --grace-period 10\n"
        "  fabric-tool lab up --relays 2   # agents' sessions through two fabric-relay processes",
        formatter_class=_Formatter,
    )
    up.add_argument(
        "topology", nargs="?", default=str(lab.DEFAULT_TOPOLOGY), help="topology file (default examples/lab.yaml)"
    )
    up.add_argument("--timeout", type=positive_seconds, default=lab.DEFAULT_UP_TIMEOUT_S, help="seconds (default 60)")
    up.add_argument("--grace-period", type=positive_seconds, help="reflector: seconds before a lost node is withdrawn")
    up.add_argument("--resync-period", type=positive_seconds, help="agents: seconds between full resyncs")
    up.add_argument("--node-cert-lifetime", type=positive_seconds,
                    help="reflector: seconds a node certificate it signs is valid (default 24 h; agents renew at "
                    "about 2/3 of it; a new lab only)")  # fmt: skip
    up.add_argument("--relays", type=_relay_count, default=0, metavar="K",
                    help="run K fabric-relay processes beside the reflector and hold each agent's session through "
                    "one of them (node i on relay i mod K; certificates still from the reflector); a new lab only "
                    "(default 0: agents connect to the reflector)")  # fmt: skip
    up.add_argument("--no-processes", action="store_true", help="build only the plumbing; start no reflector or agents")

    down = lsub.add_parser(
        "down",
        parents=[name_opt],
        help="remove every namespace, process and pinned object of the lab",
        description="Works even after a crash or without a state file: namespaces are found by name under "
        "/run/netns and processes by their network namespace. Idempotent.",
        epilog="example:\n  fabric-tool lab down --name demo",
        formatter_class=_Formatter,
    )
    del down
    kc = lsub.add_parser(
        "kubeconfig",
        parents=[name_opt],
        help="print the path of the lab's kubeconfig (topologies with 'kubernetes: true')",
        description="One context per cluster, each the cluster's emulated API server (kubeemu) on 127.0.0.1.",
        epilog="example:\n"
        "  kubectl --kubeconfig $(fabric-tool lab kubeconfig --name demo) --context east get nodes -o wide",
        formatter_class=_Formatter,
    )
    del kc
    st = lsub.add_parser(
        "status",
        parents=[name_opt],
        help="clusters, nodes, pods, sessions, versions and sync state",
        epilog="examples:\n  fabric-tool lab status\n  fabric-tool lab status --json | jq '.clusters[].nodes[].netns'",
        formatter_class=_Formatter,
    )
    st.add_argument("--json", action="store_true", help="machine-readable output")
    ex = lsub.add_parser(
        "exec",
        parents=[name_opt],
        help="run a command in a pod (cluster/node/pN) or node (cluster/node) namespace",
        epilog="examples:\n  fabric-tool lab exec east/e1/p0 -- ping -c3 10.20.0.2\n"
        "  fabric-tool lab exec west/w1 -- ip route show table all\n  fabric-tool lab exec underlay -- bridge fdb",
        formatter_class=_Formatter,
    )
    ex.add_argument("target", metavar="POD", help="cluster/node/pN, cluster/node, or 'underlay'")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="command and its arguments")
    for verb, what in (("stop-agent", "stop (SIGTERM) one node's agent; its dataplane stays"),
                       ("start-agent", "start one node's agent and wait until it is in sync")):  # fmt: skip
        ap = lsub.add_parser(
            verb,
            parents=[name_opt],
            help=what,
            epilog=f"example:\n  fabric-tool lab {verb} east/e1",
            formatter_class=_Formatter,
        )
        ap.add_argument("node", metavar="NODE", help="cluster/node (or a node name unique in the lab)")
        if verb == "start-agent":
            ap.add_argument("--no-wait", action="store_true", help="do not wait for the node to be in sync")
            ap.add_argument("--timeout", type=positive_seconds, default=30.0, help="seconds to wait (default 30)")
    for verb, what in (("fail", "cut a node off the underlay (its underlay link goes down): a dead machine"),
                       ("heal", "put a node cut off by 'lab fail' back on the underlay")):  # fmt: skip
        fp = lsub.add_parser(
            verb,
            parents=[name_opt],
            help=what,
            epilog=f"example:\n  fabric-tool lab {verb} east/e1",
            formatter_class=_Formatter,
        )
        fp.add_argument("node", metavar="NODE", help="cluster/node (or a node name unique in the lab)")
    reflector_verbs = (
        ("stop-reflector", "stop (SIGTERM) the lab's reflector; the dataplane stays"),
        ("start-reflector", "start the lab's reflector and wait until every node is in sync"),
    )
    for verb, what in reflector_verbs:
        rp = lsub.add_parser(
            verb,
            parents=[name_opt],
            help=what,
            epilog=f"example:\n  fabric-tool lab {verb}",
            formatter_class=_Formatter,
        )
        if verb == "start-reflector":
            rp.add_argument("--no-wait", action="store_true", help="do not wait for the nodes to be in sync")
            rp.add_argument("--timeout", type=positive_seconds, default=60.0, help="seconds to wait (default 60)")
    an = lsub.add_parser(
        "add-node",
        parents=[name_opt],
        help="add a node to a running lab (other agents receive only a delta)",
        epilog="example:\n  fabric-tool lab add-node east e3 --pods 2",
        formatter_class=_Formatter,
    )
    an.add_argument("cluster", metavar="CLUSTER")
    an.add_argument("node", metavar="NODE")
    an.add_argument("--pods", type=_pod_count, default=2, help="pods on the node (default 2)")
    an.add_argument("--pod-cidr", help="the node's pod CIDR (default: carved from the cluster's podCIDRs)")
    an.add_argument("--underlay", help="the node's underlay address (default: next free)")
    an.add_argument("--timeout", type=positive_seconds, default=lab.DEFAULT_UP_TIMEOUT_S, help="seconds (default 60)")
    _add_bpf_parser(lsub, name_opt)

    # -- check ------------------------------------------------------------------------------
    ck = sub.add_parser(
        "check",
        help="probe every pod of the lab from every other pod (ICMP, scapy) and print the matrix",
        description="All ordered pod pairs (same node, same cluster, across clusters), probed in parallel: one "
        "worker per source pod inside its namespace. Exit 0 only if every pair passed.",
        epilog="examples:\n  fabric-tool check\n  fabric-tool check --lab demo --timeout 5 --count 3\n"
        "  fabric-tool check --services --host-network\n"
        "  fabric-tool check --json | jq '.pairs[] | select(.ok | not)'",
        formatter_class=_Formatter,
    )
    ck.add_argument("--lab", type=_lab_name, default=lab.DEFAULT_NAME, help=f"lab name (default {lab.DEFAULT_NAME})")
    ck.add_argument("--json", action="store_true", help="machine-readable output")
    ck.add_argument("--timeout", type=positive_seconds, default=2.0, help="probe timeout in seconds (default 2)")
    ck.add_argument("--count", type=_positive_int, default=1, help="echo requests per pair (default 1)")
    ck.add_argument("--services", action="store_true",
                    help="also probe every other cluster's lab service IP from every pod")
    ck.add_argument("--host-network", action="store_true",
                    help="also probe every pod of the other clusters from every node's host network")
    ck.add_argument("--retest-failed", action="store_true",
                    help="probe only the pairs that failed in the last check of this lab (kept in its state dir)")
    ck.add_argument("--junit", metavar="FILE", help="also write the pairs as a JUnit XML report to FILE")
    ck.add_argument("--family", choices=("4", "6", "all"), default="all",
                    help="address family to probe: 4, 6 or all (default all; each family is probed on its own, "
                    "pairs without an address of a family at both ends are reported as not expected)")
    _add_observability_parsers(sub, lsub, name_opt)

    # -- status -----------------------------------------------------------------------------
    ss = sub.add_parser(
        "status",
        help="ask a reflector for its topology, sessions, versions and rejections",
        epilog="examples:\n  fabric-tool status                       the default lab's reflector\n"
        "  fabric-tool status --reflector 10.0.0.5:4880 --tls-dir ./status-tls   (a reader/<name> certificate)\n"
        "  fabric-tool status --reflector unix:/run/r.sock --insecure --json",
        formatter_class=_Formatter,
    )
    ss.add_argument("--reflector", metavar="TARGET", help="host:port or unix:PATH (default: the lab's reflector)")
    ss.add_argument("--lab", type=_lab_name, default=lab.DEFAULT_NAME, help=f"lab name (default {lab.DEFAULT_NAME})")
    ss.add_argument("--json", action="store_true", help="machine-readable output")
    tls.add_flags(ss, "a client certificate, e.g. reader/<name>; with --reflector, this or --insecure is required; "
                  "the lab's reflector: the lab's own transport")
    ss.add_argument("--timeout", type=positive_seconds, default=5.0, help="seconds (default 5)")

    # -- records (read-only) ----------------------------------------------------------------
    rp = sub.add_parser(
        "records",
        help="list the add-on records a reflector holds (read-only: one snapshot of WatchRecords)",
        description="Lists the add-on records (kind, publisher, name, version, revision, size, data) the reflector "
        "holds, as a subscriber sees them at END_OF_SNAPSHOT. Data is shown as text when it is printable UTF-8 "
        "(cut at --width), else as its size.",
        epilog="examples:\n  fabric-tool records                              every kind, the default lab's reflector\n"
        "  fabric-tool records --kind tree.kosmos.io/free\n"
        "  fabric-tool records --kind tree.kosmos.io/free --publisher tree/root-a --json\n"
        "  fabric-tool records --reflector 10.0.0.5:4880 --tls-dir ./tree-tls",
        formatter_class=_Formatter,
    )
    rp.add_argument("--kind", default="", help="only records of this kind (default: every kind)")
    rp.add_argument("--publisher", default="", help="only records of this publisher identity")
    rp.add_argument("--reflector", metavar="TARGET", help="host:port or unix:PATH (default: the lab's reflector)")
    rp.add_argument("--lab", type=_lab_name, default=lab.DEFAULT_NAME, help=f"lab name (default {lab.DEFAULT_NAME})")
    rp.add_argument("--json", action="store_true", help="machine-readable output (data as text, or base64)")
    tls.add_flags(rp, "a client certificate; with --reflector, this or --insecure is required; the lab's "
                  "reflector: the lab's own transport")
    rp.add_argument("--width", type=_positive_int, default=60, help="characters of data shown per record (default 60)")
    rp.add_argument("--timeout", type=positive_seconds, default=5.0, help="seconds (default 5)")

    certs.add_parsers(sub, _Formatter)
    _add_install_parsers(sub)
    _add_pending_parser(sub)
    mcs_tool.add_parsers(sub, _Formatter)
    vm_cli.add_parsers(sub, _Formatter)

    # -- bench (its own parser lives in tools.bench.suite) ---------------------------------------
    sub.add_parser("bench", help="benchmarks (see 'fabric-tool bench --help')", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # bench owns its whole command line; hand it over untouched.
    rest = [a for a in args_list if a not in ("-v", "--verbose")]
    if rest and rest[0] == "bench":
        return _bench(rest[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as e:  # argparse already printed the usage and the reason
        return int(e.code) if isinstance(e.code, int) else 2
    logs.setup("debug" if args.verbose else "warning")
    try:
        if args.command == "lab":
            return _lab(args, parser)
        if args.command == "check":
            return _check(args)
        if args.command == "status":
            return _status(args)
        if args.command == "records":
            return _records(args)
        if args.command in ("ca", "cert"):
            return certs.run(args)
        if args.command == "diagnose":
            return _diagnose(args)
        if args.command in ("install", "uninstall", "join", "unjoin"):
            return _install_cmd(args)
        if args.command == "pending":
            return _pending(args)
        if args.command in ("export", "unexport", "services"):
            return mcs_tool.run(args)
        if args.command == "vm":
            return vm_cli.run(args)
    except lab.LabError as e:
        print(f"fabric-tool: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fabric-tool: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2  # not reached: parser.error exits


def _bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("tools.bench.suite")
    except ImportError as e:
        print(f"fabric-tool: error: the benchmark suite (tools.bench.suite) is not available: {e}", file=sys.stderr)
        return 1
    return int(bench.main(argv))


def _relay_count(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= k <= 16:
        raise argparse.ArgumentTypeError(f"{k}: from 0 to 16 relays")
    return k


def _lab(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cmd = args.lab_command
    if cmd == "up":
        state = lab.up(
            args.topology,
            args.name,
            timeout_s=args.timeout,
            grace_period_s=args.grace_period,
            resync_period_s=args.resync_period,
            node_cert_lifetime_s=args.node_cert_lifetime,
            relays=args.relays,
            start_processes=not args.no_processes,
        )
        print(f"lab {args.name} is up: 'fabric-tool check --lab {args.name}' probes it, "
              f"'fabric-tool lab down --name {args.name}' removes it")  # fmt: skip
        if state.kubernetes:
            print(f"kubeconfig: {state.kubeconfig}")
        return 0
    if cmd == "kubeconfig":
        print(lab.kubeconfig_path(args.name))
        return 0
    if cmd == "down":
        lab.down(args.name)
        return 0
    if cmd == "status":
        doc = lab.status(args.name)
        print(json.dumps(doc, indent=2) if args.json else lab.render_status(doc))
        return 0
    if cmd == "exec":
        argv = list(args.cmd)
        if argv and argv[0] == "--":
            argv = argv[1:]
        return lab.exec_in(args.name, args.target, argv)
    if cmd == "stop-agent":
        lab.stop_agent(args.name, args.node)
        return 0
    if cmd == "start-agent":
        lab.start_agent_cmd(args.name, args.node, wait=not args.no_wait, timeout_s=args.timeout)
        return 0
    if cmd in ("fail", "heal"):
        lab.set_failed(args.name, args.node, cmd == "fail")
        return 0
    if cmd == "stop-reflector":
        lab.stop_reflector(args.name)
        return 0
    if cmd == "start-reflector":
        lab.start_reflector_cmd(args.name, wait=not args.no_wait, timeout_s=args.timeout)
        return 0
    if cmd == "metrics":
        return _lab_metrics(args)
    if cmd == "bpf":
        return _lab_bpf(args)
    if cmd == "add-node":
        lab.add_node(
            args.name,
            args.cluster,
            args.node,
            pods=args.pods,
            pod_cidr=args.pod_cidr,
            underlay=args.underlay,
            timeout_s=args.timeout,
        )
        return 0
    parser.error(f"unknown lab command {cmd!r}")
    return 2


def _check(args: argparse.Namespace) -> int:
    from tools.diagnose import check

    state = lab.load_state(args.lab)
    if state is None:
        raise lab.LabError(
            f"lab {args.lab} is not up (no {lab.state_file(args.lab)}); start it with 'fabric-tool lab up'"
        )
    families = check.FAMILIES if args.family == "all" else (int(args.family),)
    pods = check.pods_of(state, families)
    if len(pods) < 2:
        raise lab.LabError(f"lab {args.lab} has {len(pods)} pods with addresses of IPv{args.family}; check needs at "
                           "least 2")  # fmt: skip
    services = check.services_of(state, families) if args.services else []
    hosts = check.hosts_of(state, families) if args.host_network else []
    if args.services and not services:
        raise lab.LabError(f"lab {args.lab} has no lab service (clusters need serviceCIDRs and pods)")
    last_path = state.state_dir / check.LAST_RESULTS
    previous: list[check.PairResult] = []
    only: set[tuple[str, str]] | None = None
    if args.retest_failed:
        try:
            previous = check.load_results(last_path)
        except ValueError as e:
            raise lab.LabUsageError(f"--retest-failed: {e}") from None
        only = {(p.src, p.dst) for p in previous if not p.ok}
        if not only:
            print(f"check: nothing to retest: every pair passed in the last check ({last_path})", file=sys.stderr)
            return 0
    jobs = check.restrict(check.jobs(pods, services, hosts), only)
    n_pairs = sum(len(d) for _, d in jobs)
    print(f"check: probing {n_pairs} pairs from {len(jobs)} sources (timeout {args.timeout:g} s)...", file=sys.stderr)
    result = check.run(pods, timeout_s=args.timeout, count=args.count, services=services, hosts=hosts, only=only)
    if only is None:
        result.not_expected = check.not_expected(state, families, services=args.services)
    check.save_results(last_path, result, previous)
    if args.junit:
        try:
            Path(args.junit).write_text(check.junit_xml(result))
        except OSError as e:
            raise lab.LabUsageError(f"--junit {args.junit}: cannot write: {e.strerror or e}") from None
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(check.render_matrix(result))
    return 0 if result.ok else 1


# -- observability: lab metrics, diagnose ------------------------------------------------------


def _add_observability_parsers(sub: Any, lsub: Any, name_opt: argparse.ArgumentParser) -> None:
    lm = lsub.add_parser(
        "metrics",
        parents=[name_opt],
        help="fetch a node's agent (or the reflector's) /metrics, /healthz, /readyz or /debug/state",
        description="The request is made from inside the node's network namespace (agents listen on "
        f"0.0.0.0:{api.DEFAULT_AGENT_METRICS_PORT} there; the reflector on the lab gateway port "
        f"{api.DEFAULT_REFLECTOR_METRICS_PORT}).",
        epilog="examples:\n  fabric-tool lab metrics east/e1\n  fabric-tool lab metrics reflector\n"
        "  fabric-tool lab metrics west/w1 --path /debug/state\n"
        "  fabric-tool lab metrics east/e1 --grep fabric_agent_tunnel",
        formatter_class=_Formatter,
    )
    lm.add_argument("node", metavar="NODE", help="cluster/node, or 'reflector'")
    lm.add_argument("--path", default="/metrics", help="endpoint path (default /metrics)")
    lm.add_argument("--grep", metavar="TEXT", help="print only lines containing TEXT")

    dg = sub.add_parser(
        "diagnose",
        help="find what is broken: desired vs kernel state, hop-by-hop trace, path MTU",
        description="Diagnostics against a lab (agents' /debug/state, probes from inside the namespaces).",
        epilog="examples:\n  fabric-tool diagnose state east/e1\n  fabric-tool diagnose state x --agent 10.0.0.7:9476\n"
        "  fabric-tool diagnose trace east/e1/p0 west/w2/p1\n  fabric-tool diagnose trace east/e1/p0 10.21.0.10\n"
        "  fabric-tool diagnose mtu east/e1/p0 west/w1/p0",
        formatter_class=_Formatter,
    )
    dsub = dg.add_subparsers(dest="diagnose_command", metavar="WHAT", required=True)
    lab_opt = argparse.ArgumentParser(add_help=False)
    lab_opt.add_argument("--lab", type=_lab_name, default=lab.DEFAULT_NAME,
                         help=f"lab name (default {lab.DEFAULT_NAME})")
    lab_opt.add_argument("--json", action="store_true", help="machine-readable output")
    st = dsub.add_parser("state", parents=[lab_opt], help="desired vs programmed kernel state, table by table",
                         epilog="example:\n  fabric-tool diagnose state east/e1", formatter_class=_Formatter)
    st.add_argument("node", metavar="NODE", help="cluster/node of the lab")
    st.add_argument("--agent", metavar="HOST:PORT", help="ask this agent's metrics port instead of a lab node")
    tr = dsub.add_parser("trace", parents=[lab_opt], help="hop by hop from a pod to an address; first failing hop",
                         epilog="example:\n  fabric-tool diagnose trace east/e1/p0 west/w1/p0",
                         formatter_class=_Formatter)
    tr.add_argument("src", metavar="SRC", help="source pod: cluster/node/pN or its IP")
    tr.add_argument("dst", metavar="DST", help="pod (cluster/node/pN), service (cluster/svc) or any IP")
    tr.add_argument("--timeout", type=positive_seconds, default=1.0, help="probe timeout in seconds (default 1)")
    mt = dsub.add_parser("mtu", parents=[lab_opt], help="path MTU from a pod to an address with DF probes",
                         epilog="example:\n  fabric-tool diagnose mtu east/e1/p0 west/w1/p0",
                         formatter_class=_Formatter)
    mt.add_argument("src", metavar="SRC", help="source pod: cluster/node/pN or its IP")
    mt.add_argument("dst", metavar="DST", help="pod (cluster/node/pN), service (cluster/svc) or any IP")
    mt.add_argument("--timeout", type=positive_seconds, default=0.5, help="seconds per probe (default 0.5)")


def _require_lab(name: str) -> Any:
    state = lab.load_state(name)
    if state is None:
        raise lab.LabUsageError(f"lab {name} is not up (no {lab.state_file(name)}); start it with 'fabric-tool lab up'")
    return state


def _lab_metrics(args: argparse.Namespace) -> int:
    from tools.diagnose import diagnose

    state = _require_lab(args.name)
    code, body = diagnose.fetch(state, args.node, args.path)
    if args.grep:
        body = "".join(line + "\n" for line in body.splitlines() if args.grep in line)
    sys.stdout.write(body)
    return 0 if code == 200 else 1


def _diagnose(args: argparse.Namespace) -> int:
    from tools.diagnose import diagnose

    color = sys.stdout.isatty() and not args.json
    cmd = args.diagnose_command
    if cmd == "state":
        state = None if args.agent else _require_lab(args.lab)
        doc = diagnose.agent_state(state, args.node, args.agent)
        diffs = diagnose.diff_tables(doc.get("desired") or {}, doc.get("kernel") or {})
        if args.json:
            print(json.dumps({"node": doc.get("node"), "tables": [dataclasses.asdict(d) for d in diffs]}, indent=2))
        else:
            print(diagnose.render_state(doc, diffs, color))
        return 0 if all(d.ok for d in diffs) else 1
    state = _require_lab(args.lab)
    if cmd == "trace":
        t = diagnose.trace(state, args.src, args.dst, timeout_s=args.timeout)
        print(json.dumps(t.to_json(), indent=2) if args.json else diagnose.render_trace(t, color))
        return 0 if t.ok else 1
    r = diagnose.mtu(state, args.src, args.dst, timeout_s=args.timeout)
    print(json.dumps(r.to_json(), indent=2) if args.json else diagnose.render_mtu(r))
    return 0 if r.largest_payload is not None and not r.warnings else 1


def status_json(status: Any) -> dict[str, Any]:
    """A FabricStatus as JSON, with each node's derived ``in_sync`` and ``key`` added."""
    doc: dict[str, Any] = dataclasses.asdict(status)
    for c_doc, c in zip(doc["clusters"], status.clusters, strict=True):
        for n_doc, n in zip(c_doc["nodes"], c.nodes, strict=True):
            n_doc["key"] = n.key
            n_doc["in_sync"] = n.in_sync
    return doc


def render_fabric_status(target: str, status: Any) -> str:
    lines = [
        f"reflector {target}: epoch {status.epoch}, generation {status.generation}"
        + (", holding END_OF_SNAPSHOT for known nodes" if status.holding else "")
    ]
    rows = [("CLUSTER", "MODE", "NODE", "GATEWAY", "UNDERLAY", "SESSION", "VERSION", "IN-SYNC", "SNAPSHOTS", "DELTAS")]
    for c in status.clusters:
        if not c.nodes:
            rows.append((c.name, c.mode, "-", "-", "-", "-", "-", "-", "-", "-"))
        for n in c.nodes:
            role = c.role_of(n.name) or "-"
            if n.unreachable_reports:
                role += f" (unreachable for {n.unreachable_reports})"
            session = "up" if n.connected else (f"down (withdraw in {n.withdraw_in_s:.0f} s)"
                                                if n.withdraw_in_s is not None else "down")  # fmt: skip
            rows.append(
                (
                    c.name,
                    c.mode,
                    n.name,
                    role,
                    " ".join((n.underlay_ip, *n.extra_underlay_ips)),
                    session,
                    f"{n.applied_version}/{n.planned_version}",
                    "yes" if n.in_sync else "NO",
                    f"{n.counters.snapshots_sent} ({n.counters.snapshot_entries_sent} entries)",
                    f"{n.counters.deltas_sent} ({n.counters.delta_entries_sent} entries)",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for c in status.clusters:
        if c.active_gateway:
            actives = (c.active_gateway, *c.also_active_gateways)
            lines.append(
                f"cluster {c.name}: active gateway{'s' if len(actives) > 1 else ''} {', '.join(actives)}, "
                f"standby {c.standby_gateway or 'none'}, "
                f"candidates {', '.join(c.gateways) or 'every node'}, moves {c.gateway_moves}"
            )
    for c in status.clusters:
        if tuple(c.ip_families) != (4,):
            fams = ", ".join("IPv4" if f == 4 else "IPv6" for f in c.ip_families)
            lines.append(f"cluster {c.name}: ipFamilies {fams}")
    for u in status.unreachable_pairs:
        lines.append(f"clusters {u.cluster_a} and {u.cluster_b} cannot talk: {u.reason}")
    for rej in status.rejections:
        lines.append(f"rejected {rej.source}: {rej.reason}")
    return "\n".join(lines)


def _reflector_target(args: argparse.Namespace) -> str:
    """--reflector, else the socket of the lab named by --lab."""
    if args.reflector is not None:
        return str(args.reflector)
    state = lab.load_state(args.lab)
    if state is None:
        raise lab.LabUsageError(
            f"no --reflector given and lab {args.lab} is not up; pass --reflector HOST:PORT or unix:PATH"
        )
    return f"unix:{state.reflector_socket}"


def _transport(args: argparse.Namespace, *, records: bool = False) -> tls.TLSDir | None:
    """--tls-dir or --insecure; one of them with --reflector (secure by default). The lab's own
    reflector (no --reflector) is reached with the lab's ``reader/lab`` certificate
    (tools.lab.labpki), ``admin/lab`` for ``records`` (a reader sees status only), or with the
    --tls-dir given."""
    try:
        if args.reflector is None and not args.tls_dir:
            state = lab.load_state(args.lab)
            if state is None or args.insecure:
                return None
            return labpki.admin_tls(state) if records else labpki.reader_tls(state)
        return tls.from_args(args)
    except tls.TLSError as e:
        raise lab.LabUsageError(str(e)) from None


def _status(args: argparse.Namespace) -> int:
    target = _reflector_target(args)
    tls_dir = _transport(args)
    client = lab.status_client()
    try:
        status = client.get_status_sync(target, args.timeout, tls_dir)
    except Exception as e:  # a remote failure is reported, whatever its type
        print(f"fabric-tool: error: reflector {target} did not answer: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(status_json(status), indent=2) if args.json else render_fabric_status(target, status))
    return 0


def _record_text(data: bytes) -> str | None:
    """``data`` as text when it is printable UTF-8, else None."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    return text if text.replace("\n", " ").isprintable() else None


def records_json(listing: Any) -> dict[str, Any]:
    """A records listing (fabric.control.records.RecordList) as JSON: data as ``text`` when it
    is printable UTF-8, else ``base64``."""
    out = []
    for r in listing.records:
        doc: dict[str, Any] = {"kind": r.kind, "publisher": r.publisher, "name": r.name, "version": r.version,
                               "revision": r.revision, "bytes": len(r.data)}  # fmt: skip
        text = _record_text(r.data)
        if text is None:
            doc["base64"] = base64.b64encode(r.data).decode()
        else:
            doc["text"] = text
        out.append(doc)
    return {"epoch": listing.epoch, "revision": listing.revision, "records": out}


def render_records(target: str, listing: Any, width: int) -> str:
    lines = [f"reflector {target}: epoch {listing.epoch}, revision {listing.revision}, {len(listing.records)} records"]
    rows = [("KIND", "PUBLISHER", "NAME", "VERSION", "REVISION", "BYTES", "DATA")]
    for r in listing.records:
        text = _record_text(r.data)
        shown = "(binary)" if text is None else text.replace("\n", " ")
        if len(shown) > width:
            shown = shown[: max(1, width - 3)] + "..."
        rows.append((r.kind, r.publisher, r.name, str(r.version), str(r.revision), str(len(r.data)), shown))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def _records(args: argparse.Namespace) -> int:
    target = _reflector_target(args)
    tls_dir = _transport(args, records=True)
    try:
        records_client = importlib.import_module("fabric.control.records")
    except ImportError as e:
        raise lab.LabError(f"the control-channel client (fabric.control.records) is not available: {e}. "
                           "Run ./dev.sh setup (it also generates the gRPC stubs).") from e  # fmt: skip
    try:
        listing = records_client.list_records_sync(target, args.kind, args.publisher, args.timeout, tls_dir)
    except Exception as e:  # a remote failure is reported, whatever its type
        print(f"fabric-tool: error: reflector {target} did not list records: {type(e).__name__}: {e}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(json.dumps(records_json(listing), indent=2) if args.json else render_records(target, listing, args.width))
    return 0


# -- lab bpf: the global-IP translator of a node ----------------------------------------------


def _add_bpf_parser(lsub: Any, name_opt: argparse.ArgumentParser) -> None:
    bp = lsub.add_parser(
        "bpf",
        parents=[name_opt],
        help="dump a node's global-IP translator: mappings, packet/byte counters, drops, attached programs",
        description="Reads the node's pinned maps in the lab's bpf filesystem (no compile) and the tc filters "
        "of ours on its devices.",
        epilog="examples:\n  fabric-tool lab bpf east/e1\n  fabric-tool lab bpf west/w1 --json",
        formatter_class=_Formatter,
    )
    bp.add_argument("node", metavar="NODE", help="cluster/node of the lab")
    bp.add_argument("--json", action="store_true", help="machine-readable output")


def _lab_bpf(args: argparse.Namespace) -> int:
    doc = lab.bpf_dump(args.name, args.node)
    print(json.dumps(doc, indent=2) if args.json else lab.render_bpf(doc))
    return 0


# -- install / join / unjoin / uninstall (tools/install.py) -----------------------------------


def _add_install_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--lab", type=_lab_name, metavar="NAME",
                        help="a lab with 'kubernetes: true': its kubeconfig is the default, its reflector and "
                        "agents are the lab's processes")
    common.add_argument("--dry-run", action="store_true", help="print what would be applied or deleted")
    common.add_argument("--timeout", type=positive_seconds, default=120.0, help="seconds to wait (default 120)")
    host = argparse.ArgumentParser(add_help=False)
    host.add_argument("--host-kubeconfig", metavar="FILE", help="the host cluster's kubeconfig (default: --kubeconfig)")
    host.add_argument("--host-context", metavar="CTX",
                      help="the host cluster's context (default: the one install used in a lab, else current)")
    for verb, what in (("install", "CRDs and the reflector into the host cluster"),
                       ("uninstall", "remove what install created (refuses while Clusters are joined)")):
        p = sub.add_parser(verb, parents=[common], help=what, description=f"fabric-tool {verb}: {what}.")
        p.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig of the host cluster (default: the lab's)")
        p.add_argument("--context", metavar="CTX", help="the host cluster's context (lab default: its first cluster)")
        if verb == "uninstall":
            p.add_argument("--force", action="store_true", help="delete even while Clusters exist")
    j = sub.add_parser("join", parents=[common, host], help="add a member cluster: its Cluster resource and agent",
                       description="fabric-tool join: create or update the Cluster resource in the host, deploy the "
                       "agent into the member, wait until the member's nodes are in sync.")
    j.add_argument("cluster", metavar="CLUSTER", help="the member's name in the fabric")
    j.add_argument("--kubeconfig", metavar="FILE", help="the member's kubeconfig (default: the lab's)")
    j.add_argument("--context", metavar="CTX", help="the member's context (lab default: CLUSTER)")
    j.add_argument("--network-type", choices=("p2p", "gateway"), help="default p2p (the CRD default)")
    j.add_argument("--ip-family", action="append", choices=("IPv4", "IPv6"), help="repeatable, primary first")
    j.add_argument("--pod-cidr", action="append", metavar="CIDR",
                   help="the cluster's pod range, repeatable (default: none, discovery mode: the union of the "
                        "pod CIDRs its agents announce from their Nodes)")
    j.add_argument("--service-cidr", action="append", metavar="CIDR", help="default: the member's ServiceCIDRs")
    j.add_argument("--global-cidr", action="append", metavar="LOCAL=GLOBAL", help="globalCIDRsMap entry, repeatable")
    j.add_argument("--gateway", action="append", metavar="NODE", help="gateway candidate, repeatable, preferred first")
    j.add_argument("--active-gateways", type=int, metavar="N",
                   help="gateway mode: gateways carrying traffic at once (default 1; 2-8: active/active)")
    j.add_argument("--default-nic", metavar="IFNAME", help="underlay interface (default '*': autodetect)")
    j.add_argument("--autodetection-method", metavar="METHOD",
                   help="how agents find the underlay when the NIC is '*': kubernetes-internal-ip (default), "
                        "first-found, can-reach=IP, interface=REGEX")
    j.add_argument("--nic-override", action="append", metavar="NODE=IFNAME",
                   help="the underlay interface of one node, repeatable (default: keep the Cluster's)")
    j.add_argument("--clear-nic-overrides", action="store_true", help="remove every per-node interface override")
    j.add_argument("--reflector", metavar="HOST:PORT", help="where member agents reach the reflector (not in a lab)")
    j.add_argument("--bootstrap-ttl", type=positive_seconds, default=3600.0, metavar="S",
                   help="seconds the member's bootstrap credential (Secret kosmos-fabric-bootstrap, exchanged by "
                   "its agents for their own certificates) is valid (default %(default)g)")  # fmt: skip
    j.add_argument("--no-wait", action="store_true", help="do not wait for the nodes to be in sync")
    j.add_argument("--tree", action="store_true",
                   help="ClusterTree: also make CLUSTER a leaf of the host (its kubeconfig in a Secret there, "
                        "spec.clusterTreeOptions set) and wait for its virtual nodes (kosmos-tree makes them)")
    j.add_argument("--leaf-model", action="append", metavar="MODEL",
                   help="with --tree: cluster (default: one virtual node kosmos-CLUSTER), node (one per leaf node) "
                        "or party=SELECTOR (one per label-selected party of leaf nodes, kosmos-CLUSTER-<name from "
                        "the selector>; repeatable)")
    u = sub.add_parser("unjoin", parents=[common, host], help="remove a member cluster from the fabric",
                       description="fabric-tool unjoin: a tree leaf first leaves the tree (tree disabled, its "
                       "virtual nodes removed, the leaf's objects labelled kosmos.io/root-cluster=<root id> "
                       "deleted, its kubeconfig Secret deleted); then delete the Cluster, wait until no peer plans "
                       "it, remove the agent (a lab: stop the cluster's agents and clean its nodes).")
    u.add_argument("cluster", metavar="CLUSTER")
    u.add_argument("--kubeconfig", metavar="FILE", help="the member's kubeconfig (default: the lab's)")
    u.add_argument("--context", metavar="CTX", help="the member's context (lab default: CLUSTER)")
    u.add_argument("--reflector", metavar="TARGET", help="reflector status address to wait on (not needed in a lab)")


def _nic_overrides(values: list[str] | None, clear: bool) -> tuple[tuple[str, str], ...] | None:
    """``--nic-override`` values as pairs; None (keep the live Cluster's) when none are given."""
    from fabric import nodeinfo
    from tools import install

    if clear and values:
        raise install.InstallUsageError("--clear-nic-overrides and --nic-override exclude each other")
    if clear:
        return ()
    if not values:
        return None
    out = []
    for v in values:
        try:
            out.append(nodeinfo.parse_nic_override(v))
        except ValueError as e:
            raise install.InstallUsageError(f"--nic-override {v!r}: {e}") from None
    return tuple(out)


def _install_cmd(args: argparse.Namespace) -> int:
    from tools import install

    try:
        with install.errors_to_exit():
            kubeconfig = args.kubeconfig
            if args.lab and not kubeconfig:
                kubeconfig = str(lab.kubeconfig_path(args.lab))
            if args.command in ("install", "uninstall"):
                context = args.context
                if args.lab and not context:
                    state = install._lab_state(args.lab)
                    context = install._lab_host(state) or state.clusters[0].name
                target = install.Target(kubeconfig, context)
                if args.command == "install":
                    return install.install(target, lab_name=args.lab, dry_run=args.dry_run, timeout_s=args.timeout)
                return install.uninstall(target, lab_name=args.lab, dry_run=args.dry_run, force=args.force)
            member = install.Target(kubeconfig, args.context or (args.cluster if args.lab else None))
            host_context = args.host_context
            if args.lab and not host_context:
                host_context = install.lab_host_context(install._lab_state(args.lab))
                if host_context is None and not args.dry_run:
                    raise install.InstallUsageError(f"lab {args.lab}: run 'fabric-tool install --lab {args.lab}' first")
            if args.command == "join" and args.leaf_model and not args.tree:
                raise install.InstallUsageError("--leaf-model needs --tree")
            host = install.Target(args.host_kubeconfig or kubeconfig, host_context)
            if args.command == "join":
                opts = install.JoinOptions(
                    network_type=args.network_type, ip_families=tuple(args.ip_family or ()),
                    pod_cidrs=tuple(args.pod_cidr or ()), service_cidrs=tuple(args.service_cidr or ()),
                    global_cidrs=tuple(install.parse_global_cidr(g) for g in args.global_cidr or ()),
                    gateways=tuple(args.gateway or ()), active_gateways=args.active_gateways,
                    default_nic=args.default_nic,
                    autodetection_method=args.autodetection_method,
                    nic_overrides=_nic_overrides(args.nic_override, args.clear_nic_overrides),
                    bootstrap_ttl_s=args.bootstrap_ttl,
                )  # fmt: skip
                tree = tuple(args.leaf_model or ()) if args.tree else None
                return install.join(args.cluster, host, member, opts, tree=tree, lab_name=args.lab,
                                    reflector=args.reflector,
                                    dry_run=args.dry_run, wait=not args.no_wait, timeout_s=args.timeout)
            return install.unjoin(args.cluster, host, member, lab_name=args.lab, reflector=args.reflector,
                                  dry_run=args.dry_run, timeout_s=args.timeout)
    except install.InstallError as e:
        print(f"fabric-tool {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code


# -- pending: why a pod is not scheduled (issue 16) ---------------------------------------------


def _add_pending_parser(sub: Any) -> None:
    pp = sub.add_parser(
        "pending",
        help="why pods are Pending: the scheduler's last FailedScheduling message and its per-node reasons",
        description="For each Pending pod without a node: the last FailedScheduling Event the scheduler wrote "
        "about it (count, age) and, taken apart, how many nodes failed for which reason (upstream's message: "
        "'0/3 nodes are available: 2 Insufficient cpu, 1 node(s) had untolerated taint {...}.'), plus its "
        "PodScheduled condition. A pod with neither has not been seen by a scheduler of its schedulerName "
        "(or is scheduling-gated). Reads only.",
        epilog="examples:\n  fabric-tool pending --lab demo                      every cluster, every namespace\n"
        "  fabric-tool pending --lab demo --context east -n apps\n"
        "  fabric-tool pending --lab demo --context east -n apps big-pod\n"
        "  fabric-tool pending --server http://127.0.0.1:8001 --json | jq '.[].reasons'",
        formatter_class=_Formatter,
    )
    pp.add_argument("pod", nargs="?", metavar="POD", help="one pod (in -n NAMESPACE, default 'default')")
    pp.add_argument("--lab", type=_lab_name, default=lab.DEFAULT_NAME, help=f"lab name (default {lab.DEFAULT_NAME})")
    pp.add_argument("--context", metavar="CLUSTER", help="the lab cluster to ask (default: every cluster of the lab)")
    pp.add_argument("--server", metavar="URL", help="ask this API server instead of a lab's (no authentication)")
    pp.add_argument("-n", "--namespace", metavar="NS", help="one namespace (default: all; 'default' with POD)")
    pp.add_argument("--json", action="store_true", help="machine-readable output (a list, one entry per pod)")


def _pending(args: argparse.Namespace) -> int:
    from tools.diagnose import pending

    targets: list[tuple[str, str]]
    if args.server:
        targets = [(args.context or "-", args.server)]
    else:
        state = lab.require_state(args.lab)
        if not state.kubernetes:
            raise lab.LabError(f"lab {args.lab} runs no Kubernetes API servers (its topology lacks "
                               "'kubernetes: true')")
        names = [c.name for c in state.clusters]
        if args.context is not None and args.context not in names:
            raise lab.LabUsageError(f"--context {args.context!r}: lab {args.lab} has no such cluster "
                                    f"(clusters: {', '.join(names)})")
        targets = [(c.name, c.api_url or "") for c in state.clusters if args.context in (None, c.name)]
        if args.pod and len(targets) > 1:
            raise lab.LabUsageError(f"POD {args.pod!r} needs --context CLUSTER (lab {args.lab} has clusters "
                                    f"{', '.join(names)})")
    out: list[dict[str, Any]] = []
    for cluster, url in targets:
        if not url:
            raise lab.LabError(f"lab {args.lab}: cluster {cluster} has no API server running; "
                               "run 'fabric-tool lab up' to start it")
        try:
            out += pending.explain(cluster, url, args.namespace, args.pod)
        except pending.PendingError as e:
            raise lab.LabError(f"cluster {cluster}: {e}") from None
    print(json.dumps(out, indent=2) if args.json else pending.render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
