"""The scheduler's link to the reflector for leaf views: a record watch of the tree manager's
``tree.kosmos.io/leaf-resources`` records feeding a :class:`scheduler.leafviews.LeafViews`.

Flow: :meth:`LeafWatch.start` runs, in one daemon thread with its own event loop, a
``fabric.control.records.RecordWatch`` of :data:`scheduler.leafview.RECORD_KIND` (it reconnects
and resyncs by itself; a resync drops the views whose records are gone) and hands every change to
:meth:`LeafViews.run`. The scheduler's threads read the views under their lock; ``kosmos-scheduler
--reflector`` sets them as ``handle.leaf_views`` for the ``LeafNodeFit`` plugin. :meth:`stop`
closes the watch and joins the thread. Without a reflector nothing runs and no view exists: every
virtual node keeps the old behaviour (its sum decides).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from scheduler.leafview import RECORD_KIND
from scheduler.leafviews import LeafViews

_log = logging.getLogger(__name__)


def record_watch(target: str, tls_dir: Any = None) -> Any:
    """A ``RecordWatch`` of the leaf-resources kind on ``target`` (gRPC is imported only here)."""
    from fabric.control.records import RecordWatch

    return RecordWatch(target, RECORD_KIND, tls_dir=tls_dir)


class LeafWatch:
    """See the module docstring. ``watch``: makes the watch (tests give a fake)."""

    def __init__(self, views: LeafViews, target: str, tls_dir: Any = None,
                 watch: Callable[[str, Any], Any] = record_watch) -> None:
        self.views = views
        self.target = target
        self.tls_dir = tls_dir
        self._make = watch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: Any = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="leaf-views", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait(5.0)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception:
            _log.exception("leaf views: the watch of %s on %s ended", RECORD_KIND, self.target)
        finally:
            self._started.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._watch = self._make(self.target, self.tls_dir)
        self._started.set()
        _log.info("leaf views: watching %s records on %s", RECORD_KIND, self.target)
        await self.views.run(self._watch)

    def stop(self, timeout: float = 5.0) -> None:
        loop, watch = self._loop, self._watch
        if loop is not None and watch is not None and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(watch.close(), loop).result(timeout)
            except Exception as e:  # the loop ended in between: nothing left to close
                _log.debug("leaf views: closing the watch: %s", e)
        self._thread.join(timeout)
