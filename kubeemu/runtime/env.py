"""A container's environment and command line, resolved as the kubelet does (``makeEnvironmentVariables``).

Order, as upstream: ``envFrom`` sources first (each ConfigMap/Secret's keys, with ``prefix``;
keys that are not valid variable names are skipped), then ``env`` entries in order, each value
``$(VAR)``-expanded against what is defined so far. ``valueFrom`` reads a ConfigMap/Secret key
(``optional`` tolerates a missing object or key) or a downward-API field. Then ``command`` and
``args`` are expanded against the final environment. A missing non-optional source is a
:class:`ConfigError`; the kubelet shows it as ``waiting`` with reason
``CreateContainerConfigError`` and retries, as upstream does.

The objects are fetched by the caller (the kubelet, asynchronously) and passed in; this module
is pure so it is unit-testable and never blocks.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

#: What a container gets when the pod sets no PATH (the host root filesystem is its image).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


class ConfigError(Exception):
    """A container's configuration cannot be built yet (a referenced object or key is missing)."""


Objects = Mapping[tuple[str, str], Mapping[str, Any] | None]
"""Fetched ConfigMaps and Secrets: ``(kind, name)`` -> object, or None when it does not exist."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Upstream ``expansion.Expand``: ``$(VAR)`` -> value when defined (else left as written),
    ``$$`` -> ``$`` (so ``$$(VAR)`` stays literal)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    out.append(env[name] if name in env else text[i:end + 1])
                    i = end + 1
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


def object_data(kind: str, obj: Mapping[str, Any]) -> dict[str, bytes]:
    """The key -> bytes content of a ConfigMap (``data`` + ``binaryData``) or Secret (base64 ``data``,
    ``stringData`` in case the API server kept it)."""
    out: dict[str, bytes] = {}
    if kind == "ConfigMap":
        out.update({k: str(v).encode() for k, v in (obj.get("data") or {}).items()})
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    else:
        out.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        out.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
    return out


def field_value(pod: Mapping[str, Any], path: str, host_ips: tuple[str, ...] = (),
                pod_ips: tuple[str, ...] = ()) -> str:
    """A downward-API ``fieldRef.fieldPath`` of ``pod`` (upstream ``podFieldSelectorRuntimeValue``):
    ``status.hostIP`` / ``status.podIP`` are the primaries, ``status.hostIPs`` / ``status.podIPs``
    every address, primary first, joined by commas."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{v}"' for k, v in items)
    simple = {
        "metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""), "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.hostIP": host_ips[0] if host_ips else "", "status.hostIPs": ",".join(host_ips),
        "status.podIP": pod_ips[0] if pod_ips else "", "status.podIPs": ",".join(pod_ips),
    }
    if path not in simple:
        raise ConfigError(f"unsupported fieldPath: {path}")
    return str(simple[path])


def resource_value(pod: Mapping[str, Any], ref: Mapping[str, Any], container: str | None) -> str:
    """``resourceFieldRef`` (limits/requests of a container), with the upstream divisor rounding up."""
    from kubeemu import quantity

    name = ref.get("containerName") or container
    res = ref.get("resource", "")
    kind, _, rname = res.partition(".")
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == name:
            raw = ((c.get("resources") or {}).get(kind) or {}).get(rname)
            if raw is None:
                return "0"
            divisor = quantity.parse(ref.get("divisor") or "1")
            return str(quantity.value(quantity.parse(raw) / divisor))
    raise ConfigError(f"resourceFieldRef: no container {name!r}")


def build_env(pod: Mapping[str, Any], container: Mapping[str, Any], objects: Objects, host_ips: tuple[str, ...],
              pod_ips: tuple[str, ...]) -> dict[str, str]:
    """The container's environment (see the module docstring for the order)."""
    ns = (pod.get("metadata") or {}).get("namespace", "default")
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = src.get(key)
            if ref is None:
                continue
            obj = objects.get((kind, ref.get("name", "")))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{kind.lower()} "{ref.get("name", "")}" not found')
            for k, v in object_data(kind, obj).items():
                if _ENV_NAME.match(prefix + k):
                    env[prefix + k] = v.decode(errors="replace")
    for e in container.get("env") or []:
        name = e.get("name", "")
        if "value" in e or "valueFrom" not in e:
            env[name] = expand(str(e.get("value", "")), env)
            continue
        vf = e["valueFrom"]
        if "fieldRef" in vf:
            env[name] = field_value(pod, vf["fieldRef"].get("fieldPath", ""), host_ips, pod_ips)
        elif "resourceFieldRef" in vf:
            env[name] = resource_value(pod, vf["resourceFieldRef"], container.get("name"))
        else:
            kind, key = ("ConfigMap", "configMapKeyRef") if "configMapKeyRef" in vf else ("Secret", "secretKeyRef")
            ref = vf.get(key) or {}
            obj = objects.get((kind, ref.get("name", "")))
            data = object_data(kind, obj) if obj is not None else None
            if data is None or ref.get("key") not in data:
                if ref.get("optional"):
                    continue
                if data is None:
                    raise ConfigError(f'{kind.lower()} "{ref.get("name", "")}" not found')
                raise ConfigError(f"couldn't find key {ref.get('key')} in {kind} {ns}/{ref.get('name', '')}")
            env[name] = data[ref["key"]].decode(errors="replace")
    return env


def process_env(pod: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """What the process gets: PATH and HOSTNAME as a container runtime sets them, then the pod's."""
    base = {"PATH": DEFAULT_PATH, "HOSTNAME": (pod.get("metadata") or {}).get("name", "")}
    return {**base, **env}


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """``command`` + ``args``, expanded. Images are not pulled, so an image's entrypoint is
    unknown: without ``command`` the ``args`` run as the command line, and a container with
    neither runs an idle process (:data:`IDLE`)."""
    cmd = [expand(str(a), env) for a in container.get("command") or []]
    args = [expand(str(a), env) for a in container.get("args") or []]
    return cmd + args if cmd or args else list(IDLE)


#: The idle process of a container without a command (``sleep infinity`` as the pause image does).
IDLE = ["sleep", "infinity"]
