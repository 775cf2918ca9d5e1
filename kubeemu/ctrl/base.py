"""The controller machinery of the lab's controller-manager: shared informers, a rate-limited
work queue and a reconcile loop, after client-go's (``tools/cache``, ``util/workqueue``).

The shape every lab controller follows, and why:

1. **Informers** list a resource, then watch from the list's resourceVersion, keeping a local
   cache of every object. On a 410 or a dropped stream they re-list and emit synthetic events
   for what changed meanwhile (a DELETED for objects that vanished), so handlers never miss a
   deletion. One informer per resource is shared by all controllers (:class:`Informers`).
2. **Handlers** only map an event to keys (the object's own key, or its owner's) and enqueue
   them. They never call the API: the cache may be behind the server, and work is done once per
   key no matter how many events arrived (the queue de-duplicates).
3. **Reconcile** reads the desired state from the cache, compares with what exists and writes
   the difference. It must be idempotent: a restarted controller-manager reconciles every key
   again and must create nothing twice (so controllers derive names deterministically or count
   what the cache holds, plus "expectations" for their own in-flight creates).
4. **Errors**: an API error (conflict, not found, server down) requeues the key with
   exponential back-off (5 ms doubling to 1000 s, as client-go's default rate limiter); a spec
   the API server would have refused, found while reading it, is a user error
   (:meth:`Controller.invalid_spec`: a Warning Event, no retry); any other exception is a bug and
   propagates: the process exits and the lab restarts it into a clean re-list, as DESIGN.md asks.
5. **Events** (:func:`record_event`) tell what a controller did or could not do, as upstream's
   event recorder; a failed post never fails a reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from kubeemu import selectors
from kubeemu.client import ApiStatusError, Client, Obj, object_key, resource_path
from kubeemu.objects import now_rfc3339

_log = logging.getLogger(__name__)

#: ``(event type, old object or None, new object or None)``; ADDED/MODIFIED/DELETED.
Handler = Callable[[str, Obj | None, Obj | None], None]


class Informer:
    """List+watch of one resource (all namespaces) with a local cache and event handlers."""

    def __init__(self, client: Client, api_version: str, plural: str, resync_backoff: float = 0.5) -> None:
        self.client = client
        self.api_version, self.plural = api_version, plural
        self.path = resource_path(api_version, plural)
        self.cache: dict[str, Obj] = {}
        self.synced = asyncio.Event()
        self._handlers: list[Handler] = []
        self._backoff = resync_backoff

    def __repr__(self) -> str:
        return f"Informer({self.api_version} {self.plural})"

    def add_handler(self, handler: Handler) -> None:
        """Called for every change; on registration after sync, it also sees the cache as ADDED."""
        self._handlers.append(handler)
        if self.synced.is_set():
            for obj in list(self.cache.values()):
                handler("ADDED", None, obj)

    def get(self, key: str) -> Obj | None:
        return self.cache.get(key)

    def list(self, namespace: str | None = None, selector: dict[str, Any] | None = None) -> list[Obj]:
        """Cached objects of ``namespace`` (all when None) matching a LabelSelector dict
        (``matchLabels``/``matchExpressions``; None matches everything)."""
        out = []
        for obj in self.cache.values():
            meta = obj["metadata"]
            if namespace is not None and meta.get("namespace") != namespace:
                continue
            if selector is not None and not selectors.label_selector_matches(selector, meta.get("labels") or {}):
                continue
            out.append(obj)
        return out

    def _emit(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        for h in self._handlers:
            h(etype, old, new)

    def _apply(self, etype: str, obj: Obj) -> None:
        key = object_key(obj)
        old = self.cache.get(key)
        if etype == "DELETED":
            self.cache.pop(key, None)
            self._emit("DELETED", old, obj)
        else:
            self.cache[key] = obj
            self._emit("MODIFIED" if old is not None else "ADDED", old, obj)

    async def _relist(self) -> str:
        lst = await self.client.get(self.path)
        seen: set[str] = set()
        list_kind = str(lst.get("kind") or "")
        for obj in lst.get("items") or []:
            # list items carry neither apiVersion nor kind; owner references need both
            obj.setdefault("apiVersion", self.api_version)
            if list_kind.endswith("List"):
                obj.setdefault("kind", list_kind[:-4])
            key = object_key(obj)
            seen.add(key)
            old = self.cache.get(key)
            if old is None or old["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self._apply("MODIFIED" if old else "ADDED", obj)
        for key in [k for k in self.cache if k not in seen]:
            self._apply("DELETED", self.cache[key])
        self.synced.set()
        return str(lst["metadata"]["resourceVersion"])

    async def run(self) -> None:
        """List, then watch until cancelled, re-listing after 410 or any connection problem."""
        rv = ""
        while True:
            try:
                if not rv:
                    rv = await self._relist()
                async for etype, obj in self.client.watch(self.path, rv):
                    rv = str(obj["metadata"].get("resourceVersion") or rv)
                    if etype != "BOOKMARK":
                        self._apply(etype, obj)
            except ApiStatusError as e:
                if not e.gone:
                    _log.warning("%r: %s; re-listing", self, e)
                    await asyncio.sleep(self._backoff)
                rv = ""
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
                _log.warning("%r: %s; re-listing", self, e or type(e).__name__)
                rv = ""
                await asyncio.sleep(self._backoff)


class Informers:
    """The shared informer factory: one :class:`Informer` per resource, started together."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._informers: dict[tuple[str, str], Informer] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def get(self, api_version: str, plural: str) -> Informer:
        key = (api_version, plural)
        if key not in self._informers:
            inf = Informer(self.client, api_version, plural)
            self._informers[key] = inf
            if self._tasks:  # requested after start: start it now
                self._tasks.append(asyncio.create_task(inf.run(), name=repr(inf)))
        return self._informers[key]

    def start(self) -> None:
        for inf in self._informers.values():
            self._tasks.append(asyncio.create_task(inf.run(), name=repr(inf)))

    async def wait_synced(self) -> None:
        await asyncio.gather(*(inf.synced.wait() for inf in self._informers.values()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()


class WorkQueue:
    """De-duplicating key queue with per-key exponential back-off (client-go's
    ``ItemExponentialFailureRateLimiter``: 5 ms * 2^failures, capped at 1000 s).

    A key being processed is never handed to a second worker; if it is added meanwhile it is
    processed again once the first pass ends (client-go's dirty/processing sets)."""

    BASE_DELAY = 0.005
    MAX_DELAY = 1000.0

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._failures: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def add(self, key: str) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.put_nowait(key)

    def add_after(self, key: str, delay: float) -> None:
        """Add ``key`` after ``delay`` seconds (a later call with a shorter delay wins)."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        old = self._timers.get(key)
        when = loop.time() + delay
        if old is not None:
            if old.when() <= when:
                return
            old.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def add_rate_limited(self, key: str) -> None:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        self.add_after(key, min(self.BASE_DELAY * (2**n), self.MAX_DELAY))

    def forget(self, key: str) -> None:
        """The key succeeded: its back-off starts over."""
        self._failures.pop(key, None)

    async def get(self) -> str:
        key = await self._queue.get()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.put_nowait(key)

    def __len__(self) -> int:
        return len(self._dirty)


class Controller:
    """One reconciler: subclasses set ``name``, register handlers in ``__init__`` and implement
    :meth:`reconcile`. Keys are ``namespace/name`` (or ``name``) of the primary resource."""

    name = "controller"
    workers = 1

    def __init__(self, client: Client, informers: Informers) -> None:
        self.client = client
        self.informers = informers
        self.queue = WorkQueue()

    def enqueue(self, obj: Obj | None) -> None:
        if obj is not None:
            self.queue.add(object_key(obj))

    def enqueue_owner(self, obj: Obj | None, owner_kind: str) -> None:
        """Enqueue the controller owner of ``obj`` if it is of ``owner_kind`` (same namespace)."""
        if obj is None:
            return
        ref = controller_ref(obj)
        if ref is not None and ref.get("kind") == owner_kind:
            ns = obj["metadata"].get("namespace")
            self.queue.add(f"{ns}/{ref['name']}" if ns else str(ref["name"]))

    async def reconcile(self, key: str) -> None:
        raise NotImplementedError

    async def invalid_spec(self, key: str, obj: Obj | None, error: ValueError, component: str) -> None:
        """``obj`` (``key``; None once gone) has a spec the API server would have refused (a
        ``maxSurge`` of ``"5"``), which the controller found reading it (a ValueError): a user error,
        not a bug. Logged and reported as a Warning ``InvalidSpec`` Event on the object; there is
        nothing to retry until the spec changes, which enqueues the key again."""
        _log.error("%s %s: invalid spec: %s", self.name, key, error)
        if obj is not None:
            await record_event(self.client, obj, "Warning", "InvalidSpec", str(error), component)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self.reconcile(key)
            except (ApiStatusError, aiohttp.ClientError, TimeoutError, ConnectionError) as e:
                _log.info("%s %s: %s; retrying", self.name, key, e)
                self.queue.add_rate_limited(key)
            else:
                self.queue.forget(key)
            finally:
                self.queue.done(key)

    async def run(self) -> None:
        """Wait for the caches, then process keys until cancelled (bugs propagate)."""
        await self.informers.wait_synced()
        _log.info("%s: caches synced, %d keys queued", self.name, len(self.queue))
        await asyncio.gather(*(self._worker() for _ in range(self.workers)))


def controller_ref(obj: Obj) -> dict[str, Any] | None:
    """The ownerReference with ``controller: true``, if any (``metav1.GetControllerOf``)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def owner_key(obj: Obj, kind: str, owners: Informer) -> str | None:
    """The key of the ``kind`` object in ``owners``' cache that controls ``obj`` (same namespace),
    or None: no such controller reference, or the cached object of that name is another one (its
    uid differs: the owner was deleted and re-created). Upstream's ``resolveControllerRef``."""
    ref = controller_ref(obj)
    if ref is None or ref.get("kind") != kind:
        return None
    key = f"{obj['metadata'].get('namespace')}/{ref['name']}"
    owner = owners.get(key)
    return key if owner is not None and owner["metadata"].get("uid") == ref.get("uid") else None


def owner_reference(owner: Obj, block: bool = True) -> dict[str, Any]:
    """A controller ownerReference to ``owner`` (``metav1.NewControllerRef``)."""
    meta = owner["metadata"]
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": block}


def is_owned_by(obj: Obj, owner: Obj) -> bool:
    ref = controller_ref(obj)
    return ref is not None and ref.get("uid") == owner["metadata"].get("uid")


async def record_event(client: Client, obj: Obj, etype: str, reason: str, message: str, component: str) -> None:
    """Post a core/v1 Event about ``obj`` (what ``kubectl describe`` lists), as upstream's
    event recorder does: named ``<object>.<hex nanoseconds>``, source = the controller. A failed
    post is logged and dropped: events never fail a reconcile."""
    meta = obj["metadata"]
    ns = meta.get("namespace") or "default"
    t = now_rfc3339()
    body = {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": ns},
            "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "namespace": ns,
                               "name": meta["name"], "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": reason, "message": message, "type": etype, "source": {"component": component},
            "firstTimestamp": t, "lastTimestamp": t, "count": 1, "reportingComponent": component,
            "reportingInstance": ""}
    try:
        await client.create(resource_path("v1", "events", ns), body)
    except (ApiStatusError, aiohttp.ClientError, OSError) as e:
        _log.debug("event %s for %s dropped: %s", reason, object_key(obj), e)


def all_keys(objs: Iterable[Obj]) -> list[str]:
    return [object_key(o) for o in objs]
