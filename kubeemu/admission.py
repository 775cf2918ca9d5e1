"""Admission of built-in kinds, as kube-apiserver's validation does it: names, labels, the kind
and apiVersion of a body against its URL, the required fields of Pods and CRDs. Each refusal is
a 422 Invalid (or 400) Status with a cause per field. Custom resources are checked against
their CRD's schema by :mod:`kubeemu.schema`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from fractions import Fraction

from kubeemu import errors
from kubeemu.objects import CRDS, NAMESPACES, PODS, SERVICES, Key, Obj, ObjKey, metadata_of
from kubeemu.resources import ResourceType

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
    if rt.key == PODS:
        containers = (obj.get("spec") or {}).get("containers")
        if not containers:
            causes.append(("FieldValueRequired", "spec.containers", "Required value"))
        for i, c in enumerate(containers or []):
            if not isinstance(c, dict) or not c.get("name"):
                causes.append(("FieldValueRequired", f"spec.containers[{i}].name", "Required value"))
            elif not c.get("image"):
                causes.append(("FieldValueRequired", f"spec.containers[{i}].image", "Required value"))
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
    if causes:
        raise errors.invalid(rt.kind, rt.group, name, causes)



# -- PersistentVolumeClaim updates (storage, issue 15) ------------------------------------------
# ValidatePersistentVolumeClaimUpdate (pkg/apis/core/validation) and the PersistentVolumeClaimResize
# admission plugin (plugin/pkg/admission/storage/persistentvolume/resize), in that order, as the
# apiserver runs validation before validating admission. Feature gate RecoverVolumeExpansionFailure
# is taken as off for the shrink message ("can not be less than previous value").

_PVCS = ("", "persistentvolumeclaims")
_STORAGECLASSES = ("storage.k8s.io", "storageclasses")


def _pvc_storage(pvc: Obj) -> object:
    return (((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")


def _pvc_storage_value(pvc: Obj) -> Fraction | None:
    raw = _pvc_storage(pvc)
    if raw is None:
        return None
    try:
        from kubeemu.ctrl.volume import quantity

        return quantity(raw)
    except ValueError:
        return None


def validate_pvc_update(rt: ResourceType, new: Obj, old: Obj, objects: Mapping[Key, Mapping[ObjKey, Obj]]) -> None:
    """A PVC update: spec immutable except ``resources.requests`` of a bound claim (and
    ``volumeName`` once, ``storageClassName`` from unset); never a smaller request; a larger one
    only when the class allows expansion (403, as the resize admission plugin)."""
    if rt.key != _PVCS:
        return
    name = metadata_of(new).get("name", "")
    ospec, nspec = dict(old.get("spec") or {}), dict(new.get("spec") or {})
    if not ospec.get("volumeName"):
        ospec["volumeName"] = nspec.get("volumeName")
    if ospec.get("storageClassName") is None and "volume.beta.kubernetes.io/storage-class" not in (
            metadata_of(old).get("annotations") or {}):
        ospec["storageClassName"] = nspec.get("storageClassName")
    bound = (old.get("status") or {}).get("phase") == "Bound"
    for spec in (ospec, nspec):
        spec.pop("volumeAttributesClassName", None)
        if bound:
            res = dict(spec.get("resources") or {})
            res["requests"] = {k: v for k, v in (res.get("requests") or {}).items() if k != "storage"}
            spec["resources"] = res
        for k, v in list(spec.items()):
            if v is None:
                del spec[k]
    causes: list[tuple[str, str, str]] = []
    if ospec != nspec:
        causes.append(("FieldValueForbidden", "spec", "Forbidden: spec is immutable after creation except "
                       "resources.requests and volumeAttributesClassName for bound claims"))
    old_size, new_size = _pvc_storage_value(old), _pvc_storage_value(new)
    if old_size is not None and new_size is not None and new_size < old_size:
        causes.append(("FieldValueForbidden", "spec.resources.requests.storage",
                       "Forbidden: field can not be less than previous value"))
    if causes:
        raise errors.invalid(rt.kind, rt.group, name, causes)
    if not bound or old_size is None or new_size is None or new_size <= old_size:
        return
    cls = nspec.get("storageClassName") or ""
    sc = objects.get(_STORAGECLASSES, {}).get(("", str(cls))) if cls else None
    if cls != (old.get("spec") or {}).get("storageClassName") or not (sc and sc.get("allowVolumeExpansion")):
        raise errors.ApiError(403, "Forbidden", f'persistentvolumeclaims "{name}" is forbidden: only dynamically '
                              "provisioned pvc can be resized and the storageclass that provisions the pvc must "
                              "support resize", {"name": name, "kind": "persistentvolumeclaims"})
