"""Kubernetes benchmark (issue 15): a Deployment from ``kubectl apply`` to all Ready in a lab,
against the lab's own pod plumbing driven directly; API server memory per 1,000 pods.

On a fresh ``kubernetes: true`` lab (one cluster, four nodes; torn down afterwards), each round:

1. **ours** - ``kubectl apply`` of a namespace and 200 replicas (20 with ``--tiny``) of an idle
   container (no command: the runtime runs an idle process; the point is the Kubernetes
   machinery, not the app), then the Deployments' ``status.readyReplicas`` are polled over the
   API until all are Ready. ``pods/s`` = replicas / (apply to all Ready). It is one Deployment
   of all replicas, placed by the lab's scheduler; ``SINGLE_DEPLOYMENT = False`` makes it one
   Deployment per node pinned with ``spec.template.spec.nodeName`` (no scheduler in the path).
   The RSS of the cluster's API server (``/proc/PID/status``) before the apply and once all
   are Ready gives its growth per 1,000 pods (round 1 is the honest one: later rounds reuse
   memory the first freed, so their growth reads lower).
   Meanwhile a :class:`Timeline` notes when each pod reached each stage (:data:`STAGES`:
   created, bound, its network made, its shim started, podIP, running, Ready) and the CPU
   seconds of every component are read from ``/proc`` (:func:`cpu_snapshot`); both go into the
   notes, so a reader sees where the time goes.
   The namespace is then deleted and the round waits until every pod namespace is gone and
   the kernel has stopped freeing them (:func:`wait_kernel_settled`: a deleted network
   namespace is freed later by a kernel worker whose CPU would otherwise slow the next phase).
2. **baseline** - as many pod namespaces made with the lab's pod plumbing directly
   (``tools.lab.add_pod``: namespace, veth, /32 route, proxy ARP, addresses: three ``ip`` runs
   and a sysctl thread per pod), one after another on the same nodes, then removed, and again
   the kernel is let settle before the next round. ``ratio`` = ours /
   baseline pods/s (aim >= 0.5: the Kubernetes path costs at most as much as the plumbing).
   The kubelet makes its pods' networks with ``tools.lab.add_pods``: the same commands, but the
   pods waiting on a node at once share the runs in the root and node namespaces (each pod
   still has its own run inside it); that sharing is part of what "ours" measures, the
   baseline is one pod after another, as issue 15 defines it.

Besides the lab, ``kubeemu_rss_per_1000_pods`` measures a separate ``python -m kubeemu`` process
holding 1,000 ReplicaSet-owned running pods (:func:`kubeemu.bench.rss_per_1000_pods`), against
the same pods' size as JSON.

Needs root (the lab), kubectl, and a lab whose clusters run the controller-manager and the
process runtime (issue 15); without them the Deployments never become Ready and the round fails
with what it saw.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tools import lab
from tools.bench import common as bc

_log = logging.getLogger(__name__)
NAME = "k8s"
HELP = ("a 200-replica Deployment from kubectl apply to all Ready in a lab, pods/s (baseline: as many pod "
        "namespaces made with the lab's pod plumbing directly); API server RSS per 1,000 pods")

NAMESPACE = "bench-k8s"
#: One Deployment of all replicas, placed by the lab's scheduler (kosmos-scheduler, the lab
#: default); False: one Deployment per node, pinned with nodeName (no scheduler in the path).
SINGLE_DEPLOYMENT = True
NODES = ("k1", "k2", "k3", "k4")


def requires(opts: bc.Options) -> list[str]:
    return bc.need_root("the k8s benchmark") + bc.need_programs("ip", "kubectl")


def supported() -> bool:
    """A build whose controller-manager has a Deployment controller (issue 15, item 4)."""
    try:
        from kubeemu.ctrl.manager import registry
    except ImportError:
        return False
    return any("deployment" in name for name in registry())


def topology(nodes: int) -> dict[str, Any]:
    return {"underlay": "198.18.0.0/16", "kubernetes": True, "clusters": [{
        "name": "bench", "mode": "p2p", "podCIDRs": ["10.44.0.0/16"], "serviceCIDRs": ["10.96.0.0/20"],
        "nodes": [{"name": n, "pods": 1} for n in NODES[:nodes]]}]}


def manifest(replicas: int, nodes: list[str], single: bool) -> str:
    """A Namespace and the Deployment(s) of ``replicas`` idle pods, as ``kubectl apply`` reads it."""
    docs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
    groups = [("bench", replicas, None)] if single else [
        (f"bench-{n}", replicas // len(nodes) + (1 if i < replicas % len(nodes) else 0), n)
        for i, n in enumerate(nodes)]
    for name, count, node in groups:
        spec: dict[str, Any] = {"containers": [{"name": "idle", "image": "registry.k8s.io/pause:3.10"}],
                                "terminationGracePeriodSeconds": 0}
        if node:
            spec["nodeName"] = node
        docs.append({"apiVersion": "apps/v1", "kind": "Deployment",
                     "metadata": {"name": name, "namespace": NAMESPACE},
                     "spec": {"replicas": count, "selector": {"matchLabels": {"app": name}},
                              "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}})
    return "\n".join(json.dumps(d) for d in docs)  # kubectl reads a stream of JSON documents


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def _kubectl(state: lab.LabState, cluster: str, *args: str, stdin: str | None = None) -> None:
    kubectl = shutil.which("kubectl") or "kubectl"
    res = subprocess.run([kubectl, "--kubeconfig", str(state.kubeconfig), "--context", cluster, *args],
                         input=stdin, capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {res.stderr.strip()[:400]}")


def _ready(api: str) -> tuple[int, int]:
    """(ready replicas, desired replicas) over the benchmark's Deployments."""
    doc = _get(f"{api}/apis/apps/v1/namespaces/{NAMESPACE}/deployments") or {"items": []}
    ready = sum(int((d.get("status") or {}).get("readyReplicas") or 0) for d in doc["items"])
    want = sum(int((d.get("spec") or {}).get("replicas") or 0) for d in doc["items"])
    return ready, want


def _pod_phases(api: str) -> dict[str, int]:
    doc = _get(f"{api}/api/v1/namespaces/{NAMESPACE}/pods") or {"items": []}
    out: dict[str, int] = {}
    for p in doc["items"]:
        ph = (p.get("status") or {}).get("phase", "?")
        out[ph] = out.get(ph, 0) + 1
    return out


def wait_ready(api: str, replicas: int, timeout_s: float) -> float:
    """Seconds until ``replicas`` are Ready (polled every 0.1 s); progress every 5 s."""
    t0 = time.monotonic()
    next_report = t0 + 5
    while True:
        ready, want = _ready(api)
        now = time.monotonic()
        if want == replicas and ready >= replicas:
            return now - t0
        if now > t0 + timeout_s:
            raise RuntimeError(f"only {ready} of {replicas} replicas Ready after {timeout_s:g} s (pods by phase: "
                               f"{_pod_phases(api)}); does the lab run the controller-manager and the runtime?")
        if now >= next_report:
            bc.progress(NAME, f"  {ready}/{replicas} Ready after {now - t0:.0f} s")
            next_report = now + 5
        time.sleep(0.1)


def wait_gone(state: lab.LabState, cluster: lab.ClusterRecord, timeout_s: float) -> None:
    """Until the benchmark namespace and every kubelet pod namespace of the cluster are gone."""
    deadline = time.monotonic() + timeout_s
    while _get(f"{cluster.api_url}/api/v1/namespaces/{NAMESPACE}") is not None or lab.kube_pod_namespaces(cluster):
        if time.monotonic() > deadline:
            raise RuntimeError(f"namespace {NAMESPACE} or pod namespaces still there after {timeout_s:g} s: "
                               f"{len(lab.kube_pod_namespaces(cluster))} pod namespaces left")
        time.sleep(0.2)


def kernel_netns() -> int | None:
    """Network namespaces the kernel holds, freed or not: the active ``net_namespace`` objects
    of ``/proc/slabinfo`` (None where the kernel does not show that cache). A deleted namespace
    leaves ``ip netns`` at once, but the kernel frees it later, in a worker (``cleanup_net``)
    that takes CPU from whatever runs meanwhile."""
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                if line.startswith("net_namespace "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def wait_kernel_settled(before: int | None, timeout_s: float = 30.0) -> str:
    """Until the kernel has stopped freeing the namespaces of the previous phase (the count of
    ``net_namespace`` objects holds still for 2 s), so that neither ours nor the baseline runs
    beside the other's teardown; returns a note of what was seen (``before``: the count when the
    round began; some namespaces can stay held longer, e.g. by sockets in TIME_WAIT, so the count
    need not come back to it)."""
    if before is None:
        return "kernel namespace cleanup not observable (no net_namespace in /proc/slabinfo)"
    t0 = time.monotonic()
    last, still_since = kernel_netns(), t0
    while time.monotonic() - t0 < timeout_s:
        time.sleep(0.2)
        now = kernel_netns()
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= 2.0:
            return (f"kernel namespace cleanup settled after {time.monotonic() - t0:.1f} s "
                    f"({last} held, {before} at the round's start)")
    return (f"kernel still freeing namespaces after {timeout_s:g} s ({last} held, {before} at the round's "
            "start); went on")


def baseline_pods(cluster: lab.ClusterRecord, count: int) -> list[tuple[lab.NodeRecord, lab.PodRecord]]:
    """``count`` pod records spread over the nodes, with addresses from the top of each node's pod
    CIDR (clear of static pods and of the kubelet's, which count from the bottom) and namespace
    names (``-b<N>``) no kubelet claims."""
    out = []
    for i in range(count):
        node = cluster.nodes[i % len(cluster.nodes)]
        net = ipaddress.ip_network(node.pod_cidr)
        ip = str(net.broadcast_address - 1 - i // len(cluster.nodes))
        out.append((node, lab.PodRecord(name=f"b{i}", netns=f"{node.netns}-b{i}", ip=ip, host_if=f"vb{i}")))
    return out


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _cpu_s(pid: int, children: bool = True) -> float:
    """CPU seconds (user + system) of process ``pid``, with its reaped children (the ``ip`` and
    ``nsenter`` it ran) when ``children``; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(v) for v in fields[11:15 if children else 13])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def components(cluster: lab.ClusterRecord) -> dict[str, int]:
    """The cluster's Kubernetes processes by name: PID (those the lab recorded)."""
    recs = {"apiserver": cluster.apiserver, "kubelet": cluster.kubelet,
            "controller-manager": cluster.controller_manager, "scheduler": cluster.scheduler_proc,
            "kube-proxy": cluster.proxy}
    return {name: rec.pid for name, rec in recs.items() if rec is not None}


def cpu_snapshot(procs: dict[str, int], state_dir: Path) -> dict[str, float]:
    """CPU seconds so far of each component (with its reaped children; the kubelet's apart: the
    ``ip`` commands of the pod plumbing) and, as ``shims``, of the container side: the kubelet's
    shim spawner (with the middle children it reaped) and every live shim and container process
    the kubelets recorded (shims are orphans reaped by init, never the kubelet's children)."""
    from kubeemu.runtime import procs as runtime_procs
    from kubeemu.runtime import spawner
    from kubeemu.runtime.pods import recorded_processes

    kubelet_roots = sorted(state_dir.glob("kubelet-*"))  # made by a kubelet with its first pod: look each time
    out = {name: _cpu_s(pid) for name, pid in procs.items()}
    if "kubelet" in procs:
        pid = procs["kubelet"]
        out["kubelet"] = _cpu_s(pid, children=False)
        out["kubelet's commands (ip ...)"] = _cpu_s(pid) - out["kubelet"]
    spawners = {rec for root in kubelet_roots if (rec := spawner.recorded(root)) is not None}
    live = {rec for root in kubelet_roots for rec in recorded_processes(root) if runtime_procs.same(*rec)}
    # The spawner with the middle children it reaped (clock ticks are fine: it lives long);
    # each shim and container from schedstat (nanoseconds: a shim uses less than a tick).
    out["shims"] = sum(_cpu_s(pid) for pid, start in spawners if runtime_procs.same(pid, start)) + \
        sum(_run_s(pid) for pid, start in live - spawners)
    return out


def _run_s(pid: int) -> float:
    """Seconds on a CPU of process ``pid``'s main thread (``/proc/PID/schedstat``, nanoseconds);
    0 when it is gone."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _rss_mb(pid: int) -> float:
    from kubeemu.bench import rss_mb

    return rss_mb(pid)


def run(opts: bc.Options) -> bc.Report:
    replicas = 20 if opts.tiny else 200
    nodes = 2 if opts.tiny else len(NODES)
    ours_rate: list[float] = []
    base_rate: list[float] = []
    ours_s: list[float] = []
    base_s: list[float] = []
    rss_per_1000: list[float] = []
    notes: list[str] = []
    timelines: list[str] = []
    with bc.lab_env(NAME, topology(nodes), f"1 cluster with Kubernetes, {nodes} nodes",
                    timeout_s=lab.DEFAULT_UP_TIMEOUT_S) as state:
        cluster = state.clusters[0]
        if cluster.api_url is None or cluster.apiserver is None:
            raise RuntimeError(f"lab {state.name}: cluster {cluster.name} has no API server")
        api = cluster.api_url
        node_names = [n.name for n in cluster.nodes]
        doc = manifest(replicas, node_names, SINGLE_DEPLOYMENT)
        for rnd in range(opts.repeat):
            bc.progress(NAME, f"round {rnd + 1}/{opts.repeat}: kubectl apply {replicas} replicas "
                        f"({'1 Deployment' if SINGLE_DEPLOYMENT else f'{len(node_names)} Deployments, one per node'})")
            netns0 = kernel_netns()  # for the notes of wait_kernel_settled
            rss0 = _rss_mb(cluster.apiserver.pid)
            procs = components(cluster)
            cpu0 = cpu_snapshot(procs, state.state_dir)
            kubelet_log = cluster.kubelet.log if cluster.kubelet is not None else ""
            log_offset = _size(kubelet_log)
            t0 = time.monotonic()
            timeline = Timeline(api, time.time())
            timeline.start()
            try:
                _kubectl(state, cluster.name, "apply", "-f", "-", stdin=doc)
                took = (time.monotonic() - t0) + wait_ready(api, replicas, 120 if opts.tiny else 900)
            finally:
                timeline.stop()
            rss1 = _rss_mb(cluster.apiserver.pid)
            cpu1 = cpu_snapshot(procs, state.state_dir)
            cpu = ", ".join(f"{k} {cpu1[k] - cpu0.get(k, 0.0):.2f}" for k in cpu1)
            timelines.append(f"round {rnd + 1} CPU seconds from apply to all Ready: {cpu}")
            bc.progress(NAME, f"round {rnd + 1} CPU s: {cpu}")
            if kubelet_log:
                timeline.read_kubelet_log(kubelet_log, log_offset)
            timelines.append(f"round {rnd + 1} {timeline.summary(took)}")
            bc.progress(NAME, f"round {rnd + 1} {timeline.summary(took)}")
            ours_s.append(took)
            ours_rate.append(replicas / took)
            rss_per_1000.append((rss1 - rss0) / replicas * 1000)
            bc.progress(NAME, f"round {rnd + 1}: {replicas} Ready in {took:.1f} s ({replicas / took:.1f} pods/s); "
                        f"API server RSS {rss0:.1f} -> {rss1:.1f} MB; deleting")
            _kubectl(state, cluster.name, "delete", "namespace", NAMESPACE, "--wait=false")
            wait_gone(state, cluster, 300)
            bc.progress(NAME, f"round {rnd + 1}: {wait_kernel_settled(netns0)}")
            pods = baseline_pods(cluster, replicas)
            bc.progress(NAME, f"round {rnd + 1}: baseline: {replicas} pod namespaces with tools.lab.add_pod")
            try:
                t0 = time.monotonic()
                for node, pod in pods:
                    lab.add_pod(node, pod)
                took = time.monotonic() - t0
            finally:
                for node, pod in pods:
                    lab.remove_pod(node, pod)
            bc.progress(NAME, f"round {rnd + 1}: baseline removed; {wait_kernel_settled(netns0)}")
            base_s.append(took)
            base_rate.append(replicas / took)
            bc.progress(NAME, f"round {rnd + 1}: baseline {took:.1f} s ({replicas / took:.1f} pods/s)")
    bc.progress(NAME, "kubeemu alone: RSS per 1,000 running pods")
    from kubeemu import bench as kb
    from kubeemu.lab import start_cluster

    emu_ours: list[float] = []
    emu_json: list[float] = []
    for _ in range(opts.repeat):
        handle = start_cluster("bench-rss", ["10.44.0.0/16"], ["10.96.0.0/20"])
        try:
            res = kb.rss_per_1000_pods(handle.url, handle.pid, 200 if opts.tiny else 1000)
        finally:
            handle.stop()
        emu_ours.append(res.per_1000_mb)
        emu_json.append(res.json_per_1000_mb)
    report = bc.Report(units={"pods_per_s": "pods/s", "apply_to_ready_s": "s",
                              "apiserver_rss_per_1000_pods": "MB", "kubeemu_rss_per_1000_pods": "MB"})
    report.figures["pods_per_s"] = bc.figure(ours_rate, {"": base_rate}, higher_is_better=True)
    report.figures["apply_to_ready_s"] = bc.figure(ours_s, {"": base_s}, higher_is_better=False)
    report.figures["apiserver_rss_per_1000_pods"] = bc.spread(rss_per_1000)
    report.figures["kubeemu_rss_per_1000_pods"] = bc.figure(emu_ours, {"": emu_json}, higher_is_better=False)
    notes += [
        f"{replicas} replicas of an idle container; ours = kubectl apply to all Ready, baseline = as many pod "
        "namespaces made one after another with tools.lab.add_pod; ratio = ours / baseline pods/s (aim >= 0.5). "
        "The kubelet makes its pods' networks with tools.lab.add_pods (the same commands; the ip runs in the root "
        "and node namespaces shared by the pods waiting on a node, one run inside each pod).",
        "one Deployment per node with spec.template.spec.nodeName (no scheduler in the path)"
        if not SINGLE_DEPLOYMENT else "one Deployment, pods placed by the lab's scheduler",
        "apiserver_rss_per_1000_pods: the lab API server's RSS growth from apply to all Ready, scaled to 1,000 "
        "pods (round 1 is the honest one; later rounds reuse freed memory).",
        "kubeemu_rss_per_1000_pods: a separate kubeemu holding 1,000 ReplicaSet-owned running pods; baseline = "
        "the same pods as JSON (ratio = JSON / RSS growth).",
    ]
    report.notes.extend(notes + timelines)
    return report


# -- the per-stage timeline ------------------------------------------------------------------

#: Stages of a pod in the order it goes through them; what marks each, and where it is seen:
#: the API server's watch (``created``: the ReplicaSet's create; ``bound``: the scheduler's
#: binding sets ``spec.nodeName``; ``ip``: the kubelet's first status with ``podIP``; ``running``:
#: a container state ``running``; ``ready``: condition Ready True) or the kubelet's log
#: (``network``: its pod network made; ``shim``: its container's shim spawned).
STAGES = ("created", "bound", "network", "shim", "ip", "running", "ready")
#: Seconds each watch request of the timeline lasts (how long :meth:`Timeline.stop` may wait).
_WATCH_SLICE_S = 2
_KUBELET_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ \S+: pod ([^/\s]+)/(\S+?):? "
                           r"(running on \S+ with|container \S+ attempt \d+: shim \d+ runs)")


class Timeline:
    """When each pod of one round reached each of :data:`STAGES`, in seconds after the apply.

    A thread watches the benchmark namespace's pods (one watch: what any client sees) and notes
    the first time each stage shows on a pod; :meth:`read_kubelet_log` adds the kubelet's own
    steps from its log. Cheap enough to run in every round, so the notes say where time goes."""

    def __init__(self, api: str, t0: float) -> None:
        self.api = api
        self.t0 = t0  # wall clock (time.time) of the apply: log lines are in wall-clock time too
        self.at: dict[str, dict[str, float]] = {}  # pod name -> stage -> seconds after t0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bench-k8s-timeline", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the watch within :data:`_WATCH_SLICE_S` (a blocked read cannot be interrupted
        from another thread: closing the response would wait for the reader's lock)."""
        self._stop.set()
        self._thread.join(_WATCH_SLICE_S + 5)

    def _note(self, name: str, stage: str, t: float) -> None:
        self.at.setdefault(name, {}).setdefault(stage, t - self.t0)

    def _watch(self) -> None:
        """Watch in short slices (the server ends each after ``timeoutSeconds``), each resuming
        from the last resourceVersion seen, so :meth:`stop` takes effect soon."""
        rv = ""
        while not self._stop.is_set():
            url = (f"{self.api}/api/v1/namespaces/{NAMESPACE}/pods?watch=1&timeoutSeconds={_WATCH_SLICE_S}"
                   + (f"&resourceVersion={rv}" if rv else ""))
            try:
                with urllib.request.urlopen(url, timeout=_WATCH_SLICE_S + 10) as r:
                    for line in r:
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        if ev.get("type") == "ERROR":
                            rv = ""
                            break
                        rv = str(((ev.get("object") or {}).get("metadata") or {}).get("resourceVersion") or rv)
                        self._event(ev, time.time())
            except (OSError, ValueError) as e:  # e.g. the namespace is not there yet: watch again
                _log.debug("timeline watch: %s", e)
                time.sleep(0.05)

    def _event(self, ev: dict[str, Any], now: float) -> None:
        pod = ev.get("object") or {}
        name = (pod.get("metadata") or {}).get("name")
        if ev.get("type") not in ("ADDED", "MODIFIED") or not name:
            return
        status = pod.get("status") or {}
        self._note(name, "created", now)
        if (pod.get("spec") or {}).get("nodeName"):
            self._note(name, "bound", now)
        if status.get("podIP"):
            self._note(name, "ip", now)
        if any("running" in (c.get("state") or {}) for c in status.get("containerStatuses") or []):
            self._note(name, "running", now)
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []):
            self._note(name, "ready", now)

    def read_kubelet_log(self, path: str, offset: int) -> None:
        """The kubelet's ``network`` and ``shim`` steps of this round's pods, from its log after
        ``offset`` (the log's size before the apply)."""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError as e:
            _log.warning("timeline: kubelet log %s: %s", path, e)
            return
        for line in text.splitlines():
            m = _KUBELET_LINE.match(line)
            if m is None or m.group(3) != NAMESPACE:
                continue
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            self._note(m.group(4), "network" if m.group(5).startswith("running") else "shim", t)

    def summary(self, done_s: float) -> str:
        """One line: per stage, when the first, the median and the last pod reached it (seconds
        after the apply), then the median per-pod time between consecutive stages."""
        parts = []
        for st in STAGES:
            ts = sorted(a[st] for a in self.at.values() if st in a)
            if ts:
                parts.append(f"{st} {ts[0]:.2f}/{statistics.median(ts):.2f}/{ts[-1]:.2f}")
        gaps = []
        for a, b in itertools.pairwise(STAGES):
            d = [p[b] - p[a] for p in self.at.values() if a in p and b in p]
            if d:
                gaps.append(f"{a}->{b} {statistics.median(d) * 1000:.0f}")
        return (f"stages (s after apply, first/median/last pod): {', '.join(parts)}; all Ready per the "
                f"Deployment {done_s:.2f}. Median per pod (ms): {', '.join(gaps)}")
