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
