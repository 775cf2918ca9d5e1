"""Pods bound to a leaf's virtual nodes, kept in the leaf; their status kept in the root.

Objects, and who writes what:

- :class:`RootPods` (one per manager): an informer on the root's bound pods (field selector
  ``spec.nodeName!=``), indexed by UID, that tells every leaf's syncer about each change.
- :class:`PodSyncer` (one per leaf, owned by its :class:`tree.leaf.LeafReconciler`): the leaf's
  pod informer (the reconciler's, all pods; ours are those labelled with this root's id),
  indexed by the root UID label (:mod:`tree.identity`: a copy is found by that label only), a
  work queue of root pod UIDs and ``Options.pod_workers`` worker threads. Every request has a
  timeout; a leaf that hangs ties up its own workers only.

One root pod UID, one step (:meth:`PodSyncer.sync_one`), from what the informers hold:

1. The root pod is gone (its UID is in no root pod): its copies here are deleted, each with a
   UID precondition, once a GET of the root name confirms the root pod is really gone.
2. The root pod is being deleted: each copy is deleted with the root pod's grace period (again
   when that grace is shorter than the copy's); when no copy is left the root pod is deleted with
   grace 0 and a UID precondition, as the kubelet (and virtual-kubelet) finish a pod.
3. The root pod lives, bound to one of this leaf's virtual nodes (or already copied here): with
   no copy, one is created (namespace created on demand; :class:`Dependencies` asked for its
   ConfigMaps, Secrets, ServiceAccount, PVCs; :func:`tree.pods.leaf_pod`; the convert hook).
   A create uses the root informer's copy of the pod when it is current: the one way it can
   miss that the pod has finished is a status this syncer wrote itself (only the node's
   kubelet, i.e. we, make a pod of ours Succeeded or Failed), so after a status write the pod
   is read afresh (a GET) until the informer shows that write's resourceVersion. A deletion
   the informer has not shown yet is no different from one that comes right after a create:
   its event deletes the copy (step 2). With a copy: its updatable fields are patched to the root
   pod's (:func:`tree.pods.leaf_update`, so an edit in the leaf is put back) and the root pod's
   status is written from it (:func:`tree.pods.root_status`). A copy being deleted by someone
   else is waited out and then created again; the root pod is never deleted because its copy
   went. A root pod that has finished (Succeeded, Failed) is not copied again.

Pinning (cluster mode). A root pod annotated :data:`tree.pods.LEAF_NODE_ANNOTATION` (the
scheduler's LeafNodeFit PreBind writes the leaf node its reservation counted the pod on) gets a
copy pinned to that node (:func:`tree.pods.leaf_pod`); the annotation is read only from pods
bound to this Cluster's virtual nodes, and one that is not a node name is a Warning Event
``LeafNodePinIgnored`` and an unpinned copy, never a failed sync.

Stranded copies (:meth:`PodSyncer._stranded`). A live copy that stays Pending, unbound, with
``PodScheduled=False`` reason ``Unschedulable`` (its leaf's scheduler found no node) for longer
than ``stranded_after`` seconds (``kosmos-tree --stranded-after``; timed from when this syncer
first saw it so, per copy UID: no clock of the leaf is trusted) is stranded: the leaf changed
under the root scheduler. Then, counted in ``fabric_tree_pods_stranded_total{cluster,action}``,
with a Warning Event on the root pod naming the leaf (node) and the leaf scheduler's message:

- a pinned copy (:data:`tree.pods.PINNED_ANNOTATION`): the annotation is removed from the root
  pod (a JSON patch that tests its UID), the copy deleted (UID precondition, grace 0: it never
  ran) and created again without the pin, for the leaf's scheduler to choose among all its nodes
  (Event ``LeafNodeUnpinned``; action ``unpinned``). The root pod no longer asks for the pin, so
  a restart does not pin it again.
- an unpinned copy of a root pod with a controller (an ownerReference with ``controller: true``):
  the root pod is evicted (``pods/eviction`` with a UID precondition: a newer pod of the same name
  is never touched; a disruption budget is honoured: 429 is retried), once; its controller
  creates a new pod that the root scheduler places again, and the leaf's record (which no longer
  has room) keeps it off this leaf (Event ``LeafCannotHostPod``; action ``evicted``). The
  eviction's deletion then runs step 2.
- a pod without a controller: only the Event (action ``reported``), once per copy. Deleting it
  would lose the pod for good (nothing re-creates it, and a pod's nodeName cannot change): it
  stays Pending in the leaf, which may still find room later; its owner decides.

Names. A copy has the root pod's name unless something else holds that name in the leaf (a
leaf user's pod, another root's copy): then ``<name>-<hash>`` (:func:`tree.identity.leaf_name`)
with ``spec.hostname`` = the root name. One exception: while an earlier copy of *this* root's
pod of the same namespace/name (an older UID: a StatefulSet pod deleted and recreated) is still in
the leaf, the new pod waits and is created under the plain name once the old copy is gone. A
StatefulSet pod therefore never runs twice (its identity, its ReadWriteOnce volumes), as the
StatefulSet controller itself waits for the old pod before it creates the new one.

Restart. Nothing is kept in memory that the informers do not rebuild: a restarted manager finds
each copy by its root UID label and creates nothing twice (a create racing an informer that has
not seen the copy yet gets 409 AlreadyExists on the same deterministic name and is retried).

Failures. A failing pod is retried with its own back-off (:class:`fabric.backoff.Backoff`); the
others go on. A refusal by the leaf or by a dependency is also reported as a Warning Event on
the root pod (virtual-kubelet's reasons: ``ProviderCreateFailed``, ``ProviderUpdateFailed``,
``ProviderDeleteFailed``), once per distinct message. Every ``resync_period`` every pod of ours is
queued again and :meth:`Dependencies.release` is told the copies that remain.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from fabric.backoff import Backoff
from scheduler.kube import Api, ApiError, Informer, object_key, resource_path
from tree import identity, pods
from tree.metrics import TreeMetrics
from tree.spec import Mode, TreeSpec
from tree.vnode import owner

_log = logging.getLogger(__name__)

Obj = dict[str, Any]
JSON_PATCH = "application/json-patch+json"

REASON_CREATE_FAILED = "ProviderCreateFailed"
REASON_UPDATE_FAILED = "ProviderUpdateFailed"
REASON_DELETE_FAILED = "ProviderDeleteFailed"
REASON_PIN_IGNORED = "LeafNodePinIgnored"
REASON_UNPINNED = "LeafNodeUnpinned"
REASON_STRANDED = "LeafCannotHostPod"
TERMINAL = ("Succeeded", "Failed")
#: Seconds a created copy may take to show in the leaf informer before it counts as gone.
_CREATED_GRACE_S = 10.0


class Dependencies(Protocol):
    """The dependency syncer of one leaf (``tree/deps.py``): copies of what a pod refers to."""

    def ensure(self, root_pod: Obj, leaf_namespace: str) -> dict[tuple[str, str], str]:
        """Create or update the leaf copies of what ``root_pod`` refers to; the renames
        (``(plural, root name)`` -> leaf name). Raises ``tree.deps.DependencyError``."""
        ...

    def release(self, leaf_pods_of_ours: Iterable[Obj]) -> None:
        """Collect the copies no pod of ``leaf_pods_of_ours`` refers to any more."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


#: Makes a leaf's :class:`Dependencies` from (its Cluster's spec, root Api, leaf Api), on every
#: (re)connection.
DependenciesFactory = Callable[[TreeSpec, Api, Api], Dependencies]
#: Convert policies (:meth:`tree.convert.ConvertPolicies.convert`): (leaf pod, root pod, leaf
#: cluster) -> the leaf pod to create.
Converter = Callable[[Obj, Obj, str], Obj]


def _meta(obj: Obj | None) -> Obj:
    return (obj or {}).get("metadata") or {}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RootPods:
    """The root's bound pods (one informer for every leaf), by UID; subscribers hear each change."""

    def __init__(self, root: Api) -> None:
        self.informer = Informer(root, "v1", "pods", field_selector="spec.nodeName!=")
        self._by_uid: dict[str, Obj] = {}
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[Obj], None]] = []
        self.informer.add_handler(self._on_event)

    def start(self) -> None:
        self.informer.start()

    def stop(self) -> None:
        self.informer.stop()

    @property
    def synced(self) -> bool:
        return self.informer.synced.is_set()

    def subscribe(self, fn: Callable[[Obj], None]) -> None:
        with self._lock:
            self._subscribers = [*self._subscribers, fn]

    def unsubscribe(self, fn: Callable[[Obj], None]) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s != fn]  # == : bound methods are made anew

    def get(self, uid: str) -> Obj | None:
        return self._by_uid.get(uid)

    def on_nodes(self, nodes: set[str]) -> list[Obj]:
        """The pods bound to one of ``nodes``."""
        return [p for p in list(self._by_uid.values()) if (p.get("spec") or {}).get("nodeName") in nodes]

    def _on_event(self, kind: str, old: Obj | None, new: Obj | None) -> None:
        pod = new or old or {}
        uid = str(_meta(pod).get("uid") or "")
        with self._lock:
            if kind == "DELETED":
                self._by_uid.pop(uid, None)
            elif uid:
                self._by_uid[uid] = pod
            subscribers = self._subscribers
        for fn in subscribers:
            fn(pod)


class _Queue:
    """Root pod UIDs to sync: each queued once, never handed to two workers at once (a UID
    changed while being synced is queued again when its worker is done), delays in a heap."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._ready: deque[str] = deque()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._dirty: set[str] = set()
        self._later: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._closed = False

    def add(self, key: str) -> None:
        with self._cv:
            self._add(key)

    def _add(self, key: str) -> None:
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)
            self._cv.notify()

    def add_after(self, key: str, delay: float) -> None:
        with self._cv:
            heapq.heappush(self._later, (time.monotonic() + delay, next(self._seq), key))
            self._cv.notify()

    def get(self) -> str | None:
        with self._cv:
            while True:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    self._add(heapq.heappop(self._later)[2])
                if self._closed:
                    return None
                if self._ready:
                    key = self._ready.popleft()
                    self._queued.discard(key)
                    self._active.add(key)
                    return key
                self._cv.wait(self._later[0][0] - now if self._later else None)

    def done(self, key: str) -> None:
        with self._cv:
            self._active.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add(key)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._ready) + len(self._later)


class _Stopped(Exception):
    pass


class _Retry(Exception):
    """Not a failure: try this pod again after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"retry in {delay:g} s")
        self.delay = delay


class PodSyncer:
    """The pods of one leaf (see the module)."""

    def __init__(self, root: Api, root_pods: RootPods, root_nodes: Informer, spec: Callable[[], TreeSpec], *,
                 root_id: str, metrics: TreeMetrics, workers: int = 8, leaf_timeout: float = 10.0,
                 root_timeout: float = 30.0, resync_period: float = 30.0,
                 dependencies: DependenciesFactory | None = None, converter: Converter | None = None,
                 stranded_after: float = 30.0) -> None:
        if stranded_after <= 0:
            raise ValueError(f"stranded_after: must be positive seconds, got {stranded_after}")
        self.root = root
        self.root_pods = root_pods
        self.root_nodes = root_nodes
        self.spec = spec
        self.root_id = root_id
        self.metrics = metrics
        self.workers = max(1, workers)
        self.leaf_timeout = leaf_timeout
        self.root_timeout = root_timeout
        self.resync_period = resync_period
        self.dependencies_factory = dependencies
        self.converter = converter
        self.stranded_after = stranded_after
        self.deps: Dependencies | None = None
        self._leaf: Api | None = None
        self._informer: Informer | None = None
        self._lock = threading.Lock()
        #: root UID -> {leaf key: leaf copy} of the attached informer; rebuilt on every attach.
        self._copies: dict[str, dict[str, Obj]] = {}
        #: ``ns/name`` of a root pod -> the root UIDs with a copy here under that root name (the
        #: same index, by name: a create asks it in O(1) instead of scanning every copy under
        #: the lock, which every worker and the leaf informer wait on).
        self._by_root_name: dict[str, set[str]] = {}
        #: ``ns/name`` of a root pod -> UID of the pod waiting for an older copy of that name to go.
        self._waiting: dict[str, str] = {}
        self._namespaces: set[str] = set()
        #: root UID -> when its copy was created and the informer has not shown it yet: no
        #: second create, no "the copy is gone" meanwhile (an optimisation over the 409 a second
        #: create of the same name would get; a restart lists afresh and needs none).
        self._created: dict[str, float] = {}
        self._backoff: dict[str, Backoff] = {}
        #: root UID -> (reason, message) of the last Event posted (once per distinct message).
        self._events: dict[str, tuple[str, str]] = {}
        #: root UID -> the resourceVersion of the root pod's status as this syncer last wrote it
        #: ("" while the write is in flight or its answer was lost), until the root informer
        #: shows that version: meanwhile the informer may miss that the pod finished.
        self._written: dict[str, str] = {}
        #: root UID -> (copy UID, when this syncer first saw that copy Unschedulable).
        self._unschedulable: dict[str, tuple[str, float]] = {}
        #: root UID -> the copy UID its stranding was acted on or reported for (once per copy).
        self._stranded_done: dict[str, str] = {}
        #: root UIDs whose pin was dropped (the root informer may not show the removal yet).
        self._unpinned: set[str] = set()
        self._queue = _Queue()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._primed = False

    @property
    def cluster(self) -> str:
        return self.spec().cluster

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.root_pods.subscribe(self._on_root)
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"pods-{self.cluster}-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._resync_loop, name=f"pods-{self.cluster}-resync", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.root_pods.unsubscribe(self._on_root)
        self._queue.close()
        self.detach()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def attach(self, leaf: Api, informer: Informer) -> None:
        """A (new) connection to the leaf and its fresh pod informer: the copies are indexed
        afresh from its LIST, and every pod queued once it has listed."""
        self.detach()
        with self._lock:
            self._leaf, self._informer, self._copies, self._primed = leaf, informer, {}, False
            self._by_root_name = {}
            self._namespaces, self._created = set(), {}
        informer.add_handler(lambda kind, old, new: self._on_leaf(informer, kind, old, new))
        if self.dependencies_factory is not None:
            self.deps = self.dependencies_factory(self.spec(), self.root, leaf)
            self.deps.start()
        self._wake.set()

    def detach(self) -> None:
        with self._lock:
            self._leaf, self._informer, self._copies, self._by_root_name = None, None, {}, {}
            deps, self.deps = self.deps, None
        if deps is not None:
            deps.stop()

    def kick(self) -> None:
        """Queue every pod again (the virtual nodes changed)."""
        self._wake.set()

    # ------------------------------------------------------------------ events in

    def _mine(self, pod: Obj) -> bool:
        """Bound to one of this Cluster's virtual nodes (and one to copy: :func:`tree.pods.should_sync`)."""
        if not pods.should_sync(pod):
            return False
        spec = self.spec()
        node = self.root_nodes.store.get(str((pod.get("spec") or {}).get("nodeName") or ""))
        return node is not None and owner(node) == (spec.cluster, spec.uid)

    def _on_root(self, pod: Obj) -> None:
        uid = str(_meta(pod).get("uid") or "")
        if uid in self._written and self._written.get(uid) == _meta(pod).get("resourceVersion"):
            self._written.pop(uid, None)  # the informer has caught up with our status write
        if uid and self._primed and (self._mine(pod) or uid in self._copies):
            self._queue.add(uid)

    def _on_leaf(self, informer: Informer, kind: str, old: Obj | None, new: Obj | None) -> None:
        pod = new or old or {}
        who = identity.root_of(pod)
        if who is None or who[0] != self.root_id:
            return
        key = object_key(pod)
        with self._lock:
            if self._informer is not informer:
                return  # a replaced informer's last words
            self._created.pop(who[1], None)
            before = self._copies.get(who[1]) or {}
            copies = dict(before)
            if kind == "DELETED":
                copies.pop(key, None)
            else:
                copies[key] = pod
            if copies:
                self._copies[who[1]] = copies
            else:
                self._copies.pop(who[1], None)
            self._index_names(who[1], before, copies)
            waiting = self._waiting.get(_root_name(pod)) if kind == "DELETED" else None
        if self._primed:
            self._queue.add(who[1])
            if waiting:
                self._queue.add(waiting)

    def _index_names(self, uid: str, before: dict[str, Obj], after: dict[str, Obj]) -> None:
        """Keep :attr:`_by_root_name` in step with one UID's copies (called with the lock held)."""
        names = {_root_name(c) for c in after.values()}
        for gone in {_root_name(c) for c in before.values()} - names:
            uids = self._by_root_name.get(gone)
            if uids is not None:
                uids.discard(uid)
                if not uids:
                    del self._by_root_name[gone]
        for name in names:
            self._by_root_name.setdefault(name, set()).add(uid)

    def _ready(self) -> bool:
        inf = self._informer
        return (inf is not None and inf.synced.is_set() and self.root_pods.synced
                and self.root_nodes.synced.is_set())

    # ------------------------------------------------------------------ the loops

    def _resync_loop(self) -> None:
        next_full = 0.0
        while not self._stop.is_set():
            self._wake.wait(0.1 if not self._primed else max(0.05, next_full - time.monotonic()))
            if self._stop.is_set():
                return
            woke = self._wake.is_set()
            self._wake.clear()
            if not self._ready():
                continue
            if woke or not self._primed or time.monotonic() >= next_full:
                self._primed = True
                self._enqueue_all()
                next_full = time.monotonic() + self.resync_period

    def _enqueue_all(self) -> None:
        spec = self.spec()
        mine = {n["metadata"]["name"] for n in self.root_nodes.store.values()
                if owner(n) == (spec.cluster, spec.uid)}
        uids = {str(_meta(p).get("uid")) for p in self.root_pods.on_nodes(mine) if pods.should_sync(p)}
        with self._lock:
            copies = {u: list(c.values()) for u, c in self._copies.items()}
            deps = self.deps
        uids |= set(copies)
        for u in uids:
            self._queue.add(u)
        for table in (self._events, self._backoff, self._created, self._written,  # of pods gone meanwhile
                      self._unschedulable, self._stranded_done):
            for u in [u for u in list(table) if u not in uids]:
                table.pop(u, None)
        self._unpinned &= uids
        with self._lock:
            self._waiting = {k: u for k, u in self._waiting.items() if u in uids}
        live = [p for cs in copies.values() for p in cs if not _meta(p).get("deletionTimestamp")]
        self.metrics.pods_synced.labels(spec.cluster).set(len({identity.root_of(p) for p in live}))
        if deps is not None:
            try:  # a terminating copy still runs with its ConfigMaps, Secrets and ServiceAccount
                deps.release([p for cs in copies.values() for p in cs])
            except Exception as e:
                _log.warning("Cluster %s: releasing dependencies: %s: %s", spec.cluster, type(e).__name__, e)

    def _work(self) -> None:
        while True:
            uid = self._queue.get()
            if uid is None:
                return
            start = time.monotonic()
            try:
                self.sync_one(uid)
                self._backoff.pop(uid, None)
            except _Retry as r:
                self._queue.add_after(uid, r.delay)
            except Exception as e:
                if self._stop.is_set():
                    self._queue.done(uid)
                    return
                reason = _error_reason(e)
                self.metrics.pod_sync_errors.labels(self.cluster, reason).inc()
                backoff = self._backoff.setdefault(uid, Backoff(initial=0.2, maximum=30.0))
                first = backoff.attempts == 0
                delay = backoff.next()
                level = logging.WARNING if first and reason != "conflict" else logging.DEBUG
                pod = self.root_pods.get(uid)
                name = f"{_meta(pod).get('namespace')}/{_meta(pod).get('name')}" if pod else "(gone)"
                _log.log(level, "Cluster %s: pod %s %s: %s: %s; retrying in %.1f s", self.cluster, name, uid, reason,
                         e, delay)
                self._queue.add_after(uid, delay)
            finally:
                self.metrics.pod_sync_seconds.labels(self.cluster).observe(time.monotonic() - start)
                self._queue.done(uid)

    # ------------------------------------------------------------------ one pod

    def _guard(self) -> None:
        """Raise before a write once stopped (leadership lost, Cluster gone): a stopped syncer
        writes nothing more, whatever request it was about to send."""
        if self._stop.is_set():
            raise _Stopped()

    def copies_of(self, uid: str) -> list[Obj]:
        with self._lock:
            return list((self._copies.get(uid) or {}).values())

    def sync_one(self, uid: str) -> None:
        """Bring one root pod and its copies here in line (the module's steps 1-3)."""
        leaf, inf = self._leaf, self._informer
        if leaf is None or inf is None or not self._ready():
            return  # the prime after the next attach queues it again
        root_pod = self.root_pods.get(uid)
        copies = self.copies_of(uid)
        if not copies and time.monotonic() - self._created.get(uid, -1e18) < _CREATED_GRACE_S:
            raise _Retry(0.2)  # just created: wait for the informer to show it
        if root_pod is None:
            for c in copies:
                self._delete_orphan(leaf, c)
            return
        if not copies and not self._mine(root_pod):
            return  # another leaf's (or a real node's) pod
        meta = _meta(root_pod)
        if meta.get("deletionTimestamp"):
            self._finish(leaf, root_pod, copies)
            return
        live = sorted((c for c in copies if not _meta(c).get("deletionTimestamp")),
                      key=lambda c: (str(_meta(c).get("creationTimestamp") or ""), str(_meta(c).get("name"))))
        for extra in live[1:]:  # two copies of one root pod: keep the oldest
            self._delete_leaf(leaf, root_pod, extra, None)
        if not live:
            if copies:
                return  # deleted by someone else: created again once it is gone (its DELETED event)
            if (root_pod.get("status") or {}).get("phase") in TERMINAL:
                return
            self._create(leaf, root_pod)
            return
        copy = live[0]
        patch = pods.leaf_update(root_pod, copy, self.root_id)
        if patch:
            try:
                self._guard()
                leaf.request("PATCH", resource_path("v1", "pods", _meta(copy)["namespace"], _meta(copy)["name"]),
                             patch, ctype=JSON_PATCH, timeout=self.leaf_timeout)
                self.metrics.pod_writes.labels(self.cluster, "leaf-update").inc()
            except ApiError as e:
                if _refused(e):
                    self._event(root_pod, REASON_UPDATE_FAILED, f"updating the leaf pod: {e}")
                raise
        self._push_status(root_pod, copy)
        if self._stranded(leaf, root_pod, copy):
            return
        self._events.pop(uid, None)

    def _create(self, leaf: Api, root_pod: Obj) -> None:
        meta = _meta(root_pod)
        ns, name, uid = str(meta.get("namespace") or "default"), str(meta["name"]), str(meta["uid"])
        inf = self._informer
        if inf is None or not inf.synced.is_set():
            raise _Retry(0.5)  # reconnected meanwhile: the new informer has not listed yet
        with self._lock:
            older = [c for u in self._by_root_name.get(f"{ns}/{name}", ()) if u != uid
                     for c in (self._copies.get(u) or {}).values() if _root_name(c) == f"{ns}/{name}"]
            if older:
                self._waiting[f"{ns}/{name}"] = uid
            else:
                self._waiting.pop(f"{ns}/{name}", None)
        if older:
            _log.info("Cluster %s: pod %s/%s waits for the earlier copy %s to go", self.cluster, ns, name,
                      _meta(older[0]).get("name"))
            raise _Retry(self.resync_period)
        if uid in self._written:  # the informer may not show our last status write (a finish) yet
            fresh = self.root.get_or_none(resource_path("v1", "pods", ns, name), timeout=self.root_timeout)
            if fresh is None:
                return
            fmeta = _meta(fresh)
            if (str(fmeta.get("uid")) != uid or fmeta.get("deletionTimestamp")
                    or (fresh.get("status") or {}).get("phase") in TERMINAL):
                return  # its own event queues it again
            if fmeta.get("resourceVersion") == _meta(root_pod).get("resourceVersion"):
                self._written.pop(uid, None)  # the informer is current again
            root_pod = fresh
        occupant = inf.store.get(f"{ns}/{name}")
        leaf_name = identity.leaf_name(name, self.root_id, uid, occupant)
        spec = self.spec()
        node = str((root_pod.get("spec") or {}).get("nodeName") or "")
        pin = None
        if spec.mode is Mode.CLUSTER and uid not in self._unpinned:
            pin, problem = pods.leaf_node_pin(root_pod)
            if problem:
                self._event(root_pod, REASON_PIN_IGNORED, problem)
        try:
            renames = self.deps.ensure(root_pod, ns) if self.deps is not None else {}
            body = pods.leaf_pod(root_pod, root_id=self.root_id, leaf_name=leaf_name, mode=spec.mode,
                                 party_selector=_party_selector(spec, node), renames=renames, pin=pin)
            if self.converter is not None:
                body = self.converter(body, root_pod, spec.cluster)
        except ApiError:
            raise
        except Exception as e:  # a dependency missing, an unreadable annotation, a converter's refusal
            self._event(root_pod, REASON_CREATE_FAILED, f"{type(e).__name__}: {e}")
            raise
        self._guard()
        self._ensure_namespace(leaf, ns)
        try:
            leaf.request("POST", resource_path("v1", "pods", ns), body, timeout=self.leaf_timeout)
        except ApiError as e:
            if e.status == 404 or (e.status == 403 and "namespace" in str(e)):
                self._namespaces.discard(ns)
            if _refused(e):
                self._event(root_pod, REASON_CREATE_FAILED, f"creating the leaf pod {ns}/{leaf_name}: {e}")
            raise
        self._created[uid] = time.monotonic()
        self.metrics.pod_writes.labels(self.cluster, "leaf-create").inc()
        _log.debug("Cluster %s: pod %s/%s created in the leaf as %s", self.cluster, ns, name, leaf_name)

    def _stranded(self, leaf: Api, root_pod: Obj, copy: Obj) -> bool:
        """Act on a stranded copy (the module's "Stranded copies"); True when this step is over
        (the copy deleted, or the root pod evicted)."""
        meta, cmeta = _meta(root_pod), _meta(copy)
        uid, cuid = str(meta.get("uid")), str(cmeta.get("uid"))
        message = pods.unschedulable(copy)
        if message is None:
            self._unschedulable.pop(uid, None)
            return False
        now = time.monotonic()
        seen = self._unschedulable.get(uid)
        if seen is None or seen[0] != cuid:
            seen = self._unschedulable[uid] = (cuid, now)
            self._queue.add_after(uid, self.stranded_after + 0.05)  # look again at the deadline
        if now - seen[1] < self.stranded_after or self._stranded_done.get(uid) == cuid:
            return False
        waited = f"{self.stranded_after:g} s"
        pinned = pods.pinned_node(copy)
        if pinned:
            self._unpin(root_pod)
            self._delete_leaf(leaf, root_pod, copy, 0)
            self._stranded_done[uid] = cuid
            self.metrics.pods_stranded.labels(self.cluster, "unpinned").inc()
            self._post(root_pod, REASON_UNPINNED,
                       f"leaf node {pinned} of cluster {self.cluster} could not host the pod for {waited} "
                       f"({message}); its leaf copy is created again without the pin, for the leaf's scheduler to "
                       "place it on any node")
            _log.info("Cluster %s: pod %s/%s stranded on leaf node %s (%s): unpinned", self.cluster,
                      meta.get("namespace"), meta.get("name"), pinned, message)
            return True
        ctrl = next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
        if ctrl is None:
            self._stranded_done[uid] = cuid
            self.metrics.pods_stranded.labels(self.cluster, "reported").inc()
            self._post(root_pod, REASON_STRANDED,
                       f"leaf cluster {self.cluster} could not host the pod for {waited} ({message}); the pod has no "
                       "controller to re-create it elsewhere, so it stays Pending there: delete it to have it "
                       "placed again")
            return False
        self._guard()
        ns, name = str(meta["namespace"]), str(meta["name"])
        try:
            self.root.request("POST", resource_path("v1", "pods", ns, name, sub="eviction"),
                              {"apiVersion": "policy/v1", "kind": "Eviction",
                               "metadata": {"name": name, "namespace": ns},
                               "deleteOptions": {"preconditions": {"uid": uid}}}, timeout=self.root_timeout)
        except ApiError as e:
            if e.status == 429:  # a disruption budget: try again later
                self._post(root_pod, REASON_STRANDED, f"leaf cluster {self.cluster} could not host the pod for "
                           f"{waited} ({message}); its eviction for re-placement waits: {e}")
                raise _Retry(min(30.0, self.resync_period)) from None
            if e.status not in (404, 409):
                raise
            return True  # gone, or another pod of that name now: nothing of ours to evict
        self._stranded_done[uid] = cuid
        self.metrics.pods_stranded.labels(self.cluster, "evicted").inc()
        self.metrics.pod_writes.labels(self.cluster, "root-evict").inc()
        self._post(root_pod, REASON_STRANDED,
                   f"leaf cluster {self.cluster} could not host the pod for {waited} ({message}); evicted for its "
                   f"{ctrl.get('kind')} {ctrl.get('name')} to re-create it and the scheduler to place it again")
        _log.info("Cluster %s: pod %s/%s stranded in the leaf (%s): evicted for re-placement", self.cluster, ns, name,
                  message)
        return True

    def _unpin(self, root_pod: Obj) -> None:
        """Drop :data:`tree.pods.LEAF_NODE_ANNOTATION` from the root pod (testing its UID), so
        neither this syncer nor a restarted one pins its next copy."""
        meta = _meta(root_pod)
        uid = str(meta.get("uid"))
        self._unpinned.add(uid)
        if pods.LEAF_NODE_ANNOTATION not in (meta.get("annotations") or {}):
            return
        key = pods.LEAF_NODE_ANNOTATION.replace("~", "~0").replace("/", "~1")
        self._guard()
        try:
            self.root.request("PATCH", resource_path("v1", "pods", meta["namespace"], meta["name"]),
                              [{"op": "test", "path": "/metadata/uid", "value": uid},
                               {"op": "remove", "path": f"/metadata/annotations/{key}"}],
                              ctype=JSON_PATCH, timeout=self.root_timeout)
        except ApiError as e:
            if e.status not in (404, 409, 422):  # gone, replaced, or the annotation gone already
                raise

    def _post(self, root_pod: Obj, reason: str, message: str) -> None:
        """A Warning Event on the root pod, every time it is called (the callers post once)."""
        self._events.pop(str(_meta(root_pod).get("uid")), None)
        self._event(root_pod, reason, message)

    def _ensure_namespace(self, leaf: Api, ns: str) -> None:
        if ns in self._namespaces:
            return
        try:
            leaf.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": ns}}, timeout=self.leaf_timeout)
            self.metrics.pod_writes.labels(self.cluster, "leaf-namespace").inc()
        except ApiError as e:
            if e.status != 409:
                raise
        self._namespaces.add(ns)

    def _push_status(self, root_pod: Obj, copy: Obj) -> None:
        status = pods.root_status(copy, root_pod)
        if status is None:
            return
        meta = _meta(root_pod)
        self._guard()
        uid = str(meta.get("uid"))
        self._written[uid] = ""  # in flight: a lost answer may still have written it
        written = self.root.request("PUT", resource_path("v1", "pods", meta["namespace"], meta["name"],
                                                         sub="status"),
                                    {**root_pod, "status": status}, timeout=self.root_timeout)
        rv = str(_meta(written).get("resourceVersion") or "")
        if rv and (self.root_pods.get(uid) or {}).get("metadata", {}).get("resourceVersion") == rv:
            self._written.pop(uid, None)  # the informer already shows it
        else:
            self._written[uid] = rv
        self.metrics.pod_writes.labels(self.cluster, "root-status").inc()

    def _finish(self, leaf: Api, root_pod: Obj, copies: list[Obj]) -> None:
        """The root pod is being deleted: its copies go with its grace; then it goes (grace 0)."""
        meta = _meta(root_pod)
        grace = int(meta.get("deletionGracePeriodSeconds") or 0)
        if not copies:
            self._guard()
            try:
                self.root.request("DELETE", resource_path("v1", "pods", meta["namespace"], meta["name"]),
                                  {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
                                  timeout=self.root_timeout)
                self.metrics.pod_writes.labels(self.cluster, "root-delete").inc()
            except ApiError as e:
                if e.status not in (404, 409):
                    raise
            return
        for c in copies:
            cmeta = _meta(c)
            current = cmeta.get("deletionGracePeriodSeconds")
            if not cmeta.get("deletionTimestamp") or (current is not None and int(current) > grace):
                self._delete_leaf(leaf, root_pod, c, grace)
        live = [c for c in copies if (c.get("status") or {}).get("phase")]
        if live:
            self._push_status(root_pod, live[0])

    def _delete_leaf(self, leaf: Api, root_pod: Obj | None, copy: Obj, grace: int | None) -> None:
        cmeta = _meta(copy)
        body: Obj = {"preconditions": {"uid": cmeta["uid"]}}
        if grace is not None:
            body["gracePeriodSeconds"] = grace
        self._guard()
        try:
            leaf.request("DELETE", resource_path("v1", "pods", cmeta["namespace"], cmeta["name"]), body,
                         timeout=self.leaf_timeout)
            self.metrics.pod_writes.labels(self.cluster, "leaf-delete").inc()
        except ApiError as e:
            if e.status in (404, 409):
                return
            if root_pod is not None and _refused(e):
                self._event(root_pod, REASON_DELETE_FAILED, f"deleting the leaf pod: {e}")
            raise

    def _delete_orphan(self, leaf: Api, copy: Obj) -> None:
        """A copy whose root UID is in no root pod: deleted once the root confirms it is gone."""
        ns, _, name = _root_name(copy).partition("/")
        who = identity.root_of(copy)
        if name and who is not None:
            try:
                current = self.root.request("GET", resource_path("v1", "pods", ns, name), timeout=self.root_timeout)
                if str(_meta(current).get("uid")) == who[1]:
                    raise _Retry(1.0)  # the root informer is behind: not an orphan
            except ApiError as e:
                if e.status != 404:
                    raise
        self._delete_leaf(leaf, None, copy, None)
        _log.info("Cluster %s: leaf pod %s/%s deleted: its root pod %s (%s) is gone", self.cluster,
                  _meta(copy).get("namespace"), _meta(copy).get("name"), _root_name(copy), who[1] if who else "?")

    def _event(self, root_pod: Obj, reason: str, message: str) -> None:
        """A Warning Event on the root pod, once per distinct (reason, message)."""
        meta = _meta(root_pod)
        uid = str(meta.get("uid"))
        message = message[:1024]
        if self._events.get(uid) == (reason, message):
            return
        self._events[uid] = (reason, message)
        now = _now()
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": meta["namespace"],
                                   "name": meta["name"], "uid": uid,
                                   "resourceVersion": str(meta.get("resourceVersion") or "")},
                "reason": reason, "message": message, "type": "Warning",
                "source": {"component": "kosmos-tree", "host": str((root_pod.get("spec") or {}).get("nodeName"))},
                "firstTimestamp": now, "lastTimestamp": now, "count": 1,
                "reportingComponent": "kosmos-tree", "reportingInstance": self.cluster}
        with contextlib.suppress(Exception):  # an Event is for people; its loss changes nothing
            self.root.request("POST", resource_path("v1", "events", meta["namespace"]), body,
                              timeout=self.root_timeout)


def _root_name(pod: Obj) -> str:
    return str((_meta(pod).get("annotations") or {}).get(identity.ROOT_NAME_ANNOTATION) or "")


def _party_selector(spec: TreeSpec, node: str) -> Obj | None:
    """The raw ``labelSelector`` of the party whose virtual node is ``node`` (party mode)."""
    if spec.mode is not Mode.PARTY:
        return None
    raw_models = spec.raw.get("leafModels") or []
    for m in spec.models:
        if spec.party_node_name(m) == node and m.index < len(raw_models):
            sel = (raw_models[m.index].get("nodeSelector") or {}).get("labelSelector")
            return dict(sel) if isinstance(sel, dict) else None
    return None


def _refused(e: ApiError) -> bool:
    """A refusal worth telling the pod's owner (not a conflict, throttling or outage)."""
    return 400 <= e.status < 500 and e.status not in (404, 409, 429)


def _error_reason(e: Exception) -> str:
    if isinstance(e, ApiError):
        if e.status == 409:
            return "conflict"
        if e.status == 429 or e.status >= 500:
            return "unavailable"
        return "refused"
    if isinstance(e, pods.PodError):
        return "invalid"
    if type(e).__name__ == "DependencyError":
        return "dependency"
    return "unreachable" if isinstance(e, OSError | TimeoutError) else "error"
