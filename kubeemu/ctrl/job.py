"""The Job controller (upstream ``pkg/controller/job``), NonIndexed and Indexed completion modes.

Pods are made from the template with ``generateName: <job>-`` (``<job>-<index>-`` when
Indexed, with the ``batch.kubernetes.io/job-completion-index`` annotation and label), the labels
``batch.kubernetes.io/controller-uid``, ``controller-uid``, ``batch.kubernetes.io/job-name`` and
``job-name``, a controller reference, and the ``batch.kubernetes.io/job-tracking`` finalizer.

Counting finished pods follows upstream's tracking with finalizers, so a finished pod that is
deleted (by a user, the GC, a restarted controller) is counted exactly once:

1. a pod that finished (Succeeded, or Failed / deleted while still tracked) is recorded in
   ``status.uncountedTerminatedPods`` (a status write);
2. its finalizer is removed (the pod may now go);
3. UIDs whose pod no longer carries the finalizer move from ``uncountedTerminatedPods`` into
   ``status.succeeded`` / ``status.failed``.

One reconcile: claim pods (selector ``batch.kubernetes.io/controller-uid=<uid>``, the one the
API server generates for a Job without ``manualSelector``; used when the Job has no selector of
its own), account finished pods as above, then:

* ``failed > backoffLimit`` (default 6; with ``restartPolicy: OnFailure`` container restarts
  count too) -> condition ``Failed`` reason ``BackoffLimitExceeded``; ``activeDeadlineSeconds``
  passed -> ``Failed`` reason ``DeadlineExceeded``; a failed Job's active pods are deleted;
* otherwise keep ``min(parallelism, completions - succeeded)`` pods active (without
  ``completions``: ``parallelism`` until one succeeds), re-creating after failures with
  upstream's back-off (10 s doubling to 6 min, :attr:`JobController.backoff_base`);
* ``suspend: true``: active pods are deleted, condition ``Suspended`` (JobSuspended); on
  resume it turns False (JobResumed) and ``startTime`` restarts;
* complete when ``succeeded >= completions`` (or, without completions, one succeeded and none
  active): condition ``Complete`` reason ``CompletionsReached``, ``completionTime``.

Status: active, ready, succeeded, failed, startTime, completionTime, conditions,
uncountedTerminatedPods, observedGeneration is not a Job field (upstream has none).
"""

from __future__ import annotations

import copy
import logging
import time

from kubeemu.client import MERGE_PATCH, ApiStatusError, Client, Obj, object_key, resource_path, split_key
from kubeemu.ctrl import podutil
from kubeemu.ctrl.base import Controller, Informers, controller_ref, owner_key, record_event
from kubeemu.objects import now_rfc3339

_log = logging.getLogger(__name__)

TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
LEGACY_CONTROLLER_UID = "controller-uid"
JOB_NAME = "batch.kubernetes.io/job-name"
LEGACY_JOB_NAME = "job-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
MAX_BACKOFF_S = 360.0
COMPONENT = "job-controller"


def effective_selector(job: Obj) -> Obj:
    """The Job's selector, or the one the API server generates (``controller-uid``)."""
    sel = (job.get("spec") or {}).get("selector")
    if sel:
        return dict(sel)
    return {"matchLabels": {CONTROLLER_UID: job["metadata"]["uid"]}}


def want_active(job: Obj, active: int, succeeded: int) -> int:
    """``manageJob``'s wantActive."""
    spec = job.get("spec") or {}
    parallelism = int(spec.get("parallelism", 1) if spec.get("parallelism") is not None else 1)
    completions = spec.get("completions")
    if completions is None:
        return active if succeeded > 0 else parallelism
    return max(min(int(completions) - succeeded, parallelism), 0)


def finished_condition(job: Obj) -> Obj | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return dict(c)
    return None


def finish_time(pod: Obj) -> float:
    """When a pod finished: its containers' latest ``finishedAt``, else its last condition
    change, else its creation (what upstream's back-off record reads)."""
    status = pod.get("status") or {}
    ends = [podutil.parse_time(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt"))
            for cs in status.get("containerStatuses") or []]
    known = [t for t in ends if t is not None]
    if known:
        return max(known)
    conds = [podutil.parse_time(c.get("lastTransitionTime")) for c in status.get("conditions") or []]
    times = [t for t in conds if t is not None]
    return max(times) if times else podutil.parse_time(pod["metadata"].get("creationTimestamp")) or 0.0


def new_condition(ctype: str, reason: str, message: str) -> Obj:
    t = now_rfc3339()
    return {"type": ctype, "status": "True", "lastProbeTime": t, "lastTransitionTime": t, "reason": reason,
            "message": message}


class JobController(Controller):
    """Runs Jobs' pods to completion."""

    name = "job"
    workers = 2
    #: Upstream's ``DefaultJobPodFailureBackOff``; tests shorten it.
    backoff_base = 10.0

    def __init__(self, client: Client, informers: Informers) -> None:
        super().__init__(client, informers)
        self.jobs = informers.get("batch/v1", "jobs")
        self.pods = informers.get("v1", "pods")
        self.expectations = podutil.Expectations()
        self.jobs.add_handler(lambda t, old, new: self.enqueue(new or old))
        self.pods.add_handler(self._on_pod)

    def _on_pod(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        pod = new or old
        assert pod is not None
        key = owner_key(pod, "Job", self.jobs)
        if key is None:
            # a tracked pod whose Job is gone (deleted, namespace deleted): its finalizer must go
            ref = controller_ref(pod)
            if (etype != "DELETED" and ref is not None and ref.get("kind") == "Job"
                    and TRACKING_FINALIZER in (pod["metadata"].get("finalizers") or [])):
                self.queue.add(f"{pod['metadata'].get('namespace')}/{ref['name']}")
            return
        pk = object_key(pod)
        if etype == "ADDED" and not pod["metadata"].get("deletionTimestamp"):
            self.expectations.creation_observed(key)
        elif etype == "DELETED" or (new is not None and new["metadata"].get("deletionTimestamp")
                                    and not ((old or {}).get("metadata") or {}).get("deletionTimestamp")):
            self.expectations.deletion_observed(key, pk)
        self.queue.add(key)

    def _job_path(self, job: Obj, sub: str | None = None) -> str:
        return resource_path("batch/v1", "jobs", job["metadata"]["namespace"], job["metadata"]["name"], sub)

    async def write_status(self, job: Obj, status: Obj) -> None:
        if status == (job.get("status") or {}):
            return
        meta = job["metadata"]
        body = {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "resourceVersion": meta.get("resourceVersion")}, "status": status}
        out = await self.client.replace(self._job_path(job, "status"), body)
        job["metadata"]["resourceVersion"] = out["metadata"]["resourceVersion"]
        job["status"] = out.get("status") or {}

    async def remove_finalizer(self, pod: Obj) -> None:
        fins = [f for f in pod["metadata"].get("finalizers") or [] if f != TRACKING_FINALIZER]
        path = resource_path("v1", "pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
        try:
            await self.client.patch(path, {"metadata": {"finalizers": fins or None,
                                                        "resourceVersion": pod["metadata"]["resourceVersion"]}},
                                    MERGE_PATCH)
        except ApiStatusError as e:
            if not e.not_found:
                raise

    async def release_orphans(self, key: str, uid: str | None) -> None:
        """Remove the tracking finalizer from pods of an earlier Job of this name (or of this
        one, gone): nothing will count them any more (upstream's orphan-pod clean-up)."""
        ns, name = split_key(key)
        for p in self.pods.list(ns):
            ref = controller_ref(p)
            if (ref is not None and ref.get("kind") == "Job" and ref.get("name") == name and ref.get("uid") != uid
                    and TRACKING_FINALIZER in (p["metadata"].get("finalizers") or [])):
                await self.remove_finalizer(p)

    async def reconcile(self, key: str) -> None:
        cached = self.jobs.get(key)
        if cached is None:
            self.expectations.forget(key)
            await self.release_orphans(key, None)
            return
        await self.release_orphans(key, cached["metadata"]["uid"])
        job = copy.deepcopy(cached)
        ns, _ = split_key(key)
        spec = job.get("spec") or {}
        satisfied = self.expectations.satisfied(key)
        pods = await podutil.claim(self.client, job, effective_selector(job), self.pods.list(ns), "v1", "pods",
                                   self._job_path(job))
        now = time.time()
        if finished_condition(job) is not None:
            # a finished Job only lets go of its pods (finalizers) and counts them
            await self.track_finished(job, pods, finished=True)
            return
        # 1-3: count finished pods through uncountedTerminatedPods
        await self.track_finished(job, pods, finished=False)
        status: Obj = copy.deepcopy(job.get("status") or {})
        conds = list(status.get("conditions") or [])
        suspended = next((c for c in conds if c.get("type") == "Suspended"), None)
        if spec.get("suspend"):
            if suspended is None or suspended.get("status") != "True":
                conds = [c for c in conds if c.get("type") != "Suspended"]
                conds.append({**new_condition("Suspended", "JobSuspended", "Job suspended")})
                await record_event(self.client, job, "Normal", "Suspended", "Job suspended", COMPONENT)
        elif suspended is not None and suspended.get("status") == "True":
            c = new_condition("Suspended", "JobResumed", "Job resumed")
            c["status"] = "False"
            conds = [*(x for x in conds if x.get("type") != "Suspended"), c]
            status["startTime"] = now_rfc3339(now)  # activeDeadlineSeconds counts from the resume
            await record_event(self.client, job, "Normal", "Resumed", "Job resumed", COMPONENT)
        if conds:
            status["conditions"] = conds
        if not spec.get("suspend") and not status.get("startTime"):
            status["startTime"] = now_rfc3339(now)
        uncounted = status.get("uncountedTerminatedPods") or {}
        succeeded = int(status.get("succeeded") or 0) + len(uncounted.get("succeeded") or [])
        failed = int(status.get("failed") or 0) + len(uncounted.get("failed") or [])
        active_pods = [p for p in pods if podutil.is_pod_active(p)]
        backoff_limit = int(spec.get("backoffLimit", 6) if spec.get("backoffLimit") is not None else 6)
        template_spec = ((spec.get("template") or {}).get("spec")) or {}
        finished: Obj | None = None
        if failed > backoff_limit or (template_spec.get("restartPolicy") == "OnFailure" and sum(
                int(cs.get("restartCount") or 0) for p in active_pods
                for cs in (p.get("status") or {}).get("containerStatuses") or []) >= backoff_limit > 0):
            finished = new_condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        elif spec.get("activeDeadlineSeconds") is not None and status.get("startTime") and (
                (podutil.parse_time(status["startTime"]) or now) + int(spec["activeDeadlineSeconds"]) <= now):
            finished = new_condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
        active = len(active_pods)
        if finished is not None:
            for p in active_pods:
                await self.delete_pod(key, p)
            active = 0
        elif satisfied and not job["metadata"].get("deletionTimestamp") and not spec.get("suspend"):
            active = await self.manage(key, job, active_pods, succeeded, failed, pods, now)
            completions = spec.get("completions")
            if completions is None:
                complete = succeeded > 0 and active == 0
            else:
                complete = succeeded >= int(completions) and active == 0
            if complete:
                finished = new_condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods")
        elif spec.get("suspend"):
            for p in active_pods:
                await self.delete_pod(key, p)
            active = 0
        status["active"] = active
        status["ready"] = sum(1 for p in active_pods if podutil.is_pod_ready(p)) if finished is None else 0
        status.setdefault("succeeded", 0)
        status.setdefault("failed", 0)
        if finished is not None:
            status["conditions"] = [*(status.get("conditions") or []), finished]
            if finished["type"] == "Complete":
                status["completionTime"] = now_rfc3339(now)
            _log.info("job %s: %s (%s)", key, finished["type"], finished["reason"])
            if finished["type"] == "Complete":
                await record_event(self.client, job, "Normal", "Completed", "Job completed", COMPONENT)
            else:
                await record_event(self.client, job, "Warning", finished["reason"], finished["message"],
                                           COMPONENT)
        if spec.get("activeDeadlineSeconds") is not None and finished is None and status.get("startTime"):
            left = (podutil.parse_time(status["startTime"]) or now) + int(spec["activeDeadlineSeconds"]) - now
            self.queue.add_after(key, max(left, 0.0) + 0.5)
        await self.write_status(job, status)

    async def track_finished(self, job: Obj, pods: list[Obj], finished: bool) -> None:
        """Steps 1-3 of finalizer tracking (see the module header). ``finished``: the Job is
        done, so every tracked pod still running is counted as failed and let go."""
        status: Obj = copy.deepcopy(job.get("status") or {})
        uncounted = status.get("uncountedTerminatedPods") or {}
        succ_u = list(uncounted.get("succeeded") or [])
        fail_u = list(uncounted.get("failed") or [])
        known = set(succ_u) | set(fail_u)
        changed = False
        for p in pods:
            if TRACKING_FINALIZER not in (p["metadata"].get("finalizers") or []):
                continue
            phase = (p.get("status") or {}).get("phase")
            uid = p["metadata"]["uid"]
            if uid in known:
                continue
            if phase == "Succeeded":
                succ_u.append(uid)
            elif phase == "Failed" or p["metadata"].get("deletionTimestamp") or finished:
                fail_u.append(uid)
            else:
                continue
            known.add(uid)
            changed = True
        if changed:
            status["uncountedTerminatedPods"] = {k: v for k, v in (("succeeded", succ_u), ("failed", fail_u)) if v}
            await self.write_status(job, status)
        # step 2: remove finalizers of recorded pods
        by_uid = {p["metadata"]["uid"]: p for p in pods}
        for uid in known:
            tracked = by_uid.get(uid)
            if tracked is not None and TRACKING_FINALIZER in (tracked["metadata"].get("finalizers") or []):
                await self.remove_finalizer(tracked)
        # step 3: every recorded pod is now free of the finalizer (a failed patch raised before
        # this point): count them, as upstream does after its finalizer patches succeed
        if known:
            new = copy.deepcopy(job.get("status") or {})
            new["succeeded"] = int(new.get("succeeded") or 0) + len(succ_u)
            new["failed"] = int(new.get("failed") or 0) + len(fail_u)
            new.pop("uncountedTerminatedPods", None)
            await self.write_status(job, new)

    async def delete_pod(self, key: str, pod: Obj) -> None:
        try:
            await self.client.delete(resource_path("v1", "pods", pod["metadata"]["namespace"],
                                                   pod["metadata"]["name"]))
        except ApiStatusError as e:
            if not e.not_found:
                raise

    def next_indexes(self, job: Obj, pods: list[Obj], n: int) -> list[int | None]:
        """Indexed mode: the lowest completion indexes neither succeeded nor active."""
        spec = job.get("spec") or {}
        if spec.get("completionMode") != "Indexed":
            return [None] * n
        taken: set[int] = set()
        for p in pods:
            raw = (p["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)
            phase = (p.get("status") or {}).get("phase")
            if raw is not None and (podutil.is_pod_active(p) or phase == "Succeeded"):
                taken.add(int(raw))
        out: list[int | None] = []
        for i in range(int(spec.get("completions") or 0)):
            if len(out) == n:
                break
            if i not in taken:
                out.append(i)
        return out

    async def manage(self, key: str, job: Obj, active_pods: list[Obj], succeeded: int, failed: int,
                     all_pods: list[Obj], now: float) -> int:
        """Create or delete pods toward wantActive; the new active count."""
        spec = job.get("spec") or {}
        active = len(active_pods)
        want = want_active(job, active, succeeded)
        if active > want:
            victims = podutil.pods_to_delete(active_pods, active_pods, active - want)
            self.expectations.expect_deletions(key, [object_key(p) for p in victims])
            for p in victims:
                await self.delete_pod(key, p)
            return active - len(victims)
        if active == want:
            return active
        if failed > 0:
            last = max((finish_time(p) for p in all_pods if (p.get("status") or {}).get("phase") == "Failed"),
                       default=0.0)
            delay = min(self.backoff_base * 2 ** (failed - 1), MAX_BACKOFF_S)
            if last and now < last + delay:
                self.queue.add_after(key, last + delay - now)
                return active
        diff = min(want - active, podutil.BURST_REPLICAS)
        indexes = self.next_indexes(job, all_pods, diff)
        diff = len(indexes)
        self.expectations.expect_creations(key, diff)
        template = copy.deepcopy(spec.get("template") or {})
        labels = dict(((template.get("metadata") or {}).get("labels")) or {})
        uid, jname = job["metadata"]["uid"], job["metadata"]["name"]
        labels.update({CONTROLLER_UID: uid, LEGACY_CONTROLLER_UID: uid, JOB_NAME: jname, LEGACY_JOB_NAME: jname})
        template.setdefault("metadata", {})["labels"] = labels
        queue = list(indexes)

        async def create() -> None:
            idx = queue.pop(0)
            body = podutil.pod_from_template(template, job)
            meta = body["metadata"]
            meta["finalizers"] = [*(meta.get("finalizers") or []), TRACKING_FINALIZER]
            if idx is not None:
                meta["generateName"] = f"{jname}-{idx}-"
                meta["annotations"] = dict(meta.get("annotations") or {}, **{COMPLETION_INDEX: str(idx)})
                meta["labels"][COMPLETION_INDEX] = str(idx)
                body["spec"]["hostname"] = f"{jname}-{idx}"
            created = await self.client.create(resource_path("v1", "pods", job["metadata"]["namespace"]), body)
            await record_event(self.client, job, "Normal", "SuccessfulCreate",
                                       f"Created pod: {created['metadata']['name']}", COMPONENT)

        done, err = await podutil.slow_start_batch(diff, 1, create)
        for _ in range(diff - done):
            self.expectations.creation_observed(key)
        if err is not None:
            raise err
        return active + done

