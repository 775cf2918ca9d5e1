"""The multi-cluster services controller: every member's exports, imported into every member.

One :class:`Controller` watches each :class:`Member` (informers on ServiceExports, Services,
EndpointSlices, ServiceImports, Namespaces and its ClusterTree virtual Nodes) and runs a pass
whenever any of them changes (coalesced: changes arriving while a pass runs make one more pass), when the fabric's
reachability changes (:meth:`Controller.kick`) and every ``resync_s``:

1. each member's ServiceExports are read with the Service of their name and its EndpointSlices
   into :class:`~mcs.derive.Export` values (:func:`mcs.kube.export_from`). Objects this
   controller made are never read as an export's: a ServiceExport next to one of our derived
   Services is a ServiceExport of no Service. An endpoint on one of the member's virtual nodes
   (a ClusterTree root's pod running in a leaf) is read as running in the leaf the node names;
2. :func:`mcs.derive.derive` makes the clusterset's imports and the exports' conditions, each
   endpoint's address translated with the global CIDRs of the cluster it runs in (the members',
   and :attr:`Controller.global_cidrs` for the fabric clusters that are not members);
3. per member: :func:`mcs.derive.view` (the families it reaches, the clusters the fabric reports
   it cannot reach now: ``unreachable``, which gates each endpoint on the cluster it runs in,
   not on its exporter), rendered (:mod:`mcs.kube`: the derived Service
   :func:`mcs.kube.derived_name`; the ServiceImport carries its cluster IPs),
   planned against what the member has of ours (:func:`mcs.plan.plan`) and written
   (:class:`mcs.apply.Applier`). A namespace the member does not have gets no import there
   (namespace sameness: the service is for that namespace's workloads), and when the namespace
   goes, its imports go with it;
4. each ServiceExport's ``Valid`` and ``Conflict`` conditions are written to its status when
   they changed (transition times kept, :func:`mcs.kube.conditions`);
5. with auto-export on (``auto_export_prefixes``, or a Service annotated
   :data:`mcs.kube.AUTO_CREATE_ANNOTATION` ``"true"``: issue 18 item 1, Kosmos' names), the
   member's ServiceExports that auto-export asks for are created, and ours that it no longer asks
   for deleted (:func:`mcs.kube.auto_exports`; a user's own ServiceExport is never touched).

Steps 1-2 run on the controller's thread; steps 3-5 (each member's writes) on that member's own
:class:`_Writer` thread, which takes the newest pass's work (latest wins: a slow member never
queues stale passes). The pass waits for the writers at most ``pass_wait_s`` (and not at all once
a new kick arrived), so a member whose API server hangs delays nobody else.

**Isolation, and where the line is.** Every exception raised by a call to a member's API server
(:class:`~scheduler.kube.ApiError`, and :data:`TRANSPORT_ERRORS`: urllib3's connection errors and
timeouts, ``OSError``, an unparseable body) is that member's failure: a failed object write is
counted and the others go on (:class:`mcs.apply.Applier`); a transport failure ends that member's
writes for this pass (:class:`~mcs.apply.MemberUnavailable`: the next request would wait out the
same timeout). Either way the failure is logged once per failure streak (and once when it ends),
counted (``on_member_error``: ``fabric_mcs_member_errors_total``) and the member's work is
retried after ``retry_s`` (sooner if a new pass comes). Every other exception, anywhere in a pass
or a writer, is a bug in our own code (the pure steps cannot fail on input: they refuse bad input
with ValueError, which the pass handles per export): it ends the controller (:attr:`Controller.crashed`
is set, :attr:`Controller.error` holds it), and ``kosmos-mcs`` exits 1 so its supervisor restarts
it, instead of running on in a state nobody tested.

Informers of a dead member keep retrying (:class:`scheduler.kube.Informer`: every second, its
store kept), so a member that was read once keeps exporting what it last exported while its API
server is away; when it answers again a re-list brings the changes. A member that has never
synced is waited for up to ``startup_wait_s``; after that passes run without it (its exports are
unknown, so none are imported; it imports nothing) until it syncs.

A failed write never stops a pass; the next pass, at the latest the resync, plans from what the
member has then. State lives in the members' API objects only: a restarted controller computes
the same desired state and writes nothing that is already right.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcs import kube as mk
from mcs.apply import TRANSPORT_ERRORS, Applier, MemberUnavailable, Result
from mcs.derive import CONFLICT, Derived, Export, Import, derive, view
from mcs.plan import key, plan
from scheduler.kube import Api, ApiError, Informer, resource_path

_log = logging.getLogger(__name__)

Obj = dict[str, Any]

__all__ = ["TRANSPORT_ERRORS", "Controller", "Member", "ns_name"]


@dataclass
class Member:
    """A member cluster: its name (the clusterset's id for it), API, the fabric's global CIDR
    mapping of its pods and the address families its pods reach across the fabric."""

    name: str
    api: Api
    global_cidrs: tuple[tuple[str, str], ...] = ()
    families: frozenset[str] = frozenset({"IPv4"})
    informers: dict[str, Informer] = field(default_factory=dict)

    def node_clusters(self) -> dict[str, str]:
        """This member's virtual nodes: node name -> the fabric cluster its pods run in."""
        return mk.virtual_node_clusters(self.objects("Node"))

    def watch(self) -> None:
        self.informers = {
            "ServiceExport": Informer(self.api, mk.GROUP_VERSION, "serviceexports", copy_on_write=True),
            "ServiceImport": Informer(self.api, mk.GROUP_VERSION, "serviceimports", copy_on_write=True),
            "Service": Informer(self.api, "v1", "services", copy_on_write=True),
            "EndpointSlice": Informer(self.api, "discovery.k8s.io/v1", "endpointslices", copy_on_write=True),
            "Namespace": Informer(self.api, "v1", "namespaces", copy_on_write=True),
            # ClusterTree virtual nodes only: where a root's endpoints really run.
            "Node": Informer(self.api, "v1", "nodes", label_selector=mk.VIRTUAL_NODE_SELECTOR,
                             copy_on_write=True),
        }

    def objects(self, kind: str) -> list[Obj]:
        """The informer's objects of ``kind``, each with its kind (a list's items carry none)."""
        return [{**o, "kind": kind} for o in self.informers[kind].store.values()]

    def synced(self) -> bool:
        return bool(self.informers) and all(inf.synced.is_set() for inf in self.informers.values())


def _rfc3339(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: ``on_member_error(cluster, stage)``: stage ``import`` (writes of imports), ``status`` (the
#: ServiceExports' conditions), ``export`` (auto-created ServiceExports).
ErrorHook = Callable[[str, str], None]


class _Writer:
    """One member's writes (steps 3-5 of the module docstring) on a thread of its own: the newest
    work wins, a failure retries after ``retry_s``."""

    def __init__(self, ctl: Controller, member: Member) -> None:
        self.ctl = ctl
        self.member = member
        self._work: tuple[int, Derived, str] | None = None
        self._cv = threading.Condition()
        #: The generation (pass number) last written, whatever its outcome.
        self.done = 0
        #: The first error of the current failure streak ("" while healthy).
        self.failing = ""
        self.thread = threading.Thread(target=self._run, name=f"mcs-writer-{member.name}", daemon=True)

    def submit(self, gen: int, derived: Derived, now: str) -> None:
        with self._cv:
            self._work = (gen, derived, now)
            self._cv.notify_all()

    def wait(self, gen: int, deadline: float, interrupted: Callable[[], bool]) -> None:
        with self._cv:
            while self.done < gen and not interrupted():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cv.wait(min(left, 0.02))

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug: the controller ends (module docstring)
            self.ctl._crash(e, f"writer of cluster {self.member.name}")

    def _loop(self) -> None:
        retry_at: float | None = None
        last: tuple[int, Derived, str] | None = None
        while not self.ctl._stop.is_set():
            with self._cv:
                while self._work is None and not self.ctl._stop.is_set():
                    timeout = None if retry_at is None else retry_at - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        break
                    self._cv.wait(timeout if timeout is not None else 1.0)
                if self.ctl._stop.is_set():
                    return
                work, self._work = self._work, None
            if work is None:  # the retry of a failed pass
                if last is None:
                    retry_at = None
                    continue
                work = last
            last = work
            gen, derived, now = work
            ok = self._write(derived, now)
            retry_at = None if ok else time.monotonic() + self.ctl.retry_s
            with self._cv:
                self.done = max(self.done, gen)
                self._cv.notify_all()

    def _write(self, derived: Derived, now: str) -> bool:
        """One pass of this member's writes; False when it failed (retried)."""
        m, ctl = self.member, self.ctl
        failed: list[tuple[str, str]] = []
        stages: list[tuple[str, Callable[[], Result]]] = [
            ("import", lambda: ctl._import_into(m, derived, now)),
            ("status", lambda: ctl._export_status(m, derived, now)),
        ]
        if ctl.auto_export_prefixes or ctl.auto_export_annotation:
            stages.append(("export", lambda: ctl._auto_export(m)))
        stale = False
        written = 0
        for stage, run in stages:
            try:
                res = run()
            except MemberUnavailable as e:
                failed.append((stage, str(e)))
                break  # the next request would wait out the same timeout
            if stage == "import":
                ctl.last[m.name] = res
            stale = stale or res.stale > 0
            written += res.written
            if res.failed:
                failed.append((stage, f"{res.failed} write(s) failed: {res.first_error}"))
        if not failed and self.failing and not written:
            # A pass with nothing to write (the informers' copy already matches, perhaps from
            # before the failure) proves nothing: ask the API server before calling it recovered.
            try:
                m.api.request("GET", "/version", timeout=5.0)
            except ApiError:
                pass  # an answer, whatever its status: the API server is back
            except TRANSPORT_ERRORS as e:
                failed.append(("probe", f"API server unavailable: {type(e).__name__}: {e}"))
        for stage, _ in failed:
            if ctl.on_member_error is not None:
                ctl.on_member_error(m.name, stage)
        if failed and not self.failing:
            self.failing = failed[0][1]
            _log.warning("cluster %s: %s (%s); retried every %gs while it fails, logged again when it recovers",
                         m.name, failed[0][1], failed[0][0], ctl.retry_s)
        elif not failed and self.failing:
            _log.info("cluster %s: writes succeed again (the failure streak began with: %s)", m.name, self.failing)
            self.failing = ""
        return not failed and not stale


class Controller:
    """The passes over ``members`` (module docstring). ``unreachable``: importer -> the clusters
    the fabric reports it cannot reach (:class:`mcs.reachability.Reachability`); ``global_cidrs``:
    the mappings of fabric clusters that are not members (:attr:`global_cidrs`); ``resync_s``:
    a pass at least this often; ``retry_s``: a member whose writes failed is tried again after
    it; ``pass_wait_s``: how long a pass waits for the writers; ``startup_wait_s``: how long
    passes wait for every member's first list; ``auto_export_*``: step 5; ``on_member_error``
    and ``on_pass``: the metrics' hooks."""

    def __init__(self, members: Sequence[Member], *, unreachable: Callable[[str], Iterable[str]] | None = None,
                 global_cidrs: dict[str, tuple[tuple[str, str], ...]] | None = None,
                 resync_s: float = 30.0, clock: Callable[[], datetime.datetime] | None = None,
                 retry_s: float = 2.0, pass_wait_s: float = 1.0, startup_wait_s: float = 30.0,
                 auto_export_prefixes: Sequence[str] = (), auto_export_annotation: bool = True,
                 on_member_error: ErrorHook | None = None,
                 on_pass: Callable[[float], None] | None = None) -> None:
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"member clusters named twice: {sorted(n for n in names if names.count(n) > 1)}")
        self.members = list(members)
        self.unreachable = unreachable or (lambda _cluster: ())
        #: The global CIDR mappings of fabric clusters that are not members, by name: a root
        #: member's pods on a virtual node run in its leaf, with the leaf's pod IPs, which are
        #: translated with the leaf's mapping (:func:`mcs.derive.derive`) member or not.
        self.global_cidrs: dict[str, tuple[tuple[str, str], ...]] = dict(global_cidrs or {})
        self.resync_s = resync_s
        self.retry_s = retry_s
        self.pass_wait_s = pass_wait_s
        self.startup_wait_s = startup_wait_s
        self.auto_export_prefixes = tuple(auto_export_prefixes)
        #: Honour :data:`mcs.kube.AUTO_CREATE_ANNOTATION` (on by default; it asks per Service).
        self.auto_export_annotation = auto_export_annotation
        self.on_member_error = on_member_error
        self.on_pass = on_pass
        self.clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self.passes = 0
        self.last: dict[str, Result] = {}
        #: Set when a bug ended the controller (module docstring); ``error`` is what it raised.
        self.crashed = threading.Event()
        self.error: BaseException | None = None
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writers = {m.name: _Writer(self, m) for m in self.members}
        self._started = 0.0
        self._watching = False
        self._waiting_logged: set[str] = set()

    # -- running ------------------------------------------------------------------------------

    def watch(self) -> None:
        """Start the members' informers (once): before :meth:`start` when something else reads
        them while this replica waits for the Lease (the DNS responders)."""
        if self._watching:
            return
        self._watching = True
        for m in self.members:
            m.watch()
            for inf in m.informers.values():
                inf.add_handler(lambda *_: self._kick.set())
                inf.start()

    def start(self) -> None:
        """Start the informers (:meth:`watch`), the members' writers and the passes."""
        self._started = time.monotonic()
        self.watch()
        for w in self._writers.values():
            w.thread.start()
        self._thread = threading.Thread(target=self._run, name="mcs-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        for w in self._writers.values():
            with w._cv:
                w._cv.notify_all()
        for m in self.members:
            for inf in m.informers.values():
                inf.stop()
        if self._thread is not None:
            self._thread.join(10)
        for w in self._writers.values():
            if w.thread.is_alive() and w.thread is not threading.current_thread():
                w.thread.join(10)

    def kick(self) -> None:
        """Run a pass now (the fabric's reachability changed)."""
        self._kick.set()

    def synced(self) -> bool:
        return all(m.synced() for m in self.members)

    def failing(self) -> dict[str, str]:
        """Members whose writes fail now: cluster -> the first error of the streak."""
        return {n: w.failing for n, w in self._writers.items() if w.failing}

    def _crash(self, e: BaseException, where: str) -> None:
        if not self.crashed.is_set():
            self.error = e
            _log.critical("bug in the %s: %s: %s; the controller stops (kosmos-mcs exits for its supervisor to "
                          "restart it)", where, type(e).__name__, e, exc_info=e)
            self.crashed.set()
        self._stop.set()
        self._kick.set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._kick.wait(self.resync_s)
                self._kick.clear()
                if self._stop.is_set():
                    return
                members = self._ready_members()
                if members is None:  # not every member synced yet: look again soon
                    self._stop.wait(0.1)
                    self._kick.set()
                    continue
                self.reconcile(members)
        except BaseException as e:  # a bug: the controller ends (module docstring)
            self._crash(e, "controller pass")

    def _ready_members(self) -> list[Member] | None:
        """The members a pass covers: all once synced; before that, None (wait) until
        ``startup_wait_s`` has passed, then the synced ones (the others are logged once)."""
        ready = [m for m in self.members if m.synced()]
        if len(ready) == len(self.members):
            return ready
        if time.monotonic() - self._started < self.startup_wait_s:
            return None
        for m in self.members:
            if not m.synced() and m.name not in self._waiting_logged:
                self._waiting_logged.add(m.name)
                _log.warning("cluster %s: its API server has not been read completely after %gs; passes go on "
                             "without it (its exports are unknown, it imports nothing) until it answers",
                             m.name, self.startup_wait_s)
        return ready

    # -- one pass -----------------------------------------------------------------------------

    def exports(self, members: Sequence[Member] | None = None) -> list[Export]:
        """Every member's exports (step 1); an unreadable one is logged and left out."""
        out = []
        for m in self.members if members is None else members:
            services = {ns_name(o): o for o in m.objects("Service") if not mk.owned(o)}
            slices = [o for o in m.objects("EndpointSlice") if not mk.owned(o)]
            nodes = m.node_clusters()
            for ex in m.objects("ServiceExport"):
                k = ns_name(ex)
                try:
                    out.append(mk.export_from(m.name, ex, services.get(k), [s for s in slices if ns_name(s)[0] == k[0]],
                                              m.global_cidrs, nodes))
                except ValueError as e:
                    _log.warning("%s", e)
        return out

    def fabric_global_cidrs(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """Every fabric cluster's global CIDR mapping known here: :attr:`global_cidrs` (clusters
        that are not members: a ClusterTree root's leaves), then the members' own."""
        return {**self.global_cidrs, **{m.name: m.global_cidrs for m in self.members}}

    def reconcile(self, members: Sequence[Member] | None = None) -> Derived:
        """One pass over ``members`` (default: all): derive on this thread, hand each member's
        writes to its writer, wait for them up to ``pass_wait_s`` (or until kicked again)."""
        began = time.monotonic()
        members = self.members if members is None else list(members)
        derived = derive(self.exports(members), self.fabric_global_cidrs())
        now = _rfc3339(self.clock())
        self.passes += 1
        gen = self.passes
        for m in members:
            self._writers[m.name].submit(gen, derived, now)
        deadline = time.monotonic() + self.pass_wait_s
        for m in members:
            self._writers[m.name].wait(gen, deadline, lambda: self._kick.is_set() or self._stop.is_set())
        if self.on_pass is not None:
            self.on_pass(time.monotonic() - began)
        return derived

    def _import_into(self, m: Member, derived: Derived, now: str) -> Result:
        namespaces = {o["metadata"]["name"] for o in m.objects("Namespace")
                      if not (o["metadata"].get("deletionTimestamp"))}
        imports = {k: imp for k, imp in view(derived, m.name, m.families, self.unreachable(m.name)).items()
                   if k[0] in namespaces}
        services = {ns_name(o): o for o in m.objects("Service")}
        current_imports = {ns_name(o): o for o in m.objects("ServiceImport")}
        desired: list[Obj] = []
        for k, imp in imports.items():
            desired += self._rendered(imp, services, current_imports.get(k), now)
        # Ours, and whatever holds a name we would write (a clash, never written over).
        wanted = {key(o) for o in desired}
        current = [o for kind in ("Service", "EndpointSlice", "ServiceImport") for o in m.objects(kind)
                   if mk.owned(o) or key(o) in wanted]
        return Applier(m.api, m.name).apply(plan(desired, current))

    @staticmethod
    def _rendered(imp: Import, services: dict[tuple[str, str], Obj], current_import: Obj | None, now: str) -> list[Obj]:
        own = services.get((imp.namespace, mk.derived_name(imp.name)))
        spec = (own or {}).get("spec") or {} if own is not None and mk.owned(own) else {}
        ips = [ip for ip in spec.get("clusterIPs") or [] if ip != "None"]
        return [mk.render_service(imp), *mk.render_slices(imp),
                mk.render_service_import(imp, ips, current=current_import, now=now)]

    def _export_status(self, m: Member, derived: Derived, now: str) -> Result:
        res = Result()
        for ex in m.objects("ServiceExport"):
            k = ns_name(ex)
            conds = derived.export_conditions.get((m.name, *k))
            if conds is None:
                continue
            had = (ex.get("status") or {}).get("conditions") or []
            want = mk.conditions(conds, had, now)
            if _same_conditions(want, had):
                continue
            body = {**ex, "status": {**(ex.get("status") or {}), "conditions": want}}
            try:
                m.api.update(resource_path(mk.GROUP_VERSION, "serviceexports", k[0], k[1], "status"), body)
            except ApiError as e:
                if e.status == 409:  # a stale read: retried (mcs.apply.Result.stale)
                    res.stale += 1
                    continue
                res.failed += 1
                res.first_error = res.first_error or (f"could not write the conditions of ServiceExport "
                                                      f"{k[0]}/{k[1]}: {e}")
                continue
            except TRANSPORT_ERRORS as e:
                raise MemberUnavailable(m.name, f"writing the conditions of ServiceExport {k[0]}/{k[1]}", e) from e
            res.written += 1
            if conds[1].type == CONFLICT and conds[1].status == "True":
                _log.warning("cluster %s: ServiceExport %s/%s conflicts: %s", m.name, k[0], k[1], conds[1].message)
        return res

    def _auto_export(self, m: Member) -> Result:
        """Step 5: the ServiceExports auto-export asks for, created; ours it no longer asks for, deleted."""
        namespaces = {o["metadata"]["name"] for o in m.objects("Namespace")
                      if not (o["metadata"].get("deletionTimestamp"))}
        services = [o for o in m.objects("Service") if not mk.owned(o) and ns_name(o)[0] in namespaces]
        exports = m.objects("ServiceExport")
        desired = mk.auto_exports(services, exports, self.auto_export_prefixes, self.auto_export_annotation)
        current = [o for o in exports if mk.owned(o)]
        return Applier(m.api, m.name).apply(plan(desired, current))


def ns_name(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _same_conditions(want: list[Obj], had: list[Any]) -> bool:
    strip = [{k: c.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime")}
             for c in had if isinstance(c, dict)]
    return strip == want
