"""``kubernetes: true`` labs: one emulated API server (kubeemu), one lab kubelet
(:mod:`tools.lab.kubelet`) and one controller-manager (:mod:`kubeemu.ctrl`) per cluster, in the
root namespace on 127.0.0.1, and the lab's kubeconfig with a context per cluster; then per
cluster the lab kube-proxy, the lab service and the cluster DNS (``kube-system/kube-dns``,
:mod:`kubeemu.dns`; see the section at the end).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubeemu import lab as kubeemu_lab
from scheduler.policy import LEAF_NODE_LABEL
from tools import nsutil
from tools.lab import mcs as labmcs
from tools.lab import schedulers
from tools.lab.bpf import is_mountpoint
from tools.lab.plumbing import delete_netns, kube_pod_namespaces
from tools.lab.procs import ROOT_NETNS, log_tail, start_process, still_running
from tools.lab.state import (
    LAB_SERVICE,
    LAB_SERVICE_PORT,
    ClusterRecord,
    LabError,
    LabState,
    NodeRecord,
    ProcRecord,
    Progress,
    quiet,
    require_state,
    save_state,
    state_dir,
    state_file,
)

_log = logging.getLogger(__name__)

# -- Kubernetes (``kubernetes: true``) -------------------------------------------------------
#
# Per cluster, in this order: the emulated API server (``python -m kubeemu`` on 127.0.0.1, an
# ephemeral port; root namespace so kubectl reaches it), then the lab kubelet
# (``python -m tools.lab.kubelet``, root namespace: it runs ``ip`` on the lab's named namespaces
# and talks to its API server), then the controller-manager (``python -m kubeemu.ctrl``, root
# namespace, only talks to its API server), then the cluster's scheduler if its topology names one
# (:mod:`tools.lab.schedulers`; its policy CRDs are installed right after the API server
# starts, whichever scheduler runs), then the kubeconfig (one context per cluster). The processes are
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
                f"the API server of cluster {cluster.name} did not start: {e}{log_tail(str(log_path))}"
            ) from e
    assert cluster.apiserver is not None
    cluster.apiserver.argv = list(handle.argv)
    cluster.api_url = handle.url
    save_state(state)
    return cluster.apiserver


def mount_kubelet_root(state: LabState, cluster: ClusterRecord) -> None:
    """A tmpfs as the kubelet root of ``cluster`` (its pods' volumes, specs, records and logs),
    as upstream keeps secret and projected volumes in memory. On this machine the state
    directory's file system pays 0.3-0.9 ms of kernel time per new inode, and a pod needs ~25
    of them. A root that already holds files (a lab brought up by an earlier version, whose
    containers a restarted kubelet must adopt) is left on disk."""
    from tools.lab.kubelet import kubelet_root

    root = kubelet_root(state.state_dir, cluster.name)
    if is_mountpoint(root) or (root.is_dir() and any(root.iterdir())):
        return
    root.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", f"kosmos-lab-{state.name}", str(root)],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise LabError(f"cannot mount a tmpfs on {root} for the kubelet of cluster {cluster.name}: "
                       f"{p.stderr.strip()}")


def umount_kubelet_roots(name: str) -> list[Path]:
    """Unmount the kubelet roots of lab ``name`` (after its kubelets and containers are gone);
    returns those unmounted. One that cannot be is logged and left (``lab down`` says so)."""
    out = []
    for root in sorted(state_dir(name).glob("kubelet-*")):
        if not is_mountpoint(root):
            continue
        p = subprocess.run(["umount", str(root)], capture_output=True, text=True, check=False)
        if p.returncode != 0:
            _log.warning("cannot unmount the kubelet root %s: %s", root, p.stderr.strip())
            continue
        out.append(root)
    return out


def start_kubelet(state: LabState, cluster: ClusterRecord) -> ProcRecord:
    """Start the lab kubelet of ``cluster`` (it reads the nodes from the state file, saved first)
    on its tmpfs root (:func:`mount_kubelet_root`)."""
    assert cluster.api_url is not None
    mount_kubelet_root(state, cluster)
    argv = [sys.executable, "-m", "tools.lab.kubelet", "--state", str(state_file(state.name)),
            "--cluster", cluster.name, "--url", cluster.api_url]  # fmt: skip
    if cluster.dns_ip:  # upstream's kubelet flags (KubeletConfiguration clusterDNS / clusterDomain)
        argv += ["--cluster-dns", cluster.dns_ip, "--cluster-domain", CLUSTER_DOMAIN]
    rec = start_process(ROOT_NETNS, argv, state.state_dir / "logs" / f"kubelet-{cluster.name}.log")
    cluster.kubelet = rec
    save_state(state)
    return rec


def start_controller_manager(state: LabState, cluster: ClusterRecord) -> ProcRecord:
    """Start the controller-manager of ``cluster`` (every controller ``kubeemu.ctrl`` registers).

    It keeps no state of its own: a restarted one re-lists from the API server and, its
    controllers being idempotent, creates and deletes nothing twice."""
    assert cluster.api_url is not None
    argv = [sys.executable, "-m", "kubeemu.ctrl", "--server", cluster.api_url, "--controllers", "all",
            "--root-ca-file", str(root_ca_file(state)), *storage_args(state, cluster)]
    rec = start_process(ROOT_NETNS, argv, state.state_dir / "logs" / f"controller-manager-{cluster.name}.log")
    cluster.controller_manager = rec
    save_state(state)
    return rec


def start_kubernetes(state: LabState, added: Sequence[str], progress: Progress = quiet) -> None:
    """Start what is not running: API servers, then kubelets, then controller-managers; write
    the kubeconfig.

    A new API server starts empty, so the kubelet pods of its cluster that an earlier server
    left (after a crash) are removed and the kubelet and controller-manager are restarted against
    the new URL. A kubelet is also restarted when nodes were ``added`` to its cluster (it
    registers them at start). A controller-manager that died is started again.
    """
    for c in state.clusters:
        if c.apiserver is None or not c.apiserver.running() or c.api_url is None:
            stale = [r for r in (c.apiserver, c.kubelet, c.controller_manager, c.scheduler_proc, c.dns_proc)
                     if r is not None and r.running()]
            if stale:
                nsutil.terminate([(r.pid, r.start) for r in stale])
            c.apiserver = c.kubelet = c.controller_manager = c.scheduler_proc = c.dns_proc = None
            leftovers = delete_netns(kube_pod_namespaces(c))
            if leftovers:
                progress(f"lab {state.name}: removed {len(leftovers)} pod namespaces of an old API server of {c.name}")
            api_rec = start_apiserver(state, c)
            progress(f"lab {state.name}: API server of {c.name} at {c.api_url} (pid {api_rec.pid}, log {api_rec.log})")
            stale_volumes = storage_root(state, c)
            if stale_volumes.exists():  # their PersistentVolumes died with the old API server
                shutil.rmtree(stale_volumes, ignore_errors=True)
            apply_default_storage_class(c)
            schedulers.install_crds(c, progress)
        ensure_dns_service(state, c, progress)  # before the kubelet: its --cluster-dns is this ClusterIP
        grown = any(k.startswith(f"{c.name}/") for k in added)
        if c.kubelet is not None and c.kubelet.running() and grown:
            progress(f"lab {state.name}: restarting the kubelet of {c.name} for its new nodes")
            nsutil.terminate([(c.kubelet.pid, c.kubelet.start)])
            c.kubelet = None
        if c.kubelet is None or not c.kubelet.running():
            rec = start_kubelet(state, c)
            progress(f"lab {state.name}: lab kubelet of {c.name} started (pid {rec.pid}, log {rec.log})")
        if c.controller_manager is None or not c.controller_manager.running():
            rec = start_controller_manager(state, c)
            progress(f"lab {state.name}: controller-manager of {c.name} started (pid {rec.pid}, log {rec.log})")
        schedulers.start_scheduler(state, c, progress)
    write_kubeconfig(state)
    labmcs.plan_dns(state)  # the clusterset.local stub domains, before each cluster DNS starts
    for c in state.clusters:
        start_proxy(state, c, progress)
        ensure_lab_service(state, c, progress)
        start_dns(state, c, progress)


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
    state = require_state(name)
    if not state.kubernetes:
        raise LabError(f"lab {name} runs no Kubernetes API servers (its topology lacks 'kubernetes: true')")
    if not state.kubeconfig.exists():
        raise LabError(f"lab {name}: no kubeconfig at {state.kubeconfig} yet; run 'fabric-tool lab up' to finish it")
    return state.kubeconfig


def wait_kube_nodes(state: LabState, timeout_s: float, progress: Progress = quiet) -> None:
    """Wait until every lab node is a Ready Node of its cluster's API server."""
    deadline = time.monotonic() + timeout_s
    for c in state.clusters:
        while True:
            missing, err = kube_nodes_ready(c)
            if not missing:
                break
            for what, rec in (("API server", c.apiserver), ("kubelet", c.kubelet),
                              ("controller-manager", c.controller_manager)):
                if rec is None or not rec.running():
                    log = rec.log if rec else "(never started)"
                    raise LabError(f"the {what} of cluster {c.name} is not running; see {log}"
                                   f"{log_tail(log) if rec else ''}")  # fmt: skip
            if time.monotonic() > deadline:
                log = c.kubelet.log if c.kubelet else "?"
                raise LabError(f"cluster {c.name}: nodes {', '.join(missing)} not Ready in the API server after "
                               f"{timeout_s:g} s ({err or 'not registered'}); see {log}")  # fmt: skip
            time.sleep(0.1)


# -- Storage (issue 15) ------------------------------------------------------------------------
#
# A real cluster gets its default StorageClass from an addon manifest; the lab applies its own
# right after each API server starts: ``lab-local`` (kubeemu.ctrl.volume.default_storage_class),
# served by the controller-manager's ``lab-local-provisioner``. Volume directories live under
# ``storage_root`` (the controller-manager's ``--storage-root``), inside the state directory, so
# ``lab down`` removes them with it; a restarted (empty) API server's leftovers are removed above.


def root_ca_file(state: LabState) -> Path:
    """``<state dir>/ca.crt``: the lab's cluster CA certificate, made once per lab and published by
    every controller-manager as ``kube-root-ca.crt`` (pods' token volumes need it)."""
    path = state.state_dir / "ca.crt"
    if not path.exists():
        from kubeemu.ctrl.rootca import self_signed_ca

        tmp = path.with_suffix(".tmp")
        tmp.write_text(self_signed_ca(f"kosmos-lab-{state.name}"))
        tmp.replace(path)
    return path


def storage_root(state: LabState, cluster: ClusterRecord) -> Path:
    """``<state dir>/volumes/<cluster>``: pass it as ``python -m kubeemu.ctrl --storage-root``."""
    return state.state_dir / "volumes" / cluster.name


def storage_args(state: LabState, cluster: ClusterRecord) -> list[str]:
    """What ``python -m kubeemu.ctrl`` needs for the lab's storage: ``--storage-root DIR`` and
    ``--storage-node-selector`` = not a ClusterTree virtual node (``kosmos.io/node=true``): the
    lab's kubelets run the real nodes, and a claim whose consumer was scheduled onto a virtual
    node is provisioned in its leaf and mirrored back by ``kosmos-tree``, as with a node-local
    CSI driver whose DaemonSet never runs on a virtual node."""
    return ["--storage-root", str(storage_root(state, cluster)),
            "--storage-node-selector", f"{LEAF_NODE_LABEL}!=true"]


def apply_default_storage_class(cluster: ClusterRecord) -> None:
    """Create the default StorageClass ``lab-local`` in ``cluster``'s API server (kept if present)."""
    from kubeemu.ctrl.volume import default_storage_class

    assert cluster.api_url is not None
    body = json.dumps(default_storage_class()).encode()
    req = urllib.request.Request(f"{cluster.api_url}/apis/storage.k8s.io/v1/storageclasses", data=body,
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10):
            pass
    except urllib.error.HTTPError as e:
        if e.code != 409:  # AlreadyExists: a class of that name is there; leave it as it is
            raise LabError(f"cluster {cluster.name}: creating the default StorageClass lab-local failed: "
                           f"{e.code} {e.read()[:300].decode(errors='replace')}") from e
    except OSError as e:
        raise LabError(f"cluster {cluster.name}: creating the default StorageClass lab-local failed: {e}") from e


# -- the lab kube-proxy and the lab service (``kubernetes: true``) ----------------------------
#
# Per cluster, after its API server and kubelet: one ``python -m kubeemu.proxy`` (root
# namespace, like the kubelet: it talks to the API server on 127.0.0.1 and programs every node
# namespace of the cluster through ``nsenter``), restarted when its arguments change (a new API
# server URL, nodes added); then the lab service: a selector-less Service ``LAB_SERVICE`` whose
# EndpointSlice (ours, not the controller's: the static pods are no API objects) lists the
# cluster's static pods, so ``check --services`` has one real Service per cluster to probe.

#: ``endpointslice.kubernetes.io/managed-by`` of the lab service's slice (not the controller's).
LAB_SLICE_MANAGER = "lab.kosmos.io"


def proxy_argv(cluster: ClusterRecord) -> list[str]:
    """The lab kube-proxy's command line for ``cluster`` (every node, the cluster's CIDRs)."""
    assert cluster.api_url is not None
    argv = [sys.executable, "-m", "kubeemu.proxy", "--server", cluster.api_url,
            "--cluster-cidr", ",".join(cluster.pod_cidrs), "--service-cidr", ",".join(cluster.service_cidrs)]
    for n in cluster.nodes:
        argv += ["--node", f"{n.name}:{n.netns}"]
    return argv


def start_proxy(state: LabState, cluster: ClusterRecord, progress: Progress = quiet) -> ProcRecord:
    """Start the lab kube-proxy of ``cluster`` unless one with the same arguments runs."""
    argv = proxy_argv(cluster)
    if (rec := still_running(cluster.proxy, argv, progress, f"lab {state.name}: restarting the kube-proxy of "
                             f"{cluster.name} (new API server or nodes)")) is not None:
        return rec
    rec = start_process(ROOT_NETNS, argv, state.state_dir / "logs" / f"kube-proxy-{cluster.name}.log")
    cluster.proxy = rec
    save_state(state)
    progress(f"lab {state.name}: lab kube-proxy of {cluster.name} started (pid {rec.pid}, log {rec.log})")
    return rec


def _api(cluster: ClusterRecord, method: str, path: str, body: object = None) -> dict[str, Any] | None:
    """One JSON request to ``cluster``'s API server; None for 404."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{cluster.api_url}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            doc: dict[str, Any] = json.loads(r.read() or b"{}")
            return doc
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise LabError(f"cluster {cluster.name}: {method} {path}: {e.code} {e.read()[:300].decode(errors='replace')}"
                       ) from e
    except (OSError, ValueError) as e:
        raise LabError(f"cluster {cluster.name}: {method} {path}: {e}") from e


def lab_service_objects(cluster: ClusterRecord) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The lab Service of ``cluster`` and its EndpointSlices (one per family the cluster runs),
    listing every static pod of every node as a ready endpoint."""
    ns, name = LAB_SERVICE.split("/")
    fams = ["IPv4" if f == 4 else "IPv6" for f in cluster.ip_families]
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/managed-by": "fabric-lab"}},
           "spec": {"type": "ClusterIP", "ipFamilies": fams,
                    "ipFamilyPolicy": "RequireDualStack" if len(fams) > 1 else "SingleStack",
                    "ports": [{"name": "probe", "protocol": "TCP", "port": LAB_SERVICE_PORT,
                               "targetPort": LAB_SERVICE_PORT}]}}
    slices = []
    for fam in fams:
        eps = [{"addresses": [ip], "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": n.name}
               for n in cluster.nodes for p in n.pods if (ip := (p.ip if fam == "IPv4" else p.ip6))]
        slices.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": f"{name}-{fam.lower()}", "namespace": ns,
                                    "labels": {"kubernetes.io/service-name": name,
                                               "endpointslice.kubernetes.io/managed-by": LAB_SLICE_MANAGER}},
                       "addressType": fam, "endpoints": eps,
                       "ports": [{"name": "probe", "protocol": "TCP", "port": LAB_SERVICE_PORT}]})
    return svc, slices


def ensure_lab_service(state: LabState, cluster: ClusterRecord, progress: Progress = quiet) -> None:
    """Create (or bring up to date) the lab Service of ``cluster`` and record its ClusterIPs.
    A cluster without service CIDRs or static pods has none (as without Kubernetes)."""
    if not cluster.service_cidrs or not any(n.pods for n in cluster.nodes):
        return
    svc, slices = lab_service_objects(cluster)
    ns, name = LAB_SERVICE.split("/")
    base = f"/api/v1/namespaces/{ns}/services"
    cur = _api(cluster, "GET", f"{base}/{name}") or _api(cluster, "POST", base, svc)
    assert cur is not None
    sbase = f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
    for sl in slices:
        old = _api(cluster, "GET", f"{sbase}/{sl['metadata']['name']}")
        if old is None:
            _api(cluster, "POST", sbase, sl)
        elif (old.get("endpoints") or []) != sl["endpoints"]:
            sl["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            _api(cluster, "PUT", f"{sbase}/{sl['metadata']['name']}", sl)
    ips = [ip for ip in (cur.get("spec") or {}).get("clusterIPs") or [] if ip and ip != "None"]
    v4 = next((ip for ip in ips if ":" not in ip), None)
    v6 = next((ip for ip in ips if ":" in ip), None)
    if (cluster.service_ip, cluster.service_ip6, cluster.service_name, cluster.service_port) != (
            v4, v6, LAB_SERVICE, LAB_SERVICE_PORT):
        cluster.service_ip, cluster.service_ip6 = v4, v6
        cluster.service_backend = cluster.service_backend6 = None
        cluster.service_name, cluster.service_port = LAB_SERVICE, LAB_SERVICE_PORT
        save_state(state)
        progress(f"lab {state.name}: lab service {LAB_SERVICE} of {cluster.name} at "
                 f"{', '.join(ips)} port {LAB_SERVICE_PORT}/TCP (lab kube-proxy)")


# -- the cluster DNS (``kubernetes: true``) ----------------------------------------------------
#
# Per cluster, as kubeadm sets a cluster up: the Service ``kube-system/kube-dns`` (ports ``dns``
# 53/UDP and ``dns-tcp`` 53/TCP) with the 10th address of the first service CIDR as ClusterIP
# (kubeadm's ``GetDNSIP``), created right after the API server starts and before the kubelet,
# whose ``--cluster-dns`` it is; then the responder, ``python -m kubeemu.dns``: root namespace
# (it talks to the API server on 127.0.0.1), its UDP/TCP sockets opened inside the cluster's
# first node's namespace on the node's address(es), port 53. The Service has no selector (the
# responder is no API object, as the lab service's static pods are not); its EndpointSlice, ours,
# lists that node address, so pods reach the ClusterIP through the lab kube-proxy as any
# Service. Restarted when its arguments change (new API server, stub domains); ``lab down``
# stops it with the other Kubernetes processes; the supervisor restarts it when it dies.

#: The cluster domain of every lab cluster (kubeadm's default ``networking.dnsDomain``).
CLUSTER_DOMAIN = "cluster.local"
DNS_SERVICE = "kube-system/kube-dns"
DNS_PORT = 53


def dns_service_ip(cluster: ClusterRecord) -> str | None:
    """The 10th address of the cluster's first service CIDR (kubeadm); None without one, or
    when that CIDR is too small to hold it (kubeadm refuses such a cluster; the lab runs it
    without cluster DNS, and its kubelet falls back to the Default policy, as upstream's)."""
    if not cluster.service_cidrs:
        return None
    net = ipaddress.ip_network(cluster.service_cidrs[0], strict=False)
    if net.num_addresses <= 11:
        return None
    return str(net.network_address + 10)


def dns_node(cluster: ClusterRecord) -> NodeRecord:
    """The node whose namespace the cluster DNS answers in (the first node of the cluster)."""
    return cluster.nodes[0]


def dns_objects(cluster: ClusterRecord, ip: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``kube-dns`` Service (ClusterIP ``ip``) and its EndpointSlice (the DNS node's address
    of that family, port 53 UDP and TCP)."""
    ns, name = DNS_SERVICE.split("/")
    fam = "IPv6" if ":" in ip else "IPv4"
    node = dns_node(cluster)
    addr = node.underlay_ip6 if fam == "IPv6" else node.underlay_ip
    ports = [{"name": "dns", "protocol": "UDP", "port": DNS_PORT},
             {"name": "dns-tcp", "protocol": "TCP", "port": DNS_PORT}]
    labels = {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS", "app.kubernetes.io/managed-by": "fabric-lab"}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": [fam],
                    "ipFamilyPolicy": "SingleStack",
                    "ports": [{**p, "targetPort": DNS_PORT} for p in ports]}}
    eps = [{"addresses": [addr], "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": node.name}] if addr else []
    sl = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": f"{name}-lab", "namespace": ns,
                       "labels": {"kubernetes.io/service-name": name,
                                  "endpointslice.kubernetes.io/managed-by": LAB_SLICE_MANAGER}},
          "addressType": fam, "endpoints": eps, "ports": ports}
    return svc, sl


def ensure_dns_service(state: LabState, cluster: ClusterRecord, progress: Progress = quiet) -> None:
    """Create (or bring up to date) ``kube-dns`` of ``cluster`` and record its ClusterIP. A
    Service of that name that is already there keeps its ClusterIP (its kubelet was given it)."""
    ip = dns_service_ip(cluster)
    if ip is None or not cluster.nodes:
        return
    ns, name = DNS_SERVICE.split("/")
    svc, sl = dns_objects(cluster, ip)
    base = f"/api/v1/namespaces/{ns}/services"
    cur = _api(cluster, "GET", f"{base}/{name}")
    if cur is None:
        try:
            cur = _api(cluster, "POST", base, svc)
        except LabError as e:
            raise LabError(f"cluster {cluster.name}: the cluster DNS Service {DNS_SERVICE} needs ClusterIP {ip} "
                           f"(the 10th address of service CIDR {cluster.service_cidrs[0]}, as kubeadm): {e}") from e
    assert cur is not None
    got = (cur.get("spec") or {}).get("clusterIP") or ip
    if got != ip:
        svc, sl = dns_objects(cluster, got)
    sbase = f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
    old = _api(cluster, "GET", f"{sbase}/{sl['metadata']['name']}")
    if old is None:
        _api(cluster, "POST", sbase, sl)
    elif (old.get("endpoints"), old.get("ports")) != (sl["endpoints"], sl["ports"]):
        sl["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        _api(cluster, "PUT", f"{sbase}/{sl['metadata']['name']}", sl)
    if cluster.dns_ip != got:
        cluster.dns_ip = got
        save_state(state)
        progress(f"lab {state.name}: cluster DNS {DNS_SERVICE} of {cluster.name} at {got} port {DNS_PORT} "
                 f"(answered on node {dns_node(cluster).name})")


def dns_argv(cluster: ClusterRecord) -> list[str]:
    """The cluster DNS's command line: its API server, domain, the DNS node's namespace and
    addresses, and the cluster's stub domains."""
    assert cluster.api_url is not None
    node = dns_node(cluster)
    argv = [sys.executable, "-m", "kubeemu.dns", "--server", cluster.api_url, "--cluster-domain", CLUSTER_DOMAIN,
            "--netns", node.netns]
    for ip in (node.underlay_ip, node.underlay_ip6):
        if ip:
            argv += ["--listen", f"[{ip}]:{DNS_PORT}" if ":" in ip else f"{ip}:{DNS_PORT}"]
    for stub in cluster.dns_stubs:
        argv += ["--stub-domain", stub]
    return argv


def start_dns(state: LabState, cluster: ClusterRecord, progress: Progress = quiet) -> ProcRecord | None:
    """Start the cluster DNS of ``cluster`` unless one with the same arguments runs (None for a
    cluster without service CIDR or API server)."""
    if cluster.api_url is None or not cluster.nodes or dns_service_ip(cluster) is None:
        return None
    argv = dns_argv(cluster)
    if (rec := still_running(cluster.dns_proc, argv, progress, f"lab {state.name}: restarting the cluster DNS of "
                             f"{cluster.name} (new API server or stub domains)")) is not None:
        return rec
    rec = start_process(ROOT_NETNS, argv, state.state_dir / "logs" / f"dns-{cluster.name}.log")
    cluster.dns_proc = rec
    save_state(state)
    progress(f"lab {state.name}: cluster DNS of {cluster.name} started (pid {rec.pid}, log {rec.log})")
    return rec
