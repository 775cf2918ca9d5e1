"""Validation of built-in kinds, as kube-apiserver's ``pkg/apis/*/validation`` does it.

Every check yields a cause ``(reason, field, message)`` with upstream's field path and text
(``spec.containers[0].readinessProbe: Required value: must specify a handler type``); the store
turns a non-empty list into one 422 Invalid Status (:func:`kubeemu.errors.invalid`), so a client
sees every problem at once, each naming its field, as with a real server.

Order: :func:`validate_create` runs after defaulting and admission (so a probe's
``periodSeconds`` or a volume's ``emptyDir`` default is already there, as upstream), on creates
and on every update of the main resource; :func:`validate_update` adds the immutability rules
comparing with the stored object. Only the checks that matter to workloads are here (pod specs,
pod templates and selectors, Services, PVCs, Jobs, StatefulSets); fields not checked are stored
as sent.

Also here, because validation and the ``/scale`` subresource both need them: label selector
matching (:func:`selector_matches`) and the selector's string form (:func:`selector_string`),
and resource quantities (:func:`parse_quantity`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Iterable, Mapping
from fractions import Fraction
from typing import Any

from kubeemu import quantity, selectors
from kubeemu.objects import Obj, metadata_of
from kubeemu.quantity import QuantityError

_log = logging.getLogger(__name__)

Cause = tuple[str, str, str]

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PORT_NAME_CHARS = re.compile(r"^[-a-z0-9]+$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

DNS1123_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
    "and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
#: RelaxedEnvironmentVariableValidation is on by default in v1.32 (beta): any printable ASCII but '='.
ENV_NAME_MSG = "a valid environment variable name must consist only of printable ASCII characters other than '='"
PORT_RANGE_MSG = "must be between 1 and 65535, inclusive"
NON_NEGATIVE_MSG = "must be greater than or equal to 0"
IMMUTABLE_MSG = "field is immutable"
POD_UPDATE_MSG = (
    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,"
    "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),"
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"
)
STATEFULSET_UPDATE_MSG = (
    "updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', "
    "'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"
)
PVC_UPDATE_MSG = "spec is immutable after creation except resources.requests for bound claims"

_PROTOCOLS = ("SCTP", "TCP", "UDP")
#: In upstream's order (validateVolumeSource): the first source counts, later ones are "more than 1".
_VOLUME_SOURCES = (
    "emptyDir", "hostPath", "gitRepo", "gcePersistentDisk", "awsElasticBlockStore", "secret", "nfs", "iscsi",
    "glusterfs", "flexVolume", "persistentVolumeClaim", "rbd", "cinder", "cephfs", "flocker", "downwardAPI", "fc",
    "azureFile", "vsphereVolume", "photonPersistentDisk", "portworxVolume", "azureDisk", "storageos", "configMap",
    "scaleIO", "projected", "csi", "ephemeral", "image",
)
_HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")
_ACCESS_MODES = ("ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod")


# ---------------------------------------------------------------------------- formatting


def go_value(v: Any) -> str:
    """A value as Go's ``%#v`` shows it in ``Invalid value: ...`` (upstream's field.Invalid)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, int | float):
        return str(v)
    if v is None:
        return "null"
    if isinstance(v, dict) and all(isinstance(x, str) for x in v.values()):
        inner = ", ".join(f"{json.dumps(k)}:{json.dumps(x)}" for k, x in sorted(v.items()))
        return f"map[string]string{{{inner}}}"
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return "[]string{" + ", ".join(json.dumps(x) for x in v) + "}"
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def required(path: str, detail: str = "") -> Cause:
    return ("FieldValueRequired", path, "Required value" + (f": {detail}" if detail else ""))


def invalid(path: str, value: Any, detail: str) -> Cause:
    return ("FieldValueInvalid", path, f"Invalid value: {go_value(value)}: {detail}")


def duplicate(path: str, value: Any) -> Cause:
    return ("FieldValueDuplicate", path, f"Duplicate value: {go_value(value)}")


def not_found(path: str, value: Any) -> Cause:
    return ("FieldValueNotFound", path, f"Not found: {go_value(value)}")


def not_supported(path: str, value: Any, supported: Iterable[str]) -> Cause:
    vals = ", ".join(json.dumps(s) for s in supported)
    return ("FieldValueNotSupported", path, f"Unsupported value: {go_value(value)}: supported values: {vals}")


def too_many(path: str, count: int, limit: int) -> Cause:
    return ("FieldValueTooMany", path, f"Too many: {count}: must have at most {limit} items")


def forbidden(path: str, detail: str) -> Cause:
    return ("FieldValueForbidden", path, f"Forbidden: {detail}")


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def _d(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------- quantities


def parse_quantity(value: Any) -> Fraction:
    """A Kubernetes resource quantity (``500m``, ``1Gi``, ``2``, ``1e3``) as an exact number
    (:func:`kubeemu.quantity.parse`; anything else is a :class:`QuantityError`)."""
    if not isinstance(value, str | int | float):
        raise QuantityError(f"{value!r} is not a quantity")
    return quantity.parse(value)


QUANTITY_ERROR = "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"


def quantity_problems(obj: Any) -> list[str]:
    """The unparseable quantities anywhere under ``resources``/``capacity``-like maps of ``obj``
    (what upstream's decoder refuses before validation runs)."""
    bad: list[str] = []

    def walk(v: Any, key: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if key in ("limits", "requests", "capacity", "allocatable", "hard") and not isinstance(x, dict):
                    try:
                        parse_quantity(x)
                    except QuantityError:
                        bad.append(str(x))
                else:
                    walk(x, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)

    walk(obj, "")
    return bad


# ---------------------------------------------------------------------------- label selectors


def selector_matches(sel: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    """metav1.LabelSelector semantics (:func:`kubeemu.selectors.label_selector_matches`); an
    unknown operator matches nothing here (validation reports it on its own field)."""
    try:
        return selectors.label_selector_matches(sel, {str(k): str(v) for k, v in labels.items()})
    except selectors.SelectorError:
        return False


def selector_empty(sel: Mapping[str, Any]) -> bool:
    return not sel.get("matchLabels") and not sel.get("matchExpressions")


def selector_string(sel: Mapping[str, Any]) -> str:
    """``metav1.LabelSelectorAsSelector(sel).String()``: requirements sorted by key, joined by commas."""
    reqs: list[tuple[str, str]] = []
    for k, v in (sel.get("matchLabels") or {}).items():
        reqs.append((k, f"{k}={v}"))
    for e in sel.get("matchExpressions") or []:
        key, op = e.get("key", ""), e.get("operator", "")
        vals = ",".join(sorted(str(x) for x in e.get("values") or []))
        text = {"In": f"{key} in ({vals})", "NotIn": f"{key} notin ({vals})", "Exists": key,
                "DoesNotExist": f"!{key}"}.get(op, key)
        reqs.append((key, text))
    return ",".join(t for _, t in sorted(reqs, key=lambda r: r[0]))


def _labels_go(labels: Mapping[str, Any]) -> str:
    return go_value(dict(labels))


# ---------------------------------------------------------------------------- small checks


def _dns_label(path: str, value: Any) -> list[Cause]:
    if not isinstance(value, str) or not value:
        return [required(path)]
    out = []
    if len(value) > 63:
        out.append(invalid(path, value, "must be no more than 63 characters"))
    if not _DNS1123_LABEL.match(value):
        out.append(invalid(path, value, DNS1123_LABEL_MSG))
    return out


def port_name_problems(name: str) -> list[str]:
    """validation.IsValidPortName's messages."""
    out = []
    if len(name) > 15:
        out.append("must be no more than 15 characters")
    if not _PORT_NAME_CHARS.match(name):
        out.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not re.search(r"[a-z]", name):
        out.append("must contain at least one letter (a-z)")
    if "--" in name:
        out.append("must not contain consecutive hyphens")
    if name.startswith("-") or name.endswith("-"):
        out.append("must not begin or end with a hyphen")
    return out


def _port_num(path: str, value: Any) -> list[Cause]:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        return [invalid(path, value, PORT_RANGE_MSG)]
    return []


def _port_num_or_name(path: str, value: Any) -> list[Cause]:
    """ValidatePortNumOrName: an int in range or an IANA port name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _port_num(path, value)
    if isinstance(value, str) and value:
        if value.isdigit():
            return _port_num(path, int(value))
        return [invalid(path, value, m) for m in port_name_problems(value)]
    return [required(path)]


def _non_negative(path: str, value: Any) -> list[Cause]:
    if value is None:
        return []
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return [invalid(path, value, NON_NEGATIVE_MSG)]
    return []


# ---------------------------------------------------------------------------- pod spec


def _handler(h: dict[str, Any], path: str, kinds: tuple[str, ...] = _HANDLERS) -> list[Cause]:
    """validateHandler: exactly one handler type, each valid."""
    out: list[Cause] = []
    n = 0
    for kind in kinds:
        if h.get(kind) is None:
            continue
        if n:
            out.append(forbidden(f"{path}.{kind}", "may not specify more than 1 handler type"))
            continue
        n += 1
        body = _d(h[kind])
        if kind == "exec":
            if not body.get("command"):
                out.append(required(f"{path}.exec.command"))
        elif kind == "httpGet":
            if not body.get("path"):
                out.append(required(f"{path}.httpGet.path"))
            out += _port_num_or_name(f"{path}.httpGet.port", body.get("port"))
            scheme = body.get("scheme", "HTTP")
            if scheme not in ("HTTP", "HTTPS"):
                out.append(not_supported(f"{path}.httpGet.scheme", scheme, ("HTTP", "HTTPS")))
        elif kind == "tcpSocket":
            out += _port_num_or_name(f"{path}.tcpSocket.port", body.get("port"))
        elif kind == "grpc":
            out += _port_num(f"{path}.grpc.port", body.get("port"))
    if n == 0:
        out.append(required(path, "must specify a handler type"))
    return out


def _probe(p: Any, path: str, liveness_like: bool) -> list[Cause]:
    if not isinstance(p, dict):
        return []
    out = _handler(p, path)
    for k in ("initialDelaySeconds", "timeoutSeconds", "periodSeconds", "successThreshold", "failureThreshold"):
        out += _non_negative(f"{path}.{k}", p.get(k))
    for k in ("timeoutSeconds", "periodSeconds", "successThreshold", "failureThreshold"):
        v = p.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v == 0:
            out.append(invalid(f"{path}.{k}", v, "must be greater than or equal to 1"))
    if liveness_like and p.get("successThreshold") not in (None, 1):
        out.append(invalid(f"{path}.successThreshold", p.get("successThreshold"), "must be 1"))
    return out


def _env(env: Any, path: str) -> list[Cause]:
    out: list[Cause] = []
    for i, ev in enumerate(_dicts(env)):
        p = f"{path}[{i}]"
        name = ev.get("name")
        if not name:
            out.append(required(f"{p}.name"))
        elif not isinstance(name, str) or "=" in name or not all(32 <= ord(ch) < 127 for ch in name):
            out.append(invalid(f"{p}.name", name, ENV_NAME_MSG))
        vf = ev.get("valueFrom")
        if vf is not None:
            refs = [k for k in ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef")
                    if _d(vf).get(k) is not None]
            if ev.get("value"):
                out.append(invalid(f"{p}.valueFrom", "", "may not be specified when `value` is not empty"))
            if not refs:
                out.append(invalid(f"{p}.valueFrom", "", "must specify one of: `fieldRef`, `resourceFieldRef`, "
                                   "`configMapKeyRef` or `secretKeyRef`"))
            elif len(refs) > 1:
                out.append(invalid(f"{p}.valueFrom", "", "may not have more than one field specified at a time"))
            for k in ("configMapKeyRef", "secretKeyRef"):
                ref = _d(_d(vf).get(k))
                if _d(vf).get(k) is not None and not ref.get("key"):
                    out.append(required(f"{p}.valueFrom.{k}.key"))
            fr = _d(vf).get("fieldRef")
            if fr is not None and not _d(fr).get("fieldPath"):
                out.append(required(f"{p}.valueFrom.fieldRef.fieldPath"))
    return out


def _resources(res: Any, path: str) -> list[Cause]:
    out: list[Cause] = []
    res = _d(res)
    limits, requests = _d(res.get("limits")), _d(res.get("requests"))
    parsed: dict[str, dict[str, Fraction]] = {"limits": {}, "requests": {}}
    for part, values in (("limits", limits), ("requests", requests)):
        for k, v in values.items():
            try:
                q = parse_quantity(v)
            except QuantityError:
                continue  # refused at decoding (see quantity_problems)
            parsed[part][k] = q
            if q < 0:
                out.append(invalid(f"{path}.{part}[{k}]", str(v), NON_NEGATIVE_MSG))
    for k, q in parsed["requests"].items():
        lim = parsed["limits"].get(k)
        if lim is not None and q > lim:
            out.append(invalid(f"{path}.requests", str(requests[k]),
                               f"must be less than or equal to {k} limit of {limits[k]}"))
    return out


def _container(c: dict[str, Any], path: str, volumes: set[str], names: dict[str, str]) -> list[Cause]:
    out: list[Cause] = []
    name = c.get("name")
    if not name:
        out.append(required(f"{path}.name"))
    else:
        out += _dns_label(f"{path}.name", name)
        if isinstance(name, str) and name in names:
            out.append(duplicate(f"{path}.name", name))
        names[str(name)] = path
    if not c.get("image"):
        out.append(required(f"{path}.image"))
    port_names: set[str] = set()
    for j, port in enumerate(_dicts(c.get("ports"))):
        pp = f"{path}.ports[{j}]"
        pname = port.get("name")
        if pname:
            for m in port_name_problems(str(pname)):
                out.append(invalid(f"{pp}.name", pname, m))
            if pname in port_names:
                out.append(duplicate(f"{pp}.name", pname))
            port_names.add(str(pname))
        cp = port.get("containerPort")
        if cp in (None, 0):
            out.append(required(f"{pp}.containerPort"))
        else:
            out += _port_num(f"{pp}.containerPort", cp)
        if port.get("hostPort") not in (None, 0):
            out += _port_num(f"{pp}.hostPort", port.get("hostPort"))
        proto = port.get("protocol", "TCP")
        if proto not in _PROTOCOLS:
            out.append(not_supported(f"{pp}.protocol", proto, _PROTOCOLS))
    out += _env(c.get("env"), f"{path}.env")
    mounts: set[str] = set()
    for j, mnt in enumerate(_dicts(c.get("volumeMounts"))):
        mp = f"{path}.volumeMounts[{j}]"
        mname = mnt.get("name")
        if not mname:
            out.append(required(f"{mp}.name"))
        elif mname not in volumes:
            out.append(not_found(f"{mp}.name", mname))
        mpath = mnt.get("mountPath")
        if not mpath:
            out.append(required(f"{mp}.mountPath"))
        elif mpath in mounts:
            out.append(invalid(f"{mp}.mountPath", mpath, "must be unique"))
        else:
            mounts.add(str(mpath))
    out += _probe(c.get("livenessProbe"), f"{path}.livenessProbe", True)
    out += _probe(c.get("readinessProbe"), f"{path}.readinessProbe", False)
    out += _probe(c.get("startupProbe"), f"{path}.startupProbe", True)
    life = _d(c.get("lifecycle"))
    for hook in ("postStart", "preStop"):
        if isinstance(life.get(hook), dict):
            out += _handler(life[hook], f"{path}.lifecycle.{hook}", ("exec", "httpGet", "tcpSocket", "sleep"))
    out += _resources(c.get("resources"), f"{path}.resources")
    pull = c.get("imagePullPolicy")
    if pull is not None and pull not in ("Always", "IfNotPresent", "Never"):
        out.append(not_supported(f"{path}.imagePullPolicy", pull, ("Always", "IfNotPresent", "Never")))
    tmp = c.get("terminationMessagePolicy")
    if tmp is not None and tmp not in ("File", "FallbackToLogsOnError"):
        out.append(not_supported(f"{path}.terminationMessagePolicy", tmp, ("File", "FallbackToLogsOnError")))
    return out


def _volume_source(kind: str, src: Any, path: str) -> list[Cause]:
    s = _d(src)
    need = {"configMap": "name", "secret": "secretName", "persistentVolumeClaim": "claimName", "hostPath": "path",
            "nfs": "server", "csi": "driver"}.get(kind)
    out: list[Cause] = []
    if need and not s.get(need):
        out.append(required(f"{path}.{need}"))
    if kind == "hostPath":
        t = s.get("type", "")
        allowed = ("", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice",
                   "BlockDevice")
        if t not in allowed:
            out.append(not_supported(f"{path}.type", t, allowed))
        if s.get("path") and ".." in str(s["path"]).split("/"):
            out.append(invalid(f"{path}.path", s["path"], "must not contain '..'"))
    if kind == "projected":
        for i, ps in enumerate(_dicts(s.get("sources"))):
            kinds = [k for k in ("secret", "downwardAPI", "configMap", "serviceAccountToken", "clusterTrustBundle")
                     if ps.get(k) is not None]
            pp = f"{path}.sources[{i}]"
            if not kinds:
                out.append(required(pp, "must specify exactly 1 of: secret, downwardAPI, configMap, "
                                        "serviceAccountToken, clusterTrustBundle"))
            for k in kinds[1:]:
                out.append(forbidden(f"{pp}.{k}", "may not specify more than 1 volume type per source"))
            sat = ps.get("serviceAccountToken")
            if isinstance(sat, dict):
                exp = sat.get("expirationSeconds", 3600)
                if isinstance(exp, int) and exp < 600:
                    out.append(invalid(f"{pp}.serviceAccountToken.expirationSeconds", exp,
                                       "may not specify a duration less than 10 minutes"))
                if not sat.get("path"):
                    out.append(required(f"{pp}.serviceAccountToken.path"))
    return out


def _volumes(vols: Any, path: str) -> tuple[list[Cause], set[str]]:
    out: list[Cause] = []
    names: set[str] = set()
    for i, v in enumerate(_dicts(vols)):
        vp = f"{path}[{i}]"
        name = v.get("name")
        if not name:
            out.append(required(f"{vp}.name"))
        else:
            out += _dns_label(f"{vp}.name", name)
            if name in names:
                out.append(duplicate(f"{vp}.name", name))
            names.add(str(name))
        kinds = [k for k in _VOLUME_SOURCES if v.get(k) is not None]
        if not kinds:
            out.append(required(vp, "must specify a volume type"))
        for k in kinds[1:]:
            out.append(forbidden(f"{vp}.{k}", "may not specify more than 1 volume type"))
        if kinds:
            out += _volume_source(kinds[0], v[kinds[0]], f"{vp}.{kinds[0]}")
    return out, names


def pod_spec(spec: Any, path: str, template: bool = False) -> list[Cause]:
    """ValidatePodSpec: containers, volumes and their mounts, policies."""
    spec = _d(spec)
    out, vol_names = _volumes(spec.get("volumes"), f"{path}.volumes")
    containers = spec.get("containers")
    if not containers:
        out.append(required(f"{path}.containers"))
    names: dict[str, str] = {}
    for i, c in enumerate(_dicts(spec.get("initContainers"))):
        out += _container(c, f"{path}.initContainers[{i}]", vol_names, names)
    for i, c in enumerate(_dicts(containers)):
        out += _container(c, f"{path}.containers[{i}]", vol_names, names)
    rp = spec.get("restartPolicy", "Always")
    if rp not in ("Always", "OnFailure", "Never"):
        out.append(not_supported(f"{path}.restartPolicy", rp, ("Always", "OnFailure", "Never")))
    dp = spec.get("dnsPolicy", "ClusterFirst")
    if dp not in ("ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"):
        out.append(not_supported(f"{path}.dnsPolicy", dp, ("ClusterFirstWithHostNet", "ClusterFirst", "Default",
                                                            "None")))
    out += _non_negative(f"{path}.terminationGracePeriodSeconds", spec.get("terminationGracePeriodSeconds"))
    ads = spec.get("activeDeadlineSeconds")
    if ads is not None and (not isinstance(ads, int) or ads <= 0):
        out.append(invalid(f"{path}.activeDeadlineSeconds", ads, "must be between 1 and 2147483647, inclusive"))
    for i, t in enumerate(_dicts(spec.get("tolerations"))):
        op = t.get("operator", "Equal")
        if op not in ("Equal", "Exists"):
            out.append(not_supported(f"{path}.tolerations[{i}].operator", op, ("Equal", "Exists")))
        if op == "Exists" and t.get("value"):
            out.append(invalid(f"{path}.tolerations[{i}].operator", t.get("value"),
                               "value must be empty when `operator` is 'Exists'"))
        eff = t.get("effect", "")
        if eff not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            out.append(not_supported(f"{path}.tolerations[{i}].effect", eff, ("NoExecute", "NoSchedule",
                                                                              "PreferNoSchedule")))
    if spec.get("nodeName"):
        name = spec["nodeName"]
        if not isinstance(name, str) or not _DNS1123_SUBDOMAIN.match(name):
            out.append(invalid(f"{path}.nodeName", name, DNS1123_SUBDOMAIN_MSG))
    return out


def _labels(labels: Any, path: str) -> list[Cause]:
    out: list[Cause] = []
    for v in _d(labels).values():
        if not isinstance(v, str) or not _LABEL_VALUE.match(v) or len(v) > 63:
            out.append(invalid(path, v, "a valid label must be an empty string or consist of alphanumeric "
                                        "characters, '-', '_' or '.', and must start and end with an alphanumeric "
                                        "character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for "
                                        "validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"))
    return out


def _selector(sel: Any, path: str) -> list[Cause]:
    out: list[Cause] = []
    for i, e in enumerate(_dicts(_d(sel).get("matchExpressions"))):
        op = e.get("operator")
        ep = f"{path}.matchExpressions[{i}]"
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            out.append(invalid(f"{ep}.operator", op, "not a valid selector operator"))
        elif op in ("In", "NotIn") and not e.get("values"):
            out.append(required(f"{ep}.values", "must be specified when `operator` is 'In' or 'NotIn'"))
        elif op in ("Exists", "DoesNotExist") and e.get("values"):
            out.append(forbidden(f"{ep}.values", "may not be specified when `operator` is 'Exists' or "
                                                 "'DoesNotExist'"))
    return out


def template_with_selector(spec: dict[str, Any], path: str, kind: str,
                           restart: tuple[str, ...] | None = ("Always",), check_pod_spec: bool = True) -> list[Cause]:
    """A controller's selector and pod template (ValidatePodTemplateSpecForReplicaSet and friends):
    the selector is required and non-empty, the template's labels must match it, its restart
    policy must be one the controller can run. ``check_pod_spec=False`` is the StatefulSet case:
    upstream's ValidatePodTemplateSpecForStatefulSet skips the pod spec, because its mounts may
    name ``volumeClaimTemplates`` that are not volumes of the template."""
    out: list[Cause] = []
    sel = spec.get("selector")
    if sel is None:
        out.append(required(f"{path}.selector"))
    elif selector_empty(_d(sel)):
        out.append(invalid(f"{path}.selector", sel, f"empty selector is invalid for {kind}"))
    else:
        out += _selector(sel, f"{path}.selector")
    tmpl = spec.get("template")
    if not isinstance(tmpl, dict):
        out.append(required(f"{path}.template"))
        return out
    labels = _d(metadata_of(tmpl).get("labels"))
    out += _labels(labels, f"{path}.template.metadata.labels")
    if isinstance(sel, dict) and not selector_empty(sel) and not selector_matches(sel, labels):
        out.append(invalid(f"{path}.template.metadata.labels", labels, "`selector` does not match template `labels`"))
    if check_pod_spec:
        out += pod_spec(tmpl.get("spec"), f"{path}.template.spec", template=True)
    rp = _d(tmpl.get("spec")).get("restartPolicy", "Always")
    if restart is not None and rp not in restart:
        out.append(not_supported(f"{path}.template.spec.restartPolicy", rp, restart))
    return out


def _replicas(spec: dict[str, Any], path: str) -> list[Cause]:
    return _non_negative(f"{path}.replicas", spec.get("replicas"))


def _deployment(obj: Obj) -> list[Cause]:
    spec = _d(obj.get("spec"))
    out = _replicas(spec, "spec") + template_with_selector(spec, "spec", "deployment")
    strategy = _d(spec.get("strategy"))
    stype = strategy.get("type", "RollingUpdate")
    if stype not in ("Recreate", "RollingUpdate"):
        out.append(not_supported("spec.strategy.type", stype, ("Recreate", "RollingUpdate")))
    elif stype == "Recreate" and strategy.get("rollingUpdate") is not None:
        out.append(forbidden("spec.strategy.rollingUpdate", "may not be specified when strategy `type` is "
                                                            "'Recreate'"))
    ru = _d(strategy.get("rollingUpdate"))
    if stype == "RollingUpdate" and ru.get("maxUnavailable") in (0, "0%", "0") and ru.get("maxSurge") in (0, "0%",
                                                                                                        "0"):
        out.append(invalid("spec.strategy.rollingUpdate.maxUnavailable", ru.get("maxUnavailable"),
                           "may not be 0 when `maxSurge` is 0"))
    out += _non_negative("spec.revisionHistoryLimit", spec.get("revisionHistoryLimit"))
    out += _non_negative("spec.minReadySeconds", spec.get("minReadySeconds"))
    return out


def _replicaset(obj: Obj) -> list[Cause]:
    spec = _d(obj.get("spec"))
    return _replicas(spec, "spec") + template_with_selector(spec, "spec", "replicaset")


def _daemonset(obj: Obj) -> list[Cause]:
    spec = _d(obj.get("spec"))
    out = template_with_selector(spec, "spec", "daemonset")
    st = _d(spec.get("updateStrategy")).get("type", "RollingUpdate")
    if st not in ("OnDelete", "RollingUpdate"):
        out.append(not_supported("spec.updateStrategy.type", st, ("OnDelete", "RollingUpdate")))
    return out


def _statefulset(obj: Obj) -> list[Cause]:
    spec = _d(obj.get("spec"))
    out = _replicas(spec, "spec") + template_with_selector(spec, "spec", "statefulset", check_pod_spec=False)
    pmp = spec.get("podManagementPolicy", "OrderedReady")
    if pmp not in ("OrderedReady", "Parallel"):
        out.append(not_supported("spec.podManagementPolicy", pmp, ("OrderedReady", "Parallel")))
    st = _d(spec.get("updateStrategy")).get("type", "RollingUpdate")
    if st not in ("OnDelete", "RollingUpdate"):
        out.append(not_supported("spec.updateStrategy.type", st, ("OnDelete", "RollingUpdate")))
    for i, claim in enumerate(_dicts(spec.get("volumeClaimTemplates"))):
        out += _dns_label(f"spec.volumeClaimTemplates[{i}].metadata.name", metadata_of(claim).get("name"))
        out += _pvc_spec(_d(claim.get("spec")), f"spec.volumeClaimTemplates[{i}].spec")
    return out


def _job_spec(spec: dict[str, Any], path: str) -> list[Cause]:
    out = template_with_selector(spec, path, "job", restart=("OnFailure", "Never"))
    # a generated selector is there by now (admission); a missing one was reported above
    for k in ("parallelism", "completions", "backoffLimit", "activeDeadlineSeconds"):
        out += _non_negative(f"{path}.{k}", spec.get(k))
    cm = spec.get("completionMode", "NonIndexed")
    if cm not in ("NonIndexed", "Indexed"):
        out.append(not_supported(f"{path}.completionMode", cm, ("NonIndexed", "Indexed")))
    elif cm == "Indexed" and spec.get("completions") is None:
        out.append(required(f"{path}.completions", "when completion mode is Indexed"))
    return out


def _job(obj: Obj) -> list[Cause]:
    return _job_spec(_d(obj.get("spec")), "spec")


_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,?\-LW#]+$")


def _cronjob(obj: Obj) -> list[Cause]:
    spec = _d(obj.get("spec"))
    out: list[Cause] = []
    sched = spec.get("schedule")
    if not sched:
        out.append(required("spec.schedule"))
    else:
        fields = str(sched).split()
        if not (str(sched).startswith("@") or (len(fields) == 5 and all(_CRON_FIELD.match(f) for f in fields))):
            out.append(invalid("spec.schedule", sched, f"Expected exactly 5 fields, found {len(fields)}: {sched}"))
    cp = spec.get("concurrencyPolicy", "Allow")
    if cp not in ("Allow", "Forbid", "Replace"):
        out.append(not_supported("spec.concurrencyPolicy", cp, ("Allow", "Forbid", "Replace")))
    jspec = _d(_d(spec.get("jobTemplate")).get("spec"))
    tmpl = _d(jspec.get("template"))
    out += pod_spec(tmpl.get("spec"), "spec.jobTemplate.spec.template.spec", template=True)
    rp = _d(tmpl.get("spec")).get("restartPolicy", "Always")
    if rp not in ("OnFailure", "Never"):
        out.append(not_supported("spec.jobTemplate.spec.template.spec.restartPolicy", rp, ("OnFailure", "Never")))
    return out


def _pod(obj: Obj) -> list[Cause]:
    return pod_spec(obj.get("spec"), "spec")


def _service(obj: Obj) -> list[Cause]:
    spec = _d(obj.get("spec"))
    out: list[Cause] = []
    stype = spec.get("type", "ClusterIP")
    types = ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort")
    if stype not in types:
        out.append(not_supported("spec.type", stype, types))
    ports = _dicts(spec.get("ports"))
    headless = spec.get("clusterIP") == "None"
    if stype == "ExternalName":
        if not spec.get("externalName"):
            out.append(required("spec.externalName"))
    elif not ports and not headless:
        out.append(required("spec.ports"))
    names: set[str] = set()
    seen: set[tuple[Any, Any]] = set()
    for i, p in enumerate(ports):
        pp = f"spec.ports[{i}]"
        pname = p.get("name")
        if len(ports) > 1 and not pname:
            out.append(required(f"{pp}.name"))
        elif pname:
            out += _dns_label(f"{pp}.name", pname)
            if pname in names:
                out.append(duplicate(f"{pp}.name", pname))
            names.add(str(pname))
        out += _port_num(f"{pp}.port", p.get("port"))
        proto = p.get("protocol", "TCP")
        if proto not in _PROTOCOLS:
            out.append(not_supported(f"{pp}.protocol", proto, _PROTOCOLS))
        if "targetPort" in p:
            out += _port_num_or_name(f"{pp}.targetPort", p["targetPort"])
        np = p.get("nodePort")
        if np not in (None, 0):
            if stype in ("ClusterIP", "ExternalName"):
                out.append(forbidden(f"{pp}.nodePort", f"may not be used when `type` is '{stype}'"))
            else:
                out += _port_num(f"{pp}.nodePort", np)
        key = (p.get("port"), proto)
        if key in seen:
            out.append(duplicate(pp, f"{p.get('port')}/{proto}"))
        seen.add(key)
    for k, v in _d(spec.get("selector")).items():
        out += _labels({k: v}, "spec.selector")
    sa = spec.get("sessionAffinity", "None")
    if sa not in ("ClientIP", "None"):
        out.append(not_supported("spec.sessionAffinity", sa, ("ClientIP", "None")))
    pol = spec.get("ipFamilyPolicy")
    if pol is not None and pol not in ("SingleStack", "PreferDualStack", "RequireDualStack"):
        out.append(not_supported("spec.ipFamilyPolicy", pol, ("PreferDualStack", "RequireDualStack",
                                                              "SingleStack")))
    for i, fam in enumerate(spec.get("ipFamilies") or []):
        if fam not in ("IPv4", "IPv6"):
            out.append(not_supported(f"spec.ipFamilies[{i}]", fam, ("IPv4", "IPv6")))
    return out


def _pvc_spec(spec: dict[str, Any], path: str) -> list[Cause]:
    out: list[Cause] = []
    modes = spec.get("accessModes")
    if not modes:
        out.append(required(f"{path}.accessModes", "at least 1 access mode is required"))
    for m in modes or []:
        if m not in _ACCESS_MODES:
            out.append(not_supported(f"{path}.accessModes", m, _ACCESS_MODES))
    if "ReadWriteOncePod" in (modes or []) and len(modes or []) > 1:
        out.append(forbidden(f"{path}.accessModes", "may not use ReadWriteOncePod with other access modes"))
    storage = _d(_d(spec.get("resources")).get("requests")).get("storage")
    if storage is None:
        out.append(required(f"{path}.resources[storage]"))
    else:
        try:
            if parse_quantity(storage) <= 0:
                out.append(invalid(f"{path}.resources[storage]", str(storage), "must be greater than zero"))
        except QuantityError:
            pass
    vm = spec.get("volumeMode", "Filesystem")
    if vm not in ("Block", "Filesystem"):
        out.append(not_supported(f"{path}.volumeMode", vm, ("Block", "Filesystem")))
    return out


def _pvc(obj: Obj) -> list[Cause]:
    return _pvc_spec(_d(obj.get("spec")), "spec")


def _storageclass(obj: Obj) -> list[Cause]:
    out: list[Cause] = []
    if not obj.get("provisioner"):
        out.append(required("provisioner"))
    rp = obj.get("reclaimPolicy", "Delete")
    if rp not in ("Delete", "Retain"):
        out.append(not_supported("reclaimPolicy", rp, ("Delete", "Retain")))
    vbm = obj.get("volumeBindingMode", "Immediate")
    if vbm not in ("Immediate", "WaitForFirstConsumer"):
        out.append(not_supported("volumeBindingMode", vbm, ("Immediate", "WaitForFirstConsumer")))
    return out


def _pdb(obj: Obj) -> list[Cause]:
    spec = _d(obj.get("spec"))
    out: list[Cause] = []
    if spec.get("minAvailable") is not None and spec.get("maxUnavailable") is not None:
        out.append(invalid("spec", spec, "minAvailable and maxUnavailable cannot be both set"))
    out += _selector(spec.get("selector"), "spec.selector")
    return out


#: EndpointSlice limits (upstream's maxEndpoints, maxAddresses, maxPorts).
_SLICE_MAX_ENDPOINTS, _SLICE_MAX_ADDRESSES, _SLICE_MAX_PORTS = 1000, 100, 20000
_ADDRESS_TYPES = ("FQDN", "IPv4", "IPv6")


def _slice_address(path: str, address: Any, address_type: str) -> list[Cause]:
    """One endpoint address of a slice of ``address_type`` (upstream's validateEndpoints)."""
    if address_type == "FQDN":
        ok = isinstance(address, str) and "." in address and all(
            _DNS1123_LABEL.match(part) for part in address.rstrip(".").split("."))
        return [] if ok else [invalid(path, address, "should be a domain with at least two segments separated by dots")]
    version = 4 if address_type == "IPv4" else 6
    try:
        ok = isinstance(address, str) and ipaddress.ip_address(address).version == version
    except ValueError:
        ok = False
    return [] if ok else [invalid(path, address, f"must be a valid {address_type} address")]


def _endpointslice(obj: Obj) -> list[Cause]:
    """ValidateEndpointSlice: the address type, each endpoint's addresses of that type, hostname
    and the ports, within upstream's limits."""
    out: list[Cause] = []
    at = obj.get("addressType")
    if not at:
        out.append(required("addressType"))
    elif at not in _ADDRESS_TYPES:
        out.append(not_supported("addressType", at, _ADDRESS_TYPES))
    eps = obj.get("endpoints") or []
    if isinstance(eps, list) and len(eps) > _SLICE_MAX_ENDPOINTS:
        out.append(too_many("endpoints", len(eps), _SLICE_MAX_ENDPOINTS))
    for i, ep in enumerate(_dicts(eps)):
        ap = f"endpoints[{i}].addresses"
        addrs = ep.get("addresses") or []
        if not addrs:
            out.append(required(ap, "must contain at least 1 address"))
        elif len(addrs) > _SLICE_MAX_ADDRESSES:
            out.append(too_many(ap, len(addrs), _SLICE_MAX_ADDRESSES))
        elif at in _ADDRESS_TYPES:
            for j, a in enumerate(addrs):
                out += _slice_address(f"{ap}[{j}]", a, str(at))
        if ep.get("hostname") is not None:
            out += _dns_label(f"endpoints[{i}].hostname", ep["hostname"])
    ports = obj.get("ports") or []
    if isinstance(ports, list) and len(ports) > _SLICE_MAX_PORTS:
        out.append(too_many("ports", len(ports), _SLICE_MAX_PORTS))
    names: set[str] = set()
    for i, p in enumerate(_dicts(ports)):
        pp = f"ports[{i}]"
        name = p.get("name") or ""
        if name:
            out += _dns_label(f"{pp}.name", name)
        if name in names:
            out.append(duplicate(f"{pp}.name", name))
        names.add(name)
        proto = p.get("protocol", "TCP")
        if proto not in _PROTOCOLS:
            out.append(not_supported(f"{pp}.protocol", proto, _PROTOCOLS))
        if p.get("port") is not None:
            out += _port_num(f"{pp}.port", p["port"])
    return out


_CREATE = {
    ("", "pods"): _pod,
    ("", "services"): _service,
    ("", "persistentvolumeclaims"): _pvc,
    ("apps", "deployments"): _deployment,
    ("apps", "replicasets"): _replicaset,
    ("apps", "statefulsets"): _statefulset,
    ("apps", "daemonsets"): _daemonset,
    ("batch", "jobs"): _job,
    ("batch", "cronjobs"): _cronjob,
    ("storage.k8s.io", "storageclasses"): _storageclass,
    ("policy", "poddisruptionbudgets"): _pdb,
    ("discovery.k8s.io", "endpointslices"): _endpointslice,
}


def validate_create(key: tuple[str, str], obj: Obj) -> list[Cause]:
    """The causes refusing a (defaulted) built-in object of kind ``key``; empty when valid."""
    fn = _CREATE.get(key)
    return fn(obj) if fn is not None else []


# ---------------------------------------------------------------------------- updates


def _immutable(new: Any, old: Any, path: str) -> list[Cause]:
    return [] if new == old else [invalid(path, new, IMMUTABLE_MSG)]


def _pod_update(new: Obj, old: Obj) -> list[Cause]:
    """ValidatePodUpdate: only images, activeDeadlineSeconds, added tolerations and a negative
    terminationGracePeriodSeconds set to 1 may change."""
    ns, os_ = dict(_d(new.get("spec"))), dict(_d(old.get("spec")))
    out: list[Cause] = []
    for key in ("containers", "initContainers"):
        oc = _dicts(os_.get(key))
        nc = _dicts(ns.get(key))
        if key in ns and len(oc) == len(nc):
            ns[key] = [dict(n, image=o.get("image")) for n, o in zip(nc, oc, strict=True)]
            # an image may change but not be removed
            for i, n in enumerate(nc):
                if not n.get("image"):
                    out.append(required(f"spec.{key}[{i}].image"))
    ads_new, ads_old = ns.get("activeDeadlineSeconds"), os_.get("activeDeadlineSeconds")
    if ads_old is not None and (ads_new is None or ads_new > ads_old):
        out.append(invalid("spec.activeDeadlineSeconds", ads_new,
                           "must be less than or equal to previous value" if ads_new is not None
                           else "must not update from a positive integer to nil value"))
    ns["activeDeadlineSeconds"] = os_.get("activeDeadlineSeconds")
    old_tol = _dicts(os_.get("tolerations"))
    new_tol = _dicts(ns.get("tolerations"))
    if all(t in new_tol for t in old_tol):
        ns["tolerations"] = os_.get("tolerations")
    tgp_old = os_.get("terminationGracePeriodSeconds")
    if isinstance(tgp_old, int) and tgp_old < 0 and ns.get("terminationGracePeriodSeconds") == 1:
        ns["terminationGracePeriodSeconds"] = tgp_old
    ns = {k: v for k, v in ns.items() if v is not None}
    os_ = {k: v for k, v in os_.items() if v is not None}
    if ns != os_:
        changed = sorted(k for k in set(ns) | set(os_) if ns.get(k) != os_.get(k))
        out.append(forbidden("spec", POD_UPDATE_MSG + "\n  core.PodSpec{ changed: " + ", ".join(changed) + " }"))
    return out


def _selector_immutable(new: Obj, old: Obj) -> list[Cause]:
    ns, os_ = _d(new.get("spec")).get("selector"), _d(old.get("spec")).get("selector")
    return _immutable(ns, os_, "spec.selector")


def _statefulset_update(new: Obj, old: Obj) -> list[Cause]:
    allowed = {"replicas", "ordinals", "template", "updateStrategy", "persistentVolumeClaimRetentionPolicy",
               "minReadySeconds"}
    ns = {k: v for k, v in _d(new.get("spec")).items() if k not in allowed}
    os_ = {k: v for k, v in _d(old.get("spec")).items() if k not in allowed}
    return [] if ns == os_ else [forbidden("spec", STATEFULSET_UPDATE_MSG)]


def _job_update(new: Obj, old: Obj) -> list[Cause]:
    ns, os_ = _d(new.get("spec")), _d(old.get("spec"))
    out = _immutable(ns.get("selector"), os_.get("selector"), "spec.selector")
    out += _immutable(ns.get("template"), os_.get("template"), "spec.template")
    out += _immutable(ns.get("completions"), os_.get("completions"), "spec.completions")
    out += _immutable(ns.get("completionMode"), os_.get("completionMode"), "spec.completionMode")
    out += _immutable(ns.get("podFailurePolicy"), os_.get("podFailurePolicy"), "spec.podFailurePolicy")
    return out


def _pvc_update(new: Obj, old: Obj) -> list[Cause]:
    ns, os_ = dict(_d(new.get("spec"))), dict(_d(old.get("spec")))
    bound = _d(old.get("status")).get("phase") == "Bound"
    out: list[Cause] = []
    if bound:
        new_req = _d(_d(ns.get("resources")).get("requests")).get("storage")
        old_req = _d(_d(os_.get("resources")).get("requests")).get("storage")
        try:
            if new_req is not None and old_req is not None and parse_quantity(new_req) < parse_quantity(old_req):
                out.append(forbidden("spec.resources.requests.storage", "field can not be less than previous value"))
        except QuantityError:
            pass
        ns["resources"] = os_.get("resources")
    # RetroactiveDefaultStorageClass: an unset class may be set once
    if os_.get("storageClassName") is None and ns.get("storageClassName") is not None:
        os_["storageClassName"] = ns["storageClassName"]
    # the binder sets volumeName on a claim that had none
    if not os_.get("volumeName") and ns.get("volumeName"):
        os_["volumeName"] = ns["volumeName"]
    if ns != os_:
        out.append(forbidden("spec", PVC_UPDATE_MSG))
    return out


def _endpointslice_update(new: Obj, old: Obj) -> list[Cause]:
    return _immutable(new.get("addressType"), old.get("addressType"), "addressType")


_UPDATE = {
    ("", "pods"): _pod_update,
    ("apps", "deployments"): _selector_immutable,
    ("apps", "replicasets"): _selector_immutable,
    ("apps", "daemonsets"): _selector_immutable,
    ("apps", "statefulsets"): lambda n, o: _selector_immutable(n, o) + _statefulset_update(n, o),
    ("batch", "jobs"): _job_update,
    ("", "persistentvolumeclaims"): _pvc_update,
    ("discovery.k8s.io", "endpointslices"): _endpointslice_update,
}


def validate_update(key: tuple[str, str], new: Obj, old: Obj) -> list[Cause]:
    """The immutability causes of replacing ``old`` by ``new`` (both defaulted)."""
    fn = _UPDATE.get(key)
    return fn(new, old) if fn is not None else []


__all__ = [
    "Cause", "QuantityError", "go_value", "parse_quantity", "pod_spec", "quantity_problems",
    "selector_matches", "selector_string", "template_with_selector", "validate_create", "validate_update",
]
