"""A root pod's dependencies in one leaf: ConfigMaps, Secrets, its ServiceAccount and PVCs copied
into the leaf before the leaf pod is made, kept up to date, and collected when no pod of ours
uses them; the PVs the leaf provisions for those PVCs mirrored into the root.

One :class:`Dependencies` per leaf cluster (the pod syncer owns it). Objects, and the order they
are written in:

1. :meth:`Dependencies.ensure` (called by the pod syncer before it creates a leaf pod): for every
   object the root pod names (:func:`tree.deps_refs.references`), read the root object (a GET,
   never the informers' store, which may lag a delete-and-recreate), then find its leaf copy by
   the root UID label only (:func:`tree.identity.selector`; a ConfigMap many pods share is ONE
   copy), update it if it differs, or create it under :func:`tree.identity.leaf_name` (the root name, or
   ``<name>-<hash>`` when a leaf user's or another root's object holds it). The root's
   ``kube-root-ca.crt`` arrives as ``master-root-ca.crt``; the root's ``default`` ServiceAccount
   is always renamed (``default-<hash>``: the leaf's own ``default`` is its ServiceAccount
   controller's, and leaf users' pods would lose their tokens if ours held and released the
   name). The leaf names that differ from the root names come back as renames, which the pod
   syncer rewrites in the leaf pod (:func:`tree.deps_refs.rename`). A missing
   non-optional object, a legacy service-account token Secret, a terminating PVC or a PVC bound
   to a volume outside this leaf raise :class:`DependencyError` naming it (the pod waits, as a
   kubelet waits with ``CreateContainerConfigError``). PVCs get no copy of the root's binder
   annotations or ``volumeName``: the leaf provisions them (storage class kept).
2. Propagation (a worker thread fed by informers): a root ConfigMap, Secret or ServiceAccount
   that changes, or a leaf copy someone else edits, is rewritten to what the root says within a
   second or so. Only objects that have a leaf copy are written. Every ``resync_period`` all copies are
   compared again (a missed event costs one period, never correctness).
3. PVCs (same worker, on events of the root PVC, the leaf copy and the leaf PV): a larger root
   request is patched down (the leaf's expansion does the rest); once the leaf PVC is Bound, its
   PV is mirrored into the root (:func:`tree.deps_refs.mirror_pv`: its volume source and
   capacity, ``claimRef`` to the root PVC by name and UID, required node affinity
   ``kubernetes.io/hostname`` In the virtual node -- the node the leaf PVC was first used from
   in cluster and party modes, the leaf PV's own nodes in node mode, where virtual node names are
   leaf node names), the mirror's phase set Bound, the root PVC bound to it (``volumeName`` set
   once, as the binder does) and its status made the leaf PVC's (phase, capacity, conditions of
   an expansion). A root PVC that is gone (or recreated: another UID) deletes its leaf copy by
   UID, and its mirror by the leaf PV's reclaim policy: Delete deletes it, Retain leaves it
   Released. Every PVC and PV patch carries the uid of the object it was computed from
   (:meth:`Dependencies._patch`): one recreated under the same name meanwhile is not written.
   The scheduler keeps a pod whose PVC is mirrored from leaf A off other leaves (the mirror's
   node affinity); :meth:`ensure` refuses it anyway (Kosmos issue #641: a PVC-bound pod
   rescheduled onto another leaf got an empty new volume there).
4. :meth:`Dependencies.release` (the pod syncer, after its pass): ConfigMap, Secret and
   ServiceAccount copies of ours that no leaf pod of ours names any more are deleted (with a
   UID precondition: a leaf user's object of the same name is never touched). A copy
   :meth:`ensure` handed out in the last ``pin_seconds`` is kept, so a pod about to be created
   does not lose its dependencies to a pass that did not see it yet. PVC copies are never
   released: they hold data and live exactly as long as the root PVC.

Service-account tokens. Kosmos turns every projected service-account token of a pod into a
Secret projection of a token Secret copied from the root (the SA's legacy
``kubernetes.io/service-account-token`` Secret, or one it creates, ``kosmos-<sa>-token``, on
Kubernetes 1.24 and later): a non-expiring root credential stored in the leaf, valid for as long
as the root SA lives, readable by anyone who may read Secrets in the leaf. We do not: the
ServiceAccount is created in the leaf (a copy named as above, without the root's ``secrets``),
and the leaf pod keeps its ``serviceAccountToken`` projection, so the leaf's own kubelet asks the
leaf's API for a bound token (TokenRequest, bound to the leaf pod, expiring, rotated by the
kubelet at 80% of its life), upstream's semantics. No token is ever copied, so there is nothing
to refresh; legacy token Secrets a pod names are refused (:class:`DependencyError`). That token
is for the leaf's API server, which the leaf's kubelet points the pod at
(``KUBERNETES_SERVICE_HOST``), so the CA beside it in the ``kube-api-access-*`` projection stays
the leaf's own ``kube-root-ca.crt``: :func:`tree.deps_refs.references` does not count it, so no
rename is returned for it (Kosmos renames it there too, pairing the root's CA with the root token
it copied). A pod that names ``kube-root-ca.crt`` anywhere else wants the root's CA, and gets
``master-root-ca.crt``.

Informers. The root's ConfigMaps, Secrets, ServiceAccounts and PVCs are watched once per
manager (:class:`RootObjects`, shared by every leaf's :class:`Dependencies`, each subscribed to
their changes while it runs); a :class:`Dependencies` made without one watches them itself.
The leaf's copies, PVs and the root's PV mirrors of its Cluster are its own.

Ownership: every leaf copy carries :func:`tree.identity.ownership`; root PV mirrors carry
``kosmos.io/cluster=<cluster>`` and ``kosmos.io/leaf-pv-uid=<leaf PV UID>`` and are found by
them. Nothing here lives only in memory except the pins and the work queue, which the next
resync rebuilds from the API objects; a restarted instance finds every copy by UID.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from scheduler.kube import Api, ApiError, Informer, resource_path
from tree import identity
from tree.deps_refs import (
    CONFIGMAPS,
    KINDS,
    MIRROR_CLUSTER_LABEL,
    MIRROR_UID_LABEL,
    NAME_MAX,
    PVCS,
    RELEASED,
    ROOT_NODE_ANNOTATION,
    SA_TOKEN_TYPE,
    SECRETS,
    SERVICEACCOUNTS,
    Ref,
    base_name,
    copy_differs,
    desired_copy,
    mirror_differs,
    mirror_pv,
    names_used,
    pv_hostnames,
    references,
    storage,
)
from tree.metrics import TreeMetrics

_log = logging.getLogger(__name__)

Obj = dict[str, Any]
#: A work item of the worker: (plural, root UID).
Key = tuple[str, str]

PVS = "persistentvolumes"
#: Root PVC status fields taken from the leaf PVC.
_PVC_STATUS = ("phase", "accessModes", "capacity", "conditions", "allocatedResources",
               "allocatedResourceStatuses")
#: Modes of :mod:`tree.spec` (a string here, so the pod syncer may pass ``spec.mode``).
NODE_MODE = "node"


class DependencyError(Exception):
    """An object a root pod needs that is missing in the root or may not be copied to the leaf;
    the message names each (``Kind namespace/name``) and why."""


def _meta(obj: Obj) -> Obj:
    meta: Obj = obj.get("metadata") or {}
    return meta


def _uid(obj: Obj) -> str:
    return str(_meta(obj).get("uid") or "")


#: A subscriber of :class:`RootObjects`: (plural, event type, old, new).
RootHandler = Callable[[str, str, "Obj | None", "Obj | None"], None]


class _Read:
    """One GET of :class:`FreshReads`: its answer (or error), once ``done`` is set."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Obj | None = None
        self.error: Exception | None = None


class FreshReads:
    """GETs of root objects, coalesced without going stale: a caller gets the answer of a GET
    that was sent *after* it asked, so it sees every change made before it asked (a
    delete-and-recreate included), exactly as with a GET of its own.

    Per object at most one GET is in flight and one gathers callers: the first caller that finds
    none gathering opens one and sends it once the GET in flight (if any) has answered; every
    caller arriving meanwhile waits for that same answer. A burst of pod creates naming the same
    ServiceAccount or ConfigMap (every leaf's workers at once) costs about two GETs per round
    trip instead of one per pod, on the root API server every create also goes through."""

    def __init__(self, get: Callable[[str, str | None, str], Obj | None]) -> None:
        self._get = get
        self._lock = threading.Lock()
        #: key -> [the read gathering callers (not sent yet) or None, the read in flight or None]
        self._state: dict[tuple[str, str | None, str], list[_Read | None]] = {}

    def get(self, plural: str, ns: str | None, name: str) -> Obj | None:
        """The object as the root has it now (None: there is none); the GET's errors raise."""
        key = (plural, ns, name)
        with self._lock:
            st = self._state.setdefault(key, [None, None])
            read, sender = st[0], st[0] is None
            if read is None:
                read = st[0] = _Read()
            in_flight = st[1]
        if not sender:
            read.done.wait()
            return self._answer(read)
        if in_flight is not None:
            in_flight.done.wait()  # bounded: that GET has its timeout
        with self._lock:
            st[0], st[1] = None, read  # callers from now on gather for the next GET
        try:
            read.value = self._get(plural, ns, name)
        except Exception as e:
            read.error = e
        finally:
            with self._lock:
                if st[1] is read:
                    st[1] = None
                if st[0] is None and st[1] is None and self._state.get(key) is st:
                    del self._state[key]
            read.done.set()
        return self._answer(read)

    @staticmethod
    def _answer(read: _Read) -> Obj | None:
        if read.error is not None:
            raise read.error
        return read.value


class RootObjects:
    """The root objects pods refer to (ConfigMaps, Secrets, ServiceAccounts, PVCs): one informer
    each for the whole manager; every leaf's :class:`Dependencies` reads their stores (by key)
    and hears their changes while subscribed, and reads them afresh through one
    :class:`FreshReads` (``reads``), so the leaves' GETs of one object coalesce."""

    PLURALS = (CONFIGMAPS, SECRETS, SERVICEACCOUNTS, PVCS)

    def __init__(self, root: Api, timeout: float = 30.0) -> None:
        self.informers = {p: Informer(root, "v1", p) for p in self.PLURALS}
        self.reads = FreshReads(lambda plural, ns, name: root.get_or_none(resource_path("v1", plural, ns, name),
                                                                          timeout=timeout))
        self._lock = threading.Lock()
        self._subscribers: list[RootHandler] = []
        for p, inf in self.informers.items():
            inf.add_handler(self._fan_out(p))

    def _fan_out(self, plural: str) -> Callable[[str, Obj | None, Obj | None], None]:
        def handler(kind: str, old: Obj | None, new: Obj | None) -> None:
            for fn in self._subscribers:  # replaced, never mutated: no lock to read it
                fn(plural, kind, old, new)
        return handler

    def subscribe(self, fn: RootHandler) -> None:
        with self._lock:
            self._subscribers = [*self._subscribers, fn]

    def unsubscribe(self, fn: RootHandler) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s != fn]  # == : bound methods are made anew

    def start(self) -> None:
        for inf in self.informers.values():
            inf.start()

    def stop(self) -> None:
        for inf in self.informers.values():
            inf.stop()


class Dependencies:
    """The dependencies of the root pods one leaf runs (see the module's steps)."""

    def __init__(self, root: Api, leaf: Api, *, root_id: str, cluster: str, timeout: float,
                 mode: str = "cluster", metrics: TreeMetrics | None = None, resync_period: float = 30.0,
                 pin_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 root_objects: RootObjects | None = None) -> None:
        """``mode``: the Cluster's leaf mode (``cluster``, ``node``, ``party``; the PV mirrors'
        node affinity depends on it). ``timeout``: seconds any one request may take.
        ``pin_seconds``: how long a copy :meth:`ensure` handed out is safe from :meth:`release`.
        ``root_objects``: the manager's shared root informers (started and stopped by it); None:
        this instance runs its own."""
        self.root = root
        self.leaf = leaf
        self.root_id = root_id
        self.cluster = cluster
        self.timeout = timeout
        self.mode = mode
        self.metrics = metrics or TreeMetrics()
        self.resync_period = resync_period
        self.pin_seconds = pin_seconds
        self.clock = clock
        ours = f"{identity.ROOT_LABEL}={root_id}"
        self._own_root = root_objects is None
        self._root_objects = root_objects if root_objects is not None else RootObjects(root, timeout)
        self._root_inf = self._root_objects.informers
        self._mirrors = Informer(root, "v1", PVS, label_selector=f"{MIRROR_CLUSTER_LABEL}={cluster}",
                                 copy_on_write=True)
        self._leaf_inf = {p: Informer(leaf, "v1", p, label_selector=ours, copy_on_write=True)
                          for p in (CONFIGMAPS, SECRETS, SERVICEACCOUNTS, PVCS)}
        self._leaf_pvs = Informer(leaf, "v1", PVS)
        #: Guards the index below (held for dict operations only).
        self._lock = threading.Lock()
        #: Orders ensure's pins against release's deletions (held across a release's DELETE, so
        #: an ensure that pins after the check waits for the copy to be gone and makes a new one).
        self._pin_lock = threading.Lock()
        #: plural -> root UID -> leaf UID -> leaf copy: the leaf informers' stores indexed by the
        #: root UID label (kept by their handlers, under ``_lock``).
        self._by_uid: dict[str, dict[str, dict[str, Obj]]] = {p: {} for p in self._leaf_inf}
        #: (leaf namespace, plural, root UID) -> when ensure last handed the copy out.
        self._pins: dict[tuple[str, str, str], float] = {}
        #: Leaf UIDs of copies release deleted whose DELETED event has not come yet.
        self._deleted: set[str] = set()
        self._cond = threading.Condition()
        #: Work: key -> when it is due (failures wait a back-off).
        self._queue: dict[Key, float] = {}
        self._failures: dict[Key, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._root_objects.subscribe(self._on_root)
        for p, inf in self._leaf_inf.items():
            inf.add_handler(self._on_leaf_copy(p))
        self._leaf_pvs.add_handler(self._on_leaf_pv)
        self._mirrors.add_handler(self._on_mirror)
        for inf in self._own_informers():
            inf.start()
        self._thread = threading.Thread(target=self._run, name=f"deps-{self.cluster}", daemon=True)
        self._thread.start()
        self._started = True

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._root_objects.unsubscribe(self._on_root)
        for inf in self._own_informers():
            inf.stop()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)

    def wait_synced(self, timeout: float) -> bool:
        """True once every informer has listed (tests; ``ensure`` works before, with LISTs)."""
        deadline = time.monotonic() + timeout
        return all(inf.synced.wait(max(0.0, deadline - time.monotonic())) for inf in self._informers())

    def _informers(self) -> list[Informer]:
        return [*self._root_inf.values(), self._mirrors, *self._leaf_inf.values(), self._leaf_pvs]

    def _own_informers(self) -> list[Informer]:
        """The informers this instance starts and stops (the shared root ones are the manager's)."""
        return [i for i in self._informers() if self._own_root or i not in self._root_inf.values()]

    # ------------------------------------------------------------------ ensure

    def ensure(self, root_pod: Obj, leaf_namespace: str) -> dict[tuple[str, str], str]:
        """Create or update in the leaf every object ``root_pod`` names (the module's step 1);
        return ``{(plural, root name): leaf name}`` for those whose leaf name differs.

        Raises :class:`DependencyError` naming every missing or refused object (after copying
        all the others), :class:`scheduler.kube.ApiError` when the leaf or root fails a request."""
        ns = str(_meta(root_pod).get("namespace") or "default")
        pod_name = f"{ns}/{_meta(root_pod).get('name')}"
        wanted: dict[tuple[str, str], Ref] = {}
        for ref in references(root_pod):
            prev = wanted.get((ref.plural, ref.name))
            if prev is None or (prev.optional and not ref.optional):
                wanted[(ref.plural, ref.name)] = ref
        renames: dict[tuple[str, str], str] = {}
        problems: list[str] = []
        node = str((root_pod.get("spec") or {}).get("nodeName") or "")
        for (plural, name), ref in wanted.items():
            try:
                leaf_name = self._ensure_one(ref, ns, leaf_namespace, node)
            except DependencyError as e:
                problems.append(f"{e} (named by {ref.where} of pod {pod_name})")
                continue
            except ApiError as e:
                self._error(plural, e.reason or str(e.status))
                raise
            if leaf_name is not None and leaf_name != name:
                renames[(plural, name)] = leaf_name
        if problems:
            raise DependencyError("; ".join(problems))
        return renames

    def _ensure_one(self, ref: Ref, ns: str, leaf_ns: str, node: str) -> str | None:
        plural, name = ref.plural, ref.name
        what = f"{KINDS[plural]} {ns}/{name}"
        # The root itself, not the informer's store: a store that has not seen a delete-and-recreate
        # yet would hand out the old object's copy, and nothing would ever move the pod off it (its
        # leaf spec names that copy; the new object's events find no copy of theirs to update).
        root_obj = self._root_objects.reads.get(plural, ns, name)  # a GET sent after we asked (FreshReads)
        if root_obj is None:
            if ref.optional:
                return None
            self._error(plural, "missing")
            raise DependencyError(f"{what}: not found in the root cluster")
        self._refuse(plural, what, root_obj)
        uid = _uid(root_obj)
        with self._pin_lock:
            self._pins[(leaf_ns, plural, uid)] = self.clock()
        base = base_name(plural, name)
        copy = self._find_copy(plural, leaf_ns, uid)
        for _ in range(4):
            if copy is not None:
                leaf_name = str(_meta(copy)["name"])
                if plural != PVCS:  # a PVC's resize waits for its leaf binding: the worker's (step 3)
                    self._update(plural, self._desired(plural, root_obj, leaf_name, leaf_ns, node), copy)
                return leaf_name
            occupant = self._get(self.leaf, plural, leaf_ns, base)
            if occupant is not None and identity.is_copy_of(occupant, self.root_id, uid):
                if _meta(occupant).get("deletionTimestamp"):
                    self._error(plural, "terminating")
                    raise DependencyError(f"{what}: its leaf copy {leaf_ns}/{base} is still being deleted")
                copy = occupant
                continue
            # A leaf's "default" ServiceAccount belongs to its ServiceAccount controller: our copy
            # never takes that name (a leaf user's pods would lose it with our release).
            held = occupant if not (plural == SERVICEACCOUNTS and base == "default") else {"metadata": {}}
            leaf_name = identity.leaf_name(base, self.root_id, uid, held, max_len=NAME_MAX)
            if leaf_name != base:
                other = self._get(self.leaf, plural, leaf_ns, leaf_name)
                if other is not None:
                    if identity.is_copy_of(other, self.root_id, uid):
                        copy = other
                        continue
                    self._error(plural, "refused")
                    raise DependencyError(f"{what}: both {base} and {leaf_name} are taken in leaf namespace "
                                          f"{leaf_ns} by objects that are not its copy")
            body = self._desired(plural, root_obj, leaf_name, leaf_ns, node)
            try:
                self._create(plural, leaf_ns, body)
            except ApiError as e:
                if e.status == 409:  # made meanwhile (by another pod's ensure, or someone else): look again
                    copy = self._find_copy(plural, leaf_ns, uid, fresh=True)
                    continue
                if e.status == 404 and "namespace" in e.message.lower():
                    self._create_namespace(leaf_ns)
                    continue
                raise
            if plural == PVCS:
                self._enqueue((PVCS, uid))
            return leaf_name
        self._error(plural, "conflict")
        raise DependencyError(f"{what}: its leaf copy kept changing under us in leaf namespace {leaf_ns}")

    def _refuse(self, plural: str, what: str, root_obj: Obj) -> None:
        """Raise for a root object that exists but may not go to this leaf."""
        why = ""
        if plural == SECRETS and root_obj.get("type") == SA_TOKEN_TYPE:
            why = ("is a legacy service-account token Secret (a non-expiring root credential); it is never "
                   "copied to a leaf: use a projected serviceAccountToken volume, the leaf's kubelet mounts "
                   "a bound, expiring token of the leaf's copy of the ServiceAccount")
        elif plural == PVCS and _meta(root_obj).get("deletionTimestamp"):
            why = "is being deleted"
        elif plural == PVCS and (volume := (root_obj.get("spec") or {}).get("volumeName")):
            pv = self._mirrors.store.get(str(volume)) or self._get(self.root, PVS, None, str(volume))
            if pv is None:
                why = f"is bound to PersistentVolume {volume}, which is missing in the root"
            elif (_meta(pv).get("labels") or {}).get(MIRROR_CLUSTER_LABEL) != self.cluster or \
                    not (_meta(pv).get("labels") or {}).get(MIRROR_UID_LABEL):
                why = (f"is bound to PersistentVolume {volume}, which is not a volume of leaf cluster "
                       f"{self.cluster} (its data cannot be reached from there)")
        if why:
            self._error(plural, "refused")
            raise DependencyError(f"{what}: {why}")

    def _desired(self, plural: str, root_obj: Obj, leaf_name: str, leaf_ns: str, node: str) -> Obj:
        if plural != PVCS:
            return desired_copy(plural, root_obj, self.root_id, leaf_name, leaf_ns)
        return desired_copy(plural, root_obj, self.root_id, leaf_name, leaf_ns, root_node=node,
                            selected_node=node if self.mode == NODE_MODE else "")

    # ------------------------------------------------------------------ release

    def release(self, leaf_pods_of_ours: Iterable[Obj]) -> None:
        """Delete ConfigMap, Secret and ServiceAccount copies of ours that none of
        ``leaf_pods_of_ours`` (every leaf pod of this root, terminating ones included) names,
        unless :meth:`ensure` handed them out in the last ``pin_seconds`` (the module's step 4)."""
        used: set[tuple[str, str, str]] = set()
        for pod in leaf_pods_of_ours:
            ns = str(_meta(pod).get("namespace") or "")
            used.update((ns, plural, name) for plural, name in names_used(pod))
        failed = 0
        for plural in RELEASED:
            for copy in self._copies(plural):
                meta = _meta(copy)
                ns, name = str(meta.get("namespace")), str(meta.get("name"))
                root = identity.root_of(copy)
                if (ns, plural, name) in used or root is None or root[0] != self.root_id:
                    continue
                with self._pin_lock:
                    pinned = self._pins.get((ns, plural, root[1]))
                    if pinned is not None and self.clock() - pinned < self.pin_seconds:
                        continue
                    self._pins.pop((ns, plural, root[1]), None)
                    self._deleted.add(_uid(copy))  # until its DELETED event: ensure must not hand it out
                    try:
                        self._delete(self.leaf, plural, ns, name, _uid(copy))
                    except ApiError as e:
                        self._deleted.discard(_uid(copy))
                        self._error(plural, e.reason or str(e.status))
                        failed += 1
                        if failed == 1:  # the first; the rest are counted (a leaf that is down fails them all)
                            _log.warning("Cluster %s: releasing %s %s/%s failed: %s", self.cluster, KINDS[plural],
                                         ns, name, e)
        if failed > 1:
            _log.warning("Cluster %s: releasing %d more copies failed; retried on the next call", self.cluster,
                         failed - 1)

    def _copies(self, plural: str) -> list[Obj]:
        inf = self._leaf_inf[plural]
        if self._started and inf.synced.is_set():
            return [o for o in inf.store.values() if _uid(o) not in self._deleted]
        doc = self.leaf.request("GET", resource_path("v1", plural), query={"labelSelector": inf.label_selector},
                                timeout=self.timeout)
        return list(doc.get("items") or [])

    # ------------------------------------------------------------------ reads

    def _root_get(self, plural: str, ns: str, name: str) -> Obj | None:
        inf = self._root_inf.get(plural)
        if inf is not None and (obj := inf.store.get(f"{ns}/{name}")) is not None:
            return obj
        return self._get(self.root, plural, ns, name)

    def _get(self, api: Api, plural: str, ns: str | None, name: str) -> Obj | None:
        """The core object ``plural`` ``ns``/``name`` as ``api`` has it now (None: there is none)."""
        got: Obj | None = api.get_or_none(resource_path("v1", plural, ns, name), timeout=self.timeout)
        return got

    def _find_copy(self, plural: str, leaf_ns: str, uid: str, *, fresh: bool = False) -> Obj | None:
        """The leaf copy of the root object ``uid`` in ``leaf_ns``: by the root UID label only."""
        inf = self._leaf_inf[plural]
        if not fresh and self._started and inf.synced.is_set():
            for o in self._copies_of(plural, uid):
                if _meta(o).get("namespace") == leaf_ns and _uid(o) not in self._deleted \
                        and not _meta(o).get("deletionTimestamp"):
                    return o
            return None
        doc = self.leaf.request("GET", resource_path("v1", plural, leaf_ns),
                                query={"labelSelector": identity.selector(self.root_id, uid)}, timeout=self.timeout)
        items = [o for o in doc.get("items") or [] if not _meta(o).get("deletionTimestamp")]
        return items[0] if items else None

    def _copies_of(self, plural: str, uid: str) -> list[Obj]:
        """This root's leaf copies of the root object ``uid`` (any namespace), from the index."""
        with self._lock:
            return list((self._by_uid[plural].get(uid) or {}).values())

    # ------------------------------------------------------------------ writes

    def _count(self, kind: str, op: str) -> None:
        self.metrics.dependency_writes.labels(self.cluster, kind, op).inc()

    def _error(self, plural: str, reason: str) -> None:
        self.metrics.dependency_errors.labels(self.cluster, KINDS.get(plural, plural), reason).inc()

    def _create(self, plural: str, ns: str, body: Obj) -> Obj:
        created: Obj = self.leaf.request("POST", resource_path("v1", plural, ns), body, timeout=self.timeout)
        self._count(KINDS[plural], "create")
        _log.debug("Cluster %s: created %s %s/%s", self.cluster, KINDS[plural], ns, body["metadata"]["name"])
        return created

    def _update(self, plural: str, desired: Obj, copy: Obj) -> None:
        """Rewrite ``copy`` to ``desired`` when they differ (PVCs: patch the larger request down;
        others: an unconditional PUT of the whole object, ours to own)."""
        if not copy_differs(plural, desired, copy):
            return
        meta = _meta(copy)
        path = resource_path("v1", plural, meta["namespace"], meta["name"])
        if plural == PVCS:
            self._patch(self.leaf, path, copy, {"spec": {"resources": {"requests": {"storage": storage(desired)}}}})
        else:
            body = dict(desired)
            body["metadata"] = {**desired["metadata"], "uid": meta.get("uid")}
            self.leaf.request("PUT", path, body, timeout=self.timeout)
        self._count(KINDS[plural], "update")

    def _patch(self, api: Api, path: str, obj: Obj, body: Obj) -> None:
        """Merge-patch ``body`` into ``obj`` (at ``path``: the object or its status), and only into
        that very object: the patch carries ``obj``'s ``metadata.uid``, which the API server
        refuses (422, the uid is immutable) when the object of that name is another one now,
        deleted and recreated since ``obj`` was read; a patch by name alone would land on it."""
        body = {**body, "metadata": {**(body.get("metadata") or {}), "uid": _uid(obj)}}
        api.request("PATCH", path, body, ctype="application/merge-patch+json", timeout=self.timeout)

    def _delete(self, api: Api, plural: str, ns: str | None, name: str, uid: str) -> None:
        """Delete one object, only if it still has ``uid`` (a 404 counts as done)."""
        try:
            api.request("DELETE", resource_path("v1", plural, ns, name),
                        {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}},
                        timeout=self.timeout)
        except ApiError as e:
            if e.status != 404:
                raise
        self._count(KINDS.get(plural, "PersistentVolume"), "delete")

    def _create_namespace(self, ns: str) -> None:
        try:
            self.leaf.request("POST", "/api/v1/namespaces",
                              {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
                              timeout=self.timeout)
        except ApiError as e:
            if e.status != 409:
                raise

    # ------------------------------------------------------------------ events -> work

    def _enqueue(self, key: Key, delay: float = 0.0) -> None:
        with self._cond:
            due = self.clock() + delay
            if key not in self._queue or self._queue[key] > due:
                self._queue[key] = due
            self._cond.notify()

    def _on_root(self, plural: str, _kind: str, old: Obj | None, new: Obj | None) -> None:
        uid = _uid(new or old or {})
        if self._copies_of(plural, uid):
            self._enqueue((plural, uid))

    def _on_leaf_copy(self, plural: str) -> Callable[[str, Obj | None, Obj | None], None]:
        def handler(kind: str, old: Obj | None, new: Obj | None) -> None:
            obj = new or old or {}
            root = identity.root_of(obj)
            with self._lock:
                if old is not None and (was := identity.root_of(old)) is not None:
                    by_leaf = self._by_uid[plural].get(was[1]) or {}
                    by_leaf.pop(_uid(old), None)
                    if not by_leaf:
                        self._by_uid[plural].pop(was[1], None)
                if new is not None and root is not None:
                    self._by_uid[plural].setdefault(root[1], {})[_uid(new)] = new
            if kind == "DELETED":
                self._deleted.discard(_uid(obj))  # one set operation: atomic
            if kind == "DELETED" and plural != PVCS:
                return
            if root is not None and root[0] == self.root_id:
                self._enqueue((plural, root[1]))
        return handler

    def _on_leaf_pv(self, _kind: str, old: Obj | None, new: Obj | None) -> None:
        claim = ((new or old or {}).get("spec") or {}).get("claimRef") or {}
        for pvc in self._leaf_inf[PVCS].store.values():
            if _uid(pvc) == claim.get("uid"):
                root = identity.root_of(pvc)
                if root is not None:
                    self._enqueue((PVCS, root[1]))

    def _on_mirror(self, _kind: str, old: Obj | None, new: Obj | None) -> None:
        claim = ((new or old or {}).get("spec") or {}).get("claimRef") or {}
        if claim.get("uid"):
            self._enqueue((PVCS, str(claim["uid"])))

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        # Work waits for every informer's first LIST (a PVC collected before the mirrors are known
        # would leave its mirror behind); the handlers have queued every copy by then.
        while not self._stop.is_set() and not self.wait_synced(1.0):
            pass
        next_resync = self.clock() + self.resync_period
        while not self._stop.is_set():
            with self._cond:
                now = self.clock()
                due = [k for k, t in self._queue.items() if t <= now]
                if not due:
                    wake = min([next_resync, *self._queue.values()])
                    self._cond.wait(max(0.01, min(wake - now, 1.0)))
                    due = []
                for k in due:
                    del self._queue[k]
            for key in due:
                if self._stop.is_set():
                    return
                self._work(key)
            if self.clock() >= next_resync:
                next_resync = self.clock() + self.resync_period
                self._resync()

    def _resync(self) -> None:
        """Compare every copy again (a missed event costs one period)."""
        for plural, inf in self._leaf_inf.items():
            if not inf.synced.is_set():
                continue
            for o in inf.store.values():
                root = identity.root_of(o)
                if root is not None and root[0] == self.root_id:
                    self._enqueue((plural, root[1]))

    def _work(self, key: Key) -> None:
        plural, uid = key
        try:
            if plural == PVCS:
                self._sync_pvc(uid)
            else:
                self._sync_copies(plural, uid)
        except Exception as e:
            n = self._failures.get(key, 0) + 1
            self._failures[key] = n
            self._error(plural, e.reason or str(e.status) if isinstance(e, ApiError) else type(e).__name__)
            level = logging.WARNING if n == 1 else logging.DEBUG
            _log.log(level, "Cluster %s: syncing %s of root UID %s failed (%s: %s); retry %d", self.cluster,
                     KINDS[plural], uid, type(e).__name__, e, n)
            self._enqueue(key, min(10.0, 0.2 * 2 ** min(n, 6)))
            return
        self._failures.pop(key, None)

    def _root_of_copy(self, plural: str, copy: Obj, uid: str) -> Obj | None:
        """The root object a copy was made from, None when it is gone or was recreated."""
        ns, _, name = str((_meta(copy).get("annotations") or {}).get(identity.ROOT_NAME_ANNOTATION) or "") \
            .partition("/")
        if not name:
            return None
        obj = self._root_get(plural, ns, name)
        if obj is not None and _uid(obj) != uid and plural in self._root_inf:
            # The informer may lag a delete-and-recreate: ask the root itself before concluding.
            obj = self._get(self.root, plural, ns, name)
        if obj is not None and _uid(obj) != uid:
            return None
        return obj

    def _sync_copies(self, plural: str, uid: str) -> None:
        """Propagation (the module's step 2): rewrite this root object's copies to what it says.
        A root object that is gone leaves its copies to :meth:`release` (a running pod keeps the
        last content it saw, as a kubelet does when a ConfigMap is deleted under it)."""
        for copy in self._copies_of(plural, uid):
            if _meta(copy).get("deletionTimestamp") or _uid(copy) in self._deleted:
                continue
            root_obj = self._root_of_copy(plural, copy, uid)
            if root_obj is None:
                continue
            meta = _meta(copy)
            self._update(plural, self._desired(plural, root_obj, meta["name"], meta["namespace"], ""), copy)

    # ------------------------------------------------------------------ PVCs and PVs

    def _sync_pvc(self, uid: str) -> None:
        """The module's step 3 for the root PVC ``uid``."""
        for leaf_pvc in self._copies_of(PVCS, uid):
            root_pvc = self._root_of_copy(PVCS, leaf_pvc, uid)
            if root_pvc is None:
                self._collect_pvc(uid, leaf_pvc)
                continue
            if _meta(leaf_pvc).get("deletionTimestamp"):
                continue
            if (leaf_pvc.get("status") or {}).get("phase") == "Bound":  # only a bound claim may grow
                desired = self._desired(PVCS, root_pvc, _meta(leaf_pvc)["name"], _meta(leaf_pvc)["namespace"], "")
                self._update(PVCS, desired, leaf_pvc)  # a resize flows down
            self._mirror(root_pvc, leaf_pvc)

    def _collect_pvc(self, uid: str, leaf_pvc: Obj) -> None:
        """The root PVC is gone: its leaf copy goes (by UID), its mirror per reclaim policy."""
        meta = _meta(leaf_pvc)
        if not meta.get("deletionTimestamp"):
            self._delete(self.leaf, PVCS, meta["namespace"], meta["name"], _uid(leaf_pvc))
            _log.info("Cluster %s: root PVC %s is gone; deleted its leaf copy %s/%s", self.cluster,
                      meta.get("annotations", {}).get(identity.ROOT_NAME_ANNOTATION), meta["namespace"], meta["name"])
        for pv in list(self._mirrors.store.values()):
            if ((pv.get("spec") or {}).get("claimRef") or {}).get("uid") != uid:
                continue
            policy = (pv.get("spec") or {}).get("persistentVolumeReclaimPolicy") or "Delete"
            name = str(_meta(pv)["name"])
            if policy == "Delete":
                self._delete(self.root, PVS, None, name, _uid(pv))
            elif (pv.get("status") or {}).get("phase") != "Released":
                self._patch(self.root, resource_path("v1", PVS, name=name, sub="status"), pv,
                            {"status": {"phase": "Released"}})
                self._count("PersistentVolume", "status")

    def _pv_nodes(self, leaf_pv: Obj, leaf_pvc: Obj) -> list[str]:
        if self.mode == NODE_MODE and (hosts := pv_hostnames(leaf_pv)):
            return hosts
        node = (_meta(leaf_pvc).get("annotations") or {}).get(ROOT_NODE_ANNOTATION)
        return [str(node or f"kosmos-{self.cluster}")]

    def _mirror(self, root_pvc: Obj, leaf_pvc: Obj) -> None:
        """Mirror the leaf PVC's PV into the root and bind the root PVC to it."""
        volume = (leaf_pvc.get("spec") or {}).get("volumeName")
        if not volume or (leaf_pvc.get("status") or {}).get("phase") != "Bound":
            return
        leaf_pv = self._leaf_pvs.store.get(str(volume)) or self._get(self.leaf, PVS, None, str(volume))
        if leaf_pv is None:
            return
        leaf_pv_uid = _uid(leaf_pv)
        mirror = next((pv for pv in self._mirrors.store.values()
                       if (_meta(pv).get("labels") or {}).get(MIRROR_UID_LABEL) == leaf_pv_uid), None)
        if mirror is None:
            mirror = self._find_mirror(leaf_pv_uid)
        nodes = self._pv_nodes(leaf_pv, leaf_pvc)
        if mirror is None:
            name = str(_meta(leaf_pv)["name"])
            taken = self._get(self.root, PVS, None, name)
            if taken is not None:
                if (_meta(taken).get("labels") or {}).get(MIRROR_UID_LABEL) == leaf_pv_uid:
                    mirror = taken
                else:
                    name = f"{name[:NAME_MAX - 9]}-{identity.suffix(self.cluster, leaf_pv_uid)}"
            if mirror is None:
                body = mirror_pv(leaf_pv, root_pvc, name=name, cluster=self.cluster, nodes=nodes)
                mirror = self.root.request("POST", resource_path("v1", PVS), body, timeout=self.timeout)
                self._count("PersistentVolume", "create")
                _log.info("Cluster %s: mirrored leaf PV %s as root PV %s for PVC %s/%s", self.cluster,
                          _meta(leaf_pv)["name"], name, _meta(root_pvc)["namespace"], _meta(root_pvc)["name"])
        assert mirror is not None
        mname = str(_meta(mirror)["name"])
        desired = mirror_pv(leaf_pv, root_pvc, name=mname, cluster=self.cluster, nodes=nodes)
        if mirror_differs(desired, mirror):
            self._patch(self.root, resource_path("v1", PVS, name=mname), mirror,
                        {"spec": {"capacity": desired["spec"]["capacity"]}})
            self._count("PersistentVolume", "update")
        if (mirror.get("status") or {}).get("phase") != "Bound":
            self._patch(self.root, resource_path("v1", PVS, name=mname, sub="status"), mirror,
                        {"status": {"phase": "Bound"}})
            self._count("PersistentVolume", "status")
        self._bind_root_pvc(root_pvc, leaf_pvc, mname)

    def _find_mirror(self, leaf_pv_uid: str) -> Obj | None:
        doc = self.root.request("GET", resource_path("v1", PVS),
                                query={"labelSelector": f"{MIRROR_CLUSTER_LABEL}={self.cluster},"
                                                        f"{MIRROR_UID_LABEL}={leaf_pv_uid}"},
                                timeout=self.timeout)
        items = doc.get("items") or []
        return items[0] if items else None

    def _bind_root_pvc(self, root_pvc: Obj, leaf_pvc: Obj, pv_name: str) -> None:
        """``volumeName`` set once (as the PV binder does; upstream allows exactly that change of a
        claim's spec), then the leaf PVC's status (phase, capacity, expansion conditions)."""
        meta = _meta(root_pvc)
        path = resource_path("v1", PVCS, meta["namespace"], meta["name"])
        bound = (root_pvc.get("spec") or {}).get("volumeName")
        if not bound:
            self._patch(self.root, path, root_pvc, {
                "metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes",
                                             "pv.kubernetes.io/bound-by-controller": "yes"}},
                "spec": {"volumeName": pv_name}})
            self._count("PersistentVolumeClaim", "bind")
        elif bound != pv_name:
            _log.warning("Cluster %s: root PVC %s/%s is bound to %s, not to %s (the mirror of its leaf volume); "
                         "left alone", self.cluster, meta["namespace"], meta["name"], bound, pv_name)
            return
        leaf_status, root_status = leaf_pvc.get("status") or {}, root_pvc.get("status") or {}
        patch = {k: leaf_status.get(k) for k in _PVC_STATUS if leaf_status.get(k) != root_status.get(k)}
        if patch:
            self._patch(self.root, resource_path("v1", PVCS, meta["namespace"], meta["name"], sub="status"), root_pvc,
                        {"status": patch})
            self._count("PersistentVolumeClaim", "status")

