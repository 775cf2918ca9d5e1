"""The scheduling loop, after upstream's ``pkg/scheduler`` (scheduler.go, schedule_one.go,
eventhandlers.go).

In order:

1. Informers (``scheduler.kube``) on Pods, Nodes, PVCs, PVs, StorageClasses, Services and the
   Kosmos policy CRDs feed the cache and the queue (:meth:`Scheduler._on_pod`, ``_on_node``,
   ``_on_other``): bound pods go to the cache (confirming assumed ones), pending pods whose
   ``spec.schedulerName`` is one of our profiles go to the queue, and every change is a
   :class:`~scheduler.framework.ClusterEvent` that may move unschedulable pods.
2. Only while leading (``scheduler.election``, or always without ``--leader-elect``) the loop
   pops one pod at a time and runs :meth:`Scheduler.schedule_one`:
   snapshot (copy changed NodeInfos only) -> PreFilter -> Filter over nodes taken from a rotating
   start index until enough are feasible (``percentageOfNodesToScore``, upstream's
   ``numFeasibleNodesToFind`` and ``nextStartNodeIndex``) -> PreScore/Score/NormalizeScore with
   weights -> selectHost (random among the best) -> assume in the cache + Reserve.
3. The binding cycle runs on a worker pool so binds overlap (upstream binds asynchronously):
   PreBind, then ``POST pods/NAME/binding``. Success: ``Scheduled`` event. ``409`` (already
   bound, e.g. by a previous instance) or ``404`` (pod gone): the assumed pod is forgotten and the
   watch tells the truth. Any other failure: Unreserve, forget, FailedScheduling, back-off.
4. A failed cycle: Unreserve/forget, the pod back in the queue (unschedulable, or back-off on
   errors), a ``FailedScheduling`` Warning event from the profile's name (repeats of the same
   message are aggregated into one Event's ``count``), and the pod's ``PodScheduled`` condition
   (``False``, reason ``Unschedulable`` or ``SchedulerError``, the message) via ``pods/status``.

Message shape (upstream FitError.Error):
``0/7 nodes are available: 3 Insufficient cpu, 2 node(s) had untolerated taint {...}.`` — reason
counts sorted as strings. There is no preemption (no PostFilter plugin, like upstream with
DefaultPreemption disabled), so there is no ``preemption: ...`` suffix.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from scheduler.cache import Cache, NodeSnapshot
from scheduler.election import LeaderElector
from scheduler.framework import SUCCESS, ClusterEvent, Code, CycleState, NodeInfo, Obj, PodInfo, Status
from scheduler.kube import STRATEGIC_MERGE_PATCH, Api, ApiError, Informer, resource_path, wait_synced
from scheduler.metrics import SchedulerMetrics
from scheduler.podutil import new_pod_info
from scheduler.profile import DEFAULT_SCHEDULER, Profile, SchedulerConfig, build_profiles, default_config
from scheduler.queue import QueuedPodInfo, SchedulingQueue

if TYPE_CHECKING:
    from scheduler.leafviews import LeafViews
    from scheduler.netaffinity_records import Reachability

_log = logging.getLogger(__name__)

#: upstream minFeasibleNodesToFind / minFeasibleNodesPercentageToFind.
MIN_FEASIBLE_NODES_TO_FIND = 100
MIN_FEASIBLE_NODES_PERCENTAGE_TO_FIND = 5
#: upstream ErrNoNodesAvailable.
NO_NODES_AVAILABLE = "no nodes available to schedule pods"

#: (group/version, resource, ClusterEvent resource name) of the informers besides pods and nodes;
#: the plugins read them through ``Handle.lister(resource)``. An empty event name: changes move no
#: pods (namespaces for InterPodAffinity's namespaceSelector). The controllers: PodTopologySpread's
#: default constraints take selectors from them and registers no events for them, as upstream;
#: LeafNodeWorkloadPolicy reads the workload's replicas from them and registers their events.
OTHER_RESOURCES: tuple[tuple[str, str, str], ...] = (
    ("v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    ("v1", "persistentvolumes", "PersistentVolume"),
    ("storage.k8s.io/v1", "storageclasses", "StorageClass"),
    ("v1", "services", "Service"),
    ("discovery.k8s.io/v1", "endpointslices", "EndpointSlice"),  # NetworkAffinity: where a Service's endpoints run
    ("kosmos.io/v1alpha1", "distributionpolicies", "DistributionPolicy"),
    ("kosmos.io/v1alpha1", "clusterdistributionpolicies", "ClusterDistributionPolicy"),
    ("kosmos.io/v1alpha1", "workloadpolicies", "WorkloadPolicy"),
    ("v1", "namespaces", ""),
    ("v1", "replicationcontrollers", "ReplicationController"),
    ("apps/v1", "replicasets", "ReplicaSet"),
    ("apps/v1", "statefulsets", "StatefulSet"),
)


def num_feasible_nodes_to_find(percentage: int | None, num_all: int) -> int:
    """upstream numFeasibleNodesToFind: all nodes below 100; else the percentage (adaptive when
    unset or 0: 50 - nodes/125, at least 5 %), never fewer than 100."""
    if num_all < MIN_FEASIBLE_NODES_TO_FIND:
        return num_all
    pct = percentage or 0
    if pct == 0:
        pct = 50 - num_all // 125
        if pct < MIN_FEASIBLE_NODES_PERCENTAGE_TO_FIND:
            pct = MIN_FEASIBLE_NODES_PERCENTAGE_TO_FIND
    n = num_all * pct // 100
    return max(n, MIN_FEASIBLE_NODES_TO_FIND)


def fit_error_message(num_all: int, node_statuses: Iterable[Status] = (), *, pre_filter_msg: str = "",
                      absent_reasons: Iterable[str] = (), absent_count: int = 0, post_filter_msg: str = "") -> str:
    """upstream FitError.Error(): ``0/N nodes are available: <PreFilterMsg>.`` or the sorted
    ``<count> <reason>`` histogram over the rejected nodes (plus the nodes PreFilter ruled out),
    then the PostFilter message (none here: no preemption)."""
    msg = f"0/{num_all} nodes are available:"
    if pre_filter_msg:
        msg += f" {pre_filter_msg}."
    else:
        counts: dict[str, int] = {}
        for st in node_statuses:
            for r in st.reasons:
                counts[r] = counts.get(r, 0) + 1
        if absent_count > 0:
            for r in absent_reasons:
                counts[r] = counts.get(r, 0) + absent_count
        hist = sorted(f"{v} {k}" for k, v in counts.items())
        if hist:
            msg += f" {', '.join(hist)}."
    if post_filter_msg:
        msg += f" {post_filter_msg}"
    return msg


def select_host(scores: Mapping[str, int], rng: random.Random | None = None) -> str:
    """upstream selectHost: the highest total, uniformly at random among ties (upstream samples
    the same way with a reservoir; one choice over the tied names is equivalent and cheaper)."""
    r = rng or random
    top = max(scores.values())
    ties = [name for name, s in scores.items() if s == top]
    return ties[0] if len(ties) == 1 else r.choice(ties)


class FitError(Exception):
    """No node fits: carries the upstream message and the plugins that rejected the pod."""

    def __init__(self, message: str, plugins: set[str]) -> None:
        super().__init__(message)
        self.plugins = plugins


class SchedulingError(Exception):
    """An internal error (a plugin's Error status, no nodes at all): back-off, reason SchedulerError."""

    def __init__(self, message: str, reason: str = "SchedulerError") -> None:
        super().__init__(message)
        self.reason = reason


def _rfc3339(micro: bool = False) -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def is_terminal(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _spec_changed(old: Obj | None, new: Obj) -> bool:
    """upstream isPodUpdated: anything but status and bookkeeping metadata."""
    if old is None:
        return True
    om, nm = old.get("metadata") or {}, new.get("metadata") or {}
    return (old.get("spec") != new.get("spec") or om.get("labels") != nm.get("labels")
            or om.get("annotations") != nm.get("annotations"))


def node_update_events(old: Obj, new: Obj) -> list[ClusterEvent]:
    """upstream nodeSchedulingPropertiesChange: the specific Node update actions."""
    out = []
    os_, ns_ = old.get("status") or {}, new.get("status") or {}
    if os_.get("allocatable") != ns_.get("allocatable"):
        out.append(ClusterEvent("Node", "UpdateNodeAllocatable"))
    if old["metadata"].get("labels") != new["metadata"].get("labels"):
        out.append(ClusterEvent("Node", "UpdateNodeLabel"))
    ospec, nspec = old.get("spec") or {}, new.get("spec") or {}
    if ospec.get("taints") != nspec.get("taints") or \
            bool(ospec.get("unschedulable")) != bool(nspec.get("unschedulable")):
        out.append(ClusterEvent("Node", "UpdateNodeTaint"))

    def conds(s: Obj) -> dict[str, str]:
        return {c.get("type", ""): c.get("status", "") for c in s.get("conditions") or []}

    if conds(os_) != conds(ns_):
        out.append(ClusterEvent("Node", "UpdateNodeCondition"))
    if old["metadata"].get("annotations") != new["metadata"].get("annotations"):
        out.append(ClusterEvent("Node", "UpdateNodeAnnotation"))
    return out


def _filter_crash(pname: str, pi: PodInfo, ni: NodeInfo, e: Exception) -> SchedulingError:
    """A Filter plugin raised: logged with its trace; the pod's cycle fails, not the loop."""
    _log.exception("Filter plugin %s failed on pod %s node %s", pname, pi.key, ni.name)
    return SchedulingError(f'running "{pname}" filter plugin: {e}')


def _chain_filters(filters: list[tuple[str, Callable[[NodeInfo], Status]]], pi: PodInfo
                   ) -> Callable[[NodeInfo], Status]:
    """The compiled Filters of one pod as one function of the node (upstream RunFilterPlugins):
    the first non-success, tagged with its plugin; SUCCESS when all pass."""

    def check(ni: NodeInfo) -> Status:
        for pname, f in filters:
            try:
                st = f(ni)
            except Exception as e:  # a plugin bug fails this pod's cycle, not the loop
                raise _filter_crash(pname, pi, ni, e) from e
            if st is not SUCCESS and st.code != Code.SUCCESS:
                return st if st.plugin == pname else st.with_plugin(pname)
        return SUCCESS
    return check


class SchedulerHandle:
    """What plugins get (framework.Handle): the cycle's snapshot, the listers, and ``api`` (the
    :class:`scheduler.kube.Api`) for PreBind writes. With ``kosmos-scheduler --reflector`` the
    fabric's views too (None without: the plugins that read them then pass every node):
    ``leaf_views`` (:class:`scheduler.leafviews.LeafViews`, LeafNodeFit and
    LeafNodeFragmentation), ``reachability`` (:class:`scheduler.netaffinity_records.Reachability`,
    NetworkAffinity) and ``fabric_cluster`` (the root's own fabric cluster name)."""

    def __init__(self, sched: Scheduler) -> None:
        self._sched = sched
        self.api = sched.api
        self.leaf_views: LeafViews | None = None
        self.reachability: Reachability | None = None
        self.fabric_cluster: str | None = None

    def snapshot(self) -> NodeSnapshot:
        return self._sched.snapshot

    def lister(self, resource: str) -> Mapping[str, Obj]:
        inf = self._sched.informers.get(resource)
        if inf is None:
            raise KeyError(f"no lister for {resource!r}; known: {', '.join(sorted(self._sched.informers))}")
        return inf.store


class Scheduler:
    """One scheduler instance: informers, cache, queue, profiles, the loop and the binders."""

    def __init__(self, api: Api, config: SchedulerConfig | None = None, *, registry: Mapping[str, type] | None = None,
                 identity: str | None = None, leader_elect: bool | None = None, bind_workers: int = 16,
                 metrics: SchedulerMetrics | None = None, rng: random.Random | None = None,
                 assumed_pod_ttl: float = 0.0) -> None:
        self.api = api
        self.config = config or default_config()
        self.identity = identity or f"{socket.gethostname()}_{uuid.uuid4()}"
        self.metrics = metrics or SchedulerMetrics()
        self.rng = rng or random.Random()
        self.cache = Cache(ttl=assumed_pod_ttl)
        self.snapshot = NodeSnapshot()
        self.informers: dict[str, Informer] = {"pods": Informer(api, "v1", "pods"),
                                               "nodes": Informer(api, "v1", "nodes")}
        self._event_names: dict[str, str] = {}
        for gv, res, ev in OTHER_RESOURCES:
            self.informers[res] = Informer(api, gv, res, copy_on_write=True)
            self._event_names[res] = ev
        self.handle = SchedulerHandle(self)
        self.profiles: dict[str, Profile] = build_profiles(self.config, self.handle, registry)
        self.queue = SchedulingQueue(self._events_for_plugin)
        self.next_start_node_index = 0
        le = self.config.leader_election
        self.leader_elect = le.leader_elect if leader_elect is None else leader_elect
        self.elector: LeaderElector | None = None
        if self.leader_elect:
            self.elector = LeaderElector(api, self.identity, namespace=le.resource_namespace, name=le.resource_name,
                                         lease_duration=le.lease_duration, renew_deadline=le.renew_deadline,
                                         retry_period=le.retry_period, on_started=self._start_loop,
                                         on_stopped=self._on_lost)
        self._bind_pool = concurrent.futures.ThreadPoolExecutor(bind_workers, thread_name_prefix="bind")
        self._status_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="status")
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._flush_thread: threading.Thread | None = None
        self._events_lock = threading.Lock()
        #: (pod uid, reason, message) -> [event name, count, namespace] for aggregation.
        self._events: dict[tuple[str, str, str], list[Any]] = {}
        self.informers["pods"].add_handler(self._on_pod)
        self.informers["nodes"].add_handler(self._on_node)
        for _, res, ev in OTHER_RESOURCES:
            if ev:
                self.informers[res].add_handler(self._make_other_handler(res))

    # --- lifecycle ---

    def _events_for_plugin(self, name: str) -> Iterable[ClusterEvent]:
        for p in self.profiles.values():
            if name in p.plugins:
                return p.events_for(name)
        return (ClusterEvent("*", "All"),)

    def start(self, sync_timeout: float | None = 60.0) -> None:
        """Start the informers, wait for their first LIST, then schedule (or campaign)."""
        for inf in self.informers.values():
            inf.start()
        if not wait_synced(list(self.informers.values()), sync_timeout):
            raise TimeoutError(f"informers not synced after {sync_timeout}s: "
                               f"{[k for k, i in self.informers.items() if not i.synced.is_set()]}")
        self._flush_thread = threading.Thread(target=self._flush_loop, name="queue-flush", daemon=True)
        self._flush_thread.start()
        if self.elector is not None:
            self.elector.start()
        else:
            self._start_loop()

    def _start_loop(self) -> None:
        self.metrics.leader.set(1)
        self._loop_thread = threading.Thread(target=self._loop, name="schedule-one", daemon=True)
        self._loop_thread.start()

    def _on_lost(self) -> None:
        """Leadership lost: stop scheduling at once (kube-scheduler exits; ``main`` does too)."""
        self.metrics.leader.set(0)
        self.lost.set()
        self._stop.set()
        self.queue.close()

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()
        if self._loop_thread is not None:
            self._loop_thread.join(10)
        self._bind_pool.shutdown(wait=True, cancel_futures=False)
        if self.elector is not None:
            self.elector.stop(release=True)
        for inf in self.informers.values():
            inf.stop()
        self._status_pool.shutdown(wait=True)
        self.metrics.leader.set(0)

    def kill(self) -> None:
        """Stop abruptly, as a crash would (tests): no lease release, no waiting for binds."""
        self._stop.set()
        self.queue.close()
        if self.elector is not None:
            self.elector.stop(release=False)
        for inf in self.informers.values():
            inf.stop()
        self._bind_pool.shutdown(wait=False, cancel_futures=True)
        self._status_pool.shutdown(wait=False, cancel_futures=True)

    def is_leading(self) -> bool:
        return self.elector.is_leader() if self.elector is not None else not self._stop.is_set()

    def healthy(self) -> tuple[bool, str]:
        unsynced = [k for k, i in self.informers.items() if not i.synced.is_set()]
        if unsynced:
            return False, f"informers not synced: {', '.join(unsynced)}"
        if self.lost.is_set():
            return False, "leader election lost"
        if self._loop_thread is not None and not self._loop_thread.is_alive() and not self._stop.is_set():
            return False, "scheduling loop died"
        role = "leader" if self.is_leading() else "standby"
        return True, f"ok ({role}, {self.cache.counts()}, queue {self.queue.lengths()})"

    def _flush_loop(self) -> None:
        while not self._stop.wait(1.0):
            self.queue.flush()
            self.cache.cleanup_expired()
            self.metrics.set_pending(self.queue.lengths())

    # --- event handlers (informer threads) ---

    def responsible(self, pod: Obj) -> bool:
        return ((pod.get("spec") or {}).get("schedulerName") or DEFAULT_SCHEDULER) in self.profiles

    def _on_pod(self, kind: str, old: Obj | None, new: Obj | None) -> None:
        pod = new or old
        assert pod is not None
        m = pod["metadata"]
        key = f"{m.get('namespace', '')}/{m['name']}"
        if new is None or is_terminal(new):
            if (old is not None and (old.get("spec") or {}).get("nodeName")) or self.cache.pod_node(key):
                self.cache.remove_pod(key)
                self.queue.move_on_event(ClusterEvent("Pod", "Delete"))
            self.queue.delete(key)
            return
        spec = new.get("spec") or {}
        if spec.get("nodeName"):
            self.queue.delete(key)
            self.cache.add_pod(new)
            if old is None or not (old.get("spec") or {}).get("nodeName"):
                self.queue.move_on_event(ClusterEvent("Pod", "Add"))
            elif (old["metadata"].get("labels") != m.get("labels")):
                self.queue.move_on_event(ClusterEvent("Pod", "UpdatePodLabel"))
            return
        if not self.responsible(new) or self.cache.is_assumed(key):
            return
        if m.get("deletionTimestamp") or spec.get("schedulingGates"):
            # upstream SchedulingGates (PreEnqueue): a gated pod waits outside the queue.
            self.queue.delete(key)
            return
        if old is None or kind == "ADDED":
            self.queue.add(new_pod_info(new))
        else:
            self.queue.update(new_pod_info(new), _spec_changed(old, new))

    def _on_node(self, kind: str, old: Obj | None, new: Obj | None) -> None:
        if new is None:
            assert old is not None
            self.cache.remove_node(old["metadata"]["name"])
            self.queue.move_on_event(ClusterEvent("Node", "Delete"))
            return
        self.cache.add_node(new)
        if old is None:
            self.queue.move_on_event(ClusterEvent("Node", "Add"))
        else:
            for ev in node_update_events(old, new):
                self.queue.move_on_event(ev)

    def _make_other_handler(self, resource: str) -> Any:
        name = self._event_names[resource]

        def handler(kind: str, old: Obj | None, new: Obj | None) -> None:
            action = {"ADDED": "Add", "MODIFIED": "Update", "DELETED": "Delete"}[kind]
            self.queue.move_on_event(ClusterEvent(name, action))

        return handler

    # --- the loop ---

    def _loop(self) -> None:
        while not self._stop.is_set():
            q = self.queue.pop(timeout=0.5)
            if q is None:
                continue
            if not self.is_leading():
                # The lease is being lost (renewals failing): hand the pod back and wait.
                self.queue.forget_in_flight(q.key)
                self.queue.add(q.info)
                self._stop.wait(0.2)
                continue
            try:
                self.schedule_one(q)
            except Exception:
                # A plugin raised outside Filter (Reserve, Score...): the pod must not stay
                # assumed, and is retried after its back-off.
                _log.exception("scheduling pod %s failed unexpectedly", q.key)
                self.cache.forget(q.key)
                self.queue.add_unschedulable(q, (), self.queue.scheduling_cycle, error=True)

    def schedule_one(self, q: QueuedPodInfo) -> None:
        """One scheduling cycle for the popped pod; the binding cycle continues on the pool."""
        pi = q.info
        key = pi.key
        pod_cycle = self.queue.scheduling_cycle
        profile = self.profiles.get((pi.pod.get("spec") or {}).get("schedulerName") or DEFAULT_SCHEDULER)
        current = self.informers["pods"].store.get(key)
        if profile is None or current is None or (current.get("spec") or {}).get("nodeName") \
                or current["metadata"].get("deletionTimestamp") or self.cache.pod_node(key):
            self.queue.done(key)  # upstream skipPodSchedule: deleted, bound, or already assumed
            return
        if current is not pi.pod:
            pi = new_pod_info(current)
            q.info = pi
        start = time.monotonic()
        self.cache.update_snapshot(self.snapshot)
        state = CycleState()
        try:
            node = self._schedule_pod(profile, state, pi)
        except FitError as e:
            self._observe(profile, "unschedulable", start)
            self._fail(profile, q, pod_cycle, "Unschedulable", str(e), e.plugins)
            return
        except SchedulingError as e:
            self._observe(profile, "unschedulable" if e.reason == "Unschedulable" else "error", start)
            self._fail(profile, q, pod_cycle, e.reason, str(e), set(), error=e.reason != "Unschedulable")
            return
        spec = dict(pi.pod.get("spec") or {})
        spec["nodeName"] = node
        assumed = dataclasses.replace(pi, pod={**pi.pod, "spec": spec})
        self.cache.assume(assumed, node)
        st = profile.run_reserve(state, assumed, node)
        if not st.ok:
            profile.run_unreserve(state, assumed, node)
            self.cache.forget(key)
            if st.rejected:
                # upstream: a FitError over the one suggested node.
                self._observe(profile, "unschedulable", start)
                self._fail(profile, q, pod_cycle, "Unschedulable", fit_error_message(1, [st]), {st.plugin})
            else:
                self._observe(profile, "error", start)
                self._fail(profile, q, pod_cycle, "SchedulerError",
                           f'running Reserve plugin "{st.plugin}": {st.message()}', set(), error=True)
            return
        self._observe(profile, "scheduled", start)
        self.queue.done(key)
        self._bind_pool.submit(self._binding_cycle, profile, state, q, assumed, node, pod_cycle)

    def _observe(self, profile: Profile, result: str, start: float) -> None:
        self.metrics.attempts.labels(result=result, profile=profile.name).inc()
        self.metrics.attempt_duration.labels(result=result, profile=profile.name).observe(time.monotonic() - start)

    def _schedule_pod(self, profile: Profile, state: CycleState, pi: PodInfo) -> str:
        """upstream schedulePod: the chosen node's name, or FitError/SchedulingError."""
        nodes = self.snapshot.node_info_list
        num_all = len(nodes)
        if num_all == 0:
            raise SchedulingError(NO_NODES_AVAILABLE, reason="Unschedulable")
        res, st, narrowed = profile.run_pre_filter(state, pi, nodes)
        if not st.ok:
            if st.rejected:
                raise FitError(fit_error_message(num_all, pre_filter_msg=st.message()), narrowed or {st.plugin})
            raise SchedulingError(f'running PreFilter plugin "{st.plugin}": {st.message()}')
        candidates = nodes
        absent_reasons: tuple[str, ...] = ()
        if res is not None and res.node_names is not None:
            names = res.node_names
            if len(names) * 4 < num_all:
                candidates = [ni for n in sorted(names) if (ni := self.snapshot.get(n)) is not None]
            else:
                candidates = [ni for ni in nodes if ni.name in names]
            absent_reasons = (f"node(s) didn't satisfy plugin(s) [{' '.join(sorted(narrowed))}]",)
        feasible, rejected = self._find_feasible(profile, state, pi, candidates)
        if not feasible:
            plugins = set(narrowed) | {s.plugin for s in rejected.values()}
            raise FitError(fit_error_message(num_all, rejected.values(), absent_reasons=absent_reasons,
                                             absent_count=num_all - len(rejected)), plugins)
        if len(feasible) == 1:
            return feasible[0].name
        st = profile.run_pre_score(state, pi, feasible)
        if not st.ok:
            raise SchedulingError(f'running PreScore plugin "{st.plugin}": {st.message()}')
        scores, st = profile.run_score(state, pi, feasible)
        if not st.ok:
            raise SchedulingError(f'running Score plugin "{st.plugin}": {st.message()}')
        return select_host(scores, self.rng)

    def _find_feasible(self, profile: Profile, state: CycleState, pi: PodInfo, nodes: list[NodeInfo]
                       ) -> tuple[list[NodeInfo], dict[str, Status]]:
        """upstream findNodesThatPassFilters: from ``nextStartNodeIndex`` round the list, stop once
        enough nodes are feasible; the index then advances by the nodes processed."""
        n = len(nodes)
        if n == 0:
            return [], {}
        want = num_feasible_nodes_to_find(profile.percentage_of_nodes_to_score, n)
        start = self.next_start_node_index % n
        feasible: list[NodeInfo] = []
        rejected: dict[str, Status] = {}
        if not profile.filter:
            feasible = [nodes[(start + i) % n] for i in range(want)]
        else:
            # profile.run_filter inlined: this loop runs for hundreds of nodes per pod. Plugins
            # whose PreFilter SKIPped are left out; the others' Filter is bound to this pod once
            # (FilterFactoryPlugin.filter_fn, or the plain Filter with state and pod bound), and a
            # plugin whose compiled Filter would pass every node is left out too.
            try:
                filters = profile.pod_filters(state, pi)
            except Exception as e:  # a plugin bug fails this pod's cycle, not the loop
                _log.exception("compiling the Filter plugins for pod %s failed", pi.key)
                raise SchedulingError(f"running filter plugins: {e}") from e
            order = nodes[start:] + nodes[:start] if start else nodes
            if not filters:
                feasible = order[:want]
            else:
                # One function per node: the only Filter itself (its statuses tagged here), or
                # the Filters chained (each status tagged inside).
                pname, check = filters[0] if len(filters) == 1 else ("", _chain_filters(filters, pi))
                for ni in order:
                    try:
                        st = check(ni)
                    except SchedulingError:
                        raise
                    except Exception as e:  # a plugin bug fails this pod's cycle, not the loop
                        raise _filter_crash(pname, pi, ni, e) from e
                    if st is SUCCESS or st.code == Code.SUCCESS:
                        feasible.append(ni)
                        if len(feasible) >= want:
                            break
                        continue
                    if pname and st.plugin != pname:
                        st = st.with_plugin(pname)
                    if st.rejected:
                        rejected[ni.name] = st
                    else:
                        raise SchedulingError(f'running "{st.plugin}" filter plugin: {st.message()}')
        self.next_start_node_index = (self.next_start_node_index + len(feasible) + len(rejected)) % n
        return feasible, rejected

    # --- binding ---

    def _binding_cycle(self, profile: Profile, state: CycleState, q: QueuedPodInfo, pi: PodInfo, node: str,
                       pod_cycle: int) -> None:
        key = pi.key
        m = pi.pod["metadata"]
        ns, name = m.get("namespace", ""), m["name"]
        start = time.monotonic()
        try:
            if not self.is_leading():
                # Lost (or never held) the lease since the cycle: not ours to bind any more.
                profile.run_unreserve(state, pi, node)
                self.cache.forget(key)
                self.queue.add(q.info)
                return
            st = profile.run_pre_bind(state, pi, node)
            if not st.ok:
                profile.run_unreserve(state, pi, node)
                self.cache.forget(key)
                if st.rejected:
                    self._fail(profile, q, pod_cycle, "Unschedulable", st.message(), {st.plugin})
                else:
                    self._fail(profile, q, pod_cycle, "SchedulerError",
                               f'running PreBind plugin "{st.plugin}": {st.message()}', set(), error=True)
                return
            body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": ns,
                                                                         "uid": m.get("uid")},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
            self.api.create(resource_path("v1", "pods", ns, name, "binding"), body)
        except ApiError as e:
            profile.run_unreserve(state, pi, node)
            self.cache.forget(key)
            if e.status in (404, 409):
                # Gone, or already bound (by a previous instance, or a race): the watch has the truth.
                _log.info("binding %s to %s: %s (%s); leaving it to the watch", key, node, e.status, e.message)
                self.metrics.bind_refusals.labels(code=str(e.status)).inc()
                self.queue.forget_in_flight(key)
                return
            self._fail(profile, q, pod_cycle, "SchedulerError", f'running Bind plugin "DefaultBinder": {e.message}',
                       set(), error=True)
            return
        except Exception as e:  # a PreBind error or a broken connection
            profile.run_unreserve(state, pi, node)
            self.cache.forget(key)
            self._fail(profile, q, pod_cycle, "SchedulerError", str(e), set(), error=True)
            return
        self.cache.finish_binding(key)
        now = time.monotonic()
        self.metrics.binding_duration.observe(now - start)
        if q.initial_attempt is not None:
            self.metrics.e2e.labels(profile=profile.name).observe(now - q.initial_attempt)
        _log.debug("bound %s to %s", key, node)
        self._event(profile, pi.pod, "Normal", "Scheduled", "Binding", f"Successfully assigned {ns}/{name} to {node}")

    # --- failures, events, status ---

    def _fail(self, profile: Profile, q: QueuedPodInfo, pod_cycle: int, reason: str, message: str,
              plugins: set[str], error: bool = False) -> None:
        """upstream handleSchedulingFailure: requeue (unless gone or bound), event, condition."""
        key = q.key
        cur = self.informers["pods"].store.get(key)
        if cur is None or (cur.get("spec") or {}).get("nodeName"):
            self.queue.forget_in_flight(key)
        else:
            if cur is not q.info.pod:
                q.info = new_pod_info(cur)
            self.queue.add_unschedulable(q, plugins, pod_cycle, error=error)
        _log.info("unable to schedule pod %s: %s (%s)", key, message, reason)
        pod = cur or q.info.pod
        self._event(profile, pod, "Warning", "FailedScheduling", "Scheduling", message)
        if cur is not None:
            self._status_pool.submit(self._set_condition, cur, reason, message)

    def _set_condition(self, pod: Obj, reason: str, message: str) -> None:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == reason \
                    and c.get("message") == message:
                return  # upstream updatePod: no write when nothing changed
        m = pod["metadata"]
        body = {"status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": reason,
                                           "message": message, "lastProbeTime": None,
                                           "lastTransitionTime": _rfc3339()}]}}
        try:
            self.api.patch(resource_path("v1", "pods", m.get("namespace"), m["name"], "status"), body,
                           STRATEGIC_MERGE_PATCH)
        except Exception as e:  # the next attempt writes it again
            _log.info("updating PodScheduled of %s/%s: %s", m.get("namespace"), m["name"], e)

    def _event(self, profile: Profile, pod: Obj, etype: str, reason: str, action: str, message: str) -> None:
        self._status_pool.submit(self._write_event, profile.name, pod, etype, reason, action, message)

    def _write_event(self, component: str, pod: Obj, etype: str, reason: str, action: str, message: str) -> None:
        """A core/v1 Event from ``component`` (the profile's name, as upstream). Repeats of the same
        (pod, reason, message) bump the first Event's ``count`` instead of adding Events."""
        m = pod["metadata"]
        ns, uid = m.get("namespace", "default"), str(m.get("uid", ""))
        now = _rfc3339()
        ek = (uid or f"{ns}/{m['name']}", reason, message)
        with self._events_lock:
            prev = self._events.get(ek)
            if prev is not None:
                prev[1] += 1
                count = prev[1]
        try:
            if prev is not None:
                self.api.patch(resource_path("v1", "events", ns, prev[0]), {"count": count, "lastTimestamp": now})
                return
            name = f"{m['name']}.{time.time_ns():x}"
            self.api.create(resource_path("v1", "events", ns), {
                "apiVersion": "v1", "kind": "Event", "metadata": {"name": name, "namespace": ns},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": ns, "name": m["name"],
                                   "uid": uid, "resourceVersion": m.get("resourceVersion")},
                "reason": reason, "message": message, "type": etype, "action": action,
                "source": {"component": component}, "reportingComponent": component,
                "reportingInstance": f"{component}-{self.identity}",
                "firstTimestamp": now, "lastTimestamp": now, "count": 1})
            with self._events_lock:
                if len(self._events) > 10000:
                    self._events.clear()
                self._events[ek] = [name, 1, ns]
        except Exception as e:  # events are best effort, as upstream's recorder
            _log.debug("writing event %s for %s/%s: %s", reason, ns, m["name"], e)
            if prev is not None:
                with self._events_lock:
                    self._events.pop(ek, None)


__all__ = ["FitError", "Scheduler", "SchedulingError", "fit_error_message",
           "num_feasible_nodes_to_find", "select_host"]
