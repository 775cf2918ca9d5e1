"""Frag benchmark: fragmentation-aware placement (:mod:`scheduler.fragmentation`, the
``LeafNodeFragmentation`` score, issue 19 item 3) against LeastAllocated and MostAllocated, on
the same fleets and the same arrival sequences, in the same run.

The simulation (seeded; no API, no scheduler loop): a fleet of N nodes (default 200) of
heterogeneous instance types (4-64 CPUs, 1:2 to 1:8 GiB per CPU), each pre-filled to 40-70 % of
its CPU by pods of random small shapes (so free vectors differ). Then a fixed sequence of pods
drawn from a mix of 6 shapes with skewed popularity (CPU- and memory-heavy ones, 0.5-8 CPUs)
arrives, long enough to saturate the fleet (1.5x its free CPU). Every policy places each pod, in
arrival order, on the node it scores best among those where the pod fits, as in node mode where
every leaf node is its own virtual node, so the root's choice is the node; a pod that fits
nowhere is stranded and the sequence goes on. Policies:

- ``frag``: the lowest ``delta(n, d)`` (:meth:`Workload.delta`) for the workload of a
  :class:`ShapeHistogram` fed by the pods placed so far (and the arriving pod), the plugin's
  ``fragmentationWeight: 100``; ties to the lower node index;
- ``frag16``: the same over the 16 fitting nodes with the least free cpu only (the plugin's
  default ``candidates``), reported in a note;
- ``least``: upstream's LeastAllocated score on the node (cpu and memory, weight 1 each);
- ``most``: upstream's MostAllocated score.

Metrics (per seed; ratio = ours / baseline, higher is better):

- ``fitted_prefix``: pods of the sequence placed before the first that fits nowhere (how much of
  a fixed sequence fits: the headline);
- ``placed``: pods placed in all, the sequence going on past stranded pods (a policy that
  strands big pods early and then takes small ones counts more here while allocating less:
  read it beside ``cpu_allocated``);
- ``cpu_allocated``: allocated / capacity of CPU at the end;
- ``frag_end``: the workload's expected fragmentation summed over the nodes at the end, in the
  mix's mean-pod units (lower is better; ratio oriented so that higher is better).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

from scheduler.fragmentation import ShapeHistogram, Workload
from scheduler.leafview import Demand, Vector, per_node
from tools.bench import common as bc

NAME = "frag"
HELP = ("fragmentation-aware placement (LeafNodeFragmentation) vs LeastAllocated/MostAllocated: pods placed from "
        "the same arrival sequences until saturation (issue 19)")  # fmt: skip

GI = 1 << 30
#: (cpu cores, memory GiB), weights
INSTANCE_TYPES = (((4, 16), 10), ((8, 32), 25), ((16, 64), 25), ((32, 128), 15), ((64, 256), 5), ((16, 128), 10),
                  ((32, 64), 10))


def requires(opts: bc.Options) -> list[str]:
    return []


def shape_mix(rng: random.Random) -> tuple[list[dict[str, int]], list[float]]:
    """6 shapes, popularity 1/rank (Zipf)."""
    shapes: list[dict[str, int]] = []
    while len(shapes) < 6:
        cpu = rng.choice((500, 1000, 2000, 3000, 4000, 6000, 8000))
        mem = cpu * rng.choice((1, 2, 4, 8)) * (1 << 20)
        s = {"cpu": cpu, "memory": mem}
        if s not in shapes:
            shapes.append(s)
    return shapes, [1.0 / (i + 1) for i in range(len(shapes))]


def fleet(rng: random.Random, n: int) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
    """(capacity, free) per node, pre-filled to 40-70 % of cpu by small random pods."""
    types, weights = zip(*INSTANCE_TYPES, strict=True)
    caps, frees = [], []
    for _ in range(n):
        cpu, mem = rng.choices(types, weights)[0]
        cap = {"cpu": cpu * 1000, "memory": mem * GI, "pods": 110}
        free = dict(cap)
        target = cap["cpu"] * rng.uniform(0.4, 0.7)
        while cap["cpu"] - free["cpu"] < target:
            c = rng.choice((100, 250, 500, 750, 1000, 1500))
            m = c * rng.choice((1, 2, 3, 4, 6)) * (1 << 20)
            if c > free["cpu"] or m > free["memory"]:
                break
            free["cpu"] -= c
            free["memory"] -= m
            free["pods"] -= 1
        caps.append(cap)
        frees.append(free)
    return caps, frees


def _least(cap: dict[str, int], after: dict[str, int]) -> float:
    return sum(after[r] * 100 // cap[r] for r in ("cpu", "memory")) / 2


def _most(cap: dict[str, int], after: dict[str, int]) -> float:
    return sum((cap[r] - after[r]) * 100 // cap[r] for r in ("cpu", "memory")) / 2


def simulate(caps: Sequence[dict[str, int]], frees0: Sequence[dict[str, int]], arrivals: Sequence[Vector],
             policy: str) -> dict[str, float]:
    """Place ``arrivals`` in order with ``policy``; the figures of the module docstring."""
    frees = [dict(f) for f in frees0]
    hist = ShapeHistogram()
    placed, first = 0, -1
    for i, d in enumerate(arrivals):
        fit = [j for j, f in enumerate(frees) if per_node(f, d)]
        if not fit:
            if first < 0:
                first = i
            continue
        if policy.startswith("frag"):
            if policy == "frag16":  # the plugin's default bound: the 16 tightest in cpu
                fit = sorted(fit, key=lambda j: (frees[j]["cpu"], j))[:16]
            wl = Workload.of(hist.distribution(d))
            best = min(fit, key=lambda j: (wl.delta(frees[j], d) or 0.0, j))  # fits: never None
        else:
            score = _least if policy == "least" else _most
            want = dict(d)
            best = max(fit, key=lambda j: (score(caps[j], {r: frees[j][r] - want.get(r, 0) for r in ("cpu", "memory")}),
                                           -j))
        for r, q in d:
            frees[best][r] -= q
        hist.observe(d)
        placed += 1
    wl_end = Workload.of(hist.distribution())
    cap_cpu = sum(c["cpu"] for c in caps)
    return {"placed": placed, "fitted_prefix": first if first >= 0 else len(arrivals),
            "cpu_allocated": sum(c["cpu"] - f["cpu"] for c, f in zip(caps, frees, strict=True)) / cap_cpu,
            "frag_end": sum(wl_end.node(f) for f in frees)}


def one_seed(seed: int, n: int) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    caps, frees = fleet(rng, n)
    shapes, pop = shape_mix(rng)
    mean_cpu = sum(s["cpu"] * p for s, p in zip(shapes, pop, strict=True)) / sum(pop)
    count = int(1.5 * sum(f["cpu"] for f in frees) / mean_cpu)
    arrivals = [Demand.of(rng.choices(shapes, pop)[0]).amounts for _ in range(count)]
    return {p: simulate(caps, frees, arrivals, p) for p in ("frag", "frag16", "least", "most")}


def run(opts: bc.Options) -> bc.Report:
    sizes = opts.sched_nodes or ((40,) if opts.tiny else (200,))
    seeds = max(1, opts.repeat) * (1 if opts.tiny else 3)
    report = bc.Report()
    for n in sizes:
        runs = [one_seed(2000 + s, n) for s in range(seeds)]
        for metric, higher in (("fitted_prefix", True), ("placed", True), ("cpu_allocated", True),
                               ("frag_end", False)):
            key = f"{metric}_{n}"
            ours = [r["frag"][metric] for r in runs]
            report.figures[key] = bc.figure(ours, {"": [r["least"][metric] for r in runs],
                                                   "most": [r["most"][metric] for r in runs]},
                                            higher_is_better=higher)
            report.units[key] = {"placed": "pods", "fitted_prefix": "pods", "cpu_allocated": "ratio",
                                 "frag_end": "mean pods"}[metric]
            bc.progress(NAME, f"{n} nodes: {metric} frag {statistics.median(ours):.3f} "
                              f"least {statistics.median(r['least'][metric] for r in runs):.3f} "
                              f"most {statistics.median(r['most'][metric] for r in runs):.3f}")
        for base in ("least", "most"):
            prefix = sum(r["frag"]["fitted_prefix"] >= r[base]["fitted_prefix"] for r in runs)
            cpu = sum(r["frag"]["cpu_allocated"] >= r[base]["cpu_allocated"] for r in runs)
            report.notes.append(f"{n} nodes, {seeds} seeds: frag fitted at least as long a prefix as {base} in "
                                f"{prefix} of {seeds} seeds, allocated at least as much cpu in {cpu} of {seeds}")
        bounded = statistics.median(r["frag16"]["fitted_prefix"] for r in runs)
        report.notes.append(f"{n} nodes: with the plugin's bound (the 16 tightest fitting nodes in cpu) frag fitted a "
                            f"median prefix of {bounded:g} pods")
        report.notes.append("baseline = LeastAllocated, most_ = MostAllocated; every policy sees the same fleet and "
                            "the same arrivals")
    return report
