"""``python -m kubeemu.bench``: the emulator's performance figures (issues 8 and 15).

Measures, on this machine, in one run, every figure over ``--repeat`` rounds (median, min, max):

- start time of four emulated clusters started together as processes (``python -m kubeemu``),
  from the first spawn until all four answer ``/readyz`` (target: under 3 s);
- idle RSS of each of those processes after start (target: under 60 MB each);
- 1,000 pod creates against one of them over HTTP with a pool of concurrent clients
  (target: under 3 s), plus the same 1,000 as one sequential client for reference;
- API server RSS per 1,000 pods (issue 15): on another of those idle servers, a ReplicaSet and
  ``--rss-pods`` pods owned by it, each given a kubelet-like status (Running, pod IP,
  conditions, container status), then (RSS after - RSS before) scaled to 1,000 pods. Its
  baseline in the same run is the size of the same pods as compact JSON, i.e. what the
  objects themselves weigh; the ratio (JSON / RSS growth) says how much of the growth is data.

The lab-level figures of issue 15 (a 200-replica Deployment in a lab, apply to all Ready, pods/s
vs the lab's pod plumbing driven directly, and the lab API server's RSS per 1,000 pods) need
root and a lab: ``fabric-tool bench k8s`` (tools/bench/k8s.py), which reuses
:func:`rss_per_1000_pods` from here.

Figures are printed, never asserted: the machine is shared and numbers vary. Progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kubeemu.lab import ClusterHandle, start_cluster, stats

_log = logging.getLogger(__name__)


def progress(msg: str) -> None:
    print(f"[kubeemu bench] {msg}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _create_pods(url: str, n: int, concurrency: int, prefix: str) -> float:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": ""},
            "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        failures = 0

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                i = queue.get_nowait()
                body["metadata"] = {"name": f"{prefix}-{i}"}
                async with s.post(f"{url}/api/v1/namespaces/default/pods", data=json.dumps(body),
                                  headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status != 201:
                        failures += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        took = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{failures} of {n} pod creates failed")
    return took


# -- RSS per 1,000 pods -----------------------------------------------------------------------


def deployment_like_pod(i: int, owner: dict[str, Any], node: str) -> dict[str, Any]:
    """A pod as a ReplicaSet of a Deployment makes it (labels, ownerReference, template hash,
    one container with a readiness probe): what a cluster full of workload pods stores."""
    meta = owner["metadata"]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{meta['name']}-{i:05d}", "namespace": meta["namespace"],
                     "labels": {"app": "bench", "pod-template-hash": "5d8f7c9b6"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": meta["name"],
                                          "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"nodeName": node, "containers": [{
            "name": "web", "image": "python:3.12-slim", "command": ["python3", "-m", "http.server", "8080"],
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 2},
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]},
    }


def kubelet_status(pod: dict[str, Any], i: int) -> dict[str, Any]:
    """The status a kubelet writes for a running, ready pod."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ip = f"10.{100 + i // 65536 % 100}.{i // 256 % 256}.{i % 256}"
    conds = [{"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": now}
             for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")]
    return dict(pod, status={
        "phase": "Running", "conditions": conds, "hostIP": "198.18.0.10", "podIP": ip, "podIPs": [{"ip": ip}],
        "startTime": now, "qosClass": "Burstable",
        "containerStatuses": [{"name": "web", "ready": True, "started": True, "restartCount": 0,
                               "image": "python:3.12-slim", "imageID": "", "containerID": f"lab://{uuid.uuid4().hex}",
                               "state": {"running": {"startedAt": now}}, "lastState": {}}]})


@dataclass
class RssResult:
    before_mb: float
    after_mb: float
    pods: int
    json_mb: float  # the pods as compact JSON, as stored

    @property
    def per_1000_mb(self) -> float:
        return (self.after_mb - self.before_mb) / self.pods * 1000

    @property
    def json_per_1000_mb(self) -> float:
        return self.json_mb / self.pods * 1000


async def _owned_pods_with_status(url: str, n: int, concurrency: int, namespace: str) -> float:
    """A ReplicaSet and ``n`` pods it owns, each then given a kubelet status; returns their JSON MB."""
    rs_body = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "bench-rss"},
               "spec": {"replicas": n, "selector": {"matchLabels": {"app": "bench"}},
                        "template": {"metadata": {"labels": {"app": "bench"}},
                                     "spec": {"containers": [{"name": "web", "image": "python:3.12-slim"}]}}}}
    hdr = {"Content-Type": "application/json"}
    total = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async with s.post(f"{url}/apis/apps/v1/namespaces/{namespace}/replicasets", data=json.dumps(rs_body),
                          headers=hdr) as r:
            rs = await r.json()
            if r.status != 201:
                raise RuntimeError(f"creating the ReplicaSet failed: {r.status} {rs.get('message')}")
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)

        async def worker() -> None:
            nonlocal total
            while not queue.empty():
                i = queue.get_nowait()
                body = deployment_like_pod(i, rs, f"node-{i % 4}")
                async with s.post(f"{url}/api/v1/namespaces/{namespace}/pods", data=json.dumps(body),
                                  headers=hdr) as r:
                    made = await r.json()
                    if r.status != 201:
                        raise RuntimeError(f"pod create failed: {r.status} {made.get('message')}")
                name = made["metadata"]["name"]
                async with s.put(f"{url}/api/v1/namespaces/{namespace}/pods/{name}/status",
                                 data=json.dumps(kubelet_status(made, i)), headers=hdr) as r:
                    final = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"pod status update failed: {r.status} {final.get('message')}")
                total += len(json.dumps(final, separators=(",", ":")))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / 1e6


def rss_per_1000_pods(url: str, pid: int, n: int = 1000, concurrency: int = 16,
                      namespace: str = "default", settle_s: float = 1.0) -> RssResult:
    """RSS growth of API server ``pid`` (at ``url``) from ``n`` owned, running pods."""
    before = rss_mb(pid)
    json_mb = asyncio.run(_owned_pods_with_status(url, n, concurrency, namespace))
    time.sleep(settle_s)  # let the server finish answering before reading its RSS
    return RssResult(before, rss_mb(pid), n, json_mb)


# -- main -------------------------------------------------------------------------------------


def _fmt(values: Sequence[float], unit: str) -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:8.2f} {unit}"
    return f"{med:8.2f} {unit}  (min {min(values):.2f}, max {max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kubeemu.bench", description=__doc__.split("\n\n")[0],
        epilog="examples:\n"
               "  python -m kubeemu.bench                      (4 servers, 1,000 pods, 3 rounds)\n"
               "  python -m kubeemu.bench --repeat 1 --pods 200 --rss-pods 500   (quick)\n"
               "  python -m kubeemu.bench --json /tmp/kubeemu-bench.json\n"
               "the lab figures (a 200-replica Deployment, pods/s vs the lab's pod plumbing) need root:\n"
               "  sudo .venv/bin/fabric-tool bench k8s",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", type=int, default=4, help="servers started together (default 4)")
    p.add_argument("--pods", type=int, default=1000, help="pod creates per client pattern (default 1000)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP clients (default 16)")
    p.add_argument("--rss-pods", type=int, default=1000,
                   help="pods (owned, with status) for the RSS-per-1,000-pods figure (default 1000; 0: skip)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians over them (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write every sample as JSON to FILE")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.clusters < 1 or args.pods < 1 or args.concurrency < 1 or args.rss_pods < 0:
        p.error("--repeat, --clusters, --pods and --concurrency must be at least 1, --rss-pods at least 0")
    names = ["east", "west", "north", "south"] + [f"c{i}" for i in range(4, args.clusters)]
    samples: dict[str, list[float]] = {k: [] for k in (
        "start_s", "idle_rss_mb", "creates_concurrent_s", "creates_sequential_s", "rss_holding_pods_mb",
        "rss_per_1000_pods_mb", "json_per_1000_pods_mb")}
    for rnd in range(args.repeat):
        handles: list[ClusterHandle] = []
        try:
            progress(f"round {rnd + 1}/{args.repeat}: starting {args.clusters} servers together")
            t0 = time.perf_counter()
            # spawn all, then wait: start_cluster blocks per process, so spawn through threads
            with ThreadPoolExecutor(args.clusters) as ex:
                futs = [ex.submit(start_cluster, names[i], [f"10.{10 + i}.0.0/16"], [f"10.{96 + i}.0.0/20"])
                        for i in range(args.clusters)]
                handles = [f.result() for f in futs]
            samples["start_s"].append(time.perf_counter() - t0)
            time.sleep(1.0)
            samples["idle_rss_mb"].extend(rss_mb(h.pid) for h in handles)
            url = handles[0].url
            progress(f"round {rnd + 1}: {args.pods} pod creates with {args.concurrency} clients, then 1 client")
            samples["creates_concurrent_s"].append(asyncio.run(_create_pods(url, args.pods, args.concurrency, "bench")))
            samples["creates_sequential_s"].append(asyncio.run(_create_pods(url, args.pods, 1, "seq")))
            samples["rss_holding_pods_mb"].append(rss_mb(handles[0].pid))
            stored = stats(url)["objects"]
            assert isinstance(stored, dict)
            if stored.get("pods") != 2 * args.pods:
                raise RuntimeError(f"expected {2 * args.pods} pods stored, the server reports {stored.get('pods')}")
            if args.rss_pods:
                target = handles[1] if len(handles) > 1 else handles[0]
                progress(f"round {rnd + 1}: RSS of {target.name} before and after {args.rss_pods} running pods")
                res = rss_per_1000_pods(target.url, target.pid, args.rss_pods, args.concurrency)
                samples["rss_per_1000_pods_mb"].append(res.per_1000_mb)
                samples["json_per_1000_pods_mb"].append(res.json_per_1000_mb)
        finally:
            for h in handles:
                h.stop()
    print(f"kubeemu bench ({sys.version.split()[0]}, {args.clusters} clusters, {args.repeat} round(s): "
          "median (min, max))")
    print(f"  start {args.clusters} servers together:   {_fmt(samples['start_s'], 's')}   (target < 3 s)")
    print(f"  idle RSS per server:               {_fmt(samples['idle_rss_mb'], 'MB')}  (target < 60 MB)")
    conc, seq = samples["creates_concurrent_s"], samples["creates_sequential_s"]
    print(f"  {args.pods} pod creates, {args.concurrency} clients:  {_fmt(conc, 's')}   (target < 3 s)"
          f"  = {args.pods / statistics.median(conc):,.0f}/s")
    print(f"  {args.pods} pod creates, 1 client:    {_fmt(seq, 's')}   = {args.pods / statistics.median(seq):,.0f}/s")
    print(f"  RSS holding {2 * args.pods} pods:           {_fmt(samples['rss_holding_pods_mb'], 'MB')}")
    if args.rss_pods:
        ours, base = samples["rss_per_1000_pods_mb"], samples["json_per_1000_pods_mb"]
        print(f"  API server RSS per 1,000 pods:     {_fmt(ours, 'MB')}  ({args.rss_pods} running pods "
              "owned by a ReplicaSet)")
        print(f"    baseline: the same pods as JSON: {_fmt(base, 'MB')}  ratio JSON / RSS growth "
              f"{statistics.median(base) / statistics.median(ours):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "samples": samples}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
