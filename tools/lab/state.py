"""The lab's state file and names: records of what ``up`` built and started, written
atomically before each next step so ``down`` always has an accurate record; lab names, paths
and the lookups (node by spec, pod or node namespace) every command needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fabric import types
from fabric.control import api
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
#: nftables table the lab's kube-proxy stand-in owns in each node namespace (labs without
#: Kubernetes; a ``kubernetes: true`` lab runs the lab kube-proxy, table ``kube-proxy``).
NFT_TABLE = "kflab"
#: The lab service of a ``kubernetes: true`` lab: a selector-less Service whose EndpointSlice
#: lists the cluster's static pods (``namespace/name``), and its TCP port.
LAB_SERVICE = "default/lab-check"
LAB_SERVICE_PORT = 80
STATE_VERSION = 1
#: Lab names become namespace prefixes ``NAME-``. No '-' allowed, so no lab's prefix can be a
#: prefix of another lab's namespaces (``kf-`` vs ``kf-x-``), which makes scanning safe.
_LAB_NAME = re.compile(r"^[a-z0-9]{1,12}$")
IFNAMSIZ = 15

Progress = Callable[[str], None]


class LabError(Exception):
    """The lab could not do what was asked (exit status 1)."""

    exit_code = 1


class LabUsageError(LabError):
    """Bad input: an invalid name, file, or a change ``up`` refuses to make (exit status 2)."""

    exit_code = 2


class StateError(LabError):
    """The state file exists but cannot be used."""


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet(msg: str) -> None:
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
    #: The node's declared Kubernetes capacity (topology ``resources:``), for its lab kubelet.
    resources: dict[str, str] = dataclasses.field(default_factory=dict)

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
    #: ``kubernetes: true``: the topology's ``scheduler`` and its process (tools.lab.schedulers).
    scheduler: str = "none"
    scheduler_proc: ProcRecord | None = None
    #: ``kubernetes: true``: the cluster's controller-manager (``python -m kubeemu.ctrl``, root
    #: namespace): the workload controllers (Deployment, ReplicaSet, StatefulSet, Job, DaemonSet).
    controller_manager: ProcRecord | None = None
    #: ``kubernetes: true``: the lab service is a real Service of the cluster's API
    #: (``namespace/name``, :data:`LAB_SERVICE`) programmed by the lab kube-proxy; ``service_ip``
    #: and ``service_ip6`` are its ClusterIPs (no ``service_backend``: its EndpointSlice lists the
    #: static pods) and ``service_port`` its TCP port, which ``check --services`` probes (a
    #: ClusterIP answers TCP on its ports only, as a real cluster's does; ICMP is rejected).
    service_name: str | None = None
    service_port: int | None = None
    #: ``kubernetes: true``: the lab kube-proxy of the cluster (``python -m kubeemu.proxy``).
    proxy: ProcRecord | None = None
    #: ClusterTree: ``host`` for the root cluster ("" otherwise); a leaf's model (``cluster``,
    #: ``node`` or ``party=<selector>``, "" for no leaf), joined to the host by ``lab up``.
    role: str = ""
    tree: str = ""
    #: ``kubernetes: true``: the cluster DNS (``python -m kubeemu.dns``, :func:`tools.lab.kube.start_dns`),
    #: the ``kube-system/kube-dns`` ClusterIP its kubelet gives pods as nameserver, and the stub
    #: domains it forwards (``DOMAIN=IP[:PORT]``, e.g. the clusterset.local responder of MCS).
    dns_proc: ProcRecord | None = None
    dns_ip: str | None = None
    dns_stubs: list[str] = dataclasses.field(default_factory=list)

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
    #: ClusterTree (a cluster with ``role: host``): ``kosmos-tree`` against the host's API server,
    #: and the lab's supervisor (tools.lab.supervisor), which restarts it and the schedulers.
    tree_proc: ProcRecord | None = None
    supervisor: ProcRecord | None = None
    #: Restarts the supervisor made, by what it restarted (``tree``, ``scheduler/<cluster>``).
    restarts: dict[str, int] = dataclasses.field(default_factory=dict)
    #: ``kubernetes: true``: the lab's ``kosmos-mcs`` (:mod:`tools.lab.mcs`), every cluster a member.
    mcs_proc: ProcRecord | None = None
    #: Lifetime of the node certificates the lab's reflector signs (None: its default, 24 h);
    #: tests shorten it to see agents renew mid-session.
    node_cert_lifetime_s: float | None = None
    #: ``lab up --relays K``: K fabric-relay processes beside the reflector; agent i's session goes
    #: through relay i mod K (:func:`tools.lab.procs.start_relay`). One record per relay.
    relay_procs: list[ProcRecord | None] = dataclasses.field(default_factory=list)

    @property
    def host_cluster(self) -> ClusterRecord | None:
        """The cluster with ``role: host`` (ClusterTree's root), if any."""
        return next((c for c in self.clusters if c.role == "host"), None)

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

    def relay_address(self, index: int) -> str:
        """Where relay ``index`` listens for agents (the gateway, from port 7947 up)."""
        return f"{self.gateway}:{api.DEFAULT_RELAY_PORT + index}"

    def session_targets(self) -> dict[str, str]:
        """Where each node's agent holds its session, by node key: the reflector, or (``--relays
        K``) relay i mod K, i the node's place in :meth:`nodes` (the first one for a key listed
        twice), so the relays share the nodes evenly. One pass over the nodes: ``lab status``
        asks for every node, and a place is a position, so nothing is cached to go stale."""
        k = len(self.relay_procs)
        out: dict[str, str] = {}
        for i, n in enumerate(self.nodes()):
            out.setdefault(n.key, self.relay_address(i % k) if k else self.reflector_address)
        return out

    def session_target(self, key: str) -> str:
        """:meth:`session_targets` of one node; ValueError for a key the lab does not have."""
        try:
            return self.session_targets()[key]
        except KeyError:
            raise ValueError(f"node {key!r} is not in lab {self.name!r}") from None

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
                procs = ("apiserver", "kubelet", "controller_manager", "proxy", "scheduler_proc", "dns_proc")
                fields = {k: v for k, v in c.items() if k != "nodes" and k not in procs}
                clusters.append(ClusterRecord(**fields, nodes=nodes, apiserver=proc(c.get("apiserver")),
                                              kubelet=proc(c.get("kubelet")),
                                              controller_manager=proc(c.get("controller_manager")),
                                              proxy=proc(c.get("proxy")), scheduler_proc=proc(c.get("scheduler_proc")),
                                              dns_proc=proc(c.get("dns_proc"))))
            own = ("clusters", "reflector", "tree_proc", "supervisor", "mcs_proc", "relay_procs")
            fields = {k: v for k, v in doc.items() if k not in own}
            return cls(**fields, clusters=clusters, reflector=proc(doc.get("reflector")),
                       tree_proc=proc(doc.get("tree_proc")), supervisor=proc(doc.get("supervisor")),
                       mcs_proc=proc(doc.get("mcs_proc")), relay_procs=[proc(r) for r in doc.get("relay_procs", [])])
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


def lock_path(name: str) -> Path:
    return LAB_ROOT / f".{name}.lock"


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialize lab operations on one lab (two concurrent ``up`` would race on namespaces)."""
    LAB_ROOT.mkdir(parents=True, exist_ok=True)
    with open(lock_path(name), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stderr_progress(f"lab {name}: another fabric-tool is working on this lab; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


# -- looking things up in a lab's state ------------------------------------------------


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces and needs root (run it with sudo)")


def require_state(name: str) -> LabState:
    check_lab_name(name)
    state = load_state(name)
    if state is None:
        raise LabError(f"lab {name} is not up (no {state_file(name)}); start it with 'fabric-tool lab up'")
    return state


def find_node(state: LabState, spec: str) -> NodeRecord:
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


def bpf_dir(name: str) -> Path:
    """The lab's private bpffs (the agents' ``--bpf-pin-root``): every lab gets its own mount,
    so translator pins of two labs (or of a developer's agents) never meet, and ``down`` removes
    them all by unmounting it."""
    return state_dir(name) / "bpf"
