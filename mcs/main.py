"""``kosmos-mcs``: the command line of the multi-cluster services controller (console script).

In order: parse flags (``kosmos-tree``'s names for the shared ones: the host cluster's
``--kubeconfig``/``--master``/``--context`` and the Lease election, the agent's ``--reflector``
with ``--tls-dir``), connect to the host cluster and to every member (``--member NAME=KUBECONFIG``,
repeatable; ``--host-member NAME`` makes the host cluster a member too; ``--discover-members``
adds the Clusters with a kubeconfig Secret, as kosmos-tree finds its leaves: :func:`discover_members`;
with none yet, it waits for the first instead of exiting), read each member's fabric
configuration (:func:`fabric_members`: its global CIDR mapping from ``--global-cidr`` or its
``Cluster`` object in the host cluster, the address families it runs from the reflector's status
when ``--reflector`` is given, else from the Cluster; and the global CIDR mappings of the
Cluster objects that are not members, for a ClusterTree root member's endpoints running in its
leaves), start the members' informers (the DNS
responders answer from them on every replica), bind the clusterset DNS responders
(``--dns-listen``: one per importing member, :mod:`mcs.dnsserver` says why), serve ``/metrics``
(``fabric_mcs_*``), ``/healthz`` and ``/readyz``, watch the fabric's reachability records
(:mod:`mcs.reachability`: a change kicks a pass at once),
then run the controller (:mod:`mcs.controller`) at once or while holding the Lease.

It runs until SIGTERM/SIGINT (clean stop, the Lease released, exit 0), until the Lease is lost
(exit 1) or until a bug ends the controller (exit 1: the supervisor restarts it; a member's
failing API server is no bug, see :mod:`mcs.controller`). Every ``--fabric-status-period`` the
fabric configuration is read again and a change kicks a pass; with ``--discover-members`` the
Clusters are read again too, and a member joining or leaving ends the process (exit 0,
:func:`membership_change`) for its supervisor to start it with the new set: members are fixed
for a process's life.
"""

from __future__ import annotations

import argparse
import base64
import gc
import ipaddress
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from fabric import health, logs, validation
from fabric.cli_types import grpc_target, positive_seconds
from fabric.control import api as fapi
from fabric.control import tls
from mcs import kube as mk
from mcs.controller import Controller, Member
from mcs.dnsserver import Responder, TableCache
from mcs.metrics import McsMetrics
from mcs.reachability import Reachability
from scheduler import election
from scheduler.kube import Api, ApiError, connect, connect_kubeconfig, resource_path

_log = logging.getLogger("mcs")

EPILOG = """\
examples:
  # two member clusters, the host cluster a member too; DNS for east on 10.0.0.9:53
  kosmos-mcs --kubeconfig host.kubeconfig --host-member host \\
      --member east=/etc/mcs/east.kubeconfig --member west=/etc/mcs/west.kubeconfig \\
      --reflector 10.0.0.5:4880 --tls-dir /etc/mcs/tls --dns-listen east=10.0.0.9:53

  # the lab's clusters (one kubeconfig, a context per cluster: the member's name picks it)
  K=$(fabric-tool lab kubeconfig)
  kosmos-mcs --kubeconfig $K --context east --leader-elect=false --member east=$K --member west=$K \\
      --reflector 127.0.0.1:4880 --tls-dir ./mcs-tls --dns-listen west=127.0.0.1:5353

  # export every Service of namespaces named shared-* without a ServiceExport each
  kosmos-mcs --master http://127.0.0.1:6443 --leader-elect=false --member a=a.kubeconfig \\
      --auto-export-namespace-prefix shared-

  dig @127.0.0.1 -p 5353 web.shop.svc.clusterset.local     # west's cluster IP of the imported web

members: --member NAME=KUBECONFIG (the context named NAME if the file has one, else its current
context), or NAME=http(s)://HOST:PORT (no credentials: emulators). NAME is the cluster's name in
the fabric (its Cluster object): its global CIDRs come from there, and from the reflector the
families it runs and which clusters it reaches.

exporting: a ServiceExport next to a Service (fabric-tool export SERVICE -n NS --cluster C), or a
Service annotated kosmos.io/auto-create-mcs: "true", or any Service in a namespace starting with
an --auto-export-namespace-prefix (the controller then creates the ServiceExport, and deletes it
when the Service goes). Every member gets a ServiceImport and a Service <name>-clusterset whose
EndpointSlices are the exporters' endpoints (not ready while the fabric reports the exporter
unreachable from that member).

DNS: <svc>.<ns>.svc.clusterset.local answers with the ServiceImport's IPs, which each member
allocates itself, so each responder answers for one member: --dns-listen NAME=HOST:PORT (NAME may
be left out with one member), UDP and TCP. Point that member's DNS at it for the zone
clusterset.local (a CoreDNS stub domain).

client certificate (--tls-dir): identity mcs/<name> (fabric-tool cert issue mcs/clusterset ...):
it may read the status and watch records, and publishes nothing.

endpoints: /metrics (fabric_mcs_*), /healthz, /readyz on --listen.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kosmos-mcs", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Multi-cluster services (KEP-1645 ServiceExport/ServiceImport) across the member clusters of "
                    "the fabric. --kubeconfig/--master/--context name the host cluster (the Lease, the Cluster "
                    "objects).")
    election.add_flags(p, lease_name="kosmos-mcs", acts="write imports and export statuses", root=False)
    p.add_argument("--member", action="append", default=[], metavar="NAME=KUBECONFIG", type=member_spec,
                   help="a member cluster and its kubeconfig or URL (repeatable; see below)")
    p.add_argument("--host-member", metavar="NAME",
                   help="the host cluster is a member too, named NAME in the fabric")
    p.add_argument("--discover-members", action="store_true",
                   help="also every Cluster of the host cluster with a kubeconfig Secret, as kosmos-tree finds its "
                        "leaves (spec.clusterTreeOptions.kubeconfigSecretRef, key \"kubeconfig\"); read at start")
    p.add_argument("--reflector", type=grpc_target, metavar="TARGET",
                   help="gRPC target of fabric-reflector, HOST:PORT or unix:/path: reachability records (endpoints "
                        "of a cluster the fabric cannot reach turn not ready at once) and each member's address "
                        "families; absent: every cluster counts as reachable")
    tls.add_flags(p, "client certificate of identity mcs/<name>; needed with --reflector")
    p.add_argument("--fabric-status-period", type=positive_seconds, default=30.0,
                   help="seconds between reads of the Cluster objects and the reflector's status (default 30)")
    p.add_argument("--global-cidr", action="append", default=[], metavar="NAME:LOCAL=GLOBAL", type=global_cidr_spec,
                   help="member NAME maps CIDR LOCAL to GLOBAL (repeatable), for a fabric configured without Cluster "
                        "objects in the host cluster (the lab's, from its topology file); a member with one here "
                        "ignores its Cluster's globalCIDRsMap")
    p.add_argument("--auto-export-namespace-prefix", action="append", default=[], metavar="PREFIX",
                   help="export every Service of the namespaces whose name starts with PREFIX (repeatable)")
    p.add_argument("--auto-create-annotation", type=_boolean, nargs="?", const=True, default=True,
                   help=f"export Services annotated {mk.AUTO_CREATE_ANNOTATION}: \"true\" (default true)")
    p.add_argument("--dns-listen", action="append", default=[], metavar="[NAME=]HOST:PORT", type=dns_spec,
                   help="answer <svc>.<ns>.svc.clusterset.local for member NAME on HOST:PORT, UDP and TCP "
                        "(repeatable: one per member; port 0: any free one, logged)")
    p.add_argument("--resync-period", type=positive_seconds, default=30.0,
                   help="seconds between full passes without any change (default 30)")
    p.add_argument("--retry-period", type=positive_seconds, default=2.0,
                   help="seconds before a member whose writes failed is tried again (default 2)")
    p.add_argument("--startup-wait", type=positive_seconds, default=30.0,
                   help="seconds to wait for every member's API server before passes go on without the silent "
                        "ones (default 30)")
    p.add_argument("--listen", default="127.0.0.1:10271", help="HOST:PORT for /metrics, /healthz and /readyz")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="shorthand for --listen 0.0.0.0:PORT")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return p


def _boolean(text: str) -> bool:
    from fabric.cli_types import boolean

    return boolean(text)


@dataclass(frozen=True)
class MemberSpec:
    name: str
    source: str  # a kubeconfig path or an http(s) URL


_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _cluster_name(text: str, where: str) -> str:
    """A cluster name as the fabric spells them (a Cluster object's name: DNS-1123 subdomain)."""
    if not _NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{where}: {text!r} is not a cluster name (lower-case letters, digits, "
                                         "'-' and '.', starting and ending with a letter or digit)")
    return text


def member_spec(text: str) -> MemberSpec:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=KUBECONFIG (or NAME=URL)")
    return MemberSpec(_cluster_name(name, f"--member {text!r}"), source)


def global_cidr_spec(text: str) -> tuple[str, str, str]:
    """``NAME:LOCAL=GLOBAL`` (``--global-cidr``): the member, its CIDR and the global CIDR of the
    same size it maps to (the check of ``globalCIDRsMap``)."""
    name, colon, pair = text.partition(":")
    local, eq, glob = pair.partition("=")
    if not colon or not eq:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:LOCAL=GLOBAL (e.g. east:10.10.0.0/16=172.20.0.0/16)")
    _cluster_name(name, f"--global-cidr {text!r}")
    try:
        local, glob = str(ipaddress.ip_network(local, strict=True)), str(ipaddress.ip_network(glob, strict=True))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--global-cidr {text!r}: {e}") from None
    problem = validation.mapping_problem(local, glob)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"--global-cidr {text!r}: {problem}")
    return name, local, glob


def dns_spec(text: str) -> tuple[str, str, int]:
    name, sep, addr = text.rpartition("=")
    host, colon, port = addr.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not [NAME=]HOST:PORT")
    return (name if sep else ""), host.strip("[]"), int(port)


#: The key of the kubeconfig in a Cluster's Secret (kosmos-tree's).
KUBECONFIG_KEY = "kubeconfig"


def discover_members(host: Api, known: Sequence[str]) -> list[Member]:
    """Members from the host's Cluster objects, as kosmos-tree finds its leaves: each Cluster
    (not in ``known``) whose ``spec.clusterTreeOptions.kubeconfigSecretRef`` names a Secret with
    a kubeconfig. One that cannot be used is logged (naming the Cluster and the Secret) and left out."""
    out = []
    for obj in host.get(CLUSTERS_PATH)["items"]:
        name = str((obj.get("metadata") or {}).get("name"))
        ref = ((obj.get("spec") or {}).get("clusterTreeOptions") or {}).get("kubeconfigSecretRef") or {}
        if name in known or not isinstance(ref, dict) or not ref.get("namespace") or not ref.get("name"):
            continue
        where = (f"Secret {ref['namespace']}/{ref['name']} (spec.clusterTreeOptions.kubeconfigSecretRef of "
                 f"Cluster {name})")
        try:
            secret = host.get(resource_path("v1", "secrets", str(ref["namespace"]), str(ref["name"])))
            raw = (secret.get("data") or {}).get(KUBECONFIG_KEY)
            if not raw:
                raise ValueError(f"has no key {KUBECONFIG_KEY!r}")
            doc = yaml.safe_load(base64.b64decode(raw, validate=True))
            if not isinstance(doc, dict):
                raise ValueError(f"key {KUBECONFIG_KEY!r} is not a kubeconfig (a YAML mapping)")
            api = connect_kubeconfig(doc, user_agent="kosmos-mcs")
        except Exception as e:  # the Secret, or the kubeconfig loader's own errors
            _log.warning("member %s left out: reading %s: %s: %s", name, where, type(e).__name__, e)
            continue
        _log.info("member %s discovered (%s): %s", name, where, api.host)
        out.append(Member(name, api))
    return out


def membership_change(host: Api, fixed: Sequence[str], running: Sequence[str]) -> str | None:
    """With ``--discover-members``: why the members must be read again (the host's Clusters
    with a usable kubeconfig Secret are no longer the discovered ones this process runs with:
    ``running`` minus the ``fixed`` ``--member``/``--host-member`` ones), None when they are
    the same. Members are fixed for a process's life, so a change ends it and its supervisor
    (the Deployment, the lab) starts it again with the new set."""
    now = {m.name for m in discover_members(host, fixed)}
    had = set(running) - set(fixed)
    if now == had:
        return None
    parts = [f"{label} {', '.join(sorted(names))}" for label, names in (("joined", now - had), ("left", had - now))
             if names]
    return "members changed (" + "; ".join(parts) + ")"


def connect_member(spec: MemberSpec) -> Api:
    """The member's API server from ``--member`` (module docstring); errors name the flag."""
    if spec.source.startswith(("http://", "https://")):
        api = Api(spec.source)
    else:
        try:
            with open(spec.source, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--member {spec.name}={spec.source}: cannot read the kubeconfig: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"--member {spec.name}={spec.source}: not a kubeconfig (no YAML mapping)")
        contexts = {c.get("name") for c in doc.get("contexts") or [] if isinstance(c, dict)}
        try:
            api = connect_kubeconfig(doc, spec.name if spec.name in contexts else None, user_agent="kosmos-mcs")
        except Exception as e:  # the loader's ConfigException names what is missing
            raise ValueError(f"--member {spec.name}={spec.source}: {e}") from None
    api.user_agent = "kosmos-mcs"
    return api


_FAMILY = {4: "IPv4", 6: "IPv6"}
Obj = dict[str, Any]


#: The Cluster resource (``kosmos.io/v1alpha1``, cluster-scoped, in the host cluster). Read as
#: plain objects: add-ons do not import the reflector's configuration code (``fabric.crd``); the
#: two fields read here are checked on their own, and a Cluster the reflector refuses says why in
#: its status.
CLUSTERS_PATH = "/apis/kosmos.io/v1alpha1/clusters"


def cluster_fabric(obj: Obj) -> tuple[tuple[tuple[str, str], ...], tuple[int, ...]]:
    """A Cluster object's global CIDR mapping (``spec.clusterLinkOptions.globalCIDRsMap``, as
    ``(local, global)`` pairs) and address families (its ``ipFamilies``, else those of its
    ``podCIDRs``). Raises ValueError naming the Cluster and the field."""
    name = (obj.get("metadata") or {}).get("name")
    link = ((obj.get("spec") or {}).get("clusterLinkOptions")) or {}
    where = f"Cluster {name}: spec.clusterLinkOptions"
    raw = link.get("globalCIDRsMap") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}.globalCIDRsMap is {raw!r}, not a mapping of CIDR to global CIDR")
    pairs = []
    for k, v in raw.items():
        try:
            local, glob = str(ipaddress.ip_network(k, strict=True)), str(ipaddress.ip_network(v, strict=True))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}.globalCIDRsMap[{k}]: {e}") from None
        problem = validation.mapping_problem(local, glob)
        if problem is not None:
            raise ValueError(f"{where}.globalCIDRsMap[{k}]: {problem}")
        pairs.append((local, glob))
    fams = [{"IPv4": 4, "IPv6": 6}.get(str(f), 0) for f in link.get("ipFamilies") or []]
    if not fams:
        fams = []
        for c in link.get("podCIDRs") or []:
            try:
                fams.append(ipaddress.ip_network(str(c), strict=False).version)
            except ValueError:
                continue
    return tuple(sorted(pairs)), tuple(sorted({f for f in fams if f}))


#: Whether the host's missing Cluster resource was logged already (see :func:`fabric_members`).
_NO_CLUSTERS_SAID: list[bool] = []
#: (member, families known from the reflector) already warned of having no Cluster object.
_NO_CLUSTER_OF: set[tuple[str, bool]] = set()


def fabric_members(host: Api, names: Sequence[str], status: fapi.FabricStatus | None,
                   given: dict[str, tuple[tuple[str, str], ...]] | None = None,
                   others: dict[str, tuple[tuple[str, str], ...]] | None = None) -> dict[
        str, tuple[tuple[tuple[str, str], ...], frozenset[str]]]:
    """Per member name: its global CIDR mapping (``given``, from ``--global-cidr``; else its
    ``Cluster`` object's ``globalCIDRsMap``) and the families it runs (the reflector's status;
    else the Cluster's; else IPv4). A member without either is logged and gets no mapping: its
    pod IPs are published as they are. When every member's mapping is given and the reflector
    answers, the Cluster objects are not read (a host cluster without the Cluster CRD: the lab's).

    ``others``, when given, is filled with the mappings of the Cluster objects read that are not
    members (a ClusterTree root member's leaves: its pods there have the leaf's pod IPs,
    :attr:`mcs.controller.Controller.global_cidrs`); when the Cluster objects are not read it
    stays empty."""
    given = given or {}
    clusters: dict[str, tuple[tuple[tuple[str, str], ...], tuple[int, ...]]] = {}
    items: list[Obj] = []
    if status is None or any(n not in given for n in names):
        try:
            items = host.get(CLUSTERS_PATH)["items"]
        except ApiError as e:
            if e.status != 404:
                _log.warning("reading the Cluster objects of the host cluster: %s; no global CIDRs are known but "
                             "those of --global-cidr", e)
            elif not _NO_CLUSTERS_SAID:  # no Cluster CRD (the lab's hosts): said once, not every period
                _NO_CLUSTERS_SAID.append(True)
                _log.info("the host cluster serves no Cluster objects (%s): global CIDRs only from --global-cidr", e)
    for obj in items:
        try:
            clusters[str((obj.get("metadata") or {}).get("name"))] = cluster_fabric(obj)
        except ValueError as e:
            _log.warning("%s: its members' endpoints are published without translation", e)
    by_status = {c.name: c for c in status.clusters} if status is not None else {}
    if others is not None:
        others.update({name: cidrs for name, (cidrs, _f) in clusters.items() if name not in names and cidrs})
    out = {}
    for name in names:
        cidrs, fams = clusters.get(name, ((), ()))
        if name in given:
            cidrs = given[name]
        if name in by_status:
            fams = by_status[name].ip_families
        if name not in clusters and name not in given and items:
            said = (name, name in by_status)
            _log.log(logging.DEBUG if said in _NO_CLUSTER_OF else logging.WARNING,  # once, not every period
                     "member %s has no usable Cluster object in the host cluster: no global CIDRs, families %s",
                     name, "from the reflector" if name in by_status else "IPv4")
            _NO_CLUSTER_OF.add(said)
        out[name] = (cidrs, frozenset(_FAMILY[f] for f in fams if f in _FAMILY) or frozenset({"IPv4"}))
    return out


def _status(args: argparse.Namespace, tls_dir: tls.TLSDir | None) -> fapi.FabricStatus | None:
    if not args.reflector:
        return None
    from fabric.control.client import ReflectorUnavailable, get_status_sync

    try:
        return get_status_sync(args.reflector, tls_dir=tls_dir)
    except ReflectorUnavailable as e:
        _log.warning("the reflector's status (families of the members): %s; families from the Cluster objects", e)
        return None


class RepeatFilter(logging.Filter):
    """Drops a record whose message equals one let through less than ``window_s`` ago.

    For the informers' logger (:mod:`scheduler.kube`): an informer of a member whose API server
    is gone retries every second and says so each time, six informers per member; the
    controller logs the member's failure once per streak, and this keeps the informers to one
    line per minute and error. At most ``limit`` messages are remembered (the oldest go)."""

    def __init__(self, window_s: float = 60.0, limit: int = 1000) -> None:
        super().__init__()
        self.window_s = window_s
        self.limit = limit
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now, msg = time.monotonic(), record.getMessage()
        last = self._seen.get(msg)
        if last is not None and now - last < self.window_s:
            return False
        self._seen.pop(msg, None)
        self._seen[msg] = now
        while len(self._seen) > self.limit:
            self._seen.pop(next(iter(self._seen)))
        return True


#: The collector's first threshold (Python's default: 700 allocations). A pass renders and
#: compares every import of every member (thousands of small dicts) against informer stores of
#: thousands of objects, so the default collected every few hundred objects rendered: a no-op
#: pass at 100 services x 10 members took 51 ms of CPU, 36 ms with this (``bench mcs``).
#: Nearly everything is freed by reference counting; the collector only finds the rare cycle,
#: a little later (kosmos-tree's and kubeemu's choice too).
GC_THRESHOLD0 = 10000


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])
    try:
        logs.setup(args.log_level)
    except ValueError as e:
        print(f"kosmos-mcs: --log-level: {e}", file=sys.stderr)
        return 2
    logging.getLogger("scheduler.kube").addFilter(RepeatFilter())
    problem = election.timing_problem(args.leader_elect_lease_duration, args.leader_elect_renew_deadline,
                                      args.leader_elect_retry_period) if args.leader_elect else None
    if problem:
        print(f"kosmos-mcs: leader election: {problem}", file=sys.stderr)
        return 2
    specs: list[MemberSpec] = list(args.member)
    if args.host_member:
        try:
            _cluster_name(args.host_member, "--host-member")
        except argparse.ArgumentTypeError as e:
            print(f"kosmos-mcs: {e}", file=sys.stderr)
            return 2
    names = [s.name for s in specs] + ([args.host_member] if args.host_member else [])
    if not names and not args.discover_members:
        print("kosmos-mcs: no member clusters: give --member NAME=KUBECONFIG (repeatable), --host-member NAME "
              "and/or --discover-members", file=sys.stderr)
        return 2
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        print(f"kosmos-mcs: member cluster(s) named twice: {', '.join(twice)}", file=sys.stderr)
        return 2
    listen = f"0.0.0.0:{args.metrics_port}" if args.metrics_port is not None else args.listen
    tls_dir = None
    if args.reflector:
        try:
            tls_dir = tls.from_args(args)
        except tls.TLSError as e:
            print(f"kosmos-mcs: --reflector: {e}", file=sys.stderr)
            return 2
    try:
        host_api = connect(args.master, args.kubeconfig, args.context)
        host_api.user_agent = "kosmos-mcs"
        members = [Member(s.name, connect_member(s)) for s in specs]
        if args.host_member:
            members.append(Member(args.host_member, host_api))
    except Exception as e:  # a bad kubeconfig: say so, no traceback
        print(f"kosmos-mcs: connecting: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    fixed = [m.name for m in members]  # --member and --host-member: never re-read
    if args.discover_members:
        try:
            members += discover_members(host_api, fixed)
        except Exception as e:  # no Cluster CRD, an unreachable host: say so
            print(f"kosmos-mcs: --discover-members: reading the host cluster's Cluster objects: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
            return 1
        if not members:
            # Right after install no Cluster is joined yet: wait for the first, not a crash loop.
            members = _wait_for_members(host_api, args.fabric_status_period, listen)
            if not members:
                return 0  # SIGTERM while waiting
    names = [m.name for m in members]
    strangers = sorted({name for name, _l, _g in args.global_cidr if name not in names})
    if strangers:
        print(f"kosmos-mcs: --global-cidr {', '.join(strangers)}: not a member (members: {', '.join(names)})",
              file=sys.stderr)
        return 2
    dns_for: list[tuple[str, str, int]] = []
    for name, host, port in args.dns_listen:
        if not name:
            if len(names) != 1:
                print(f"kosmos-mcs: --dns-listen {host}:{port}: which member does it answer for? Give NAME=HOST:PORT "
                      f"(members: {', '.join(names)}): each member allocates its own cluster IPs", file=sys.stderr)
                return 2
            name = names[0]
        if name not in names:
            print(f"kosmos-mcs: --dns-listen {name}=...: {name!r} is not a member (members: {', '.join(names)})",
                  file=sys.stderr)
            return 2
        dns_for.append((name, host, port))
    return _run(args, host_api, members, fixed, dns_for, listen, tls_dir)


def _wait_for_members(host_api: Api, period: float, listen: str) -> list[Member]:
    """``--discover-members`` found none and no ``--member`` was given: read the host's Clusters
    every ``period`` seconds until one has a usable kubeconfig Secret; [] on SIGTERM/SIGINT.
    Meanwhile ``/healthz`` answers (alive: no restart) and ``/readyz`` says what it waits for."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    why = "waiting for a member: no Cluster with a kubeconfig Secret in the host cluster"
    try:
        server = health.serve(listen, lambda: (True, "ok"), lambda: (False, why))
    except (OSError, ValueError) as e:
        print(f"kosmos-mcs: --listen {listen}: {e}", file=sys.stderr)
        return []
    _log.warning("--discover-members: no Cluster with a kubeconfig Secret in the host cluster yet (fabric-tool "
                 "join --tree makes one); looking again every %gs", period)
    try:
        while not done.wait(period):
            try:
                found = discover_members(host_api, [])
            except Exception as e:  # the host away for a while: keep waiting
                _log.warning("--discover-members: reading the host cluster's Cluster objects: %s: %s",
                             type(e).__name__, e)
                continue
            if found:
                return found
        return []
    finally:
        server.shutdown()
        server.server_close()


def _run(args: argparse.Namespace, host_api: Api, members: list[Member], fixed: list[str],
         dns_for: list[tuple[str, str, int]],
         listen: str, tls_dir: tls.TLSDir | None) -> int:
    metrics = McsMetrics()
    pairs: dict[str, list[tuple[str, str]]] = {}
    for name, local, glob in args.global_cidr:
        pairs.setdefault(name, []).append((local, glob))
    given = {name: tuple(sorted(v)) for name, v in pairs.items()}

    #: The global CIDRs of the fabric clusters that are not members (the controller's ``global_cidrs``).
    fabric_others: dict[str, tuple[tuple[str, str], ...]] = {}

    def configure() -> bool:
        """Read the fabric configuration into the members (and ``fabric_others``); True when it changed."""
        others: dict[str, tuple[tuple[str, str], ...]] = {}
        try:
            conf = fabric_members(host_api, [m.name for m in members], _status(args, tls_dir), given, others)
        except Exception as e:  # the host cluster unreachable: keep what is known
            _log.warning("reading the fabric configuration: %s: %s; kept the last one", type(e).__name__, e)
            return False
        changed = False
        if others != fabric_others:
            _log.info("clusters that are not members: global CIDRs %s", "; ".join(
                f"{n}: {', '.join(f'{a}->{b}' for a, b in c)}" for n, c in sorted(others.items())) or "none")
            fabric_others.clear()
            fabric_others.update(others)
            changed = True
        for m in members:
            cidrs, fams = conf[m.name]
            if (cidrs, fams) != (m.global_cidrs, m.families):
                _log.info("member %s: global CIDRs %s, families %s", m.name,
                          ", ".join(f"{a}->{b}" for a, b in cidrs) or "none", ", ".join(sorted(fams)))
                m.global_cidrs, m.families, changed = cidrs, fams, True
        return changed

    configure()

    def member_error(cluster: str, stage: str) -> None:
        metrics.member_errors.labels(cluster, stage).inc()

    def passed(seconds: float) -> None:
        metrics.passes.inc()
        metrics.pass_seconds.observe(seconds)

    reach: Reachability | None = None
    ctl = Controller(members, global_cidrs=fabric_others, resync_s=args.resync_period, retry_s=args.retry_period,
                     startup_wait_s=args.startup_wait, auto_export_prefixes=args.auto_export_namespace_prefix,
                     auto_export_annotation=args.auto_create_annotation, on_member_error=member_error,
                     on_pass=passed)
    if args.reflector:
        def reach_changed() -> None:
            metrics.reachability_changes.inc()
            ctl.kick()

        reach = Reachability(args.reflector, tls_dir=tls_dir, on_change=reach_changed,
                             on_bad_record=metrics.bad_records.inc)
        r = reach
        ctl.unreachable = lambda importer: r.unreachable(importer)
    ctl.watch()
    responders: list[Responder] = []
    try:
        by_name = {m.name: m for m in members}
        for name, host, port in dns_for:
            m = by_name[name]
            responders.append(Responder(name, host, port, TableCache(m),
                                        count=lambda c, rc: metrics.dns_queries.labels(c, str(rc)).inc()).start())
    except OSError as e:
        print(f"kosmos-mcs: --dns-listen: {e}", file=sys.stderr)
        for rs in responders:
            rs.stop()
        ctl.stop()
        return 1

    elector: election.LeaderElector | None = None

    def healthy() -> tuple[bool, str]:
        if ctl.crashed.is_set():
            return False, f"controller ended: {ctl.error!r}"
        return True, "ok"

    def ready() -> tuple[bool, str]:
        silent = [m.name for m in members if not m.synced()]
        return (not silent, f"waiting for {', '.join(silent)}" if silent else "ok")

    try:
        server = health.serve(listen, healthy, ready, registry=metrics.registry)
    except (OSError, ValueError) as e:
        print(f"kosmos-mcs: --listen {listen}: {e}", file=sys.stderr)
        for rs in responders:
            rs.stop()
        ctl.stop()
        return 1
    h, p = server.server_address[:2]
    _log.info("/metrics and /healthz on http://%s:%s", h, p)
    if reach is not None:
        reach.start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    lost = threading.Event()
    if args.leader_elect:
        identity = args.identity or f"{os.uname().nodename}_{os.getpid()}"
        elector = election.LeaderElector(
            host_api, identity, namespace=args.leader_elect_resource_namespace,
            name=args.leader_elect_resource_name, lease_duration=args.leader_elect_lease_duration,
            renew_deadline=args.leader_elect_renew_deadline, retry_period=args.leader_elect_retry_period,
            on_started=ctl.start, on_stopped=lost.set)
        elector.start()
        _log.info("kosmos-mcs %s: members %s; waiting for the Lease %s/%s", identity,
                  ", ".join(m.name for m in members), args.leader_elect_resource_namespace,
                  args.leader_elect_resource_name)
    else:
        ctl.start()
        _log.info("kosmos-mcs: members %s, leader election off", ", ".join(m.name for m in members))
    code = 0
    next_conf = args.fabric_status_period
    waited = 0.0
    while not done.wait(0.5):
        waited += 0.5
        if ctl.crashed.is_set():
            code = 1
            break
        if lost.is_set():
            _log.error("leaderelection lost")
            code = 1
            break
        _observe(metrics, ctl, members, reach)
        if waited >= next_conf:
            waited = 0.0
            if args.discover_members:
                try:
                    why = membership_change(host_api, fixed, [m.name for m in members])
                except Exception as e:  # the host away for a while: keep the members
                    _log.warning("--discover-members: reading the host cluster's Cluster objects: %s: %s",
                                 type(e).__name__, e)
                    why = None
                if why is not None:
                    _log.warning("%s: exiting for the supervisor to start kosmos-mcs with them", why)
                    break
            if configure():
                ctl.global_cidrs = dict(fabric_others)  # replaced whole: a pass reads it on another thread
                ctl.kick()
    if reach is not None:
        reach.stop()
    ctl.stop()
    if elector is not None:
        elector.stop(release=code == 0)
    for rs in responders:
        rs.stop()
    server.shutdown()
    return code


def _observe(metrics: McsMetrics, ctl: Controller, members: Sequence[Member], reach: Reachability | None) -> None:
    failing = ctl.failing()
    for m in members:
        metrics.member_synced.labels(m.name).set(1 if m.synced() else 0)
        metrics.member_failing.labels(m.name).set(1 if m.name in failing else 0)
        if m.informers:
            metrics.imports.labels(m.name).set(sum(1 for o in m.informers["ServiceImport"].store.values()
                                                   if mk.owned(o)))
            metrics.exports.labels(m.name).set(len(m.informers["ServiceExport"].store))
    if reach is not None:
        metrics.unreachable_pairs.set(sum(len(v) for v in reach.map.values()))


if __name__ == "__main__":
    sys.exit(main())
