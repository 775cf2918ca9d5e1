"""ClusterTree in the lab: the topology's ``role: host`` and ``tree:`` keys, ``kosmos-tree``
against the host's API server, and the leaves joined to it.

The keys (``kubernetes: true`` labs only), checked by :func:`problems` while planning, each
problem naming the key and the cluster:

- ``role: host`` on at most one cluster: the root, whose API server the tree manager watches;
- ``tree: cluster``, ``tree: node`` or ``tree: "party=<label selector>"`` on a leaf: its leaf
  model (one virtual node for the whole cluster, one per leaf node, one per label-selected party),
  read by the same reader as ``fabric-tool join --tree --leaf-model`` (:func:`tools.install.tree_options`).
  Absent: not a leaf. The host is no leaf of itself; leaves need a host.

Order in ``lab up``, after every cluster's API server, kubelet and scheduler run and the fabric
is in sync (the fabric stays the lab's own, from its topology file):

1. :func:`start_tree`: ``kosmos-tree`` (root namespace, the host's API server on 127.0.0.1,
   leader election on as a Deployment runs it, ``--reflector unix:<the lab reflector's socket>``
   and ``--fabric-cluster <host>`` so it publishes its records and sets NetworkUnavailable;
   ``--kubelet-address 127.0.0.1 --kubelet-port <a free port, kept>`` for ``kubectl
   logs``/``exec`` through the virtual nodes), restarted when its command line changed (a new
   API server);
2. :func:`join_leaves`: each leaf through :func:`tools.install.join_tree` with its ``tree``
   model: the tree part of ``fabric-tool join CLUSTER --tree --lab NAME`` (Cluster CRD, the
   leaf's kubeconfig Secret, ``clusterTreeOptions``, waiting for the virtual nodes). The fabric
   part is never redone here: without ``fabric-tool install`` the lab's reflector links every
   cluster from the file; after it, a leaf's fabric join (its options) is the user's;
3. the supervisor (:mod:`tools.lab.supervisor`) restarts ``kosmos-tree`` and the schedulers
   when they die, as a Deployment's kubelet would.
"""

from __future__ import annotations

import itertools
import logging
import socket
import sys
import time

from fabric.topology import TopologyFile
from tools.lab import labpki
from tools.lab.procs import ROOT_NETNS, log_tail, start_process, still_running
from tools.lab.state import LabError, LabState, ProcRecord, Progress, quiet, save_state

_log = logging.getLogger(__name__)

ROLES = ("host",)


def problems(topo: TopologyFile) -> list[str]:
    """Why the lab cannot build ``topo``'s tree (empty: it can, or there is none)."""
    out: list[str] = []
    hosts = [c.name for c in topo.clusters if c.role == "host"]
    for c in topo.clusters:
        if c.role and c.role not in ROLES:
            out.append(f"cluster {c.name}: role {c.role!r}: the only role is 'host' (ClusterTree's root)")
        if c.role == "host" and not topo.kubernetes:
            out.append(f"cluster {c.name}: role host: ClusterTree needs 'kubernetes: true'")
    if len(hosts) > 1:
        out.append(f"clusters {', '.join(hosts)}: role host: at most one cluster is the host")
    for c in topo.clusters:
        if not c.tree:
            continue
        if not topo.kubernetes:
            out.append(f"cluster {c.name}: tree {c.tree!r}: ClusterTree needs 'kubernetes: true'")
        elif c.role == "host":
            out.append(f"cluster {c.name}: tree {c.tree!r}: the host is no leaf of itself")
        elif not hosts:
            out.append(f"cluster {c.name}: tree {c.tree!r}: a leaf needs a cluster with 'role: host'")
        from tools import install  # late: install imports the lab

        try:
            install.tree_options(c.name, [c.tree], where="tree")
        except install.InstallError as e:
            out.append(f"cluster {c.name}: {e} (tree: cluster, node or \"party=<label selector>\")")
    return out


def tree_argv(state: LabState) -> list[str]:
    """``kosmos-tree``'s command line against the lab's host (as a Deployment runs it, leader
    election on; ``--listen 127.0.0.1:0``: every lab's manager shares the root namespace).

    ``--kubelet-address 127.0.0.1 --kubelet-port P``: the virtual nodes' kubelet server, where
    the host's API server sends ``kubectl logs``/``exec`` of their pods. The flag's default
    (10250) would collide between labs sharing the root namespace, so the lab takes a free port
    once and keeps it (:func:`kubelet_port`): the virtual nodes advertise it, and a restarted
    manager must serve where they point."""
    host = state.host_cluster
    assert host is not None and host.api_url is not None
    return [sys.executable, "-m", "tree.main", "--master", host.api_url, "--leader-elect=true",
            "--listen", "127.0.0.1:0", "--reflector", f"unix:{state.reflector_socket}",
            "--tls-dir", str(labpki.pki_root(state) / "tree"),
            "--fabric-cluster", host.name, "--kubelet-address", "127.0.0.1",
            "--kubelet-port", str(kubelet_port(state))]


def kubelet_port(state: LabState) -> int:
    """The kubelet port of the lab's ``kosmos-tree``: the one its last command line named, else a
    port free on 127.0.0.1 now (the kernel's pick)."""
    argv = state.tree_proc.argv if state.tree_proc is not None else []
    for flag, value in itertools.pairwise(argv):
        if flag == "--kubelet-port" and value.isdigit() and int(value) > 0:
            return int(value)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_tree(state: LabState, progress: Progress = quiet) -> ProcRecord | None:
    """Start ``kosmos-tree`` unless one with the same command line runs (None: no host)."""
    host = state.host_cluster
    if host is None or host.api_url is None:
        return None
    argv = tree_argv(state)
    if (rec := still_running(state.tree_proc, argv, progress,
                             f"lab {state.name}: restarting kosmos-tree (its command line changed)")) is not None:
        return rec
    ensure_tree_certificate(state)
    rec = start_process(ROOT_NETNS, argv, state.state_dir / "logs" / "tree.log")
    state.tree_proc = rec
    save_state(state)
    progress(f"lab {state.name}: kosmos-tree against {host.name} started (pid {rec.pid}, log {rec.log})")
    return rec


def ensure_tree_certificate(state: LabState) -> None:
    """The ``tree/<root id>`` certificate ``kosmos-tree`` connects to the reflector with (its root id
    is the UID of the host's ``kube-system`` namespace, read as the manager reads it)."""
    from scheduler.kube import connect
    from tree.main import root_id

    host = state.host_cluster
    assert host is not None and host.api_url is not None
    try:
        rid = root_id(connect(host.api_url))
    except Exception as e:  # an unreachable API server: say so, the caller's step fails
        raise LabError(f"lab {state.name}: reading the root id of {host.name}: {type(e).__name__}: {e}") from e
    labpki.tree_dir(state, rid)


def join_leaves(state: LabState, timeout_s: float, progress: Progress = quiet) -> None:
    """Join every ``tree:`` cluster to the host as ``fabric-tool join CLUSTER --tree`` does (its
    tree part; a Cluster that exists keeps the rest of its spec)."""
    from tools import install  # late: install imports the lab

    host = state.host_cluster
    if host is None:
        return
    deadline = time.monotonic() + timeout_s
    for c in state.clusters:
        if not c.tree:
            continue
        try:
            install.join_tree(c.name, install.Target(str(state.kubeconfig), host.name),
                              install.Target(str(state.kubeconfig), c.name), [c.tree],
                              timeout_s=max(1.0, deadline - time.monotonic()), progress=progress)
        except install.InstallError as e:
            rec = state.tree_proc
            extra = f"; kosmos-tree log {rec.log}{log_tail(rec.log)}" if rec is not None else ""
            raise LabError(f"lab {state.name}: joining leaf {c.name} to {host.name}: {e}{extra}") from e
