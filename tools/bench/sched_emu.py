"""Quick throughput check of the real scheduler against a kubeemu API server in its own process:
pods/s from the start of scheduling to the last pod bound through ``pods/binding``.

Not the issue's benchmark (``tools/bench/scheduler.py`` measures first create to last bound,
p99 latency and the bare bind rate): the pods are all created *before* the scheduler starts, so
the figure is the scheduler's own rate (loop, binds, watch) with the emulator's cost included
and the creation rate left out.

In order:

1. start ``python -m kubeemu`` (a subprocess, 127.0.0.1, a port of its choosing), create
   ``--nodes`` nodes (3 zones, 32 cpu / 128Gi / 110 pods) and ``--pods`` pending pods
   (100m / 128Mi) with 16 client threads;
2. start the :class:`scheduler.scheduler.Scheduler` (both profiles, no leader election) in this
   process; the clock starts when its informers have synced;
3. wait until the scheduler's pod informer sees every pod with ``spec.nodeName``; print one JSON
   line: pods/s, seconds, this process's max RSS (MB; the client threads' objects included);
4. stop the scheduler and the emulator (SIGTERM, by PID).

Usage: ``python -m tools.bench.sched_emu [--nodes 1000] [--pods 10000]``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from scheduler import kube
from scheduler.profile import default_config
from scheduler.scheduler import Scheduler
from tools.bench.sched_loop import node, pod


def _start_emulator(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = tmp / "url"
    proc = subprocess.Popen([sys.executable, "-m", "kubeemu", "--name", "bench", "--log-size", "200000",
                             "--bookmark-interval", "1", "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"kubeemu did not come up (exit code {proc.poll()})")
        time.sleep(0.05)
    return proc, ready.read_text().strip()


class _Sampler(threading.Thread):
    """A poor man's sampling profiler over every thread (cProfile sees one): every 5 ms, the
    innermost frame of this package's code per thread, counted by (thread name prefix, function)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.counts: collections.Counter[str] = collections.Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        names = {}
        while not self.stop.wait(0.005):
            for t in threading.enumerate():
                names[t.ident] = t.name.split("_")[0].rstrip("0123456789-")
            for ident, frame in sys._current_frames().items():
                if ident == self.ident:
                    continue
                f: Any = frame
                where = f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_code.co_name}"
                while f is not None and "/scheduler/" not in f.f_code.co_filename:
                    f = f.f_back
                if f is not None:
                    where += f" < {f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_code.co_name}"
                self.counts[f"{names.get(ident, '?')} {where}"] += 1


def run(n_nodes: int, n_pods: int, timeout: float, sample: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start_emulator(Path(tmp))
        try:
            api = kube.Api(url)
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda i: api.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                                     **node(i)}), range(n_nodes)))
                t0 = time.monotonic()
                list(pool.map(lambda i: api.create("/api/v1/namespaces/default/pods",
                                                   {"apiVersion": "v1", "kind": "Pod",
                                                    **pod(i, "default-scheduler", "basic")}), range(n_pods)))
                created_s = time.monotonic() - t0
            s = Scheduler(kube.Api(url), default_config(), leader_elect=False)
            s.start(sync_timeout=120)
            sampler = _Sampler() if sample else None
            if sampler is not None:
                sampler.start()
            t0 = time.monotonic()
            store = s.informers["pods"]
            bound = 0
            while time.monotonic() - t0 < timeout:
                bound = sum(1 for p in store.store.values() if (p.get("spec") or {}).get("nodeName"))
                if bound >= n_pods:
                    break
                time.sleep(0.2)
            took = time.monotonic() - t0
            s.stop()
            if sampler is not None:
                sampler.stop.set()
                for what, n in sampler.counts.most_common(sample):
                    print(f"{n:6d} {what}", file=sys.stderr)
            return {"nodes": n_nodes, "pods": n_pods, "bound": bound, "seconds": round(took, 2),
                    "pods_per_s": round(bound / took, 1), "create_pods_per_s": round(n_pods / created_s, 1),
                    "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--sample", type=int, default=0, help="print the N most sampled places (all threads)")
    a = ap.parse_args()
    print(json.dumps(run(a.nodes, a.pods, a.timeout, a.sample)))


if __name__ == "__main__":
    main()
