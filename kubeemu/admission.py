"""Admission of built-in kinds, as kube-apiserver does it, in its order for a write:

1. :func:`check_kind`: the kind and apiVersion of a body against its URL (400);
2. :func:`admit_create`: the mutating admission plugins a default kube-apiserver runs on a
   create, after the body's defaulting (:mod:`kubeemu.defaults`): ServiceAccount (the pod's
   account must exist; its API token is mounted as the projected ``kube-api-access-xxxxx``
   volume), DefaultTolerationSeconds (not-ready/unreachable for 300s), DefaultStorageClass
   (a PVC without a class gets the one annotated default); then, once the uid is assigned, the
   Job strategy's generated selector (:func:`job_selector`, ``batch.kubernetes.io/controller-uid``);
3. :func:`validate`: names and labels of every kind, CRDs, then :mod:`kubeemu.validation` for
   the built-in kinds' specs; on an update also its immutability rules.

Each refusal is a 422 Invalid (or 400/403) Status with a cause per field. Custom resources are
checked against their CRD's schema by :mod:`kubeemu.schema`.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from kubeemu import errors, validation
from kubeemu.objects import CRDS, NAMESPACES, PODS, SERVICEACCOUNTS, SERVICES, Key, Obj, ObjKey, metadata_of
from kubeemu.resources import ResourceType

_log = logging.getLogger(__name__)

#: Where the ServiceAccount plugin mounts the API token (DefaultAPITokenMountPath).
TOKEN_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
#: The token the plugin's projected volume asks for: one hour plus 7s (upstream's "warn after" skew).
TOKEN_EXPIRATION = 3607
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
BETA_DEFAULT_CLASS_ANNOTATION = "storageclass.beta.kubernetes.io/is-default-class"
STORAGECLASSES: Key = ("storage.k8s.io", "storageclasses")
PVCS: Key = ("", "persistentvolumeclaims")
_RAND = "bcdfghjklmnpqrstvwxz2456789"

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")



def check_kind(rt: ResourceType, version: str, obj: Obj) -> None:
    kind = obj.get("kind")
    if kind and kind != rt.kind:
        raise errors.bad_request(f"the server could not find the requested resource: kind {kind!r} does not "
                                 f"match resource {rt.plural!r} (kind {rt.kind!r})")
    api = obj.get("apiVersion")
    if api and api != rt.api_version(version):
        raise errors.bad_request(f"the API version in the data ({api}) does not match the expected API version "
                                 f"({rt.api_version(version)})")


#: ObjectMeta's scalar fields and their Go types (null is the zero value: allowed).
_META_SCALARS: dict[str, tuple[type, str]] = {
    **{k: (str, "string") for k in ("name", "generateName", "namespace", "selfLink", "uid", "resourceVersion",
                                    "creationTimestamp", "deletionTimestamp")},
    **{k: (int, "int64") for k in ("generation", "deletionGracePeriodSeconds")},
}


def _json_type(value: Any) -> str:
    """The JSON type name Go's decoder reports (``cannot unmarshal number into ...``)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    names: dict[type, str] = {str: "string", list: "array", dict: "object"}
    return names.get(type(value), "value")


def check_metadata(rt: ResourceType, version: str, obj: Obj) -> None:
    """The types of ``metadata`` as decoding into the Go ObjectMeta checks them upstream: a wrong
    one is 400 naming the field, the type and the type given. Before this check a non-string
    name or label map made the store raise (a 500; found by tests/unit/test_fuzz_kubeemu.py)."""
    meta = obj.get("metadata")
    if meta is None:
        return

    def refuse(field: str, value: Any, want: str) -> errors.ApiError:
        where = f"ObjectMeta.metadata.{field}" if field else "ObjectMeta.metadata"
        return errors.bad_request(f'{rt.kind} in version "{version}" cannot be handled as a {rt.kind}: json: '
                                  f"cannot unmarshal {_json_type(value)} into Go struct field {where} of type {want}")

    if not isinstance(meta, dict):
        raise refuse("", meta, "v1.ObjectMeta")
    for key, (typ, want) in _META_SCALARS.items():
        v = meta.get(key)
        if v is not None and (not isinstance(v, typ) or isinstance(v, bool)):
            raise refuse(key, v, want)
    for key in ("labels", "annotations"):
        v = meta.get(key)
        if v is None:
            continue
        if not isinstance(v, dict):
            raise refuse(key, v, "map[string]string")
        bad = next((x for x in v.values() if not isinstance(x, str)), None)
        if bad is not None:
            raise refuse(key, bad, "string")
    for key, item_type, want in (("finalizers", str, "string"), ("ownerReferences", dict, "v1.OwnerReference"),
                                 ("managedFields", dict, "v1.ManagedFieldsEntry")):  # fmt: skip
        v = meta.get(key)
        if v is None:
            continue
        if not isinstance(v, list):
            raise refuse(key, v, f"[]{want}")
        bad = next((x for x in v if not isinstance(x, item_type)), None)
        if bad is not None:
            raise refuse(key, bad, want)


def validate(rt: ResourceType, obj: Obj) -> None:
    meta = metadata_of(obj)
    name = meta.get("name", "")
    causes: list[tuple[str, str, str]] = []
    if rt.key in (NAMESPACES,):
        rx, what = _DNS1123_LABEL, "a lowercase RFC 1123 label"
    elif rt.key == SERVICES:
        rx, what = _DNS1035_LABEL, "a DNS-1035 label"
    else:
        rx, what = _DNS1123_SUBDOMAIN, "a lowercase RFC 1123 subdomain"
    if not rx.match(name) or len(name) > (63 if rx is not _DNS1123_SUBDOMAIN else 253):
        causes.append(("FieldValueInvalid", "metadata.name",
                       f'Invalid value: "{name}": {what} must consist of lower case alphanumeric characters, '
                       f"'-' or '.', and must start and end with an alphanumeric character"))
    for k, v in (meta.get("labels") or {}).items():
        lname = k.rsplit("/", 1)[-1]
        if not _LABEL_NAME.match(lname) or len(lname) > 63:
            causes.append(("FieldValueInvalid", "metadata.labels", f'Invalid value: "{k}": name part must '
                           "consist of alphanumeric characters, '-', '_' or '.'"))
        if not isinstance(v, str) or not _LABEL_VALUE.match(v) or len(v) > 63:
            causes.append(("FieldValueInvalid", "metadata.labels", f'Invalid value: "{v}": a valid label '
                           "must be an empty string or consist of alphanumeric characters, '-', '_' or '.'"))
    if rt.key == CRDS:
        spec = obj.get("spec") or {}
        plural = (spec.get("names") or {}).get("plural", "")
        if name != f"{plural}.{spec.get('group', '')}":
            causes.append(("FieldValueInvalid", "metadata.name",
                           f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group'))
        if not (spec.get("names") or {}).get("kind"):
            causes.append(("FieldValueRequired", "spec.names.kind", "Required value"))
        vers = spec.get("versions") or []
        if not vers:
            causes.append(("FieldValueRequired", "spec.versions", "Required value"))
        elif sum(1 for v in vers if v.get("storage")) != 1:
            causes.append(("FieldValueInvalid", "spec.versions",
                           "Invalid value: must have exactly one version marked as storage version"))
        if spec.get("scope") not in ("Namespaced", "Cluster"):
            causes.append(("FieldValueNotSupported", "spec.scope",
                           f'Unsupported value: "{spec.get("scope")}": supported values: "Cluster", "Namespaced"'))
    if rt.builtin:
        bad = validation.quantity_problems(obj.get("spec"))
        if bad:
            raise errors.bad_request(f'{rt.kind} in version "{rt.versions[0]}" cannot be handled as a {rt.kind}: '
                                     f"{validation.QUANTITY_ERROR}")
        causes += validation.validate_create(rt.key, obj)
    if causes:
        raise errors.invalid(rt.kind, rt.group, name, causes)


def validate_update(rt: ResourceType, new: Obj, old: Obj) -> None:
    """An update of the main resource: what a create must satisfy, plus immutability."""
    validate(rt, new)
    if rt.builtin:
        causes = validation.validate_update(rt.key, new, old)
        if causes:
            raise errors.invalid(rt.kind, rt.group, metadata_of(new).get("name", ""), causes)



# ---------------------------------------------------------------------------- mutating admission

Objects = Mapping[Key, Mapping[ObjKey, Obj]]


def admit_create(objects: Objects, rt: ResourceType, obj: Obj) -> None:
    """The mutating admission a create goes through (``objects``: the store's buckets)."""
    if rt.key == PODS:
        _service_account(objects, obj)
        _default_tolerations(obj)
    elif rt.key == PVCS:
        _default_storage_class(objects, obj)


def _service_account(objects: Objects, pod: Obj) -> None:
    """plugin/pkg/admission/serviceaccount: the account must exist (403 otherwise), and unless
    automounting is off (pod first, then account) every container mounts its token."""
    meta = metadata_of(pod)
    spec = pod.setdefault("spec", {})
    if meta.get("annotations", {}).get("kubernetes.io/config.mirror"):
        return  # mirror pods are not given accounts
    ns = meta.get("namespace", "")
    name = spec.get("serviceAccountName") or "default"
    spec["serviceAccountName"] = name
    spec.setdefault("serviceAccount", name)  # the deprecated alias, still filled upstream
    sa = objects.get(SERVICEACCOUNTS, {}).get((ns, name))
    if sa is None:
        raise errors.ApiError(
            403, "Forbidden",
            f'pods "{meta.get("name", "")}" is forbidden: error looking up service account {ns}/{name}: '
            f'serviceaccount "{name}" not found',
            {"name": meta.get("name", ""), "kind": "pods"})
    automount = spec.get("automountServiceAccountToken")
    if automount is None:
        automount = sa.get("automountServiceAccountToken")
    if automount is False:
        return
    volumes = spec.setdefault("volumes", [])
    if not isinstance(volumes, list):
        return
    taken = {v.get("name") for v in volumes if isinstance(v, dict)}
    vol_name = ""
    for _ in range(32):
        vol_name = "kube-api-access-" + "".join(secrets.choice(_RAND) for _ in range(5))
        if vol_name not in taken:
            break
    mounted = False
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            if not isinstance(c, dict):
                continue
            mounts = c.setdefault("volumeMounts", [])
            if any(isinstance(m, dict) and m.get("mountPath") == TOKEN_MOUNT_PATH for m in mounts):
                continue
            mounts.append({"name": vol_name, "readOnly": True, "mountPath": TOKEN_MOUNT_PATH})
            mounted = True
    if mounted:
        volumes.append({"name": vol_name, "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": TOKEN_EXPIRATION, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1",
                                                                              "fieldPath": "metadata.namespace"}}]}},
            ],
        }})


_NOT_READY = "node.kubernetes.io/not-ready"
_UNREACHABLE = "node.kubernetes.io/unreachable"


def _tolerates(tols: list[Any], key: str) -> bool:
    for t in tols:
        if not isinstance(t, dict):
            continue
        if t.get("effect") not in (None, "", "NoExecute"):
            continue
        if t.get("operator") == "Exists" and not t.get("key"):
            return True
        if t.get("key") == key:
            return True
    return False


def _default_tolerations(pod: Obj) -> None:
    """plugin/pkg/admission/defaulttolerationseconds: tolerate not-ready/unreachable 300s."""
    spec = pod["spec"]
    tols = spec.get("tolerations")
    tols = list(tols) if isinstance(tols, list) else []
    added = False
    for key in (_NOT_READY, _UNREACHABLE):
        if not _tolerates(tols, key):
            tols.append({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300})
            added = True
    if added:
        spec["tolerations"] = tols


def default_storage_class(objects: Objects) -> str | None:
    """The default StorageClass's name (the newest annotated one, as upstream picks), or None."""
    best: tuple[str, str] | None = None
    for sc in objects.get(STORAGECLASSES, {}).values():
        ann = metadata_of(sc).get("annotations") or {}
        if ann.get(DEFAULT_CLASS_ANNOTATION) == "true" or ann.get(BETA_DEFAULT_CLASS_ANNOTATION) == "true":
            cand = (str(metadata_of(sc).get("creationTimestamp", "")), str(metadata_of(sc).get("name", "")))
            if best is None or cand > best:
                best = cand
    return best[1] if best else None


def _default_storage_class(objects: Objects, pvc: Obj) -> None:
    """plugin/pkg/admission/storage/storageclass/setdefault: only a class left unset (absent, not "")."""
    spec = pvc.setdefault("spec", {})
    if spec.get("storageClassName") is not None:
        return
    name = default_storage_class(objects)
    if name is not None:
        spec["storageClassName"] = name


def job_selector(job: Obj) -> None:
    """The Job strategy's generateSelectorIfNeeded: unless manualSelector, the selector and the
    template labels are generated from the Job's uid (already assigned at this point)."""
    spec = job.setdefault("spec", {})
    if spec.get("manualSelector") is True:
        return
    meta = metadata_of(job)
    uid = meta.get("uid", "")
    if spec.get("selector") is not None:
        raise errors.invalid("Job", "batch", meta.get("name", ""), [validation.invalid(
            "spec.selector", spec["selector"], "`selector` not auto-generated")])
    tmpl = spec.setdefault("template", {})
    if not isinstance(tmpl, dict):
        return
    tmeta = tmpl.setdefault("metadata", {})
    labels = dict(tmeta.get("labels") or {})
    labels.setdefault("batch.kubernetes.io/controller-uid", uid)
    labels.setdefault("batch.kubernetes.io/job-name", meta.get("name", ""))
    labels.setdefault("controller-uid", uid)
    labels.setdefault("job-name", meta.get("name", ""))
    tmeta["labels"] = labels
    spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}


# -- PersistentVolumeClaim resize (storage, issue 15) ------------------------------------------
# The PersistentVolumeClaimResize admission plugin (plugin/pkg/admission/storage/persistentvolume/
# resize). It runs after validation (:func:`kubeemu.validation.validate_update` already refused a
# shrink and changes to the rest of the spec), so only the growth of a bound claim is left to judge.


def validate_pvc_update(rt: ResourceType, new: Obj, old: Obj, objects: Mapping[Key, Mapping[ObjKey, Obj]]) -> None:
    """A bound claim may only grow when its class (unchanged, not empty) allows expansion (403)."""
    if rt.key != PVCS or (old.get("status") or {}).get("phase") != "Bound":
        return
    old_size, new_size = _pvc_storage_value(old), _pvc_storage_value(new)
    if old_size is None or new_size is None or new_size <= old_size:
        return
    name = metadata_of(new).get("name", "")
    cls = (new.get("spec") or {}).get("storageClassName") or ""
    sc = objects.get(STORAGECLASSES, {}).get(("", str(cls))) if cls else None
    if cls != (old.get("spec") or {}).get("storageClassName") or not (sc and sc.get("allowVolumeExpansion")):
        raise errors.ApiError(403, "Forbidden", f'persistentvolumeclaims "{name}" is forbidden: only dynamically '
                              "provisioned pvc can be resized and the storageclass that provisions the pvc must "
                              "support resize", {"name": name, "kind": "persistentvolumeclaims"})


def _pvc_storage_value(pvc: Obj) -> Fraction | None:
    raw = (((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
    try:
        return None if raw is None else validation.parse_quantity(raw)
    except validation.QuantityError:
        return None
