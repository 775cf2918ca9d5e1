"""The StatefulSet controller (upstream ``pkg/controller/statefulset``).

Pods have stable identities: ``<set>-<ordinal>`` for ordinals 0..replicas-1, hostname = pod
name, subdomain = ``spec.serviceName``, labels ``statefulset.kubernetes.io/pod-name``,
``apps.kubernetes.io/pod-index`` and ``controller-revision-hash``. Each ``volumeClaimTemplates``
entry gives every ordinal a PVC ``<template>-<set>-<ordinal>`` (the set's selector labels
added), created before its pod and mounted in place of the template's volume of that name. The
controller never deletes a PVC itself: the default retention (``Retain``) keeps it for the next
pod of that ordinal. With ``persistentVolumeClaimRetentionPolicy.whenDeleted: Delete`` the
claims get an owner reference to the set, with ``whenScaled: Delete`` a condemned pod's claims
get one to that pod, and the API server's garbage collector removes them (as upstream).

One reconcile, in upstream's ``updateStatefulSet`` order:

1. revisions: the *update revision* is ``<set>-<hash>`` of the template (FNV-32 of the
   revision's patch ``{"spec":{"template":{...,"$patch":"replace"}}}`` and the collision count,
   as ``HashControllerRevision``); the *current revision* is ``status.currentRevision`` (the
   update revision when none). When the API server serves ``apps/v1 controllerrevisions`` the
   revisions are ControllerRevision objects owned by the set (history trimmed to
   ``revisionHistoryLimit``) and pods below a rolling-update ``partition`` are made from the
   current revision's template; otherwise only the names are used (and such pods get the update
   template);
2. for each ordinal below ``replicas``: a Failed or Succeeded pod is deleted (re-created next
   pass with the same name, so the same PVCs); a missing pod is created after its PVCs; with
   ``OrderedReady`` (the default) nothing further happens until that pod is Running and Ready
   (and available for ``minReadySeconds``); ``Parallel`` goes on;
3. pods at ordinals >= replicas are deleted from the highest ordinal, one at a time for
   ``OrderedReady`` (waiting for each to be gone, and for unhealthy pods first);
4. ``RollingUpdate`` (not ``OnDelete``): from the highest ordinal down to ``partition``, the
   first pod not at the update revision is deleted, and the update waits for it to come back
   healthy before going on;
5. status: replicas, readyReplicas, availableReplicas, currentReplicas, updatedReplicas,
   currentRevision, updateRevision, collisionCount, observedGeneration; once every pod is
   updated and ready the update revision becomes current.
"""

from __future__ import annotations

import copy
import json
import logging
import re

from kubeemu.client import STRATEGIC_PATCH, ApiStatusError, Client, Obj, object_key, resource_path, split_key
from kubeemu.ctrl import podutil
from kubeemu.ctrl.base import Controller, Informer, Informers, controller_ref, owner_reference, record_event
from kubeemu.ctrl.replicaset import replicas_of

_log = logging.getLogger(__name__)

POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
REVISION_LABEL = "controller-revision-hash"
_ORDINAL = re.compile(r"^(.*)-([0-9]+)$")
COMPONENT = "statefulset-controller"


# -- identities, revisions (pure) -------------------------------------------------------------


def parent_and_ordinal(pod: Obj) -> tuple[str, int]:
    """``getParentNameAndOrdinal``: ("", -1) when the name is not ``<parent>-<n>``."""
    m = _ORDINAL.match(str(pod["metadata"].get("name", "")))
    return (m.group(1), int(m.group(2))) if m else ("", -1)


def is_member_of(sts: Obj, pod: Obj) -> bool:
    return bool(parent_and_ordinal(pod)[0] == sts["metadata"]["name"])


def claim_name(template: Obj, sts: Obj, ordinal: int) -> str:
    return f"{template['metadata']['name']}-{sts['metadata']['name']}-{ordinal}"


def revision_patch(sts: Obj) -> str:
    """``getPatch``: the revision's data, a patch that replaces the template (keys sorted,
    compact, as Go's ``json.Marshal`` writes it)."""
    template = copy.deepcopy((sts.get("spec") or {}).get("template") or {})
    template["$patch"] = "replace"
    return json.dumps({"spec": {"template": template}}, sort_keys=True, separators=(",", ":"))


def fnv32(data: bytes) -> int:
    """FNV-1 (not 1a), 32 bits: Go's ``hash/fnv.New32``, what ``HashControllerRevision`` uses."""
    h = 0x811C9DC5
    for b in data:
        h = (h * 0x01000193) & 0xFFFFFFFF
        h ^= b
    return h


def revision_hash(data: str, collision_count: int | None) -> str:
    """``HashControllerRevision``: FNV-32 of the data, then the collision count in decimal."""
    raw = data.encode()
    if collision_count is not None:
        raw += str(collision_count).encode()
    return podutil.safe_encode(str(fnv32(raw)))


def revision_name(sts: Obj, h: str) -> str:
    """``ControllerRevisionName``: ``<set>-<hash>``, the prefix cut to 223 characters."""
    return f"{sts['metadata']['name'][:223]}-{h}"


def claims_for(sts: Obj, ordinal: int) -> dict[str, Obj]:
    """``getPersistentVolumeClaims``: template name -> the PVC for ``ordinal``."""
    spec = sts.get("spec") or {}
    match = ((spec.get("selector") or {}).get("matchLabels")) or {}
    out: dict[str, Obj] = {}
    for t in spec.get("volumeClaimTemplates") or []:
        claim = copy.deepcopy(t)
        meta = claim.setdefault("metadata", {})
        tname = meta["name"]
        meta["name"] = claim_name(t, sts, ordinal)
        meta["namespace"] = sts["metadata"]["namespace"]
        meta["labels"] = dict(meta.get("labels") or {}, **match)
        for k in ("uid", "resourceVersion", "creationTimestamp"):
            meta.pop(k, None)
        claim["apiVersion"], claim["kind"] = "v1", "PersistentVolumeClaim"
        claim.pop("status", None)
        out[tname] = claim
    return out


def new_pod(sts: Obj, template: Obj, ordinal: int, revision: str) -> Obj:
    """``newVersionedStatefulSetPod``: identity, storage and revision label."""
    name = f"{sts['metadata']['name']}-{ordinal}"
    pod = podutil.pod_from_template(template, sts, name=name)
    labels = pod["metadata"].setdefault("labels", {})
    labels[POD_NAME_LABEL] = name
    labels[POD_INDEX_LABEL] = str(ordinal)
    labels[REVISION_LABEL] = revision
    spec = pod["spec"]
    spec["hostname"] = name
    service = (sts.get("spec") or {}).get("serviceName")
    if service:
        spec["subdomain"] = service
    claims = claims_for(sts, ordinal)
    volumes = [{"name": t, "persistentVolumeClaim": {"claimName": c["metadata"]["name"]}} for t, c in claims.items()]
    volumes += [v for v in spec.get("volumes") or [] if v.get("name") not in claims]
    if volumes:
        spec["volumes"] = volumes
    return pod


def is_created(pod: Obj | None) -> bool:
    return pod is not None and "uid" in pod["metadata"]


def is_terminating(pod: Obj) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def is_running_and_ready(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" and podutil.is_pod_ready(pod)


def is_healthy(pod: Obj) -> bool:
    return is_running_and_ready(pod) and not is_terminating(pod)


def pod_revision(pod: Obj) -> str:
    return str((pod["metadata"].get("labels") or {}).get(REVISION_LABEL) or "")


class StatefulSetController(Controller):
    """Keeps the ordered, named pods (and their PVCs) of each StatefulSet."""

    name = "statefulset"
    workers = 2

    def __init__(self, client: Client, informers: Informers) -> None:
        super().__init__(client, informers)
        self.sets = informers.get("apps/v1", "statefulsets")
        self.pods = informers.get("v1", "pods")
        self.claims = informers.get("v1", "persistentvolumeclaims")
        self.revisions: Informer | None = None  # set in run() when the server serves them
        self.sets.add_handler(lambda t, old, new: self.enqueue(new or old))
        self.pods.add_handler(self._on_pod)

    async def run(self) -> None:
        try:
            doc = await self.client.get("/apis/apps/v1")
            served = any(r.get("name") == "controllerrevisions" for r in doc.get("resources") or [])
        except ApiStatusError:
            served = False
        if served:
            self.revisions = self.informers.get("apps/v1", "controllerrevisions")
            await self.revisions.synced.wait()
        else:
            _log.info("statefulset: apps/v1 controllerrevisions not served; revisions are names only")
        await super().run()

    def _on_pod(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        pod = new or old
        assert pod is not None
        ref = controller_ref(pod)
        ns = pod["metadata"].get("namespace")
        if ref is not None and ref.get("kind") == "StatefulSet":
            self.queue.add(f"{ns}/{ref['name']}")
        elif ref is None and etype != "DELETED":
            labels = pod["metadata"].get("labels") or {}
            for s in self.sets.list(ns):
                if podutil.selector_matches((s.get("spec") or {}).get("selector"), labels):
                    self.queue.add(object_key(s))

    # ---------------------------------------------------------------- revisions

    async def sync_revisions(self, sts: Obj) -> tuple[str, str, Obj, int]:
        """(current revision, update revision, current template, collision count)."""
        spec = sts.get("spec") or {}
        status = sts.get("status") or {}
        collision = int(status.get("collisionCount") or 0)
        data = revision_patch(sts)
        update = revision_name(sts, revision_hash(data, collision))
        current = str(status.get("currentRevision") or update)
        template = spec.get("template") or {}
        current_template = template
        if self.revisions is None:
            return current, update, current_template, collision
        ns = sts["metadata"]["namespace"]
        uid = sts["metadata"]["uid"]
        owned = [r for r in self.revisions.list(ns) if (controller_ref(r) or {}).get("uid") == uid]
        by_name = {r["metadata"]["name"]: r for r in owned}
        existing = by_name.get(update)
        if existing is None:
            rev = max((int(r.get("revision") or 0) for r in owned), default=0) + 1
            cr = {"apiVersion": "apps/v1", "kind": "ControllerRevision",
                  "metadata": {"name": update, "namespace": ns,
                               "labels": dict(((template.get("metadata") or {}).get("labels")) or {},
                                              **{REVISION_LABEL: update.rsplit("-", 1)[1]}),
                               "ownerReferences": [owner_reference(sts)]},
                  "data": json.loads(data), "revision": rev}
            try:
                await self.client.create(resource_path("apps/v1", "controllerrevisions", ns), cr)
            except ApiStatusError as e:
                if not e.conflict:
                    raise
                found = await self.client.get(resource_path("apps/v1", "controllerrevisions", ns, update))
                if (controller_ref(found) or {}).get("uid") != uid or json.dumps(
                        found.get("data"), sort_keys=True, separators=(",", ":")) != data:
                    # a collision: the next pass hashes with collisionCount + 1
                    await self._write_status(sts, dict(status, collisionCount=collision + 1))
                    raise
        else:
            # a rollback to an older template: it becomes the newest revision
            newest = max((int(r.get("revision") or 0) for r in owned), default=0)
            if int(existing.get("revision") or 0) < newest:
                await self.client.patch(resource_path("apps/v1", "controllerrevisions", ns, update),
                                        {"revision": newest + 1}, "application/merge-patch+json")
        cur = by_name.get(current)
        if cur is not None:
            t = ((cur.get("data") or {}).get("spec") or {}).get("template")
            if isinstance(t, dict):
                current_template = {k: v for k, v in t.items() if k != "$patch"}
        return current, update, current_template, collision

    async def truncate_history(self, sts: Obj, pods: list[Obj], current: str, update: str) -> None:
        """``truncateHistory``: keep ``revisionHistoryLimit`` revisions no pod uses."""
        if self.revisions is None:
            return
        ns, uid = sts["metadata"]["namespace"], sts["metadata"]["uid"]
        live = {current, update} | {pod_revision(p) for p in pods}
        history = sorted((r for r in self.revisions.list(ns)
                          if (controller_ref(r) or {}).get("uid") == uid and r["metadata"]["name"] not in live),
                         key=lambda r: int(r.get("revision") or 0))
        limit = int((sts.get("spec") or {}).get("revisionHistoryLimit", 10) or 0)
        for r in history[:max(len(history) - limit, 0)]:
            try:
                await self.client.delete(resource_path("apps/v1", "controllerrevisions", ns, r["metadata"]["name"]))
            except ApiStatusError as e:
                if not e.not_found:
                    raise

    # ---------------------------------------------------------------- pods and claims

    async def create_claims(self, sts: Obj, ordinal: int) -> None:
        """``createPersistentVolumeClaims``: every missing claim of ``ordinal``."""
        ns = sts["metadata"]["namespace"]
        policy = (sts.get("spec") or {}).get("persistentVolumeClaimRetentionPolicy") or {}
        for claim in claims_for(sts, ordinal).values():
            if self.claims.get(f"{ns}/{claim['metadata']['name']}") is not None:
                continue
            if policy.get("whenDeleted") == "Delete":
                ref = owner_reference(sts)
                ref["controller"] = False
                claim["metadata"]["ownerReferences"] = [ref]
            try:
                await self.client.create(resource_path("v1", "persistentvolumeclaims", ns), claim)
                _log.info("statefulset %s: created claim %s", object_key(sts), claim["metadata"]["name"])
                await record_event(
                    self.client, sts, "Normal", "SuccessfulCreate",
                    f"create Claim {claim['metadata']['name']} Pod {sts['metadata']['name']}-{ordinal} in "
                    f"StatefulSet {sts['metadata']['name']} success", COMPONENT)
            except ApiStatusError as e:
                if not e.conflict:
                    raise

    async def fix_identity(self, sts: Obj, pod: Obj, ordinal: int) -> None:
        """``identityMatches`` / ``updateIdentity``: an adopted or edited pod gets its identity
        labels back (name and hostname are fixed at creation)."""
        labels = pod["metadata"].get("labels") or {}
        want = {POD_NAME_LABEL: pod["metadata"]["name"], POD_INDEX_LABEL: str(ordinal)}
        if all(labels.get(k) == v for k, v in want.items()):
            return
        await self.client.patch(resource_path("v1", "pods", pod["metadata"]["namespace"], pod["metadata"]["name"]),
                                {"metadata": {"labels": want, "resourceVersion": pod["metadata"]["resourceVersion"]}},
                                "application/merge-patch+json")

    async def delete_pod(self, sts: Obj, pod: Obj, condemned: bool = False) -> None:
        ns = sts["metadata"]["namespace"]
        policy = (sts.get("spec") or {}).get("persistentVolumeClaimRetentionPolicy") or {}
        if condemned and policy.get("whenScaled") == "Delete":
            ordinal = parent_and_ordinal(pod)[1]
            ref = {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}
            for claim in claims_for(sts, ordinal).values():
                try:
                    await self.client.patch(
                        resource_path("v1", "persistentvolumeclaims", ns, claim["metadata"]["name"]),
                        {"metadata": {"ownerReferences": [ref]}}, STRATEGIC_PATCH)
                except ApiStatusError as e:
                    if not e.not_found:
                        raise
        try:
            await self.client.delete(resource_path("v1", "pods", ns, pod["metadata"]["name"]),
                                     {"preconditions": {"uid": pod["metadata"]["uid"]}})
            _log.info("statefulset %s: deleted pod %s", object_key(sts), pod["metadata"]["name"])
            await record_event(
                self.client, sts, "Normal", "SuccessfulDelete",
                f"delete Pod {pod['metadata']['name']} in StatefulSet {sts['metadata']['name']} successful", COMPONENT)
        except ApiStatusError as e:
            if not (e.not_found or e.conflict):
                raise

    # ---------------------------------------------------------------- reconcile

    async def reconcile(self, key: str) -> None:
        cached = self.sets.get(key)
        if cached is None:
            return
        sts = copy.deepcopy(cached)
        ns, name = split_key(key)
        spec = sts.get("spec") or {}
        selector = spec.get("selector")
        members = [p for p in self.pods.list(ns) if is_member_of(sts, p)]
        pods = await podutil.claim(self.client, sts, selector, members, "v1", "pods",
                                   resource_path("apps/v1", "statefulsets", ns, name))
        current, update, current_template, collision = await self.sync_revisions(sts)
        await self.update_pods(sts, pods, current, update, current_template)
        # status from the pods as they are now (this pass's own writes arrive as events)
        fresh = [p for p in self.pods.list(ns) if (controller_ref(p) or {}).get("uid") == sts["metadata"]["uid"]]
        status = self.status_of(sts, fresh, current, update, collision)
        await self._write_status(sts, status)
        await self.truncate_history(sts, fresh, status["currentRevision"], update)

    async def update_pods(self, sts: Obj, pods: list[Obj], current: str, update: str, current_template: Obj) -> None:
        spec = sts.get("spec") or {}
        n = replicas_of(sts)
        start = int(((spec.get("ordinals") or {}).get("start")) or 0)
        replicas: list[Obj | None] = [None] * n
        condemned: list[Obj] = []
        for p in pods:
            o = parent_and_ordinal(p)[1] - start
            if 0 <= o < n:
                replicas[o] = p
            elif o >= n:
                condemned.append(p)
        condemned.sort(key=lambda p: parent_and_ordinal(p)[1])
        if sts["metadata"].get("deletionTimestamp"):
            return
        monotonic = spec.get("podManagementPolicy", "OrderedReady") != "Parallel"
        strategy = spec.get("updateStrategy") or {}
        partition = int(((strategy.get("rollingUpdate") or {}).get("partition")) or 0)
        template = spec.get("template") or {}
        mrs = int(spec.get("minReadySeconds") or 0)
        first_unhealthy = next((p for p in [*replicas, *condemned] if p is not None and not is_healthy(p)), None)
        for i in range(n):
            pod = replicas[i]
            ordinal = i + start
            if pod is not None and (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded"):
                if not is_terminating(pod):
                    await self.delete_pod(sts, pod)
                if monotonic:
                    return
                continue
            if pod is None:
                rolling = strategy.get("type", "RollingUpdate") == "RollingUpdate"
                use_current = rolling and ordinal < partition
                body = new_pod(sts, current_template if use_current else template, ordinal,
                               current if use_current else update)
                await self.create_claims(sts, ordinal)
                try:
                    await self.client.create(resource_path("v1", "pods", sts["metadata"]["namespace"]), body)
                    _log.info("statefulset %s: created pod %s", object_key(sts), body["metadata"]["name"])
                    await record_event(
                        self.client, sts, "Normal", "SuccessfulCreate",
                        f"create Pod {body['metadata']['name']} in StatefulSet {sts['metadata']['name']} successful",
                        COMPONENT)
                except ApiStatusError as e:
                    if not e.conflict:
                        raise
                if monotonic:
                    return
                continue
            if (pod.get("status") or {}).get("phase") == "Pending":
                await self.create_claims(sts, ordinal)
            if is_terminating(pod) and monotonic:
                return
            if not is_running_and_ready(pod) and monotonic:
                return
            if monotonic and not podutil.is_pod_available(pod, mrs):
                self.queue.add_after(object_key(sts), float(mrs))
                return
            await self.fix_identity(sts, pod, ordinal)
        for pod in reversed(condemned):
            if is_terminating(pod):
                if monotonic:
                    return
                continue
            if not is_running_and_ready(pod) and monotonic and pod is not first_unhealthy:
                return
            await self.delete_pod(sts, pod, condemned=True)
            if monotonic:
                return
        if (strategy.get("type") or "RollingUpdate") == "OnDelete":
            return
        for i in range(n - 1, max(partition, 0) - 1, -1):
            pod = replicas[i]
            if pod is None:
                return
            if pod_revision(pod) != update and not is_terminating(pod):
                await self.delete_pod(sts, pod)
                return
            if not is_healthy(pod):
                return

    def status_of(self, sts: Obj, pods: list[Obj], current: str, update: str, collision: int) -> Obj:
        spec = sts.get("spec") or {}
        mrs = int(spec.get("minReadySeconds") or 0)
        status: Obj = {"observedGeneration": sts["metadata"].get("generation", 0), "replicas": 0,
                       "readyReplicas": 0, "availableReplicas": 0, "currentReplicas": 0, "updatedReplicas": 0,
                       "currentRevision": current, "updateRevision": update, "collisionCount": collision}
        for p in pods:
            status["replicas"] += 1
            if is_running_and_ready(p):
                status["readyReplicas"] += 1
                if podutil.is_pod_available(p, mrs):
                    status["availableReplicas"] += 1
            if not is_terminating(p):
                if pod_revision(p) == current:
                    status["currentReplicas"] += 1
                if pod_revision(p) == update:
                    status["updatedReplicas"] += 1
        rolling = ((spec.get("updateStrategy") or {}).get("type") or "RollingUpdate") == "RollingUpdate"
        if rolling and status["updatedReplicas"] == status["replicas"] == status["readyReplicas"]:
            status["currentReplicas"] = status["updatedReplicas"]
            status["currentRevision"] = update
        old = sts.get("status") or {}
        if old.get("conditions"):
            status["conditions"] = old["conditions"]
        return status

    async def _write_status(self, sts: Obj, status: Obj) -> None:
        if status == (sts.get("status") or {}):
            return
        meta = sts["metadata"]
        body = {"apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "resourceVersion": meta.get("resourceVersion")}, "status": status}
        out = await self.client.replace(
            resource_path("apps/v1", "statefulsets", meta["namespace"], meta["name"], "status"), body)
        sts["metadata"]["resourceVersion"] = out["metadata"]["resourceVersion"]
        sts["status"] = out.get("status") or {}

