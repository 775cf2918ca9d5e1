"""The scheduler's link to the reflector: record watches, in one daemon thread with its own event
loop, each feeding one consumer. Two feeds today: the tree manager's
``tree.kosmos.io/leaf-resources`` records into a :class:`scheduler.leafviews.LeafViews` (the
``LeafNodeFit`` plugin), and the reflector's ``fabric.kosmos.io/reachability`` records (publisher
``fabric/reflector`` only) into a :class:`scheduler.netaffinity_records.Reachability` (the
``NetworkAffinity`` plugin).

Flow: :meth:`RecordFeeds.start` starts the thread; it makes one
``fabric.control.records.RecordWatch`` per :class:`Feed` (each reconnects and resyncs by itself; a
resync drops what its records no longer hold) and runs every feed's consumer on its watch
concurrently. A consumer that ends (or raises) is logged and leaves the other feeds running. The
scheduler's threads read what the consumers keep under their own locks (or, for the pair table,
an immutable snapshot). :meth:`RecordFeeds.stop` closes the watches and joins the thread.
``kosmos-scheduler --reflector`` runs both feeds on one thread (:func:`leaf_feed`,
:func:`reachability_feed`); :class:`LeafWatch` is the one-feed form for leaf views. Without a
reflector nothing runs: every virtual node keeps the old behaviour (its sum decides) and every
cluster pair is reachable at an unknown RTT.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.leafview import RECORD_KIND
from scheduler.leafviews import LeafViews

_log = logging.getLogger(__name__)


def watch_kind(target: str, kind: str, publisher: str = "", tls_dir: Any = None) -> Any:
    """A ``RecordWatch`` of ``kind`` (of ``publisher`` only, when given) on ``target`` (gRPC is
    imported only here)."""
    from fabric.control.records import RecordWatch

    return RecordWatch(target, kind, publisher, tls_dir=tls_dir)


def record_watch(target: str, tls_dir: Any = None) -> Any:
    """A ``RecordWatch`` of the leaf-resources kind on ``target``."""
    return watch_kind(target, RECORD_KIND, "", tls_dir)


@dataclass(frozen=True)
class Feed:
    """One watch and its consumer. ``make(target, kind, publisher, tls_dir)`` makes the watch
    (tests give a fake); ``consume`` runs until the watch ends."""

    kind: str
    publisher: str
    consume: Callable[[AsyncIterable[Any]], Awaitable[None]]
    make: Callable[[str, str, str, Any], Any] = watch_kind


def leaf_feed(views: LeafViews) -> Feed:
    return Feed(RECORD_KIND, "", views.run)


def reachability_feed(table: Any) -> Feed:
    """The reflector's reachability records (its publisher only) into ``table`` (a
    :class:`scheduler.netaffinity_records.Reachability`)."""
    from fabric.control.reachability import KIND, PUBLISHER

    return Feed(KIND, PUBLISHER, table.run)


class RecordFeeds:
    """See the module docstring."""

    def __init__(self, target: str, tls_dir: Any, feeds: Sequence[Feed], name: str = "record-feeds") -> None:
        self.target = target
        self.tls_dir = tls_dir
        self.feeds = tuple(feeds)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: list[Any] = []
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait(5.0)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception:
            _log.exception("record feeds on %s ended", self.target)
        finally:
            self._started.set()

    async def _consume(self, feed: Feed, watch: Any) -> None:
        try:
            await feed.consume(watch)
        except Exception:
            _log.exception("the watch of %s records on %s ended", feed.kind, self.target)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._watches = [f.make(self.target, f.kind, f.publisher, self.tls_dir) for f in self.feeds]
        self._started.set()
        for f in self.feeds:
            _log.info("watching %s records%s on %s", f.kind, f" of {f.publisher}" if f.publisher else "", self.target)
        await asyncio.gather(*(self._consume(f, w) for f, w in zip(self.feeds, self._watches, strict=True)))

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for watch in self._watches:
                try:
                    asyncio.run_coroutine_threadsafe(watch.close(), loop).result(timeout)
                except Exception as e:  # the loop ended in between: nothing left to close
                    _log.debug("closing the watch: %s", e)
        self._thread.join(timeout)


class LeafWatch(RecordFeeds):
    """The leaf-views feed alone. ``watch(target, tls_dir)``: makes the watch (tests give a fake)."""

    def __init__(self, views: LeafViews, target: str, tls_dir: Any = None,
                 watch: Callable[[str, Any], Any] = record_watch) -> None:
        super().__init__(target, tls_dir, [Feed(RECORD_KIND, "", views.run, lambda t, _k, _p, d: watch(t, d))],
                         name="leaf-views")
        self.views = views
