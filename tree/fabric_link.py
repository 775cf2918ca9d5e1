"""The tree manager on the fabric's control channel: its add-on records out, reachability in.

The tree manager is threaded (informers, one reconciler per leaf); the control channel's
client helpers are asyncio. A :class:`FabricLink` owns one thread running one event loop for
both directions, started when this replica starts leading (a standby publishes nothing and
asks nothing) and stopped with it. In order:

1. **Records out.** Each leaf's reconciler hands over, after every pass over a synced leaf,
   the complete set of its virtual nodes' records (:meth:`FabricLink.publish`: name -> the
   bytes of :func:`tree.forge.leaf_resources`); the link puts the ones that changed and
   deletes the ones of that Cluster no longer handed over, on one
   :class:`~fabric.control.records.RecordPublisher` (identity :func:`identity`, kind
   :data:`tree.forge.RECORD_KIND`). The publisher counts a record's version up only when its
   bytes change, re-puts everything after a reconnect and ends its snapshot, so the reflector
   drops what this identity published before and no longer wants (a restarted manager's, or
   a node deleted while the reflector was away). A Cluster whose tree is gone is
   :meth:`FabricLink.forget`-ten. The first session opens only once every Cluster the
   manager's first pass found (:meth:`FabricLink.expect`) has handed its records over, or
   after ``startup_wait`` (a leaf unreachable at start): ending a snapshot sooner would delete
   the records a predecessor left, and subscribers would see them go and come back.
2. **Reachability in** (only with the root's fabric cluster name): a
   :class:`~fabric.control.client.TopologyWatcher` (reconnected after a backoff) wakes a
   ``GetStatus`` on every change of the topology, and a poll every ``poll_period`` catches
   what the topology stream does not carry (the agents' probe reports).
   :meth:`FabricLink.network` answers a leaf's ``NetworkUnavailable`` from the last status
   (:func:`tree.forge.network_condition`); when that answer changes for a Cluster a reconciler
   asked about, ``on_change`` runs (the manager kicks the reconcilers). Before the first
   answer it is :data:`tree.forge.NETWORK_UNKNOWN` (the Nodes keep what they say); while the
   reflector is away the last answer stands: the fabric's data plane runs on without its
   reflector, so what it last said is the best guess, and nothing flaps. A status taken while a
   freshly started reflector still holds its snapshot back (``holding``: not every node has
   announced itself again) is not an answer either.

Calls from other threads (:meth:`publish`, :meth:`forget`) only queue work on the loop; the
status is one immutable object replaced whole, read without a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping

from fabric.backoff import Backoff
from fabric.control import api, tls
from fabric.control.client import ReflectorUnavailable, TopologyWatcher, get_status
from fabric.control.codec import DecodeError
from fabric.control.records import RecordPublisher, RecordsRefused
from tree import forge

_log = logging.getLogger(__name__)

#: Who hands records over: a Cluster's (name, UID), as a reconciler's key.
Owner = tuple[str, str]

#: Publisher identities: a lowercase word, as the reflector accepts them (record_store._WORD).
IDENTITY_PREFIX = "tree/"


def identity(root_id: str) -> str:
    """The publisher identity of a root cluster's tree manager: ``tree/<root id>``. Every
    replica of one root has the same one, so a new leader takes over its predecessor's records
    (no flap for subscribers); two roots sharing a reflector never touch each other's."""
    return f"{IDENTITY_PREFIX}{root_id}"


class FabricLink:
    """Records out, reachability in, on one event loop thread (see the module's steps)."""

    def __init__(self, target: str, root_id: str, fabric_cluster: str | None, *, poll_period: float = 10.0,
                 status_timeout: float = 5.0, backoff: tuple[float, float] = (0.2, 5.0),
                 startup_wait: float = 30.0, tls_dir: tls.TLSDir | None = None) -> None:
        self.target = target
        #: Mutual TLS material (None: plaintext, ``--insecure``).
        self.tls = tls_dir
        self.identity = identity(root_id)
        self.fabric_cluster = fabric_cluster
        self.poll_period = poll_period
        self.status_timeout = status_timeout
        self.backoff = backoff
        self.startup_wait = startup_wait
        #: Runs (on the link's thread) when a Cluster's NetworkUnavailable answer changed.
        self.on_change: Callable[[], None] = lambda: None
        #: The reflector's last status (None: no answer yet).
        self.status: api.FabricStatus | None = None
        #: Answers given per Cluster asked about, to tell when one changes (reconciler threads write).
        self._answers: dict[str, forge.NetworkCondition] = {}
        self._answers_lock = threading.Lock()
        #: Clusters whose first records the first session waits for (None: not told yet).
        self._expecting: set[Owner] | None = None
        self._all_in: asyncio.Event | None = None
        #: Owner -> names of its records handed over last (loop thread only).
        self._names: dict[Owner, set[str]] = {}
        self.publisher: RecordPublisher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing: asyncio.Event | None = None
        self._refresh_now: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="tree-fabric-link", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the publisher (its records stay on the reflector for its grace period, so a
        successor taking over in time flaps nothing) and the topology watch; join the thread."""
        loop, closing = self._loop, self._closing
        if loop is not None and closing is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(closing.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception:
            _log.exception("the tree manager's link to the reflector at %s ended", self.target)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        self._refresh_now = asyncio.Event()
        self._all_in = asyncio.Event()
        self.publisher = RecordPublisher(self.target, self.identity, backoff=self.backoff, tls_dir=self.tls)
        self._ready.set()
        tasks = [asyncio.create_task(self._publish())]
        if self.fabric_cluster:
            tasks += [asyncio.create_task(self._watch_topology()), asyncio.create_task(self._poll())]
        await self._closing.wait()
        await self.publisher.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ records out

    def publish(self, owner: Owner, records: Mapping[str, bytes]) -> None:
        """The records of ``owner`` (a Cluster's (name, UID)) are exactly ``records`` (virtual
        node name -> data) from now on."""
        self._call(self._apply, owner, dict(records))

    def forget(self, owner: Owner) -> None:
        """``owner`` has no virtual nodes any more: delete its records (those no other owner
        hands over: a Cluster recreated under the same name may already have taken them)."""
        self._call(self._apply, owner, {})

    def expect(self, owners: set[Owner]) -> None:
        """The Clusters the manager's first pass found: the first session waits for their records."""
        self._call(self._expect, set(owners))

    def _expect(self, owners: set[Owner]) -> None:
        if self._expecting is None:
            self._expecting = set(owners) - set(self._names)
            self._check_all_in()

    def _check_all_in(self) -> None:
        if self._all_in is not None and self._expecting is not None and not self._expecting:
            self._all_in.set()

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # not leading (or stopped): a standby publishes nothing
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(fn, *args)

    def _apply(self, owner: Owner, records: dict[str, bytes]) -> None:
        pub = self.publisher
        if pub is None:
            return
        others = {n for o, names in self._names.items() if o != owner for n in names}
        for name in self._names.get(owner, set()) - set(records) - others:
            pub.delete(forge.RECORD_KIND, name)
        for name, data in records.items():
            pub.put(forge.RECORD_KIND, name, data)  # no change, no version bump, nothing sent
        if records:
            self._names[owner] = set(records)
        else:
            self._names.pop(owner, None)
            if all(o[0] != owner[0] for o in self._names):
                with self._answers_lock:
                    self._answers.pop(owner[0], None)  # not asked about any more
        if self._expecting is not None:
            self._expecting.discard(owner)
            self._check_all_in()

    async def _publish(self) -> None:
        assert self.publisher is not None and self._all_in is not None
        try:
            async with asyncio.timeout(self.startup_wait):
                await self._all_in.wait()
        except TimeoutError:
            _log.info("records of %s: not every leaf answered within %g s; publishing what there is", self.identity,
                      self.startup_wait)
        try:
            await self.publisher.run()
        except RecordsRefused as e:
            _log.error("the reflector refuses the tree manager's records for good: %s; none are published", e)

    # ------------------------------------------------------------------ reachability in

    def network(self, cluster: str) -> forge.NetworkCondition | None:
        """``cluster``'s NetworkUnavailable: None when the fabric is not asked (no root fabric
        cluster name), :data:`~tree.forge.NETWORK_UNKNOWN` before the reflector's first answer."""
        if not self.fabric_cluster:
            return None
        status = self.status
        answer = forge.NETWORK_UNKNOWN if status is None else forge.network_condition(status, self.fabric_cluster,
                                                                                          cluster)
        with self._answers_lock:
            self._answers[cluster] = answer
        return answer

    async def _refresh(self) -> None:
        try:
            status = await get_status(self.target, timeout=self.status_timeout, tls_dir=self.tls)
        except ReflectorUnavailable as e:
            _log.debug("GetStatus: %s; the last answer stands", e)
            return
        if status.holding:
            return  # a reflector just started: its topology is not complete yet; the last answer stands
        self.status = status
        assert self.fabric_cluster
        with self._answers_lock:
            answers = dict(self._answers)
        changed = [c for c, old in answers.items()
                   if forge.network_condition(status, self.fabric_cluster, c) != old]
        if changed:
            _log.info("the fabric's reachability of %s changed", ", ".join(sorted(changed)))
            self.on_change()

    async def _poll(self) -> None:
        assert self._refresh_now is not None
        while True:
            await self._refresh()
            self._refresh_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_period):
                    await self._refresh_now.wait()

    async def _watch_topology(self) -> None:
        assert self._refresh_now is not None
        backoff = Backoff(*self.backoff)
        while True:
            watcher = TopologyWatcher(self.target, self.tls)
            synced = False
            try:
                async for event in watcher:
                    if event.kind != "snapshot":
                        synced = True
                        self._refresh_now.set()  # the topology changed (or is whole again)
                reason = "the reflector ended the stream"
            except (ReflectorUnavailable, DecodeError) as e:
                reason = str(e)
            finally:
                await watcher.close()
            if synced:
                backoff.reset()
            sleep = backoff.next()
            _log.info("topology watch of %s ended (%s); again in %.2f s", self.target, reason, sleep)
            await asyncio.sleep(sleep)
