"""The multi-cluster services controller: every member's exports, imported into every member.

One :class:`Controller` watches each :class:`Member` (informers on ServiceExports, Services,
EndpointSlices, ServiceImports and Namespaces) and runs a pass whenever any of them changes
(coalesced: changes arriving while a pass runs make one more pass) and every ``resync_s``:

1. each member's ServiceExports are read with the Service of their name and its EndpointSlices
   into :class:`~mcs.derive.Export` values (:func:`mcs.kube.export_from`). Objects this
   controller made are never read as an export's: a ServiceExport next to one of our derived
   Services is a ServiceExport of no Service;
2. :func:`mcs.derive.derive` makes the clusterset's imports and the exports' conditions;
3. per member: :func:`mcs.derive.view` (the families it reaches, the clusters the fabric reports
   it cannot reach now: ``unreachable``), rendered (:mod:`mcs.kube`: the derived Service
   :func:`mcs.kube.derived_name`; the ServiceImport carries its cluster IPs),
   planned against what the member has of ours (:func:`mcs.plan.plan`) and written
   (:class:`mcs.apply.Applier`). A namespace the member does not have gets no import there
   (namespace sameness: the service is for that namespace's workloads), and when the namespace
   goes, its imports go with it;
4. each ServiceExport's ``Valid`` and ``Conflict`` conditions are written to its status when
   they changed (transition times kept, :func:`mcs.kube.conditions`).

A failed write never stops a pass (the applier counts it); the next pass, at the latest the
resync, plans from what the member has then. State lives in the members' API objects only: a
restarted controller computes the same desired state and writes nothing that is already right.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcs import kube as mk
from mcs.apply import Applier, Result
from mcs.derive import CONFLICT, Derived, Export, Import, derive, view
from mcs.plan import key, plan
from scheduler.kube import Api, ApiError, Informer, resource_path

_log = logging.getLogger(__name__)

Obj = dict[str, Any]


@dataclass
class Member:
    """A member cluster: its name (the clusterset's id for it), API, the fabric's global CIDR
    mapping of its pods and the address families its pods reach across the fabric."""

    name: str
    api: Api
    global_cidrs: tuple[tuple[str, str], ...] = ()
    families: frozenset[str] = frozenset({"IPv4"})
    informers: dict[str, Informer] = field(default_factory=dict)

    def watch(self) -> None:
        self.informers = {
            "ServiceExport": Informer(self.api, mk.GROUP_VERSION, "serviceexports", copy_on_write=True),
            "ServiceImport": Informer(self.api, mk.GROUP_VERSION, "serviceimports", copy_on_write=True),
            "Service": Informer(self.api, "v1", "services", copy_on_write=True),
            "EndpointSlice": Informer(self.api, "discovery.k8s.io/v1", "endpointslices", copy_on_write=True),
            "Namespace": Informer(self.api, "v1", "namespaces", copy_on_write=True),
        }

    def objects(self, kind: str) -> list[Obj]:
        """The informer's objects of ``kind``, each with its kind (a list's items carry none)."""
        return [{**o, "kind": kind} for o in self.informers[kind].store.values()]


def _rfc3339(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Controller:
    def __init__(self, members: Sequence[Member], *, unreachable: Callable[[str], Iterable[str]] | None = None,
                 resync_s: float = 30.0, clock: Callable[[], datetime.datetime] | None = None) -> None:
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"member clusters named twice: {sorted(n for n in names if names.count(n) > 1)}")
        self.members = list(members)
        self.unreachable = unreachable or (lambda _cluster: ())
        self.resync_s = resync_s
        self.clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self.passes = 0
        self.last: dict[str, Result] = {}
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- running ------------------------------------------------------------------------------

    def start(self) -> None:
        for m in self.members:
            m.watch()
            for inf in m.informers.values():
                inf.add_handler(lambda *_: self._kick.set())
                inf.start()
        self._thread = threading.Thread(target=self._run, name="mcs-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        for m in self.members:
            for inf in m.informers.values():
                inf.stop()
        if self._thread is not None:
            self._thread.join(10)

    def kick(self) -> None:
        """Run a pass soon (the fabric's reachability changed)."""
        self._kick.set()

    def synced(self) -> bool:
        return all(inf.synced.is_set() for m in self.members for inf in m.informers.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.resync_s)
            self._kick.clear()
            if self._stop.is_set():
                return
            if not self.synced():
                continue  # a pass over a partial view would delete what it has not seen yet
            self.reconcile()

    # -- one pass -----------------------------------------------------------------------------

    def exports(self) -> list[Export]:
        """Every member's exports (step 1); an unreadable one is logged and left out."""
        out = []
        for m in self.members:
            services = {ns_name(o): o for o in m.objects("Service") if not mk.owned(o)}
            slices = [o for o in m.objects("EndpointSlice") if not mk.owned(o)]
            for ex in m.objects("ServiceExport"):
                k = ns_name(ex)
                try:
                    out.append(mk.export_from(m.name, ex, services.get(k), [s for s in slices if ns_name(s)[0] == k[0]],
                                              m.global_cidrs))
                except ValueError as e:
                    _log.warning("%s", e)
        return out

    def reconcile(self) -> Derived:
        derived = derive(self.exports())
        now = _rfc3339(self.clock())
        for m in self.members:
            self.last[m.name] = self._import_into(m, derived, now)
            self._export_status(m, derived, now)
        self.passes += 1
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

    def _export_status(self, m: Member, derived: Derived, now: str) -> None:
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
                _log.warning("cluster %s: could not write the conditions of ServiceExport %s/%s: %s (retried at "
                             "the next pass)", m.name, k[0], k[1], e)
            else:
                if conds[1].type == CONFLICT and conds[1].status == "True":
                    _log.warning("cluster %s: ServiceExport %s/%s conflicts: %s", m.name, k[0], k[1], conds[1].message)


def ns_name(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def _same_conditions(want: list[Obj], had: list[Any]) -> bool:
    strip = [{k: c.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime")}
             for c in had if isinstance(c, dict)]
    return strip == want
