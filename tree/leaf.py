"""One leaf cluster's reconciler: its virtual nodes in the root kept as its nodes and pods say.

Each leaf has its own thread, its own connection pool and its own informers, and every request
it makes has a timeout, so a leaf that hangs or refuses stalls nothing but itself. In order, on
the reconciler's thread:

1. Connect: read the kubeconfig from the Cluster's Secret in the root (key ``kubeconfig``), open
   the leaf's API with it, start informers on its Nodes and Pods. The Secret is read again every
   resync period, when the spec names another Secret, and at every probe while there is no
   connection: a new kubeconfig (or Secret reference) reconnects; a failed re-read of the same
   Secret keeps the connection it has.
2. Probe: ``GET /version`` every lease period, with the leaf timeout. The leaf counts as
   unreachable once it has not answered for the threshold (``--leaf-unreachable-after``,
   default 40 s, from the last answer, or from this reconciler's start when it never answered).
   When it answers again its Nodes and Pods are listed afresh (new informers), so a watch stream
   that died without a word is not waited out. With the informers, the leaf's Events about our
   pods start being reflected to the root pods (:class:`tree.events.EventReflector`, restarted
   with them).
3. Reconcile, on every change of the leaf's Nodes or Pods (a pod change only when it changes
   what the forge reads of it, :func:`tree.forge.pod_footprint`: a pod going Running changes
   nothing), of our virtual nodes in the root, of the spec, of the fabric's reachability, and on
   every probe, at most once per ``Options.pass_interval`` (changes meanwhile are coalesced into
   the next pass, which reads the informers as they are then: the result is the same pure
   function of the informers' state, only computed less often): forge the virtual nodes
   (:mod:`tree.forge`; ``NetworkUnavailable`` as :class:`tree.fabric_link.FabricLink` says),
   write what differs (:class:`tree.vnode.RootWriter`), delete our virtual nodes of this
   Cluster that are no longer wanted (membership moved); hand the link the records of the
   virtual nodes now ours (:func:`tree.forge.leaf_resources`); renew their Leases while the
   leaf answers. Until the leaf's informers have listed once, nothing is created, deleted or
   published (a restarted manager facing an unreachable leaf keeps the nodes as they are), and
   past the threshold their Ready condition alone turns False.

A failed pass is retried with back-off (:class:`fabric.backoff.Backoff`); nothing is kept only in
memory that the next pass could not rebuild from the API objects.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from fabric.backoff import Backoff
from scheduler.kube import Api, ApiError, Informer, connect_kubeconfig, resource_path
from tree import forge
from tree.events import EventReflector
from tree.fabric_link import FabricLink
from tree.metrics import TreeMetrics
from tree.podsync import Converter, DependenciesFactory, PodSyncer, RootPods
from tree.spec import KUBECONFIG_KEY, TreeSpec
from tree.vnode import RootWriter, owner

_log = logging.getLogger(__name__)

Obj = dict[str, Any]
#: Builds the leaf's Api from a kubeconfig document (tests may wrap it).
Connector = Callable[[Obj], Api]


@dataclass(frozen=True)
class Options:
    """Timing and identity shared by every leaf's reconciler (``kosmos-tree``'s flags)."""

    #: This root's id: leaf objects labelled ``kosmos.io/root-cluster=<root_id>`` are ours.
    root_id: str
    #: Seconds a leaf request (probe, informer list) may take.
    leaf_timeout: float = 10.0
    #: Seconds without an answer from the leaf before its virtual nodes turn NotReady.
    unreachable_after: float = 40.0
    #: Seconds between probes and Lease renewals (kubelet: 10 s).
    lease_period: float = 10.0
    #: The virtual nodes' Lease duration (kubelet: 40 s).
    lease_duration: float = 40.0
    #: Seconds after which an unchanged node status is written again (its heartbeat).
    status_period: float = 60.0
    #: Seconds between re-reads of the kubeconfig Secret (and of the manager's full pass).
    resync_period: float = 30.0
    #: Seconds a root request may take.
    root_timeout: float = 30.0
    #: The kubelet server (:mod:`tree.kubelet`) the virtual nodes advertise: InternalIP and
    #: port ("" / 0: none).
    kubelet_address: str = ""
    kubelet_port: int = 0
    #: Worker threads syncing one leaf's pods (:class:`tree.podsync.PodSyncer`).
    pod_workers: int = 8
    #: Seconds at least between two passes of one leaf (events meanwhile make one pass): the
    #: forge walks every pod of the leaf, so a pass per pod event costs O(pods) per event.
    pass_interval: float = 0.2
    #: Seconds a leaf copy may stay Pending and Unschedulable in its leaf before it counts as
    #: stranded (:class:`tree.podsync.PodSyncer`: unpinned, or its root pod evicted).
    stranded_after: float = 30.0


def _connect_leaf(doc: Obj) -> Api:
    return connect_kubeconfig(doc, user_agent="kosmos-tree")


class LeafReconciler:
    """The virtual nodes of one Cluster (see the module's steps)."""

    def __init__(self, spec: TreeSpec, root: Api, root_nodes: Informer, options: Options, metrics: TreeMetrics,
                 *, connect: Connector = _connect_leaf, clock: Callable[[], float] = time.monotonic,
                 on_exit: Callable[[], None] = lambda: None, link: FabricLink | None = None,
                 root_pods: RootPods | None = None, dependencies: DependenciesFactory | None = None,
                 converter: Converter | None = None) -> None:
        """``on_exit`` runs on the reconciler's thread when it ends (the manager collects the
        nodes of a Cluster only once its reconciler can no longer write them back). ``link``:
        the reflector's (records out, reachability in), None without one. ``root_pods``: the
        manager's root pod informer; with it the leaf's pods are synced too
        (:class:`tree.podsync.PodSyncer`, given ``dependencies`` and ``converter``)."""
        self.spec = spec
        self.link = link
        #: Set by :meth:`retire`: the Cluster's records go when the thread ends.
        self._retired = False
        self.on_exit = on_exit
        self.root = root
        self.root_nodes = root_nodes
        self.options = options
        self.metrics = metrics
        self.connect = connect
        self.clock = clock
        self.writer = RootWriter(root, spec.cluster, spec.uid, status_period=options.status_period,
                                 lease_duration=options.lease_duration, timeout=options.root_timeout,
                                 count=lambda kind: metrics.root_writes.labels(spec.cluster, kind).inc())
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._leaf: Api | None = None
        self._informers: list[Informer] = []
        #: Leaf Events about our pods reflected to the root (:mod:`tree.events`), while connected.
        self._events: EventReflector | None = None
        self._fingerprint = ""
        #: The Secret reference connected with, and the one last read (maybe unsuccessfully).
        self._secret_ref = ("", "")
        self._secret_tried = ("", "")
        self._started = clock()
        self._last_ok: float | None = None
        self._probe_ok = False
        #: The first failure since the last answer: (wall-clock time, text); fixed while it lasts,
        #: so the NotReady message does not change (and cause a write) on every pass.
        self._failure: tuple[str, str] | None = None
        self._version = ""
        self._last_lease = -1e18
        #: When the last pass started (``clock``): the next waits ``Options.pass_interval``.
        self._last_pass = -1e18
        self._conflicts: set[str] = set()
        self._backoff = Backoff(initial=0.2, maximum=10.0)
        self._retry_at: float | None = None
        #: Completed passes over a synced leaf (for tests and /debug: progress, not state).
        self.passes = 0
        self.pods: PodSyncer | None = None
        if root_pods is not None:
            self.pods = PodSyncer(root, root_pods, root_nodes, lambda: self.spec, root_id=options.root_id,
                                  metrics=metrics, workers=options.pod_workers, leaf_timeout=options.leaf_timeout,
                                  root_timeout=options.root_timeout, resync_period=options.resync_period,
                                  dependencies=dependencies, converter=converter,
                                  stranded_after=options.stranded_after)

    # ------------------------------------------------------------------ lifecycle

    @property
    def key(self) -> tuple[str, str]:
        return (self.spec.cluster, self.spec.uid)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"leaf-{self.spec.cluster}", daemon=True)
        self._thread.start()
        if self.pods is not None:
            self.pods.start()

    def kick(self) -> None:
        self._wake.set()

    def update(self, spec: TreeSpec) -> None:
        """A new spec of the same Cluster (models, mode, Secret reference): applied on the next pass."""
        self.spec = spec
        self.kick()

    def stop(self) -> None:
        """Ask the thread to end (it ends after the request in flight, bounded by the timeouts)."""
        self._stop.set()
        self._wake.set()
        for inf in self._informers:
            inf.stop()
        if self.pods is not None:
            self.pods.stop()

    def retire(self) -> None:
        """Stop for good (the Cluster is gone or its tree disabled): its records are deleted
        once the thread has ended, so a pass in flight cannot publish them again."""
        self._retired = True
        self.stop()

    @property
    def leaf(self) -> Api | None:
        """The leaf's Api while connected (the kubelet server's and the syncers' way in)."""
        return self._leaf

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        if self.pods is not None:
            self.pods.join(timeout)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._stop_events()
            for inf in self._informers:
                inf.stop()
            if self.pods is not None:
                self.pods.stop()
            if self._retired and self.link is not None:
                self.link.forget(self.key)
            self.on_exit()

    def _loop(self) -> None:
        next_probe = 0.0
        next_secret = 0.0
        while not self._stop.is_set():
            now = self.clock()
            due = [next_probe, next_secret] + ([self._retry_at] if self._retry_at is not None else [])
            self._wake.wait(max(0.0, min(due) - now))
            if self._stop.is_set():
                break
            gap = self._last_pass + self.options.pass_interval - self.clock()
            if gap > 0 and self._stop.wait(gap):  # changes meanwhile join this pass
                break
            self._wake.clear()
            now = self.clock()
            if now >= next_secret or self._secret_tried != (self.spec.secret_namespace, self.spec.secret_name):
                self._check_secret()
                next_secret = now + self.options.resync_period
            if now >= next_probe:
                self._probe()
                next_probe = self.clock() + self.options.lease_period
            if self._stop.is_set():
                break
            try:
                self._last_pass = self.clock()
                self._reconcile()
                self._backoff.reset()
                self._retry_at = None
            except Exception as e:
                if self._stop.is_set():
                    break
                self.metrics.reconcile_errors.labels(self.spec.cluster).inc()
                delay = self._backoff.next()
                level = logging.DEBUG if isinstance(e, ApiError) and e.status == 409 else logging.WARNING
                _log.log(level, "Cluster %s: reconcile failed (%s: %s); retrying in %.1f s", self.spec.cluster,
                         type(e).__name__, e, delay)
                self._retry_at = self.clock() + delay

    # ------------------------------------------------------------------ the leaf

    def _check_secret(self) -> None:
        """(Re)connect when the kubeconfig or the Secret reference changed."""
        ns, name = self.spec.secret_namespace, self.spec.secret_name
        self._secret_tried = (ns, name)
        where = f"Secret {ns}/{name} (spec.clusterTreeOptions.kubeconfigSecretRef of Cluster {self.spec.cluster})"
        try:
            secret = self.root.request("GET", resource_path("v1", "secrets", ns, name),
                                       timeout=self.options.root_timeout)
            raw = (secret.get("data") or {}).get(KUBECONFIG_KEY)
            if not raw:
                raise ValueError(f"has no key {KUBECONFIG_KEY!r}")
            text = base64.b64decode(raw, validate=True)
            fingerprint = hashlib.sha256(text).hexdigest()
            if fingerprint == self._fingerprint and self._leaf is not None:
                self._secret_ref = (ns, name)
                return
            doc = yaml.safe_load(text)
            if not isinstance(doc, dict):
                raise ValueError(f"key {KUBECONFIG_KEY!r} is not a kubeconfig (a YAML mapping)")
            leaf = self.connect(doc)
        except Exception as e:  # the Secret, or the kubeconfig loader's own errors (no server, bad certificates)
            problem = f"reading {where}: {type(e).__name__}: {e}"
            if self._leaf is None:
                self._fail(problem)  # nothing to talk to: the leaf counts as unreachable
            elif (ns, name) == self._secret_ref:
                _log.warning("Cluster %s: %s; keeping the current connection", self.spec.cluster, problem)
            else:
                self._disconnect()
                self._fail(problem)
            return
        self._disconnect()
        self._leaf, self._fingerprint, self._secret_ref = leaf, fingerprint, (ns, name)
        self._start_informers()
        _log.info("Cluster %s: connected to the leaf at %s", self.spec.cluster, leaf.host)

    def _disconnect(self) -> None:
        self._stop_events()
        for inf in self._informers:
            inf.stop()
        if self.pods is not None:
            self.pods.detach()
        self._informers, self._leaf, self._fingerprint = [], None, ""

    def _start_informers(self) -> None:
        """Fresh informers (a first LIST): on connecting, and when the leaf answers again after
        an outage, so a watch stream that died silently is not waited out (minutes)."""
        assert self._leaf is not None
        for inf in self._informers:
            inf.stop()
        self._informers = [Informer(self._leaf, "v1", "nodes"), Informer(self._leaf, "v1", "pods")]
        if self.pods is not None:
            self.pods.attach(self._leaf, self._informers[1])  # before start: it sees the first LIST
        self._informers[0].add_handler(lambda _t, _o, _n: self._wake.set())
        self._informers[1].add_handler(self._on_pod)
        self._stop_events()
        self._events = EventReflector(self.root, self._leaf, self.options.root_id, self.spec.cluster,
                                      timeout=self.options.root_timeout, metrics=self.metrics,
                                      pods=self._informers[1],  # one pod watch per leaf, not two
                                      root_pods=self.pods.root_pods.get if self.pods is not None else None)
        for inf in self._informers:
            inf.start()
        self._events.start()

    def _on_pod(self, kind: str, old: Obj | None, new: Obj | None) -> None:
        """A leaf pod changed: a pass only when the virtual nodes may change with it."""
        root_id = self.options.root_id
        if kind != "MODIFIED" or old is None or new is None \
                or forge.pod_footprint(old, root_id) != forge.pod_footprint(new, root_id):
            self._wake.set()

    def _stop_events(self) -> None:
        if self._events is not None:
            self._events.stop()
            self._events = None

    def _probe(self) -> None:
        if self._leaf is None:
            self._check_secret()  # a Secret created or fixed since: no need to wait for the resync
        if self._leaf is None:
            self._probe_ok = False
            self.metrics.leaf_reachable.labels(self.spec.cluster).set(0)
            return
        try:
            version = self._leaf.request("GET", "/version", timeout=self.options.leaf_timeout) or {}
        except Exception as e:
            self._fail(f"GET {self._leaf.host}/version: {type(e).__name__}: {e}")
            return
        if self._failure is not None:
            _log.info("Cluster %s: the leaf answers again; listing its nodes and pods afresh", self.spec.cluster)
            self._start_informers()
        self._version = str(version.get("gitVersion") or "")
        self._last_ok, self._probe_ok, self._failure = self.clock(), True, None
        self.metrics.leaf_reachable.labels(self.spec.cluster).set(1)

    def _fail(self, text: str) -> None:
        self.metrics.leaf_probe_failures.labels(self.spec.cluster).inc()
        self.metrics.leaf_reachable.labels(self.spec.cluster).set(0)
        self._probe_ok = False
        if self._failure is None:
            since = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._failure = (since, text)
            _log.warning("Cluster %s: %s", self.spec.cluster, text)

    def unreachable(self) -> str | None:
        """The NotReady message when the leaf has not answered for the threshold, else None."""
        last = self._last_ok if self._last_ok is not None else self._started
        if self._probe_ok or self.clock() - last < self.options.unreachable_after:
            return None
        since, text = self._failure or ("?", "no answer yet")
        return (f"the API server of leaf cluster {self.spec.cluster} has not answered for more than "
                f"{self.options.unreachable_after:g} s (failing since {since}): {text}")

    def _synced(self) -> bool:
        return bool(self._informers) and all(inf.synced.is_set() and inf.served for inf in self._informers)

    # ------------------------------------------------------------------ the root

    def _reconcile(self) -> None:
        spec = self.spec
        store = self.root_nodes.store  # copy-on-write: this dict is never mutated
        mine = {n["metadata"]["name"]: n for n in store.values() if owner(n) == (spec.cluster, spec.uid)}
        unreachable = self.unreachable()
        if not self._synced():
            if unreachable is not None:
                for n in mine.values():
                    self._guard()
                    self.writer.mark(n, forge.NOT_READY, forge.REASON_UNREACHABLE, unreachable)
            return
        nodes_inf, pods_inf = self._informers
        # dict.copy() runs in C under the GIL: a consistent copy while the informer thread writes.
        desired = forge.virtual_nodes(spec, nodes_inf.store.copy().values(), pods_inf.store.copy().values(),
                                      root_id=self.options.root_id, unreachable=unreachable,
                                      kubelet_version=self._version,
                                      network=self.link.network(spec.cluster) if self.link is not None else None,
                                      address=self.options.kubelet_address, kubelet_port=self.options.kubelet_port)
        written: list[Obj] = []
        errors: list[str] = []
        conflicts: set[str] = set()
        for name, vn in desired.items():
            self._guard()
            try:
                node = self.writer.ensure(vn, mine.get(name) or store.get(name))
            except ApiError as e:
                errors.append(f"node {name}: {e}")
                continue
            if node is None:
                conflicts.add(name)
                if name not in self._conflicts:
                    _log.warning("Cluster %s: a Node %s exists that is not this Cluster's virtual node; left alone",
                                 spec.cluster, name)
            else:
                written.append(node)
        self._conflicts = conflicts
        self.metrics.conflicts.labels(spec.cluster).set(len(conflicts))
        for name, n in mine.items():
            if name not in desired:
                self._guard()
                self.writer.delete(n)
        if self.link is not None:
            self._guard()
            self.link.publish(self.key, {name: forge.leaf_resources(vn, spec.cluster)
                                             for name, vn in desired.items() if name not in conflicts})
        self.metrics.virtual_nodes.labels(spec.cluster).set(len(written))
        now = self.clock()
        if self._probe_ok and now - self._last_lease >= self.options.lease_period * 0.9:
            for n in written:
                self._guard()
                self.writer.renew_lease(n)
            self._last_lease = now
        if errors:
            raise RuntimeError("; ".join(errors))
        self.passes += 1

    def _guard(self) -> None:
        """Raise before a write once stopped: a stopped reconciler writes nothing more."""
        if self._stop.is_set():
            raise _Stopped()


class _Stopped(Exception):
    pass
