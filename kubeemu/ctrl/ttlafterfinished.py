"""The TTL-after-finished controller (upstream ``pkg/controller/ttlafterfinished``).

A Job with ``spec.ttlSecondsAfterFinished`` is deleted that many seconds after it finished
(its ``Complete`` or ``Failed`` condition turned True), with ``propagationPolicy: Foreground``
so its pods go first, and a resourceVersion precondition so a Job changed meanwhile (say, its
TTL raised) is looked at again instead of deleted. Until then the key waits in the queue for
exactly the time left.
"""

from __future__ import annotations

import logging
import time

from kubeemu.client import ApiStatusError, Client, resource_path, split_key
from kubeemu.ctrl import podutil
from kubeemu.ctrl.base import Controller, Informers
from kubeemu.ctrl.job import finished_condition

_log = logging.getLogger(__name__)


class TTLAfterFinishedController(Controller):
    """Deletes finished Jobs whose ``ttlSecondsAfterFinished`` has passed."""

    name = "ttl-after-finished"

    def __init__(self, client: Client, informers: Informers) -> None:
        super().__init__(client, informers)
        self.jobs = informers.get("batch/v1", "jobs")
        self.jobs.add_handler(lambda t, old, new: self.enqueue(new) if new is not None and t != "DELETED" else None)

    async def reconcile(self, key: str) -> None:
        job = self.jobs.get(key)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
        cond = finished_condition(job)
        if ttl is None or cond is None:
            return
        finished = podutil.parse_time((job.get("status") or {}).get("completionTime") if cond["type"] == "Complete"
                                      else None) or podutil.parse_time(cond.get("lastTransitionTime")) or time.time()
        left = finished + int(ttl) - time.time()
        if left > 0:
            self.queue.add_after(key, left)
            return
        ns, name = split_key(key)
        try:
            await self.client.delete(resource_path("batch/v1", "jobs", ns, name), {
                "propagationPolicy": "Foreground",
                "preconditions": {"resourceVersion": job["metadata"]["resourceVersion"]}})
            _log.info("job %s: deleted %s s after it finished (ttlSecondsAfterFinished)", key, ttl)
        except ApiStatusError as e:
            if not (e.not_found or e.conflict):
                raise
