"""ClusterTree benchmark (issue 17): pods created in the root and bound to the leaves' virtual
nodes, from the root create to the leaf copy Running to the root pod's status Running, against the
same pods created directly in the leaves in the same run; the tree manager's RSS and CPU per 1,000
reflected pods.

The setup (a fresh lab, torn down afterwards): a ``role: host`` root cluster and :data:`LEAVES`
leaf clusters of one node each, every leaf ``tree: node`` (one virtual node per leaf node, named
as the leaf node: ``l1`` .. ``l4``), each with its own API server and real lab kubelet (issue 15:
pods are idle processes of the lab's process runtime). ``node`` mode keeps ``nodeName`` on the
leaf copy, so neither path goes through a scheduler: the benchmark binds the root pods to the
virtual nodes itself (``spec.nodeName``) and the direct pods to the leaf nodes of the same names.
The pods are ``hostNetwork`` (the idle container runs in its node's namespace): the pod network
plumbing is what ``bench k8s`` measures; here it would only add the same cost to both sides and
use up each node's /24 at 250 pods.

Each round runs two phases, the order alternating between rounds (round 1 direct first), each
with the same N pods (``--tree-pods``, default 1,000; 20 with ``--tiny``) spread round-robin over
the leaves, created by :data:`CONCURRENCY` client threads of this process:

- **tree** (ours): per pod, ``t0`` = just before its create request to the root API server
  (namespace ``bench-tree``), ``t1`` = the leaf copy (found by its ``kosmos.io/root-name``
  annotation) first seen ``Running`` on a watch of the leaf, ``t2`` = the root pod first seen
  ``Running`` on a watch of the root. Latency = ``t2 - t0``; the leaf part ``t1 - t0`` and the
  way back ``t2 - t1`` are reported too.
- **direct** (baseline): the same pod spec created in the leaves (namespace ``bench-direct``),
  ``nodeName`` = the leaf node; latency = first seen ``Running`` on the leaf watch - ``t0``.

Every watch is a :class:`scheduler.kube.Informer` in this process (label ``kosmos-bench=tree``),
so every time is on one monotonic clock. Per round: p50/p99 (nearest rank) of the latencies and
pods/s = N / (first create -> last pod Running: the root status for tree, the leaf for direct);
the figures are the median (min, max) over rounds. Ratios, higher is better: latency direct /
tree (the issue's aim "overhead p99 <= 2x of direct" is ``create_to_running_p99`` ratio >= 0.5),
pods/s tree / direct (the aim ">= 200 pods/s reflected" is the tree median itself).

The tree manager (``kosmos-tree``, the lab's process): its RSS (``VmRSS``) before the creates and
once all N are Running in the root, the growth scaled to 1,000 pods (round 1 is the honest one:
later rounds reuse memory the first one freed); its CPU seconds over the tree phase, per 1,000
pods. The notes list every component's CPU seconds per phase (tree manager, API servers,
kubelets, this process) so a reader sees where the time goes. Between phases every bench pod is
deleted and the phase waits until none is left in the root or any leaf (the tree's copies
included).

Paced phases (``paced_*`` figures): the burst's latencies are mostly queueing (its creates outrun
the kubelets), so each round also creates a quarter of the pods per kind at :data:`PACED_RATE`
pods/s, below what either path sustains here; their latencies are each pod's own path.

Without the kubelets (``api_*`` figures): on this small machine the leaves' kubelets (and the
CPU they take from everything else) bound both paths, so each round also runs both kinds on a
second node per leaf that no kubelet serves (``l1-api`` .. ``l4-api``, made by the benchmark in
the leaves; the tree makes their virtual nodes of the same names), where the benchmark itself
plays the kubelet: it marks each pod it sees there Running with one status write (what a
kubelet writes at the least) and finishes a deleted one (grace 0). Same pods, same clocks, same
baseline (the same pods created directly in the leaves on those nodes): the tree's own
reflection rate, root create -> leaf copy -> Running -> root status Running, as far as the API
servers and the tree manager go. After each kubelet tree phase, every reflected pod is checked
(:func:`check_host_network`): the leaf copy keeps ``hostNetwork``, the root pod's ``hostIP`` and
``podIP`` are the leaf node's address, as the leaf's kubelet set them (upstream: a hostNetwork
pod's IPs are its node's).

Where kosmos-tree's time goes: its Prometheus counters (``fabric_tree_pod_writes_total`` by kind:
one ``leaf-create`` and one ``root-status`` per pod is the minimum) on its ``--listen`` address
(its log names it), and a sampling profiler attached to its PID (``tree_proc`` in the lab's
state file) during a phase, e.g. ``py-spy record --gil --format raw --pid PID``.

Needs root (the lab) and a build with the tree manager (``tree.main``) and the lab's ClusterTree
keys (``role: host``, ``tree:``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from scheduler.kube import Api, ApiError, Informer, resource_path
from tools import lab
from tools.bench import common as bc

_log = logging.getLogger(__name__)

NAME = "tree"
HELP = ("1,000 pods created in a ClusterTree root, bound to the virtual nodes of 4 leaves with real kubelets: "
        "root create -> leaf Running -> root status Running, p50/p99 and pods reflected per second (baseline: the "
        "same pods created directly in the leaves in the same run); the same without the kubelets (api_*: a "
        "kubelet-less node per leaf, the benchmark marking pods Running), the tree's own reflection rate; tree "
        "manager RSS and CPU per 1,000 pods")

LEAVES = 4
DEFAULT_PODS = 1000
TINY_PODS = 20
#: Client threads creating the pods (both phases).
CONCURRENCY = 8
TREE_NS = "bench-tree"
DIRECT_NS = "bench-direct"
LABEL = "kosmos-bench"
LABEL_VALUE = "tree"
#: What the tree puts on a leaf copy: ``<root namespace>/<root name>`` (tree.identity's contract).
ROOT_NAME_ANNOTATION = "kosmos.io/root-name"
#: Seconds without one more pod Running (or gone, when cleaning up) before a phase gives up.
STALL_S = 120.0
#: Pods of the unmeasured warm-up phases (each kind once) before the first round.
WARMUP_PODS = 40
#: Paced phases: 1/PACED_SHARE of the pods, created at PACED_RATE pods/s (below what either path
#: sustains here), so their latencies are per-pod costs, not queueing behind a burst.
PACED_RATE = 20.0
PACED_SHARE = 4
#: Room for the pods on each leaf node (the kubelet admits against it; the default is 110).
NODE_PODS = 1100
#: The kubelet-less node of each leaf (``<leaf node>-api``): the benchmark plays its kubelet.
API_SUFFIX = "-api"
#: Seconds for the tree to make the kubelet-less nodes' virtual nodes.
API_NODES_TIMEOUT_S = 60.0
#: The root-alone phases' nodes (``<leaf node>-none``): no virtual node has the name, so the tree
#: reflects nothing and only the root API server works on the creates.
ROOT_ALONE_SUFFIX = "-none"
#: Client threads of the root-alone phases: the benchmark's own and twice as many (whether more
#: clients move the root server's acceptance rate).
ROOT_ALONE_THREADS = (CONCURRENCY, 2 * CONCURRENCY)


def supported() -> bool:
    """A build with the tree manager and the lab's ClusterTree keys (issue 17)."""
    try:
        return (importlib.util.find_spec("tree.main") is not None
                and importlib.util.find_spec("tools.lab.tree") is not None)
    except (ImportError, ValueError):
        return False


def requires(opts: bc.Options) -> list[str]:
    return bc.need_root("the tree benchmark") + bc.need_programs("ip")


def pod_count(opts: bc.Options) -> int:
    return opts.tree_pods or (TINY_PODS if opts.tiny else DEFAULT_PODS)


def leaf_nodes(leaves: int = LEAVES) -> list[str]:
    """The leaf node names, which are also the virtual node names in ``node`` mode."""
    return [f"l{i + 1}" for i in range(leaves)]


def topology(leaves: int = LEAVES, node_pods: int = NODE_PODS) -> dict[str, Any]:
    """The lab: a host root and ``leaves`` one-node leaves in ``tree: node`` mode."""
    clusters: list[dict[str, Any]] = [{
        "name": "root", "role": "host", "podCIDRs": ["10.60.0.0/16"], "serviceCIDRs": ["10.160.0.0/20"],
        "nodes": [{"name": "r1", "pods": 0}]}]
    for i, node in enumerate(leaf_nodes(leaves)):
        clusters.append({"name": f"leaf{i + 1}", "tree": "node", "podCIDRs": [f"10.{61 + i}.0.0/16"],
                         "serviceCIDRs": [f"10.{161 + i}.0.0/20"],
                         "nodes": [{"name": node, "pods": 0, "resources": {"pods": str(node_pods)}}]})
    return {"underlay": "198.18.0.0/16", "kubernetes": True, "clusters": clusters}


def pod_name(i: int) -> str:
    return f"p-{i:05d}"


def pod_body(name: str, namespace: str, node: str) -> dict[str, Any]:
    """One bench pod: an idle container (no command: the runtime runs an idle process) in the
    node's network namespace, bound to ``node``, ending at once when deleted. The toleration of
    the virtual nodes' taint is what a workload meant for them carries (a bound pod needs none)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {LABEL: LABEL_VALUE}},
            "spec": {"nodeName": node, "hostNetwork": True, "terminationGracePeriodSeconds": 0,
                     "tolerations": [{"key": "kosmos.io/node", "operator": "Exists", "effect": "NoSchedule"}],
                     "containers": [{"name": "idle", "image": "registry.k8s.io/pause:3.10"}]}}


# -- the pure part: per-phase timings, statistics, the report ---------------------------------


def per_second(count: int, start: float, end: float) -> float:
    """``count`` events over the span ``start`` -> ``end`` (seconds), NaN for an empty span."""
    span = end - start
    return count / span if span > 0 else float("nan")


@dataclasses.dataclass
class Phase:
    """The times (``time.monotonic``) of one phase, by pod name: ``created`` (just before the
    create request), ``leaf`` (first seen Running in a leaf), ``root`` (first seen Running in
    the root; tree only)."""

    kind: str  # "tree", "direct" or "root" (root alone: nothing watched)
    created: dict[str, float] = dataclasses.field(default_factory=dict)
    leaf: dict[str, float] = dataclasses.field(default_factory=dict)
    root: dict[str, float] = dataclasses.field(default_factory=dict)
    #: When the last create request returned (:func:`create_all`).
    creates_done: float = float("nan")

    @property
    def creates_per_s(self) -> float:
        """Creates accepted per second: N / (first create sent -> last create returned)."""
        return per_second(len(self.created), min(self.created.values(), default=float("nan")), self.creates_done)

    @property
    def done(self) -> dict[str, float]:
        """When each pod counts as Running for this phase (tree: in the root; direct: in the leaf)."""
        return self.root if self.kind == "tree" else self.leaf


@dataclasses.dataclass(frozen=True)
class PhaseStats:
    """p50/p99 in ms of create -> Running (and, for tree, its two legs) and pods/s."""

    pods: int
    p50_ms: float
    p99_ms: float
    pods_per_s: float
    span_s: float
    leaf_p50_ms: float = float("nan")
    leaf_p99_ms: float = float("nan")
    back_p50_ms: float = float("nan")
    back_p99_ms: float = float("nan")
    #: Creates accepted per second by the API server(s) the phase creates in (:attr:`Phase.creates_per_s`).
    creates_per_s: float = float("nan")


def phase_stats(ph: Phase) -> PhaseStats:
    """Statistics of a finished phase: only pods created and seen Running count (a phase that
    did not finish raised before this)."""
    done = ph.done
    names = [n for n in ph.created if n in done]
    lat = [(done[n] - ph.created[n]) * 1000 for n in names]
    span = (max(done[n] for n in names) - min(ph.created.values())) if names else float("nan")
    rate = per_second(len(names), min(ph.created.values()), max(done[n] for n in names)) if names else float("nan")
    out = PhaseStats(len(names), bc.percentile(lat, 50), bc.percentile(lat, 99), rate, span,
                     creates_per_s=ph.creates_per_s)
    if ph.kind == "tree":
        leaf = [(ph.leaf[n] - ph.created[n]) * 1000 for n in names if n in ph.leaf]
        back = [(done[n] - ph.leaf[n]) * 1000 for n in names if n in ph.leaf]
        out = dataclasses.replace(out, leaf_p50_ms=bc.percentile(leaf, 50), leaf_p99_ms=bc.percentile(leaf, 99),
                                  back_p50_ms=bc.percentile(back, 50), back_p99_ms=bc.percentile(back, 99))
    return out


@dataclasses.dataclass(frozen=True)
class Round:
    """One round: both phases' statistics and the tree manager's growth over the tree phase."""

    tree: PhaseStats
    direct: PhaseStats
    rss_before_mb: float
    rss_after_mb: float
    cpu_s: float
    paced_tree: PhaseStats | None = None
    paced_direct: PhaseStats | None = None
    #: The phases on the kubelet-less nodes (the benchmark as their kubelet).
    api_tree: PhaseStats | None = None
    api_direct: PhaseStats | None = None
    api_cpu_s: float = float("nan")
    #: Creates per second the root API server accepts alone (pods the tree does not reflect), by
    #: client threads (:func:`root_alone`).
    root_alone: Mapping[int, float] = dataclasses.field(default_factory=dict)

    @property
    def rss_per_1000_mb(self) -> float:
        return (self.rss_after_mb - self.rss_before_mb) / self.tree.pods * 1000 if self.tree.pods else float("nan")

    @property
    def cpu_per_1000_s(self) -> float:
        return self.cpu_s / self.tree.pods * 1000 if self.tree.pods else float("nan")


UNITS = {
    "create_to_running_p50": "ms", "create_to_running_p99": "ms",
    "create_to_leaf_running_p50": "ms", "create_to_leaf_running_p99": "ms",
    "leaf_running_to_root_running_p50": "ms", "leaf_running_to_root_running_p99": "ms",
    "pods_per_s": "pods/s", "tree_rss_per_1000_pods": "MB", "tree_cpu_per_1000_pods": "s",
    "paced_create_to_running_p50": "ms", "paced_create_to_running_p99": "ms",
    "paced_leaf_running_to_root_running_p99": "ms",
    "api_create_to_running_p50": "ms", "api_create_to_running_p99": "ms", "api_pods_per_s": "pods/s",
    "api_tree_cpu_per_1000_pods": "s", "api_creates_per_s": "creates/s",
    **{f"root_alone_creates_per_s_{t}_threads": "creates/s" for t in ROOT_ALONE_THREADS},
}


def round_line(i: int, r: Round) -> str:
    """One round in a line (progress and notes)."""
    out = (f"round {i + 1}: tree p50/p99 {r.tree.p50_ms:.0f}/{r.tree.p99_ms:.0f} ms, {r.tree.pods_per_s:.1f} pods/s "
           f"over {r.tree.span_s:.1f} s (leaf copy Running p50/p99 {r.tree.leaf_p50_ms:.0f}/{r.tree.leaf_p99_ms:.0f} "
           f"ms, way back {r.tree.back_p50_ms:.0f}/{r.tree.back_p99_ms:.0f} ms); direct p50/p99 "
           f"{r.direct.p50_ms:.0f}/{r.direct.p99_ms:.0f} ms, {r.direct.pods_per_s:.1f} pods/s over "
           f"{r.direct.span_s:.1f} s; kosmos-tree RSS {r.rss_before_mb:.1f} -> {r.rss_after_mb:.1f} MB, "
           f"CPU {r.cpu_s:.1f} s")
    if r.paced_tree is not None and r.paced_direct is not None:
        out += (f"; paced ({r.paced_tree.pods} pods at {PACED_RATE:g}/s): tree p50/p99 "
                f"{r.paced_tree.p50_ms:.0f}/{r.paced_tree.p99_ms:.0f} ms (way back p99 {r.paced_tree.back_p99_ms:.0f}),"
                f" direct {r.paced_direct.p50_ms:.0f}/{r.paced_direct.p99_ms:.0f} ms")
    if r.api_tree is not None and r.api_direct is not None:
        out += (f"; without kubelets: tree p50/p99 {r.api_tree.p50_ms:.0f}/{r.api_tree.p99_ms:.0f} ms, "
                f"{r.api_tree.pods_per_s:.1f} pods/s (kosmos-tree CPU {r.api_cpu_s:.1f} s), direct p50/p99 "
                f"{r.api_direct.p50_ms:.0f}/{r.api_direct.p99_ms:.0f} ms, {r.api_direct.pods_per_s:.1f} pods/s; "
                f"creates accepted: root {r.api_tree.creates_per_s:.1f}/s, leaves {r.api_direct.creates_per_s:.1f}/s")
    if r.root_alone:
        out += "; root API server alone: " + ", ".join(
            f"{rate:.1f} creates/s with {t} threads" for t, rate in sorted(r.root_alone.items()))
    return out


def _latency_figures(rep: bc.Report, prefix: str, tree: Sequence[PhaseStats], direct: Sequence[PhaseStats]) -> None:
    """``<prefix>create_to_running_p50/p99``: the tree's phases against the direct ones."""
    for q in ("p50", "p99"):
        rep.figures[f"{prefix}create_to_running_{q}"] = bc.figure(
            [getattr(s, f"{q}_ms") for s in tree], {"": [getattr(s, f"{q}_ms") for s in direct]}, higher_is_better=False
        )


def _rate_figure(rep: bc.Report, prefix: str, tree: Sequence[PhaseStats], direct: Sequence[PhaseStats]) -> None:
    """``<prefix>pods_per_s``: pods Running per second, the tree's against direct creation."""
    rep.figures[f"{prefix}pods_per_s"] = bc.figure(
        [s.pods_per_s for s in tree], {"": [s.pods_per_s for s in direct]}, higher_is_better=True
    )


def report(rounds: Sequence[Round], pods: int) -> bc.Report:
    """The figures over ``rounds`` (medians of per-round p50/p99 and rates), with the notes
    that say how they were measured and whether the issue's aims were met."""
    rep = bc.Report(units=dict(UNITS))
    t, d = [r.tree for r in rounds], [r.direct for r in rounds]
    _latency_figures(rep, "", t, d)
    rep.figures["create_to_leaf_running_p50"] = bc.figure([s.leaf_p50_ms for s in t], {"": [s.p50_ms for s in d]},
                                                          higher_is_better=False)
    rep.figures["create_to_leaf_running_p99"] = bc.figure([s.leaf_p99_ms for s in t], {"": [s.p99_ms for s in d]},
                                                          higher_is_better=False)
    rep.figures["leaf_running_to_root_running_p50"] = bc.spread([s.back_p50_ms for s in t])
    rep.figures["leaf_running_to_root_running_p99"] = bc.spread([s.back_p99_ms for s in t])
    _rate_figure(rep, "", t, d)
    rep.figures["tree_rss_per_1000_pods"] = bc.spread([r.rss_per_1000_mb for r in rounds])
    rep.figures["tree_cpu_per_1000_pods"] = bc.spread([r.cpu_per_1000_s for r in rounds])
    p99 = rep.figures["create_to_running_p99"]
    rate_fig = rep.figures["pods_per_s"]
    rate = rate_fig["median"]
    overhead = p99["median"] / p99["baseline_median"] if p99["baseline_median"] else float("nan")
    rep.notes += [
        f"{pods} pods per phase over {LEAVES} one-node leaves (tree: node; virtual node = leaf node name), "
        f"hostNetwork idle containers bound with spec.nodeName (no scheduler in either path), created by "
        f"{CONCURRENCY} client threads. ours = tree: root create -> root pod status Running (through the leaf "
        "copy Running); baseline = direct: the same pod created in the leaf -> Running there. Each round runs both "
        "phases, alternating which goes first; all pods deleted and gone between phases; before round 1, "
        f"an unmeasured warm-up of {WARMUP_PODS} pods per kind (namespaces made, connections open).",
        "create_to_leaf_running: root create -> the leaf copy Running (baseline: the direct pods again); "
        "leaf_running_to_root_running: the leaf copy Running -> the root pod Running (the way back, no baseline).",
        "tree_rss_per_1000_pods: kosmos-tree's VmRSS growth from before the creates to all N Running in the root, "
        "scaled to 1,000 pods (round 1 is the honest one: later rounds reuse memory the first freed); "
        "tree_cpu_per_1000_pods: its CPU seconds over the tree phase, scaled.",
    ]
    pt = [r.paced_tree for r in rounds if r.paced_tree is not None]
    pd = [r.paced_direct for r in rounds if r.paced_direct is not None]
    if pt and pd:
        rep.figures["paced_create_to_running_p50"] = bc.figure([s.p50_ms for s in pt], {"": [s.p50_ms for s in pd]},
                                                               higher_is_better=False)
        rep.figures["paced_create_to_running_p99"] = bc.figure([s.p99_ms for s in pt], {"": [s.p99_ms for s in pd]},
                                                               higher_is_better=False)
        rep.figures["paced_leaf_running_to_root_running_p99"] = bc.spread([s.back_p99_ms for s in pt])
        rep.notes.append(
            f"paced_*: besides the burst, each round creates {pt[0].pods} pods per kind at {PACED_RATE:g} pods/s "
            "(below what either path sustains here): the burst's latencies are mostly queueing (its creates "
            "outrun the kubelets, the direct ones more so since nothing slows them), the paced ones are each pod's "
            "own path.")
    else:
        for k in [k for k in rep.units if k.startswith("paced_")]:
            del rep.units[k]
    at = [r.api_tree for r in rounds if r.api_tree is not None]
    ad = [r.api_direct for r in rounds if r.api_direct is not None]
    api_rate = float("nan")
    if at and ad:
        _latency_figures(rep, "api_", at, ad)
        _rate_figure(rep, "api_", at, ad)
        rep.figures["api_tree_cpu_per_1000_pods"] = bc.spread(
            [r.api_cpu_s / r.api_tree.pods * 1000 for r in rounds if r.api_tree is not None and r.api_tree.pods])
        rep.figures["api_creates_per_s"] = bc.figure(
            [s.creates_per_s for s in at], {"": [s.creates_per_s for s in ad]}, higher_is_better=True)
        api_rate = rep.figures["api_pods_per_s"]["median"]
        rep.notes.append(
            f"api_*: each round also runs {at[0].pods} pods per kind on a second node per leaf that no kubelet "
            f"serves (<leaf node>{API_SUFFIX}; the tree makes their virtual nodes): this process plays their "
            "kubelet (one status write marks a pod Running as soon as it is seen; a deleted one is finished "
            "with grace 0), so the rate is the tree's own reflection rate (root create -> leaf copy -> Running "
            "-> root status Running) against the same pods created directly in the leaves on those nodes, not "
            "the leaf kubelets' capacity. The CPU the kubelets take when they run pods is not taken here. "
            "api_creates_per_s: the creates accepted per second in those phases (first create sent -> last create "
            "returned; the root's one API server for tree, the 4 leaves' for direct): where api_pods_per_s is "
            "close to it, the tree keeps up with the creates and the root's acceptance bounds the figure.")
    else:
        for k in [k for k in rep.units if k.startswith("api_")]:
            del rep.units[k]
    for threads in ROOT_ALONE_THREADS:
        rates = [r.root_alone[threads] for r in rounds if threads in r.root_alone]
        if rates:
            rep.figures[f"root_alone_creates_per_s_{threads}_threads"] = bc.spread(rates)
        else:
            del rep.units[f"root_alone_creates_per_s_{threads}_threads"]
    if any(r.root_alone for r in rounds):
        rep.notes.append(
            f"root_alone_creates_per_s_<T>_threads: each round, the same {pods} pods created in the root by T client "
            f"threads, bound to nodes no virtual node is named after (<leaf node>{ROOT_ALONE_SUFFIX}), so the tree "
            "reflects none and no leaf works: the root API server's own acceptance rate (first create sent -> last "
            "create returned) on this machine, the ceiling of the tree figures, which create in that one server.")
    aims = (f"aims of issue 17: tree p99 <= 2x direct p99: burst {overhead:.2f}x "
            f"({'met' if overhead <= 2 else 'NOT met'})")
    if "paced_create_to_running_p99" in rep.figures:
        pp = rep.figures["paced_create_to_running_p99"]
        paced = pp["median"] / pp["baseline_median"] if pp["baseline_median"] else float("nan")
        aims += f", paced {paced:.2f}x ({'met' if paced <= 2 else 'NOT met'})"
    without = ""
    if math.isfinite(api_rate):
        api_fig = rep.figures["api_pods_per_s"]
        without = (f"; without the kubelets (api_pods_per_s): {api_rate:.0f} pods/s "
                   f"({'met' if api_rate >= 200 else 'NOT met'}; direct {api_fig['baseline_median']:.0f} pods/s)")
    rep.notes.insert(2, f"{aims}; >= 200 pods/s reflected: measured {rate:.0f} pods/s "
                        f"({'met' if rate >= 200 else 'NOT met'}; direct in the same run: "
                        f"{rate_fig['baseline_median']:.0f} pods/s){without}.")
    for i, r in enumerate(rounds):
        rep.notes.append(round_line(i, r))
    return rep


# -- the lab side ----------------------------------------------------------------------------


def _running(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running"


class Watches:
    """Informers on the bench pods of the root and of every leaf; they note, in the current
    :class:`Phase`, when each pod was first seen Running (and count what is left, for cleanup)."""

    def __init__(self, root: Api, leaves: Sequence[Api]) -> None:
        self.phase: Phase | None = None
        self._lock = threading.Lock()
        sel = f"{LABEL}={LABEL_VALUE}"
        self.root = Informer(root, "v1", "pods", label_selector=sel)
        self.leaves = [Informer(api, "v1", "pods", label_selector=sel) for api in leaves]
        self.root.add_handler(self._on_root)
        for inf in self.leaves:
            inf.add_handler(self._on_leaf)

    def start(self, timeout_s: float = 30.0) -> None:
        for inf in (self.root, *self.leaves):
            inf.start()
        deadline = time.monotonic() + timeout_s
        for inf in (self.root, *self.leaves):
            if not inf.synced.wait(max(0.1, deadline - time.monotonic())):
                raise RuntimeError(f"the bench's pod watch on {inf.api.host} did not list within {timeout_s:g} s")

    def stop(self) -> None:
        for inf in (self.root, *self.leaves):
            inf.stop()
        for inf in (self.root, *self.leaves):
            inf.join(5.0)

    def left(self) -> int:
        """Bench pods still in the root or a leaf (deleting or not)."""
        return len(self.root.store) + sum(len(inf.store) for inf in self.leaves)

    def _on_root(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        now = time.monotonic()
        ph = self.phase
        if ph is None or ph.kind != "tree" or new is None or kind == "DELETED" or not _running(new):
            return
        meta = new.get("metadata") or {}
        if meta.get("namespace") == TREE_NS:
            with self._lock:
                ph.root.setdefault(str(meta.get("name")), now)

    def _on_leaf(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        now = time.monotonic()
        ph = self.phase
        if ph is None or new is None or kind == "DELETED" or not _running(new):
            return
        meta = new.get("metadata") or {}
        if ph.kind == "direct" and meta.get("namespace") == DIRECT_NS:
            name = str(meta.get("name"))
        elif ph.kind == "tree" and meta.get("namespace") == TREE_NS:
            root_ns, _, name = str((meta.get("annotations") or {}).get(ROOT_NAME_ANNOTATION) or "").partition("/")
            if root_ns != TREE_NS:
                return
        else:
            return
        with self._lock:
            ph.leaf.setdefault(name, now)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def api_node_body(name: str, address: str, pods: int) -> dict[str, Any]:
    """A leaf Node no kubelet serves (:data:`API_SUFFIX`): Ready, room for ``pods`` pods."""
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
            "spec": {},
            "status": {"capacity": {"cpu": "64", "memory": "256Gi", "pods": str(pods)},
                       "allocatable": {"cpu": "64", "memory": "256Gi", "pods": str(pods)},
                       "addresses": [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}],
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                       "message": "the tree benchmark plays this node's kubelet",
                                       "lastHeartbeatTime": _now(), "lastTransitionTime": _now()}]}}


def running_status(pod: Mapping[str, Any], address: str) -> dict[str, Any]:
    """What a kubelet writes when a hostNetwork pod's containers run: phase Running, the node's
    address as hostIP and podIP, Ready conditions, each container running."""
    now = _now()
    conds = [{"type": t, "status": "True", "lastTransitionTime": now}
             for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")]
    containers = [{"name": c.get("name"), "image": c.get("image"), "imageID": "", "ready": True, "started": True,
                   "restartCount": 0, "state": {"running": {"startedAt": now}}}
                  for c in (pod.get("spec") or {}).get("containers") or []]
    return {"phase": "Running", "hostIP": address, "hostIPs": [{"ip": address}], "podIP": address,
            "podIPs": [{"ip": address}], "startTime": now, "conditions": conds, "containerStatuses": containers}


class ApiKubelet:
    """The kubelet of the leaves' kubelet-less nodes (:data:`API_SUFFIX`), played by the
    benchmark: fed by the leaf watches, it marks each pod bound to one Running (one status
    write) and finishes a deleted one (DELETE, grace 0), with :data:`CONCURRENCY` threads."""

    def __init__(self, leaves: Sequence[Api], addresses: Mapping[str, str]) -> None:
        self.leaves = list(leaves)
        #: Kubelet-less node name -> its address.
        self.addresses = dict(addresses)
        self._pool = concurrent.futures.ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="bench-tree-kubelet")
        self._lock = threading.Lock()
        self._started: set[str] = set()
        self._finished: set[str] = set()
        self.failures = 0

    def handler(self, leaf: int) -> Callable[[str, dict[str, Any] | None, dict[str, Any] | None], None]:
        def on_pod(kind: str, _old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
            if new is None or kind == "DELETED":
                return
            node = str((new.get("spec") or {}).get("nodeName") or "")
            if node not in self.addresses:
                return
            meta = new.get("metadata") or {}
            uid = str(meta.get("uid"))
            with self._lock:
                if meta.get("deletionTimestamp"):
                    if uid in self._finished:
                        return
                    self._finished.add(uid)
                elif uid in self._started or _running(new):
                    return
                else:
                    self._started.add(uid)
            self._pool.submit(self._act, self.leaves[leaf], new, node)
        return on_pod

    def _act(self, api: Api, pod: dict[str, Any], node: str) -> None:
        meta = pod["metadata"]
        try:
            if meta.get("deletionTimestamp"):
                api.request("DELETE", resource_path("v1", "pods", meta["namespace"], meta["name"]),
                            {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}, timeout=60)
            else:
                api.request("PUT", resource_path("v1", "pods", meta["namespace"], meta["name"], sub="status"),
                            {**pod, "status": running_status(pod, self.addresses[node])}, timeout=60)
        except ApiError as e:
            if e.status not in (404, 409):
                self.failures += 1
                _log.warning("bench kubelet: %s %s/%s: %s", "finishing" if meta.get("deletionTimestamp")
                             else "starting", meta["namespace"], meta["name"], e)
                with self._lock:  # let the next event try again
                    self._started.discard(str(meta["uid"]))
                    self._finished.discard(str(meta["uid"]))

    def stop(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_api_nodes(root: Api, leaves: Sequence[Api], nodes: Sequence[str], pods: int) -> dict[str, str]:
    """The kubelet-less node of each leaf (``<node>-api``, the real node's InternalIP as its
    address), and their virtual nodes Ready in the root; their addresses by name."""
    addresses: dict[str, str] = {}
    for api, node in zip(leaves, nodes, strict=True):
        real = api.request("GET", resource_path("v1", "nodes", name=node), timeout=30)
        address = next((a["address"] for a in (real.get("status") or {}).get("addresses") or []
                        if a.get("type") == "InternalIP"), "192.0.2.1")
        name = node + API_SUFFIX
        body = api_node_body(name, address, pods)
        try:
            api.request("POST", resource_path("v1", "nodes"), body, timeout=30)
        except ApiError as e:
            if e.status != 409:
                raise
        current = api.request("GET", resource_path("v1", "nodes", name=name), timeout=30)
        api.request("PUT", resource_path("v1", "nodes", name=name, sub="status"),
                    {**current, "status": body["status"]}, timeout=30)
        addresses[name] = address
    deadline = time.monotonic() + API_NODES_TIMEOUT_S
    for name in addresses:
        while True:
            try:
                vn = root.request("GET", resource_path("v1", "nodes", name=name), timeout=30)
                if any(c.get("type") == "Ready" and c.get("status") == "True"
                       for c in (vn.get("status") or {}).get("conditions") or []):
                    break
            except ApiError as e:
                if e.status != 404:
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"the tree made no Ready virtual node {name} within {API_NODES_TIMEOUT_S:g} s")
            time.sleep(0.5)
    return addresses


def check_host_network(watches: Watches, leaf_addresses: Mapping[str, str]) -> tuple[int, list[str]]:
    """Every tree pod in the root store, against its leaf copy: the copy keeps ``hostNetwork``,
    the root pod's ``hostIP`` and ``podIP`` are the leaf node's address (``leaf_addresses`` by
    node name), as the leaf's kubelet set them on the copy. Returns (pods checked, problems)."""
    copies: dict[str, dict[str, Any]] = {}
    for inf in watches.leaves:
        for p in list(inf.store.values()):
            ann = str(((p.get("metadata") or {}).get("annotations") or {}).get(ROOT_NAME_ANNOTATION) or "")
            if ann.startswith(TREE_NS + "/"):
                copies[ann] = p
    checked, problems = 0, []
    for p in list(watches.root.store.values()):
        meta = p.get("metadata") or {}
        if meta.get("namespace") != TREE_NS or not _running(p):
            continue
        key = f"{TREE_NS}/{meta.get('name')}"
        copy = copies.get(key)
        checked += 1
        node = str((p.get("spec") or {}).get("nodeName") or "")
        want = leaf_addresses.get(node)
        st = p.get("status") or {}
        if copy is None:
            problems.append(f"{key}: no leaf copy seen")
        elif not (copy.get("spec") or {}).get("hostNetwork"):
            problems.append(f"{key}: the leaf copy lost hostNetwork")
        elif want is not None and (st.get("hostIP") != want or st.get("podIP") != want):
            problems.append(f"{key}: root hostIP/podIP {st.get('hostIP')}/{st.get('podIP')}, leaf node {want}")
        elif (copy.get("status") or {}).get("podIP") != st.get("podIP"):
            leaf_ip = (copy.get("status") or {}).get("podIP")
            problems.append(f"{key}: root podIP {st.get('podIP')} != the copy's {leaf_ip}")
    return checked, problems


def _ensure_namespace(api: Api, ns: str) -> None:
    with contextlib.suppress(ApiError):  # 409: already there
        api.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                    "metadata": {"name": ns}})


def create_all(ph: Phase, targets: Sequence[tuple[Api, dict[str, Any]]], rate: float | None = None,
               threads: int = CONCURRENCY) -> None:
    """Create every pod of ``targets`` (API, body) with ``threads`` threads, noting ``t0`` just
    before each request and when the last one returned; a refused create fails the phase.
    ``rate``: pod ``i`` is sent no earlier than ``i / rate`` seconds after the start (paced);
    None: as fast as the threads go."""
    start = time.monotonic()

    def one(i: int, target: tuple[Api, dict[str, Any]]) -> None:
        api, body = target
        meta = body["metadata"]
        if rate:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
        ph.created[meta["name"]] = time.monotonic()
        api.request("POST", resource_path("v1", "pods", meta["namespace"]), body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="bench-tree-create") as pool:
        futures = [pool.submit(one, i, t) for i, t in enumerate(targets)]
        t0 = next_report = time.monotonic()
        for i, f in enumerate(futures):
            f.result()
            if time.monotonic() >= next_report + 5:
                next_report = time.monotonic()
                bc.progress(NAME, f"  {ph.kind}: {i + 1}/{len(futures)} created after {next_report - t0:.0f} s, "
                            f"{len(ph.done)} Running")
        ph.creates_done = time.monotonic()


def wait_until(what: str, count: Callable[[], int], goal: int, progress_s: float = 5.0) -> None:
    """Until ``count()`` reaches ``goal`` (polled every 0.1 s; progress every ``progress_s``);
    fails after :data:`STALL_S` without a change."""
    t0 = last_change = next_report = time.monotonic()
    last = count()
    while last != goal:
        time.sleep(0.1)
        now, n = time.monotonic(), count()
        if n != last:
            last, last_change = n, now
        if now - last_change > STALL_S:
            raise RuntimeError(f"{what}: stuck at {n} (want {goal}) for {STALL_S:g} s")
        if now >= next_report:
            bc.progress(NAME, f"  {what}: {n}/{goal} after {now - t0:.0f} s")
            next_report = now + progress_s


def delete_all(targets: Sequence[tuple[Api, str, str]], grace0: bool = False) -> None:
    """Delete (API, namespace, name) pods with the clients' threads; a pod already gone is fine.
    ``grace0``: with ``gracePeriodSeconds: 0`` (pods no kubelet finishes)."""
    body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0} if grace0 else None

    def one(t: tuple[Api, str, str]) -> None:
        api, ns, name = t
        with contextlib.suppress(ApiError):  # 404
            api.request("DELETE", resource_path("v1", "pods", ns, name), body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="bench-tree-delete") as pool:
        list(pool.map(one, targets))


def _cpu_s(pid: int) -> float:
    from tools.bench.k8s import _cpu_s as cpu

    return cpu(pid)


def _rss_mb(pid: int) -> float:
    from kubeemu.bench import rss_mb

    try:
        return rss_mb(pid)
    except OSError:
        return float("nan")


def component_pids(state: lab.LabState) -> dict[str, list[int]]:
    """The processes whose CPU the notes report, by role (the lab's records)."""
    out: dict[str, list[int]] = {"kosmos-tree": [], "root apiserver": [], "leaf apiservers": [],
                                 "leaf kubelets": [], "bench (this process)": [os.getpid()]}
    if state.tree_proc is not None:
        out["kosmos-tree"].append(state.tree_proc.pid)
    for c in state.clusters:
        if c.apiserver is not None:
            out["root apiserver" if c.role == "host" else "leaf apiservers"].append(c.apiserver.pid)
        if c.kubelet is not None and c.role != "host":
            out["leaf kubelets"].append(c.kubelet.pid)
    return out


def cpu_snapshot(pids: Mapping[str, Sequence[int]]) -> dict[str, float]:
    return {role: sum(_cpu_s(p) for p in ps) for role, ps in pids.items()}


def run_phase(kind: str, watches: Watches, root: Api, leaves: Sequence[Api], n: int,
              pids: Mapping[str, Sequence[int]], notes: list[str], label: str,
              rate: float | None = None, *, api_nodes: bool = False,
              check: Callable[[], None] | None = None) -> tuple[Phase, float, float]:
    """One phase: create ``n`` pods (tree: in the root; direct: in the leaves), wait until all
    are Running, note the CPU per component, delete them and wait until none is left anywhere.
    Returns the phase, the tree manager's CPU seconds over it and its RSS (MB) once all ran.
    ``rate``: paced creates (:func:`create_all`); the phase is then named ``<kind> paced``.
    ``api_nodes``: on the kubelet-less nodes (``<kind> without kubelets``). ``check``: run once
    all are Running, before the deletes."""
    nodes = [n_ + API_SUFFIX if api_nodes else n_ for n_ in leaf_nodes(len(leaves))]
    ph = Phase(kind)
    if kind == "tree":
        targets = [(root, pod_body(pod_name(i), TREE_NS, nodes[i % len(nodes)])) for i in range(n)]
    else:
        targets = [(leaves[i % len(leaves)], pod_body(pod_name(i), DIRECT_NS, nodes[i % len(nodes)]))
                   for i in range(n)]
    cpu0 = cpu_snapshot(pids)
    watches.phase = ph
    if rate:
        kind = f"{kind} paced"
    if api_nodes:
        kind = f"{kind} without kubelets"
    bc.progress(NAME, f"{label}: {kind}: creating {n} pods" + (f" at {rate:g} pods/s" if rate else ""))
    create_all(ph, targets, rate)
    wait_until(f"{label}: {kind}: pods Running" + (" in the root" if ph.kind == "tree" else ""),
               lambda: len(ph.done), n)
    cpu1 = cpu_snapshot(pids)
    tree_pids = pids.get("kosmos-tree") or [0]
    rss = _rss_mb(tree_pids[0])
    watches.phase = None
    if check is not None:
        check()
    spent = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
    line = ", ".join(f"{k} {v:.1f}" for k, v in spent.items())
    notes.append(f"{label} {kind}: CPU seconds from the first create to all Running: {line}")
    bc.progress(NAME, f"{label}: {kind}: all {n} Running; CPU s: {line}; deleting")
    delete_all([(api, body["metadata"]["namespace"], body["metadata"]["name"]) for api, body in targets])
    wait_until(f"{label}: {kind}: bench pods left (root and leaves)", watches.left, 0)
    notes.append(f"{label} {kind}: kosmos-tree RSS {rss:.1f} MB with all {n} Running, "
                 f"{_rss_mb(tree_pids[0]):.1f} MB once all were gone")
    return ph, spent.get("kosmos-tree", float("nan")), rss


def root_alone(watches: Watches, root: Api, n: int, threads: int, pids: Mapping[str, Sequence[int]],
               notes: list[str], label: str) -> float:
    """The root API server's own acceptance rate: ``n`` bench pods created in the root by
    ``threads`` client threads, bound to nodes no virtual node is named after (so the tree
    reflects none and the leaves do nothing), then deleted (grace 0: no kubelet finishes them).
    Returns creates per second (first create sent -> last create returned)."""
    nodes = [n_ + ROOT_ALONE_SUFFIX for n_ in leaf_nodes()]
    ph = Phase("root")
    targets = [(root, pod_body(pod_name(i), TREE_NS, nodes[i % len(nodes)])) for i in range(n)]
    what = f"{label}: root API server alone ({threads} threads)"
    bc.progress(NAME, f"{what}: creating {n} pods")
    cpu0 = cpu_snapshot(pids)
    create_all(ph, targets, threads=threads)
    cpu1 = cpu_snapshot(pids)
    line = ", ".join(f"{k} {cpu1[k] - cpu0.get(k, 0.0):.1f}" for k in cpu1)
    notes.append(f"{what}: {ph.creates_per_s:.1f} creates/s; CPU seconds over the creates: {line}")
    bc.progress(NAME, f"{what}: {ph.creates_per_s:.1f} creates/s; CPU s: {line}; deleting")
    delete_all([(root, TREE_NS, body["metadata"]["name"]) for _, body in targets], grace0=True)
    wait_until(f"{what}: bench pods left", watches.left, 0)
    return ph.creates_per_s


@contextlib.contextmanager
def _watching(root: Api, leaves: Sequence[Api], kubelet: ApiKubelet | None = None) -> Iterator[Watches]:
    w = Watches(root, leaves)
    if kubelet is not None:
        for i, inf in enumerate(w.leaves):
            inf.add_handler(kubelet.handler(i))
    try:
        w.start()
        yield w
    finally:
        w.stop()
        if kubelet is not None:
            kubelet.stop()


def measure(state: lab.LabState, n: int, repeat: int) -> bc.Report:
    """The rounds on a lab of :func:`topology` (``state``), then the report."""
    host = state.host_cluster
    if host is None or host.api_url is None:
        raise RuntimeError(f"lab {state.name} has no host cluster with an API server")
    leaf_recs = sorted((c for c in state.clusters if c.tree), key=lambda c: c.name)
    if any(c.api_url is None for c in leaf_recs):
        raise RuntimeError(f"lab {state.name}: a leaf has no API server")
    root = Api(host.api_url, user_agent="bench-tree")
    leaves = [Api(str(c.api_url), user_agent="bench-tree") for c in leaf_recs]
    _ensure_namespace(root, TREE_NS)
    for api in leaves:
        _ensure_namespace(api, DIRECT_NS)
    notes: list[str] = []
    rounds: list[Round] = []
    nodes = leaf_nodes(len(leaves))
    addresses = make_api_nodes(root, leaves, nodes, max(NODE_PODS, n // LEAVES + 20))
    leaf_addresses = {}
    for api, node in zip(leaves, nodes, strict=True):
        real = api.request("GET", resource_path("v1", "nodes", name=node), timeout=30)
        leaf_addresses[node] = next((a["address"] for a in (real.get("status") or {}).get("addresses") or []
                                     if a.get("type") == "InternalIP"), "")
    kubelet = ApiKubelet(leaves, addresses)
    checks: list[str] = []

    def check_tree_pods(label: str) -> Callable[[], None]:
        def check() -> None:
            checked, problems = check_host_network(watches, leaf_addresses)
            line = (f"{label}: hostNetwork reflection: {checked} root pods checked against their leaf copies, "
                    f"{len(problems)} wrong" + (f" ({'; '.join(problems[:3])})" if problems else ""))
            bc.progress(NAME, line)
            checks.append(line)
        return check

    with _watching(root, leaves, kubelet) as watches:
        warm = min(n, WARMUP_PODS)
        for kind in ("direct", "tree"):  # unmeasured: namespaces made, connections and processes warm
            run_phase(kind, watches, root, leaves, warm, component_pids(state), [], "warm-up")
            run_phase(kind, watches, root, leaves, warm, component_pids(state), [], "warm-up", api_nodes=True)
        for rnd in range(repeat):
            label = f"round {rnd + 1}/{repeat}"
            pids = component_pids(state)
            tree_pid = pids["kosmos-tree"][0] if pids["kosmos-tree"] else 0
            phases: dict[str, Phase] = {}
            rss0 = rss1 = float("nan")
            cpu = float("nan")
            for kind in (("direct", "tree") if rnd % 2 == 0 else ("tree", "direct")):
                before = _rss_mb(tree_pid)
                ph, spent, after = run_phase(kind, watches, root, leaves, n, pids, notes, label,
                                             check=check_tree_pods(label) if kind == "tree" else None)
                if kind == "tree":
                    rss0, rss1, cpu = before, after, spent
                phases[kind] = ph
            paced = max(1, n // PACED_SHARE)
            for kind in (("direct", "tree") if rnd % 2 == 0 else ("tree", "direct")):
                ph, _, _ = run_phase(kind, watches, root, leaves, paced, pids, notes, label, PACED_RATE)
                phases[f"{kind} paced"] = ph
            api_cpu = float("nan")
            for kind in (("direct", "tree") if rnd % 2 == 0 else ("tree", "direct")):
                ph, spent, _ = run_phase(kind, watches, root, leaves, n, pids, notes, label, api_nodes=True)
                phases[f"{kind} api"] = ph
                if kind == "tree":
                    api_cpu = spent
            alone = {t: root_alone(watches, root, n, t, pids, notes, label) for t in ROOT_ALONE_THREADS}
            r = Round(phase_stats(phases["tree"]), phase_stats(phases["direct"]), rss0, rss1, cpu,
                      phase_stats(phases["tree paced"]), phase_stats(phases["direct paced"]),
                      phase_stats(phases["tree api"]), phase_stats(phases["direct api"]), api_cpu, alone)
            rounds.append(r)
            bc.progress(NAME, round_line(rnd, r))
    rep = report(rounds, n)
    rep.notes += checks + notes
    if kubelet.failures:
        rep.notes.append(f"the benchmark's kubelet of the kubelet-less nodes failed {kubelet.failures} writes "
                         "(retried on the next event)")
    return rep


def run(opts: bc.Options) -> bc.Report:
    n = pod_count(opts)
    doc = topology(LEAVES, max(NODE_PODS, n // LEAVES + 20))
    with bc.lab_env(NAME, doc, f"a host and {LEAVES} tree: node leaves with Kubernetes",
                    timeout_s=max(300.0, lab.DEFAULT_UP_TIMEOUT_S)) as state:
        return measure(state, n, opts.repeat)
