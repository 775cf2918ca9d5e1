"""What the in-tree plugins share besides the matching rules (those are :mod:`scheduler.selectors`):
:func:`arg` (pluginConfig args with upstream defaults) and :class:`NodeCountCache` (per-node
counts of matching pods, or scores, reused across the replicas of a workload while nodes do not
change).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from scheduler.framework import Obj


def arg(args: Mapping[str, Any], name: str, default: Any) -> Any:
    """A pluginConfig arg with upstream's default when absent or null."""
    v = args.get(name) if args else None
    return default if v is None else v


class NodeCountCache:
    """Pods on a node that satisfy a predicate, remembered per (predicate key, node) until the
    node's ``generation`` moves (``scheduler.podutil`` draws generations from one global counter,
    as upstream's ``nextGeneration``, so a stale entry can never match).

    Why: PodTopologySpread and InterPodAffinity count matching pods over every node for every
    pod; the replicas of one workload carry the same selector, so a burst of them re-counts only
    the nodes that changed since the previous replica. At most ``max_keys`` predicates are kept
    (the oldest goes first): each costs an entry per node, so at 5,000 nodes 16 keys stay in the
    order of 10 MB."""

    def __init__(self, max_keys: int = 16) -> None:
        self.max_keys = max_keys
        self._counts: dict[Hashable, dict[str, tuple[int, int]]] = {}

    def table(self, key: Hashable) -> Mapping[str, tuple[int, int]]:
        """node name -> (generation, count) for ``key``, for callers that look up inline in a
        hot loop (a hit is valid only when the generation equals the node's)."""
        return self._counts.get(key) or {}

    def writable(self, key: Hashable) -> dict[str, tuple[int, int]]:
        """The table of ``key`` for a caller that fills it inline, created (evicting the oldest
        key past ``max_keys``) when missing. Any per-node int that is a function of the node's
        state and ``key`` alone fits, not only counts: the allocation scorers keep scores here."""
        per = self._counts.get(key)
        if per is None:
            if len(self._counts) >= self.max_keys:
                with contextlib.suppress(RuntimeError, StopIteration):  # another thread was quicker
                    self._counts.pop(next(iter(self._counts)), None)
            per = self._counts[key] = {}
        return per

    def count(self, ni: Any, key: str | None, pred: Callable[[Obj], bool]) -> int:
        """How many pods of ``ni`` whose ``metadata`` satisfies ``pred``."""
        if key is None:
            return self._count(ni, pred)
        per = self.writable(key)
        hit = per.get(ni.name)
        if hit is not None and hit[0] == ni.generation:
            return hit[1]
        n = self._count(ni, pred)
        per[ni.name] = (ni.generation, n)
        return n

    @staticmethod
    def _count(ni: Any, pred: Callable[[Obj], bool]) -> int:
        return sum(1 for p in ni.pods if pred(p.pod["metadata"]))


class DomainCounts:
    """Per topology value (domain): the nodes that have it and the matching pods on them, over
    every node of the snapshot, kept current from the snapshot's change log.

    ``contribute(node)`` gives a node's (value, pods), or None when the node is not counted; it
    must mean the same at every call on one instance (callers key instances by what they count:
    selector, topology key), and depend only on the NodeInfo (whose ``generation`` moves on any
    change, which puts it in the log). Why: PodTopologySpread and InterPodAffinity need these
    sums over every node for every pod; between two replicas only a few nodes change."""

    def __init__(self) -> None:
        self._per_node: dict[str, tuple[str, int]] = {}
        #: value -> [nodes, pods]
        self.totals: dict[str, list[int]] = {}
        self._cursor: tuple[int, int] | None = None

    def update(self, snap: Any, contribute: Callable[[Any], tuple[str, int] | None]) -> bool:
        """Bring the totals up to ``snap``; False (nothing done) when it keeps no change log."""
        since = getattr(snap, "changes_since", None)
        if since is None:
            return False
        changed, self._cursor = since(self._cursor)
        if changed is None:
            self._per_node.clear()
            self.totals.clear()
            for ni in snap.node_infos():
                self._set(ni.name, contribute(ni))
        else:
            for name in changed:
                ni = snap.get(name)
                self._set(name, None if ni is None else contribute(ni))
        return True

    def _set(self, name: str, c: tuple[str, int] | None) -> None:
        old = self._per_node.get(name)
        if old == c:
            return
        if old is not None:
            t = self.totals[old[0]]
            t[0] -= 1
            t[1] -= old[1]
            if t[0] == 0:
                del self.totals[old[0]]
        if c is None:
            self._per_node.pop(name, None)
            return
        t = self.totals.setdefault(c[0], [0, 0])
        t[0] += 1
        t[1] += c[1]
        self._per_node[name] = c


class DomainCountsCache:
    """:class:`DomainCounts` by key, at most ``max_keys`` (the oldest goes first)."""

    def __init__(self, max_keys: int = 16) -> None:
        self.max_keys = max_keys
        self._by_key: dict[Hashable, DomainCounts] = {}

    def get(self, key: Hashable) -> DomainCounts:
        dc = self._by_key.get(key)
        if dc is None:
            if len(self._by_key) >= self.max_keys:
                self._by_key.pop(next(iter(self._by_key)))
            dc = self._by_key[key] = DomainCounts()
        return dc
