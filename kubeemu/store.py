"""The in-memory object store of one emulated cluster: the part of kube-apiserver + etcd
semantics that clients observe.

Values. Every stored object is a JSON dict treated as immutable: a write builds a new dict and
swaps it in, so the same dict can sit in the watch log and be serialized for many watchers
without copies.

resourceVersion. One integer counter per server (etcd's revision). Every committed change
(create, update, delete, the deletionTimestamp of a graceful delete) takes the next value; a
write whose result equals the stored object is a no-op and takes none. List responses carry the
counter as it is when listed.

Watch log. Every committed change is appended to one bounded log (ADDED/MODIFIED/DELETED with
the object before and after). A watch from resourceVersion N replays the log after N; when
entries after N have already been dropped the watch gets 410 Expired, as with a compacted etcd.
The same log reconstructs the state as of an older revision, which is how ``continue`` pages
stay consistent with the first page (upstream reads etcd at the first page's revision).

Writes of built-in kinds go as in kube-apiserver: the body's defaulting (:mod:`kubeemu.defaults`,
on create and update), on a create the namespace check and the mutating admission plugins
(:func:`kubeemu.admission.admit_create`), then the uid, then validation
(:mod:`kubeemu.validation` through :mod:`kubeemu.admission`; on an update also the immutability
rules), then allocation (ClusterIPs, nodePorts) and the commit. ``/scale``, ``pods/eviction`` and
``serviceaccounts/token`` are in :mod:`kubeemu.subresources`; ``pods/binding`` is :meth:`Store.bind`.

Controllers. Work that kube-controller-manager or the apiserver's own finalizers do
asynchronously (namespace deletion cascade, ownerReference garbage collection, foreground
deletion, the "default" ServiceAccount) runs in :mod:`kubeemu.controllers` as a background task,
woken by commits; this keeps the delays observable (a DELETE returns before dependents go).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubeemu import admission, defaults, errors, validation
from kubeemu.client import APPLY_PATCH
from kubeemu.ipalloc import ServiceIPs
from kubeemu.objects import (
    CRDS,
    DEFAULT_NAMESPACES,
    FOREGROUND,
    JOBS,
    NAMESPACES,
    PODS,
    SERVICEACCOUNTS,
    SERVICES,
    DeleteOptions,
    Event,
    Key,
    ListResult,
    Obj,
    ObjKey,
    Watcher,
    metadata_of,
    now_rfc3339,
)
from kubeemu.patch import patch_type, patched
from kubeemu.resources import Registry, ResourceType
from kubeemu.schema import FIELD_VALIDATION, PRUNED, StructuralSchema

_log = logging.getLogger(__name__)

_GENERATE_CHARS = "bcdfghjklmnpqrstvwxz2456789"


def _strip_rv(obj: Obj) -> Obj:
    meta = dict(metadata_of(obj))
    meta.pop("resourceVersion", None)
    out = dict(obj)
    out["metadata"] = meta
    return out


def _spec_part(obj: Obj, status_split: bool) -> Obj:
    """What a generation bump compares: everything but metadata (and status when split)."""
    drop = {"metadata", "status", "kind", "apiVersion"} if status_split else {"metadata", "kind", "apiVersion"}
    return {k: v for k, v in obj.items() if k not in drop}


class Store:
    """Objects, the revision counter, the watch log and watchers of one emulated cluster."""

    def __init__(
        self,
        registry: Registry,
        service_cidrs: Iterable[str] = ("10.96.0.0/12",),
        log_size: int = 10000,
        graceful_pods: bool = False,
    ) -> None:
        self.registry = registry
        #: Checks a built-in kind's object against its schema's types (set by the server, which
        #: holds the OpenAPI schemas): raises ApiError 400.
        self.type_check: Callable[[ResourceType, str, Obj], None] | None = None
        self.rv = 0
        self.objects: dict[Key, dict[ObjKey, Obj]] = {}
        self.uids: dict[str, tuple[Key, ObjKey]] = {}
        self.dependents: dict[str, set[tuple[Key, ObjKey]]] = {}
        self.log: deque[Event] = deque()
        self.log_size = log_size
        self.compacted_rv = 0
        self.watchers: dict[Key, set[Watcher]] = {}
        self.service_ips = ServiceIPs(service_cidrs)
        self.node_ports: set[int] = set()
        self.graceful_pods = graceful_pods
        self.wake = asyncio.Event()
        self.gc_uids: set[str] = set()  # owners gone (or objects to check for dangling owners)
        #: (kind, object key) of the objects being deleted in the foreground (deletionTimestamp and
        #: the foregroundDeletion finalizer), kept by every commit: the controllers' foreground pass
        #: looks at these instead of every object of every kind at each wake (each delete wakes it).
        self.foreground: dict[tuple[Key, ObjKey], None] = {}  # a set in commit order
        self.on_registry_change: list[Callable[[], None]] = []
        #: The service-account token signer (:class:`kubeemu.subresources.TokenIssuer`), made on first use.
        self.token_issuer: Any = None
        #: Custom resources' structural schemas: (group, plural) -> version -> schema.
        self.cr_schemas: dict[Key, dict[str, StructuralSchema]] = {}
        for ns in DEFAULT_NAMESPACES:
            self.create(self.registry.get(NAMESPACES), "", {"metadata": {"name": ns}})  # type: ignore[arg-type]
        if self.service_ips.networks:
            svc = {
                "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
                "spec": {"ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
            }
            self.create(self.registry.get(SERVICES), "default", svc)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- basics

    def bucket(self, key: Key) -> dict[ObjKey, Obj]:
        return self.objects.setdefault(key, {})

    def _okey(self, rt: ResourceType, ns: str, name: str) -> ObjKey:
        return (ns if rt.namespaced else "", name)

    def get(self, rt: ResourceType, ns: str, name: str) -> Obj:
        obj = self.bucket(rt.key).get(self._okey(rt, ns, name))
        if obj is None:
            raise errors.not_found(rt.plural, rt.group, name)
        return obj

    def lookup_uid(self, uid: str) -> Obj | None:
        loc = self.uids.get(uid)
        if loc is None:
            return None
        return self.objects.get(loc[0], {}).get(loc[1])

    def _commit(self, etype: str, rt: ResourceType, okey: ObjKey, obj: Obj, old: Obj | None) -> Event:
        ev = Event(int(obj["metadata"]["resourceVersion"]), etype, rt.key, obj, old)
        bucket = self.bucket(rt.key)
        uid = obj["metadata"].get("uid", "")
        meta = obj["metadata"]
        if etype != "DELETED" and meta.get("deletionTimestamp") and FOREGROUND in (meta.get("finalizers") or ()):
            self.foreground[(rt.key, okey)] = None
        else:
            self.foreground.pop((rt.key, okey), None)
        if etype == "DELETED":
            bucket.pop(okey, None)
            self.uids.pop(uid, None)
            self._index_owners(rt.key, okey, old, None)
            self.gc_uids.add(uid)
            self.wake.set()
        else:
            bucket[okey] = obj
            self.uids[uid] = (rt.key, okey)
            self._index_owners(rt.key, okey, old, obj)
            if etype == "ADDED" and metadata_of(obj).get("ownerReferences"):
                self.gc_uids.add(uid)
                self.wake.set()
            if metadata_of(obj).get("deletionTimestamp"):
                self.wake.set()
        if len(self.log) >= self.log_size:
            self.compacted_rv = self.log.popleft().rv
        self.log.append(ev)
        for w in self.watchers.get(rt.key, ()):
            w.queue.put_nowait(ev)
        return ev

    def _index_owners(self, key: Key, okey: ObjKey, old: Obj | None, new: Obj | None) -> None:
        def owners(o: Obj | None) -> set[str]:
            return {r.get("uid", "") for r in (metadata_of(o).get("ownerReferences") or [])} if o else set()

        before, after = owners(old), owners(new)
        for u in before - after:
            deps = self.dependents.get(u)
            if deps is not None:
                deps.discard((key, okey))
                if not deps:
                    del self.dependents[u]
        for u in after - before:
            self.dependents.setdefault(u, set()).add((key, okey))

    def compact(self) -> None:
        """Drop the whole watch log: every watch or continue from an older revision gets 410."""
        self.log.clear()
        self.compacted_rv = self.rv

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    # ---------------------------------------------------------------- validation

    def _check_custom(self, rt: ResourceType, version: str, obj: Obj, keep: Iterable[str] = ()) -> None:
        """A custom resource against its version's schema, as kube-apiserver does on every write:
        unknown fields are dropped in place (except under the top-level keys ``keep``: parts
        taken from the stored object, shared with it), then the object must match the schema,
        else 422 Invalid with a cause per field."""
        schema = self.cr_schemas.get(rt.key, {}).get(version)
        if schema is None:
            return
        dropped = schema.prune(obj, keep=keep)
        if dropped:
            mode = FIELD_VALIDATION.get()
            unknown = ", ".join(f'unknown field "{d}"' for d in dropped)
            if mode == "Strict":
                raise errors.bad_request(f'{rt.kind} in version "{version}" cannot be handled as a {rt.kind}: '
                                         f"strict decoding error: {unknown}")
            sink = PRUNED.get()
            if sink is not None and mode != "Ignore":
                sink.extend(dropped)
        causes = schema.causes(obj)
        if causes:
            raise errors.invalid(rt.kind, rt.group, metadata_of(obj).get("name", ""), causes)

    def _check_namespace(self, rt: ResourceType, ns: str, name: str) -> None:
        if not rt.namespaced:
            return
        nso = self.bucket(NAMESPACES).get(("", ns))
        if nso is None:
            raise errors.not_found("namespaces", "", ns)
        if metadata_of(nso).get("deletionTimestamp"):
            raise errors.forbidden_terminating(rt.plural, rt.group, name, ns)

    # ---------------------------------------------------------------- create

    def create(self, rt: ResourceType, ns: str, body: Obj, version: str | None = None, dry_run: bool = False,
               *, owned: bool = False) -> Obj:
        """POST: defaults, validation, uid/rv/generation/creationTimestamp, then ADDED.

        ``owned``: the caller hands ``body`` over (a request body it has just decoded and keeps
        no reference to), so it becomes the stored object instead of a deep copy of it (the copy
        was about 6% of a pod create's CPU here). Otherwise ``body`` is left as it was."""
        if not isinstance(body, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        version = version or rt.versions[0]
        admission.check_kind(rt, version, body)
        admission.check_metadata(rt, version, body)
        obj = body if owned else copy.deepcopy(body)
        obj["kind"] = rt.kind
        obj["apiVersion"] = rt.api_version(version)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        if rt.namespaced:
            body_ns = meta.get("namespace")
            if body_ns and body_ns != ns:
                raise errors.bad_request("the namespace of the provided object does not match the namespace sent "
                                         "on the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            gen = meta.get("generateName")
            if not gen:
                raise errors.invalid(rt.kind, rt.group, "", [("FieldValueRequired", "metadata.name",
                                                              "Required value: name or generateName is required")])
            for _ in range(16):
                cand = gen + "".join(secrets.choice(_GENERATE_CHARS) for _ in range(5))
                if self._okey(rt, ns, cand) not in self.bucket(rt.key):
                    break
            meta["name"] = cand
        name = meta["name"]
        if rt.builtin and self.type_check is not None:
            self.type_check(rt, version, obj)
        if rt.builtin:
            defaults.apply(rt.key, obj)
        self._check_namespace(rt, ns, name)
        if rt.builtin:
            admission.admit_create(self.objects, rt, obj)
        for k in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink", "managedFields"):
            meta.pop(k, None)
        meta["uid"] = str(uuid.uuid4())
        if rt.key == JOBS:
            admission.job_selector(obj)
        admission.validate(rt, obj)
        okey = self._okey(rt, ns, name)
        if okey in self.bucket(rt.key):
            raise errors.already_exists(rt.plural, rt.group, name)
        meta["creationTimestamp"] = now_rfc3339()
        if rt.generation or not rt.builtin:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        if rt.has_status(version) and rt.key != ("", "nodes"):
            obj.pop("status", None)
        self._check_custom(rt, version, obj)
        self._prepare_create(rt, obj, dry_run)
        if dry_run:
            return obj
        meta["resourceVersion"] = str(self.next_rv())
        self._commit("ADDED", rt, okey, obj, None)
        self._after_create(rt, obj)
        return obj

    def _prepare_create(self, rt: ResourceType, obj: Obj, dry_run: bool) -> None:
        key = rt.key
        meta = obj["metadata"]
        if key == NAMESPACES:
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        elif key == PODS:
            spec = obj.setdefault("spec", {})
            obj["status"] = {"phase": "Pending", "qosClass": defaults.qos_class(spec)}
            if spec.get("nodeName"):
                obj["status"]["conditions"] = [{"type": "PodScheduled", "status": "True",
                                                "lastTransitionTime": now_rfc3339()}]
        elif key == SERVICES:
            obj["status"] = {"loadBalancer": {}}
            self._allocate_service(rt, obj, None, dry_run)
        elif key == ("", "secrets"):
            obj.setdefault("type", "Opaque")
            self._fold_string_data(obj)
        elif key in (("", "persistentvolumeclaims"), ("", "persistentvolumes")):
            obj["status"] = {"phase": "Pending"}
        elif key == CRDS:
            self._crd_defaults(obj)

    def _after_create(self, rt: ResourceType, obj: Obj) -> None:
        if rt.key == NAMESPACES:
            sa = self.registry.get(SERVICEACCOUNTS)
            if sa is not None:
                self.create(sa, obj["metadata"]["name"], {"metadata": {"name": "default"}})
        elif rt.key == CRDS:
            self._register_crd(obj)

    @staticmethod
    def _fold_string_data(obj: Obj) -> None:
        sd = obj.pop("stringData", None)
        if sd:
            data = dict(obj.get("data") or {})
            for k, v in sd.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj["data"] = data

    def _allocate_service(self, rt: ResourceType, obj: Obj, old: Obj | None, dry_run: bool) -> None:
        spec = obj.setdefault("spec", {})
        name = obj["metadata"]["name"]
        stype = spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for p in spec.get("ports") or []:
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
        if stype == "ExternalName":
            self._allocate_node_ports(obj, old, dry_run)
            return
        if old is not None:
            ospec = old.get("spec") or {}
            if not spec.get("clusterIP"):
                for k in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy"):
                    if k in ospec:
                        spec[k] = ospec[k]
            elif spec.get("clusterIP") != ospec.get("clusterIP"):
                raise errors.invalid("Service", "", name, [(
                    "FieldValueInvalid", "spec.clusterIPs[0]",
                    f'Invalid value: []string{{"{spec.get("clusterIP")}"}}: may not change once set')])
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
        else:
            requested = spec.get("clusterIP") or None
            if requested == "None":
                spec["clusterIPs"] = ["None"]
                first = self.service_ips.networks[0] if self.service_ips.networks else None
                primary = "IPv6" if first is not None and first.version == 6 else "IPv4"
                spec.setdefault("ipFamilies", [primary])
                spec.setdefault("ipFamilyPolicy", "SingleStack")
            else:
                policy = spec.get("ipFamilyPolicy") or "SingleStack"
                families = list(spec.get("ipFamilies") or [])
                # upstream's initIPFamilyFields: refuse what the cluster cannot give, then fill
                configured = [f for f in ("IPv4", "IPv6") if self.service_ips.family_nets(f)]
                fam_causes: list[tuple[str, str, str]] = []
                if policy == "RequireDualStack" and len(configured) < 2:
                    fam_causes.append(("FieldValueInvalid", "spec.ipFamilyPolicy", 'Invalid value: "RequireDualStack": '
                                       "this cluster is not configured for dual-stack services"))
                for i, fam in enumerate(families):
                    if fam not in configured:
                        fam_causes.append(("FieldValueInvalid", f"spec.ipFamilies[{i}]",
                                           f'Invalid value: "{fam}": not configured on this cluster'))
                if fam_causes:
                    raise errors.invalid("Service", "", name, fam_causes)
                if not families:
                    first = self.service_ips.networks[0] if self.service_ips.networks else None
                    families = ["IPv6" if first is not None and first.version == 6 else "IPv4"]
                if policy in ("PreferDualStack", "RequireDualStack") and len(families) == 1:
                    other = "IPv6" if families[0] == "IPv4" else "IPv4"
                    if self.service_ips.family_nets(other):
                        families.append(other)
                ips: list[str] = []
                try:
                    for i, fam in enumerate(families):
                        want = (spec.get("clusterIPs") or [None] * (i + 1))[i] if i else requested
                        ips.append(self.service_ips.allocate(fam, want, peek=dry_run))
                except ValueError as e:
                    self.service_ips.release([] if dry_run else ips)
                    raise errors.invalid("Service", "", name, [
                        ("FieldValueInvalid", "spec.clusterIPs", f"Invalid value: []string{{{requested or ''!r}}}: {e}")
                    ]) from None
                spec["clusterIP"], spec["clusterIPs"] = ips[0], ips
                spec["ipFamilies"], spec["ipFamilyPolicy"] = families, policy
            spec.setdefault("internalTrafficPolicy", "Cluster")
        self._allocate_node_ports(obj, old, dry_run)

    def _allocate_node_ports(self, obj: Obj, old: Obj | None, dry_run: bool) -> None:
        """nodePorts of a NodePort/LoadBalancer Service from 30000-32767 (the default
        --service-node-port-range), as upstream's initNodePorts/updateNodePorts: a requested port
        must be in range and free (the Service's own old ports excepted); an unset one keeps the
        old port of the same port/protocol, else shares the nodePort of the same port number
        (TCP and UDP 53 get one nodePort), else gets the lowest free. Ports an update no longer
        uses are released."""
        spec = obj["spec"]
        name = obj["metadata"]["name"]
        ospec = (old or {}).get("spec") or {}
        old_ports = {(p.get("port"), p.get("protocol", "TCP")): int(p["nodePort"])
                     for p in ospec.get("ports") or [] if p.get("nodePort")}
        mine = set(old_ports.values())
        want: set[int] = set()
        by_number: dict[Any, int] = {}
        used: set[tuple[str, int]] = set()
        causes: list[tuple[str, str, str]] = []
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            for i, p in enumerate(spec.get("ports") or []):
                proto = p.get("protocol", "TCP")
                np = p.get("nodePort")
                if not np:
                    np = old_ports.get((p.get("port"), proto)) or by_number.get(p.get("port"))
                    if np is None:
                        np = next((n for n in range(30000, 32768) if n not in self.node_ports and n not in want),
                                  None)
                        if np is None:
                            raise errors.internal("failed to allocate a nodePort: range is full")
                    p["nodePort"] = np
                else:
                    np = int(np)
                    if not 30000 <= np <= 32767:
                        causes.append(("FieldValueInvalid", f"spec.ports[{i}].nodePort",
                                       f"Invalid value: {np}: provided port is not in the valid range. The range of "
                                       "valid ports is 30000-32767"))
                        continue
                    shared = by_number.get(p.get("port")) == np
                    if (np in self.node_ports and np not in mine) or (np in want and not shared):
                        causes.append(("FieldValueInvalid", f"spec.ports[{i}].nodePort",
                                       f"Invalid value: {np}: provided port is already allocated"))
                        continue
                if (proto, np) in used:
                    causes.append(("FieldValueDuplicate", f"spec.ports[{i}].nodePort", f"Duplicate value: {np}"))
                used.add((proto, np))
                by_number.setdefault(p.get("port"), np)
                want.add(np)
        if causes:
            raise errors.invalid("Service", "", name, causes)
        if not dry_run:
            self.node_ports -= mine - want
            self.node_ports |= want

    @staticmethod
    def _drop_type_dependent(new: Obj, old: Obj) -> None:
        """The Service strategy's dropTypeDependentFields: leaving NodePort/LoadBalancer clears
        the nodePorts the update left as they were (so ``kubectl apply`` of ``type: ClusterIP``
        works); leaving ExternalName for an IP type drops nothing."""
        nspec, ospec = new.get("spec") or {}, old.get("spec") or {}
        if ospec.get("type") in ("NodePort", "LoadBalancer") and nspec.get("type") in ("ClusterIP", "ExternalName"):
            olds = {int(p["nodePort"]) for p in ospec.get("ports") or [] if p.get("nodePort")}
            for p in nspec.get("ports") or []:
                if isinstance(p, dict) and p.get("nodePort") and int(p["nodePort"]) in olds:
                    p.pop("nodePort")
        if nspec.get("type") == "ExternalName" and ospec.get("type") != "ExternalName":
            for k in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy"):
                if nspec.get(k) == ospec.get(k):
                    nspec.pop(k, None)

    def _release_service(self, obj: Obj) -> None:
        spec = obj.get("spec") or {}
        self.service_ips.release(ip for ip in spec.get("clusterIPs") or [] if ip != "None")
        for p in spec.get("ports") or []:
            self.node_ports.discard(p.get("nodePort") or 0)

    # ---------------------------------------------------------------- CRDs

    @staticmethod
    def _crd_defaults(obj: Obj) -> None:
        spec = obj["spec"]
        names = dict(spec["names"])
        names.setdefault("singular", names["kind"].lower())
        names.setdefault("listKind", names["kind"] + "List")
        spec["names"] = names
        for v in spec["versions"]:
            v.setdefault("served", True)
        storage = next(v["name"] for v in spec["versions"] if v.get("storage"))
        t = now_rfc3339()
        obj["status"] = {
            "acceptedNames": names,
            "storedVersions": [storage],
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": t},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": t},
            ],
        }

    def _register_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        names = spec["names"]
        versions = tuple(v["name"] for v in spec["versions"] if v.get("served", True))
        vstatus = {v["name"]: "status" in (v.get("subresources") or {}) for v in spec["versions"]}
        scale = {v["name"]: (str(sc.get("specReplicasPath", "")), str(sc.get("statusReplicasPath", "")),
                             str(sc.get("labelSelectorPath") or ""))
                 for v in spec["versions"] if isinstance(sc := (v.get("subresources") or {}).get("scale"), dict)}
        rt = ResourceType(
            spec["group"], versions, names["plural"], names["kind"], spec["scope"] == "Namespaced",
            singular=names.get("singular", ""), short_names=tuple(names.get("shortNames") or ()),
            categories=tuple(names.get("categories") or ()), builtin=False, generation=True,
            version_status=vstatus, scale_paths=scale, extra_subresources=("scale",) if scale else (),
        )
        self.registry.add(rt)
        self.cr_schemas[rt.key] = {
            v["name"]: StructuralSchema(v["schema"]["openAPIV3Schema"])
            for v in spec["versions"]
            if isinstance((v.get("schema") or {}).get("openAPIV3Schema"), dict)
        }
        _log.info("registered custom resource %s.%s versions %s", rt.plural, rt.group, ",".join(versions))
        for cb in self.on_registry_change:
            cb()

    def _unregister_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        key = (spec["group"], spec["names"]["plural"])
        rt = self.registry.get(key)
        if rt is not None:
            for okey, obj in list(self.bucket(key).items()):
                self._finish_delete(rt, okey, obj)
        self.registry.remove(key)
        self.cr_schemas.pop(key, None)
        self.objects.pop(key, None)
        for cb in self.on_registry_change:
            cb()

    # ---------------------------------------------------------------- update / patch

    def update(
        self, rt: ResourceType, ns: str, name: str, body: Obj, version: str | None = None,
        subresource: str | None = None, dry_run: bool = False, *, patch: bool = False,
    ) -> Obj:
        """PUT (main resource or status): the uid precondition, optimistic concurrency, the status
        split, no-op detection. ``patch``: ``body`` is a patched object (PATCH), which carries no
        precondition (upstream's patch handler builds its UpdatedObjectInfo from no object), so
        a uid the patch changed is refused by the update validation instead: 422, as upstream's
        ``rest.BeforeUpdate`` (ValidateObjectMetaAccessorUpdate: ``metadata.uid`` is immutable).

        The uid precondition (``rest.DefaultUpdatedObjectInfo.Preconditions``: a non-empty
        ``metadata.uid`` in a PUT body, main resource or subresource): checked against the stored
        object before anything else, as etcd3's ``GuaranteedUpdate`` checks
        ``storage.Preconditions`` before it calls the update function (so a missing object fails
        it too, with an empty uid, not with 404); 409 Conflict, "Precondition failed: UID in
        precondition: X, UID in object meta: Y"."""
        if not isinstance(body, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        version = version or rt.versions[0]
        # Decoding comes first upstream (a body that does not decode never reaches a precondition).
        admission.check_kind(rt, version, body)
        admission.check_metadata(rt, version, body)
        bmeta = metadata_of(body)
        want_uid = bmeta.get("uid")
        if want_uid and not patch:
            stored = self.bucket(rt.key).get(self._okey(rt, ns, name))
            have_uid = metadata_of(stored).get("uid", "") if stored is not None else ""
            if want_uid != have_uid:
                raise errors.conflict(rt.plural, rt.group, name, errors.uid_precondition_failed(want_uid, have_uid))
        old = self.get(rt, ns, name)
        if want_uid and want_uid != old["metadata"].get("uid"):
            raise errors.invalid(rt.kind, rt.group, name, [validation.invalid(
                "metadata.uid", want_uid, validation.IMMUTABLE_MSG)])
        if bmeta.get("name") and bmeta["name"] != name:
            raise errors.bad_request(f"the name of the object ({bmeta['name']}) does not match the name on the "
                                     f"URL ({name})")
        if rt.namespaced and bmeta.get("namespace") and bmeta["namespace"] != ns:
            raise errors.bad_request("the namespace of the provided object does not match the namespace sent on "
                                     "the request")
        want_rv = bmeta.get("resourceVersion")
        if want_rv not in (None, "") and str(want_rv) != old["metadata"]["resourceVersion"]:
            raise errors.conflict(rt.plural, rt.group, name)
        split = rt.has_status(version)
        if subresource == "status":
            new = dict(old)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
            new["metadata"] = dict(old["metadata"])
            # Only the new status is pruned: the rest is the stored object, shared with old.
            self._check_custom(rt, version, new, keep=[k for k in new if k != "status"])
        else:
            new = copy.deepcopy(body)
            new["kind"], new["apiVersion"] = rt.kind, rt.api_version(version)
            meta = new["metadata"] = new.get("metadata") or {}  # null is the zero value (was a 500)
            for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation",
                      "namespace", "name"):
                if k in old["metadata"]:
                    meta[k] = old["metadata"][k]
                else:
                    meta.pop(k, None)
            if split:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
            if rt.builtin and self.type_check is not None:
                self.type_check(rt, version, new)
            if rt.builtin:
                defaults.apply(rt.key, new)
                if rt.key == SERVICES:
                    self._drop_type_dependent(new, old)
            admission.validate_update(rt, new, old)
            admission.validate_pvc_update(rt, new, old, self.objects)
            self._check_custom(rt, version, new, keep=["status"] if split else [])
            self._prepare_update(rt, new, old, dry_run)
        return self._write(rt, old, new, split, dry_run)

    def _prepare_update(self, rt: ResourceType, new: Obj, old: Obj, dry_run: bool) -> None:
        if rt.key == SERVICES:
            self._allocate_service(rt, new, old, dry_run)
        elif rt.key == ("", "secrets"):
            new.setdefault("type", old.get("type", "Opaque"))
            self._fold_string_data(new)
        elif rt.key == NAMESPACES:
            new["spec"] = old.get("spec", {})
        elif rt.key == CRDS:
            self._crd_defaults(new)
            new["status"]["conditions"] = (old.get("status") or {}).get("conditions", new["status"]["conditions"])

    def _write(self, rt: ResourceType, old: Obj, new: Obj, split: bool, dry_run: bool) -> Obj:
        name = old["metadata"]["name"]
        meta = new["metadata"]
        if old["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added:
                raise errors.invalid(rt.kind, rt.group, name, [(
                    "FieldValueForbidden", "metadata.finalizers",
                    f"Forbidden: no new finalizers can be added if the object is being deleted, found new "
                    f"finalizers []string{{{', '.join(repr(f) for f in sorted(added))}}}")])
        if "generation" in old["metadata"] and _spec_part(new, split) != _spec_part(old, split):
            meta["generation"] = old["metadata"]["generation"] + 1
        if not meta.get("finalizers"):
            meta.pop("finalizers", None)
        if _strip_rv(new) == _strip_rv(old):
            return old
        if dry_run:
            return new
        okey = self._okey(rt, meta.get("namespace", ""), name)
        meta["resourceVersion"] = str(self.next_rv())
        self._commit("MODIFIED", rt, okey, new, old)
        if rt.key == CRDS:
            self._register_crd(new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not self._held(rt, new):
            self._finish_delete(rt, okey, new)
        return new

    def patch(
        self, rt: ResourceType, ns: str, name: str, ctype: str, body: Any, version: str | None = None,
        subresource: str | None = None, dry_run: bool = False,
    ) -> Obj:
        """PATCH: build the patched object from the stored one, then write it like an update."""
        version = version or rt.versions[0]
        if patch_type(ctype) == APPLY_PATCH:
            return self.apply(rt, ns, name, body, version, subresource, dry_run)
        new = patched(ctype, self.get(rt, ns, name), body, strategic=rt.builtin)
        return self.update(rt, ns, name, new, version, subresource, dry_run, patch=True)

    def apply(self, rt: ResourceType, ns: str, name: str, body: Any, version: str, subresource: str | None,
              dry_run: bool) -> Obj:
        """Server-side apply, approximated: create when absent, else a merge of the applied fields.

        Field ownership (managedFields) is not tracked, so fields dropped from a later apply are
        not removed as upstream would.
        """
        if not isinstance(body, dict):
            raise errors.bad_request("apply patch must be an object")
        okey = self._okey(rt, ns, name)
        if okey not in self.bucket(rt.key):
            if subresource:
                raise errors.not_found(rt.plural, rt.group, name)
            body = dict(body)
            body["metadata"] = dict(metadata_of(body), name=name)
            return self.create(rt, ns, body, version, dry_run)
        new = patched(APPLY_PATCH, self.bucket(rt.key)[okey], body, strategic=rt.builtin)
        new["metadata"] = {k: v for k, v in metadata_of(new).items() if k != "resourceVersion"}
        return self.update(rt, ns, name, new, version, subresource, dry_run, patch=True)

    def bind(self, ns: str, name: str, body: Obj) -> None:
        """pods/binding: set spec.nodeName once (409 if already bound), mark PodScheduled."""
        rt = self.registry.get(PODS)
        assert rt is not None
        old = self.get(rt, ns, name)
        target = (body.get("target") or {}).get("name")
        if not target:
            raise errors.invalid("Binding", "", name, [("FieldValueRequired", "target.name", "Required value")])
        cur = (old.get("spec") or {}).get("nodeName")
        if cur:
            raise errors.conflict("pods/binding", "", name, f"pod {name} is already assigned to node \"{cur}\"")
        if old["metadata"].get("deletionTimestamp"):
            raise errors.conflict("pods/binding", "", name, f"pod {name} is being deleted, cannot be assigned to a "
                                                            "host")
        want_uid = metadata_of(body).get("uid")
        if want_uid and want_uid != old["metadata"].get("uid"):
            raise errors.conflict("pods/binding", "", name,
                                  errors.uid_precondition_failed(want_uid, old["metadata"].get("uid", "")))
        new = copy.deepcopy(old)
        new["spec"]["nodeName"] = target
        conds = [c for c in new.setdefault("status", {}).get("conditions", []) if c.get("type") != "PodScheduled"]
        conds.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()})
        new["status"]["conditions"] = conds
        self._write(rt, old, new, True, False)

    # ---------------------------------------------------------------- delete

    def _held(self, rt: ResourceType, obj: Obj) -> bool:
        """Deleting, no finalizers, yet not gone: a pod in its grace period, or a namespace
        (its content goes first; the namespace controller finishes it)."""
        return rt.key == NAMESPACES or (rt.key == PODS and bool(metadata_of(obj).get("deletionGracePeriodSeconds")))

    def delete(self, rt: ResourceType, ns: str, name: str, opts: DeleteOptions) -> tuple[Obj, bool]:
        """DELETE one object. Returns (object, gone): gone is False while finalizers hold it."""
        old = self.get(rt, ns, name)
        meta = old["metadata"]
        if opts.precondition_uid and opts.precondition_uid != meta.get("uid"):
            raise errors.conflict(rt.plural, rt.group, name,
                                  errors.uid_precondition_failed(opts.precondition_uid, meta.get("uid", "")))
        if opts.precondition_rv and opts.precondition_rv != meta.get("resourceVersion"):
            raise errors.conflict(rt.plural, rt.group, name,
                                  f"Precondition failed: ResourceVersion in precondition: {opts.precondition_rv}, "
                                  f"ResourceVersion in object meta: {meta.get('resourceVersion')}")
        if opts.dry_run:
            return old, False
        okey = self._okey(rt, ns, name)
        finalizers = list(meta.get("finalizers") or [])
        policy = opts.propagation
        if policy == "Orphan":
            self._orphan(meta.get("uid", ""))
        elif policy == "Foreground" and self.dependents.get(meta.get("uid", "")) and FOREGROUND not in finalizers:
            finalizers.append(FOREGROUND)
        grace = 0
        if rt.key == PODS and self.graceful_pods and (old.get("spec") or {}).get("nodeName"):
            g = opts.grace_seconds
            grace = int(g if g is not None else (old.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
        if rt.key == NAMESPACES or finalizers or grace > 0:
            if meta.get("deletionTimestamp"):
                shorten = rt.key == PODS and grace < int(meta.get("deletionGracePeriodSeconds") or 0)
                if not shorten and finalizers == list(meta.get("finalizers") or []):
                    return old, False
            new = dict(old)
            nmeta = dict(meta)
            if not nmeta.get("deletionTimestamp") or grace > 0:
                nmeta["deletionTimestamp"] = now_rfc3339(time.time() + grace)
            nmeta["deletionGracePeriodSeconds"] = grace
            if finalizers:
                nmeta["finalizers"] = finalizers
            new["metadata"] = nmeta
            if rt.key == NAMESPACES:
                new["status"] = dict(old.get("status") or {}, phase="Terminating")
            if _strip_rv(new) == _strip_rv(old):
                return old, False
            nmeta["resourceVersion"] = str(self.next_rv())
            self._commit("MODIFIED", rt, okey, new, old)
            return new, False
        return self._finish_delete(rt, okey, old), True

    def _finish_delete(self, rt: ResourceType, okey: ObjKey, obj: Obj) -> Obj:
        gone = dict(obj)
        gone["metadata"] = dict(obj["metadata"], resourceVersion=str(self.next_rv()))
        self._commit("DELETED", rt, okey, gone, obj)
        if rt.key == SERVICES:
            self._release_service(obj)
        elif rt.key == CRDS:
            self._unregister_crd(obj)
        return gone

    def _orphan(self, uid: str) -> None:
        for key, okey in list(self.dependents.get(uid, ())):
            rt = self.registry.get(key)
            dep = self.objects.get(key, {}).get(okey)
            if rt is None or dep is None:
                continue
            new = dict(dep)
            refs = [r for r in dep["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
            new["metadata"] = dict(dep["metadata"])
            if refs:
                new["metadata"]["ownerReferences"] = refs
            else:
                new["metadata"].pop("ownerReferences", None)
            new["metadata"]["resourceVersion"] = str(self.next_rv())
            self._commit("MODIFIED", rt, okey, new, dep)

    def force_finish_pod(self, ns: str, name: str) -> None:
        """Grace over (kubelet confirmed, or delete with gracePeriodSeconds=0): remove the pod."""
        rt = self.registry.get(PODS)
        assert rt is not None
        obj = self.get(rt, ns, name)
        if not obj["metadata"].get("finalizers"):
            self._finish_delete(rt, (ns, name), obj)

    # ---------------------------------------------------------------- list / watch

    def snapshot(self, key: Key, at_rv: int | None) -> dict[ObjKey, Obj]:
        """The bucket as it was at revision ``at_rv`` (None: now), rebuilt from the watch log."""
        state = self.bucket(key)
        if at_rv is None or at_rv >= self.rv:
            return state
        if at_rv < self.compacted_rv:
            raise errors.expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a "
                "new list without the continue parameter, or use the continue token in this response to retrieve "
                "the remainder of the results. Continuing with the provided token results in an inconsistent list "
                "- objects that were created, modified, or deleted between the time the first chunk was returned "
                "and now may show up in the list.")
        state = dict(state)
        for ev in reversed(self.log):
            if ev.rv <= at_rv:
                break
            if ev.key != key:
                continue
            m = ev.obj["metadata"]
            okey = (m.get("namespace", ""), m["name"])
            if ev.type == "ADDED":
                state.pop(okey, None)
            elif ev.old is not None:
                state[okey] = ev.old
        return state

    def list_objects(
        self, rt: ResourceType, match: Callable[[Mapping[str, Any]], bool], limit: int = 0, cont: str = "",
    ) -> ListResult:
        """Sorted by (namespace, name) like etcd keys; limit/continue pages one consistent snapshot."""
        at_rv: int | None = None
        start = ""
        if cont:
            try:
                tok = json.loads(base64.urlsafe_b64decode(cont + "=" * (-len(cont) % 4)))
                at_rv, start = int(tok["rv"]), str(tok["start"])
            except (ValueError, KeyError, TypeError):
                raise errors.bad_request(f"continue key is not valid: {cont!r}") from None
        state = self.snapshot(rt.key, at_rv)
        list_rv = at_rv if at_rv is not None else self.rv
        keys = sorted(state)
        items: list[Obj] = []
        next_cont = ""
        remaining: int | None = None
        for i, okey in enumerate(keys):
            skey = f"{okey[0]}/{okey[1]}"
            if start and skey < start:
                continue
            obj = state[okey]
            if not match(obj):
                continue
            if limit and len(items) >= limit:
                next_cont = base64.urlsafe_b64encode(json.dumps(
                    {"v": "meta.k8s.io/v1", "rv": list_rv, "start": skey}).encode()).decode().rstrip("=")
                remaining = sum(1 for k in keys[i:] if match(state[k]))
                break
            items.append(obj)
        return ListResult(items, list_rv, next_cont, remaining)

    def start_watch(self, rt: ResourceType, match: Callable[[Mapping[str, Any]], bool],
                    rv: str | None) -> tuple[list[Event], Watcher]:
        """Register a watcher; returns the events to send first (synthetic ADDED or replay)."""
        first: list[Event] = []
        if rv in (None, "", "0"):
            for okey in sorted(self.bucket(rt.key)):
                obj = self.bucket(rt.key)[okey]
                if match(obj):
                    first.append(Event(int(obj["metadata"]["resourceVersion"]), "ADDED", rt.key, obj, None))
        else:
            try:
                since = int(str(rv))
            except ValueError:
                raise errors.bad_request(f"invalid resource version: {rv!r}") from None
            if since < self.compacted_rv:
                raise errors.gone_rv(since, self.compacted_rv + 1)
            for ev in reversed(self.log):  # newest first, only as far back as asked (a resumed
                if ev.rv <= since:           # watch usually needs the last few of many events)
                    break
                if ev.key == rt.key:
                    first.append(ev)
            first.reverse()
        w = Watcher(rt.key)
        self.watchers.setdefault(rt.key, set()).add(w)
        return first, w

    def stop_watch(self, w: Watcher) -> None:
        self.watchers.get(w.key, set()).discard(w)

    def all_watchers(self) -> list[Watcher]:
        return [w for ws in self.watchers.values() for w in ws]


