"""NodeResourcesFit and NodeResourcesBalancedAllocation (upstream ``plugins/noderesources``).

Fit's Filter compares the pod's effective request (``PodInfo.requests``, computed once by
:func:`scheduler.podutil.pod_requests`) with what is left of the node's allocatable after the pods
already there (``NodeInfo.requested``), resource by resource, keeping every failing reason
(``Too many pods``, ``Insufficient cpu``, ``Insufficient example.com/gpu``). A request larger than
the whole allocatable makes the node UnschedulableAndUnresolvable (no preemption can help), as
upstream since 1.30. Extended resources named in ``ignoredResources`` or whose domain is in
``ignoredResourceGroups`` are not checked (they are someone else's business, e.g. an extender).

Scoring: for each configured resource, ``requested`` is the node's non-zero requests plus the
pod's (cpu/memory of request-less containers counted as 100m/200Mi), ``allocatable`` the node's;
an extended resource the pod does not ask for is skipped. Strategies:

- LeastAllocated (default): ``(alloc - req) * 100 / alloc`` weighted mean (spreads);
- MostAllocated: ``min(req, alloc) * 100 / alloc`` weighted mean (packs);
- RequestedToCapacityRatio: a broken-line function of utilisation (shape scores 0..10 scaled x10),
  weighted mean rounded.

BalancedAllocation scores ``(1 - std of the request fractions) * 100`` over its resources, with
the actual requests (not the non-zero ones), so nodes whose cpu and memory fill up evenly win;
best-effort pods are not scored by it (PreScore answers Skip).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from scheduler.framework import (
    MAX_NODE_SCORE,
    SKIP,
    SUCCESS,
    ClusterEvent,
    Code,
    CycleState,
    Handle,
    NodeInfo,
    PodInfo,
    Resource,
    Status,
)
from scheduler.plugins.helpers import NodeCountCache, arg
from scheduler.podutil import CPU, EPHEMERAL_STORAGE, MEMORY, is_extended_resource

DEFAULT_RESOURCES: list[dict[str, Any]] = [{"name": "cpu", "weight": 1}, {"name": "memory", "weight": 1}]
#: config.MaxCustomPriorityScore: RequestedToCapacityRatio shape scores are 0..10.
MAX_CUSTOM_PRIORITY_SCORE = 10
MAX_UTILIZATION = 100

#: Upstream's EventsToRegister: a pod leaving frees resources; a node added or grown adds them.
_RESOURCE_EVENTS = (ClusterEvent("Pod", "Delete"), ClusterEvent("Node", "Add"),
                    ClusterEvent("Node", "UpdateNodeAllocatable"))


def _get(r: Resource, name: str) -> int:
    if name == CPU:
        return r.milli_cpu
    if name == MEMORY:
        return r.memory
    if name == EPHEMERAL_STORAGE:
        return r.ephemeral_storage
    if name == "pods":
        return r.allowed_pod_number
    return r.scalar.get(name, 0)


def _resource_specs(raw: Sequence[Mapping[str, Any]] | None, where: str) -> list[tuple[str, int]]:
    out = []
    for r in raw if raw is not None else DEFAULT_RESOURCES:
        name = r.get("name")
        weight = r.get("weight", 1)
        if not name or not isinstance(weight, int) or weight <= 0 or weight > 100:
            raise ValueError(f"{where}: resource {r!r} needs a name and a weight in 1..100")
        out.append((str(name), weight))
    return out


_CPU, _MEM, _EPH, _SCALAR, _UNSCORED = range(5)


class _AllocationScorer:
    """``resourceAllocationScorer``: gathers (requested, allocatable) per resource, then applies
    the strategy function. Called per node per pod, so each resource's kind is resolved once
    here rather than by name on every call."""

    def __init__(self, resources: list[tuple[str, int]], use_requested: bool,
                 fn: Callable[[list[int], list[int], list[int]], int]) -> None:
        self.resources = resources
        self.use_requested = use_requested
        self.fn = fn
        kinds = {CPU: _CPU, MEMORY: _MEM, EPHEMERAL_STORAGE: _EPH, "pods": _UNSCORED}
        #: (kind, name, weight); "pods" is not scored (upstream's switch has no case for it).
        self.specs = [(kinds.get(name, _SCALAR), name, w) for name, w in resources]
        #: :meth:`score_nodes`' scores per node, one table per pod (cpu, memory) request.
        self._memo = NodeCountCache(max_keys=8)

    def score(self, pod: PodInfo, node: NodeInfo) -> int:
        requested: list[int] = []
        allocs: list[int] = []
        weights: list[int] = []
        # cpu and memory: the non-zero requests unless useRequested; the rest: actual requests
        pod_cm = pod.requests if self.use_requested else pod.non_zero_requests
        node_cm = node.requested if self.use_requested else node.non_zero_requested
        alloc_r = node.allocatable
        for kind, name, weight in self.specs:
            if kind == _CPU:
                preq, alloc, nreq = pod_cm.milli_cpu, alloc_r.milli_cpu, node_cm.milli_cpu
            elif kind == _MEM:
                preq, alloc, nreq = pod_cm.memory, alloc_r.memory, node_cm.memory
            elif kind == _EPH:
                preq, alloc, nreq = (pod.requests.ephemeral_storage, alloc_r.ephemeral_storage,
                                     node.requested.ephemeral_storage)
            elif kind == _SCALAR:
                preq = pod.requests.scalar.get(name, 0)
                if preq == 0:
                    continue  # an extended resource the pod does not use says nothing about the node
                alloc, nreq = alloc_r.scalar.get(name, 0), node.requested.scalar.get(name, 0)
            else:
                continue
            if alloc == 0:
                continue
            requested.append(nreq + preq)
            allocs.append(alloc)
            weights.append(weight)
        return self.fn(requested, allocs, weights)


    def score_nodes(self, pod: PodInfo, nodes: list[NodeInfo]) -> list[int]:
        """:meth:`score` for every node (the framework's batch path). The default resources
        (cpu and memory, nothing else) with LeastAllocated, MostAllocated or balance take an
        inlined loop with the pod's requests read once, and remember each node's score for
        the pod's (cpu, memory) until the node changes (its ``generation`` moves): the replicas
        of a workload ask the same, and between two of them only the nodes they landed on (and
        the binds confirmed) changed. Anything else calls :meth:`score`."""
        fn = self.fn
        if [k for k, _n, _w in self.specs] != [_CPU, _MEM] or fn not in (_least, _most, _balanced):
            return [self.score(pod, n) for n in nodes]
        wc, wm = self.specs[0][2], self.specs[1][2]
        pod_cm = pod.requests if self.use_requested else pod.non_zero_requests
        pc, pm = pod_cm.milli_cpu, pod_cm.memory
        use_requested = self.use_requested
        table = self._memo.writable((pc, pm))
        get = table.get
        out: list[int] = []
        append = out.append
        s: int
        if fn is _balanced:
            for n in nodes:
                name, gen = n.name, n.generation
                hit = get(name)
                if hit is not None and hit[0] == gen:
                    append(hit[1])
                    continue
                a = n.allocatable
                r = n.requested if use_requested else n.non_zero_requested
                ac, am = a.milli_cpu, a.memory
                if ac and am:
                    fc = (r.milli_cpu + pc) / ac
                    fm = (r.memory + pm) / am
                    std = abs(((fc if fc < 1.0 else 1.0) - (fm if fm < 1.0 else 1.0)) / 2)
                    s = int((1 - std) * MAX_NODE_SCORE)
                else:
                    s = MAX_NODE_SCORE  # one fraction or none: std 0
                table[name] = (gen, s)
                append(s)
            return out
        least = fn is _least
        wsum_both = wc + wm
        for n in nodes:
            name, gen = n.name, n.generation
            hit = get(name)
            if hit is not None and hit[0] == gen:
                append(hit[1])
                continue
            a = n.allocatable
            r = n.requested if use_requested else n.non_zero_requested
            ac, am = a.milli_cpu, a.memory
            rc, rm = r.milli_cpu + pc, r.memory + pm
            if least:
                sc = 0 if rc > ac else (ac - rc) * MAX_NODE_SCORE // ac if ac else 0
                sm = 0 if rm > am else (am - rm) * MAX_NODE_SCORE // am if am else 0
            else:
                sc = (rc if rc < ac else ac) * MAX_NODE_SCORE // ac if ac else 0
                sm = (rm if rm < am else am) * MAX_NODE_SCORE // am if am else 0
            if ac and am:
                s = (sc * wc + sm * wm) // wsum_both
            elif ac:
                s = sc * wc // wc
            elif am:
                s = sm * wm // wm
            else:
                s = 0
            table[name] = (gen, s)
            append(s)
        return out


def _least(requested: list[int], allocs: list[int], weights: list[int]) -> int:
    score = wsum = 0
    for req, alloc, w in zip(requested, allocs, weights, strict=True):
        s = 0 if req > alloc else (alloc - req) * MAX_NODE_SCORE // alloc
        score += s * w
        wsum += w
    return score // wsum if wsum else 0


def _most(requested: list[int], allocs: list[int], weights: list[int]) -> int:
    score = wsum = 0
    for req, alloc, w in zip(requested, allocs, weights, strict=True):
        s = min(req, alloc) * MAX_NODE_SCORE // alloc
        score += s * w
        wsum += w
    return score // wsum if wsum else 0


def broken_linear(shape: list[tuple[int, int]]) -> Callable[[int], int]:
    """``helper.BuildBrokenLinearFunction`` over (utilization, score) points sorted by utilization."""

    def f(p: int) -> int:
        for i, (u, s) in enumerate(shape):
            if p <= u:
                if i == 0:
                    return shape[0][1]
                pu, ps = shape[i - 1]
                return ps + _go_div((s - ps) * (p - pu), (u - pu))
        return shape[-1][1]
    return f


def _go_div(a: int, b: int) -> int:
    """Go's integer division truncates toward zero (Python's floors)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _ratio(shape_raw: Sequence[Mapping[str, Any]]) -> Callable[[list[int], list[int], list[int]], int]:
    shape = sorted((int(p["utilization"]), int(p["score"]) * (MAX_NODE_SCORE // MAX_CUSTOM_PRIORITY_SCORE))
                   for p in shape_raw)
    if not shape:
        raise ValueError("NodeResourcesFitArgs.scoringStrategy.requestedToCapacityRatio.shape is empty")
    raw = broken_linear(shape)

    def resource_score(req: int, cap: int) -> int:
        if cap == 0 or req > cap:
            return raw(MAX_UTILIZATION)
        return raw(req * MAX_UTILIZATION // cap)

    def fn(requested: list[int], allocs: list[int], weights: list[int]) -> int:
        score = wsum = 0
        for req, alloc, w in zip(requested, allocs, weights, strict=True):
            s = resource_score(req, alloc)
            if s > 0:
                score += s * w
                wsum += w
        return math.floor(score / wsum + 0.5) if wsum else 0
    return fn


def _balanced(requested: list[int], allocs: list[int], weights: list[int]) -> int:
    fractions = [min(req / alloc, 1.0) for req, alloc in zip(requested, allocs, strict=True)]
    std = 0.0
    if len(fractions) == 2:
        std = abs((fractions[0] - fractions[1]) / 2)
    elif len(fractions) > 2:
        mean = sum(fractions) / len(fractions)
        std = math.sqrt(sum((f - mean) ** 2 for f in fractions) / len(fractions))
    return int((1 - std) * MAX_NODE_SCORE)


class _AllocationScored:
    """Score, batch score and events of the two plugins that score through an
    :class:`_AllocationScorer` (``self.scorer``)."""

    scorer: _AllocationScorer

    def score(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> tuple[int, Status]:
        return self.scorer.score(pod, node), SUCCESS

    def score_nodes(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> list[int]:
        return self.scorer.score_nodes(pod, nodes)

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return _RESOURCE_EVENTS


class NodeResourcesFit(_AllocationScored):
    """Filter and score on requested vs allocatable resources (NodeResourcesFitArgs)."""

    name = "NodeResourcesFit"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        self.ignored_resources = frozenset(arg(args, "ignoredResources", []))
        self.ignored_groups = frozenset(arg(args, "ignoredResourceGroups", []))
        strategy = arg(args, "scoringStrategy", {})
        kind = strategy.get("type") or "LeastAllocated"
        resources = _resource_specs(strategy.get("resources"), f"{self.name} scoringStrategy")
        fn: Callable[[list[int], list[int], list[int]], int]
        if kind == "LeastAllocated":
            fn = _least
        elif kind == "MostAllocated":
            fn = _most
        elif kind == "RequestedToCapacityRatio":
            shape = (strategy.get("requestedToCapacityRatio") or {}).get("shape") or [
                {"utilization": 0, "score": 10}, {"utilization": 100, "score": 0}]
            fn = _ratio(shape)
        else:
            raise ValueError(f"{self.name}: scoringStrategy.type {kind!r} is not one of "
                             "LeastAllocated, MostAllocated, RequestedToCapacityRatio")
        self.strategy = kind
        self.scorer = _AllocationScorer(resources, use_requested=False, fn=fn)

    def _ignored(self, rname: str) -> bool:
        if not is_extended_resource(rname):
            return False
        return rname in self.ignored_resources or (
            bool(self.ignored_groups) and rname.split("/", 1)[0] in self.ignored_groups)

    def filter_fn(self, state: CycleState, pod: PodInfo) -> Callable[[NodeInfo], Status] | None:
        """The common case inline (the pod fits: SUCCESS after a few comparisons); any shortage,
        or extended resources, goes through :meth:`filter` for upstream's reasons."""
        req = pod.requests
        if req.scalar:
            return functools.partial(self.filter, state, pod)
        cpu, mem, eph = req.milli_cpu, req.memory, req.ephemeral_storage
        slow = self.filter

        def f(node: NodeInfo) -> Status:
            a = node.allocatable
            u = node.requested
            if len(node.pods) < a.allowed_pod_number and (cpu == 0 or cpu <= a.milli_cpu - u.milli_cpu) and \
                    (mem == 0 or mem <= a.memory - u.memory) and \
                    (eph == 0 or eph <= a.ephemeral_storage - u.ephemeral_storage):
                return SUCCESS
            return slow(state, pod, node)
        return f

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        reasons: list[str] = []
        unresolvable = False
        alloc = node.allocatable
        used = node.requested
        if len(node.pods) + 1 > alloc.allowed_pod_number:
            reasons.append("Too many pods")
        req = pod.requests
        if req.milli_cpu == 0 and req.memory == 0 and req.ephemeral_storage == 0 and not req.scalar:
            return Status(Code.UNSCHEDULABLE, tuple(reasons), self.name) if reasons else SUCCESS
        if req.milli_cpu > 0 and req.milli_cpu > alloc.milli_cpu - used.milli_cpu:
            reasons.append("Insufficient cpu")
            unresolvable |= req.milli_cpu > alloc.milli_cpu
        if req.memory > 0 and req.memory > alloc.memory - used.memory:
            reasons.append("Insufficient memory")
            unresolvable |= req.memory > alloc.memory
        if req.ephemeral_storage > 0 and req.ephemeral_storage > alloc.ephemeral_storage - used.ephemeral_storage:
            reasons.append("Insufficient ephemeral-storage")
            unresolvable |= req.ephemeral_storage > alloc.ephemeral_storage
        for rname, q in req.scalar.items():
            if q == 0 or self._ignored(rname):
                continue
            have = alloc.scalar.get(rname, 0)
            if q > have - used.scalar.get(rname, 0):
                reasons.append(f"Insufficient {rname}")
                unresolvable |= q > have
        if not reasons:
            return SUCCESS
        return Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE if unresolvable else Code.UNSCHEDULABLE,
                      tuple(reasons), self.name)



class NodeResourcesBalancedAllocation(_AllocationScored):
    """Favour nodes whose resource fractions stay even after placing the pod."""

    name = "NodeResourcesBalancedAllocation"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        resources = _resource_specs(arg(args, "resources", None), self.name)
        self.scorer = _AllocationScorer(resources, use_requested=True, fn=_balanced)

    def pre_score(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> Status:
        """A best-effort pod (no request for any scored resource) is not scored: every such pod
        would otherwise prefer the same balanced node (upstream kubernetes#129138)."""
        if all(_get(pod.requests, name) == 0 for name, _w in self.scorer.resources):
            return SKIP
        return SUCCESS

