"""The ReplicaSet controller (upstream ``pkg/controller/replicaset``).

One reconcile of a ReplicaSet, in upstream's order:

1. read the ReplicaSet from the cache (gone: forget its expectations);
2. take the active pods of its namespace (not Succeeded/Failed, not being deleted: a pod the
   kubelet failed, e.g. ``OutOfcpu`` at admission, no longer counts and is replaced; it is left
   in place, as upstream leaves it to the pod garbage collector) and **claim** them: adopt
   orphans the selector matches, release owned pods it no longer matches;
3. if its **expectations** are met (every create/delete it made last time has been seen in the
   cache) and it is not being deleted: create the missing pods (``<rs>-`` generateName, the
   template's labels, a controller reference; slow-start batches of 1, 2, 4 ...) or delete the
   surplus, the pods upstream's ranking prefers (unscheduled, Pending, not ready, doubled up on a
   node, ready for less time, more restarts, newer);
4. write status: replicas, fullyLabeledReplicas, readyReplicas, availableReplicas (ready for
   ``minReadySeconds``), observedGeneration, and the ReplicaFailure condition while a create or
   delete fails; requeue after ``minReadySeconds`` while pods are ready but not yet available.

Pod events are mapped to the owning ReplicaSet (or, for an orphan, to every ReplicaSet whose
selector matches it) and lower its expectations.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

from kubeemu.client import ApiStatusError, Client, Obj, object_key, resource_path, split_key
from kubeemu.ctrl import podutil
from kubeemu.ctrl.base import Controller, Informers, controller_ref, owner_key, record_event
from kubeemu.objects import now_rfc3339

_log = logging.getLogger(__name__)


def replicas_of(obj: Obj) -> int:
    """``spec.replicas``, defaulted to 1 as the API server's defaulting does."""
    r = (obj.get("spec") or {}).get("replicas")
    return 1 if r is None else int(r)


def calculate_status(rs: Obj, pods: list[Obj], manage_error: Exception | None, now: float | None = None) -> Obj:
    """The ReplicaSet status for its claimed active ``pods`` (``calculateStatus``)."""
    spec = rs.get("spec") or {}
    template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    min_ready = int(spec.get("minReadySeconds") or 0)
    status = copy.deepcopy(rs.get("status") or {})
    fully = ready = available = 0
    for p in pods:
        labels = p["metadata"].get("labels") or {}
        if all(labels.get(k) == v for k, v in template_labels.items()):
            fully += 1
        if podutil.is_pod_ready(p):
            ready += 1
            if podutil.is_pod_available(p, min_ready, now):
                available += 1
    conds: list[Obj] = list(status.get("conditions") or [])
    failure = next((c for c in conds if c.get("type") == "ReplicaFailure"), None)
    if manage_error is not None and failure is None:
        diff = len(pods) - replicas_of(rs)
        reason = "FailedCreate" if diff < 0 else "FailedDelete" if diff > 0 else ""
        conds.append({"type": "ReplicaFailure", "status": "True", "lastTransitionTime": now_rfc3339(),
                      "reason": reason, "message": str(manage_error)})
    elif manage_error is None and failure is not None:
        conds = podutil.remove_condition(conds, "ReplicaFailure")
    if conds:
        status["conditions"] = conds
    else:
        status.pop("conditions", None)
    status["replicas"] = len(pods)
    status["fullyLabeledReplicas"] = fully
    status["readyReplicas"] = ready
    status["availableReplicas"] = available
    return status


class ReplicaSetController(Controller):
    """Keeps ``spec.replicas`` pods of each ReplicaSet."""

    name = "replicaset"
    workers = 4
    component = "replicaset-controller"
    kind = "ReplicaSet"
    api_version = "apps/v1"
    plural = "replicasets"

    def __init__(self, client: Client, informers: Informers) -> None:
        super().__init__(client, informers)
        self.sets = informers.get(self.api_version, self.plural)
        self.pods = informers.get("v1", "pods")
        self.expectations = podutil.Expectations()
        self.sets.add_handler(lambda t, old, new: self.enqueue(new or old))
        self.pods.add_handler(self._on_pod)

    # ---------------------------------------------------------------- events

    def _matching_sets(self, pod: Obj) -> list[str]:
        ns = pod["metadata"].get("namespace")
        labels = pod["metadata"].get("labels") or {}
        return [object_key(rs) for rs in self.sets.list(ns)
                if podutil.selector_matches((rs.get("spec") or {}).get("selector"), labels)]

    def _pod_deleted(self, pod: Obj) -> None:
        """``deletePod``: the owner's deletion is observed (also when only deletionTimestamp
        was set: a replacement is due as soon as a pod starts terminating)."""
        key = owner_key(pod, self.kind, self.sets)
        if key is not None:
            self.expectations.deletion_observed(key, object_key(pod))
            self.queue.add(key)

    def _on_pod(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        """``addPod`` / ``updatePod`` / ``deletePod``: map the event to ReplicaSet keys."""
        if etype == "DELETED":
            pod = new or old
            assert pod is not None
            self._pod_deleted(pod)
            return
        assert new is not None
        if etype == "ADDED" or old is None:
            if new["metadata"].get("deletionTimestamp"):
                self._pod_deleted(new)
                return
            key = owner_key(new, self.kind, self.sets)
            if key is not None:
                self.expectations.creation_observed(key)
                self.queue.add(key)
            elif controller_ref(new) is None:
                for k in self._matching_sets(new):
                    self.queue.add(k)
            return
        labels_changed = (old["metadata"].get("labels") or {}) != (new["metadata"].get("labels") or {})
        if new["metadata"].get("deletionTimestamp"):
            self._pod_deleted(new)
            if labels_changed:
                self._pod_deleted(old)
            return
        keys = {k for k in (owner_key(old, self.kind, self.sets), owner_key(new, self.kind, self.sets)) if k}
        if controller_ref(new) is None and (labels_changed or controller_ref(old) is not None):
            keys.update(self._matching_sets(new))  # an orphan now: whoever matches may adopt it
        for k in keys:
            self.queue.add(k)
        key = owner_key(new, self.kind, self.sets)
        if key is not None and not podutil.is_pod_ready(old) and podutil.is_pod_ready(new):
            rs = self.sets.get(key)
            mrs = int(((rs or {}).get("spec") or {}).get("minReadySeconds") or 0)
            if mrs > 0:
                # available only after minReadySeconds: look again then (upstream adds 1 s)
                self.queue.add_after(key, mrs + 1)

    # ---------------------------------------------------------------- reconcile

    def related_pods(self, rs: Obj) -> list[Obj]:
        """Pods of every ReplicaSet with the same controller owner (``getIndirectlyRelatedPods``);
        only this set's pods when it has no owner."""
        ref = controller_ref(rs)
        ns = rs["metadata"].get("namespace")
        if ref is None:
            uids = {rs["metadata"]["uid"]}
        else:
            uids = {s["metadata"]["uid"] for s in self.sets.list(ns)
                    if (controller_ref(s) or {}).get("uid") == ref.get("uid")}
            uids.add(rs["metadata"]["uid"])
        return [p for p in self.pods.list(ns) if (controller_ref(p) or {}).get("uid") in uids]

    async def reconcile(self, key: str) -> None:
        rs = self.sets.get(key)
        if rs is None:
            self.expectations.forget(key)
            return
        ns, name = split_key(key)
        spec = rs.get("spec") or {}
        selector = spec.get("selector")
        needs_sync = self.expectations.satisfied(key)
        active = [p for p in self.pods.list(ns) if podutil.is_pod_active(p)]
        owner_path = resource_path(self.api_version, self.plural, ns, name)
        pods = await podutil.claim(self.client, rs, selector, active, "v1", "pods", owner_path)
        manage_error: Exception | None = None
        if needs_sync and not rs["metadata"].get("deletionTimestamp"):
            try:
                await self.manage_replicas(key, rs, pods)
            except ApiStatusError as e:
                manage_error = e
        status = calculate_status(rs, pods, manage_error)
        await self.write_status(rs, status)
        if manage_error is not None:
            raise manage_error
        mrs = int(spec.get("minReadySeconds") or 0)
        want = replicas_of(rs)
        if mrs > 0 and status["readyReplicas"] == want and status["availableReplicas"] != want:
            self.queue.add_after(key, float(mrs))

    async def write_status(self, rs: Obj, status: Obj) -> None:
        """PUT the status when it changed (``updateReplicaSetStatus``), with observedGeneration."""
        gen = rs["metadata"].get("generation")
        if gen is not None:
            status["observedGeneration"] = gen
        if status == (rs.get("status") or {}):
            return
        meta = rs["metadata"]
        body = {"apiVersion": rs.get("apiVersion", self.api_version), "kind": self.kind,
                "metadata": {"name": meta["name"], "namespace": meta.get("namespace"),
                             "resourceVersion": meta.get("resourceVersion")},
                "status": status}
        await self.client.replace(resource_path(self.api_version, self.plural, meta.get("namespace"), meta["name"],
                                                "status"), body)

    async def manage_replicas(self, key: str, rs: Obj, pods: list[Obj]) -> None:
        """Create or delete pods toward ``spec.replicas`` (``manageReplicas``)."""
        ns = rs["metadata"]["namespace"]
        diff = len(pods) - replicas_of(rs)
        if diff < 0:
            n = min(-diff, podutil.BURST_REPLICAS)
            self.expectations.expect_creations(key, n)
            template = (rs.get("spec") or {}).get("template") or {}
            body = podutil.pod_from_template(template, rs)

            async def create() -> None:
                try:
                    created = await self.client.create(resource_path("v1", "pods", ns), body)
                except ApiStatusError as e:
                    if _namespace_terminating(e):
                        return
                    raise
                _log.info("%s %s: created pod %s", self.kind, key, created["metadata"]["name"])
                podutil.record_event_soon(self.client, rs, "Normal", "SuccessfulCreate",
                                          f"Created pod: {created['metadata']['name']}", self.component)

            done, err = await podutil.slow_start_batch(n, 1, create)
            for _ in range(n - done):
                self.expectations.creation_observed(key)
            if err is not None:
                await record_event(self.client, rs, "Warning", "FailedCreate", f"Error creating: {err}",
                                           self.component)
                raise err
        elif diff > 0:
            n = min(diff, podutil.BURST_REPLICAS)
            victims = podutil.pods_to_delete(pods, self.related_pods(rs), n)
            self.expectations.expect_deletions(key, [object_key(p) for p in victims])

            async def delete(p: Obj) -> None:
                pk = object_key(p)
                try:
                    await self.client.delete(resource_path("v1", "pods", ns, p["metadata"]["name"]),
                                             {"preconditions": {"uid": p["metadata"]["uid"]}})
                    _log.info("%s %s: deleted pod %s", self.kind, key, pk)
                    podutil.record_event_soon(self.client, rs, "Normal", "SuccessfulDelete",
                                              f"Deleted pod: {p['metadata']['name']}", self.component)
                except ApiStatusError as e:
                    self.expectations.deletion_observed(key, pk)
                    if not (e.not_found or e.conflict):
                        raise

            results = await asyncio.gather(*(delete(p) for p in victims), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r


def _namespace_terminating(e: ApiStatusError) -> bool:
    causes: list[Any] = (e.status.get("details") or {}).get("causes") or []
    return e.code == 403 and (any(c.get("reason") == "NamespaceTerminating" for c in causes)
                              or "being terminated" in e.message)

