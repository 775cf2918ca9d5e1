"""The scheduler a ``kubernetes: true`` lab runs per cluster (the topology's ``scheduler:``), and
the scheduler's policy CRDs every such cluster gets.

Nothing in the lab binds a pod to a node by itself: kubeemu stores a Pod without ``nodeName`` as
Pending, and the lab kubelet only runs pods bound to its nodes. Binding is a scheduler's job,
through ``pods/binding`` (and ``pods/eviction`` to preempt), as in a real cluster. So the lab
starts, per cluster, the scheduler its topology names:

- ``kosmos`` (the default): the Kosmos scheduler (``python -m scheduler.main``, issue 16), one
  process per cluster in the root namespace, talking to the cluster's API server on 127.0.0.1
  (``--master URL``) with leader election on, as a real deployment runs it (see
  :func:`scheduler_argv`; a second replica started with the same command line stands by); the
  host of a tree lab's also with ``--reflector``, ``--tls-dir`` and ``--fabric-cluster``
  (:func:`fabric_flags`: leaf-aware and network-aware placement, issue 19). It
  serves both profiles, ``default-scheduler`` (upstream behaviour: what pods get without a
  ``schedulerName``) and ``kosmos-scheduler`` (plus the Kosmos plugins);
- ``none``: no scheduler; pods that name no node stay Pending (tests bind them themselves).

A running scheduler whose command line is no longer the one :data:`ARGVS` gives (a newer
tree's flags) is stopped and started again by ``lab up``. In labs with a ``role: host`` cluster
the lab's supervisor (:mod:`tools.lab.supervisor`) also restarts a scheduler that died.

Plugging a scheduler in is one entry in :data:`STARTERS`: a function that starts the scheduler
process of a cluster (it gets the lab state and the cluster's record, whose ``api_url`` is its
API server) and returns its :class:`~tools.lab.state.ProcRecord`. The lab records it in the
state file (``ClusterRecord.scheduler_proc``), restarts it with its API server, and ``lab down``
stops it with the other processes.

The policy CRDs (``deploy/scheduler/crds/*.yaml``: DistributionPolicy, ClusterDistributionPolicy,
WorkloadPolicy of ``kosmos.io/v1alpha1``) are created in every cluster's API server before its
scheduler starts (:func:`install_crds`), whichever scheduler it runs: they are API types, and a
user's ``kubectl apply`` of a policy must work in every lab cluster as in a Kosmos host cluster.
A tree without that directory installs none, and says so once at debug level.

Order in ``lab up``: :func:`problems` while planning (nothing built yet), then, per cluster after
its API server, kubelet and controller-manager are up, :func:`install_crds` and
:func:`start_scheduler`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from fabric.topology import LabCluster
from tools import nsutil
from tools.lab import labpki
from tools.lab.procs import ROOT_NETNS, start_process
from tools.lab.state import ClusterRecord, LabError, LabState, ProcRecord, Progress, quiet, save_state

_log = logging.getLogger(__name__)

SchedulerStart = Callable[[LabState, ClusterRecord], ProcRecord]

#: Where the scheduler's CRD manifests live in the source tree (one or more documents per file).
CRD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "scheduler" / "crds"
#: Seconds to wait for an installed CRD to be ``Established`` (its API served) before giving up.
CRD_ESTABLISH_TIMEOUT_S = 15.0


def scheduler_argv(api_url: str, fabric: Sequence[str] = ()) -> list[str]:
    """The Kosmos scheduler's command line for the API server at ``api_url``: both profiles (its
    built-in configuration: ``default-scheduler`` and ``kosmos-scheduler``).

    ``--leader-elect=true``, as kubeadm runs kube-scheduler, with upstream's timings and the
    Lease ``kube-system/kosmos-scheduler`` (the scheduler's defaults): the lab runs one replica
    per cluster, which takes the Lease at start (the cluster's API server is new, so nobody
    holds it), and a second replica started with this command line stands by. A scheduler the
    lab stops (``lab down``, or a restart with its API server) gets SIGTERM and releases the
    Lease, so its successor binds at once; one that was killed (SIGKILL, a crash) is restarted by
    ``lab up`` like any dead lab process, and its successor waits out the dead one's Lease
    (15 s from when it first reads it), as a restarted kube-scheduler does.
    ``--listen 127.0.0.1:0``: /metrics and /healthz on an ephemeral port, since every cluster of
    every lab runs its own scheduler in the root namespace and a fixed port would collide; the
    scheduler logs the port it got.

    ``fabric``: more flags, appended (the host's :func:`fabric_flags`)."""
    return [sys.executable, "-m", "scheduler.main", "--master", api_url, "--leader-elect=true",
            "--listen", "127.0.0.1:0", *fabric]


def fabric_flags(state: LabState, cluster: ClusterRecord) -> list[str]:
    """The flags that connect the scheduler of ``cluster`` to the lab's fabric: for the
    ``role: host`` cluster (ClusterTree's root, where the virtual nodes are) ``--reflector
    unix:<the lab reflector's socket>`` with ``--tls-dir`` (the ``scheduler/lab`` certificate,
    :func:`tools.lab.labpki.scheduler_dir`) and ``--fabric-cluster <host>``, so LeafNodeFit and
    NetworkAffinity see the tree manager's per-leaf-node records and the fabric's reachability
    (issue 19); nothing for other clusters (they have no virtual nodes to place on)."""
    host = state.host_cluster
    if host is None or host.name != cluster.name:
        return []
    return ["--reflector", f"unix:{state.reflector_socket}", "--tls-dir", str(labpki.scheduler_path(state)),
            "--fabric-cluster", cluster.name]


def kosmos_argv(state: LabState, cluster: ClusterRecord) -> list[str]:
    """The lab's command line of ``cluster``'s Kosmos scheduler (:func:`scheduler_argv` with
    :func:`fabric_flags`)."""
    return scheduler_argv(cluster.api_url or "", fabric_flags(state, cluster))


def start_kosmos(state: LabState, cluster: ClusterRecord) -> ProcRecord:
    """Start the Kosmos scheduler of ``cluster`` (root namespace; log ``scheduler-<cluster>.log``);
    the host's gets its certificate first (made when missing or unusable)."""
    assert cluster.api_url is not None
    argv = kosmos_argv(state, cluster)
    if "--tls-dir" in argv:
        labpki.scheduler_dir(state)
    return start_process(ROOT_NETNS, argv, state.state_dir / "logs" / f"scheduler-{cluster.name}.log")


#: Built schedulers: name -> start function. ``none`` is not here: it starts nothing.
STARTERS: dict[str, SchedulerStart] = {"kosmos": start_kosmos}

#: The command line a starter gives its scheduler, to restart one whose command line changed (a
#: starter not listed here is never restarted for that).
ARGVS: dict[SchedulerStart, Callable[[LabState, ClusterRecord], list[str]]] = {
    start_kosmos: kosmos_argv,
}

#: Schedulers the topology may name that this build cannot run, and why (none today).
NOT_BUILT: dict[str, str] = {}


def problems(cluster: LabCluster, kubernetes: bool) -> list[str]:
    """Why the lab cannot run ``cluster``'s scheduler (empty: it can)."""
    name = cluster.scheduler
    if name == "none" or not kubernetes or name in STARTERS:
        return []
    why = NOT_BUILT.get(name, "no such scheduler in this build")
    return [f"cluster {cluster.name}: scheduler {name!r}: {why}; use 'scheduler: none' instead"]


def start_scheduler(state: LabState, cluster: ClusterRecord, progress: Progress = quiet) -> ProcRecord | None:
    """Start ``cluster``'s scheduler unless it runs already (``none``: nothing to start)."""
    name = cluster.scheduler
    if name == "none":
        return None
    rec = cluster.scheduler_proc
    argv_of = ARGVS.get(STARTERS[name]) if name in STARTERS else None
    argv = argv_of(state, cluster) if argv_of is not None else None
    if rec is not None and rec.running():
        if argv is None or rec.argv == argv:
            return rec
        progress(f"lab {state.name}: restarting the scheduler of {cluster.name} (its command line changed)")
        nsutil.terminate([(rec.pid, rec.start)])
    start = STARTERS.get(name)
    if start is None:
        raise LabError(f"cluster {cluster.name}: scheduler {name!r}: "
                       f"{NOT_BUILT.get(name, 'no such scheduler in this build')}")
    rec = start(state, cluster)
    cluster.scheduler_proc = rec
    save_state(state)
    progress(f"lab {state.name}: scheduler {name} of {cluster.name} started (pid {rec.pid}, log {rec.log})")
    return rec


# -- the policy CRDs -------------------------------------------------------------------------


def crd_manifests(crd_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every CustomResourceDefinition in ``crd_dir`` (default :data:`CRD_DIR`), in file-name order;
    ``[]`` when the directory does not exist. A file that is no valid YAML, or a document that is
    no CRD, is an error naming the file: a broken manifest must not be skipped silently."""
    where = CRD_DIR if crd_dir is None else crd_dir
    if not where.is_dir():
        return []
    out: list[dict[str, Any]] = []
    for path in sorted(where.glob("*.yaml")) + sorted(where.glob("*.yml")):
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except (OSError, yaml.YAMLError) as e:
            raise LabError(f"scheduler CRD manifest {path}: cannot read it: {e}") from e
        for i, doc in enumerate(docs):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
                raise LabError(f"scheduler CRD manifest {path} document {i}: expected a CustomResourceDefinition, "
                               f"got {kind!r}")
            out.append(doc)
    return out


def _request(url: str, method: str, body: object = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            doc = {"message": raw[:300].decode(errors="replace")}
        return e.code, doc if isinstance(doc, dict) else {"message": str(doc)}


def install_crds(cluster: ClusterRecord, progress: Progress = quiet, crd_dir: Path | None = None) -> list[str]:
    """Create (or update to the tree's version) the scheduler's CRDs in ``cluster``'s API server
    and wait until each is ``Established``; returns their names (``[]``: no CRD directory).

    An existing CRD is replaced with the manifest (keeping its ``resourceVersion``), so a lab
    brought up again by a newer tree serves the newer schema, as ``kubectl apply`` would."""
    docs = crd_manifests(crd_dir)
    if not docs:
        _log.debug("no scheduler CRDs at %s: none installed in %s", crd_dir or CRD_DIR, cluster.name)
        return []
    return install_crd_docs(cluster, docs, "scheduler", progress)


def install_crd_docs(cluster: ClusterRecord, docs: list[dict[str, Any]], what: str,
                     progress: Progress = quiet) -> list[str]:
    """Create or update the CRDs ``docs`` in ``cluster``'s API server and wait until each is
    ``Established`` (``what`` names them in errors and progress: ``scheduler``, ``MCS``)."""
    assert cluster.api_url is not None
    base = f"{cluster.api_url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    names: list[str] = []
    for doc in docs:
        name = str((doc.get("metadata") or {}).get("name", ""))
        code, got = _request(base, "POST", doc)
        if code == 409:
            code, cur = _request(f"{base}/{name}", "GET")
            if code == 200:
                body = json.loads(json.dumps(doc))
                body.setdefault("metadata", {})["resourceVersion"] = (cur.get("metadata") or {}).get("resourceVersion")
                code, got = _request(f"{base}/{name}", "PUT", body)
        if code not in (200, 201):
            raise LabError(f"cluster {cluster.name}: installing the {what} CRD {name} failed: {code} "
                           f"{got.get('message', got)}")
        names.append(name)
    deadline = time.monotonic() + CRD_ESTABLISH_TIMEOUT_S
    for name in names:
        while True:
            code, cur = _request(f"{base}/{name}", "GET")
            conds = (cur.get("status") or {}).get("conditions") or [] if code == 200 else []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conds):
                break
            if time.monotonic() > deadline:
                raise LabError(f"cluster {cluster.name}: the {what} CRD {name} is not Established after "
                               f"{CRD_ESTABLISH_TIMEOUT_S:g} s (conditions: {conds})")
            time.sleep(0.05)
    progress(f"cluster {cluster.name}: {what} CRDs installed: {', '.join(names)}")
    return names


__all__ = ["ARGVS", "CRD_DIR", "NOT_BUILT", "STARTERS", "SchedulerStart", "crd_manifests", "fabric_flags",
           "install_crd_docs", "install_crds", "kosmos_argv", "problems",
           "scheduler_argv", "start_kosmos", "start_scheduler"]
