"""The DaemonSet controller (upstream ``pkg/controller/daemon``).

One pod per node that should run it. Whether a node should (``NodeShouldRunDaemonPod``) is
upstream's DaemonSet predicate on the pod the set would make there: ``nodeSelector``, required
node affinity (``matchExpressions`` on labels, ``matchFields`` on ``metadata.name``), and taints
with effect NoSchedule/NoExecute that the pod does not tolerate. The pod's tolerations include
the ones upstream adds to every daemon pod (not-ready/unreachable NoExecute; disk-, memory-,
pid-pressure and unschedulable NoSchedule; network-unavailable for hostNetwork), so daemon pods
run on cordoned nodes. An untolerated NoSchedule taint only stops new pods; NoExecute also
removes running ones.

**Binding.** Upstream (since 1.12) gives each daemon pod required node affinity
``matchFields metadata.name In [node]`` and leaves the binding to the default scheduler. The
lab runs no scheduler yet (``scheduler: none``), so this controller ALSO sets ``spec.nodeName``
itself, as DaemonSets did before 1.12; the affinity is set too, so a scheduler would agree.

One reconcile, in upstream's ``syncDaemonSet`` order:

1. the revision hash of the template (``controller-revision-hash``, as the StatefulSet's:
   FNV-32 of the revision patch and the collision count; no ControllerRevision objects here);
2. per node: create the missing pod; delete Failed (with a per-node back-off, 1 s doubling to
   15 min, as upstream's ``failedPodsBackoff``) and Succeeded pods, all but the oldest of
   duplicates, and pods on nodes that should not run them;
3. RollingUpdate (default; maxUnavailable default 1, maxSurge default 0, percentages of the
   desired count rounded up): without surge, delete old-revision pods on at most
   ``maxUnavailable`` nodes minus those unavailable, unavailable old pods first; with
   ``maxSurge``, start a new pod next to the old one on up to ``maxSurge`` nodes (at once where
   the old one is unavailable) and delete the old pod once the new one is available.
   ``OnDelete`` waits for users to delete old pods.
4. status: desiredNumberScheduled, currentNumberScheduled, numberMisscheduled, numberReady,
   numberAvailable, numberUnavailable, updatedNumberScheduled, observedGeneration.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

from kubeemu.client import ApiStatusError, Client, Obj, object_key, resource_path, split_key
from kubeemu.ctrl import podutil
from kubeemu.ctrl.base import Controller, Informers, controller_ref, owner_key, record_event
from kubeemu.ctrl.statefulset import REVISION_LABEL, revision_hash, revision_patch

_log = logging.getLogger(__name__)

TEMPLATE_GENERATION = "pod-template-generation"
_BACKOFF_START, _BACKOFF_MAX = 1.0, 900.0
COMPONENT = "daemonset-controller"


def daemon_tolerations(spec: Obj) -> list[Obj]:
    """``AddOrUpdateDaemonPodTolerations``: the pod's tolerations plus upstream's defaults."""
    out = [dict(t) for t in spec.get("tolerations") or []]
    defaults = [("node.kubernetes.io/not-ready", "NoExecute"), ("node.kubernetes.io/unreachable", "NoExecute"),
                ("node.kubernetes.io/disk-pressure", "NoSchedule"),
                ("node.kubernetes.io/memory-pressure", "NoSchedule"),
                ("node.kubernetes.io/pid-pressure", "NoSchedule"),
                ("node.kubernetes.io/unschedulable", "NoSchedule")]
    if spec.get("hostNetwork"):
        defaults.append(("node.kubernetes.io/network-unavailable", "NoSchedule"))
    for key, effect in defaults:
        if not any(t.get("key") == key and t.get("effect") == effect for t in out):
            out.append({"key": key, "operator": "Exists", "effect": effect})
    return out


def tolerates(tolerations: list[Obj], taint: Obj) -> bool:
    """``Toleration.ToleratesTaint``."""
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        op = t.get("operator") or "Equal"
        if t.get("key"):
            if t.get("key") != taint.get("key"):
                continue
        elif op != "Exists":
            continue
        if op == "Exists" or (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def _expr_matches(expr: Obj, values: dict[str, str]) -> bool:
    key, op = str(expr.get("key")), str(expr.get("operator"))
    vals = [str(v) for v in expr.get("values") or []]
    has = key in values
    if op == "In":
        return has and values[key] in vals
    if op == "NotIn":
        return not has or values[key] not in vals
    if op == "Exists":
        return has
    if op == "DoesNotExist":
        return not has
    if op in ("Gt", "Lt"):
        try:
            v, ref = int(values[key]), int(vals[0])
        except (KeyError, IndexError, ValueError):
            return False
        return v > ref if op == "Gt" else v < ref
    return False


def node_affinity_matches(spec: Obj, node: Obj) -> bool:
    """``nodeSelector`` and ``requiredDuringSchedulingIgnoredDuringExecution`` (terms ORed,
    expressions within a term ANDed; an empty term list matches nothing)."""
    labels = node["metadata"].get("labels") or {}
    for k, v in (spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return False
    req = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
           .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if req is None:
        return True
    terms = req.get("nodeSelectorTerms") or []
    fields = {"metadata.name": node["metadata"]["name"]}
    for term in terms:
        exprs, mfields = term.get("matchExpressions") or [], term.get("matchFields") or []
        if not exprs and not mfields:
            continue
        if all(_expr_matches(e, labels) for e in exprs) and all(_expr_matches(e, fields) for e in mfields):
            return True
    return False


def should_run(ds: Obj, node: Obj) -> tuple[bool, bool]:
    """``NodeShouldRunDaemonPod``: (should run, should continue running)."""
    spec = copy.deepcopy(((ds.get("spec") or {}).get("template") or {}).get("spec") or {})
    if not node_affinity_matches(spec, node):
        return False, False
    tols = daemon_tolerations(spec)
    run = cont = True
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") not in ("NoSchedule", "NoExecute") or tolerates(tols, taint):
            continue
        run = False
        if taint.get("effect") == "NoExecute":
            cont = False
    return run, cont


def node_of(pod: Obj) -> str:
    """The node a daemon pod is for: ``spec.nodeName``, else its matchFields affinity."""
    name = (pod.get("spec") or {}).get("nodeName")
    if name:
        return str(name)
    req = ((((pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {})
           .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    for term in req.get("nodeSelectorTerms") or []:
        for f in term.get("matchFields") or []:
            if f.get("key") == "metadata.name" and f.get("operator") == "In" and len(f.get("values") or []) == 1:
                return str(f["values"][0])
    return ""


def max_surge(ds: Obj, desired: int) -> int:
    """``SurgeCount`` (rounded up; default 0)."""
    ru = (((ds.get("spec") or {}).get("updateStrategy") or {}).get("rollingUpdate")) or {}
    return podutil.scaled_value(ru.get("maxSurge"), desired, True, 0, "spec.updateStrategy.rollingUpdate.maxSurge")


def max_unavailable(ds: Obj, desired: int) -> int:
    """``UnavailableCount`` (rounded up); 1 when it and maxSurge both resolve to 0."""
    ru = (((ds.get("spec") or {}).get("updateStrategy") or {}).get("rollingUpdate")) or {}
    n = podutil.scaled_value(ru.get("maxUnavailable"), desired, True, 1,
                             "spec.updateStrategy.rollingUpdate.maxUnavailable")
    return 1 if desired > 0 and n == 0 and max_surge(ds, desired) == 0 else n


def split_updated(pods: list[Obj], h: str) -> tuple[Obj | None, Obj | None, bool]:
    """``findUpdatedPodsOnNode``: (new pod, old pod, ok); not ok with two of either."""
    new = old = None
    for p in pods:
        if p["metadata"].get("deletionTimestamp"):
            continue
        if (p["metadata"].get("labels") or {}).get(REVISION_LABEL) == h:
            if new is not None:
                return None, None, False
            new = p
        else:
            if old is not None:
                return None, None, False
            old = p
    return new, old, True


def surge_step(ds: Obj, node_pods: dict[str, list[Obj]], should: dict[str, bool], h: str, desired: int,
               now: float | None = None) -> tuple[list[Obj], list[str]]:
    """``rollingUpdate`` with maxSurge: (old pods to delete, nodes to start a new pod on)."""
    mrs = int((ds.get("spec") or {}).get("minReadySeconds") or 0)
    surge = max_surge(ds, desired)
    delete: list[Obj] = []
    not_run: list[Obj] = []
    candidates: list[str] = []
    allowed: list[str] = []
    num_surge = available = 0
    for node in sorted(node_pods):
        new, old, ok = split_updated(node_pods[node], h)
        if not ok:
            num_surge += 1
            continue
        cur = old if old is not None else new
        if cur is not None and podutil.is_pod_available(cur, mrs, now):
            available += 1
        if old is None:
            continue
        if new is None:
            if not podutil.is_pod_available(old, mrs, now):
                if not should.get(node, False):
                    delete.append(old)
                    continue
                allowed.append(node)
            else:
                if not should.get(node, False):
                    not_run.append(old)
                    continue
                if num_surge >= surge:
                    continue
                candidates.append(node)
        elif not podutil.is_pod_available(new, mrs, now):
            num_surge += 1
        else:
            delete.append(old)
    deletable = min(max(available - desired, 0), len(not_run))
    delete.extend(not_run[:deletable])
    remaining = min(max(surge - num_surge, 0), len(candidates))
    return delete, allowed + candidates[:remaining]


def old_pods_to_delete(ds: Obj, node_pods: dict[str, list[Obj]], h: str, desired: int,
                       now: float | None = None) -> list[Obj]:
    """``rollingUpdate`` without surge: old pods to delete this pass."""
    mrs = int((ds.get("spec") or {}).get("minReadySeconds") or 0)
    limit = max_unavailable(ds, desired)
    unavailable = 0
    allowed: list[Obj] = []
    candidates: list[Obj] = []
    for node in sorted(node_pods):
        pods = [p for p in node_pods[node] if not p["metadata"].get("deletionTimestamp")]
        new = [p for p in pods if (p["metadata"].get("labels") or {}).get(REVISION_LABEL) == h]
        old = [p for p in pods if p not in new]
        if len(new) > 1 or len(old) > 1 or (new and old) or (not new and not old):
            unavailable += 1
            continue
        if new:
            if not podutil.is_pod_available(new[0], mrs, now):
                unavailable += 1
            continue
        if not podutil.is_pod_available(old[0], mrs, now):
            allowed.append(old[0])
        elif unavailable < limit:
            candidates.append(old[0])
    remaining = min(max(limit - unavailable, 0), len(candidates))
    return allowed + candidates[:remaining]


class DaemonSetController(Controller):
    """One pod of each DaemonSet on every node that should run it."""

    name = "daemonset"
    workers = 2

    def __init__(self, client: Client, informers: Informers) -> None:
        super().__init__(client, informers)
        self.sets = informers.get("apps/v1", "daemonsets")
        self.pods = informers.get("v1", "pods")
        self.nodes = informers.get("v1", "nodes")
        self.expectations = podutil.Expectations()
        self.failed_backoff: dict[str, tuple[float, float]] = {}  # "<ds key>/<node>" -> (delay, since)
        self.sets.add_handler(lambda t, old, new: self.enqueue(new or old))
        self.nodes.add_handler(self._on_node)
        self.pods.add_handler(self._on_pod)

    def _on_node(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        """Nodes added or removed, or whose labels or spec (taints) changed, may change where
        daemon pods belong; status heartbeats do not (``shouldIgnoreNodeUpdate``)."""
        if etype == "MODIFIED" and old is not None and new is not None and (
                old["metadata"].get("labels") == new["metadata"].get("labels")
                and old.get("spec") == new.get("spec")):
            return
        for ds in self.sets.list():
            self.queue.add(object_key(ds))

    def _on_pod(self, etype: str, old: Obj | None, new: Obj | None) -> None:
        pod = new or old
        assert pod is not None
        if controller_ref(pod) is not None:
            key = owner_key(pod, "DaemonSet", self.sets)
            if key is None:
                return
            if etype == "ADDED":
                self.expectations.creation_observed(key)
            elif etype == "DELETED" or (new is not None and new["metadata"].get("deletionTimestamp")
                                        and not ((old or {}).get("metadata") or {}).get("deletionTimestamp")):
                self.expectations.deletion_observed(key, object_key(pod))
            self.queue.add(key)
        elif etype != "DELETED":
            labels = pod["metadata"].get("labels") or {}
            for ds in self.sets.list(pod["metadata"].get("namespace")):
                if podutil.selector_matches((ds.get("spec") or {}).get("selector"), labels):
                    self.queue.add(object_key(ds))

    def revision(self, ds: Obj) -> str:
        return revision_hash(revision_patch(ds), int((ds.get("status") or {}).get("collisionCount") or 0))

    def new_pod(self, ds: Obj, node: str, h: str) -> Obj:
        template = copy.deepcopy((ds.get("spec") or {}).get("template") or {})
        labels = dict(((template.get("metadata") or {}).get("labels")) or {})
        labels[REVISION_LABEL] = h
        labels[TEMPLATE_GENERATION] = str(ds["metadata"].get("generation", 1))
        template.setdefault("metadata", {})["labels"] = labels
        pod = podutil.pod_from_template(template, ds)
        spec = pod["spec"]
        spec["tolerations"] = daemon_tolerations(spec)
        affinity = spec.setdefault("affinity", {})
        na = affinity.setdefault("nodeAffinity", {})
        na["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]}
        spec["nodeName"] = node  # the lab has no scheduler (see the module header)
        return pod

    async def reconcile(self, key: str) -> None:
        try:
            await self._reconcile(key)
        except ValueError as e:  # maxUnavailable "x"
            await self.invalid_spec(key, self.sets.get(key), e, COMPONENT)

    async def _reconcile(self, key: str) -> None:
        cached = self.sets.get(key)
        if cached is None:
            self.expectations.forget(key)
            return
        ds = copy.deepcopy(cached)
        ns, name = split_key(key)
        selector = (ds.get("spec") or {}).get("selector")
        pods = await podutil.claim(self.client, ds, selector, self.pods.list(ns), "v1", "pods",
                                   resource_path("apps/v1", "daemonsets", ns, name))
        node_pods: dict[str, list[Obj]] = {}
        for p in pods:
            node_pods.setdefault(node_of(p), []).append(p)
        h = self.revision(ds)
        nodes = self.nodes.list()
        if self.expectations.satisfied(key) and not ds["metadata"].get("deletionTimestamp"):
            strategy = (ds.get("spec") or {}).get("updateStrategy") or {}
            rolling = (strategy.get("type") or "RollingUpdate") == "RollingUpdate"
            should = {n["metadata"]["name"]: should_run(ds, n)[0] for n in nodes}
            desired = [n for n, yes in should.items() if yes]
            surging = rolling and max_surge(ds, len(desired)) > 0
            await self.manage(key, ds, nodes, node_pods, h, surging)
            if rolling and self.expectations.satisfied(key):
                if surging:
                    victims, extra = surge_step(ds, node_pods, should, h, len(desired))
                    await self.delete_pods(key, victims)
                    await self.create_pods(key, ds, extra, h)
                else:
                    on_desired = {n: node_pods.get(n, []) for n in desired}
                    await self.delete_pods(key, old_pods_to_delete(ds, on_desired, h, len(desired)))
        await self.update_status(ds, nodes, h)

    async def manage(self, key: str, ds: Obj, nodes: list[Obj], node_pods: dict[str, list[Obj]], h: str,
                     surging: bool) -> None:
        """``manage`` / ``podsShouldBeOnNode`` over every node."""
        create: list[str] = []
        delete: list[Obj] = []
        now = time.monotonic()
        node_names = {n["metadata"]["name"] for n in nodes}
        for node in nodes:
            nname = node["metadata"]["name"]
            run, cont = should_run(ds, node)
            pods = node_pods.get(nname, [])
            if run and not pods:
                create.append(nname)
            elif cont:
                running: list[Obj] = []
                for p in pods:
                    if p["metadata"].get("deletionTimestamp"):
                        continue
                    phase = (p.get("status") or {}).get("phase")
                    if phase == "Failed":
                        bkey = f"{key}/{nname}"
                        delay, since = self.failed_backoff.get(bkey, (0.0, 0.0))
                        if delay and now < since + delay:
                            self.queue.add_after(key, since + delay - now)
                            continue
                        self.failed_backoff[bkey] = (min(max(delay * 2, _BACKOFF_START), _BACKOFF_MAX), now)
                        _log.info("daemonset %s: found failed daemon pod %s on node %s, will try to kill it", key,
                                  p["metadata"]["name"], nname)
                        delete.append(p)
                    elif phase == "Succeeded":
                        delete.append(p)
                    else:
                        running.append(p)
                if len(running) > 1:
                    ordered = sorted(running, key=podutil.creation_key)
                    if not surging:
                        delete.extend(ordered[1:])
                    else:  # keep the oldest new and the oldest old pod
                        first_new = next((p for p in ordered if (p["metadata"].get("labels") or {})
                                          .get(REVISION_LABEL) == h), None)
                        first_old = next((p for p in ordered if (p["metadata"].get("labels") or {})
                                          .get(REVISION_LABEL) != h), None)
                        delete.extend(p for p in ordered if p is not first_new and p is not first_old)
            elif pods:
                delete.extend(p for p in pods if not p["metadata"].get("deletionTimestamp"))
        # pods on nodes that no longer exist
        for nname, pods in node_pods.items():
            if nname not in node_names:
                delete.extend(p for p in pods if not p["metadata"].get("deletionTimestamp"))
        await self.delete_pods(key, delete)
        await self.create_pods(key, ds, create, h)

    async def create_pods(self, key: str, ds: Obj, create: list[str], h: str) -> None:
        if create:
            self.expectations.expect_creations(key, len(create))
            queue = list(create)

            async def one() -> None:
                node = queue.pop(0)
                body = self.new_pod(ds, node, h)
                created = await self.client.create(resource_path("v1", "pods", ds["metadata"]["namespace"]), body)
                _log.info("daemonset %s: created pod for node %s", key, node)
                await record_event(self.client, ds, "Normal", "SuccessfulCreate",
                                           f"Created pod: {created['metadata']['name']}", COMPONENT)

            done, err = await podutil.slow_start_batch(len(create), 1, one)
            for _ in range(len(create) - done):
                self.expectations.creation_observed(key)
            if err is not None:
                raise err

    async def delete_pods(self, key: str, pods: list[Obj]) -> None:
        if not pods:
            return
        self.expectations.expect_deletions(key, [object_key(p) for p in pods])
        for p in pods:
            try:
                await self.client.delete(resource_path("v1", "pods", p["metadata"]["namespace"],
                                                       p["metadata"]["name"]),
                                         {"preconditions": {"uid": p["metadata"]["uid"]}})
                _log.info("daemonset %s: deleted pod %s", key, p["metadata"]["name"])
                owner = self.sets.get(key)
                if owner is not None:
                    await record_event(self.client, owner, "Normal", "SuccessfulDelete",
                                               f"Deleted pod: {p['metadata']['name']}", COMPONENT)
            except ApiStatusError as e:
                self.expectations.deletion_observed(key, object_key(p))
                if not (e.not_found or e.conflict):
                    raise

    async def update_status(self, ds: Obj, nodes: list[Obj], h: str) -> None:
        """``updateDaemonSetStatus``, from the pods the cache holds now."""
        uid = ds["metadata"]["uid"]
        node_pods: dict[str, list[Obj]] = {}
        for p in self.pods.list(ds["metadata"]["namespace"]):
            if (controller_ref(p) or {}).get("uid") == uid:
                node_pods.setdefault(node_of(p), []).append(p)
        mrs = int((ds.get("spec") or {}).get("minReadySeconds") or 0)
        st: dict[str, Any] = {"desiredNumberScheduled": 0, "currentNumberScheduled": 0, "numberMisscheduled": 0,
                              "numberReady": 0, "numberAvailable": 0, "updatedNumberScheduled": 0}
        for node in nodes:
            pods = node_pods.get(node["metadata"]["name"], [])
            run, _ = should_run(ds, node)
            if run:
                st["desiredNumberScheduled"] += 1
                if not pods:
                    continue
                st["currentNumberScheduled"] += 1
                pod = sorted(pods, key=podutil.creation_key)[0]
                if podutil.is_pod_ready(pod):
                    st["numberReady"] += 1
                    if podutil.is_pod_available(pod, mrs):
                        st["numberAvailable"] += 1
                if (pod["metadata"].get("labels") or {}).get(REVISION_LABEL) == h:
                    st["updatedNumberScheduled"] += 1
            elif pods:
                st["numberMisscheduled"] += 1
        st["numberUnavailable"] = st["desiredNumberScheduled"] - st["numberAvailable"]
        if mrs > 0 and st["numberReady"] != st["numberAvailable"]:
            self.queue.add_after(object_key(ds), float(mrs))
        st["observedGeneration"] = ds["metadata"].get("generation", 0)
        old = ds.get("status") or {}
        for k in ("collisionCount", "conditions"):
            if old.get(k) is not None:
                st[k] = old[k]
        if st == old:
            return
        meta = ds["metadata"]
        body = {"apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "resourceVersion": meta.get("resourceVersion")}, "status": st}
        await self.client.replace(resource_path("apps/v1", "daemonsets", meta["namespace"], meta["name"], "status"),
                                  body)

