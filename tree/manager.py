"""The tree manager: one :class:`~tree.leaf.LeafReconciler` per Cluster whose tree is enabled,
and the removal of virtual nodes nobody should have any more.

In order:

1. Informers on the root's ``Cluster`` objects and on its virtual nodes (label
   ``kosmos.io/node=true``) run in every replica, the standby's too, so a takeover starts warm;
   so do those every leaf's pod and dependency syncers share (the root's bound pods,
   :class:`tree.podsync.RootPods`; its ConfigMaps, Secrets, ServiceAccounts and PVCs,
   :class:`tree.deps.RootObjects`): one of each per manager, not per leaf.
2. With ``leader_elect`` only the holder of the Lease (``kube-system/kosmos-tree`` by default,
   :class:`scheduler.election.LeaderElector`) acts; losing it stops every reconciler and sets
   :attr:`TreeManager.lost` (``kosmos-tree`` then exits 1, as kube-scheduler, so a supervisor
   starts it afresh).
3. A pass (on every Cluster change, and every resync period): each enabled Cluster with a
   usable ``clusterTreeOptions`` gets a reconciler (a changed spec is handed to the running one;
   a Cluster recreated under the same name, i.e. a new UID, gets a new one); a disabled or
   deleted Cluster's reconciler is stopped. A Cluster whose options cannot be used keeps its
   reconciler with the last usable spec (or none), and its virtual nodes stay: bad input changes
   nothing already working.
4. Garbage: a virtual node of ours (by label and annotations, :func:`tree.vnode.owner`) whose
   Cluster no longer exists with that UID, or has its tree disabled, is deleted with its Lease,
   once the reconciler that made it has ended (so it cannot write the node back). Nothing is
   collected while the Cluster list is not known (not synced, or the CRD not served).

Events of a virtual node go to its Cluster's reconciler, which recreates a node deleted by hand
and puts back what was edited.

With a reflector (:class:`tree.fabric_link.FabricLink`) the link starts when this replica
starts leading (a standby publishes nothing), is told after the first pass which Clusters to
wait for before its first records session, kicks every reconciler when the fabric's
reachability changes, and stops with the leadership; a Cluster whose reconciler is retired has
its records deleted.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import uuid
from typing import Any, Literal

from scheduler.election import LeaderElector
from scheduler.kube import Api, Informer, wait_synced
from tree import spec as treespec
from tree.convert import ConvertPolicies
from tree.deps import Dependencies, RootObjects
from tree.fabric_link import FabricLink
from tree.leaf import Connector, LeafReconciler, Options, _connect_leaf
from tree.metrics import TreeMetrics
from tree.podsync import Converter, DependenciesFactory, RootPods
from tree.vnode import NODE_SELECTOR, RootWriter, owner

_log = logging.getLogger(__name__)

Obj = dict[str, Any]


class TreeManager:
    def __init__(self, root: Api, options: Options, *, leader_elect: bool = True, identity: str | None = None,
                 lease_namespace: str = "kube-system", lease_name: str = "kosmos-tree",
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 metrics: TreeMetrics | None = None, connect: Connector = _connect_leaf,
                 link: FabricLink | None = None, sync_pods: bool = True,
                 dependencies: DependenciesFactory | Literal["default"] | None = "default",
                 converter: Converter | Literal["default"] | None = "default") -> None:
        """``link``: the reflector's (records, reachability), started when this replica leads.
        ``sync_pods``: sync the pods bound to the virtual nodes (:mod:`tree.podsync`), with the
        ``dependencies`` syncer (default: :class:`tree.deps.Dependencies` per leaf connection)
        and the ``converter`` (default: the root's convert policies, :class:`tree.convert.ConvertPolicies`,
        watched by this manager); None leaves either out (tests of the pod sync alone)."""
        self.root = root
        self.link = link
        self.options = options
        self.metrics = metrics or TreeMetrics()
        self.connect = connect
        self.identity = identity or f"{socket.gethostname()}_{uuid.uuid4()}"
        self.clusters = Informer(root, treespec.GROUP_VERSION, treespec.PLURAL, copy_on_write=True)
        self.nodes = Informer(root, "v1", "nodes", label_selector=NODE_SELECTOR, copy_on_write=True)
        self.clusters.add_handler(lambda _t, _o, _n: self.kick())
        #: The root's bound pods, for every leaf's pod syncer (None: pods are not synced).
        self.pods = RootPods(root) if sync_pods else None
        #: The root's pod convert policies, when this manager watches them (``converter`` default).
        self.policies: ConvertPolicies | None = None
        if converter == "default":
            self.policies = ConvertPolicies(root, nodes=lambda name: self.nodes.store.get(name), metrics=self.metrics)
            converter = self.policies.convert
        self.converter = converter
        #: The root's ConfigMaps, Secrets, ServiceAccounts and PVCs, watched once for every leaf's
        #: dependency syncer (the ``dependencies`` default).
        self.root_objects: RootObjects | None = None
        if dependencies == "default":
            self.root_objects = RootObjects(root, options.root_timeout) if sync_pods else None
            dependencies = self._dependencies
        self.dependencies = dependencies
        self.nodes.add_handler(self._on_node)
        self.reconcilers: dict[str, LeafReconciler] = {}
        #: Reconcilers asked to stop whose thread may still be in a request: their Cluster's
        #: nodes are not collected until they have ended.
        self._stopping: list[LeafReconciler] = []
        #: The link was told which Clusters the first pass found.
        self._expected = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Set when the Lease was lost: the process should exit.
        self.lost = threading.Event()
        self.elector: LeaderElector | None = None
        if leader_elect:
            self.elector = LeaderElector(Api(root.host, token=root.token, ca_file=root.ca_file,
                                             cert_file=root.cert_file, key_file=root.key_file, verify=root.verify,
                                             user_agent="kosmos-tree"),
                                         self.identity, namespace=lease_namespace, name=lease_name,
                                         lease_duration=lease_duration, renew_deadline=renew_deadline,
                                         retry_period=retry_period, on_started=self._lead, on_stopped=self._lose)

    # ------------------------------------------------------------------ lifecycle

    def start(self, sync_timeout: float | None = 30.0) -> None:
        self.clusters.start()
        self.nodes.start()
        if self.pods is not None:
            self.pods.start()
        if self.policies is not None:
            self.policies.start()
        if self.root_objects is not None:
            self.root_objects.start()
        if sync_timeout is not None and not wait_synced([self.clusters, self.nodes], sync_timeout):
            _log.warning("root informers not synced after %g s; going on (they keep trying)", sync_timeout)
        if self.elector is not None:
            self.elector.start()
        else:
            self._lead()

    def stop(self, release: bool = True) -> None:
        """Stop everything; reconcilers in a request are not waited for beyond the timeouts."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.options.root_timeout)
        with self._lock:
            recs = list(self.reconcilers.values())
            self.reconcilers.clear()
        for r in recs:
            r.stop()
        for r in recs:
            r.join(1.0)
        if self.link is not None:
            self.link.stop()
        if self.elector is not None:
            self.elector.stop(release=release)
        self.clusters.stop()
        self.nodes.stop()
        if self.pods is not None:
            self.pods.stop()
        if self.policies is not None:
            self.policies.stop()
        if self.root_objects is not None:
            self.root_objects.stop()

    def _dependencies(self, spec: treespec.TreeSpec, root: Api, leaf: Api) -> Dependencies:
        """The dependency syncer of one leaf connection (the default ``dependencies``)."""
        o = self.options
        return Dependencies(root, leaf, root_id=o.root_id, cluster=spec.cluster, timeout=o.leaf_timeout,
                            mode=spec.mode, metrics=self.metrics, resync_period=o.resync_period,
                            root_objects=self.root_objects)

    def kick(self) -> None:
        self._wake.set()

    def leading(self) -> bool:
        return self._thread is not None and not self._stop.is_set()

    def healthy(self) -> tuple[bool, str]:
        """Alive: the Lease not lost and, once leading, the pass thread running."""
        if self.lost.is_set():
            return False, "leader election lost"
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return False, "the pass thread died"
        return True, f"{'leader' if self._thread is not None else 'standby'}, {len(self.reconcilers)} leaf cluster(s)"

    def ready(self) -> tuple[bool, str]:
        ok, why = self.healthy()
        unsynced = [i.resource for i in (self.clusters, self.nodes) if not i.synced.is_set()]
        if ok and unsynced:
            return False, f"informers not synced: {', '.join(unsynced)}"
        return ok, why

    def leaf_api(self, cluster: str, uid: str) -> Api | None:
        """The connected leaf of Cluster ``cluster`` with UID ``uid`` (a virtual node's owner),
        None when this replica has no reconciler for it or it is not connected."""
        rec = self.reconcilers.get(cluster)
        return rec.leaf if rec is not None and rec.key == (cluster, uid) else None

    def _lead(self) -> None:
        self.metrics.leader.set(1)
        if self.link is not None:
            link = self.link
            link.on_change = self._kick_all
            link.start()
            self.metrics.records.set_function(lambda: len(link.publisher.desired()) if link.publisher else 0)
            self.metrics.records_session.set_function(
                lambda: 1 if link.publisher is not None and link.publisher.connected else 0)
        self._thread = threading.Thread(target=self._run, name="tree-manager", daemon=True)
        self._thread.start()

    def _lose(self) -> None:
        self.metrics.leader.set(0)
        self._stop.set()
        self._wake.set()
        with self._lock:
            for r in self.reconcilers.values():
                r.stop()
            self.reconcilers.clear()
        if self.link is not None:
            self.link.stop()
        self.lost.set()

    def _kick_all(self) -> None:
        """The fabric's reachability changed: every leaf forges its nodes again."""
        for rec in list(self.reconcilers.values()):
            rec.kick()

    def _on_node(self, _type: str, old: Obj | None, new: Obj | None) -> None:
        who = owner(new or old or {})
        if who is None:
            return
        rec = self.reconcilers.get(who[0])
        if rec is not None and rec.key == who:
            rec.kick()
        else:
            self.kick()  # maybe garbage

    # ------------------------------------------------------------------ passes

    def _run(self) -> None:
        _log.info("tree manager %s: leading", self.identity)
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:
                _log.exception("tree manager pass failed; retrying")
            self._wake.wait(self.options.resync_period)
            self._wake.clear()

    def sync(self) -> None:
        """One pass: reconcilers started, updated, stopped; garbage collected (see the module)."""
        if not self.clusters.synced.is_set():
            return
        clusters = self.clusters.store
        enabled: dict[str, tuple[str, treespec.TreeSpec | None]] = {}  # name -> (uid, usable spec or None)
        for c in clusters.values():
            name, uid = c["metadata"]["name"], str(c["metadata"].get("uid") or "")
            try:
                spec = treespec.read(c)
            except treespec.SpecError as e:
                self.metrics.spec_errors.labels(name).set(1)
                _log.error("%s; its virtual nodes are left as they are", e)
                enabled[name] = (uid, None)
                continue
            self.metrics.spec_errors.labels(name).set(0)
            if spec.enable and not c["metadata"].get("deletionTimestamp"):
                enabled[name] = (uid, spec)
        with self._lock:
            if self._stop.is_set():
                return
            for name, rec in list(self.reconcilers.items()):
                uid_spec = enabled.get(name)
                if uid_spec is None or uid_spec[0] != rec.spec.uid:
                    _log.info("Cluster %s: tree disabled or Cluster gone; stopping its reconciler", name)
                    rec.retire()
                    self._stopping.append(rec)
                    del self.reconcilers[name]
                    self.metrics.forget(name)
            for name, (_uid, usable) in enabled.items():
                running = self.reconcilers.get(name)
                if usable is None:
                    continue
                if running is None:
                    started = LeafReconciler(usable, self.root, self.nodes, self.options, self.metrics,
                                             connect=self.connect, on_exit=self.kick, link=self.link,
                                             root_pods=self.pods, dependencies=self.dependencies,
                                             converter=self.converter)
                    self.reconcilers[name] = started
                    started.start()
                    _log.info("Cluster %s: reconciler started (%s mode)", name, usable.mode)
                elif running.spec.raw != usable.raw:
                    running.update(usable)
            if self.link is not None and not self._expected:
                self._expected = True
                self.link.expect({r.key for r in self.reconcilers.values()})
            self._stopping = [r for r in self._stopping if r.alive()]
            busy = {r.spec.cluster for r in self._stopping}
        if self.clusters.served:
            self._collect(enabled, busy)

    def _count(self, cluster: str, kind: str) -> None:
        self.metrics.root_writes.labels(cluster, kind).inc()

    def _collect(self, enabled: dict[str, tuple[str, treespec.TreeSpec | None]], busy: set[str]) -> None:
        for node in list(self.nodes.store.values()):
            who = owner(node)
            if who is None or who[0] in busy:
                continue
            keep = enabled.get(who[0])
            if keep is not None and keep[0] == who[1]:
                continue
            writer = RootWriter(self.root, who[0], who[1], status_period=self.options.status_period,
                                lease_duration=self.options.lease_duration, timeout=self.options.root_timeout,
                                count=functools.partial(self._count, who[0]))
            try:
                writer.delete(node)
            except Exception as e:
                _log.warning("deleting virtual node %s of Cluster %s: %s", node["metadata"]["name"], who[0], e)
