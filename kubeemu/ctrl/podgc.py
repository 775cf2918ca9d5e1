"""The pod garbage collector, PodGC (upstream ``pkg/controller/podgc/gc_controller.go``).

Pods that no kubelet will ever finish: without it a pod bound to a Node that was deleted (a
ClusterTree leaf unjoined, its virtual node gone) stays ``Running`` in the API forever. Every
:data:`GC_CHECK_PERIOD` (``gcCheckPeriod``, 20 s) one pass over the informers' pods and nodes, in
upstream's order:

1. **terminated** (``gcTerminated``, only with a threshold > 0): when more pods than
   ``--terminated-pod-gc-threshold`` (12500) are terminated (phase neither Pending, Running nor
   Unknown), the surplus is deleted, evicted ones first, then oldest by creation time, name as
   the tie breaker (``byEvictionAndCreationTimestamp``);
2. **terminating on out-of-service nodes** (``gcTerminating``): pods being deleted on a Node that
   is not Ready and carries the ``node.kubernetes.io/out-of-service`` taint (the admin's word
   that the node is down for good; its kubelet will not confirm the deletion);
3. **orphaned** (``gcOrphaned``): pods bound to a Node the informer does not have. The node name
   is quarantined for :data:`QUARANTINE_TIME` (``quarantineTime``, 40 s); if the informer still
   lacks it after that, a live GET confirms it is gone (a node that came back in the meantime
   keeps its pods). Its pods get the ``DisruptionTarget`` condition, reason ``DeletionByPodGC``;
4. **unscheduled terminating** (``gcUnscheduledTerminating``): pods being deleted that were never
   bound (no ``spec.nodeName``; only finalizers keep such a pod).

Each deletion (``markFailedAndDeletePodWithCondition``) first patches a pod that is not already
Succeeded or Failed to ``Failed`` (with the condition, if any) through the status subresource, so
whoever waits on its phase (a Job's tracking finalizer, a kubectl wait) sees it end, then deletes
it with ``gracePeriodSeconds: 0``: no kubelet is left to confirm a graceful deletion. A failed
request is logged and the pod is looked at again in the next pass; a vanished pod is done.

The only state outside the API is the quarantine (node name -> when its check is due), as
upstream's delaying ``nodeQueue``: a restarted controller starts it over, delaying nothing but
the deletion.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import aiohttp

from kubeemu.client import STRATEGIC_PATCH, ApiStatusError, Client, Obj, object_key, resource_path
from kubeemu.ctrl import podutil
from kubeemu.ctrl.base import Controller, Informers
from kubeemu.objects import now_rfc3339

_log = logging.getLogger(__name__)

#: ``gcCheckPeriod``: how often a pass runs.
GC_CHECK_PERIOD = 20.0
#: ``quarantineTime``: how long a node missing from the informer may take to show up.
QUARANTINE_TIME = 40.0
#: kube-controller-manager's ``--terminated-pod-gc-threshold`` default (<= 0 disables rule 1).
TERMINATED_POD_GC_THRESHOLD = 12500
#: ``v1.TaintNodeOutOfService``.
TAINT_NODE_OUT_OF_SERVICE = "node.kubernetes.io/out-of-service"
#: The condition orphaned pods get before their deletion (``v1.DisruptionTarget``).
DISRUPTION_TARGET = "DisruptionTarget"
REASON_DELETION_BY_POD_GC = "DeletionByPodGC"

#: Connection trouble: logged, and the next pass tries again.
_TRANSIENT = (aiohttp.ClientError, TimeoutError, ConnectionError)


# -- which pods (pure) -------------------------------------------------------------------------


def is_pod_terminated(pod: Obj) -> bool:
    """Upstream's ``isPodTerminated``: any phase but Pending, Running and Unknown."""
    return (pod.get("status") or {}).get("phase") not in ("Pending", "Running", "Unknown")


def is_pod_evicted(pod: Obj) -> bool:
    """``eviction.PodIsEvicted``: Failed with reason ``Evicted``."""
    status = pod.get("status") or {}
    return status.get("phase") == "Failed" and status.get("reason") == "Evicted"


def eviction_creation_key(pod: Obj) -> tuple[bool, float, str]:
    """``byEvictionAndCreationTimestamp``: evicted first, then oldest, then by name."""
    created, name = podutil.creation_key(pod)
    return (not is_pod_evicted(pod), created, name)


def is_node_ready(node: Obj) -> bool:
    """``nodeutil.IsNodeReady``: the Ready condition is True."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (node.get("status") or {}).get("conditions") or [])


def terminated_to_delete(pods: Iterable[Obj], threshold: int) -> list[Obj]:
    """Rule 1: the terminated pods beyond ``threshold``, in deletion order."""
    terminated = [p for p in pods if is_pod_terminated(p)]
    count = len(terminated) - threshold
    if count <= 0:
        return []
    return sorted(terminated, key=eviction_creation_key)[:count]


def terminating_out_of_service(pods: Iterable[Obj], nodes: dict[str, Obj]) -> list[Obj]:
    """Rule 2: pods being deleted on a NotReady node tainted out-of-service (by node name)."""
    out = []
    for pod in pods:
        if not pod["metadata"].get("deletionTimestamp"):
            continue
        node = nodes.get(str((pod.get("spec") or {}).get("nodeName") or ""))
        if node is None:
            continue
        taints = (node.get("spec") or {}).get("taints") or []
        if not is_node_ready(node) and any(t.get("key") == TAINT_NODE_OUT_OF_SERVICE for t in taints):
            out.append(pod)
    return sorted(out, key=eviction_creation_key)


def unscheduled_terminating(pods: Iterable[Obj]) -> list[Obj]:
    """Rule 4: pods being deleted that were never bound to a node."""
    return [p for p in pods if p["metadata"].get("deletionTimestamp") and not (p.get("spec") or {}).get("nodeName")]


class Quarantine:
    """Upstream's delaying ``nodeQueue``: node names due for a check at a time; adding a name
    already waiting keeps the earlier time (client-go's ``AddAfter``)."""

    def __init__(self) -> None:
        self._due: dict[str, float] = {}

    def add_after(self, name: str, delay: float, now: float) -> None:
        self._due[name] = min(self._due.get(name, now + delay), now + delay)

    def pop_due(self, now: float) -> list[str]:
        """The names whose time has come, removed (``discoverDeletedNodes`` drains the ready items)."""
        due = sorted(n for n, t in self._due.items() if t <= now)
        for n in due:
            del self._due[n]
        return due

    def __contains__(self, name: str) -> bool:
        return name in self._due


# -- the controller ------------------------------------------------------------------------------


class PodGCController(Controller):
    """One pass every ``check_period`` seconds (the work queue is unused: the pass is the unit)."""

    name = "podgc"

    def __init__(self, client: Client, informers: Informers, terminated_pod_threshold: int | None = None,
                 check_period: float | None = None, quarantine: float | None = None) -> None:
        """None: upstream's value (:data:`TERMINATED_POD_GC_THRESHOLD`, :data:`GC_CHECK_PERIOD`,
        :data:`QUARANTINE_TIME`); tests shorten the periods (upstream's ``NewPodGCInternal``)."""
        super().__init__(client, informers)
        self.pods = informers.get("v1", "pods")
        self.nodes = informers.get("v1", "nodes")
        self.threshold = TERMINATED_POD_GC_THRESHOLD if terminated_pod_threshold is None else terminated_pod_threshold
        self.check_period = GC_CHECK_PERIOD if check_period is None else check_period
        self.quarantine_time = QUARANTINE_TIME if quarantine is None else quarantine
        self.quarantine = Quarantine()
        #: passes completed (tests wait for a pass that began after a change)
        self.passes = 0

    async def run(self) -> None:
        """Wait for the caches, then a pass every period (``wait.UntilWithContext``) until cancelled."""
        await self.informers.wait_synced()
        _log.info("%s: caches synced; a pass every %g s (threshold %d, quarantine %g s)", self.name,
                  self.check_period, self.threshold, self.quarantine_time)
        while True:
            await self.gc()
            await asyncio.sleep(self.check_period)

    async def gc(self) -> None:
        """One pass, rules in upstream's order, over one snapshot of the caches."""
        pods = list(self.pods.cache.values())
        nodes = {n["metadata"]["name"]: n for n in self.nodes.cache.values()}
        if self.threshold > 0:
            doomed = terminated_to_delete(pods, self.threshold)
            if doomed:
                _log.info("%s: garbage collecting %d terminated pods", self.name, len(doomed))
            await asyncio.gather(*(self.delete_pod(p, "terminated") for p in doomed))
        await asyncio.gather(*(self.delete_pod(p, "terminating on an out-of-service node")
                               for p in terminating_out_of_service(pods, nodes)))
        await self.gc_orphaned(pods, set(nodes))
        for pod in unscheduled_terminating(pods):
            await self.delete_pod(pod, "unscheduled and terminating")
        self.passes += 1

    async def gc_orphaned(self, pods: list[Obj], existing: set[str]) -> None:
        """Rule 3: quarantine unknown node names; delete the pods of those still gone after it."""
        now = time.monotonic()
        for pod in pods:
            node = (pod.get("spec") or {}).get("nodeName")
            if node and node not in existing:
                self.quarantine.add_after(str(node), self.quarantine_time, now)
        deleted: set[str] = set()
        for name in self.quarantine.pop_due(now):
            if name in existing:
                continue
            try:
                await self.client.get(resource_path("v1", "nodes", None, name))
            except ApiStatusError as e:
                if e.not_found:
                    deleted.add(name)
                else:  # the next pass quarantines it again if still needed
                    _log.warning("%s: getting node %s: %s", self.name, name, e)
            except _TRANSIENT as e:
                _log.warning("%s: getting node %s: %s", self.name, name, e or type(e).__name__)
        condition = {"type": DISRUPTION_TARGET, "status": "True", "reason": REASON_DELETION_BY_POD_GC,
                     "message": "PodGC: node no longer exists"}
        for pod in pods:
            node = (pod.get("spec") or {}).get("nodeName")
            if node in deleted:
                await self.delete_pod(pod, f"orphaned (node {node} no longer exists)", condition)

    async def delete_pod(self, pod: Obj, why: str, condition: Obj | None = None) -> None:
        """``markFailedAndDeletePodWithCondition``: Failed (plus ``condition``) unless already
        terminated, then deleted at grace 0. API errors are logged: the next pass retries."""
        key = object_key(pod)
        meta, status = pod["metadata"], pod.get("status") or {}
        path = resource_path("v1", "pods", meta["namespace"], meta["name"])
        _log.info("%s: force deleting pod %s: %s", self.name, key, why)
        try:
            if status.get("phase") not in ("Succeeded", "Failed"):
                new_status: Obj = {"phase": "Failed"}
                if condition is not None:
                    new_status["conditions"] = [dict(condition, lastTransitionTime=now_rfc3339())]
                # the uid, as PatchPodStatus: the API server refuses the patch for a pod re-created
                # under the same name (kubeemu does not check it)
                await self.client.patch(path + "/status", {"metadata": {"uid": meta.get("uid")}, "status": new_status},
                                        STRATEGIC_PATCH)
            await self.client.delete(path, {"gracePeriodSeconds": 0})
        except ApiStatusError as e:
            if not e.not_found:
                _log.warning("%s: deleting pod %s: %s", self.name, key, e)
        except _TRANSIENT as e:
            _log.warning("%s: deleting pod %s: %s", self.name, key, e or type(e).__name__)
