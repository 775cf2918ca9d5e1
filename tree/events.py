"""Leaf Events about our pods, reflected to the root as Events on the root pods.

``kubectl describe pod`` in the root should tell why a pod does not start (image pulls, probes,
OOM kills, the leaf scheduler's FailedScheduling): those Events are written in the leaf, about
the leaf copy. One :class:`EventReflector` per connected leaf (its reconciler owns it) keeps, in
order:

1. two informers on the leaf: its pods (the leaf reconciler's informer on all of them, or one of
   its own on our pods, label :data:`tree.identity.ROOT_LABEL` = this root's id) and Events about
   pods (``fieldSelector=involvedObject.kind=Pod``). The Events informer keeps a stub per Event
   (key, resourceVersion, the pod it is about: :class:`_EventStubs`); whole Events are kept only
   while they wait to be reflected (``_pending``), so memory follows the Events in flight, not
   every Event the leaf holds (kept an hour by its TTL, a few per pod);
2. a queue of leaf Events to look at, filled by both (an Event about a pod not listed yet waits
   for the pod, at most :attr:`EventReflector.POD_WAIT_S`: its arrival queues the Events about
   it; an Event dropped meanwhile is read again from the leaf then);
3. per Event, a worker thread: the leaf pod it is about must be ours (same UID when the Event names
   one); the root pod is the one whose UID the leaf pod's :data:`tree.identity.ROOT_UID_LABEL`
   carries, found by that UID in the pod sync's root pod informer or else read from the root by
   the name in :data:`tree.identity.ROOT_NAME_ANNOTATION` and checked by that UID (a root pod
   recreated under the same name gets none of its predecessor's Events); :func:`root_event`
   forges the root Event (a pure function), and the root is written only when it differs from
   what the root has:

   - its name is ``<root pod name>.<hash of the root id and the leaf Event's UID>``, so a
     restarted manager finds what it wrote (its create answers 409 AlreadyExists, then a GET by
     name; nothing is kept only in memory: the in-memory cache of what was written only spares
     requests) and two roots sharing a leaf write distinct Events;
   - ``involvedObject`` is the root pod (namespace, name, UID; ``fieldPath`` kept); ``source``
     and ``reportingComponent`` say ``kosmos-tree/<cluster>``, ``source.host`` and
     ``reportingInstance`` the leaf's; reason, message, type as the leaf says;
   - count, firstTimestamp, lastTimestamp follow the leaf's aggregation (a new-style leaf Event,
     ``eventTime`` and ``series``, becomes an old-style one: count = series.count or 1, first =
     eventTime, last = series.lastObservedTime or eventTime), so the root's validation never
     asks for the new style's reportingController/action; a later count or message is one
     merge patch of the root Event.

A failed write is retried with back-off (per Event); the first failure of a streak is logged, the
rest counted (``fabric_tree_events_reflected{result="failed"}``). Leaf Events deleted (their TTL)
are left in the root: the root's own TTL takes them. Nothing here deletes anything.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from scheduler.kube import MERGE_PATCH, Api, ApiError, Informer, object_key, resource_path
from tree import identity
from tree.metrics import TreeMetrics

_log = logging.getLogger(__name__)

Obj = dict[str, Any]

#: The root Event's annotations: the leaf Event it reflects (informative) and its UID.
LEAF_EVENT_ANNOTATION = "kosmos.io/leaf-event"
LEAF_EVENT_UID_ANNOTATION = "kosmos.io/leaf-event-uid"
CLUSTER_LABEL = "kosmos.io/cluster"
#: Fields of a root Event that follow the leaf's after it was created.
_UPDATED = ("count", "firstTimestamp", "lastTimestamp", "message", "type", "reason")
_MAX_NAME = 253
_HASH_LEN = 16


def event_name(root_pod_name: str, root_id: str, leaf_event_uid: str) -> str:
    """The root Event reflecting the leaf Event ``leaf_event_uid`` (stable across restarts)."""
    tail = "." + hashlib.sha256(f"{root_id}/{leaf_event_uid}".encode()).hexdigest()[:_HASH_LEN]
    return root_pod_name[: _MAX_NAME - len(tail)].rstrip(".-") + tail


def _seconds(ts: str | None) -> str | None:
    """An RFC 3339 time (maybe with a fraction, a MicroTime) as a whole-second metav1.Time."""
    if not ts:
        return None
    base = ts.split(".", 1)[0].rstrip("Z")
    return base + "Z" if len(base) == 19 else ts


def root_event(leaf_event: Obj, root_pod: Obj, cluster: str, root_id: str) -> Obj:
    """The root Event reflecting ``leaf_event`` onto ``root_pod`` (see the module's step 3)."""
    meta = leaf_event.get("metadata") or {}
    rmeta = root_pod.get("metadata") or {}
    io = leaf_event.get("involvedObject") or {}
    series = leaf_event.get("series") or {}
    count = int(leaf_event.get("count") or series.get("count") or 1)
    first = _seconds(leaf_event.get("firstTimestamp")) or _seconds(leaf_event.get("eventTime")) or \
        _seconds(meta.get("creationTimestamp"))
    last = _seconds(leaf_event.get("lastTimestamp")) or _seconds(series.get("lastObservedTime")) or first
    source = leaf_event.get("source") or {}
    host = str(source.get("host") or leaf_event.get("reportingInstance") or "")
    component = f"kosmos-tree/{cluster}"
    involved: Obj = {"kind": "Pod", "apiVersion": "v1", "namespace": rmeta.get("namespace"),
                     "name": rmeta.get("name"), "uid": rmeta.get("uid")}
    if io.get("fieldPath"):
        involved["fieldPath"] = io["fieldPath"]
    ev: Obj = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {
            "name": event_name(str(rmeta.get("name")), root_id, str(meta.get("uid"))),
            "namespace": rmeta.get("namespace"),
            "labels": {identity.MANAGED_BY_LABEL: identity.MANAGED_BY, CLUSTER_LABEL: cluster},
            "annotations": {LEAF_EVENT_ANNOTATION: f"{meta.get('namespace')}/{meta.get('name')}",
                            LEAF_EVENT_UID_ANNOTATION: str(meta.get("uid"))},
        },
        "involvedObject": involved,
        "reason": leaf_event.get("reason") or "",
        "message": leaf_event.get("message") or leaf_event.get("note") or "",
        "type": leaf_event.get("type") or "Normal",
        "count": count,
        "firstTimestamp": first,
        "lastTimestamp": last,
        "source": {"component": component, **({"host": host} if host else {})},
        "reportingComponent": component,
        "reportingInstance": host,
    }
    return ev


def _differs(want: Obj, have: Obj) -> Obj:
    """The fields of ``want`` that follow the leaf and differ in ``have`` (a merge patch body)."""
    return {k: want[k] for k in _UPDATED if want.get(k) is not None and have.get(k) != want[k]}


def _stub(ev: Obj) -> Obj:
    """What the Events informer keeps of an Event: its key and version (a re-list compares them)
    and the pod it is about (a deletion's handler reads it)."""
    meta = ev.get("metadata") or {}
    io = ev.get("involvedObject") or {}
    return {"metadata": {"namespace": meta.get("namespace"), "name": meta.get("name"),
                         "resourceVersion": meta.get("resourceVersion")},
            "involvedObject": {"namespace": io.get("namespace"), "name": io.get("name"), "uid": io.get("uid")}}


def _about_uid(ev: Obj) -> str | None:
    """The UID of the pod an Event (or its stub) is about, when it names one."""
    uid = (ev.get("involvedObject") or {}).get("uid")
    return str(uid) if uid else None


class _EventStubs(Informer):
    """The leaf's Events informer, storing a stub per Event (:func:`_stub`); its handlers still
    get the whole new Event (the old one is a stub)."""

    def _put(self, key: str, obj: Obj) -> None:
        super()._put(key, _stub(obj))


class EventReflector:
    """One leaf's Events about this root's pods, written to the root (see the module)."""

    #: Seconds between retries of a failed Event: doubled per failure, capped.
    RETRY_INITIAL, RETRY_MAX = 0.5, 30.0
    #: Root pods remembered (by root UID), and root Events (by name), before each cache is
    #: dropped and rebuilt (by GETs).
    CACHE_MAX = 5_000
    #: Seconds an Event about a pod not listed (yet) is kept for that pod to show.
    POD_WAIT_S = 60.0

    def __init__(self, root: Api, leaf: Api, root_id: str, cluster: str, *, timeout: float = 10.0,
                 metrics: TreeMetrics | None = None, clock: Callable[[], float] = time.monotonic,
                 pods: Informer | None = None, root_pods: Callable[[str], Obj | None] | None = None) -> None:
        """``pods``: an informer on the leaf's pods (ours at least) that its owner starts before
        this reflector and stops with it (the leaf reconciler's); None: one of our pods of its own.
        ``root_pods``: a root pod by UID as an informer holds it (the pod sync's
        :class:`tree.podsync.RootPods`), asked before the root is: a copy is made from that
        informer's pod, so it nearly always has it, and a GET per pod is spared."""
        self.root = root
        self.leaf = leaf
        self.root_id = root_id
        self.cluster = cluster
        self.timeout = timeout
        self.metrics = metrics
        self.clock = clock
        self._own_pods = pods is None
        self._root_pod_lookup = root_pods
        self.pods = pods if pods is not None else Informer(leaf, "v1", "pods",
                                                           label_selector=f"{identity.ROOT_LABEL}={root_id}")
        self.events: Informer = _EventStubs(leaf, "v1", "events", field_selector="involvedObject.kind=Pod")
        self.pods.add_handler(self._on_pod)
        self.events.add_handler(self._on_event)
        self._cond = threading.Condition()
        #: Leaf Event key -> when it is due.
        self._due: dict[str, float] = {}
        #: Leaf Event key -> (the Event, when it was first kept): those still to reflect.
        self._pending: dict[str, tuple[Obj, float]] = {}
        self._failures: dict[str, int] = {}
        #: (namespace, leaf pod name) -> keys of the leaf Events about it.
        self._about: dict[tuple[str, str], set[str]] = {}
        #: Root UID -> the root pod (metadata only) it was checked to be.
        self._root_pods: dict[str, Obj] = {}
        #: Root Event name -> the fields last written or read (spares a GET; rebuilt by GETs).
        self._written: dict[str, Obj] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The worker is handling Events taken off the queue.
        self._busy = False
        #: Root writes done (created + patched): progress for tests, not state.
        self.writes = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._own_pods:
            self.pods.start()
        self.events.start()
        self._thread = threading.Thread(target=self._run, name=f"tree-events-{self.cluster}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._own_pods:
            self.pods.stop()
        self.events.stop()
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def idle(self) -> bool:
        """Synced and nothing due (for tests: every Event seen was handled, or waits for its pod)."""
        with self._cond:
            now = self.clock()
            return (self.pods.synced.is_set() and self.events.synced.is_set() and not self._busy
                    and all(t > now for t in self._due.values()))

    def pending(self) -> int:
        """Whole Events kept (waiting to be reflected, or for their pod): the memory it holds."""
        with self._cond:
            return len(self._pending)

    # ------------------------------------------------------------------ informer handlers

    def _queue(self, keys: set[str] | list[str], delay: float = 0.0, *, earliest: bool = False) -> None:
        """Due after ``delay``; ``earliest``: unless already due sooner (a delay > 0 otherwise
        replaces an earlier time: a failure's back-off)."""
        due = self.clock() + delay
        with self._cond:
            for k in keys:
                self._due[k] = min(self._due.get(k, due), due) if delay == 0.0 or earliest else due
            self._cond.notify_all()

    def _on_event(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        ev = new or old or {}
        key = object_key(ev)
        io = ev.get("involvedObject") or {}
        about = (str(io.get("namespace") or ""), str(io.get("name") or ""))
        with self._cond:
            if etype == "DELETED":
                self._pending.pop(key, None)
                self._about.get(about, set()).discard(key)
                if not self._about.get(about):
                    self._about.pop(about, None)
                return
            since = self._pending[key][1] if key in self._pending else self.clock()
            self._pending[key] = (ev, since)
            self._about.setdefault(about, set()).add(key)
        self._queue([key])

    def _on_pod(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        if etype == "DELETED" or new is None:
            return
        if old is not None and (old.get("metadata") or {}).get("uid") == new["metadata"].get("uid"):
            return  # Events about it were looked at when it was first seen
        about = (str(new["metadata"].get("namespace") or ""), str(new["metadata"].get("name") or ""))
        uid = new["metadata"].get("uid")
        store = self.events.store
        with self._cond:
            # the Events about this pod, not those about earlier pods of its name (the leaf keeps
            # Events an hour; a name reused each minute would read them all again)
            keys = {k for k in self._about.get(about, ()) if _about_uid(store.get(k) or {}) in (None, uid)}
        if keys:
            self._queue(keys)

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                now = self.clock()
                ready = [k for k, t in self._due.items() if t <= now]
                if not ready:
                    wait = min(self._due.values(), default=now + 1.0) - now
                    self._cond.wait(max(0.01, min(wait, 1.0)))
                    continue
                for k in ready:
                    del self._due[k]
                self._busy = True
            try:
                for key in ready:
                    if self._stop.is_set():
                        return
                    self._handle(key)
            finally:
                with self._cond:
                    self._busy = False

    def _handle(self, key: str) -> None:
        try:
            self.reflect(key)
        except Exception as e:
            n = self._failures.get(key, 0) + 1
            self._failures[key] = n
            if self.metrics is not None:
                self.metrics.events_reflected.labels(self.cluster, "failed").inc()
            delay = min(self.RETRY_MAX, self.RETRY_INITIAL * 2 ** (n - 1))
            _log.log(logging.WARNING if n == 1 else logging.DEBUG,
                     "Cluster %s: reflecting leaf Event %s to the root failed (%s: %s); retrying in %.1f s",
                     self.cluster, key, type(e).__name__, e, delay)
            self._queue([key], delay)
        else:
            self._failures.pop(key, None)

    def _event(self, key: str) -> tuple[Obj, float] | None:
        """The whole Event ``key`` (kept, else read from the leaf when it still has it), and
        since when it is kept."""
        with self._cond:
            kept = self._pending.get(key)
        if kept is not None:
            return kept
        stub = self.events.store.get(key)
        if stub is None:
            return None  # gone from the leaf
        io = stub.get("involvedObject") or {}
        pod = self.pods.store.get(f"{io.get('namespace')}/{io.get('name')}")
        if pod is None or _about_uid(stub) not in (None, pod["metadata"].get("uid")):
            return None  # about no pod listed, or an earlier pod of that name: nothing to read again
        ns, _, name = key.rpartition("/")
        try:
            ev = self.leaf.request("GET", resource_path("v1", "events", ns or None, name), timeout=self.timeout)
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        with self._cond:
            kept = self._pending.setdefault(key, (ev, self.clock()))  # unless a newer one came meanwhile
        return kept

    def _done(self, key: str, ev: Obj) -> None:
        """Forget the whole Event ``key`` unless a newer version came meanwhile (queued again)."""
        with self._cond:
            kept = self._pending.get(key)
            if kept is not None and kept[0] is ev:
                del self._pending[key]

    def reflect(self, key: str) -> None:
        """Write the root Event of leaf Event ``key`` when the root's differs (module, step 3)."""
        kept = self._event(key)
        if kept is None:
            return
        ev, since = kept
        io = ev.get("involvedObject") or {}
        if io.get("kind") != "Pod":
            self._done(key, ev)
            return
        pod = self.pods.store.get(f"{io.get('namespace')}/{io.get('name')}")
        if pod is None:  # not listed yet: a pod listed later queues the Event again
            if self.clock() - since >= self.POD_WAIT_S:
                self._done(key, ev)  # read again from the leaf if its pod shows after all
            else:
                self._queue([key], self.POD_WAIT_S, earliest=True)
            return
        if io.get("uid") and pod["metadata"].get("uid") != io.get("uid"):
            self._done(key, ev)  # about an older pod of that name
            return
        who = identity.root_of(pod)
        if who is None or who[0] != self.root_id:
            self._done(key, ev)  # not ours
            return
        root_pod = self._root_pod(pod, who[1])
        if root_pod is None:
            self._done(key, ev)
            return
        want = root_event(ev, root_pod, self.cluster, self.root_id)
        name, ns = want["metadata"]["name"], want["metadata"]["namespace"]
        have = self._written.get(name)
        if have is None:
            # Create first: a new Event is the common case, and 409 AlreadyExists is how one this
            # root wrote before (a restarted manager) is found, then read and patched if it
            # differs. A GET first cost every new Event one more root request, a 404.
            try:
                have = self.root.request("POST", resource_path("v1", "events", ns), want, timeout=self.timeout)
                self._count("created")
            except ApiError as e:
                if e.status != 409:
                    raise
                have = self._get(ns, name)
                if have is None:
                    raise
        assert have is not None
        patch = _differs(want, have)
        if patch:
            try:
                have = self.root.request("PATCH", resource_path("v1", "events", ns, name), patch,
                                         ctype=MERGE_PATCH, timeout=self.timeout)
            except ApiError as e:
                if e.status == 404:  # deleted meanwhile: the retry creates it again
                    self._written.pop(name, None)
                raise
            self._count("updated")
        if len(self._written) >= self.CACHE_MAX:
            self._written.clear()
        self._written[name] = {k: (have or {}).get(k) for k in _UPDATED}
        self._done(key, ev)

    def _count(self, result: str) -> None:
        self.writes += 1
        if self.metrics is not None:
            self.metrics.events_reflected.labels(self.cluster, result).inc()

    def _get(self, ns: str, name: str) -> Obj | None:
        got: Obj | None = self.root.get_or_none(resource_path("v1", "events", ns, name), timeout=self.timeout)
        return got

    def _root_pod(self, leaf_pod: Obj, root_uid: str) -> Obj | None:
        """The root pod with UID ``root_uid`` (by the name the leaf pod's annotation gives,
        checked by UID), None when it is gone or another pod holds that name now."""
        known = self._root_pods.get(root_uid)
        if known is not None:
            return known
        held = self._root_pod_lookup(root_uid) if self._root_pod_lookup is not None else None
        if held is not None and str(held["metadata"].get("uid")) == root_uid:
            return self._keep_root_pod(held, root_uid)
        ref = str(((leaf_pod["metadata"].get("annotations") or {}).get(identity.ROOT_NAME_ANNOTATION)) or "")
        ns, _, name = ref.partition("/")
        if not name:
            ns, name = str(leaf_pod["metadata"].get("namespace")), ref
        if not name:
            return None
        pod = self.root.get_or_none(resource_path("v1", "pods", ns, name), timeout=self.timeout)
        if pod is None or str(pod["metadata"].get("uid")) != root_uid:
            return None
        return self._keep_root_pod(pod, root_uid)

    def _keep_root_pod(self, pod: Obj, root_uid: str) -> Obj:
        """Remember the root pod (its metadata's identity only) for the next Events about it."""
        if len(self._root_pods) > self.CACHE_MAX:
            self._root_pods.clear()
        meta = {"namespace": pod["metadata"].get("namespace"), "name": pod["metadata"].get("name"), "uid": root_uid}
        self._root_pods[root_uid] = {"metadata": meta}
        return self._root_pods[root_uid]
