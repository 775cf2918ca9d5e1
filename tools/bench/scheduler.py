"""Scheduler benchmark (issue 16): the Kosmos scheduler placing 10,000 pods onto 1,000 and 5,000
emulated nodes, against the emulator's bare bind rate for the same pods in the same run; the
scheduler's RSS per 1,000 nodes and per 10,000 pods.

No lab and no root: every round talks to fresh ``python -m kubeemu`` processes on 127.0.0.1.
Nodes are plain Node objects with capacity (cpu 32, memory 128Gi, pods 110), Ready, labelled
``kubernetes.io/hostname`` and ``topology.kubernetes.io/zone`` (10 zones); no kubelet runs, so
pods stay bound, never Running: what is measured is scheduling and binding only.

Scenarios (``--nodes`` sets the node counts, ``--pods`` the pod count, ``--quick``/``--tiny``
the CI smoke sizes: 40 nodes, 200 pods):

- ``basic_<N>n``: for every node count N, the pods with plain requests (cpu 100m, memory 128Mi);
- ``spread_<N>n``: at the smallest N, the pods in groups of 100 (at most N/2), each group with a
  required pod anti-affinity on ``kubernetes.io/hostname`` (one pod of a group per node) and a
  topology spread over zones (``maxSkew: 1``, ``DoNotSchedule``).

Each round of each scenario, in this order:

1. **baseline** - a fresh API server gets the nodes, then the pods are created by ``--concurrency``
   clients (schedulerName ``bench-bare``, which no scheduler serves) while a script binds each one,
   as its ADDED event arrives on a watch, to a precomputed node (``pods/binding``, the same
   number of concurrent clients; the precomputed placement satisfies the scenario's constraints).
   The server is then stopped.
2. **ours** - a fresh API server; the scheduler (the lab's command line,
   ``python -m scheduler.main``) is started on it while it is empty and its RSS read once it
   has settled; the nodes are created and a warm-up pod is waited for until bound (the
   scheduler has synced and places pods); RSS again; then the same pods (default
   schedulerName) are created by the same clients and the watch waits until every one has
   ``spec.nodeName``; RSS a third time.

For both: ``pods/s`` = pods / (first create request sent -> last pod seen bound on the watch);
per-pod latency = (pod seen bound) - (pod seen ADDED), both on the one watch, so clocks agree;
``p99``. Ratios (higher is better): pods/s ours / baseline, p99 baseline / ours. RSS (``VmRSS``):
per 1,000 nodes = growth from the empty start to the warm-up pod bound, scaled; per 10,000 pods =
growth over the pods' run, scaled (no baseline: printed as measured).

Progress goes to stderr every 2 s (created, bound, rate). Every process is stopped by PID in a
``finally``. The goal of the issue is >= 300 pods/s at 5,000 nodes (basic).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from tools.bench import common as bc

_log = logging.getLogger(__name__)

NAME = "scheduler"
HELP = ("the Kosmos scheduler placing 10,000 pods onto 1,000 and 5,000 emulated nodes (basic requests; topology "
        "spread + anti-affinity), pods/s and p99 create->bound (baseline: the emulator's bare bind rate for the same "
        "pods, a script binding each to a precomputed node); scheduler RSS per 1,000 nodes and per 10,000 pods")

NAMESPACE = "bench"
BARE_SCHEDULER = "bench-bare"
ZONE_KEY = "topology.kubernetes.io/zone"
HOST_KEY = "kubernetes.io/hostname"
ZONES = 10
GROUP = 100
NODE_CAPACITY = {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "100Gi"}
POD_REQUESTS = {"cpu": "100m", "memory": "128Mi"}
DEFAULT_NODES = (1000, 5000)
DEFAULT_PODS = 10_000
QUICK_NODES = (40,)
QUICK_PODS = 200
DEFAULT_CONCURRENCY = 16
#: Seconds without a new pod bound before a run gives up (not a bound on the whole run).
STALL_S = 120.0


def supported() -> bool:
    """A build with the scheduler (issue 16)."""
    try:
        return importlib.util.find_spec("scheduler.main") is not None
    except (ImportError, ValueError):
        return False


def requires(opts: bc.Options) -> list[str]:
    return [] if supported() else ["the scheduler (scheduler.main, issue 16) is not in this build"]


def scheduler_argv(url: str) -> list[str]:
    """How the benchmark starts the scheduler against the API server at ``url``: the lab's way."""
    from tools.lab.schedulers import scheduler_argv as lab_argv

    return lab_argv(url)


@dataclasses.dataclass(frozen=True)
class Scenario:
    kind: str  # "basic" or "spread"
    nodes: int
    pods: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.nodes}n"

    @property
    def group(self) -> int:
        """Pods per anti-affinity group (spread): at most half the nodes, so every group fits."""
        zones = min(ZONES, self.nodes)
        return max(1, min(GROUP, self.nodes // 2, zones * (self.nodes // zones)))


def scenarios(nodes: Sequence[int], pods: int) -> list[Scenario]:
    out = [Scenario("basic", n, pods) for n in nodes]
    out.append(Scenario("spread", min(nodes), pods))
    return out


# -- objects ------------------------------------------------------------------------------------


def node_name(i: int) -> str:
    return f"n-{i:05d}"


def node_object(i: int) -> dict[str, Any]:
    name = node_name(i)
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {HOST_KEY: name, ZONE_KEY: f"zone-{i % ZONES}",
                                                  "kubernetes.io/os": "linux"}},
            "status": {"capacity": dict(NODE_CAPACITY), "allocatable": dict(NODE_CAPACITY),
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}}


def pod_name(i: int) -> str:
    return f"p-{i:05d}"


def pod_object(sc: Scenario, i: int, scheduler: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10",
                                            "resources": {"requests": dict(POD_REQUESTS)}}],
                            "terminationGracePeriodSeconds": 0}
    labels = {"app": "bench"}
    if scheduler:
        spec["schedulerName"] = scheduler
    if sc.kind == "spread":
        group = f"g{i // sc.group}"
        labels["group"] = group
        sel = {"matchLabels": {"group": group}}
        spec["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": ZONE_KEY,
                                              "whenUnsatisfiable": "DoNotSchedule", "labelSelector": sel}]
        spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": sel, "topologyKey": HOST_KEY}]}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name(i), "namespace": NAMESPACE,
                                                             "labels": labels}, "spec": spec}


def placement(sc: Scenario, i: int) -> str:
    """The baseline's precomputed node of pod ``i``, valid for the scenario: round robin (basic);
    for spread, the j-th pod of group g goes to zone (g + j) mod Z (node i is in zone i mod Z, so
    a group's pods are balanced over the zones: maxSkew 1), on that zone's ((j // Z + g) mod
    (N // Z))-th node (distinct nodes within a group: the anti-affinity)."""
    if sc.kind == "basic":
        return node_name(i % sc.nodes)
    zones = min(ZONES, sc.nodes)
    g, j = divmod(i, sc.group)
    zone = (g + j) % zones
    return node_name(zone + zones * ((j // zones + g) % (sc.nodes // zones)))


# -- the client ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    pods_per_s: float
    p50_ms: float
    p99_ms: float
    seconds: float


def _progress_line(what: str, created: int, bound: int, total: int, t0: float) -> str:
    dt = max(time.monotonic() - t0, 1e-9)
    return f"  {what}: {created}/{total} created, {bound}/{total} bound, {bound / dt:.0f} pods/s so far"


async def _post(session: Any, url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with session.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.read()


async def create_all(url: str, path: str, bodies: Sequence[dict[str, Any]], concurrency: int) -> None:
    """POST every body with ``concurrency`` clients; an answer other than 201 is an error."""
    import aiohttp

    it = iter(bodies)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker() -> None:
            for body in it:
                status, text = await _post(s, f"{url}{path}", body)
                if status != 201:
                    raise RuntimeError(f"POST {path} {body['metadata']['name']}: {status} {text[:300]!r}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run_pods(url: str, sc: Scenario, concurrency: int, bare: bool, what: str,
                   alive: Callable[[], str | None] = lambda: None) -> Sample:
    """Create the scenario's pods and wait until every one is bound, watching them; with ``bare``
    also bind each (as it is ADDED) to its precomputed node. ``alive`` returns why the run cannot
    finish (the scheduler died), checked while waiting."""
    import aiohttp

    pods = [pod_object(sc, i, BARE_SCHEDULER if bare else None) for i in range(sc.pods)]
    added: dict[str, float] = {}
    bound: dict[str, float] = {}
    to_bind: asyncio.Queue[str] = asyncio.Queue()
    created = 0
    done = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2 * concurrency + 2),
                                     timeout=timeout) as s:
        async with s.get(f"{url}/api/v1/namespaces/{NAMESPACE}/pods") as r:
            rv = (await r.json())["metadata"]["resourceVersion"]
        watch = await s.get(f"{url}/api/v1/namespaces/{NAMESPACE}/pods",
                            params={"watch": "1", "resourceVersion": rv})

        async def watcher() -> None:
            while len(bound) < sc.pods:
                line = await watch.content.readline()
                if not line:
                    raise RuntimeError(f"{what}: the watch ended after {len(bound)}/{sc.pods} bound")
                now = time.monotonic()
                ev = json.loads(line)
                if ev.get("type") == "ERROR":
                    raise RuntimeError(f"{what}: watch error: {ev.get('object')}")
                obj = ev.get("object") or {}
                name = (obj.get("metadata") or {}).get("name", "")
                if ev.get("type") == "ADDED" and name not in added:
                    added[name] = now
                    if bare:
                        to_bind.put_nowait(name)
                if (obj.get("spec") or {}).get("nodeName") and name not in bound:
                    bound[name] = now
            done.set()

        async def creator() -> None:
            nonlocal created
            it = iter(pods)

            async def worker() -> None:
                nonlocal created
                for body in it:
                    status, text = await _post(s, f"{url}/api/v1/namespaces/{NAMESPACE}/pods", body)
                    if status != 201:
                        raise RuntimeError(f"{what}: creating {body['metadata']['name']}: {status} {text[:300]!r}")
                    created += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))

        async def binder() -> None:
            while True:
                name = await to_bind.get()
                i = int(name.rsplit("-", 1)[1])
                body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": NAMESPACE},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": placement(sc, i)}}
                status, text = await _post(s, f"{url}/api/v1/namespaces/{NAMESPACE}/pods/{name}/binding", body)
                if status != 201:
                    raise RuntimeError(f"{what}: binding {name}: {status} {text[:300]!r}")

        async def reporter(t0: float) -> None:
            last_bound, last_change = 0, time.monotonic()
            while not done.is_set():
                await asyncio.sleep(2)
                bc.progress(NAME, _progress_line(what, created, len(bound), sc.pods, t0))
                why = alive()
                if why:
                    raise RuntimeError(f"{what}: {why} ({len(bound)}/{sc.pods} bound)")
                if len(bound) != last_bound:
                    last_bound, last_change = len(bound), time.monotonic()
                elif time.monotonic() - last_change > STALL_S:
                    raise RuntimeError(f"{what}: no pod bound for {STALL_S:g} s ({created} created, "
                                       f"{len(bound)}/{sc.pods} bound)")

        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(c) for c in (watcher(), creator(), reporter(t0))]
        tasks += [asyncio.ensure_future(binder()) for _ in range(concurrency if bare else 0)]
        try:
            await tasks[0]
            await tasks[1]
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                    await t
            watch.close()
    last = max(bound.values())
    lat_ms = [(bound[n] - added.get(n, bound[n])) * 1000 for n in bound]
    return Sample(pods_per_s=sc.pods / (last - t0), p50_ms=bc.percentile(lat_ms, 50),
                  p99_ms=bc.percentile(lat_ms, 99), seconds=last - t0)


# -- processes ----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def settled_rss(pid: int, limit_s: float = 10.0) -> float:
    """RSS once it has stopped moving (three equal reads 0.3 s apart), or after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    last, same = -1.0, 0
    while time.monotonic() < deadline:
        cur = rss_mb(pid)
        same = same + 1 if abs(cur - last) < 0.05 else 0
        if same >= 2:
            return cur
        last = cur
        time.sleep(0.3)
    return rss_mb(pid)


def create_nodes(url: str, sc: Scenario, concurrency: int) -> None:
    t0 = time.monotonic()
    asyncio.run(create_all(url, "/api/v1/nodes", [node_object(i) for i in range(sc.nodes)], concurrency))
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    asyncio.run(create_all(url, "/api/v1/namespaces", [ns], 1))
    bc.progress(NAME, f"  {sc.nodes} nodes created in {time.monotonic() - t0:.1f} s")


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n    " + "\n    ".join(tail) if tail else ""


def wait_warmup(url: str, alive: Callable[[], str | None], timeout_s: float) -> None:
    """A pod in ``bench-warmup`` bound by the scheduler: it has synced and places pods."""
    import urllib.request

    ns, body = "bench-warmup", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "warmup"},
                                "spec": {"containers": [{"name": "c", "image": "x"}]}}
    for path, doc in (("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                      (f"/api/v1/namespaces/{ns}/pods", body)):
        req = urllib.request.Request(f"{url}{path}", data=json.dumps(doc).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).close()
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"{url}/api/v1/namespaces/{ns}/pods/warmup", timeout=10) as r:
            if json.loads(r.read())["spec"].get("nodeName"):
                return
        why = alive()
        if why:
            raise RuntimeError(f"warm-up pod: {why}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the scheduler did not bind the warm-up pod within {timeout_s:g} s")
        time.sleep(0.1)


@dataclasses.dataclass
class Round:
    ours: Sample
    base: Sample
    rss_per_1000_nodes: float
    rss_per_10000_pods: float
    rss_mb: float


def run_round(sc: Scenario, concurrency: int, log_dir: Path) -> Round:
    from kubeemu.lab import start_cluster

    bc.progress(NAME, f" {sc.name} baseline: {sc.pods} pods bound by a script to precomputed nodes")
    server = start_cluster(f"bench-sched-{sc.name}-bare", ["10.44.0.0/16"], ["10.96.0.0/16"])
    try:
        create_nodes(server.url, sc, concurrency)
        base = asyncio.run(run_pods(server.url, sc, concurrency, True, f"{sc.name} baseline"))
    finally:
        server.stop()
    bc.progress(NAME, f" {sc.name} baseline: {base.pods_per_s:.0f} pods/s, p99 {base.p99_ms:.0f} ms")
    bc.progress(NAME, f" {sc.name} ours: the scheduler places {sc.pods} pods on {sc.nodes} nodes")
    server = start_cluster(f"bench-sched-{sc.name}", ["10.44.0.0/16"], ["10.96.0.0/16"])
    log_path = log_dir / f"scheduler-{sc.name}.log"
    with bc.procs() as procs:
        try:
            with open(log_path, "ab") as log:
                proc = procs.spawn(None, scheduler_argv(server.url), stdout=log, stderr=subprocess.STDOUT)

            def alive() -> str | None:
                code = proc.poll()
                return None if code is None else f"the scheduler exited ({code}); log:{_log_tail(log_path)}"

            rss0 = settled_rss(proc.pid)
            create_nodes(server.url, sc, concurrency)
            wait_warmup(server.url, alive, STALL_S)
            rss1 = settled_rss(proc.pid, 5.0)
            ours = asyncio.run(run_pods(server.url, sc, concurrency, False, f"{sc.name} ours", alive))
            rss2 = rss_mb(proc.pid)
        finally:
            server.stop()
    bc.progress(NAME, f" {sc.name} ours: {ours.pods_per_s:.0f} pods/s, p99 {ours.p99_ms:.0f} ms; scheduler RSS "
                f"{rss0:.0f} MB empty, {rss1:.0f} MB with {sc.nodes} nodes, {rss2:.0f} MB with {sc.pods} pods")
    return Round(ours, base, (rss1 - rss0) / sc.nodes * 1000, (rss2 - rss1) / sc.pods * 10_000, rss2)


def run(opts: bc.Options, *, nodes: Sequence[int] | None = None, pods: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY) -> bc.Report:
    sizes_nodes = tuple(nodes or getattr(opts, "sched_nodes", ()) or (QUICK_NODES if opts.tiny else DEFAULT_NODES))
    n_pods = pods or getattr(opts, "sched_pods", 0) or (QUICK_PODS if opts.tiny else DEFAULT_PODS)
    report = bc.Report()
    rounds: dict[str, list[Round]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sched-") as tmp:
        for rnd in range(opts.repeat):
            for sc in scenarios(sizes_nodes, n_pods):
                bc.progress(NAME, f"round {rnd + 1}/{opts.repeat}: {sc.name} ({sc.pods} pods, {sc.nodes} nodes)")
                rounds.setdefault(sc.name, []).append(run_round(sc, concurrency, Path(tmp)))
    for name, rs in rounds.items():
        report.figures[f"{name}_pods_per_s"] = bc.figure([r.ours.pods_per_s for r in rs],
                                                         {"": [r.base.pods_per_s for r in rs]}, higher_is_better=True)
        report.figures[f"{name}_p99_ms"] = bc.figure([r.ours.p99_ms for r in rs], {"": [r.base.p99_ms for r in rs]},
                                                     higher_is_better=False)
        report.units[f"{name}_pods_per_s"] = "pods/s"
        report.units[f"{name}_p99_ms"] = "ms"
        if name.startswith("basic_"):
            report.figures[f"{name}_rss_per_1000_nodes"] = bc.spread([r.rss_per_1000_nodes for r in rs])
            report.figures[f"{name}_rss_per_10000_pods"] = bc.spread([r.rss_per_10000_pods for r in rs])
            report.figures[f"{name}_rss_total"] = bc.spread([r.rss_mb for r in rs])
            report.units.update({f"{name}_rss_per_1000_nodes": "MB", f"{name}_rss_per_10000_pods": "MB",
                                 f"{name}_rss_total": "MB"})
    report.notes += [
        f"{n_pods} pods onto {', '.join(str(n) for n in sizes_nodes)} nodes (kubeemu, no kubelet: pods stay bound); "
        f"{concurrency} concurrent clients create the pods (and, for the baseline, bind them).",
        "pods_per_s: first create -> last pod seen bound on a watch; baseline = the same pods bound by a script to "
        "precomputed nodes via pods/binding (the emulator's bare bind rate); ratio = ours / baseline.",
        "p99_ms: per pod, seen bound - seen ADDED on the same watch; ratio = baseline / ours.",
        f"spread_*: groups of up to {GROUP} pods, required anti-affinity on {HOST_KEY} within a group and a "
        f"topology spread over {ZONES} zones (maxSkew 1, DoNotSchedule).",
        "rss_per_1000_nodes: scheduler RSS growth from empty to synced with the nodes (warm-up pod bound), scaled; "
        "rss_per_10000_pods: growth over the pods' run, scaled; rss_total: RSS at the end.",
        "goal (issue 16): >= 300 pods/s at 5,000 nodes, basic.",
    ]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.bench.scheduler``: this benchmark alone, with its sizes as flags."""
    from tools.bench import suite

    p = argparse.ArgumentParser(prog="python -m tools.bench.scheduler", description=HELP,
                                epilog="examples:\n  python -m tools.bench.scheduler --quick\n"
                                "  python -m tools.bench.scheduler --nodes 1000,5000 --pods 10000 --repeat 3",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=suite._parse_n, default=DEFAULT_NODES, metavar="N,N,...",
                   help="node counts (default 1000,5000)")
    p.add_argument("--pods", type=int, default=DEFAULT_PODS, help="pods per run (default 10000)")
    p.add_argument("--quick", action="store_true", help=f"CI smoke: {QUICK_NODES[0]} nodes, {QUICK_PODS} pods")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="concurrent clients (default 16)")
    p.add_argument("--repeat", type=int, default=1, help="rounds (default 1)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.pods < 1 or args.repeat < 1 or args.concurrency < 1:
        p.error("--pods, --repeat and --concurrency must be at least 1")
    why = requires(bc.Options())
    if why:
        print(f"scheduler benchmark: cannot run: {'; '.join(why)}", file=sys.stderr)
        return 2
    opts = bc.Options(repeat=args.repeat, tiny=args.quick)
    report = run(opts, nodes=None if args.quick else args.nodes, pods=None if args.quick else args.pods,
                 concurrency=args.concurrency)
    doc = suite._to_json(report)
    print(suite.render_text(doc))
    if args.json:
        out: IO[str]
        with open(args.json, "w") as out:
            json.dump({NAME: doc}, out, indent=2, sort_keys=True)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
