"""LeafNodeFragmentation: score virtual nodes by how little their leaf's nodes fragment when the
pod lands there (issue 19, item 3: consolidation), blended with a MostAllocated or
LeastAllocated score.

Why: the virtual node's sum says nothing of the holes inside the leaf; a leaf where the pod fills
a node exactly for the shapes that keep arriving is better than one where it leaves a remainder
no later pod can use. The measure and its formula are in :mod:`scheduler.fragmentation`.

Per pod (``score_nodes``, all feasible nodes at once):

1. The workload ``M``: the plugin's :class:`~scheduler.fragmentation.ShapeHistogram` of the pods
   it saw reserved, plus this pod as one fresh observation; the coefficients ``c_r`` from the
   ``scoringStrategy.resources`` weights.
2. Per virtual node with a leaf view (``handle.leaf_views``, as LeafNodeFit): ``delta_V`` = the
   lowest ``delta(n, d)`` over the leaf nodes ``n`` admitting the pod's leaf placement where it
   fits (at most ``candidates`` distinct free vectors, the tightest in cpu first: a bound on the
   work per virtual node, :meth:`LeafView.candidates`). The leaf's own scheduler may pick
   another node; the best achievable delta is what the leaf offers.
3. ``frag_V`` = 100 for the lowest ``delta_V`` among the scored nodes, 0 for the highest, linear
   between (:func:`~scheduler.fragmentation.scores`); 50 for a node without a view or where the
   view has no room (LeafNodeFit rejects those when it runs) and for nodes that are not virtual.
4. ``alloc_V``: upstream's NodeResourcesFit score of the virtual node with this plugin's
   ``scoringStrategy`` (``type`` LeastAllocated (default) or MostAllocated, ``resources``).
5. ``score_V = round((fragmentationWeight * frag_V + (100 - fragmentationWeight) * alloc_V) / 100)``
   (``fragmentationWeight`` 0..100, default 50).
6. The choice (``chooseLeafNode``, default true): per virtual node, the leaf node reaching
   ``delta_V`` (the first by name among equal free vectors) is written in the cycle state
   (:data:`LEAF_NODE_CHOICE`), and LeafNodeFit's Reserve reserves the pod there (and so pins
   its leaf copy there) instead of on its best fit, when it still admits the pod and has room.
   Why: the score ranks a leaf by the placement that fragments it least, and best fit (the
   fewest further copies of the pod) is a different placement; reserving the one the score
   counted packs the fleet better (``fabric-tool bench placement``, the same seeds: best fit
   below Karmada's accurate estimator, this choice above it). With one feasible node the
   scheduler scores nothing (upstream): LeafNodeFit keeps its best fit then.

Without any leaf view (``kosmos-scheduler`` without ``--reflector``) every node scores 0: the
plugin changes nothing. ``reserve`` adds the pod's shape to the histogram (a bind that fails later
keeps it: it was a shape that arrived); ``unreserve`` does nothing.

Args: ``fragmentationWeight``, ``scoringStrategy`` {``type``, ``resources``}, ``shapes``
(histogram bound, default 16), ``halfLife`` (observations, default 256), ``candidates`` (default
16), ``chooseLeafNode`` (default true, step 6).

Cost per pod: (virtual nodes) x ``candidates`` x (histogram shapes) multiply-adds in C, over
figures kept between pods: each view's candidate list (:meth:`LeafView.candidate_shapes`, kept
per class until a shape that belongs in it appears or goes) and the integer part of every delta
(:class:`~scheduler.fragmentation.DeltaCache`, per (free vector, demand, shape)); only the
leaf nodes that changed since the last pod cost integer divisions. The answers are those of the
uncached computation, bit for bit (``tests/unit/test_frag_cache.py``). Measured in
``fabric-tool bench placement`` at 5,000 leaf nodes: about 0.7 ms median CPU time per decision
(was 2.2 ms uncached; 1.2 ms with only the delta cache).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from scheduler.fragmentation import HALF_LIFE, SHAPES, DeltaCache, ShapeHistogram, Workload, scores
from scheduler.framework import SUCCESS, ClusterEvent, CycleState, Handle, NodeInfo, PodInfo, Status
from scheduler.leafview import Demand, Placement, resource_vector
from scheduler.leafviews import LeafViews
from scheduler.plugins.helpers import arg
from scheduler.plugins.noderesources import _AllocationScorer, _least, _most, _resource_specs
from scheduler.policy import is_leaf_node

#: The CycleState key of the leaf node choices (virtual node -> leaf node) LeafNodeFit's Reserve
#: prefers (step 6).
LEAF_NODE_CHOICE = "LeafNodeFragmentation/leafNodeChoice"


class LeafNodeFragmentation:
    name = "LeafNodeFragmentation"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        w = arg(args, "fragmentationWeight", 50)
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 100:
            raise ValueError(f"{self.name} args.fragmentationWeight: expected an integer 0..100, got {w!r}")
        self.weight = w
        strategy = arg(args, "scoringStrategy", {})
        kind = strategy.get("type") or "LeastAllocated"
        if kind not in ("LeastAllocated", "MostAllocated"):
            raise ValueError(f"{self.name} args.scoringStrategy.type: {kind!r} is not LeastAllocated or MostAllocated")
        self.strategy = kind
        resources = _resource_specs(strategy.get("resources"), f"{self.name} scoringStrategy")
        self.resource_weights = dict(resources)
        fn = _least if kind == "LeastAllocated" else _most
        self.scorer = _AllocationScorer(resources, use_requested=False, fn=fn)
        limit = arg(args, "candidates", 16)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"{self.name} args.candidates: expected a positive integer, got {limit!r}")
        self.limit = limit
        choose = arg(args, "chooseLeafNode", True)
        if not isinstance(choose, bool):
            raise ValueError(f"{self.name} args.chooseLeafNode: must be true or false, got {choose!r}")
        self.choose = choose
        self.histogram = ShapeHistogram(int(arg(args, "shapes", SHAPES)), float(arg(args, "halfLife", HALF_LIFE)))
        #: The integer part of every delta, per (leaf node free vector, demand, shape).
        self.cache = DeltaCache()

    def _views(self) -> LeafViews | None:
        views = getattr(self.handle, "leaf_views", None)
        return views if isinstance(views, LeafViews) else None

    def workload(self, demand: Demand) -> Workload:
        """The workload this pod is scored against (module docstring, step 1)."""
        return Workload.of(self.histogram.distribution(demand.amounts), self.resource_weights)

    def deltas(self, pod: PodInfo, nodes: list[NodeInfo], views: LeafViews,
               choices: dict[str, str] | None = None) -> list[float | None]:
        """``delta_V`` per node (step 2); None where nothing is known or nothing fits.
        ``choices`` (when given) gets, per virtual node, the leaf node reaching ``delta_V``
        (step 6)."""
        demand = Demand.of(resource_vector(pod.requests))
        placement = Placement.of_root_pod(pod.pod)
        prepared = self.cache.prepare(self.workload(demand), demand.amounts)
        out: list[float | None] = []
        with views.lock:
            for n in nodes:
                name = str(n.node["metadata"]["name"])
                view = views.view(name) if is_leaf_node(n.node) else None
                best: float | None = None
                if view is not None:
                    cands = view.candidate_shapes(demand, placement, self.limit)
                    best, at = self.cache.best(prepared, cands, demand.amounts)
                    if choices is not None and at >= 0:
                        leaf = view.node_of(cands[at][0], placement)
                        if leaf is not None:
                            choices[name] = leaf
                out.append(best)
        return out

    def score_nodes(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> list[int]:
        views = self._views()
        if views is None:
            return [0] * len(nodes)
        choices: dict[str, str] | None = {} if self.choose else None
        frag = scores(self.deltas(pod, nodes, views, choices))
        if choices is not None:
            state.write(LEAF_NODE_CHOICE, choices)
        if self.weight == 100:
            return frag
        alloc = [self.scorer.score(pod, n) for n in nodes]
        w = self.weight
        return [(w * f + (100 - w) * a + 50) // 100 for f, a in zip(frag, alloc, strict=True)]

    def score(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> tuple[int, Status]:
        """One node alone (the framework prefers :meth:`score_nodes`): its delta is the only
        one, so its fragmentation part is 100 when it has room, 50 otherwise."""
        return self.score_nodes(state, pod, [node])[0], SUCCESS

    def reserve(self, state: CycleState, pod: PodInfo, node_name: str) -> Status:
        self.histogram.observe(Demand.of(resource_vector(pod.requests)).amounts)
        return SUCCESS

    def unreserve(self, state: CycleState, pod: PodInfo, node_name: str) -> None:
        """Nothing: the shape did arrive (the histogram decays; no undo)."""

    def events_to_register(self) -> Iterable[ClusterEvent]:
        return ()
