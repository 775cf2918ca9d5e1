"""Scheduling-cycle throughput of the real :class:`scheduler.scheduler.Scheduler` with the real
plugins, in process, without an API server: pods/s of the scheduling thread alone.

Not the issue's benchmark (that one, ``tools/bench/scheduler.py``, runs against kubeemu and
measures first create to last bound); this isolates what the scheduler itself costs per pod so
changes to the loop and the plugins can be compared quickly (and profiled with ``--profile``).

In order:

1. build a Scheduler over a stub API (binds and events succeed at once, on the real worker
   pools), feed ``--nodes`` nodes (3 zones, 32 cpu / 128Gi / 110 pods each) into its cache and
   ``--pods`` pending pods (100m / 128Mi, the ``basic`` case; ``--case spread`` adds a zone
   topology spread and a hostname anti-affinity per Deployment-like group of 100) into the pods
   store, as the informers would;
2. run ``schedule_one`` for every pod, as the loop does, and confirm each assumed pod the way
   the watch would (``cache.add_pod`` of the bound pod) every ``--confirm-every`` pods;
3. print one JSON line: pods/s, seconds, max RSS (MB), the profile of the run's top functions
   with ``--profile``.

Usage: ``python -m tools.bench.sched_loop [--nodes 1000] [--pods 10000] [--profile N]
[--scheduler-name default-scheduler|kosmos-scheduler] [--case basic|spread]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import time
from typing import Any

from scheduler.framework import Obj
from scheduler.podutil import new_pod_info
from scheduler.queue import QueuedPodInfo
from scheduler.scheduler import Scheduler


class _StubApi:
    """What the Scheduler calls on its API during a run: every write succeeds."""

    def create(self, path: str, body: Obj) -> Obj:
        return body

    def patch(self, path: str, body: Obj, content_type: str = "") -> Obj:
        return body

    def get(self, path: str) -> Obj:
        return {}

    def update(self, path: str, body: Obj) -> Obj:
        return body


def node(i: int) -> Obj:
    name = f"node-{i}"
    return {"metadata": {"name": name, "uid": name,
                         "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": f"z{i % 3}"}},
            "spec": {},
            "status": {"allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "100Gi"}}}


def pod(i: int, scheduler_name: str, case: str) -> Obj:
    app = f"app{i // 100}"
    spec: dict[str, Any] = {"schedulerName": scheduler_name,
                            "containers": [{"name": "c", "image": "pause",
                                            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}
    if case == "spread":
        sel = {"matchLabels": {"app": app}}
        spec["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                              "whenUnsatisfiable": "DoNotSchedule", "labelSelector": sel}]
        spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": sel, "topologyKey": "kubernetes.io/hostname"}]}}
    name = f"p-{i}"
    return {"metadata": {"name": name, "namespace": "default", "uid": name, "labels": {"app": app}}, "spec": spec}


def run(n_nodes: int, n_pods: int, scheduler_name: str, case: str, confirm_every: int,
        profile: int) -> dict[str, Any]:
    s = Scheduler(_StubApi(), leader_elect=False)  # type: ignore[arg-type]
    for i in range(n_nodes):
        s.cache.add_node(node(i))
    pods = [pod(i, scheduler_name, case) for i in range(n_pods)]
    store = s.informers["pods"].store
    for p in pods:
        store[f"default/{p['metadata']['name']}"] = p
    queued = [QueuedPodInfo(new_pod_info(p), time.monotonic()) for p in pods]
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    pending: list[str] = []
    for q in queued:
        s.schedule_one(q)
        pending.append(q.key)
        if len(pending) >= confirm_every:
            for key in pending:
                node_name = s.cache.pod_node(key)
                if node_name is not None:
                    p = store[key]
                    bound = {**p, "spec": {**p["spec"], "nodeName": node_name}}
                    store[key] = bound
                    s.cache.add_pod(bound)
            pending.clear()
    if prof is not None:
        prof.disable()
    took = time.perf_counter() - t0
    scheduled = sum(1 for q in queued if s.cache.pod_node(q.key))
    s._bind_pool.shutdown(wait=True)
    s._status_pool.shutdown(wait=True)
    out: dict[str, Any] = {"nodes": n_nodes, "pods": n_pods, "case": case, "profile": scheduler_name,
                           "scheduled": scheduled, "seconds": round(took, 2),
                           "pods_per_s": round(n_pods / took, 1),
                           "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(profile)
        out["top"] = buf.getvalue()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--scheduler-name", default="default-scheduler")
    ap.add_argument("--case", choices=("basic", "spread"), default="basic")
    ap.add_argument("--confirm-every", type=int, default=50)
    ap.add_argument("--profile", type=int, default=0, help="print the top N functions by own time")
    a = ap.parse_args()
    out = run(a.nodes, a.pods, a.scheduler_name, a.case, a.confirm_every, a.profile)
    top = out.pop("top", None)
    print(json.dumps(out))
    if top:
        print(top)


if __name__ == "__main__":
    main()
