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
   :class:`~fabric.control.records.RecordWatch` of the reflector's reachability records (kind
   :data:`fabric.control.reachability.KIND`, publisher
   :data:`~fabric.control.reachability.PUBLISHER`: one record ``<source>/<target>`` per ordered
   pair of the fabric's clusters, put by the reflector as soon as an agent's probe report or a
   session changes a pair). Every change of the watch (its snapshot after END_OF_SNAPSHOT, then
   each delta) rebuilds the root's :class:`View` from the watch's cache (:func:`view`): the
   records ``<root>/<leaf>`` decoded, and the names of every cluster the records name, which is
   the fabric's configuration (the reflector publishes a record for every ordered pair of
   configured clusters and deletes a cluster's records, in one revision, when it leaves the
   configuration). No topology watch and no status poll: the records carry both answers.
   :meth:`FabricLink.network` answers a leaf's ``NetworkUnavailable`` from the view
   (:func:`tree.forge.network_condition`); when that answer changes for a Cluster a reconciler
   asked about, ``on_change`` runs at once on the link's thread (the manager kicks the
   reconcilers), so a cut reaches the Nodes within one pass of the reflector's record.

   What is not an answer changes nothing, so a reflector's restart flaps no Node: before the
   first snapshot the answer is :data:`tree.forge.NETWORK_UNKNOWN` (the Nodes keep what they
   say); while the watch reconnects the last view stands (the fabric's data plane runs on
   without its reflector, so what it last said is the best guess); and a set of records that
   holds none of the reflector's (a restarted reflector in its startup hold, a standby, a new
   leader whose records are not out yet) is no view at all: the last one stands until the
   reflector publishes again. A pair without a record while others have one is a cluster
   that is not configured (True); a record that does not decode is logged once per version
   and answers nothing for its pair (the Node keeps what it says). The one case the records
   cannot tell: a configuration cut down to a single cluster has no pair, so no record, and
   the last answer stands there too.

Calls from other threads (:meth:`publish`, :meth:`forget`) only queue work on the loop; the
view is one immutable object replaced whole, under the lock that also records each answer given
(:meth:`FabricLink.network`), so a change of the view never misses an answer handed out from
the view before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fabric.control import api, reachability, tls
from fabric.control.codec import DecodeError
from fabric.control.records import RecordPublisher, RecordsRefused, RecordWatch
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


@dataclass(frozen=True)
class View:
    """The fabric's answer for one root, from one complete set of reachability records.

    ``pairs``: leaf cluster -> the decoded record ``<root>/<leaf>``; ``clusters``: every cluster
    the records name (the fabric's configuration, see the module's step 2)."""

    pairs: Mapping[str, reachability.PairState]
    clusters: frozenset[str]


def view(records: Iterable[api.Record], root: str,
         bad: Callable[[api.Record, str], None] | None = None) -> View | None:
    """The root's :class:`View` from reachability records (a :class:`RecordWatch`'s cache);
    None when none of them is the reflector's (no answer: keep the last view). Records of
    another kind or publisher are skipped (a plaintext reflector lets anyone publish the kind
    under their own name); one whose name is no ``<source>/<target>``, or that does not decode,
    goes to ``bad`` and answers nothing for its pair (a well-formed name still counts its
    clusters as configured)."""
    pairs: dict[str, reachability.PairState] = {}
    clusters: set[str] = set()
    any_ours = False
    for r in records:
        if r.kind != reachability.KIND or r.publisher != reachability.PUBLISHER:
            continue
        any_ours = True
        source, sep, target = r.name.partition("/")
        if not sep or not source or not target or "/" in target:
            if bad is not None:
                bad(r, f"reachability record {r.name!r}: the name is no <source>/<target>")
            continue
        clusters.update((source, target))
        if source != root:
            continue  # only its names count: no need to decode the other roots' pairs
        try:
            pairs[target] = reachability.decode(r.data, r.name)
        except DecodeError as e:
            if bad is not None:
                bad(r, str(e))
    return View(pairs, frozenset(clusters)) if any_ours else None


class FabricLink:
    """Records out, reachability in, on one event loop thread (see the module's steps)."""

    def __init__(self, target: str, root_id: str, fabric_cluster: str | None, *,
                 backoff: tuple[float, float] = (0.2, 5.0), startup_wait: float = 30.0,
                 tls_dir: tls.TLSDir | None = None) -> None:
        self.target = target
        #: Mutual TLS material (None: plaintext, ``--insecure``).
        self.tls = tls_dir
        self.identity = identity(root_id)
        self.fabric_cluster = fabric_cluster
        self.backoff = backoff
        self.startup_wait = startup_wait
        #: Runs (on the link's thread) when a Cluster's NetworkUnavailable answer changed.
        self.on_change: Callable[[], None] = lambda: None
        #: Times an answer given changed (each one ran ``on_change``).
        self.changes = 0
        #: The fabric's last answer (None: none yet); replaced whole on the loop thread.
        self.view: View | None = None
        #: The reachability watch (None: not asked, or not started).
        self.watch: RecordWatch | None = None
        #: Records that did not decode, logged once per (name, version).
        self._bad_logged: set[tuple[str, int]] = set()
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
        successor taking over in time flaps nothing) and the reachability watch; join the thread."""
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
        self._all_in = asyncio.Event()
        self.publisher = RecordPublisher(self.target, self.identity, backoff=self.backoff, tls_dir=self.tls)
        self._ready.set()
        tasks = [asyncio.create_task(self._publish())]
        if self.fabric_cluster:
            self.watch = RecordWatch(self.target, reachability.KIND, reachability.PUBLISHER, backoff=self.backoff,
                                     tls_dir=self.tls)
            tasks.append(asyncio.create_task(self._watch_reachability(self.watch)))
        await self._closing.wait()
        await self.publisher.close()
        if self.watch is not None:
            await self.watch.close()
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
        with self._answers_lock:  # with the view read under it: :meth:`update` sees every answer given
            answer = self._answers[cluster] = self._answer(self.view, cluster)
        return answer

    def _answer(self, v: View | None, cluster: str) -> forge.NetworkCondition:
        assert self.fabric_cluster
        if v is None:
            return forge.NETWORK_UNKNOWN
        return forge.network_condition(self.fabric_cluster, cluster, v.pairs.get(cluster), v.clusters)

    def _bad(self, r: api.Record, why: str) -> None:
        if (r.name, r.version) not in self._bad_logged:
            self._bad_logged.add((r.name, r.version))
            _log.warning("%s (from %s): ignored, NetworkUnavailable of that pair is left as it is", why, self.target)

    def update(self, records: Iterable[api.Record]) -> bool:
        """A complete set of reachability records (the watch's cache after a change): the new
        view, unless it holds none of the reflector's (then the last one stands). True, and
        ``on_change`` called, when the answer of a Cluster a reconciler asked about changed."""
        assert self.fabric_cluster
        new = view(records, self.fabric_cluster, self._bad)
        if new is None or new == self.view:
            return False
        with self._answers_lock:
            self.view = new
            changed = {c: a for c, old in self._answers.items() if (a := self._answer(new, c)) != old}
            # What the kicked reconcilers will be told; so a leaf that makes no pass for a while
            # (its informers not synced) is not found changed again at every later record.
            self._answers.update(changed)
        if not changed:
            return False
        for c, a in sorted(changed.items()):
            _log.log(logging.WARNING if a.status == "True" else logging.INFO,
                     "the fabric's reachability of %s from %s: NetworkUnavailable=%s (%s)", c, self.fabric_cluster,
                     a.status or "unknown", a.message or "no answer")  # fmt: skip
        self.changes += 1
        self.on_change()
        return True

    async def _watch_reachability(self, watch: RecordWatch) -> None:
        """Follow the records until the link stops (the watch reconnects by itself; its cache,
        and so the last view, stands meanwhile)."""
        try:
            async for _change in watch:
                self.update(list(watch.records.values()))
        except RecordsRefused as e:
            _log.error("the reflector refuses the tree manager's watch of reachability records for good: %s; "
                       "NetworkUnavailable keeps its last answer", e)  # fmt: skip
