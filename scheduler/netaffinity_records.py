"""The fabric's per cluster-pair reachability as the scheduler holds it: fed by a record watch of
the reflector's ``fabric.kosmos.io/reachability`` records (publisher ``fabric/reflector``), read by
the ``NetworkAffinity`` plugin.

Flow:

1. :meth:`Reachability.run` consumes a ``RecordWatch(target, KIND, PUBLISHER)`` (or anything
   yielding the same changes; :mod:`scheduler.leafwatch` runs it in its thread); every change
   goes to :meth:`Reachability.apply`.
2. :meth:`Reachability.apply`: a resync (first snapshot, or one after a reconnect) replaces the
   whole table; an upsert decodes the record (:func:`fabric.control.reachability.decode`) and
   replaces its pair; a removal drops the pair. A record that cannot be read is logged with its
   key and skipped, and its pair keeps its previous state; a record of another kind or publisher
   is ignored (a plaintext reflector lets anyone write the kind under another identity).
3. The table is an immutable dict replaced on every change (:meth:`Reachability.pairs`): the
   plugin takes it once per scheduling cycle without a lock, so one pod's Filter and Score see
   one consistent table. ``on_change`` (set by ``kosmos-scheduler``) is called after a change
   that moved some pair, so pods the plugin left unschedulable are tried again.

No record for a pair is no answer (see :mod:`scheduler.netaffinity`): an empty table (no
reflector, nothing published yet) leaves every pair reachable at an unknown RTT.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Callable, Mapping
from types import MappingProxyType
from typing import Any

from fabric.control.codec import DecodeError
from fabric.control.reachability import KIND, PUBLISHER, PairState, decode

_log = logging.getLogger(__name__)

Pair = tuple[str, str]


class Reachability:
    """See the module docstring."""

    def __init__(self, on_change: Callable[[], object] | None = None) -> None:
        self._pairs: Mapping[Pair, PairState] = MappingProxyType({})
        #: record key -> its pair
        self._keys: dict[Any, Pair] = {}
        self.on_change = on_change
        #: A complete snapshot has been applied.
        self.synced = False
        #: Records refused (unreadable), by key: the reason.
        self.refused: dict[Any, str] = {}

    def pairs(self) -> Mapping[Pair, PairState]:
        """The current table (immutable; a change replaces it)."""
        return self._pairs

    def apply(self, change: Any) -> None:
        """One change of the watch (a ``fabric.control.records.RecordsChange``)."""
        table = dict(self._pairs)
        keys = dict(self._keys)
        if change.resynced:
            keep = {r.key for r in change.upserts}
            for key in [k for k in keys if k not in keep]:
                table.pop(keys.pop(key), None)
            self.synced = True
        for key in change.removals:
            pair = keys.pop(key, None)
            self.refused.pop(key, None)
            if pair is not None:
                table.pop(pair, None)
        for rec in change.upserts:
            if rec.kind != KIND or rec.publisher != PUBLISHER:
                continue
            try:
                st = decode(rec.data, rec.name)
            except DecodeError as e:
                self.refused[rec.key] = str(e)
                _log.warning("reachability record %s: %s; the pair keeps its previous state", rec.key, e)
                continue
            self.refused.pop(rec.key, None)
            keys[rec.key] = (st.source, st.target)
            table[(st.source, st.target)] = st
        moved = table != self._pairs
        self._keys = keys
        self._pairs = MappingProxyType(table)
        if moved:
            _log.debug("reachability: %d pair(s), %d unreachable", len(table),
                       sum(not st.reachable for st in table.values()))
        if moved and self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                _log.exception("reachability: the change callback failed")

    async def run(self, changes: AsyncIterable[Any]) -> None:
        """Apply every change of ``changes`` until it ends; an exception from one change is
        logged, never the end of the feed."""
        async for change in changes:
            try:
                self.apply(change)
            except Exception:
                _log.exception("reachability: a change of the %s watch could not be applied", KIND)
