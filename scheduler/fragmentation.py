"""Expected fragmentation of leaf nodes for the pod shapes seen recently (issue 19, item 3): the
measure behind the ``LeafNodeFragmentation`` score.

Why: packing (MostAllocated) and spreading (LeastAllocated) look at one node's utilisation and
not at what the next pods need, so both leave holes no later pod can use: a node with 3 free CPUs
and 1 GiB, when the pods arriving ask 2 CPUs and 4 GiB, holds 3 CPUs nobody will get. "Beware of
Fragmentation" (Weng et al., USENIX ATC'23) measures it: a node's fragmentation for a workload
is the free resource no task drawn from the workload's distribution can use there, and its
Fragmentation Gradient Descent places a task where that expected fragmentation grows the least
(or falls the most). The paper counts GPUs; this module generalises it to every resource a pod
requests (cpu, memory, extended resources, the pod slot as a constraint).

The measure (``free``: a leaf node's free vector; ``M``: the workload, shapes ``m`` with
probabilities ``p_m``; ``r`` over the scored resources):

- ``k(n, m) = min over r of floor(free_r / m_r)``: how many pods of shape ``m`` still fit
  (:func:`scheduler.leafview.per_node`, ``pods`` included, so a node out of pod slots fits none).
- ``F_n(m) = sum over r of c_r * (free_r - k(n, m) * m_r)``: what is left once the node is filled
  with ``m`` (all of its free when ``k = 0``: the paper's "the task cannot run there, so every
  free unit is a fragment"; when ``k > 0`` the remainder, which no further ``m`` can use).
- ``c_r = w_r / (sum of w over the scored resources) / mean_r`` with ``mean_r = sum_m p_m m_r``:
  the configured weight of the resource (``scoringStrategy.resources``, as NodeResourcesFit's;
  cpu and memory weight 1 by default; an extended resource some shape requests and the weights
  do not name gets weight 1), in units of the workload's mean request, so cpu millicores and
  memory bytes add up, and ``F`` reads as "average pods' worth of stranded resource". A resource
  no shape requests (``mean_r = 0``) is not scored.
- ``F_n(M) = sum over m of p_m * F_n(m)``, and placing pod shape ``d`` on ``n`` changes it by
  ``delta(n, d) = F_{n - d}(M) - F_n(M)`` (the gradient of the paper): lower is better.
- Computed as ``F_n(M) = sum_r c_r free_r - sum_m p_m k(n, m) sum_r c_r m_r``, so
  ``delta(n, d) = -sum_r c_r d_r + sum_m p_m (k(n, m) - k(n - d, m)) sum_r c_r m_r``: the pod's
  own use lowers ``F`` by the same amount on every node; what differs is how many copies of each
  recent shape the pod displaces there, weighted by the shape's popularity and size.

For a workload of one shape placing that same shape never changes ``F`` (the remainder is the
same with one copy fewer): every placement fits equally many later pods, and only the blended
allocation score decides. A placement that leaves a node exactly full for the common shape
never has a higher ``delta`` than one leaving a useless remainder (the unit tests show both).

Cost (:class:`DeltaCache`): ``lost(n, d, m) = k(n, m) - k(n - d, m)`` is an integer that
depends on the node's free vector, the demand and the shape only, not on the weights ``p_m``
(which change with every pod); it is kept per (free vector, demand) over a universe of shapes,
and a delta becomes ``own + fsum(lost * taken)`` in C. The second sum is :func:`math.fsum` in
:meth:`Workload.delta` as well (exactly rounded: order and zero terms do not change it), so the
cached and the uncached answers are bit-identical.

The workload (:class:`ShapeHistogram`): the demands of the pods this scheduler placed recently,
as a bounded histogram (at most ``bound`` shapes; when full, the lightest goes) whose weights
decay exponentially with each observation (half-life ``half_life`` observations), so a shape
that stopped arriving fades out. The pod being scored is counted as one fresh observation (the
first pod of a new shape already sees itself as the workload).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scheduler.leafview import Vector, per_node

#: How many distinct shapes the histogram keeps (scoring is linear in it).
SHAPES = 16
#: Observations after which an observation weighs half.
HALF_LIFE = 256.0
#: Resource weights when none are configured (NodeResourcesFit's defaults).
DEFAULT_WEIGHTS: Mapping[str, int] = {"cpu": 1, "memory": 1}


class ShapeHistogram:
    """The recent pod shapes (module docstring): bounded, exponentially decaying."""

    def __init__(self, bound: int = SHAPES, half_life: float = HALF_LIFE) -> None:
        if bound < 1:
            raise ValueError(f"shape histogram bound must be at least 1, got {bound}")
        if not half_life > 0:
            raise ValueError(f"shape histogram half-life must be positive, got {half_life}")
        self.bound = bound
        self._step = 2.0 ** (1.0 / half_life)
        #: The weight of an observation made now; grows instead of every weight decaying.
        self._gain = 1.0
        self._w: dict[Vector, float] = {}
        self.observed = 0

    def __len__(self) -> int:
        return len(self._w)

    def observe(self, shape: Vector) -> None:
        """One pod of ``shape`` placed: O(1), plus O(bound) when a shape must go."""
        self._gain *= self._step
        self._w[shape] = self._w.get(shape, 0.0) + self._gain
        self.observed += 1
        if self._gain > 1e100:  # keep the floats finite: rescale (ratios unchanged)
            self._w = {k: v / self._gain for k, v in self._w.items()}
            self._gain = 1.0
        if len(self._w) > self.bound:
            victim = min((k for k in self._w if k != shape), key=lambda k: (self._w[k], k))
            del self._w[victim]

    def distribution(self, extra: Vector | None = None) -> list[tuple[Vector, float]]:
        """(shape, probability), sorted by shape; ``extra`` counted as one observation made now."""
        w = dict(self._w)
        if extra is not None:
            w[extra] = w.get(extra, 0.0) + self._gain * self._step
        total = sum(w.values())
        return sorted((k, v / total) for k, v in w.items()) if total > 0 else []


@dataclass(frozen=True)
class Workload:
    """A distribution of shapes and the per-resource coefficients ``c_r`` (module docstring)."""

    shapes: tuple[tuple[Vector, float], ...]
    coef: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, dist: Iterable[tuple[Vector, float]], weights: Mapping[str, int] | None = None) -> Workload:
        dist = tuple(dist)
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        mean: dict[str, float] = {}
        for shape, p in dist:
            for r, q in shape:
                if r != "pods":
                    mean[r] = mean.get(r, 0.0) + p * q
        for r in mean:
            if r not in weights and r not in ("cpu", "memory", "ephemeral-storage"):
                weights[r] = 1  # an extended resource some shape asks for
        scored = {r: w for r, w in weights.items() if w > 0 and mean.get(r, 0.0) > 0}
        wsum = sum(scored.values())
        coef = tuple(sorted((r, w / wsum / mean[r]) for r, w in scored.items())) if wsum else ()
        return cls(dist, coef)

    @property
    def coef_map(self) -> dict[str, float]:
        """:attr:`coef` as a dict (made once)."""
        m = self.__dict__.get("_coef_map")
        if m is None:
            m = dict(self.coef)
            object.__setattr__(self, "_coef_map", m)
        return m

    @property
    def packed(self) -> tuple[tuple[Vector, float], ...]:
        """(shape, ``p_m * sum_r c_r m_r``) per shape, in :attr:`shapes` order (made once)."""
        return self._packed

    @property
    def _packed(self) -> tuple[tuple[Vector, float], ...]:
        """(shape, p_m * sum over r of c_r * m_r) per shape: what a copy of ``m`` takes off ``F``."""
        packed = self.__dict__.get("_packed_cache")
        if packed is None:
            coef = dict(self.coef)
            packed = tuple((shape, p * sum(coef.get(r, 0.0) * q for r, q in shape)) for shape, p in self.shapes)
            object.__setattr__(self, "_packed_cache", packed)
        return packed

    def node(self, free: Mapping[str, int]) -> float:
        """``F_n(M)`` of a node with ``free``: ``sum_r c_r free_r - sum_m p_m k(n, m) sum_r c_r m_r``
        (the remainder after ``k`` copies is ``free - k m``; ``k = 0`` leaves all of it)."""
        g = free.get
        total = 0.0
        for r, c in self.coef:
            total += c * g(r, 0)
        for shape, taken in self._packed:
            k = per_node(free, shape)
            if k:
                total -= k * taken
        return total

    def own(self, demand: Vector) -> float:
        """``-sum_r c_r d_r``: what the pod's own use takes off ``F`` (the same on every node)."""
        out = 0.0
        coef = self.coef_map
        for r, q in demand:
            out -= coef.get(r, 0.0) * q
        return out

    def delta(self, free: Mapping[str, int], demand: Vector) -> float | None:
        """``F_{n-d}(M) - F_n(M)`` of placing ``demand`` on a node with ``free``; None when it
        does not fit. By the identity of :meth:`node`: ``-sum_r c_r d_r + sum_m p_m (k_before -
        k_after) sum_r c_r m_r``: the pod's own use lowers ``F``, every copy of a shape it
        displaces raises it. The second sum is :func:`math.fsum` (exactly rounded, so neither
        the order of the shapes nor zero terms change it: :class:`DeltaCache` relies on that)."""
        after = remaining(free, demand)
        if after is None:
            return None
        terms = []
        for shape, taken in self.packed:
            lost = per_node(free, shape) - per_node(after, shape)
            if lost:
                terms.append(lost * taken)
        return self.own(demand) + math.fsum(terms)


def remaining(free: Mapping[str, int], demand: Vector) -> dict[str, int] | None:
    """What ``free`` keeps after ``demand`` is taken from it; None when some resource falls short."""
    after = dict(free)
    for r, q in demand:
        left = after.get(r, 0) - q
        if left < 0:
            return None
        after[r] = left
    return after


#: A (free, demand) pair that does not fit, in :class:`DeltaCache`.
_NO_FIT: list[int] = []


class DeltaCache:
    """:meth:`Workload.delta` with the integer part cached: the same floats, far fewer divisions.

    Why: ``delta(n, d) = -sum_r c_r d_r + sum_m lost(n, d, m) * p_m sum_r c_r m_r`` where
    ``lost(n, d, m) = k(n, m) - k(n - d, m)`` (copies of ``m`` the pod displaces) is an integer
    that depends only on the node's free vector, the demand and the shape, not on the workload's
    weights, which change with every pod (the histogram decays). The fragmentation score asks
    every view's tightest nodes for every pod, and between two pods only the nodes of the leaf
    the previous pod went to change: nearly every (free, demand) was asked before.

    So the cache keeps a *universe* of the shapes workloads have named (an index per shape,
    append-only, at most ``universe`` shapes: beyond that it starts again from the current
    workload's shapes and drops every entry), and per (free vector, demand) the list of
    ``lost`` per universe shape (extended when the universe grows). A workload becomes one list
    of ``p_m sum_r c_r m_r`` per universe shape (0 for the shapes it does not hold), and a delta
    is ``own + fsum(lost * taken)`` over the universe, in C (``map``). As :meth:`Workload.delta`
    sums the same nonzero products with :func:`math.fsum` (exactly rounded: order and zero terms
    do not matter), the result is bit-identical (``tests/unit/test_frag.py`` checks it on random
    fleets against the uncached computation).

    Bounded: cleared when it holds ``bound`` (free, demand) pairs (free vectors of nodes that
    changed are never asked again: a clear drops them)."""

    def __init__(self, bound: int = 20_000, universe: int = 64) -> None:
        self.bound = bound
        self.universe_bound = universe
        #: shape -> its index in every cached list
        self._index: dict[Vector, int] = {}
        self._shapes: list[Vector] = []
        #: (free, demand) -> [lost per universe shape] (:data:`_NO_FIT` when demand does not fit)
        self._lost: dict[tuple[Vector, Vector], list[int]] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._lost)

    def _weights(self, wl: Workload) -> list[float]:
        """``p_m sum_r c_r m_r`` per universe shape (the universe extended with ``wl``'s)."""
        packed = wl.packed
        if any(shape not in self._index for shape, _ in packed):
            if len(self._index) + len(packed) > self.universe_bound:  # start again
                self._index.clear()
                self._shapes.clear()
                self._lost.clear()
            for shape, _ in packed:
                if shape not in self._index:
                    self._index[shape] = len(self._shapes)
                    self._shapes.append(shape)
        out = [0.0] * len(self._shapes)
        for shape, taken in packed:
            out[self._index[shape]] = taken
        return out

    def delta(self, wl: Workload, free_key: Vector, free: Mapping[str, int], demand: Vector) -> float | None:
        """``wl.delta(free, demand)``; ``free_key`` is ``free`` as a :data:`Vector` (the cache key)."""
        return self.best(wl, ((free_key, free),), demand)[0]

    def prepare(self, wl: Workload, demand: Vector) -> tuple[list[float], float]:
        """What :meth:`best` needs of a workload and demand, made once per pod: (the weights per
        universe shape, ``own``)."""
        return self._weights(wl), wl.own(demand)

    def best(self, wl: Workload | tuple[list[float], float], candidates: Iterable[tuple[Vector, Mapping[str, int]]],
             demand: Vector) -> tuple[float | None, int]:
        """(the lowest ``wl.delta(free, demand)`` over ``candidates`` ((free as a Vector, free)
        pairs), the index of the first candidate reaching it); (None, -1) when none fits. ``wl``
        may be :meth:`prepare`'s answer for this demand (the universe must not have been reset
        since: only a :meth:`prepare` or a Workload given here resets it)."""
        weights, own = self.prepare(wl, demand) if isinstance(wl, Workload) else wl
        size = len(weights)
        cache = self._lost
        fsum = math.fsum
        mul = operator.mul
        best: float | None = None
        at = -1
        for i, (free_key, free) in enumerate(candidates):
            key = (free_key, demand)
            lost = cache.get(key)
            if lost is None or (len(lost) < size and lost is not _NO_FIT):
                self.misses += 1
                lost = self._fill(lost, free, demand)
                if len(cache) >= self.bound:
                    cache.clear()
                cache[key] = lost
            else:
                self.hits += 1
            if lost is _NO_FIT:
                continue
            out = own + fsum(map(mul, lost, weights))
            if best is None or out < best:
                best, at = out, i
        return best, at

    def _fill(self, lost: list[int] | None, free: Mapping[str, int], demand: Vector) -> list[int]:
        """The entry of (``free``, ``demand``), new or extended to the whole universe."""
        after = remaining(free, demand)
        if after is None:
            return _NO_FIT
        lost = [] if lost is None else lost
        for shape in self._shapes[len(lost):]:
            lost.append(per_node(free, shape) - per_node(after, shape))
        return lost


def scores(deltas: list[float | None], neutral: int = 50) -> list[int]:
    """Deltas to 0..100 scores: the lowest delta 100, the highest 0, linear between (all equal:
    100); None (nothing known or no fit) gets ``neutral``."""
    known = [d for d in deltas if d is not None]
    if not known:
        return [neutral] * len(deltas)
    lo, hi = min(known), max(known)
    span = hi - lo
    out = []
    for d in deltas:
        if d is None:
            out.append(neutral)
        elif span <= 1e-12 * max(1.0, abs(lo), abs(hi)):
            out.append(100)
        else:
            out.append(math.floor(100 * (hi - d) / span + 0.5))
    return out
