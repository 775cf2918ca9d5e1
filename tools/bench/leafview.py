"""Leafview benchmark: the per-node view of a leaf (:mod:`scheduler.leafview`, issue 19) against
a brute-force oracle, in the same run, on the same fleet and the same queries.

The fleet (seeded): N leaf nodes (default 5,000) of realistic instance types (4-64 CPUs, 1:4
to 1:8 memory, some with 4 or 8 GPUs, 110 pod slots), three zones, two architectures, ~5 % of
the nodes tainted ``dedicated=gpu:NoSchedule``, every node pre-filled to 40-70 % of its CPU by
pods drawn from a mix of 24 shapes (so free vectors are mostly distinct: the hard case for
grouping). Queries come from the same mix (a scheduler sees the same Deployment shapes again and
again) with the mix's placements (none, a zone selector, a GPU toleration).

Metrics, median and p99 per round (µs per call), ours beside the oracle measured in the same
round (``ratio`` = oracle / ours: higher is better):

- ``fits``, ``count``: a query from the mix (the tracked-demand path);
- ``fits_cold``: a request shape never seen before (the first query of a new Deployment: one
  pass over the shapes, then tracked);
- ``update``: one leaf node's free changed (:meth:`LeafView.upsert_node`); baseline = rebuilding
  the view from every node, what a structure without deltas would pay (the oracle itself keeps a
  list and pays nothing to update: noted, not a ratio);
- ``record``: :meth:`LeafView.apply_record` of a whole record (JSON bytes as the tree manager
  writes them) with one node changed: JSON decoding, the view's parse cache (unchanged nodes are
  not parsed again), the diff and one update; baseline = parsing that record and building a
  fresh view from it;
- ``assume``: reserve on the best-fit node and release it again (two updates and a best-fit
  pass); baseline = the oracle's best-fit pass.

Every answer of ours is checked against the oracle's while measuring (a mismatch aborts the
run: a fast wrong answer is no result).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tools.bench import common as bc

NAME = "leafview"
HELP = ("the scheduler's per-node leaf view (fits/count/update/assume) at 5,000 leaf nodes vs a brute-force "
        "oracle in the same run (issue 19)")  # fmt: skip

GPU = "nvidia.com/gpu"
ZONES = ("z1", "z2", "z3")
#: (cpu cores, memory GiB, gpus), weights
INSTANCE_TYPES = (((4, 16, 0), 10), ((8, 32, 0), 25), ((16, 64, 0), 25), ((32, 128, 0), 15), ((64, 256, 0), 5),
                  ((16, 128, 0), 10), ((32, 256, 4), 6), ((64, 512, 8), 4))
TAINT = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
HOSTNAME = "kubernetes.io/hostname"


def requires(opts: bc.Options) -> list[str]:
    return []


@dataclass
class Query:
    request: dict[str, int]
    pod: dict[str, Any]


def pod_mix(rng: random.Random) -> list[Query]:
    """24 request shapes (millicores, bytes, gpus) with their placements."""
    out = []
    for _ in range(24):
        cpu = rng.choice((100, 250, 500, 1000, 2000, 4000, 8000, 12000))
        mem = cpu * rng.choice((1, 2, 4, 8)) * (1 << 20)
        req = {"cpu": cpu, "memory": mem}
        spec: dict[str, Any] = {}
        if rng.random() < 0.15:
            req[GPU] = rng.choice((1, 2, 4))
            spec["tolerations"] = [{"key": "dedicated", "operator": "Exists"}]
        if rng.random() < 0.3:
            spec["nodeSelector"] = {"topology.kubernetes.io/zone": rng.choice(ZONES)}
        out.append(Query(req, {"spec": spec}))
    return out


def fleet(rng: random.Random, n: int, mix: Sequence[Query]) -> list[dict[str, Any]]:
    """``n`` leaf nodes as plain values: name, free, labels, taints."""
    types = [t for t, _ in INSTANCE_TYPES]
    weights = [w for _, w in INSTANCE_TYPES]
    nodes = []
    for i in range(n):
        cores, gib, gpus = rng.choices(types, weights)[0]
        free = {"cpu": cores * 1000 - 100, "memory": gib * (1 << 30) - (512 << 20), "pods": 110}
        if gpus:
            free[GPU] = gpus
        target = free["cpu"] * rng.uniform(0.4, 0.7)
        used = 0
        while used < target and free["pods"] > 0:
            q = rng.choice(mix).request
            if any(free.get(k, 0) < v for k, v in q.items()):
                break
            for k, v in q.items():
                free[k] -= v
            free["pods"] -= 1
            used += q["cpu"]
        name = f"leaf-{i:05d}"
        labels = {HOSTNAME: name, "topology.kubernetes.io/zone": rng.choice(ZONES),
                  "kubernetes.io/arch": "arm64" if rng.random() < 0.2 else "amd64"}
        taints = [dict(TAINT)] if gpus or rng.random() < 0.02 else []
        nodes.append({"name": name, "free": free, "labels": labels, "taints": taints})
    return nodes


class Oracle:
    """Brute force: every node for every question, the upstream plugins' matching."""

    def __init__(self, nodes: Sequence[dict[str, Any]]) -> None:
        from scheduler.selectors import RequiredNodeAffinity, find_untolerated

        self._affinity = RequiredNodeAffinity
        self._untolerated = find_untolerated
        self.nodes = [dict(n) for n in nodes]

    def _admitted(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        aff = self._affinity(pod)
        tols = pod["spec"].get("tolerations") or []
        return [n for n in self.nodes
                if aff.match({"metadata": {"name": n["name"], "labels": n["labels"]}})
                and self._untolerated(n["taints"], tols) is None]

    @staticmethod
    def _per_node(free: dict[str, int], req: dict[str, int]) -> int:
        return min(free.get(k, 0) // v for k, v in req.items())

    def fits(self, q: Query) -> bool:
        req = {**q.request, "pods": 1}
        return any(all(n["free"].get(k, 0) >= v for k, v in req.items()) for n in self._admitted(q.pod))

    def count(self, q: Query) -> int:
        req = {**q.request, "pods": 1}
        return sum(self._per_node(n["free"], req) for n in self._admitted(q.pod))

    def best(self, q: Query) -> str | None:
        req = {**q.request, "pods": 1}
        cands = [(c, n["free"].get("cpu", 0), n["name"]) for n in self._admitted(q.pod)
                 if (c := self._per_node(n["free"], req)) > 0]
        return min(cands)[2] if cands else None


def _time(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter_ns()
    out = fn()
    return (time.perf_counter_ns() - t0) / 1000.0, out


def _build(nodes: Sequence[dict[str, Any]]) -> Any:
    from scheduler.leafview import LeafView, make_node

    view = LeafView("kosmos-bench")
    for n in nodes:
        view.upsert_node(make_node(n["name"], n["free"], n["labels"], n["taints"]))
    return view


def _raw_node(n: dict[str, Any]) -> dict[str, Any]:
    """A node of the record as ``tree.forge.leaf_resources`` writes it."""
    def q(k: str, v: int) -> str:
        return f"{v}m" if k == "cpu" else str(v)
    return {"name": n["name"], "ready": True, "schedulable": True, "labels": n["labels"], "taints": n["taints"],
            "free": {k: q(k, v) for k, v in n["free"].items()}, "allocatable": {}, "pods": 0, "ourPods": 0}


def _doc_of(nodes: Sequence[dict[str, Any]]) -> bytes:
    from scheduler.leafview import RECORD_SCHEMA

    return json.dumps({"schema": RECORD_SCHEMA, "cluster": "bench", "virtualNode": "kosmos-bench", "ready": True,
                       "nodes": [_raw_node(x) for x in nodes]}, sort_keys=True, separators=(",", ":")).encode()


def one_round(seed: int, n: int, samples: int) -> dict[str, tuple[list[float], list[float]]]:
    """(ours, baseline) µs samples per metric."""
    from scheduler.leafview import RECORD_SCHEMA, Demand, LeafView, Placement, make_node, parse_record

    rng = random.Random(seed)
    mix = pod_mix(rng)
    nodes = fleet(rng, n, mix)
    oracle = Oracle(nodes)
    view = _build(nodes)
    placements = {id(q): Placement.of_leaf_pod(q.pod) for q in mix}
    demands = {id(q): Demand.of(q.request) for q in mix}
    for q in mix:  # warm: the mix has been seen (a running scheduler's steady state)
        view.count(demands[id(q)], placements[id(q)])
    out: dict[str, tuple[list[float], list[float]]] = {}
    oracle_samples = max(20, samples // 10)

    def both(metric: str, ours: Callable[[int], tuple[float, Any]], base: Callable[[int], tuple[float, Any]],
             calls: int = samples, base_calls: int = oracle_samples) -> None:
        o, b = [], []
        for i in range(calls):
            t, got = ours(i)
            o.append(t)
            if i < base_calls:
                tb, want = base(i)
                b.append(tb)
                if want is not None and got != want:
                    raise AssertionError(f"bench leafview: {metric} #{i}: ours {got!r} != oracle {want!r}")
        out[metric] = (o, b)

    queries = [rng.choice(mix) for _ in range(samples)]
    both("fits", lambda i: _time(lambda: view.fits(demands[id(queries[i])], placements[id(queries[i])])),
         lambda i: _time(lambda: oracle.fits(queries[i])))
    both("count", lambda i: _time(lambda: view.count(demands[id(queries[i])], placements[id(queries[i])])),
         lambda i: _time(lambda: oracle.count(queries[i])))
    cold = [Query({"cpu": 1000 + 7 * i, "memory": (3 << 30) + 4096 * i}, rng.choice(mix).pod) for i in range(samples)]
    cold_p = [Placement.of_leaf_pod(q.pod) for q in cold]
    both("fits_cold", lambda i: _time(lambda: view.fits(Demand.of(cold[i].request), cold_p[i])),
         lambda i: _time(lambda: oracle.fits(cold[i])))
    for q in mix:  # the cold shapes pushed the mix out of the LRU: warm it again
        view.count(demands[id(q)], placements[id(q)])

    def change(i: int) -> Any:
        k = rng.randrange(n)
        node = dict(nodes[k])
        free = dict(node["free"])
        free["cpu"] = max(0, free["cpu"] + rng.choice((-500, -250, 250, 500)))
        free["pods"] = max(0, free["pods"] + rng.choice((-1, 1)))
        node["free"] = free
        nodes[k] = node
        oracle.nodes[k] = node
        return make_node(node["name"], free, node["labels"], node["taints"])

    def rebuild(i: int) -> tuple[float, Any]:
        return _time(lambda: _build(nodes))[0], None

    both("update", lambda i: _time(lambda: view.upsert_node(change(i))), rebuild)

    # A whole record as the tree manager writes it (JSON, quantities as strings) with one node
    # changed: ours parses it with the view's cache and diffs; the baseline parses it and builds.
    docs: list[bytes] = []
    raw = [_raw_node(x) for x in nodes]
    view.apply_record(_doc_of(nodes))  # the view's parse cache starts from the current record
    for _ in range(max(10, samples // 20)):  # built beforehand: the record's arrival is measured
        k = rng.randrange(n)
        node = dict(nodes[k])
        node["free"] = {**node["free"], "pods": max(0, node["free"]["pods"] - 1)}
        nodes[k] = oracle.nodes[k] = node
        raw[k] = _raw_node(node)
        docs.append(json.dumps({"schema": RECORD_SCHEMA, "cluster": "bench", "virtualNode": "kosmos-bench",
                                "ready": True, "nodes": raw}, sort_keys=True, separators=(",", ":")).encode())

    def rebuild_record(i: int) -> tuple[float, Any]:
        def build() -> None:
            v = LeafView("kosmos-bench")
            v.apply_record(parse_record(docs[i]))
        return _time(build)[0], None

    both("record", lambda i: _time(lambda: view.apply_record(docs[i])), rebuild_record,
         calls=len(docs), base_calls=max(5, len(docs) // 4))

    def assume(i: int) -> tuple[float, Any]:
        q = queries[i]
        t, got = _time(lambda: view.assume(f"p{i}", demands[id(q)], placements[id(q)]))
        t2, _ = _time(lambda: view.forget(f"p{i}"))
        return t + t2, got

    both("assume", assume, lambda i: _time(lambda: oracle.best(queries[i])))
    for q in mix:  # the structure still answers like the oracle after all that
        if view.count(demands[id(q)], placements[id(q)]) != oracle.count(q):
            raise AssertionError(f"bench leafview: count of {q.request} differs from the oracle after the updates")
    return out


def run(opts: bc.Options) -> bc.Report:
    sizes = opts.sched_nodes or ((300,) if opts.tiny else (5000,))
    samples = 200 if opts.tiny else 2000
    report = bc.Report()
    for n in sizes:
        rounds = [one_round(1000 + r, n, samples) for r in range(opts.repeat)]
        shapes = _build(fleet(random.Random(1000), n, pod_mix(random.Random(1000)))).shape_count
        for metric in rounds[0]:
            ours = [r[metric][0] for r in rounds]
            base = [r[metric][1] for r in rounds]
            for stat, fn in (("median", statistics.median), ("p99", lambda v: bc.percentile(v, 99))):
                key = f"{metric}_{stat}_us_{n}"
                report.figures[key] = bc.figure([fn(o) for o in ours], {"": [fn(b) for b in base]},
                                                higher_is_better=False)
                report.units[key] = "µs"
            bc.progress(NAME, f"{n} nodes: {metric} median {statistics.median(ours[0]):.1f} µs "
                              f"(oracle {statistics.median(base[0]):.1f} µs)")
        report.notes.append(f"{n} leaf nodes, {shapes} distinct (class, free) shapes, {samples} calls per metric and "
                            f"round ({max(20, samples // 10)} for the oracle); every answer checked against it")
    report.notes.append("update/record baseline: rebuilding the view from every node; the oracle itself pays nothing "
                        "to update (a list) and everything per query")
    return report
