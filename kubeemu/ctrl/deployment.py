"""The Deployment controller (upstream ``pkg/controller/deployment``).

A Deployment owns ReplicaSets named ``<deployment>-<pod-template-hash>``: the hash
(:func:`kubeemu.ctrl.podutil.compute_hash` of the pod template and ``status.collisionCount``)
is added as the ``pod-template-hash`` label to the new set's selector, template and labels, so
sets of different templates never select each other's pods. The set whose template equals the
Deployment's (ignoring that label) is the *new* one; every other owned set is *old*.

One reconcile, in upstream's ``syncDeployment`` order:

1. claim ReplicaSets (adopt orphans the selector matches, release the rest);
2. being deleted: status only. ``checkPausedConditions``; paused: only ``sync`` (scale, history
   cleanup, status);
3. a *scaling event* (an active set's ``deployment.kubernetes.io/desired-replicas`` differs
   from ``spec.replicas``): ``sync``, which scales proportionally across active sets;
4. otherwise roll out by strategy:

   * **RollingUpdate**: scale the new set up to at most ``replicas + maxSurge`` pods in all
     (surge rounds up), else scale old sets down while ``replicas - maxUnavailable`` stay
     available (unavailable rounds down; both 0 -> maxUnavailable 1), unhealthy old pods
     first;
   * **Recreate**: scale every old set to 0, wait until no old pod runs, then create/scale the
     new set to ``replicas``;

5. status: replicas, updatedReplicas, readyReplicas, availableReplicas, unavailableReplicas,
   observedGeneration, and the conditions ``Available`` (MinimumReplicasAvailable /
   MinimumReplicasUnavailable) and ``Progressing`` (NewReplicaSetCreated, FoundNewReplicaSet,
   ReplicaSetUpdated, NewReplicaSetAvailable, ProgressDeadlineExceeded) that
   ``kubectl rollout status`` reads; old sets beyond ``revisionHistoryLimit`` are deleted once
   the rollout is complete.

The revision (``deployment.kubernetes.io/revision``) of a new set is the highest old revision
plus one and is copied to the Deployment. Upstream writes that annotation through the status
subresource (Deployments' status strategy keeps annotations); kubeemu's status subresource
keeps none of the metadata, so it is written with a metadata merge patch instead.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import Any

from kubeemu.client import MERGE_PATCH, ApiStatusError, Client, Obj, object_key, resource_path, split_key
from kubeemu.ctrl import podutil
from kubeemu.ctrl.base import Controller, Informers, controller_ref, owner_key, owner_reference, record_event
from kubeemu.ctrl.replicaset import replicas_of
from kubeemu.objects import now_rfc3339

_log = logging.getLogger(__name__)

REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
DESIRED_REPLICAS = "deployment.kubernetes.io/desired-replicas"
MAX_REPLICAS = "deployment.kubernetes.io/max-replicas"
_SKIP_ANNOTATIONS = frozenset({"kubectl.kubernetes.io/last-applied-configuration", REVISION, REVISION_HISTORY,
                               DESIRED_REPLICAS, MAX_REPLICAS, "deprecated.deployment.rollback.to"})
MAX_REV_HISTORY_CHARS = 2000

# condition reasons (deploymentutil)
NEW_RS_REASON = "NewReplicaSetCreated"
FOUND_NEW_RS_REASON = "FoundNewReplicaSet"
RS_UPDATED_REASON = "ReplicaSetUpdated"
NEW_RS_AVAILABLE_REASON = "NewReplicaSetAvailable"
TIMED_OUT_REASON = "ProgressDeadlineExceeded"
PAUSED_REASON = "DeploymentPaused"
RESUMED_REASON = "DeploymentResumed"
FAILED_RS_CREATE_REASON = "ReplicaSetCreateError"
MIN_AVAILABLE = "MinimumReplicasAvailable"
MIN_UNAVAILABLE = "MinimumReplicasUnavailable"

_MAX_INT32 = 2**31 - 1
COMPONENT = "deployment-controller"


# -- pure arithmetic (deploymentutil) ---------------------------------------------------------


def strategy_type(d: Obj) -> str:
    return str(((d.get("spec") or {}).get("strategy") or {}).get("type") or "RollingUpdate")


def is_rolling(d: Obj) -> bool:
    return strategy_type(d) == "RollingUpdate"


def resolve_fenceposts(max_surge: Any, max_unavailable: Any, desired: int) -> tuple[int, int]:
    """``ResolveFenceposts``: (surge rounded up, unavailable rounded down); both zero -> (0, 1).
    Missing values default to 25% as the API server's defaulting does."""
    surge = podutil.scaled_value(max_surge, desired, True, "25%", "spec.strategy.rollingUpdate.maxSurge")
    unavailable = podutil.scaled_value(max_unavailable, desired, False, "25%",
                                       "spec.strategy.rollingUpdate.maxUnavailable")
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


def _rolling(d: Obj) -> Obj:
    return ((d.get("spec") or {}).get("strategy") or {}).get("rollingUpdate") or {}


def max_surge(d: Obj) -> int:
    if not is_rolling(d):
        return 0
    ru = _rolling(d)
    return resolve_fenceposts(ru.get("maxSurge"), ru.get("maxUnavailable"), replicas_of(d))[0]


def max_unavailable(d: Obj) -> int:
    replicas = replicas_of(d)
    if not is_rolling(d) or replicas == 0:
        return 0
    ru = _rolling(d)
    return min(resolve_fenceposts(ru.get("maxSurge"), ru.get("maxUnavailable"), replicas)[1], replicas)


def spec_replicas(rss: list[Obj]) -> int:
    """``GetReplicaCountForReplicaSets``."""
    return sum(replicas_of(rs) for rs in rss)


def _status_sum(rss: list[Obj], field: str) -> int:
    return sum(int((rs.get("status") or {}).get(field) or 0) for rs in rss)


def new_rs_new_replicas(d: Obj, all_rss: list[Obj], new_rs: Obj) -> int:
    """``NewRSNewReplicas``: how big the new set may be now."""
    replicas = replicas_of(d)
    if is_rolling(d):
        max_total = replicas + max_surge(d)
        current = spec_replicas(all_rss)
        if current >= max_total:
            return replicas_of(new_rs)
        up = min(max_total - current, replicas - replicas_of(new_rs))
        return replicas_of(new_rs) + up
    return replicas


def old_scale_down_budget(d: Obj, all_rss: list[Obj], new_rs: Obj) -> int:
    """``reconcileOldReplicaSets``' maxScaledDown: how many old replicas may go now."""
    min_available = replicas_of(d) - max_unavailable(d)
    new_unavailable = replicas_of(new_rs) - int((new_rs.get("status") or {}).get("availableReplicas") or 0)
    return spec_replicas(all_rss) - min_available - new_unavailable


def round_half_away(x: float) -> int:
    """``integer.RoundToInt32``."""
    return int(x - 0.5) if x < 0 else int(x + 0.5)


def replica_set_fraction(rs: Obj, d: Obj) -> int:
    """``getReplicaSetFraction``: this set's share of a proportional scale."""
    if replicas_of(d) == 0:
        return -replicas_of(rs)
    d_max = replicas_of(d) + max_surge(d)
    try:
        before = int((rs["metadata"].get("annotations") or {}).get(MAX_REPLICAS) or 0)
    except ValueError:
        before = 0
    if before == 0:
        before = int((d.get("status") or {}).get("replicas") or 0)
        if before == 0:
            return 0
    return round_half_away(replicas_of(rs) * d_max / before) - replicas_of(rs)


def proportion(rs: Obj, d: Obj, to_add: int, added: int) -> int:
    """``GetProportion``."""
    if replicas_of(rs) == 0 or to_add == 0 or to_add == added:
        return 0
    frac = replica_set_fraction(rs, d)
    allowed = to_add - added
    return min(frac, allowed) if to_add > 0 else max(frac, allowed)


def by_creation(rss: list[Obj]) -> list[Obj]:
    return sorted(rss, key=podutil.creation_key)


def by_size(rss: list[Obj], newer_first: bool) -> list[Obj]:
    """``ReplicaSetsBySizeNewer`` / ``ReplicaSetsBySizeOlder``: biggest first, then by age."""
    ordered = by_creation(rss)
    if newer_first:
        ordered.reverse()
    return sorted(ordered, key=lambda rs: -replicas_of(rs))


def revision_of(obj: Obj) -> int:
    try:
        return int((obj["metadata"].get("annotations") or {}).get(REVISION) or 0)
    except ValueError:
        return 0


def has_progress_deadline(d: Obj) -> bool:
    pds = (d.get("spec") or {}).get("progressDeadlineSeconds", 600)
    return pds is not None and int(pds) != _MAX_INT32


def get_condition(status: Obj, ctype: str) -> Obj | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), None)


def new_condition(ctype: str, status: str, reason: str, message: str) -> Obj:
    t = now_rfc3339()
    return {"type": ctype, "status": status, "lastUpdateTime": t, "lastTransitionTime": t, "reason": reason,
            "message": message}


def deployment_complete(d: Obj, status: Obj) -> bool:
    r = replicas_of(d)
    return (int(status.get("updatedReplicas") or 0) == r and int(status.get("replicas") or 0) == r
            and int(status.get("availableReplicas") or 0) == r
            and int(status.get("observedGeneration") or 0) >= int(d["metadata"].get("generation") or 0))


def deployment_progressing(d: Obj, new: Obj) -> bool:
    old = d.get("status") or {}

    def g(s: Obj, f: str) -> int:
        return int(s.get(f) or 0)

    return (g(new, "updatedReplicas") > g(old, "updatedReplicas")
            or g(new, "replicas") - g(new, "updatedReplicas") < g(old, "replicas") - g(old, "updatedReplicas")
            or g(new, "readyReplicas") > g(old, "readyReplicas")
            or g(new, "availableReplicas") > g(old, "availableReplicas"))


def deployment_timed_out(d: Obj, status: Obj, now: float) -> bool:
    if not has_progress_deadline(d):
        return False
    cond = get_condition(status, "Progressing")
    if cond is None or cond.get("reason") == NEW_RS_AVAILABLE_REASON:
        return False
    if cond.get("reason") == TIMED_OUT_REASON:
        return True
    since = podutil.parse_time(cond.get("lastUpdateTime")) or now
    return since + int((d.get("spec") or {}).get("progressDeadlineSeconds", 600)) < now


def calculate_status(all_rss: list[Obj], new_rs: Obj | None, d: Obj) -> Obj:
    """``calculateStatus``: counts from the sets' statuses, the Available condition."""
    available = _status_sum(all_rss, "availableReplicas")
    total = spec_replicas(all_rss)
    status: Obj = {
        "observedGeneration": d["metadata"].get("generation", 0),
        "replicas": _status_sum(all_rss, "replicas"),
        "updatedReplicas": _status_sum([new_rs] if new_rs else [], "replicas"),
        "readyReplicas": _status_sum(all_rss, "readyReplicas"),
        "availableReplicas": available,
        "unavailableReplicas": max(total - available, 0),
    }
    old = d.get("status") or {}
    if old.get("collisionCount") is not None:
        status["collisionCount"] = old["collisionCount"]
    conds = [dict(c) for c in old.get("conditions") or []]
    if available >= replicas_of(d) - max_unavailable(d):
        conds = podutil.set_condition(conds, new_condition("Available", "True", MIN_AVAILABLE,
                                                           "Deployment has minimum availability."))
    else:
        conds = podutil.set_condition(conds, new_condition("Available", "False", MIN_UNAVAILABLE,
                                                           "Deployment does not have minimum availability."))
    status["conditions"] = conds
    return status


class DeploymentController(Controller):
    """Rolls Deployments out through ReplicaSets."""

    name = "deployment"
    workers = 4

    def __init__(self, client: Client, informers: Informers) -> None:
        super().__init__(client, informers)
        self.deployments = informers.get("apps/v1", "deployments")
        self.sets = informers.get("apps/v1", "replicasets")
        self.pods = informers.get("v1", "pods")
        self.deployments.add_handler(lambda t, old, new: self.enqueue(new or old))
        self.sets.add_handler(self._on_rs)
        self.pods.add_handler(self._on_pod)

    # ---------------------------------------------------------------- events

    def _on_rs(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        keys = {k for k in (owner_key(o, "Deployment", self.deployments) for o in (old, new) if o) if k}
        rs = new or old
        assert rs is not None
        if controller_ref(rs) is None and etype != "DELETED":
            labels = rs["metadata"].get("labels") or {}
            for d in self.deployments.list(rs["metadata"].get("namespace")):
                if podutil.selector_matches((d.get("spec") or {}).get("selector"), labels):
                    keys.add(object_key(d))
        for k in keys:
            self.queue.add(k)

    def _on_pod(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        """A Recreate rollout waits for old pods to go: their deletion wakes it."""
        if etype != "DELETED" or old is None:
            return
        ref = controller_ref(old)
        if ref is None or ref.get("kind") != "ReplicaSet":
            return
        rs = self.sets.get(f"{old['metadata'].get('namespace')}/{ref['name']}")
        key = owner_key(rs, "Deployment", self.deployments) if rs is not None else None
        if key is not None:
            d = self.deployments.get(key)
            if d is not None and strategy_type(d) == "Recreate":
                self.queue.add(key)

    # ---------------------------------------------------------------- API writes

    def _rs_path(self, rs: Obj, sub: str | None = None) -> str:
        return resource_path("apps/v1", "replicasets", rs["metadata"]["namespace"], rs["metadata"]["name"], sub)

    def _d_path(self, d: Obj, sub: str | None = None) -> str:
        return resource_path("apps/v1", "deployments", d["metadata"]["namespace"], d["metadata"]["name"], sub)

    async def update_status(self, d: Obj, status: Obj) -> Obj:
        """PUT the Deployment's status (optimistic concurrency on the cached resourceVersion)."""
        meta = d["metadata"]
        body = {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "resourceVersion": meta.get("resourceVersion")}, "status": status}
        out = await self.client.replace(self._d_path(d, "status"), body)
        d["metadata"]["resourceVersion"] = out["metadata"]["resourceVersion"]
        d["status"] = out.get("status") or {}
        return out

    async def set_revision(self, d: Obj, revision: str) -> None:
        """``SetDeploymentRevision``: copy the new set's revision onto the Deployment."""
        if (d["metadata"].get("annotations") or {}).get(REVISION) == revision:
            return
        out = await self.client.patch(self._d_path(d), {"metadata": {"annotations": {REVISION: revision}}},
                                      MERGE_PATCH)
        d["metadata"]["annotations"] = out["metadata"].get("annotations") or {}
        d["metadata"]["resourceVersion"] = out["metadata"]["resourceVersion"]

    async def scale_rs(self, rs: Obj, size: int, d: Obj) -> Obj:
        """``scaleReplicaSet``: new size plus the desired/max-replicas annotations."""
        annotations = dict(rs["metadata"].get("annotations") or {})
        want_ann = {DESIRED_REPLICAS: str(replicas_of(d)), MAX_REPLICAS: str(replicas_of(d) + max_surge(d))}
        if replicas_of(rs) == size and all(annotations.get(k) == v for k, v in want_ann.items()):
            return rs
        body = {"metadata": {"annotations": want_ann, "resourceVersion": rs["metadata"]["resourceVersion"]},
                "spec": {"replicas": size}}
        out = await self.client.patch(self._rs_path(rs), body, MERGE_PATCH)
        if replicas_of(rs) != size:
            op = "up" if size > replicas_of(rs) else "down"
            msg = f"Scaled {op} replica set {rs['metadata']['name']} from {replicas_of(rs)} to {size}"
            _log.info("deployment %s: %s", object_key(d), msg)
            await record_event(self.client, d, "Normal", "ScalingReplicaSet", msg, COMPONENT)
        return out

    # ---------------------------------------------------------------- reconcile

    async def reconcile(self, key: str) -> None:
        try:
            await self._reconcile(key)
        except ValueError as e:  # maxSurge "5"
            await self.invalid_spec(key, self.deployments.get(key), e, COMPONENT)

    async def _reconcile(self, key: str) -> None:
        cached = self.deployments.get(key)
        if cached is None:
            return
        d = copy.deepcopy(cached)
        ns, _name = split_key(key)
        spec = d.get("spec") or {}
        selector = spec.get("selector")
        if not selector or (not selector.get("matchLabels") and not selector.get("matchExpressions")):
            _log.warning("deployment %s selects all pods; a non-empty selector is required", key)
            status = d.get("status") or {}
            if int(status.get("observedGeneration") or 0) < int(d["metadata"].get("generation") or 0):
                await self.update_status(d, dict(status, observedGeneration=d["metadata"].get("generation")))
            return
        rs_list = await podutil.claim(
            self.client, d, selector,
            [rs for rs in self.sets.list(ns) if not (rs["metadata"].get("deletionTimestamp")
                                                    and (controller_ref(rs) or {}).get("uid") != d["metadata"]["uid"])],
            "apps/v1", "replicasets", self._d_path(d))
        rs_list = [copy.deepcopy(rs) for rs in rs_list]
        if d["metadata"].get("deletionTimestamp"):
            new_rs, old_rss = await self.new_and_old(d, rs_list, create=False)
            await self.sync_rollout_status(d, old_rss + ([new_rs] if new_rs else []), new_rs, status_only=True)
            return
        await self.check_paused_conditions(d)
        if spec.get("paused"):
            await self.sync(d, rs_list)
            return
        if await self.is_scaling_event(d, rs_list):
            await self.sync(d, rs_list)
            return
        if strategy_type(d) == "Recreate":
            await self.rollout_recreate(d, rs_list)
        else:
            await self.rollout_rolling(d, rs_list)

    async def check_paused_conditions(self, d: Obj) -> None:
        if not has_progress_deadline(d):
            return
        status = d.get("status") or {}
        cond = get_condition(status, "Progressing")
        if cond is not None and cond.get("reason") == TIMED_OUT_REASON:
            return
        paused_cond = cond is not None and cond.get("reason") == PAUSED_REASON
        paused = bool((d.get("spec") or {}).get("paused"))
        if paused and not paused_cond:
            c = new_condition("Progressing", "Unknown", PAUSED_REASON, "Deployment is paused")
        elif not paused and paused_cond:
            c = new_condition("Progressing", "Unknown", RESUMED_REASON, "Deployment is resumed")
        else:
            return
        new = dict(status, conditions=podutil.set_condition(list(status.get("conditions") or []), c))
        await self.update_status(d, new)

    async def new_and_old(self, d: Obj, rs_list: list[Obj], create: bool) -> tuple[Obj | None, list[Obj]]:
        """``getAllReplicaSetsAndSyncRevision``: the new set (created when ``create``), the old."""
        new_rs = next((rs for rs in by_creation(rs_list)
                       if podutil.equal_ignore_hash((rs.get("spec") or {}).get("template") or {},
                                                    (d.get("spec") or {}).get("template") or {})), None)
        old = [rs for rs in rs_list if rs is not new_rs]
        return await self.get_new_rs(d, rs_list, old, new_rs, create), old

    async def get_new_rs(self, d: Obj, rs_list: list[Obj], old: list[Obj], existing: Obj | None,
                         create: bool) -> Obj | None:
        new_revision = str(max((revision_of(rs) for rs in old), default=0) + 1)
        if existing is not None:
            rs = copy.deepcopy(existing)
            changed = self.set_new_rs_annotations(d, rs, new_revision, exists=True)
            mrs = int((d.get("spec") or {}).get("minReadySeconds") or 0)
            if changed or int((rs.get("spec") or {}).get("minReadySeconds") or 0) != mrs:
                rs["spec"]["minReadySeconds"] = mrs
                return await self.client.replace(self._rs_path(rs), rs)
            await self.set_revision(d, (rs["metadata"].get("annotations") or {}).get(REVISION, new_revision))
            status = d.get("status") or {}
            if has_progress_deadline(d) and get_condition(status, "Progressing") is None:
                c = new_condition("Progressing", "True", FOUND_NEW_RS_REASON,
                                  f'Found new replica set "{rs["metadata"]["name"]}"')
                await self.update_status(d, dict(status, conditions=podutil.set_condition(
                    list(status.get("conditions") or []), c)))
            return rs
        if not create:
            return None
        spec = d.get("spec") or {}
        template = copy.deepcopy(spec.get("template") or {})
        status = d.get("status") or {}
        h = podutil.compute_hash(template, status.get("collisionCount"))
        tmeta = template.setdefault("metadata", {})
        tmeta["labels"] = dict(tmeta.get("labels") or {}, **{podutil.POD_TEMPLATE_HASH: h})
        selector = copy.deepcopy(spec.get("selector") or {})
        selector["matchLabels"] = dict(selector.get("matchLabels") or {}, **{podutil.POD_TEMPLATE_HASH: h})
        ns = d["metadata"]["namespace"]
        new_rs: Obj = {
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{d['metadata']['name']}-{h}", "namespace": ns,
                         "ownerReferences": [owner_reference(d)], "labels": dict(tmeta["labels"])},
            "spec": {"replicas": 0, "minReadySeconds": int(spec.get("minReadySeconds") or 0),
                     "selector": selector, "template": template},
        }
        new_rs["spec"]["replicas"] = new_rs_new_replicas(d, [*old, new_rs], new_rs)
        self.set_new_rs_annotations(d, new_rs, new_revision, exists=False)
        already = False
        try:
            created = await self.client.create(resource_path("apps/v1", "replicasets", ns), new_rs)
        except ApiStatusError as e:
            if not e.conflict:
                if has_progress_deadline(d):
                    c = new_condition("Progressing", "False", FAILED_RS_CREATE_REASON,
                                      f'Failed to create new replica set "{new_rs["metadata"]["name"]}": {e.message}')
                    with contextlib.suppress(ApiStatusError):
                        await self.update_status(d, dict(status, conditions=podutil.set_condition(
                            list(status.get("conditions") or []), c)))
                raise
            already = True
            found = self.sets.get(f"{ns}/{new_rs['metadata']['name']}")
            if found is None:
                found = await self.client.get(self._rs_path(new_rs))
            ref = controller_ref(found)
            if ref is not None and ref.get("uid") == d["metadata"]["uid"] and podutil.equal_ignore_hash(
                    (found.get("spec") or {}).get("template") or {}, spec.get("template") or {}):
                created = found
            else:  # a hash collision: bump collisionCount and retry with the next hash
                cc = int(status.get("collisionCount") or 0) + 1
                await self.update_status(d, dict(status, collisionCount=cc))
                _log.info("deployment %s: hash collision on %s, collisionCount now %d", object_key(d),
                          new_rs["metadata"]["name"], cc)
                raise
        if not already:
            _log.info("deployment %s: created replica set %s with %d replicas (revision %s)", object_key(d),
                      created["metadata"]["name"], replicas_of(created), new_revision)
            if replicas_of(created) > 0:
                await record_event(
                    self.client, d, "Normal", "ScalingReplicaSet",
                    f"Scaled up replica set {created['metadata']['name']} from 0 to {replicas_of(created)}", COMPONENT)
        await self.set_revision(d, new_revision)
        if not already and has_progress_deadline(d):
            status = d.get("status") or {}
            c = new_condition("Progressing", "True", NEW_RS_REASON,
                              f'Created new replica set "{created["metadata"]["name"]}"')
            await self.update_status(d, dict(status, conditions=podutil.set_condition(
                list(status.get("conditions") or []), c)))
        return created

    def set_new_rs_annotations(self, d: Obj, rs: Obj, new_revision: str, exists: bool) -> bool:
        """``SetNewReplicaSetAnnotations``: the Deployment's own annotations, the revision (kept
        if higher; a re-used set records its former revisions), and for a new set the
        desired/max-replicas annotations."""
        ann = dict(rs["metadata"].get("annotations") or {})
        changed = False
        for k, v in (d["metadata"].get("annotations") or {}).items():
            if k in _SKIP_ANNOTATIONS:
                continue
            if ann.get(k) != v:
                ann[k] = v
                changed = True
        old_rev = ann.get(REVISION)
        try:
            old_int = int(old_rev) if old_rev else 0
        except ValueError:
            return False
        new_int = int(new_revision)
        if old_int < new_int:
            ann[REVISION] = new_revision
            changed = True
            if old_rev:
                history = [r for r in (ann.get(REVISION_HISTORY) or "").split(",") if r]
                history.append(old_rev)
                while len(",".join(history)) > MAX_REV_HISTORY_CHARS and len(history) > 1:
                    history.pop(0)
                ann[REVISION_HISTORY] = ",".join(history)
        if not exists:
            ann[DESIRED_REPLICAS] = str(replicas_of(d))
            ann[MAX_REPLICAS] = str(replicas_of(d) + max_surge(d))
            changed = True
        rs["metadata"]["annotations"] = ann
        return changed

    async def is_scaling_event(self, d: Obj, rs_list: list[Obj]) -> bool:
        new_rs, old = await self.new_and_old(d, rs_list, create=False)
        for rs in [r for r in [*old, new_rs] if r is not None and replicas_of(r) > 0]:
            raw = (rs["metadata"].get("annotations") or {}).get(DESIRED_REPLICAS)
            try:
                desired = int(raw) if raw is not None else None
            except ValueError:
                desired = None
            if desired is not None and desired != replicas_of(d):
                return True
        return False

    async def sync(self, d: Obj, rs_list: list[Obj]) -> None:
        """Scaling events and paused Deployments: scale, clean up history, write status."""
        new_rs, old = await self.new_and_old(d, rs_list, create=False)
        await self.scale(d, new_rs, old)
        if (d.get("spec") or {}).get("paused") and (d.get("spec") or {}).get("rollbackTo") is None:
            await self.cleanup(d, old)
        await self.sync_rollout_status(d, [*old, *([new_rs] if new_rs else [])], new_rs, status_only=True)

    async def scale(self, d: Obj, new_rs: Obj | None, old: list[Obj]) -> None:
        """Proportional scaling (``scale``)."""
        replicas = replicas_of(d)
        active = [rs for rs in [new_rs, *old] if rs is not None and replicas_of(rs) > 0]
        if new_rs is not None or old:
            if len(active) == 0:
                target = new_rs if new_rs is not None else sorted(old, key=podutil.creation_key)[-1]
                if replicas_of(target) != replicas:
                    await self.scale_rs(target, replicas, d)
                return
            if len(active) == 1:
                if replicas_of(active[0]) != replicas:
                    await self.scale_rs(active[0], replicas, d)
                return
        else:
            return
        if new_rs is not None and self.is_saturated(d, new_rs):
            for rs in old:
                if replicas_of(rs) > 0:
                    await self.scale_rs(rs, 0, d)
            return
        if not is_rolling(d):
            return
        allowed = replicas + max_surge(d) if replicas > 0 else 0
        to_add = allowed - spec_replicas(active)
        ordered = by_size(active, newer_first=to_add > 0) if to_add else active
        added = 0
        sizes: dict[str, int] = {}
        for rs in ordered:
            if to_add:
                p = proportion(rs, d, to_add, added)
                sizes[rs["metadata"]["name"]] = replicas_of(rs) + p
                added += p
            else:
                sizes[rs["metadata"]["name"]] = replicas_of(rs)
        for i, rs in enumerate(ordered):
            n = rs["metadata"]["name"]
            if i == 0 and to_add:
                sizes[n] = max(sizes[n] + to_add - added, 0)
            await self.scale_rs(rs, sizes[n], d)

    @staticmethod
    def is_saturated(d: Obj, rs: Obj) -> bool:
        try:
            desired = int((rs["metadata"].get("annotations") or {}).get(DESIRED_REPLICAS) or "")
        except ValueError:
            return False
        r = replicas_of(d)
        available = int((rs.get("status") or {}).get("availableReplicas") or 0)
        return replicas_of(rs) == r and desired == r and available == r

    async def rollout_rolling(self, d: Obj, rs_list: list[Obj]) -> None:
        new_rs, old = await self.new_and_old(d, rs_list, create=True)
        assert new_rs is not None
        all_rss = [*old, new_rs]
        if await self.reconcile_new_rs(d, all_rss, new_rs):
            await self.sync_rollout_status(d, all_rss, new_rs)
            return
        if await self.reconcile_old_rss(d, all_rss, [rs for rs in old if replicas_of(rs) > 0], new_rs):
            await self.sync_rollout_status(d, all_rss, new_rs)
            return
        if deployment_complete(d, d.get("status") or {}):
            await self.cleanup(d, old)
        await self.sync_rollout_status(d, all_rss, new_rs)

    async def reconcile_new_rs(self, d: Obj, all_rss: list[Obj], new_rs: Obj) -> bool:
        replicas = replicas_of(d)
        if replicas_of(new_rs) == replicas:
            return False
        if replicas_of(new_rs) > replicas:
            await self.scale_rs(new_rs, replicas, d)
            return True
        want = new_rs_new_replicas(d, all_rss, new_rs)
        if want == replicas_of(new_rs):
            return False
        await self.scale_rs(new_rs, want, d)
        return True

    async def reconcile_old_rss(self, d: Obj, all_rss: list[Obj], old: list[Obj], new_rs: Obj) -> bool:
        if spec_replicas(old) == 0:
            return False
        budget = old_scale_down_budget(d, all_rss, new_rs)
        if budget <= 0:
            return False
        # unhealthy replicas first (cleanupUnhealthyReplicas)
        cleaned = 0
        old = by_creation(old)
        for i, rs in enumerate(old):
            if cleaned >= budget:
                break
            avail = int((rs.get("status") or {}).get("availableReplicas") or 0)
            if replicas_of(rs) == 0 or replicas_of(rs) == avail:
                continue
            n = min(budget - cleaned, replicas_of(rs) - avail)
            old[i] = await self.scale_rs(rs, replicas_of(rs) - n, d)
            cleaned += n
        # then while availability allows (scaleDownOldReplicaSetsForRollingUpdate)
        min_available = replicas_of(d) - max_unavailable(d)
        available = _status_sum([*old, new_rs], "availableReplicas")
        scaled = 0
        if available > min_available:
            total = available - min_available
            for rs in by_creation(old):
                if scaled >= total:
                    break
                if replicas_of(rs) == 0:
                    continue
                n = min(replicas_of(rs), total - scaled)
                await self.scale_rs(rs, replicas_of(rs) - n, d)
                scaled += n
        return cleaned + scaled > 0

    async def rollout_recreate(self, d: Obj, rs_list: list[Obj]) -> None:
        new_rs, old = await self.new_and_old(d, rs_list, create=False)
        all_rss = [*old, *([new_rs] if new_rs else [])]
        scaled_down = False
        for rs in old:
            if replicas_of(rs) > 0:
                await self.scale_rs(rs, 0, d)
                scaled_down = True
        if scaled_down:
            await self.sync_rollout_status(d, all_rss, new_rs)
            return
        if self.old_pods_running(new_rs, old):
            await self.sync_rollout_status(d, all_rss, new_rs)
            return
        if new_rs is None:
            new_rs, old = await self.new_and_old(d, rs_list, create=True)
            assert new_rs is not None
            all_rss = [*old, new_rs]
        if replicas_of(new_rs) != replicas_of(d):
            await self.scale_rs(new_rs, replicas_of(d), d)
        if deployment_complete(d, d.get("status") or {}):
            await self.cleanup(d, old)
        await self.sync_rollout_status(d, all_rss, new_rs)

    def old_pods_running(self, new_rs: Obj | None, old: list[Obj]) -> bool:
        if _status_sum(old, "replicas") > 0:
            return True
        uids = {rs["metadata"]["uid"] for rs in old}
        for p in self.pods.list():
            if (controller_ref(p) or {}).get("uid") in uids and (p.get("status") or {}).get("phase") not in (
                    "Failed", "Succeeded"):
                return True
        return False

    async def cleanup(self, d: Obj, old: list[Obj]) -> None:
        """``cleanupDeployment``: delete the oldest empty old sets beyond revisionHistoryLimit."""
        limit = (d.get("spec") or {}).get("revisionHistoryLimit", 10)
        if limit is None:
            return
        alive = [rs for rs in old if not rs["metadata"].get("deletionTimestamp")]
        diff = len(alive) - int(limit)
        if diff <= 0:
            return
        for rs in by_creation(alive)[:diff]:
            st = rs.get("status") or {}
            if (int(st.get("replicas") or 0) != 0 or replicas_of(rs) != 0
                    or int(rs["metadata"].get("generation") or 0) > int(st.get("observedGeneration") or 0)):
                continue
            try:
                await self.client.delete(self._rs_path(rs), {"preconditions": {"uid": rs["metadata"]["uid"]}})
                _log.info("deployment %s: deleted old replica set %s (revisionHistoryLimit %s)", object_key(d),
                          rs["metadata"]["name"], limit)
            except ApiStatusError as e:
                if not (e.not_found or e.conflict):
                    raise

    async def sync_rollout_status(self, d: Obj, all_rss: list[Obj], new_rs: Obj | None,
                                  status_only: bool = False) -> None:
        """``syncRolloutStatus`` (``syncDeploymentStatus`` when ``status_only``)."""
        # the sets as the cache holds them now (their status is what the RS controller wrote)
        fresh = []
        for rs in all_rss:
            cur = self.sets.get(object_key(rs))
            fresh.append(cur if cur is not None and cur["metadata"].get("uid") == rs["metadata"].get("uid") else rs)
        new_fresh = fresh[all_rss.index(new_rs)] if new_rs is not None else None
        status = calculate_status(fresh, new_fresh, d)
        now = time.time()
        if not status_only:
            if not has_progress_deadline(d):
                status["conditions"] = podutil.remove_condition(status["conditions"], "Progressing")
            cur = get_condition(d.get("status") or {}, "Progressing")
            complete_already = (status["replicas"] == status["updatedReplicas"] and cur is not None
                                and cur.get("reason") == NEW_RS_AVAILABLE_REASON)
            if has_progress_deadline(d) and not complete_already:
                rs_name = new_fresh["metadata"]["name"] if new_fresh is not None else None
                if deployment_complete(d, status):
                    msg = (f'ReplicaSet "{rs_name}" has successfully progressed.' if rs_name
                           else f'Deployment "{d["metadata"]["name"]}" has successfully progressed.')
                    status["conditions"] = podutil.set_condition(
                        status["conditions"], new_condition("Progressing", "True", NEW_RS_AVAILABLE_REASON, msg))
                elif deployment_progressing(d, status):
                    msg = (f'ReplicaSet "{rs_name}" is progressing.' if rs_name
                           else f'Deployment "{d["metadata"]["name"]}" is progressing.')
                    c = new_condition("Progressing", "True", RS_UPDATED_REASON, msg)
                    if cur is not None and cur.get("status") == "True" and cur.get("lastTransitionTime"):
                        c["lastTransitionTime"] = cur["lastTransitionTime"]
                    status["conditions"] = [*podutil.remove_condition(status["conditions"], "Progressing"), c]
                elif deployment_timed_out(d, status, now):
                    msg = (f'ReplicaSet "{rs_name}" has timed out progressing.' if rs_name
                           else f'Deployment "{d["metadata"]["name"]}" has timed out progressing.')
                    status["conditions"] = podutil.set_condition(
                        status["conditions"], new_condition("Progressing", "False", TIMED_OUT_REASON, msg))
            failure = next((c for rs in fresh for c in (rs.get("status") or {}).get("conditions") or []
                            if c.get("type") == "ReplicaFailure"), None)
            if failure is not None:
                status["conditions"] = podutil.set_condition(status["conditions"], {
                    "type": "ReplicaFailure", "status": failure.get("status"), "reason": failure.get("reason"),
                    "message": failure.get("message"), "lastUpdateTime": failure.get("lastTransitionTime"),
                    "lastTransitionTime": failure.get("lastTransitionTime")})
            else:
                status["conditions"] = podutil.remove_condition(status["conditions"], "ReplicaFailure")
        if status == (d.get("status") or {}):
            self.requeue_stuck(d, status, now)
            return
        await self.update_status(d, status)

    def requeue_stuck(self, d: Obj, status: Obj, now: float) -> None:
        """``requeueStuckDeployment``: come back when the progress deadline would pass."""
        cond = get_condition(status, "Progressing")
        if (not has_progress_deadline(d) or cond is None or deployment_complete(d, status)
                or cond.get("reason") == TIMED_OUT_REASON):
            return
        since = podutil.parse_time(cond.get("lastUpdateTime")) or now
        after = since + int((d.get("spec") or {}).get("progressDeadlineSeconds", 600)) - now
        self.queue.add_after(object_key(d), max(after, 0.0) + 1.0)

