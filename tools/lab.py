"""The one-machine lab: whole clusters built from network namespaces, driven by a topology file.

What ``lab up`` builds (``NAME`` defaults to ``kf``; nothing is created in the root namespace)::

    NAME-ul                      the lab namespace: bridge br-ul with the underlay gateway (.1),
      br-ul  198.18.0.1/16       fabric-reflector listens on .1:4880 here
      ul<hash> --- veth ---+
                           |
    NAME-<cluster>-<node>  eth0 198.18.0.11/16 (default via .1), ip_forward=1, fabric-agent
      veth-p0 (proxy_arp)  route 10.10.1.2/32 dev veth-p0     <- Calico-style pod plumbing
      route <podCIDR of every other node of the SAME cluster> via <its underlay IP>  (host-gw)
                           |
    NAME-<cluster>-<node>-p0  eth0 10.10.1.2/32
                              169.254.1.1 dev eth0 scope link; default via 169.254.1.1

The lab plays each cluster's own CNI (pod veths, host-gw routes inside a cluster); every route
*between* clusters is the fabric's job. It also plays each cluster's kube-proxy for one lab
service per cluster: the service IP (host 10 of the cluster's first service CIDR) is DNATed to
the cluster's first pod by an nftables table ``kflab`` in *every node namespace of that cluster*
- where kube-proxy's rules live - and, as kube-proxy does for traffic from outside the cluster,
masqueraded, so the reply returns through the node that translated it even when the backend's
node would route it back directly (P2P clusters). ``lab fail NODE`` / ``lab heal NODE`` set the
node's underlay veth end in the lab namespace down / up: the node is cut off from every other
node and from the reflector, exactly like a dead machine, and comes back as it was.

Pods answer their default gateway through proxy ARP on the node-side veth, which needs the node
to have *some* route to 169.254.1.1 out of another device: the node's default route towards the
lab gateway provides it (the lab namespace does not forward, so that route never carries pod
traffic anywhere).

Order of ``up`` (each step recorded in ``/run/kosmos-fabric/lab/NAME/state.json`` before the
next, written atomically, so a crash leaves an accurate record for ``down``):

1. load and validate the topology file (nothing is created if it is invalid);
2. plan names (namespaces, interface names) and refuse collisions or changes to what runs;
3. create namespaces, the underlay bridge, then each node, then its pods (``ip -batch`` per
   namespace; sysctls written from a thread that entered the namespace);
4. start the reflector, wait until its status socket answers, start one agent per node;
5. poll the reflector status until every node reports its planned version applied.

``up`` on a running lab adds only what is missing (new nodes, pods, stopped processes) and
touches nothing that runs. ``down`` needs no state at all: it finds the lab's namespaces under
/run/netns by name and its processes by namespace inode.

``kubernetes: true`` in the topology adds, per cluster, an emulated API server (kubeemu) on
127.0.0.1 and a lab kubelet that runs the Pods bound to the cluster's nodes as lab pods
(:func:`add_pod`, namespaces ``NAME-<cluster>-<node>-k<hash>``, IPs from the node's pod CIDR
other than the static pods'), plus ``kubeconfig`` in the state directory with one context per
cluster. Those two processes live in the root namespace (kubectl must reach the servers), so
``down`` finds them by the PID and start time recorded in the state file, not by namespace.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import importlib
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from fabric import netns as namespaces
from fabric import topology, types
from fabric.control import api
from kubeemu import lab as kubeemu_lab
from tools import nsutil

_log = logging.getLogger(__name__)

LAB_ROOT = Path("/run/kosmos-fabric/lab")
BPF_ROOT = Path("/sys/fs/bpf/kosmos-fabric")
DEFAULT_NAME = "kf"
DEFAULT_TOPOLOGY = Path(__file__).resolve().parent.parent / "examples" / "lab.yaml"
DEFAULT_UP_TIMEOUT_S = 60.0
UL_BRIDGE = "br-ul"
POD_GATEWAY = "169.254.1.1"
#: Host number of the lab service IP in a cluster's first service CIDR.
SERVICE_HOST = 10
#: nftables table the lab's kube-proxy stand-in owns in each node namespace.
NFT_TABLE = "kflab"
STATE_VERSION = 1
#: Lab names become namespace prefixes ``NAME-``. No '-' allowed, so no lab's prefix can be a
#: prefix of another lab's namespaces (``kf-`` vs ``kf-x-``), which makes scanning safe.
_LAB_NAME = re.compile(r"^[a-z0-9]{1,12}$")
_IFNAMSIZ = 15

Progress = Callable[[str], None]


class LabError(Exception):
    """The lab could not do what was asked (exit status 1)."""

    exit_code = 1


class LabUsageError(LabError):
    """Bad input: an invalid name, file, or a change ``up`` refuses to make (exit status 2)."""

    exit_code = 2


class StateError(LabError):
    """The state file exists but cannot be used."""


def _stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    _log.debug("%s", msg)


# -- the state file --------------------------------------------------------------------------


@dataclasses.dataclass
class ProcRecord:
    """A process the lab started. ``start`` is /proc/PID/stat field 22, to detect PID reuse."""

    pid: int
    start: int | None
    netns: str
    log: str
    argv: list[str]

    def running(self) -> bool:
        return nsutil.same_process(self.pid, self.start)


@dataclasses.dataclass
class PodRecord:
    name: str  # p0, p1, ...
    netns: str
    ip: str  # IPv4 address; "" in a cluster that does not run IPv4
    host_if: str  # node-side veth
    #: Dual stack: the pod's IPv6 address ("" in a cluster that does not run IPv6).
    ip6: str = ""

    def ips(self) -> tuple[str, ...]:
        return tuple(ip for ip in (self.ip, self.ip6) if ip)


@dataclasses.dataclass
class NodeRecord:
    cluster: str
    name: str
    netns: str
    underlay_ip: str
    pod_cidr: str
    ul_if: str  # peer of eth0 inside the lab namespace, attached to br-ul
    pods: list[PodRecord]
    built: bool = False
    agent: ProcRecord | None = None
    #: Cut off the underlay by ``lab fail`` (until ``lab heal``).
    failed: bool = False
    #: Dual stack: IPv6 underlay address and pod CIDR ("" when the cluster does not run IPv6;
    #: ``pod_cidr`` is "" when it does not run IPv4, ``underlay_ip`` is always IPv4).
    underlay_ip6: str = ""
    pod_cidr6: str = ""

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.name}"

    @property
    def pod_cidrs(self) -> tuple[str, ...]:
        return tuple(c for c in (self.pod_cidr, self.pod_cidr6) if c)


@dataclasses.dataclass
class ClusterRecord:
    name: str
    mode: str
    pod_cidrs: list[str]
    service_cidrs: list[str]
    nodes: list[NodeRecord]
    gateways: list[str] = dataclasses.field(default_factory=list)
    #: The lab service: an IP of the first service CIDR, DNATed to ``service_backend`` (a pod IP).
    service_ip: str | None = None
    service_backend: str | None = None
    #: Global IP: local CIDR -> global CIDR (the topology's ``globalCIDRs``).
    global_cidrs: dict[str, str] = dataclasses.field(default_factory=dict)
    #: ``kubernetes: true``: the cluster's emulated API server (kubeemu, root namespace,
    #: 127.0.0.1) with its URL, and the lab kubelet (tools/kubelet_lab.py) serving its nodes.
    api_url: str | None = None
    apiserver: ProcRecord | None = None
    kubelet: ProcRecord | None = None
    #: The address families the cluster runs, primary first (4, 6).
    ip_families: list[int] = dataclasses.field(default_factory=lambda: [4])
    #: The IPv6 lab service (host 10 of the first IPv6 service CIDR), DNATed to a pod's IPv6.
    service_ip6: str | None = None
    service_backend6: str | None = None

    def global_ip(self, ip: str | None) -> str | None:
        """How the other clusters reach ``ip`` of this cluster (None: by ``ip`` itself)."""
        if ip is None or not self.global_cidrs:
            return None
        return types.to_global(ip, sorted(self.global_cidrs.items()))


@dataclasses.dataclass
class LabState:
    name: str
    topology_source: str
    underlay: str
    gateway: str
    ul_netns: str
    clusters: list[ClusterRecord]
    grace_period_s: float | None = None
    resync_period_s: float | None = None
    ul_built: bool = False
    reflector: ProcRecord | None = None
    version: int = STATE_VERSION
    #: The topology's ``kubernetes``: one API server and lab kubelet per cluster.
    kubernetes: bool = False
    #: The IPv6 underlay and the lab's address on it ("" when no cluster runs IPv6).
    underlay6: str = ""
    gateway6: str = ""
    #: Arguments the lab's reflector runs with instead of its own file-configured ones (set by
    #: ``fabric-tool install``: Cluster resources as the topology source); None: the lab's own.
    reflector_args: list[str] | None = None

    @property
    def state_dir(self) -> Path:
        return state_dir(self.name)

    @property
    def topology_copy(self) -> Path:
        return self.state_dir / "topology.yaml"

    @property
    def kubeconfig(self) -> Path:
        """One context per cluster, written by ``up`` when the lab runs Kubernetes."""
        return self.state_dir / "kubeconfig"

    @property
    def reflector_socket(self) -> Path:
        return self.state_dir / "reflector.sock"

    @property
    def reflector_address(self) -> str:
        return f"{self.gateway}:{api.DEFAULT_REFLECTOR_PORT}"

    def nodes(self) -> Iterator[NodeRecord]:
        for c in self.clusters:
            yield from c.nodes

    def node(self, key: str) -> NodeRecord | None:
        return next((n for n in self.nodes() if n.key == key), None)

    def namespaces(self) -> list[str]:
        """Every namespace of the lab, pods first (the order ``down`` deletes them in)."""
        pods = [p.netns for n in self.nodes() for p in n.pods]
        return [*pods, *(n.netns for n in self.nodes()), self.ul_netns]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> LabState:
        """Rebuild a state from its JSON form; raises :class:`StateError` naming what is wrong."""
        try:
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"state version {doc.get('version')!r}, expected {STATE_VERSION}")

            def proc(d: Any) -> ProcRecord | None:
                return None if d is None else ProcRecord(**d)

            clusters = []
            for c in doc["clusters"]:
                nodes = []
                for n in c["nodes"]:
                    pods = [PodRecord(**p) for p in n["pods"]]
                    fields = {k: v for k, v in n.items() if k not in ("pods", "agent")}
                    nodes.append(NodeRecord(**fields, pods=pods, agent=proc(n.get("agent"))))
                fields = {k: v for k, v in c.items() if k not in ("nodes", "apiserver", "kubelet")}
                clusters.append(ClusterRecord(**fields, nodes=nodes, apiserver=proc(c.get("apiserver")),
                                              kubelet=proc(c.get("kubelet"))))
            fields = {k: v for k, v in doc.items() if k not in ("clusters", "reflector")}
            return cls(**fields, clusters=clusters, reflector=proc(doc.get("reflector")))
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"malformed lab state: {type(e).__name__}: {e}") from e


def check_lab_name(name: str) -> str:
    if not _LAB_NAME.match(name):
        raise LabUsageError(
            f"invalid lab name {name!r}: use 1-12 lower-case letters and digits (no '-', it separates name parts)"
        )
    return name


def state_dir(name: str) -> Path:
    return LAB_ROOT / name


def state_file(name: str) -> Path:
    return state_dir(name) / "state.json"


def load_state(name: str) -> LabState | None:
    """The recorded state of lab ``name``, None if there is none; :class:`StateError` if corrupt."""
    path = state_file(name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise StateError(f"{path}: not valid JSON ({e})") from e
    try:
        return LabState.from_json(doc)
    except StateError as e:
        raise StateError(f"{path}: {e}") from e


def save_state(state: LabState) -> None:
    """Write the state atomically (temp file + rename): a crash never leaves half a file."""
    d = state.state_dir
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, d / "state.json")


def _lock_path(name: str) -> Path:
    return LAB_ROOT / f".{name}.lock"


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialize lab operations on one lab (two concurrent ``up`` would race on namespaces)."""
    LAB_ROOT.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(name), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _stderr_progress(f"lab {name}: another fabric-tool is working on this lab; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


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
                )
            )
        service_ip, backend = _lab_service(lc.config.service_cidrs, [p.ip for n in nodes for p in n.pods], 4)
        service_ip6, backend6 = _lab_service(lc.config.service_cidrs, [p.ip6 for n in nodes for p in n.pods], 6)
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
            )
        )
    if problems:
        raise LabUsageError(f"{topo.source}: cannot build this lab: " + "; ".join(problems))
    for n in (n for c in clusters for n in c.nodes):
        assert all(len(x) <= _IFNAMSIZ for x in (n.ul_if, *(p.host_if for p in n.pods)))
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
    """The lab service of one family: host SERVICE_HOST of the cluster's first service CIDR of
    that family, backed by the first pod with an address of it (None, None: no such service)."""
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
        for attr in ("mode", "pod_cidrs", "service_cidrs", "gateways"):
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
        merged.append(dataclasses.replace(cc, nodes=nodes))
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


# -- kernel plumbing -------------------------------------------------------------------------


def _ip_batch(netns: str | None, cmds: Sequence[str], what: str) -> None:
    """Run ``ip [-n NETNS] -batch -`` (one process for many commands; stops at the first error)."""
    if not cmds:
        return
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    res = subprocess.run(argv, input="\n".join(cmds) + "\n", capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise LabError(f"{what}: {' '.join(argv)} failed: {res.stderr.strip() or res.stdout.strip()}")


def _write_sysctls(netns: str, values: dict[str, str]) -> None:
    """Write /proc/sys entries as seen from inside ``netns``.

    /proc/sys/net resolves against the network namespace of the task that opens it, so a
    short-lived thread enters the namespace (``setns`` affects only the calling thread), writes,
    and exits. That avoids one ``ip netns exec sysctl`` process per value.
    """
    errors: list[str] = []

    def run() -> None:
        for key, value in values.items():
            path = "/proc/sys/" + key.replace(".", "/")
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError as e:
                errors.append(f"{key}={value}: {e.strerror}")

    try:
        namespaces.run_in(netns, run)
    except OSError as e:
        raise LabError(f"sysctl in {netns}: {e}") from e
    if errors:
        raise LabError(f"sysctl in {netns}: {'; '.join(errors)}")


def _build_underlay(state: LabState) -> None:
    prefix = state.underlay.split("/")[1]
    _ip_batch(None, [f"netns add {state.ul_netns}"], "create the lab namespace")
    _ip_batch(
        state.ul_netns,
        [
            "link set lo up",
            f"link add {UL_BRIDGE} type bridge",
            f"addr add {state.gateway}/{prefix} dev {UL_BRIDGE}",
            f"link set {UL_BRIDGE} up",
        ],
        f"underlay bridge in {state.ul_netns}",
    )
    if state.underlay6:
        # IPv6 underlay on the same bridge: the lab's own ::1 (no DAD: usable at once).
        _write_sysctls(state.ul_netns, _IPV6_SYSCTLS)
        _ip_batch(
            state.ul_netns,
            [f"addr add {state.gateway6}/{_prefixlen(state.underlay6)} dev {UL_BRIDGE} nodad"],
            f"IPv6 underlay address in {state.ul_netns}",
        )


def _build_node(state: LabState, cluster: ClusterRecord, node: NodeRecord) -> None:
    """Create one node namespace, its underlay link, its pods and its intra-cluster routes."""
    prefix = state.underlay.split("/")[1]
    _ip_batch(None, [f"netns add {node.netns}"], f"namespace of node {node.key}")
    if node.underlay_ip6:
        # Before any link exists in the namespace: links take the namespace's defaults when created.
        _write_sysctls(node.netns, {**_IPV6_SYSCTLS, "net.ipv6.conf.all.forwarding": "1"})
    # The veth is created inside the lab namespace with its peer placed straight into the node
    # namespace: neither end ever exists in the root namespace.
    _ip_batch(
        state.ul_netns,
        [
            f"link add {node.ul_if} type veth peer name eth0 netns {node.netns}",
            f"link set {node.ul_if} master {UL_BRIDGE}",
            f"link set {node.ul_if} up",
        ],
        f"underlay link of node {node.key}",
    )
    _write_sysctls(
        node.netns,
        {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        },
    )
    cmds = [
        "link set lo up",
        f"addr add {node.underlay_ip}/{prefix} dev eth0",
        *([f"addr add {node.underlay_ip6}/{_prefixlen(state.underlay6)} dev eth0 nodad"] if node.underlay_ip6 else []),
        "link set eth0 up",
        f"route replace default via {state.gateway} dev eth0",
    ]
    cmds += [cmd for peer in cluster.nodes if peer.name != node.name and peer.built for cmd in _host_gw(peer)]
    _ip_batch(node.netns, cmds, f"node {node.key}")
    for pod in node.pods:
        add_pod(node, pod)
    _install_service(cluster, node)
    # Play the cluster's CNI for the others: they learn the new node's pod CIDR (host-gw).
    for peer in cluster.nodes:
        if peer.name != node.name and peer.built:
            _ip_batch(peer.netns, _host_gw(node), f"host-gw route to {node.key} on {peer.key}")


#: IPv6 in lab namespaces: on, and no duplicate address detection (a DAD-tentative address is
#: unusable for a second or more; every lab address is unique by construction).
_IPV6_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "0",
    "net.ipv6.conf.default.disable_ipv6": "0",
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}
#: The pods' IPv6 default gateway: a static link-local address on the node side of every pod
#: veth (Calico's fe80::1 idea without proxy NDP: the node simply owns the address, so it answers
#: neighbour solicitations for it, and a link-local address may repeat on every veth).
POD_GATEWAY6 = "fe80::1"


def _prefixlen(cidr: str) -> str:
    return cidr.split("/")[1]


def _host_gw(node: NodeRecord) -> list[str]:
    """The cluster CNI's host-gw routes to ``node``'s pod CIDRs, one per family (for its peers)."""
    out = []
    if node.pod_cidr:
        out.append(f"route replace {node.pod_cidr} via {node.underlay_ip} dev eth0")
    if node.pod_cidr6 and node.underlay_ip6:
        out.append(f"route replace {node.pod_cidr6} via {node.underlay_ip6} dev eth0")
    return out


def _link_exists(netns: str, ifname: str) -> bool:
    res = subprocess.run(["ip", "-n", netns, "link", "show", "dev", ifname], capture_output=True, check=False)
    return res.returncode == 0


def add_pod(node: NodeRecord, pod: PodRecord) -> None:
    """Give ``pod`` its namespace on ``node``, Calico style; idempotent.

    The one way the lab makes a pod: its static pods (``_build_node``) and the pods the lab
    kubelet runs for the emulated API server (``tools/kubelet_lab.py``) both come here. Order:
    the pod namespace, a veth created in the node namespace with its peer moved straight into
    the pod (as ``eth0``; no end ever exists in the root namespace), the node's /32 route and
    proxy ARP on its end, then the pod's address and its default route via the link-local
    gateway. Calling it again for a pod that exists re-applies addresses and routes (the pod
    keeps only ``pod.ip``); a pod namespace without its node-side veth is rebuilt.
    """
    if not namespaces.exists(node.netns):
        raise LabError(f"pod {node.key}/{pod.name}: node namespace {node.netns} does not exist")
    if not (namespaces.exists(pod.netns) and _link_exists(node.netns, pod.host_if)):
        _delete_netns([pod.netns])
        _ip_batch(None, [f"netns add {pod.netns}"], f"namespace of pod {node.key}/{pod.name}")
        if pod.ip6:
            _write_sysctls(pod.netns, _IPV6_SYSCTLS)
        _ip_batch(
            node.netns,
            [f"link add {pod.host_if} type veth peer name eth0 netns {pod.netns}"],
            f"veth of pod {node.key}/{pod.name}",
        )
    node_cmds = [f"link set {pod.host_if} up"]
    if pod.ip:
        node_cmds.append(f"route replace {pod.ip}/32 dev {pod.host_if}")
    if pod.ip6:
        node_cmds += [
            f"addr replace {POD_GATEWAY6}/64 dev {pod.host_if} nodad",
            f"route replace {pod.ip6}/128 dev {pod.host_if}",
        ]
    _ip_batch(node.netns, node_cmds, f"route to pod {node.key}/{pod.name}")
    if pod.ip:
        # proxy_delay 0: by default the kernel delays proxy-ARP answers by up to 0.8 s at
        # random, which turns a pod's first packet into a timeout (Calico sets it to 0 too).
        _write_sysctls(node.netns, {f"net.ipv4.conf.{pod.host_if}.proxy_arp": "1",
                                    f"net.ipv4.neigh.{pod.host_if}.proxy_delay": "0"})
    pod_cmds = ["link set lo up", "addr flush dev eth0 scope global"]
    if pod.ip:
        pod_cmds.append(f"addr add {pod.ip}/32 dev eth0")
    if pod.ip6:
        pod_cmds.append(f"addr add {pod.ip6}/128 dev eth0 nodad")
    pod_cmds.append("link set eth0 up")
    if pod.ip:
        pod_cmds += [
            f"route replace {POD_GATEWAY} dev eth0 scope link",
            f"route replace default via {POD_GATEWAY} dev eth0",
        ]
    if pod.ip6:
        pod_cmds.append(f"route replace ::/0 via {POD_GATEWAY6} dev eth0")
    _ip_batch(pod.netns, pod_cmds, f"pod {node.key}/{pod.name}")


def remove_pod(node: NodeRecord, pod: PodRecord) -> bool:
    """Delete ``pod``'s namespace (its veth pair and the node's /32 route through it go with it);
    idempotent, returns whether there was anything to delete."""
    return bool(_delete_netns([pod.netns]))


#: Kubelet pod namespaces: ``<node netns>-k<10 hex>`` (static pods are ``-p<N>``).
_KUBE_POD_SUFFIX = re.compile(r"-k[0-9a-f]{10}$")


def kube_pod(node: NodeRecord, pod_key: str, ip: str) -> PodRecord:
    """The record of a pod the lab kubelet runs for Kubernetes pod ``pod_key`` (namespace/name).

    Names derive from a hash of the key (Kubernetes names are too long for interface names),
    so the kubelet needs no state of its own to find the namespace again for ``remove_pod``.
    """
    h = hashlib.sha256(pod_key.encode()).hexdigest()[:10]
    return PodRecord(name=pod_key, netns=f"{node.netns}-k{h}", ip=ip, host_if=f"vk{h}")


def kube_pod_namespaces(cluster: ClusterRecord) -> list[str]:
    """Namespaces of kubelet pods that exist on the nodes of ``cluster``."""
    prefixes = tuple(f"{n.netns}-k" for n in cluster.nodes)
    return [ns for ns in namespaces.list_all() if ns.startswith(prefixes) and _KUBE_POD_SUFFIX.search(ns)]


def service_ruleset(service_ip: str, backend: str) -> str:
    """The kube-proxy stand-in of one node: DNAT the lab service to its backend pod (for
    forwarded and locally generated traffic) and masquerade what was translated, as kube-proxy
    does for clients outside the cluster, so replies come back through this node."""
    # IPv6 services get their own table (family ip6, nftables' name for it; ``kflab6``).
    fam, table = ("ip6", f"{NFT_TABLE}6") if ":" in service_ip else ("ip", NFT_TABLE)
    dnat = f"{fam} daddr {service_ip} dnat to {backend};"
    return (
        f"table {fam} {table} {{\n"
        f"  chain prerouting {{ type nat hook prerouting priority dstnat; {dnat} }}\n"
        f"  chain output {{ type nat hook output priority -100; {dnat} }}\n"
        f"  chain postrouting {{ type nat hook postrouting priority srcnat; "
        f"ct status dnat ct original {fam} daddr {service_ip} masquerade; }}\n"
        f"}}\n"
    )


def _install_service(cluster: ClusterRecord, node: NodeRecord) -> None:
    services = ((cluster.service_ip, cluster.service_backend), (cluster.service_ip6, cluster.service_backend6))
    rules = "".join(service_ruleset(ip, b) for ip, b in services if ip is not None and b is not None)
    if not rules:
        return
    res = subprocess.run(
        ["ip", "netns", "exec", node.netns, "nft", "-f", "-"], input=rules, capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise LabError(
            f"lab service of cluster {cluster.name} on node {node.key}: nft failed: {res.stderr.strip()} "
            "(is the nftables package installed?)"
        )


def set_failed(name: str, spec: str, failed: bool, progress: Progress = _stderr_progress) -> NodeRecord:
    """``lab fail`` / ``lab heal``: set the node's underlay veth end in the lab namespace down or
    up. The node loses (regains) every other node and the reflector at once; nothing inside the
    node changes, as when a machine drops off the network."""
    _require_root()
    with locked(name):
        state = _require_state(name)
        node = _find_node(state, spec)
        _ip_batch(state.ul_netns, [f"link set {node.ul_if} {'down' if failed else 'up'}"],
                  f"{'cut' if failed else 'reconnect'} node {node.key}")  # fmt: skip
        node.failed = failed
        save_state(state)
        progress(f"lab {name}: node {node.key} {'cut off the underlay' if failed else 'back on the underlay'}")
        return node


def _delete_netns(names: Sequence[str]) -> list[str]:
    """Delete the named namespaces that exist; returns those deleted (veths die with them)."""
    gone = []
    for ns in names:
        if namespaces.exists(ns):
            res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise LabError(f"ip netns del {ns} failed: {res.stderr.strip()}")
            gone.append(ns)
    return gone


def build(state: LabState, progress: Progress = _quiet) -> LabState:
    """Create every namespace and link of ``state`` that is not built yet (recording progress).

    A node recorded as not built (a crash mid-way) is wiped and rebuilt from scratch.
    """
    if not state.ul_built or not namespaces.exists(state.ul_netns):
        _delete_netns([state.ul_netns])
        progress(f"lab {state.name}: creating the lab namespace {state.ul_netns} (underlay {state.underlay})")
        _build_underlay(state)
        state.ul_built = True
        save_state(state)
    for cluster in state.clusters:
        for node in cluster.nodes:
            if node.built and namespaces.exists(node.netns):
                continue
            _delete_netns([*(p.netns for p in node.pods), node.netns])
            progress(f"lab {state.name}: building node {node.key} ({node.underlay_ip}, {len(node.pods)} pods)")
            _build_node(state, cluster, node)
            node.built = True
            save_state(state)
    return state


# -- processes -------------------------------------------------------------------------------


def _venv_bin(program: str) -> Path:
    """Console scripts live next to the interpreter running us (the venv's bin), not on PATH."""
    path = Path(sys.executable).parent / program
    if not path.exists():
        raise LabError(f"{program} not found at {path}: is the project installed in this virtualenv (./dev.sh setup)?")
    return path


#: ``ProcRecord.netns`` of the processes that run in the root namespace (the Kubernetes API
#: servers listen on 127.0.0.1 for kubectl, and their kubelets talk to them there).
ROOT_NETNS = ""


def _start(netns: str, argv: list[str], log_path: Path) -> ProcRecord:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        where = netns or "the root namespace"
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting in {where}: {' '.join(argv)}\n".encode())
        log.flush()
        if netns == ROOT_NETNS:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)  # fmt: skip
        else:
            proc = nsutil.spawn_in_netns(netns, argv, stdout=log, stderr=subprocess.STDOUT)
    # The Popen object is dropped on purpose: the process outlives us. subprocess reaps it if it
    # exits while we still run; afterwards init does.
    return ProcRecord(pid=proc.pid, start=nsutil.start_time(proc.pid), netns=netns, log=str(log_path), argv=argv)


def _log_tail(path: str, lines: int = 8) -> str:
    try:
        tail = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n    " + "\n    ".join(tail) if tail else ""


def start_reflector(state: LabState) -> ProcRecord:
    """Start the lab's reflector: on the lab's own topology file, or with ``state.reflector_args``
    when something (``fabric-tool install``) gave it others. The listen addresses, metrics port
    and log level are the lab's either way, so agents and tools always find it."""
    sock = state.reflector_socket
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    source = (
        ["--config", str(state.topology_copy)] if state.reflector_args is None else list(state.reflector_args)
    )
    argv = [
        str(_venv_bin("fabric-reflector")),
        *source,
        "--listen", state.reflector_address,
        "--listen", f"unix:{sock}",
        "--grace-period", _num(state.grace_period_s if state.grace_period_s is not None else 30.0),
        "--metrics-listen", f"{state.gateway}:{api.DEFAULT_REFLECTOR_METRICS_PORT}",
        "--log-level", "info",
    ]  # fmt: skip
    rec = _start(state.ul_netns, argv, state.state_dir / "logs" / "reflector.log")
    state.reflector = rec
    save_state(state)
    return rec


def start_agent(state: LabState, node: NodeRecord) -> ProcRecord:
    argv = [
        str(_venv_bin("fabric-agent")),
        "--reflector", state.reflector_address,
        "--cluster", node.cluster,
        "--node", node.name,
        "--underlay-ip", node.underlay_ip,
        *(a for c in node.pod_cidrs for a in ("--pod-cidr", c)),
        *(("--underlay-ip6", node.underlay_ip6) if node.underlay_ip6 else ()),
        "--metrics-listen", f"0.0.0.0:{api.DEFAULT_AGENT_METRICS_PORT}",
        "--bpf-pin-root", str(bpf_dir(state.name)),
        "--log-level", "info",
    ]  # fmt: skip
    if state.resync_period_s is not None:
        argv[-2:-2] = ["--resync-period", _num(state.resync_period_s)]
    rec = _start(node.netns, argv, state.state_dir / "logs" / f"agent-{node.cluster}-{node.name}.log")
    node.agent = rec
    save_state(state)
    return rec


# -- Kubernetes (``kubernetes: true``) -------------------------------------------------------
#
# Per cluster, in this order: the emulated API server (``python -m kubeemu`` on 127.0.0.1, an
# ephemeral port; root namespace so kubectl reaches it), then the lab kubelet
# (``python -m tools.kubelet_lab``, root namespace: it runs ``ip`` on the lab's named namespaces
# and talks to its API server), then the kubeconfig (one context per cluster). Both processes are
# recorded (PID + start time) in the state file as soon as they exist; ``down`` stops them from
# there, since a scan of the lab's namespaces cannot find processes of the root namespace.


def start_apiserver(state: LabState, cluster: ClusterRecord) -> ProcRecord:
    """Start ``cluster``'s API server and wait until it answers; records it before waiting."""
    log_path = state.state_dir / "logs" / f"apiserver-{cluster.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def record(pid: int) -> None:
        cluster.apiserver = ProcRecord(pid=pid, start=nsutil.start_time(pid), netns=ROOT_NETNS,
                                       log=str(log_path), argv=[])  # fmt: skip
        cluster.api_url = None
        save_state(state)

    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting the API server of {cluster.name}\n".encode())
        log.flush()
        try:
            handle = kubeemu_lab.start_cluster(
                cluster.name, cluster.pod_cidrs, cluster.service_cidrs, [n.name for n in cluster.nodes],
                log=log, graceful_pods=True, on_spawn=record,
            )  # fmt: skip
        except (RuntimeError, OSError) as e:
            raise LabError(
                f"the API server of cluster {cluster.name} did not start: {e}{_log_tail(str(log_path))}"
            ) from e
    assert cluster.apiserver is not None
    cluster.apiserver.argv = list(handle.argv)
    cluster.api_url = handle.url
    save_state(state)
    return cluster.apiserver


def start_kubelet(state: LabState, cluster: ClusterRecord) -> ProcRecord:
    """Start the lab kubelet of ``cluster`` (it reads the nodes from the state file, saved first)."""
    assert cluster.api_url is not None
    argv = [sys.executable, "-m", "tools.kubelet_lab", "--state", str(state_file(state.name)),
            "--cluster", cluster.name, "--url", cluster.api_url]  # fmt: skip
    rec = _start(ROOT_NETNS, argv, state.state_dir / "logs" / f"kubelet-{cluster.name}.log")
    cluster.kubelet = rec
    save_state(state)
    return rec


def start_kubernetes(state: LabState, added: Sequence[str], progress: Progress = _quiet) -> None:
    """Start what is not running: API servers, then kubelets; write the kubeconfig.

    A new API server starts empty, so the kubelet pods of its cluster that an earlier server
    left (after a crash) are removed and the kubelet is restarted against the new URL. A kubelet
    is also restarted when nodes were ``added`` to its cluster (it registers them at start).
    """
    for c in state.clusters:
        if c.apiserver is None or not c.apiserver.running() or c.api_url is None:
            stale = [r for r in (c.apiserver, c.kubelet) if r is not None and r.running()]
            if stale:
                nsutil.terminate([(r.pid, r.start) for r in stale])
            c.apiserver = c.kubelet = None
            leftovers = _delete_netns(kube_pod_namespaces(c))
            if leftovers:
                progress(f"lab {state.name}: removed {len(leftovers)} pod namespaces of an old API server of {c.name}")
            api_rec = start_apiserver(state, c)
            progress(f"lab {state.name}: API server of {c.name} at {c.api_url} (pid {api_rec.pid}, log {api_rec.log})")
        grown = any(k.startswith(f"{c.name}/") for k in added)
        if c.kubelet is not None and c.kubelet.running() and grown:
            progress(f"lab {state.name}: restarting the kubelet of {c.name} for its new nodes")
            nsutil.terminate([(c.kubelet.pid, c.kubelet.start)])
            c.kubelet = None
        if c.kubelet is None or not c.kubelet.running():
            rec = start_kubelet(state, c)
            progress(f"lab {state.name}: lab kubelet of {c.name} started (pid {rec.pid}, log {rec.log})")
    write_kubeconfig(state)


def write_kubeconfig(state: LabState) -> Path:
    """The lab's kubeconfig: one context per cluster with an API server (current: the first)."""
    urls = {c.name: c.api_url for c in state.clusters if c.api_url}
    return kubeemu_lab.write_kubeconfig(state.kubeconfig, urls)


def kube_nodes_ready(cluster: ClusterRecord) -> tuple[list[str], str | None]:
    """Nodes of ``cluster`` not yet registered Ready in its API server, or ``([], None)``;
    on a failed request, every node with the reason."""
    names = [n.name for n in cluster.nodes]
    try:
        with urllib.request.urlopen(f"{cluster.api_url}/api/v1/nodes", timeout=2) as r:
            items = json.loads(r.read()).get("items", [])
    except (OSError, ValueError) as e:
        return names, f"{type(e).__name__}: {e}"
    ready = {
        i["metadata"]["name"]
        for i in items
        if any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (i.get("status") or {}).get("conditions", [])
        )
    }
    return [n for n in names if n not in ready], None


def kubeconfig_path(name: str) -> Path:
    """``lab kubeconfig``: the kubeconfig of a running lab that runs Kubernetes."""
    state = _require_state(name)
    if not state.kubernetes:
        raise LabError(f"lab {name} runs no Kubernetes API servers (its topology lacks 'kubernetes: true')")
    if not state.kubeconfig.exists():
        raise LabError(f"lab {name}: no kubeconfig at {state.kubeconfig} yet; run 'fabric-tool lab up' to finish it")
    return state.kubeconfig


def wait_kube_nodes(state: LabState, timeout_s: float, progress: Progress = _quiet) -> None:
    """Wait until every lab node is a Ready Node of its cluster's API server."""
    deadline = time.monotonic() + timeout_s
    for c in state.clusters:
        while True:
            missing, err = kube_nodes_ready(c)
            if not missing:
                break
            for what, rec in (("API server", c.apiserver), ("kubelet", c.kubelet)):
                if rec is None or not rec.running():
                    log = rec.log if rec else "(never started)"
                    raise LabError(f"the {what} of cluster {c.name} is not running; see {log}"
                                   f"{_log_tail(log) if rec else ''}")  # fmt: skip
            if time.monotonic() > deadline:
                log = c.kubelet.log if c.kubelet else "?"
                raise LabError(f"cluster {c.name}: nodes {', '.join(missing)} not Ready in the API server after "
                               f"{timeout_s:g} s ({err or 'not registered'}); see {log}")  # fmt: skip
            time.sleep(0.1)


def bpf_dir(name: str) -> Path:
    """The lab's private bpffs (the agents' ``--bpf-pin-root``): every lab gets its own mount,
    so translator pins of two labs (or of a developer's agents) never meet, and ``down`` removes
    them all by unmounting it."""
    return state_dir(name) / "bpf"


def _is_mountpoint(path: Path) -> bool:
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[1] == str(path) for line in mounts if len(line.split()) > 1)


def mount_bpffs(state: LabState) -> None:
    """Mount the lab's bpffs if a cluster uses global IP or may get it later (a Kubernetes lab,
    whose Cluster resources can gain a globalCIDRsMap at any time); plain labs need none."""
    path = bpf_dir(state.name)
    wanted = state.kubernetes or any(c.global_cidrs for c in state.clusters)
    if not wanted or _is_mountpoint(path):
        return
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError(f"cannot mount a bpf filesystem on {path} for the translator: {p.stderr.strip()}")


def _umount_bpffs(name: str) -> bool:
    path = bpf_dir(name)
    if not _is_mountpoint(path):
        return False
    p = subprocess.run(["umount", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        _log.warning("cannot unmount %s: %s", path, p.stderr.strip())
        return False
    return True


def bpf_dump(name: str, spec: str) -> dict[str, Any]:
    """``fabric-tool lab bpf NODE``: the node's translator as the kernel holds it - mappings with
    packet/byte counters, drops (read from the pins, no compile) and which of our programs run on
    which device (read from tc in the node's namespace)."""
    from fabric import translator
    from fabric.bpf import translate

    state = _require_state(name)
    node = _find_node(state, spec)
    instance = translator.instance_name(node.cluster, node.name)
    root = bpf_dir(name)
    doc: dict[str, Any] = {"node": node.key, "instance": instance, "pin_root": str(root)}
    try:
        if translate.pin_dir_for(instance, root).is_dir():
            doc.update(translate.dump_pinned(instance, root))
            doc["loaded"] = True
        else:
            doc.update(loaded=False, mappings=[], drops={})
        doc["attachments"] = translate.Translator(instance, pin_root=root, netns=node.netns).attachments(
            translator.DEVICES
        )
    except translate.TranslatorError as e:
        raise LabError(f"reading the translator of {node.key}: {e}") from e
    return doc


def render_bpf(doc: dict[str, Any]) -> str:
    lines = [f"translator of {doc['node']} ({doc['pin_root']}/{doc['instance']})"]
    if not doc.get("loaded"):
        lines.append("  not loaded (the node's cluster has no globalCIDRs, or its agent has not applied them)")
    for m in doc.get("mappings", []):
        lines.append(
            f"  {m['local']:<20} <-> {m['global']:<20} in {m['in_packets']} pkts/{m['in_bytes']} B"
            f"  out {m['out_packets']} pkts/{m['out_bytes']} B"
        )
    drops = {k: v for k, v in doc.get("drops", {}).items() if v}
    if drops:
        lines.append("  drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    for a in doc.get("attachments", []):
        lines.append(f"  {a['device']} {a['direction']}: {a['program']}")
    return "\n".join(lines)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _status_client() -> Any:
    """The control channel's client, imported late: the lab's plumbing works without it."""
    try:
        # importlib keeps this module importable (and type-checkable) before the client exists.
        client = importlib.import_module("fabric.control.client")
    except ImportError as e:
        raise LabError(
            f"the control-channel client (fabric.control.client) is not available: {e}. "
            "Run ./dev.sh setup (it also generates the gRPC stubs)."
        ) from e
    return client


def query_status(state: LabState, timeout_s: float = 2.0) -> tuple[api.FabricStatus | None, str | None]:
    """The reflector's status through its unix socket, or ``(None, reason)``."""
    client = _status_client()
    if not state.reflector_socket.exists():
        return None, f"no reflector socket at {state.reflector_socket}"
    try:
        return client.get_status_sync(f"unix:{state.reflector_socket}", timeout_s), None
    except Exception as e:  # any failure of the remote end is reported, not raised
        return None, f"{type(e).__name__}: {e}".strip()


def wait_reflector(state: LabState, deadline: float, progress: Progress) -> None:
    last = ""
    while True:
        st, err = query_status(state, 1.0)
        if st is not None:
            return
        assert state.reflector is not None
        if not state.reflector.running():
            log = state.reflector.log
            raise LabError(f"fabric-reflector exited at start; see {log}{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise LabError(
                f"fabric-reflector did not answer on {state.reflector_socket} in time ({err}); "
                f"see {state.reflector.log}"
            )
        if err != last:
            progress(f"lab {state.name}: waiting for the reflector ({err})")
            last = err or ""
        time.sleep(0.2)


def laggards(state: LabState, status: api.FabricStatus | None) -> dict[str, str]:
    """Nodes not yet in sync, each with why (what the reflector says, or that it is silent)."""
    out: dict[str, str] = {}
    by_key = {n.key: n for n in status.nodes()} if status is not None else {}
    for node in state.nodes():
        ns = by_key.get(node.key)
        if node.agent is None or not node.agent.running():
            out[node.key] = "agent not running"
        elif status is None:
            out[node.key] = "reflector unreachable"
        elif ns is None:
            out[node.key] = "not announced to the reflector"
        elif not ns.connected:
            out[node.key] = "session not connected"
        elif not ns.in_sync:
            out[node.key] = f"applied version {ns.applied_version} of planned {ns.planned_version}"
    return out


def wait_in_sync(state: LabState, timeout_s: float, progress: Progress = _quiet) -> None:
    """Poll the reflector until every node of the lab reports its planned version applied."""
    deadline = time.monotonic() + timeout_s
    total = sum(1 for _ in state.nodes())
    last_report = ""
    last_time = 0.0
    status: api.FabricStatus | None = None
    err: str | None = None
    while True:
        status, err = query_status(state, 2.0)
        lag = laggards(state, status)
        if not lag:
            progress(f"lab {state.name}: all {total} nodes in sync")
            return
        dead = [k for k, why in lag.items() if why == "agent not running"]
        if dead:
            node = state.node(dead[0])
            assert node is not None
            log = node.agent.log if node.agent else "(never started)"
            raise LabError(f"the agent of {dead[0]} is not running; see {log}{_log_tail(log)}")
        report = f"{total - len(lag)}/{total} nodes in sync; waiting for " + ", ".join(sorted(lag))
        now = time.monotonic()
        if report != last_report or now - last_time > 5:
            progress(f"lab {state.name}: {report}")
            last_report, last_time = report, now
        if now > deadline:
            lines = []
            for key, why in sorted(lag.items()):
                node = state.node(key)
                log = node.agent.log if node and node.agent else "?"
                lines.append(f"  {key}: {why} (log: {log})")
            extra = f"\nreflector: {err}" if err else ""
            if state.reflector:
                extra += f"\nreflector log: {state.reflector.log}"
            raise LabError(
                f"lab {state.name}: not in sync after {timeout_s:g} s; laggards:\n"
                + "\n".join(lines)
                + extra
                + f"\nthe lab is left up for inspection; 'fabric-tool lab down --name {state.name}' removes it"
            )
        time.sleep(0.25)


# -- the commands ----------------------------------------------------------------------------


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces and needs root (run it with sudo)")


def _load_topology(path: str | Path) -> topology.TopologyFile:
    try:
        return topology.load(path)
    except topology.TopologyError as e:
        raise LabUsageError(str(e)) from e


def up(
    topology_path: str | Path = DEFAULT_TOPOLOGY,
    name: str = DEFAULT_NAME,
    *,
    timeout_s: float = DEFAULT_UP_TIMEOUT_S,
    grace_period_s: float | None = None,
    resync_period_s: float | None = None,
    start_processes: bool = True,
    progress: Progress = _stderr_progress,
) -> LabState:
    """Build (or complete) lab ``name`` from a topology file and wait until it is in sync.

    ``start_processes=False`` builds only the plumbing (namespaces, links, addresses, the
    intra-cluster routes): the fabric's processes are not started and nothing is awaited.
    """
    check_lab_name(name)
    topo = _load_topology(topology_path)  # before anything is created
    wanted = plan(name, topo)
    _require_root()
    with locked(name):
        try:
            current = load_state(name)
        except StateError as e:
            raise LabError(f"{e}; run 'fabric-tool lab down --name {name}' to clear the lab") from e
        if current is not None and not namespaces.exists(current.ul_netns):
            progress(f"lab {name}: recorded lab has no {current.ul_netns} namespace any more; clearing leftovers")
            _down_locked(name, current, progress)
            current = None
        if current is None:
            leftovers = _scan_netns(name)
            if leftovers:
                progress(f"lab {name}: clearing {len(leftovers)} leftover namespaces of an earlier lab")
                _down_locked(name, None, progress)
            state = wanted
            state.grace_period_s, state.resync_period_s = grace_period_s, resync_period_s
            added = [n.key for n in state.nodes()]
            clusters_changed = True
            config_doc: Any = _read_yaml(topology_path)
        else:
            # Addresses the file leaves to automatic assignment are pinned to what runs, so a
            # node added in the middle of the file does not shift the nodes after it.
            config_doc = pin_running(_read_yaml(topology_path), current)
            try:
                topo = topology.parse(config_doc, str(topology_path))
            except topology.TopologyError as e:
                raise LabUsageError(str(e)) from e
            state, added, clusters_changed = merge_plan(current, plan(name, topo))
            for attr, value in (("grace_period_s", grace_period_s), ("resync_period_s", resync_period_s)):
                if value is not None and getattr(state, attr) != value:
                    progress(f"lab {name}: note: {attr} stays {getattr(state, attr)} for running processes")
        state.state_dir.mkdir(parents=True, exist_ok=True)
        # The reflector reads its configuration (clusters, expected nodes) from this copy.
        tmp = state.topology_copy.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config_doc, sort_keys=False))
        os.replace(tmp, state.topology_copy)
        save_state(state)
        build(state, progress)
        if added and current is not None:
            progress(f"lab {name}: added {', '.join(added)}")
        if not start_processes:
            return state
        deadline = time.monotonic() + timeout_s
        refl = state.reflector
        if refl is not None and refl.running() and clusters_changed and current is not None:
            # New clusters exist only in the configuration file: the reflector must re-read it.
            progress(f"lab {name}: restarting the reflector for the new cluster configuration")
            nsutil.terminate([(refl.pid, refl.start)])
            refl = None
        if refl is None or not refl.running():
            progress(f"lab {name}: starting fabric-reflector in {state.ul_netns} on {state.reflector_address}")
            start_reflector(state)
        wait_reflector(state, deadline, progress)
        mount_bpffs(state)
        for node in state.nodes():
            if node.agent is None or not node.agent.running():
                progress(f"lab {name}: starting fabric-agent for {node.key} in {node.netns}")
                start_agent(state, node)
        if state.kubernetes:
            start_kubernetes(state, added if current is not None else [], progress)
        wait_in_sync(state, max(0.0, deadline - time.monotonic()), progress)
        if state.kubernetes:
            wait_kube_nodes(state, max(1.0, deadline - time.monotonic()), progress)
            contexts = ", ".join(c.name for c in state.clusters)
            progress(
                f"lab {name}: kubeconfig {state.kubeconfig} (contexts: {contexts}); e.g. "
                f"kubectl --kubeconfig {state.kubeconfig} --context {state.clusters[0].name} get nodes -o wide"
            )
        return state


def _read_yaml(path: str | Path) -> Any:
    """The raw document of an already validated topology file."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:  # validated a moment ago; only a race gets here
        raise LabUsageError(f"{path}: cannot read: {e}") from e


def pin_running(doc: Any, state: LabState) -> Any:
    """Copy of topology document ``doc`` with the running nodes' automatically assigned
    ``underlay`` and ``podCIDR`` written in explicitly (values the file sets are left alone)."""
    doc = copy.deepcopy(doc)
    if not isinstance(doc, dict) or not isinstance(doc.get("clusters"), list):
        return doc
    for c in doc["clusters"]:
        if not isinstance(c, dict) or not isinstance(c.get("nodes"), list):
            continue
        for n in c["nodes"]:
            if not isinstance(n, dict):
                continue
            rec = state.node(f"{c.get('name')}/{n.get('name')}")
            if rec is not None:
                n.setdefault("underlay", rec.underlay_ip)
                if rec.underlay_ip6:
                    n.setdefault("underlay6", rec.underlay_ip6)
                # One CIDR as before; a list of one per family for a dual-stack or IPv6 node.
                cidrs = list(rec.pod_cidrs)
                n.setdefault("podCIDR", cidrs[0] if cidrs == [rec.pod_cidr] else cidrs)
    return doc


def add_node(
    name: str,
    cluster: str,
    node: str,
    *,
    pods: int = 2,
    pod_cidr: str | None = None,
    underlay: str | None = None,
    timeout_s: float = DEFAULT_UP_TIMEOUT_S,
    progress: Progress = _stderr_progress,
) -> LabState:
    """Add one node to a running lab: rewrite its topology with the node appended, then ``up``."""
    state = _require_state(name)
    try:
        doc = yaml.safe_load(state.topology_copy.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LabError(f"cannot read the lab's topology copy {state.topology_copy}: {e}") from e
    clusters = doc.get("clusters", []) if isinstance(doc, dict) else []
    target = next((c for c in clusters if isinstance(c, dict) and c.get("name") == cluster), None)
    if target is None:
        known = ", ".join(str(c.get("name")) for c in clusters if isinstance(c, dict))
        raise LabUsageError(f"cluster {cluster!r} is not in lab {name} (clusters: {known})")
    entry: dict[str, Any] = {"name": node, "pods": pods}
    if pod_cidr is not None:
        entry["podCIDR"] = pod_cidr
    if underlay is not None:
        entry["underlay"] = underlay
    target.setdefault("nodes", []).append(entry)
    new_file = state.state_dir / "topology.add-node.yaml"
    new_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        return up(new_file, name, timeout_s=timeout_s, progress=progress)
    finally:
        with contextlib.suppress(FileNotFoundError):
            new_file.unlink()


def _scan_netns(name: str) -> list[str]:
    """Namespaces under /run/netns that belong to lab ``name`` by their name."""
    return [ns for ns in namespaces.list_all() if ns.startswith(f"{name}-")]


def down(name: str = DEFAULT_NAME, progress: Progress = _stderr_progress) -> bool:
    """Remove every process, namespace, pinned BPF object and the state of lab ``name``.

    Works from the state file when it can be read, and in any case from a scan of /run/netns
    and /proc. Idempotent; returns True if anything was removed.
    """
    check_lab_name(name)
    _require_root()
    with locked(name):
        try:
            state = load_state(name)
        except StateError as e:
            progress(f"lab {name}: ignoring unusable state ({e}); scanning namespaces instead")
            state = None
        changed = _down_locked(name, state, progress)
        # The lock file goes too (down leaves nothing). A command waiting on it right now holds
        # a lock on the unlinked file; it finds no lab and behaves as on a fresh machine.
        with contextlib.suppress(FileNotFoundError):
            _lock_path(name).unlink()
        return changed


def _down_locked(name: str, state: LabState | None, progress: Progress) -> bool:
    owned = list(state.namespaces()) if state else []
    scanned = _scan_netns(name)
    owned += [ns for ns in sorted(scanned, key=lambda s: -s.count("-")) if ns not in owned]
    # Processes: those recorded (PID + start time), and anything living in a lab namespace.
    targets: dict[int, int | None] = {}
    if state is not None:
        kube = [r for c in state.clusters for r in (c.kubelet, c.apiserver)]
        for rec in [state.reflector, *(n.agent for n in state.nodes()), *kube]:
            if rec is not None and rec.running():
                targets[rec.pid] = rec.start
    inodes = [i for i in (namespaces.inode(ns) for ns in owned) if i is not None]
    for pid in nsutil.pids_in_netns(inodes):
        targets.setdefault(pid, nsutil.start_time(pid))
    changed = False
    if targets:
        progress(f"lab {name}: stopping {len(targets)} processes ({', '.join(map(str, sorted(targets)))})")
        nsutil.terminate(sorted(targets.items()))
        changed = True
    gone = _delete_netns([ns for ns in owned if namespaces.exists(ns)])
    if gone:
        progress(f"lab {name}: deleted {len(gone)} namespaces")
        changed = True
    if _umount_bpffs(name):
        progress(f"lab {name}: unmounted its bpf filesystem (translator pins) at {bpf_dir(name)}")
        changed = True
    pins = BPF_ROOT / name
    if pins.exists():
        shutil.rmtree(pins, ignore_errors=True)
        progress(f"lab {name}: removed pinned BPF objects under {pins}")
        changed = True
    sd = state_dir(name)
    if sd.exists():
        shutil.rmtree(sd, ignore_errors=True)
        changed = True
    if not changed:
        progress(f"lab {name}: nothing to remove")
    return changed


def _require_state(name: str) -> LabState:
    check_lab_name(name)
    state = load_state(name)
    if state is None:
        raise LabError(f"lab {name} is not up (no {state_file(name)}); start it with 'fabric-tool lab up'")
    return state


def _find_node(state: LabState, spec: str) -> NodeRecord:
    """Resolve ``cluster/node`` (or a bare node name when unique) to a node of the lab."""
    if "/" in spec:
        node = state.node(spec)
        matches = [node] if node else []
    else:
        matches = [n for n in state.nodes() if n.name == spec]
    if len(matches) != 1:
        known = ", ".join(n.key for n in state.nodes())
        why = "is ambiguous" if matches else "is not a node of this lab"
        raise LabUsageError(f"node {spec!r} {why} (nodes of lab {state.name}: {known})")
    return matches[0]


def resolve_target(state: LabState, spec: str) -> str:
    """Namespace of ``cluster/node/pN`` (a pod), ``cluster/node`` (a node) or ``underlay``."""
    if spec in ("underlay", "ul", "reflector"):
        return state.ul_netns
    parts = spec.split("/")
    if len(parts) == 3:
        node = state.node("/".join(parts[:2]))
        pod = next((p for p in node.pods if p.name == parts[2]), None) if node else None
        if pod is not None:
            return pod.netns
    elif len(parts) == 2 and state.node(spec) is not None:
        return state.node(spec).netns  # type: ignore[union-attr]
    pods = [f"{n.key}/{p.name}" for n in state.nodes() for p in n.pods]
    raise LabUsageError(
        f"{spec!r} is not a pod or node of lab {state.name} "
        f"(pods: {', '.join(pods) or 'none'}; nodes: {', '.join(n.key for n in state.nodes())}; or 'underlay')"
    )


def exec_in(name: str, target: str, cmd: Sequence[str]) -> int:
    """Run ``cmd`` in a pod's or node's namespace (``ip netns exec``, so /sys matches too)."""
    if not cmd:
        raise LabUsageError("lab exec: no command given (usage: lab exec POD -- CMD...)")
    state = _require_state(name)
    ns = resolve_target(state, target)
    try:
        return subprocess.call(["ip", "netns", "exec", ns, *cmd])
    except KeyboardInterrupt:
        return 130


def stop_agent(name: str, spec: str, progress: Progress = _stderr_progress) -> bool:
    """SIGTERM one node's agent and wait for it to exit. Its dataplane stays as it is."""
    _require_root()
    with locked(name):
        state = _require_state(name)
        node = _find_node(state, spec)
        rec = node.agent
        if rec is None or not rec.running():
            progress(f"lab {name}: the agent of {node.key} is not running")
            node.agent = None
            save_state(state)
            return False
        nsutil.terminate([(rec.pid, rec.start)], grace_s=10.0)
        progress(f"lab {name}: stopped the agent of {node.key} (pid {rec.pid})")
        node.agent = None
        save_state(state)
        return True


def start_agent_cmd(
    name: str, spec: str, *, wait: bool = True, timeout_s: float = 30.0, progress: Progress = _stderr_progress
) -> bool:
    """Start one node's agent (if it is not running) and, with ``wait``, wait until it is in sync."""
    _require_root()
    with locked(name):
        state = _require_state(name)
        node = _find_node(state, spec)
        if node.agent is not None and node.agent.running():
            progress(f"lab {name}: the agent of {node.key} already runs (pid {node.agent.pid})")
            return False
        rec = start_agent(state, node)
        progress(f"lab {name}: started the agent of {node.key} (pid {rec.pid}, log {rec.log})")
        if wait:
            wait_in_sync(state, timeout_s, progress)
        return True


def stop_reflector(name: str, progress: Progress = _stderr_progress) -> bool:
    """SIGTERM the lab's reflector and wait for it to exit; the agents keep their dataplane."""
    _require_root()
    with locked(name):
        state = _require_state(name)
        rec = state.reflector
        if rec is None or not rec.running():
            progress(f"lab {name}: the reflector is not running")
            state.reflector = None
            save_state(state)
            return False
        nsutil.terminate([(rec.pid, rec.start)], grace_s=10.0)
        progress(f"lab {name}: stopped the reflector (pid {rec.pid})")
        state.reflector = None
        save_state(state)
        return True


def start_reflector_cmd(
    name: str, *, wait: bool = True, timeout_s: float = 60.0, progress: Progress = _stderr_progress
) -> bool:
    """Start the lab's reflector if it is not running; with ``wait``, until every node is in sync."""
    _require_root()
    with locked(name):
        state = _require_state(name)
        if state.reflector is not None and state.reflector.running():
            progress(f"lab {name}: the reflector already runs (pid {state.reflector.pid})")
            return False
        deadline = time.monotonic() + timeout_s
        rec = start_reflector(state)
        progress(f"lab {name}: started the reflector (pid {rec.pid}, log {rec.log})")
        wait_reflector(state, deadline, progress)
        if wait:
            wait_in_sync(state, max(0.0, deadline - time.monotonic()), progress)
        return True


# -- status ----------------------------------------------------------------------------------


def status_doc(state: LabState, status: api.FabricStatus | None, error: str | None) -> dict[str, Any]:
    """The ``lab status --json`` document: lab facts from the state file, live facts from the
    reflector (in_sync is false for every node when the reflector cannot be asked)."""
    by_key = {n.key: n for n in status.nodes()} if status is not None else {}
    refl = state.reflector
    doc: dict[str, Any] = {
        "name": state.name,
        "topology": state.topology_source,
        "reflector": {
            "netns": state.ul_netns,
            "address": state.reflector_address,
            "pid": refl.pid if refl and refl.running() else None,
            "socket": str(state.reflector_socket),
            "log": refl.log if refl else None,
            "reachable": status is not None,
            "epoch": status.epoch if status else None,
            "generation": status.generation if status else None,
            "holding": status.holding if status else None,
        },
        "clusters": [],
    }
    if error is not None:
        doc["note"] = f"reflector unreachable: {error}; in_sync is false for every node"
    if status is not None and status.rejections:
        doc["rejections"] = [{"source": r.source, "reason": r.reason} for r in status.rejections]
    live = {c.name: c for c in status.clusters} if status is not None else {}
    for c in state.clusters:
        lc = live.get(c.name)
        nodes = []
        for n in c.nodes:
            ns = by_key.get(n.key)
            nodes.append(
                {
                    "name": n.name,
                    "netns": n.netns,
                    "underlay": n.underlay_ip,
                    "pod_cidr": n.pod_cidr,
                    "agent_pid": n.agent.pid if n.agent and n.agent.running() else None,
                    "agent_log": n.agent.log if n.agent else None,
                    "in_sync": bool(ns and ns.in_sync),
                    "connected": bool(ns and ns.connected),
                    "planned_version": ns.planned_version if ns else None,
                    "applied_version": ns.applied_version if ns else None,
                    "counters": dataclasses.asdict(ns.counters) if ns else None,
                    "role": lc.role_of(n.name) if lc else "",
                    "failed": n.failed,
                    "unreachable_reports": ns.unreachable_reports if ns else None,
                    "pods": [
                        {"name": p.name, "netns": p.netns, "ip": p.ip, "global_ip": c.global_ip(p.ip or None),
                         "ip6": p.ip6, "global_ip6": c.global_ip(p.ip6 or None)}
                        for p in n.pods
                    ],
                }
            )
        doc["clusters"].append(
            {
                "name": c.name,
                "mode": c.mode,
                "gateways": c.gateways,
                "active_gateway": (lc.active_gateway or None) if lc else None,
                "standby_gateway": (lc.standby_gateway or None) if lc else None,
                "gateway_moves": lc.gateway_moves if lc else None,
                "service": {"ip": c.service_ip, "global_ip": c.global_ip(c.service_ip), "backend": c.service_backend}
                if c.service_ip else None,
                "global_cidrs": c.global_cidrs,
                "kubernetes": {
                    "url": c.api_url,
                    "apiserver_pid": c.apiserver.pid if c.apiserver and c.apiserver.running() else None,
                    "apiserver_log": c.apiserver.log if c.apiserver else None,
                    "kubelet_pid": c.kubelet.pid if c.kubelet and c.kubelet.running() else None,
                    "kubelet_log": c.kubelet.log if c.kubelet else None,
                }
                if state.kubernetes else None,
                "nodes": nodes,
            }
        )
    doc["kubeconfig"] = str(state.kubeconfig) if state.kubernetes else None
    return doc


def render_status(doc: dict[str, Any]) -> str:
    """A readable table of :func:`status_doc`."""
    r = doc["reflector"]
    head = f"lab {doc['name']} ({doc['topology']})\nreflector {r['address']} in {r['netns']}: "
    if r["pid"] is None:
        head += "not running"
    else:
        head += f"pid {r['pid']}"
    if r.get("reachable"):
        head += f", epoch {r['epoch']}, generation {r['generation']}" + (", holding" if r.get("holding") else "")
    lines = [head]
    if "note" in doc:
        lines.append(f"note: {doc['note']}")
    rows = [("CLUSTER", "MODE", "NODE", "GATEWAY", "UNDERLAY", "AGENT", "SESSION", "VERSION", "IN-SYNC", "PODS")]
    for c in doc["clusters"]:
        for n in c["nodes"]:
            version = "-" if n["planned_version"] is None else f"{n['applied_version']}/{n['planned_version']}"
            rows.append(
                (
                    c["name"],
                    c["mode"],
                    n["name"],
                    n.get("role") or "-",
                    n["underlay"] + (" (FAILED)" if n.get("failed") else ""),
                    str(n["agent_pid"]) if n["agent_pid"] else "stopped",
                    "up" if n["connected"] else "down",
                    version,
                    "yes" if n["in_sync"] else "NO",
                    " ".join(
                        f"{p['name']}={p['ip']}" + (f"({p['global_ip']})" if p.get("global_ip") else "")
                        for p in n["pods"]
                    ) or "-",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    for c in doc["clusters"]:
        if c.get("service"):
            lines.append(f"service of {c['name']}: {c['service']['ip']} -> {c['service']['backend']}")
    for c in doc["clusters"]:
        k = c.get("kubernetes")
        if k:
            pids = f"apiserver {k['apiserver_pid'] or 'stopped'}, kubelet {k['kubelet_pid'] or 'stopped'}"
            lines.append(f"kubernetes of {c['name']}: {k['url'] or '-'} ({pids})")
    if doc.get("kubeconfig"):
        lines.append(f"kubeconfig: {doc['kubeconfig']}")
    for rej in doc.get("rejections", []):
        lines.append(f"rejected {rej['source']}: {rej['reason']}")
    return "\n".join(lines)


def status(name: str = DEFAULT_NAME) -> dict[str, Any]:
    state = _require_state(name)
    try:
        st, err = query_status(state)
    except LabError as e:
        st, err = None, str(e)
    return status_doc(state, st, err)
