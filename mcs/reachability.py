"""The fabric's per cluster-pair reachability, as the multi-cluster services controller reads it.

The reflector publishes one record per ordered pair of member clusters (kind
:data:`fabric.control.reachability.KIND`, publisher :data:`~fabric.control.reachability.PUBLISHER`,
named ``<source>/<target>``). :class:`Reachability` watches them (:class:`~fabric.control.records.RecordWatch`
on an event loop of its own thread: mutual TLS with the ``mcs`` role's certificate) and keeps, per
importer I, the clusters X whose record I/X says ``reachable: false``: the controller's
``unreachable`` hook (:func:`mcs.derive.view` marks their endpoints not ready in I).

Flow: every change of the watch (the snapshot after END_OF_SNAPSHOT, then each delta) rebuilds
the map from the watch's cache (:meth:`Reachability.update`, pure but for the log); when the map
differs from the one before, ``on_change`` runs at once (the controller's ``kick``: a pass now,
not at the resync), so importers see a cut within one pass of the fabric's report.

What is not known is not a cut: a pair without a record, a record that does not decode (logged
once per record and version, counted) and the time while the reflector is away (the last map is
kept: losing the control channel says nothing about the data plane, as agents keep the last
good dataplane) all count as reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Protocol

from fabric.control import api, reachability, tls
from fabric.control.codec import DecodeError

_log = logging.getLogger(__name__)

Unreachable = Mapping[str, frozenset[str]]


class Watch(Protocol):
    """What :class:`Reachability` needs of a :class:`~fabric.control.records.RecordWatch` (tests feed their own)."""

    records: dict[api.RecordKey, api.Record]

    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def close(self) -> None: ...


def unreachable_map(records: Iterable[api.Record], bad: Callable[[api.Record, str], None] | None = None) -> dict[
        str, frozenset[str]]:
    """importer -> the clusters it cannot reach, from reachability records (those of another
    kind or publisher are ignored; one that does not decode is handed to ``bad`` and counts as
    reachable)."""
    out: dict[str, set[str]] = {}
    for r in records:
        if r.kind != reachability.KIND or r.publisher not in ("", reachability.PUBLISHER):
            continue
        try:
            state = reachability.decode(r.data, r.name)
        except DecodeError as e:
            if bad is not None:
                bad(r, str(e))
            continue
        if not state.reachable and state.source != state.target:
            out.setdefault(state.source, set()).add(state.target)
    return {k: frozenset(v) for k, v in sorted(out.items())}


class Reachability:
    """The reachability map of the fabric, kept current from the reflector (module docstring)."""

    def __init__(self, target: str, *, tls_dir: tls.TLSDir | None = None, on_change: Callable[[], None] | None = None,
                 watch: Callable[[], Watch] | None = None, on_bad_record: Callable[[], None] | None = None) -> None:
        self.target = target
        self.tls = tls_dir
        self.on_change = on_change
        self.on_bad_record = on_bad_record
        self._make_watch = watch or self._record_watch
        self.map: Unreachable = {}
        #: Changes of the map seen (each one kicked the controller).
        self.changes = 0
        self.synced = threading.Event()
        self._bad_logged: set[tuple[str, int]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: Watch | None = None
        self._thread: threading.Thread | None = None

    def _record_watch(self) -> Watch:
        from fabric.control.records import RecordWatch

        return RecordWatch(self.target, reachability.KIND, reachability.PUBLISHER, tls_dir=self.tls)

    def unreachable(self, importer: str) -> frozenset[str]:
        """The controller's hook: the clusters ``importer`` cannot reach now."""
        return self.map.get(importer, frozenset())

    def _bad(self, r: api.Record, why: str) -> None:
        if self.on_bad_record is not None:
            self.on_bad_record()
        if (r.name, r.version) not in self._bad_logged:
            self._bad_logged.add((r.name, r.version))
            _log.warning("%s (from %s): ignored, the pair counts as reachable", why, self.target)

    def update(self, records: Iterable[api.Record]) -> bool:
        """Rebuild the map from ``records``; True (and ``on_change`` called) when it changed."""
        new = unreachable_map(records, self._bad)
        if new == self.map:
            return False
        was, self.map = self.map, new
        self.changes += 1
        for importer in sorted(set(was) | set(new)):
            cut, healed = new.get(importer, frozenset()) - was.get(importer, frozenset()), \
                was.get(importer, frozenset()) - new.get(importer, frozenset())
            if cut:
                _log.info("fabric: cluster %s cannot reach %s: their endpoints turn not ready there", importer,
                          ", ".join(sorted(cut)))
            if healed:
                _log.info("fabric: cluster %s reaches %s again", importer, ", ".join(sorted(healed)))
        if self.on_change is not None:
            self.on_change()
        return True

    async def run(self) -> None:
        """Watch until :meth:`stop` (the watch reconnects by itself)."""
        self._watch = self._make_watch()
        async for _change in self._watch:
            self.synced.set()
            self.update(list(self._watch.records.values()))

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="mcs-reachability", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._loop is not None
        try:
            self._loop.run_until_complete(self.run())
        except Exception as e:  # RecordsRefused: the reflector refused the request itself
            _log.error("watching reachability records at %s ended: %s: %s; endpoints are no longer marked "
                       "not ready on the fabric's word", self.target, type(e).__name__, e)
        finally:
            self._loop.close()

    def stop(self) -> None:
        loop, watch = self._loop, self._watch
        if loop is not None and watch is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError, TimeoutError, asyncio.CancelledError):
                asyncio.run_coroutine_threadsafe(watch.close(), loop).result(5)
        if self._thread is not None:
            self._thread.join(5)
