"""Multi-cluster services in a ``kubernetes: true`` lab: one ``kosmos-mcs`` (issue 18) with every
lab cluster as a member, and each cluster's DNS forwarding ``clusterset.local`` to it.

Order in ``lab up``:

1. before the cluster DNS starts (:func:`tools.lab.kube.start_kubernetes`), :func:`plan_dns`
   gives each cluster a port on 127.0.0.1 for its clusterset responder (a free one, kept in the
   state file as the cluster's stub domain ``clusterset.local=127.0.0.1:PORT``, so a restarted
   ``kosmos-mcs`` answers where the DNS forwards; the DNS forwards from the root namespace,
   where 127.0.0.1 is the responder's);
2. once every cluster's nodes are Ready, :func:`start_mcs`: the ServiceExport/ServiceImport CRDs
   (``deploy/base/member/crd-service*.yaml``, as ``fabric-tool join`` installs them in a member)
   in every cluster, the ``mcs/lab`` certificate from the lab's CA (:mod:`tools.lab.labpki`),
   then ``python -m mcs.main`` in the root namespace: ``--master`` the host's API server (the
   host ``fabric-tool install --lab`` used, else ``role: host``, else the first cluster),
   ``--member NAME=URL`` per cluster,
   ``--reflector unix:<the lab reflector's socket>`` with ``--tls-dir`` (reachability records:
   endpoints of a cluster cut off turn not ready), ``--dns-listen NAME=127.0.0.1:PORT`` per
   cluster and ``--global-cidr`` from the topology's ``globalCIDRs`` (the lab's fabric comes from
   its file, not from Cluster objects; after ``fabric-tool install --lab`` it comes from the
   host's Cluster objects, which kosmos-mcs then reads itself). Restarted when its command line changed (a new API
   server, new clusters);
3. the supervisor (:mod:`tools.lab.supervisor`) restarts it when it dies; ``lab down`` stops it
   with the other processes; ``lab status`` shows it.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fabric.control import identity
from tools import ports
from tools.lab import labpki, schedulers
from tools.lab.procs import ROOT_NETNS, start_process, still_running
from tools.lab.state import ClusterRecord, LabError, LabState, ProcRecord, Progress, quiet, save_state

#: The MCS CRDs a member cluster serves (what ``fabric-tool join`` applies from the member base).
CRD_FILES = tuple(Path(__file__).resolve().parents[2] / "deploy" / "base" / "member" / f
                  for f in ("crd-serviceexports.yaml", "crd-serviceimports.yaml"))
ZONE = "clusterset.local"
STUB_PREFIX = f"{ZONE}=127.0.0.1:"
IDENTITY = identity.role(identity.MCS, "lab")


def enabled(state: LabState) -> bool:
    """Every ``kubernetes: true`` lab runs it (its cost on ``lab up`` is in the README)."""
    return state.kubernetes and bool(state.clusters)


def dns_port(cluster: ClusterRecord) -> int | None:
    """The port of ``cluster``'s clusterset responder, from its stub domain (None: none yet)."""
    for stub in cluster.dns_stubs:
        if stub.startswith(STUB_PREFIX) and stub[len(STUB_PREFIX):].isdigit():
            return int(stub[len(STUB_PREFIX):])
    return None


def plan_dns(state: LabState) -> None:
    """Give every cluster without one its clusterset stub domain (saved before the DNS starts)."""
    if not enabled(state):
        return
    changed = False
    for c in state.clusters:
        if dns_port(c) is None:
            c.dns_stubs = [*c.dns_stubs, f"{STUB_PREFIX}{ports.free_port()}"]
            changed = True
    if changed:
        save_state(state)


def installed(state: LabState) -> bool:
    """Does the lab's fabric come from Cluster objects (``fabric-tool install --lab``)?"""
    from tools import install  # late: install imports the lab

    return install.lab_fabric_installed(state)


def host_cluster(state: LabState) -> ClusterRecord:
    """Where ``kosmos-mcs`` reads Cluster objects and would hold its Lease: the host ``fabric-tool
    install`` used, else the topology's ``role: host``, else the first cluster."""
    from tools import install  # late: install imports the lab

    name = install.lab_host_context(state)
    return next((c for c in state.clusters if c.name == name), state.clusters[0])


def mcs_argv(state: LabState) -> list[str]:
    """``kosmos-mcs``'s command line for the lab (module docstring). ``--leader-elect=false``: the
    lab runs one replica, and a restarted one must not wait out a killed one's Lease before
    importing again; ``--listen 127.0.0.1:0``: labs share the root namespace."""
    host = host_cluster(state)
    argv = [sys.executable, "-m", "mcs.main", "--master", host.api_url or "", "--leader-elect=false",
            "--listen", "127.0.0.1:0", "--reflector", f"unix:{state.reflector_socket}",
            "--tls-dir", str(labpki.pki_root(state) / "mcs")]
    for c in state.clusters:
        argv += ["--member", f"{c.name}={c.api_url}"]
    for c in state.clusters:
        port = dns_port(c)
        if port is not None:
            argv += ["--dns-listen", f"{c.name}=127.0.0.1:{port}"]
    if not installed(state):  # installed: the Cluster objects say, as they tell the reflector
        for c in state.clusters:
            for local, glob in sorted(c.global_cidrs.items()):
                argv += ["--global-cidr", f"{c.name}:{local}={glob}"]
    return argv


def crd_docs() -> list[dict[str, Any]]:
    out = []
    for path in CRD_FILES:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except (OSError, yaml.YAMLError) as e:
            raise LabError(f"MCS CRD manifest {path}: cannot read it: {e}") from e
        out += docs
    return out


def ensure_certificate(state: LabState) -> Path:
    """``mcs/lab``: the certificate ``kosmos-mcs`` reads the reflector's records with."""
    return labpki.client_dir(state, "mcs", IDENTITY, datetime.timedelta(days=365))


def start_mcs(state: LabState, progress: Progress = quiet) -> ProcRecord | None:
    """Start ``kosmos-mcs`` unless one with the same command line runs (None: not in this lab, or
    an API server is not up)."""
    if not enabled(state) or any(c.api_url is None for c in state.clusters):
        return None
    argv = mcs_argv(state)
    if (rec := still_running(state.mcs_proc, argv, progress,
                             f"lab {state.name}: restarting kosmos-mcs (its command line changed)")) is not None:
        return rec
    t0 = time.monotonic()
    docs = crd_docs()
    for c in state.clusters:
        schedulers.install_crd_docs(c, docs, "MCS", progress)
    ensure_certificate(state)
    rec = start_process(ROOT_NETNS, argv, state.state_dir / "logs" / "mcs.log")
    state.mcs_proc = rec
    save_state(state)
    ports = ", ".join(f"{c.name} {dns_port(c)}" for c in state.clusters)
    progress(f"lab {state.name}: kosmos-mcs started in {time.monotonic() - t0:.2f} s (CRDs, certificate; pid "
             f"{rec.pid}, log {rec.log}); {ZONE} on 127.0.0.1 ({ports})")
    return rec
