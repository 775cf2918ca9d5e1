"""Every virtual node's :class:`~scheduler.leafview.LeafView`, fed by the tree manager's records on
the reflector (issue 19): what the ``LeafNodeFit`` plugin asks.

Flow:

1. :meth:`LeafViews.run` consumes a record watch of kind :data:`scheduler.leafview.RECORD_KIND`
   (``fabric.control.records.RecordWatch``, or anything yielding the same changes): every
   change goes to :meth:`LeafViews.apply`.
2. :meth:`LeafViews.apply`: a resync (the first snapshot, or one after a reconnect) replaces
   the set of views (records gone from it drop their view); an upsert of a known virtual node
   is a delta on its view (:meth:`LeafView.apply_record`: only the leaf nodes that changed move,
   reservations stay); a removal drops the view. A record that cannot be read is logged with
   its key and skipped, and its virtual node keeps its previous view: one bad record never
   stops the others.
3. The scheduler's threads ask :meth:`LeafViews.view` and use the view under :attr:`lock`
   (Filter in the scheduling loop, Reserve/Unreserve there and in the bind workers, the watch in
   its own event loop): one lock for all views, held for microseconds per question.

A virtual node with no record (none published yet, or the reflector is not configured) has no
view, and the plugin keeps the old behaviour for it (the virtual node's sum decides).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterable, Iterable
from typing import Any, Protocol

from scheduler.leafview import RECORD_KIND, LeafView, RecordError

_log = logging.getLogger(__name__)


class _Record(Protocol):
    kind: str
    name: str
    data: bytes

    @property
    def key(self) -> Any: ...


class _Change(Protocol):
    upserts: tuple[Any, ...]
    removals: tuple[Any, ...]
    resynced: bool


class LeafViews:
    """The views by virtual node name (see the module docstring). ``ttl``: seconds a reservation
    lives unconfirmed (:meth:`LeafView.expire`)."""

    def __init__(self, ttl: float = 30.0) -> None:
        self.ttl = ttl
        self.lock = threading.RLock()
        self._views: dict[str, LeafView] = {}
        #: record key -> the virtual node it describes
        self._keys: dict[Any, str] = {}
        #: A complete snapshot has been applied.
        self.synced = False
        #: Records refused (unreadable), by key: the reason.
        self.refused: dict[Any, str] = {}

    def view(self, node: str) -> LeafView | None:
        """The view of virtual node ``node``, None when no record describes it."""
        return self._views.get(node)

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self._views)

    def apply(self, change: _Change) -> None:
        """One change of the watch (see the module docstring, step 2)."""
        with self.lock:
            if change.resynced:
                keep = {r.key for r in change.upserts if r.kind == RECORD_KIND}
                for key in [k for k in self._keys if k not in keep]:
                    self._drop(key)
                self.synced = True
            for key in change.removals:
                self._drop(key)
            for rec in change.upserts:
                if rec.kind == RECORD_KIND:
                    self._upsert(rec)

    def _upsert(self, rec: _Record) -> None:
        name = rec.name
        view = self._views.get(name)
        fresh = view is None
        if view is None:
            view = self._views[name] = LeafView(name)
        try:
            changed = view.apply_record(rec.data)
        except RecordError as e:
            self.refused[rec.key] = str(e)
            _log.warning("leaf-resources record %s: %s; the virtual node keeps its previous view", rec.key, e)
            if fresh:  # nothing good was ever read: no view, the old behaviour
                del self._views[name]
            return
        self.refused.pop(rec.key, None)
        self._keys[rec.key] = name
        _log.debug("leaf view %s: %d leaf node(s) changed", name, changed)

    def _drop(self, key: Any) -> None:
        name = self._keys.pop(key, None)
        self.refused.pop(key, None)
        if name is not None and name not in self._keys.values():
            self._views.pop(name, None)

    def expire(self, now: float | None = None) -> list[str]:
        """Release every view's reservations past their deadline; ``view/key`` of each."""
        out: list[str] = []
        with self.lock:
            for name, v in self._views.items():
                out += [f"{name}/{k}" for k in v.expire(now)]
        return out

    async def run(self, changes: AsyncIterable[_Change]) -> None:
        """Apply every change of ``changes`` (a ``RecordWatch`` of :data:`RECORD_KIND`) until it
        ends; an exception from one change is logged, never the end of the feed."""
        async for change in changes:
            try:
                self.apply(change)
            except Exception:
                _log.exception("leaf views: a change of the leaf-resources watch could not be applied")

    def all_views(self) -> Iterable[tuple[str, LeafView]]:
        with self.lock:
            return list(self._views.items())
