"""kube-controller-manager's volume controllers for the lab: the PersistentVolume binder, PVC and
PV protection, and the expand controller's hand-off to an external resizer.

Upstream sources followed (pkg/controller/volume/...): ``persistentvolume/pv_controller.go``
(syncClaim/syncVolume, bind, reclaim), ``component-helpers/storage/volume`` (FindMatchingVolume,
node affinity), ``pvcprotection`` and ``pvprotection`` (the finalizers), ``expand`` (the
``ExternalExpanding`` event). Names, annotations, phases, event reasons and messages are upstream's.

How a claim gets a volume, in order:

1. **Immediate** classes (and claims without a class): the binder looks for the best matching
   Available PV (class, access modes, volumeMode, selector, capacity >= request, smallest
   first; a PV pre-bound by ``spec.claimRef`` or a claim pre-bound by ``spec.volumeName`` win).
   None found and the class has a provisioner: the claim is annotated
   ``volume.kubernetes.io/storage-provisioner`` (plus the beta key) and an
   ``ExternalProvisioning`` event says so; the provisioner (:mod:`kubeemu.ctrl.provisioner`)
   creates the PV with ``spec.claimRef`` set, and the binder completes the binding.
2. **WaitForFirstConsumer** classes: nothing happens until a Pod using the claim is scheduled
   (event ``WaitForFirstConsumer``, or ``WaitForPodScheduled`` while a using Pod has no node).
   Upstream the scheduler's VolumeBinding plugin then picks a static PV that fits the node or
   sets ``volume.kubernetes.io/selected-node`` for the provisioner. The lab's leaves bind pods by
   ``spec.nodeName`` and have no scheduler yet, so the binder does that step itself from the
   consuming Pod's ``spec.nodeName`` (it never overrides an annotation a scheduler already set).
3. Binding writes ``pv.spec.claimRef`` (+ ``pv.kubernetes.io/bound-by-controller``), PV phase
   ``Bound``, then ``pvc.spec.volumeName`` (+ ``bound-by-controller``, ``bind-completed``), then
   PVC phase ``Bound`` with ``status.capacity``/``accessModes`` from the PV. Each step is
   idempotent, so a restarted controller-manager finishes a half-done binding.
4. A deleted claim leaves its PV ``Released``; reclaim policy Retain keeps it, Delete hands it to
   the provisioner that made it (a PV of no known provisioner goes ``Failed``), Recycle is
   refused as upstream (no recycler plugin).

Protection: ``kubernetes.io/pvc-protection`` holds a deleted PVC while a scheduled Pod
references it; ``kubernetes.io/pv-protection`` holds a deleted PV while it is Bound. Upstream an
admission plugin adds them at create time and these controllers add them when missing; here the
controllers do both (the finalizer appears a moment after create).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Iterable, Mapping
from fractions import Fraction
from typing import Any

import aiohttp

from kubeemu import selectors
from kubeemu.client import ApiStatusError, Client, Obj, object_key, resource_path
from kubeemu.ctrl.base import Controller, Informer, Informers
from kubeemu.objects import now_rfc3339
from kubeemu.quantity import QuantityError
from kubeemu.validation import parse_quantity

_log = logging.getLogger(__name__)

ANN_BIND_COMPLETED = "pv.kubernetes.io/bind-completed"
ANN_BOUND_BY_CONTROLLER = "pv.kubernetes.io/bound-by-controller"
ANN_DYNAMICALLY_PROVISIONED = "pv.kubernetes.io/provisioned-by"
ANN_STORAGE_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_STORAGE_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"
ANN_BETA_DEFAULT_CLASS = "storageclass.beta.kubernetes.io/is-default-class"
NO_PROVISIONER = "kubernetes.io/no-provisioner"
PVC_PROTECTION = "kubernetes.io/pvc-protection"
PV_PROTECTION = "kubernetes.io/pv-protection"
HOSTNAME_LABEL = "kubernetes.io/hostname"
WAIT_FOR_FIRST_CONSUMER = "WaitForFirstConsumer"

STORAGE_API = "storage.k8s.io/v1"

#: PV controller resync (upstream ``--pvclaimbinder-sync-period`` default 15 s): every claim and
#: volume is synced again, which retries what no event would wake (a class created later).
RESYNC_S = 15.0

# ----------------------------------------------------------------------------- quantities

def quantity(text: Any, where: str = "quantity") -> Fraction:
    """The exact value of a resource quantity (``10Gi``, ``500M``, ``1e9``); ``where`` names the
    field in the error. Sizes compare by value, as ``resource.Quantity.Cmp`` does."""
    try:
        if not isinstance(text, str | int | float):
            raise QuantityError(f"{text!r} is not a quantity")
        return parse_quantity(text)
    except QuantityError as e:
        raise ValueError(f"{where}: {e}") from None


def storage_of(resources: Mapping[str, Any] | None) -> Fraction | None:
    """``resources["storage"]`` as a value, None when absent or not a quantity."""
    raw = (resources or {}).get("storage")
    if raw is None:
        return None
    try:
        return quantity(raw)
    except ValueError:
        return None


# ----------------------------------------------------------------------------- object helpers


def typed(obj: Obj | None, kind: str, api_version: str = "v1") -> Obj | None:
    """``obj`` with its ``kind``/``apiVersion``: items of a list come without them (as upstream
    list items do), and events, claim references and PUT bodies need them."""
    if obj is None or (obj.get("kind") and obj.get("apiVersion")):
        return obj
    return dict(obj, kind=obj.get("kind") or kind, apiVersion=obj.get("apiVersion") or api_version)


def annotations_of(obj: Obj) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def claim_class(pvc: Obj) -> str:
    """``GetPersistentVolumeClaimClass``: the beta annotation first, then ``spec.storageClassName``."""
    ann = annotations_of(pvc).get("volume.beta.kubernetes.io/storage-class")
    if ann is not None:
        return str(ann)
    return str((pvc.get("spec") or {}).get("storageClassName") or "")


def volume_class(pv: Obj) -> str:
    ann = annotations_of(pv).get("volume.beta.kubernetes.io/storage-class")
    if ann is not None:
        return ann
    return str((pv.get("spec") or {}).get("storageClassName") or "")


def claim_request(pvc: Obj) -> Fraction:
    return storage_of(((pvc.get("spec") or {}).get("resources") or {}).get("requests")) or Fraction(0)


def volume_capacity(pv: Obj) -> Fraction:
    return storage_of((pv.get("spec") or {}).get("capacity")) or Fraction(0)


def phase(obj: Obj) -> str:
    return str((obj.get("status") or {}).get("phase") or "")


def claim_key_of_ref(ref: Mapping[str, Any]) -> str:
    return f"{ref.get('namespace', '')}/{ref.get('name', '')}"


def is_volume_bound_to_claim(pv: Obj, pvc: Obj) -> bool:
    """``IsVolumeBoundToClaim``: claimRef names the claim and its UID is empty or the claim's."""
    ref = (pv.get("spec") or {}).get("claimRef")
    if not ref:
        return False
    meta = pvc["metadata"]
    if ref.get("name") != meta["name"] or ref.get("namespace") != meta.get("namespace"):
        return False
    return not ref.get("uid") or ref.get("uid") == meta.get("uid")


def volume_mode_mismatch(pvc: Obj, pv: Obj) -> bool:
    """``CheckVolumeModeMismatches``: unset means Filesystem on both sides."""
    return ((pvc.get("spec") or {}).get("volumeMode") or "Filesystem") != \
        ((pv.get("spec") or {}).get("volumeMode") or "Filesystem")


def access_modes_ok(pvc: Obj, pv: Obj) -> bool:
    """Every mode the claim asks for is offered by the volume (``CheckAccessModes``)."""
    offered = set((pv.get("spec") or {}).get("accessModes") or [])
    return all(m in offered for m in (pvc.get("spec") or {}).get("accessModes") or [])


def node_selector_term_matches(term: Mapping[str, Any], node: Obj) -> bool:
    """One ``NodeSelectorTerm``: its expressions and fields all hold (an empty term matches nothing)."""
    exprs = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not exprs and not fields:
        return False
    labels = (node.get("metadata") or {}).get("labels") or {}
    for e in exprs:
        if not _node_requirement(e, labels):
            return False
    for f in fields:
        if f.get("key") != "metadata.name" or not _node_requirement(f, {"metadata.name": node["metadata"]["name"]}):
            return False
    return True


def _node_requirement(e: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op, values = e.get("key", ""), e.get("operator", ""), list(e.get("values") or [])
    have = key in labels
    val = labels.get(key, "")
    if op == "In":
        return have and val in values
    if op == "NotIn":
        return not have or val not in values
    if op == "Exists":
        return have
    if op == "DoesNotExist":
        return not have
    if op in ("Gt", "Lt") and have and len(values) == 1:
        try:
            a, b = int(val), int(values[0])
        except ValueError:
            return False
        return a > b if op == "Gt" else a < b
    return False


def volume_fits_node(pv: Obj, node: Obj) -> bool:
    """``CheckNodeAffinity``: no ``nodeAffinity.required`` fits every node; else any term must."""
    req = (((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {})
    terms = req.get("nodeSelectorTerms")
    if not req:
        return True
    return any(node_selector_term_matches(t, node) for t in terms or [])


def pod_claims(pod: Obj) -> list[str]:
    """The claim names a Pod's volumes reference (``persistentVolumeClaim.claimName``)."""
    out = []
    for v in (pod.get("spec") or {}).get("volumes") or []:
        src = v.get("persistentVolumeClaim") if isinstance(v, dict) else None
        if isinstance(src, dict) and src.get("claimName"):
            out.append(str(src["claimName"]))
    return out


def pod_terminated(pod: Obj) -> bool:
    return phase(pod) in ("Succeeded", "Failed")


def class_allows_expansion(sc: Obj | None) -> bool:
    return bool(sc and sc.get("allowVolumeExpansion"))


def binding_mode(sc: Obj) -> str:
    """``volumeBindingMode``; unset is ``Immediate``, the value upstream's defaulting writes."""
    return str(sc.get("volumeBindingMode") or "Immediate")


def default_storage_class(name: str = "lab-local", provisioner: str = "lab.kosmos.io/local") -> Obj:
    """The lab's default StorageClass (what an addon manifest installs in a real cluster)."""
    return {"apiVersion": STORAGE_API, "kind": "StorageClass",
            "metadata": {"name": name, "annotations": {ANN_DEFAULT_CLASS: "true"}},
            "provisioner": provisioner, "reclaimPolicy": "Delete", "volumeBindingMode": WAIT_FOR_FIRST_CONSUMER,
            "allowVolumeExpansion": True}


# ----------------------------------------------------------------------------- events


class EventRecorder:
    """core/v1 Events as client-go's legacy recorder writes them: one Event per (object, type,
    reason, message), its ``count`` and ``lastTimestamp`` bumped on repeats (the correlator),
    best effort (a failed write is logged and dropped, never fails the reconcile)."""

    MAX_CACHED = 4096  # client-go's maxLruCacheEntries

    def __init__(self, client: Client, component: str, host: str = "") -> None:
        self.client = client
        self.component = component
        self.host = host or socket.gethostname()
        self._seen: collections.OrderedDict[tuple[str, str, str, str], tuple[str, str, int]] = \
            collections.OrderedDict()

    async def event(self, obj: Obj, etype: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or "default"  # cluster-scoped objects' events live in "default"
        key = (str(meta.get("uid", "")), etype, reason, message)
        now = now_rfc3339()
        try:
            seen = self._seen.get(key)
            if seen is not None:
                ens, name, count = seen
                try:
                    await self.client.patch(resource_path("v1", "events", ens, name),
                                            {"count": count + 1, "lastTimestamp": now})
                    self._seen[key] = (ens, name, count + 1)
                    self._seen.move_to_end(key)
                    return
                except ApiStatusError as e:
                    if not e.not_found:
                        raise
            name = f"{meta.get('name', '')}.{time.time_ns():x}"
            body = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": ns},
                    "involvedObject": {"kind": obj.get("kind"), "apiVersion": obj.get("apiVersion"),
                                       "name": meta.get("name"), "namespace": meta.get("namespace"),
                                       "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
                    "reason": reason, "message": message, "type": etype, "count": 1,
                    "firstTimestamp": now, "lastTimestamp": now,
                    "source": {"component": self.component, "host": self.host},
                    "reportingComponent": self.component, "reportingInstance": self.host}
            await self.client.create(resource_path("v1", "events", ns), body)
            self._seen[key] = (ns, name, 1)
            if len(self._seen) > self.MAX_CACHED:
                self._seen.popitem(last=False)
        except (ApiStatusError, aiohttp.ClientError, TimeoutError, ConnectionError) as e:
            _log.info("event %s %s on %s/%s dropped: %s", etype, reason, ns, meta.get("name"), e)


# ----------------------------------------------------------------------------- shared base


class VolumeControllerBase(Controller):
    """Informers every volume controller reads, keys ``claim:NS/NAME`` / ``volume:NAME``, and an
    "assumed" cache of the controller's own writes (upstream ``storeClaimUpdate``/``AssumeWritten``):
    a write is visible to the next sync before its watch event arrives, so consecutive syncs
    do not trip over their own stale reads (409) nor redo a step.

    The claim and volume event handlers live here too (:meth:`on_claim_event`,
    :meth:`on_volume_event`), so every controller drops the assumed copy of a deleted object the
    same way; what a controller does beyond that on a deletion is its hook (:meth:`claim_deleted`,
    :meth:`volume_deleted`). Pod events differ per controller (which changes matter), so each
    filters them itself and hands the pod to :meth:`enqueue_pod_claims`."""

    def __init__(self, client: Client, informers: Informers) -> None:
        super().__init__(client, informers)
        self.pvcs = informers.get("v1", "persistentvolumeclaims")
        self.pvs = informers.get("v1", "persistentvolumes")
        self.classes = informers.get(STORAGE_API, "storageclasses")
        self.pods = informers.get("v1", "pods")
        self.nodes = informers.get("v1", "nodes")
        self._assumed: dict[tuple[str, str], Obj] = {}
        self._created: set[tuple[str, str]] = set()

    # -- reads

    def _fresh(self, inf: Informer, kind: str, key: str) -> Obj | None:
        cached = inf.get(key)
        mine = self._assumed.get((kind, key))
        if mine is None:
            return cached
        if cached is None:
            # deleted since our write (the informer saw the DELETED), or not yet seen (created)
            return mine if (kind, key) in self._created else None
        if int(cached["metadata"]["resourceVersion"]) >= int(mine["metadata"]["resourceVersion"]):
            self._assumed.pop((kind, key), None)
            return cached
        return mine

    def claim(self, key: str) -> Obj | None:
        return typed(self._fresh(self.pvcs, "claim", key), "PersistentVolumeClaim")

    def volume(self, name: str) -> Obj | None:
        return typed(self._fresh(self.pvs, "volume", name), "PersistentVolume")

    def storage_class(self, name: str) -> Obj | None:
        return self.classes.get(name) if name else None

    def _assume(self, kind: str, obj: Obj, created: bool = False) -> Obj:
        key = object_key(obj)
        self._assumed[(kind, key)] = obj
        if created:
            self._created.add((kind, key))
        return obj

    def forget_deleted(self, kind: str, obj: Obj | None) -> None:
        if obj is not None:
            key = object_key(obj)
            self._assumed.pop((kind, key), None)
            self._created.discard((kind, key))

    def all_volumes(self) -> list[Obj]:
        out = []
        for pv in self.pvs.list():
            fresh = self.volume(pv["metadata"]["name"])
            if fresh is not None:
                out.append(fresh)
        return out

    def pods_using(self, pvc: Obj) -> list[Obj]:
        """Pods of the claim's namespace whose volumes reference it."""
        ns, name = pvc["metadata"].get("namespace"), pvc["metadata"]["name"]
        return [typed(p, "Pod") or p for p in self.pods.list(namespace=ns) if name in pod_claims(p)]

    # -- writes (each returns the server's answer and remembers it)

    async def put_claim(self, pvc: Obj, status: bool = False) -> Obj:
        meta = pvc["metadata"]
        path = resource_path("v1", "persistentvolumeclaims", meta["namespace"], meta["name"],
                             "status" if status else None)
        new = await self.client.replace(path, pvc)
        new.setdefault("apiVersion", "v1")
        new.setdefault("kind", "PersistentVolumeClaim")
        return self._assume("claim", new)

    async def put_volume(self, pv: Obj, status: bool = False) -> Obj:
        path = resource_path("v1", "persistentvolumes", None, pv["metadata"]["name"], "status" if status else None)
        new = await self.client.replace(path, pv)
        new.setdefault("apiVersion", "v1")
        new.setdefault("kind", "PersistentVolume")
        return self._assume("volume", new)

    async def update_volume_phase(self, pv: Obj, new_phase: str, message: str = "") -> Obj:
        """``updateVolumePhase``: status only when it changes (``lastPhaseTransitionTime`` with it)."""
        if phase(pv) == new_phase:
            return pv
        st = dict(pv.get("status") or {}, phase=new_phase, lastPhaseTransitionTime=now_rfc3339())
        if message:
            st["message"] = message
        else:
            st.pop("message", None)
        _log.info("volume %s entered phase %s", pv["metadata"]["name"], new_phase)
        return await self.put_volume(dict(pv, status=st), status=True)

    # -- keys

    def enqueue_claim(self, key: str) -> None:
        self.queue.add(f"claim:{key}")

    def enqueue_volume(self, name: str) -> None:
        self.queue.add(f"volume:{name}")

    def enqueue_pod_claims(self, pod: Obj) -> None:
        """The claims ``pod``'s volumes reference (they live in the pod's namespace)."""
        ns = pod["metadata"].get("namespace")
        for c in pod_claims(pod):
            self.enqueue_claim(f"{ns}/{c}")

    # -- event handlers (register the ones a controller needs in its ``__init__``)

    def on_claim_event(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        """A claim changed: sync it; deleted: forget its assumed copy, then :meth:`claim_deleted`."""
        obj = new or old
        if obj is None:
            return
        if etype == "DELETED":
            self.forget_deleted("claim", obj)
            self.claim_deleted(obj)
            return
        self.enqueue_claim(object_key(obj))

    def on_volume_event(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        """A volume changed: sync it; deleted: forget its assumed copy, then :meth:`volume_deleted`."""
        obj = new or old
        if obj is None:
            return
        if etype == "DELETED":
            self.forget_deleted("volume", obj)
            self.volume_deleted(obj)
            return
        self.enqueue_volume(obj["metadata"]["name"])

    def claim_deleted(self, pvc: Obj) -> None:
        """Hook: what else a claim's deletion wakes (nothing by default)."""

    def volume_deleted(self, pv: Obj) -> None:
        """Hook: what else a volume's deletion wakes (nothing by default)."""

    async def reconcile(self, key: str) -> None:
        kind, _, rest = key.partition(":")
        if kind == "claim":
            pvc = self.claim(rest)
            if pvc is not None:
                await self.sync_claim(pvc)
        elif kind == "volume":
            pv = self.volume(rest)
            if pv is not None:
                await self.sync_volume(pv)

    async def sync_claim(self, pvc: Obj) -> None:
        """Reconcile one claim (override)."""

    async def sync_volume(self, pv: Obj) -> None:
        """Reconcile one volume (override)."""

    async def resync_loop(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            for pvc in self.pvcs.list():
                self.enqueue_claim(object_key(pvc))
            for pv in self.pvs.list():
                self.enqueue_volume(pv["metadata"]["name"])


# ----------------------------------------------------------------------------- the binder


class PersistentVolumeBinder(VolumeControllerBase):
    """kube-controller-manager's ``persistentvolume-binder`` (the PV controller)."""

    name = "persistentvolume-binder"

    def __init__(self, client: Client, informers: Informers, resync: float = RESYNC_S) -> None:
        super().__init__(client, informers)
        self.recorder = EventRecorder(client, "persistentvolume-controller")
        self.resync = resync
        self.pvcs.add_handler(self.on_claim_event)
        self.pvs.add_handler(self.on_volume_event)
        self.classes.add_handler(self._on_class)
        self.pods.add_handler(self._on_pod)

    def claim_deleted(self, pvc: Obj) -> None:
        vol = (pvc.get("spec") or {}).get("volumeName")
        if vol:
            self.enqueue_volume(vol)  # upstream deleteClaim: the volume gets Released now

    def volume_deleted(self, pv: Obj) -> None:
        ref = (pv.get("spec") or {}).get("claimRef")
        if ref:
            self.enqueue_claim(claim_key_of_ref(ref))

    def _on_class(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        sc = new or old
        if sc is None or etype == "DELETED":
            return
        for pvc in self.pvcs.list():
            spec = pvc.get("spec") or {}
            if spec.get("volumeName"):
                continue
            if claim_class(pvc) == sc["metadata"]["name"] or spec.get("storageClassName") is None:
                self.enqueue_claim(object_key(pvc))

    def _on_pod(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        pod = new or old
        if pod is None or etype == "DELETED":
            return
        if old is not None and new is not None and \
                (old.get("spec") or {}).get("nodeName") == (new.get("spec") or {}).get("nodeName"):
            return  # only scheduling matters here
        self.enqueue_pod_claims(pod)

    async def run(self) -> None:
        await self.informers.wait_synced()
        task = asyncio.create_task(self.resync_loop(self.resync), name="pv-binder-resync")
        try:
            await super().run()
        finally:
            task.cancel()

    # -- claims

    async def sync_claim(self, pvc: Obj) -> None:
        if ANN_BIND_COMPLETED not in annotations_of(pvc):
            await self._sync_unbound_claim(pvc)
        else:
            await self._sync_bound_claim(pvc)

    def should_delay_binding(self, pvc: Obj) -> bool:
        """``shouldDelayBinding``: a WaitForFirstConsumer class and no node selected yet."""
        if ANN_SELECTED_NODE in annotations_of(pvc):
            return False
        sc = self.storage_class(claim_class(pvc))
        return sc is not None and binding_mode(sc) == WAIT_FOR_FIRST_CONSUMER

    def find_best_match(self, pvc: Obj, delay: bool, node: Obj | None = None) -> Obj | None:
        """``findBestMatchForClaim``: a volume pre-bound to the claim, else the smallest Available
        one that satisfies it, preferring volumes with the fewest access modes (upstream's
        access-mode index)."""
        spec = pvc.get("spec") or {}
        want_modes = set(spec.get("accessModes") or [])
        request = claim_request(pvc)
        cls = claim_class(pvc)
        selector = spec.get("selector")
        candidates = [pv for pv in self.all_volumes() if want_modes <= set((pv.get("spec") or {}).get("accessModes")
                                                                           or [])]
        for nmodes in sorted({len((pv.get("spec") or {}).get("accessModes") or []) for pv in candidates}):
            group = [pv for pv in candidates if len((pv.get("spec") or {}).get("accessModes") or []) == nmodes]
            best: Obj | None = None
            for pv in group:
                pspec = pv.get("spec") or {}
                if pspec.get("claimRef") and not is_volume_bound_to_claim(pv, pvc):
                    continue
                if volume_capacity(pv) < request or volume_mode_mismatch(pvc, pv):
                    continue
                if pv["metadata"].get("deletionTimestamp"):
                    continue
                fits = node is None or volume_fits_node(pv, node)
                if is_volume_bound_to_claim(pv, pvc):
                    return pv if fits else None
                if node is None and delay:
                    continue  # the consumer's node decides (scheduler path below)
                if phase(pv) != "Available":
                    continue
                if selector is not None and not selectors.label_selector_matches(
                        selector, pv["metadata"].get("labels") or {}):
                    continue
                if volume_class(pv) != cls or not fits:
                    continue
                if best is None or volume_capacity(pv) < volume_capacity(best):
                    best = pv
            if best is not None:
                return best
        return None

    def scheduled_consumer(self, pvc: Obj) -> Obj | None:
        """The first Pod using the claim that has a node, is not being deleted and has not ended."""
        for pod in sorted(self.pods_using(pvc), key=lambda p: p["metadata"].get("creationTimestamp") or ""):
            if (pod.get("spec") or {}).get("nodeName") and not pod["metadata"].get("deletionTimestamp") \
                    and not pod_terminated(pod):
                return pod
        return None

    async def _sync_unbound_claim(self, pvc: Obj) -> None:
        spec = pvc.get("spec") or {}
        if not spec.get("volumeName"):
            delay = self.should_delay_binding(pvc)
            pv = self.find_best_match(pvc, delay)
            if pv is not None:
                await self.bind(pv, pvc)
                return
            if await self.assign_default_storage_class(pvc):
                return  # the update re-queues the claim, which then syncs with its class
            cls = claim_class(pvc)
            if delay:
                consumer = None if pvc["metadata"].get("deletionTimestamp") else self.scheduled_consumer(pvc)
                if consumer is not None and await self._volume_binding_for_node(pvc, consumer):
                    return
                await self._event_unbound_delay_binding(pvc)
            elif cls:
                await self.provision_claim(pvc)
                return
            else:
                await self.recorder.event(pvc, "Normal", "FailedBinding",
                                          "no persistent volumes available for this claim and no storage class is set")
            await self.update_claim_status(pvc, "Pending", None)
            return
        # the user asked for a specific volume
        pv = self.volume(spec["volumeName"])
        if pv is None:
            await self.update_claim_status(pvc, "Pending", None)
            return
        if not (pv.get("spec") or {}).get("claimRef"):
            problem = self._check_volume_satisfies_claim(pv, pvc)
            if problem:
                await self.recorder.event(pvc, "Warning", "VolumeMismatch",
                                          f'Cannot bind to requested volume "{pv["metadata"]["name"]}": {problem}')
                await self.update_claim_status(pvc, "Pending", None)
                return
            await self.bind(pv, pvc)
        elif is_volume_bound_to_claim(pv, pvc):
            await self.bind(pv, pvc)
        elif ANN_BOUND_BY_CONTROLLER not in annotations_of(pvc):
            await self.update_claim_status(pvc, "Pending", None)  # bound elsewhere by the user: wait
        else:
            raise ApiStatusError("SYNC", object_key(pvc), 409, {
                "reason": "Conflict",
                "message": f'Invalid binding of claim "{object_key(pvc)}" to volume "{pv["metadata"]["name"]}": '
                           f'volume already claimed by "{claim_key_of_ref(pv["spec"]["claimRef"])}"'})

    def default_class(self) -> Obj | None:
        """``GetDefaultClass``: among classes annotated default, the newest (then by name)."""
        defaults = [sc for sc in self.classes.list()
                    if annotations_of(sc).get(ANN_DEFAULT_CLASS) == "true"
                    or annotations_of(sc).get(ANN_BETA_DEFAULT_CLASS) == "true"]
        if not defaults:
            return None
        return max(defaults, key=lambda sc: (sc["metadata"].get("creationTimestamp") or "", sc["metadata"]["name"]))

    async def assign_default_storage_class(self, pvc: Obj) -> bool:
        """RetroactiveDefaultStorageClass (GA in 1.28): a claim that names no class at all (not
        even "") gets the default class, so claims made before the class existed still bind."""
        if (pvc.get("spec") or {}).get("storageClassName") is not None or \
                "volume.beta.kubernetes.io/storage-class" in annotations_of(pvc):
            return False
        sc = self.default_class()
        if sc is None:
            return False
        _log.info("claim %s: assigning the default StorageClass %s", object_key(pvc), sc["metadata"]["name"])
        await self.put_claim(dict(pvc, spec=dict(pvc.get("spec") or {}, storageClassName=sc["metadata"]["name"])))
        return True

    @staticmethod
    def _check_volume_satisfies_claim(pv: Obj, pvc: Obj) -> str:
        """``checkVolumeSatisfyClaim``: the reason a pre-bound claim cannot take this volume, or ""."""
        if pv["metadata"].get("deletionTimestamp"):
            return "the volume is marked for deletion"
        if volume_capacity(pv) < claim_request(pvc):
            return "requested PV is too small"
        if volume_class(pv) != claim_class(pvc):
            return "storageClassName does not match"
        if volume_mode_mismatch(pvc, pv):
            return "incompatible volumeMode"
        if not access_modes_ok(pvc, pv):
            return "incompatible accessMode"
        return ""

    async def _volume_binding_for_node(self, pvc: Obj, pod: Obj) -> bool:
        """The scheduler's VolumeBinding step for a pod already on its node: a static PV that
        fits the node is bound; otherwise a class with a provisioner gets the node selected
        (``volume.kubernetes.io/selected-node``). False when neither applies (the claim waits)."""
        node_name = str(pod["spec"]["nodeName"])
        node = self.nodes.get(node_name) or {"metadata": {"name": node_name, "labels": {HOSTNAME_LABEL: node_name}}}
        pv = self.find_best_match(pvc, True, node)
        if pv is not None:
            await self.bind(pv, pvc)
            return True
        sc = self.storage_class(claim_class(pvc))
        if sc is None or sc.get("provisioner") == NO_PROVISIONER:
            return False
        meta = dict(pvc["metadata"])
        meta["annotations"] = dict(annotations_of(pvc), **{ANN_SELECTED_NODE: node_name})
        _log.info("claim %s: node %s selected from its consumer pod %s", object_key(pvc), node_name,
                  pod["metadata"]["name"])
        await self.put_claim(dict(pvc, metadata=meta))
        self.enqueue_claim(object_key(pvc))
        return True

    async def _event_unbound_delay_binding(self, pvc: Obj) -> None:
        """``emitEventForUnboundDelayBindingClaim``: which pods are still unscheduled, if any."""
        waiting = sorted(p["metadata"]["name"] for p in self.pods_using(pvc)
                         if not (p.get("spec") or {}).get("nodeName"))
        if not waiting:
            await self.recorder.event(pvc, "Normal", "WaitForFirstConsumer",
                                      "waiting for first consumer to be created before binding")
        elif len(waiting) == 1:
            await self.recorder.event(pvc, "Normal", "WaitForPodScheduled",
                                      f"waiting for pod {waiting[0]} to be scheduled")
        else:
            await self.recorder.event(pvc, "Normal", "WaitForPodScheduled",
                                      f"waiting for pods {','.join(waiting)} to be scheduled")

    async def provision_claim(self, pvc: Obj) -> None:
        """``provisionClaim`` for external provisioners: annotate the claim, tell the user."""
        cls = claim_class(pvc)
        sc = self.storage_class(cls)
        if sc is None:
            msg = f'storageclass.storage.k8s.io "{cls}" not found'
            await self.recorder.event(pvc, "Warning", "ProvisioningFailed", msg)
            await self.update_claim_status(pvc, "Pending", None)
            return
        prov = str(sc.get("provisioner") or "")
        if prov.startswith("kubernetes.io/"):  # in-tree plugins: the lab has none
            await self.recorder.event(pvc, "Warning", "ProvisioningFailed", f"no volume plugin matched name: {prov}")
            await self.update_claim_status(pvc, "Pending", None)
            return
        ann = annotations_of(pvc)
        if ann.get(ANN_STORAGE_PROVISIONER) != prov:
            meta = dict(pvc["metadata"])
            meta["annotations"] = dict(ann, **{ANN_BETA_STORAGE_PROVISIONER: prov, ANN_STORAGE_PROVISIONER: prov})
            pvc = await self.put_claim(dict(pvc, metadata=meta))
        await self.recorder.event(
            pvc, "Normal", "ExternalProvisioning",
            f"Waiting for a volume to be created either by the external provisioner '{prov}' or manually by the "
            "system administrator. If volume creation is delayed, please verify that the provisioner is running "
            "and correctly registered.")

    async def _sync_bound_claim(self, pvc: Obj) -> None:
        name = (pvc.get("spec") or {}).get("volumeName")
        if not name:
            await self._claim_lost(pvc, "ClaimLost", "Bound claim has lost reference to PersistentVolume. "
                                                     "Data on the volume is lost!")
            return
        pv = self.volume(name)
        if pv is None:
            await self._claim_lost(pvc, "ClaimLost", "Bound claim has lost its PersistentVolume. "
                                                     "Data on the volume is lost!")
            return
        ref = (pv.get("spec") or {}).get("claimRef")
        if not ref or ref.get("uid") == pvc["metadata"].get("uid"):
            await self.bind(pv, pvc)
        else:
            await self._claim_lost(pvc, "ClaimMisbound",
                                   "Two claims are bound to the same volume, this one is bound incorrectly")

    async def _claim_lost(self, pvc: Obj, reason: str, message: str) -> None:
        if phase(pvc) == "Lost":
            return
        new = await self.update_claim_status(pvc, "Lost", None)
        await self.recorder.event(new, "Warning", reason, message)

    async def update_claim_status(self, pvc: Obj, new_phase: str, pv: Obj | None) -> Obj:
        """``updateClaimStatus``: phase, and access modes/capacity from the volume (capacity only
        on the transition to Bound: a later difference is a resize in progress)."""
        st = dict(pvc.get("status") or {})
        dirty = False
        if st.get("phase") != new_phase:
            st["phase"] = new_phase
            dirty = True
        if pv is None:
            for k in ("accessModes", "capacity"):
                if st.pop(k, None) is not None:
                    dirty = True
        else:
            modes = (pv.get("spec") or {}).get("accessModes")
            if st.get("accessModes") != modes:
                st["accessModes"] = modes
                dirty = True
            if phase(pvc) != new_phase:
                cap = (pv.get("spec") or {}).get("capacity") or {}
                if "storage" not in cap:
                    # upstream's API server refuses such a PV; this one does not validate PVs yet
                    _log.warning('PersistentVolume "%s" is without a storage capacity', pv["metadata"]["name"])
                elif storage_of(st.get("capacity")) != storage_of(cap):
                    st["capacity"] = cap
                    dirty = True
        if not dirty:
            return pvc
        _log.info("claim %s entered phase %s", object_key(pvc), new_phase)
        return await self.put_claim(dict(pvc, status=st), status=True)

    async def bind(self, pv: Obj, pvc: Obj) -> None:
        """``bind``: volume->claim, volume phase, claim->volume, claim phase; each only if needed."""
        pv = await self._bind_volume_to_claim(pv, pvc)
        pv = await self.update_volume_phase(pv, "Bound")
        pvc = await self._bind_claim_to_volume(pvc, pv)
        await self.update_claim_status(pvc, "Bound", pv)

    async def _bind_volume_to_claim(self, pv: Obj, pvc: Obj) -> Obj:
        meta = pvc["metadata"]
        ref = (pv.get("spec") or {}).get("claimRef") or {}
        dirty = False
        new = dict(pv, spec=dict(pv.get("spec") or {}), metadata=dict(pv["metadata"]))
        by_controller = not is_volume_bound_to_claim(pv, pvc)
        if ref.get("name") != meta["name"] or ref.get("namespace") != meta.get("namespace") or \
                ref.get("uid") != meta.get("uid"):
            new["spec"]["claimRef"] = {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                                       "namespace": meta.get("namespace"), "name": meta["name"],
                                       "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")}
            dirty = True
        ann = annotations_of(pv)
        if by_controller and ANN_BOUND_BY_CONTROLLER not in ann:
            new["metadata"]["annotations"] = dict(ann, **{ANN_BOUND_BY_CONTROLLER: "yes"})
            dirty = True
        if not dirty:
            return pv
        _log.info("claim %s bound to volume %s", object_key(pvc), pv["metadata"]["name"])
        return await self.put_volume(new)

    async def _bind_claim_to_volume(self, pvc: Obj, pv: Obj) -> Obj:
        ann = annotations_of(pvc)
        spec = dict(pvc.get("spec") or {})
        dirty = False
        if spec.get("volumeName") != pv["metadata"]["name"]:
            spec["volumeName"] = pv["metadata"]["name"]
            ann.setdefault(ANN_BOUND_BY_CONTROLLER, "yes")
            dirty = True
        if ANN_BIND_COMPLETED not in ann:
            ann[ANN_BIND_COMPLETED] = "yes"
            dirty = True
        if not dirty:
            return pvc
        return await self.put_claim(dict(pvc, spec=spec, metadata=dict(pvc["metadata"], annotations=ann)))

    # -- volumes

    async def sync_volume(self, pv: Obj) -> None:
        ref = (pv.get("spec") or {}).get("claimRef")
        if not ref:
            if phase(pv) != "Available":
                await self.update_volume_phase(pv, "Available")
                # upstream waits for the next resync (15 s) to offer it; the lab offers it now
                for waiting in self.pvcs.list():
                    if claim_class(waiting) == volume_class(pv) and not (waiting.get("spec") or {}).get("volumeName"):
                        self.enqueue_claim(object_key(waiting))
            return
        if not ref.get("uid"):
            await self.update_volume_phase(pv, "Available")  # pre-bound; the claim's sync binds it
            return
        key = claim_key_of_ref(ref)
        pvc: Obj | None = self.claim(key)
        if pvc is None and phase(pv) not in ("Released", "Failed"):
            # a PV just made by a provisioner may be seen before its claim: ask the server, so a
            # live claim is never released by mistake
            try:
                pvc = await self.client.get(resource_path("v1", "persistentvolumeclaims", ref.get("namespace"),
                                                          ref.get("name")))
            except ApiStatusError as e:
                if not e.not_found:
                    raise
        if pvc is not None and pvc["metadata"].get("uid") != ref.get("uid"):
            pvc = None  # same name, new claim: ours was deleted
        if pvc is None:
            if phase(pv) not in ("Released", "Failed"):
                pv = await self.update_volume_phase(pv, "Released")
            await self.reclaim_volume(pv)
            return
        cspec = pvc.get("spec") or {}
        if not cspec.get("volumeName"):
            if volume_mode_mismatch(pvc, pv):
                await self.recorder.event(pv, "Warning", "VolumeMismatch",
                                          f'Cannot bind PersistentVolume to requested PersistentVolumeClaim '
                                          f'"{pvc["metadata"]["name"]}" due to incompatible volumeMode.')
                await self.recorder.event(pvc, "Warning", "VolumeMismatch",
                                          f'Cannot bind PersistentVolume "{pv["metadata"]["name"]}" to requested '
                                          f"PersistentVolumeClaim due to incompatible volumeMode.")
                return
            self.enqueue_claim(key)  # the claim's sync completes the binding
            return
        if cspec["volumeName"] == pv["metadata"]["name"]:
            await self.update_volume_phase(pv, "Bound")
            return
        ann = annotations_of(pv)
        if ANN_DYNAMICALLY_PROVISIONED in ann and (pv.get("spec") or {}).get(
                "persistentVolumeReclaimPolicy") == "Delete":
            if phase(pv) not in ("Released", "Failed"):
                pv = await self.update_volume_phase(pv, "Released")
            await self.reclaim_volume(pv)
            return
        await self._unbind_volume(pv)

    async def _unbind_volume(self, pv: Obj) -> None:
        """``unbindVolume``: a controller binding is undone; a user's pre-binding keeps its name."""
        new = dict(pv, spec=dict(pv.get("spec") or {}), metadata=dict(pv["metadata"]))
        ann = annotations_of(pv)
        if ANN_BOUND_BY_CONTROLLER in ann:
            new["spec"].pop("claimRef", None)
            ann.pop(ANN_BOUND_BY_CONTROLLER)
            new["metadata"]["annotations"] = ann
        else:
            new["spec"]["claimRef"] = {k: v for k, v in new["spec"]["claimRef"].items() if k != "uid"}
        pv = await self.put_volume(new)
        await self.update_volume_phase(pv, "Available")

    async def reclaim_volume(self, pv: Obj) -> None:
        """``reclaimVolume``: Retain keeps, Delete goes to the volume's (external) provisioner."""
        policy = (pv.get("spec") or {}).get("persistentVolumeReclaimPolicy") or "Retain"
        if policy == "Retain":
            return
        if policy == "Recycle":
            if phase(pv) != "Failed":
                pv = await self.update_volume_phase(pv, "Failed", "No recycler plugin found for the volume!")
                await self.recorder.event(pv, "Warning", "VolumeFailedRecycle",
                                          "No recycler plugin found for the volume!")
            return
        if policy == "Delete":
            prov = annotations_of(pv).get(ANN_DYNAMICALLY_PROVISIONED)
            if prov and not prov.startswith("kubernetes.io/"):
                return  # "external deleter for volume requested, ignoring": the provisioner deletes it
            if phase(pv) != "Failed":
                msg = (f'error getting deleter volume plugin for volume "{pv["metadata"]["name"]}": '
                       "no deletable volume plugin matched")
                pv = await self.update_volume_phase(pv, "Failed", msg)
                await self.recorder.event(pv, "Warning", "VolumeFailedDelete", msg)
            return
        if phase(pv) != "Failed":
            pv = await self.update_volume_phase(pv, "Failed", "Volume has unrecognized PersistentVolumeReclaimPolicy")
            await self.recorder.event(pv, "Warning", "VolumeUnknownReclaimPolicy",
                                      "Volume has unrecognized PersistentVolumeReclaimPolicy")


# ----------------------------------------------------------------------------- protection


def _without(items: Iterable[str], drop: str) -> list[str]:
    return [i for i in items if i != drop]


class PVCProtection(VolumeControllerBase):
    """``pvc-protection``: a claim being deleted keeps its finalizer while a scheduled Pod
    references it (the kubelet could still be mounting it); every live claim gets the finalizer."""

    name = "pvc-protection"

    def __init__(self, client: Client, informers: Informers) -> None:
        super().__init__(client, informers)
        self.pvcs.add_handler(self.on_claim_event)
        self.pods.add_handler(self._on_pod)

    def _on_pod(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        # every change counts, a deletion above all: the claim may be waiting for its last user
        for pod in (old, new):
            if pod is not None:
                self.enqueue_pod_claims(pod)

    @staticmethod
    def pod_uses(pod: Obj, pvc: Obj) -> bool:
        """``podUsesPVC``: only scheduled pods count (the kubelet never starts a pod whose claim
        is being deleted, so an unscheduled pod cannot start using it)."""
        return bool((pod.get("spec") or {}).get("nodeName")) and pvc["metadata"]["name"] in pod_claims(pod)

    async def _in_use(self, pvc: Obj) -> bool:
        if any(self.pod_uses(p, pvc) for p in self.pods_using(pvc)):
            return True
        # the informer may lag a pod just created: ask the server (upstream askAPIServer)
        lst = await self.client.get(resource_path("v1", "pods", pvc["metadata"]["namespace"]))
        return any(self.pod_uses(p, pvc) for p in lst.get("items") or [])

    async def sync_claim(self, pvc: Obj) -> None:
        meta = pvc["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp") and PVC_PROTECTION in finalizers:
            if await self._in_use(pvc):
                _log.info("claim %s is being deleted but still used by a pod: kept", object_key(pvc))
                return
            _log.info("claim %s is unused: removing %s", object_key(pvc), PVC_PROTECTION)
            await self.put_claim(dict(pvc, metadata=dict(meta, finalizers=_without(finalizers, PVC_PROTECTION))))
            return
        if not meta.get("deletionTimestamp") and PVC_PROTECTION not in finalizers:
            await self.put_claim(dict(pvc, metadata=dict(meta, finalizers=[*finalizers, PVC_PROTECTION])))


class PVProtection(VolumeControllerBase):
    """``pv-protection``: a volume being deleted keeps its finalizer while it is Bound."""

    name = "pv-protection"

    def __init__(self, client: Client, informers: Informers) -> None:
        super().__init__(client, informers)
        self.pvs.add_handler(self.on_volume_event)

    async def sync_volume(self, pv: Obj) -> None:
        meta = pv["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp") and PV_PROTECTION in finalizers:
            if phase(pv) == "Bound":
                _log.info("volume %s is being deleted but still Bound: kept", meta["name"])
                return
            await self.put_volume(dict(pv, metadata=dict(meta, finalizers=_without(finalizers, PV_PROTECTION))))
            return
        if not meta.get("deletionTimestamp") and PV_PROTECTION not in finalizers:
            await self.put_volume(dict(pv, metadata=dict(meta, finalizers=[*finalizers, PV_PROTECTION])))


# ----------------------------------------------------------------------------- expand


def resize_requested(pvc: Obj) -> Fraction | None:
    """The size a bound claim asks to grow to, or None (request <= what is allocated/capacity)."""
    if phase(pvc) != "Bound":
        return None
    want = claim_request(pvc)
    st = pvc.get("status") or {}
    have = storage_of(st.get("allocatedResources")) or storage_of(st.get("capacity"))
    if have is None or want <= have:
        return None
    return want


class ExpandController(VolumeControllerBase):
    """``persistentvolume-expander``: for a claim whose request grew past its capacity, find who
    expands it. The lab has no in-tree expandable plugin, so, as upstream for CSI and other
    external volumes, it records ``ExternalExpanding`` and leaves the work to the external
    resizer (for ``lab.kosmos.io/local``: :class:`kubeemu.ctrl.provisioner.LocalProvisioner`)."""

    name = "persistentvolume-expander"

    def __init__(self, client: Client, informers: Informers) -> None:
        super().__init__(client, informers)
        self.recorder = EventRecorder(client, "volume_expand")
        self._told: set[tuple[str, Fraction]] = set()
        self.pvcs.add_handler(self.on_claim_event)

    async def sync_claim(self, pvc: Obj) -> None:
        want = resize_requested(pvc)
        if want is None or not (pvc.get("spec") or {}).get("volumeName"):
            return
        key = (str(pvc["metadata"].get("uid")), want)
        if key in self._told:
            return
        self._told.add(key)
        await self.recorder.event(pvc, "Normal", "ExternalExpanding",
                                  "waiting for an external controller to expand this PVC")
