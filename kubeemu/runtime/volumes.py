"""A pod's volumes on the host, under the pod's directory, as the kubelet's volume plugins lay them out.

``<kubelet root>/pods/<uid>/volumes/kubernetes.io~<plugin>/<volume>`` holds each managed volume
(upstream ``/var/lib/kubelet/pods/<uid>/volumes``):

* ``emptyDir``: an empty directory that lives as long as the pod;
* ``configMap``, ``secret``, ``downwardAPI``, ``projected``: files written by :func:`write_files`
  the way upstream's ``AtomicWriter`` does (a timestamped ``..<ts>`` directory, a ``..data``
  symlink swapped atomically, one top-level symlink per entry), with ``items``, ``defaultMode``,
  per-item ``mode`` and ``optional`` honoured; projected service-account tokens come from
  TokenRequest (or an unsigned placeholder when the API server has no such endpoint);
* ``persistentVolumeClaim``: the claim's bound PV, whose ``spec.local.path`` or
  ``spec.hostPath.path`` is used in place (a claim not yet bound keeps the pod waiting);
* ``hostPath``: the host path itself after upstream's ``type`` check.

:func:`resolve` fetches what it needs (async, through :class:`Api`) and returns a plan;
:func:`apply` does the file system work and runs in a thread. :func:`container_mounts` turns a
container's ``volumeMounts`` into bind mounts for the shim (configMap, secret, downwardAPI and
projected volumes are always read-only, as upstream mounts them).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubeemu.runtime.env import ConfigError, field_value, object_data, resource_value

_log = logging.getLogger(__name__)

_PLUGIN = {"emptyDir": "empty-dir", "configMap": "configmap", "secret": "secret", "downwardAPI": "downward-api",
           "projected": "projected"}
#: Volume kinds whose content the kubelet writes, mounted read-only whatever the mount says.
_ALWAYS_RO = {"configMap", "secret", "downwardAPI", "projected"}


class Api(Protocol):
    """What volume resolution needs from the API server."""

    async def get(self, path: str) -> dict[str, Any] | None:
        """GET ``path``; None on 404."""
        ...

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST ``path``; the status code and the body whatever the code."""
        ...


class VolumePending(Exception):
    """A volume cannot be set up yet (missing object, unbound claim, failed type check). The pod
    waits in ``ContainerCreating`` and the kubelet retries, as upstream's volume manager does."""


@dataclass
class Volume:
    """One pod volume on the host: where it is, and (managed kinds) the files it must contain."""

    name: str
    kind: str
    path: Path
    files: dict[str, tuple[bytes, int]] | None = None
    host_type: str = ""
    read_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def volume_dir(pod_dir: Path, kind: str, name: str) -> Path:
    return pod_dir / "volumes" / f"kubernetes.io~{_PLUGIN[kind]}" / name


def _items(kind: str, obj: Mapping[str, Any] | None, src: Mapping[str, Any], default_mode: int,
           what: str) -> dict[str, tuple[bytes, int]]:
    if obj is None:
        if src.get("optional"):
            return {}
        raise VolumePending(f'{kind.lower()} "{what}" not found')
    data = object_data(kind, obj)
    items = src.get("items")
    if not items:
        return {k: (v, default_mode) for k, v in data.items()}
    out: dict[str, tuple[bytes, int]] = {}
    for it in items:
        key = it.get("key", "")
        if key not in data:
            if src.get("optional"):
                continue
            raise VolumePending(f"configmap references non-existent config key: {key}" if kind == "ConfigMap"
                                else f"references non-existent secret key: {key}")
        out[it.get("path", key)] = (data[key], int(it.get("mode", default_mode)))
    return out


def _downward(pod: Mapping[str, Any], items: list[Mapping[str, Any]], default_mode: int, host_ips: tuple[str, ...],
              pod_ips: tuple[str, ...]) -> dict[str, tuple[bytes, int]]:
    out: dict[str, tuple[bytes, int]] = {}
    for it in items:
        try:
            if "fieldRef" in it:
                v = field_value(pod, it["fieldRef"].get("fieldPath", ""), host_ips, pod_ips)
            else:
                v = resource_value(pod, it.get("resourceFieldRef") or {}, None)
        except ConfigError as e:
            raise VolumePending(str(e)) from e
        out[it.get("path", "")] = (v.encode(), int(it.get("mode", default_mode)))
    return out


def placeholder_token(ns: str, sa: str, audience: list[str], seconds: int, pod: Mapping[str, Any]) -> str:
    """An unsigned JWT (``alg: none``) with the claims a projected token carries; used only when the
    API server has no TokenRequest endpoint, so a workload still finds a token file."""
    now = int(time.time())
    meta = pod.get("metadata") or {}
    claims = {"iss": "https://kubernetes.default.svc", "sub": f"system:serviceaccount:{ns}:{sa}", "aud": audience,
              "iat": now, "nbf": now, "exp": now + seconds,
              "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa},
                                "pod": {"name": meta.get("name", ""), "uid": meta.get("uid", "")}}}

    def b64(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


#: Projected tokens already fetched: (pod uid, audience, expirationSeconds) -> (token, renew after).
TokenCache = dict[tuple[str, str, int], tuple[str, float]]


async def _token(api: Api, pod: Mapping[str, Any], src: Mapping[str, Any], cache: TokenCache | None = None) -> str:
    """The token for a ``serviceAccountToken`` projection: from ``cache`` until 80 % of its
    lifetime has passed (upstream's token manager renews then), else a new TokenRequest."""
    meta = pod.get("metadata") or {}
    key = (str(meta.get("uid", "")), str(src.get("audience") or ""), int(src.get("expirationSeconds") or 3600))
    if cache is not None and key in cache and time.time() < cache[key][1]:
        return cache[key][0]
    token = await _request_token(api, pod, src)
    if cache is not None:
        cache[key] = (token, time.time() + 0.8 * key[2])
    return token


async def _request_token(api: Api, pod: Mapping[str, Any], src: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    ns = meta.get("namespace", "default")
    sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    seconds = int(src.get("expirationSeconds") or 3600)
    aud = [src["audience"]] if src.get("audience") else []
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": aud, "expirationSeconds": seconds,
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta.get("name", ""),
                                        "uid": meta.get("uid", "")}}}
    code, resp = await api.post(f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token", body)
    if code in (200, 201) and (resp.get("status") or {}).get("token"):
        return str(resp["status"]["token"])
    if code == 404 and (resp.get("details") or {}).get("kind") == "serviceaccounts":
        raise VolumePending(f'serviceaccounts "{sa}" not found')
    if code == 404:
        _log.warning("pod %s/%s: the API server has no TokenRequest endpoint (404); projecting an unsigned "
                     "placeholder token for service account %s", ns, meta.get("name"), sa)
        return placeholder_token(ns, sa, aud, seconds, pod)
    raise VolumePending(f"failed to fetch token: {code} {resp.get('message', '')}")


async def resolve(pod: Mapping[str, Any], api: Api, pod_dir: Path, host_ips: tuple[str, ...],
                  pod_ips: tuple[str, ...], tokens: TokenCache | None = None) -> list[Volume]:
    """Every volume of ``pod`` with its host path and content; raises :class:`VolumePending`.
    Called again periodically, it yields updated ConfigMap/Secret contents and renewed tokens."""
    ns = (pod.get("metadata") or {}).get("namespace", "default")
    cache: dict[tuple[str, str], dict[str, Any] | None] = {}

    async def obj(kind: str, name: str) -> dict[str, Any] | None:
        if (kind, name) not in cache:
            plural = "configmaps" if kind == "ConfigMap" else "secrets"
            cache[(kind, name)] = await api.get(f"/api/v1/namespaces/{ns}/{plural}/{name}")
        return cache[(kind, name)]

    out: list[Volume] = []
    for v in (pod.get("spec") or {}).get("volumes") or []:
        name = v.get("name", "")
        try:
            out.append(await _resolve_one(pod, api, pod_dir, host_ips, pod_ips, v, obj, tokens))
        except VolumePending as e:
            raise VolumePending(f'MountVolume.SetUp failed for volume "{name}" : {e}') from e
    return out


async def _resolve_one(pod: Mapping[str, Any], api: Api, pod_dir: Path, host_ips: tuple[str, ...],
                       pod_ips: tuple[str, ...],
                       v: Mapping[str, Any], obj: Any, tokens: TokenCache | None = None) -> Volume:
    name = v.get("name", "")
    ns = (pod.get("metadata") or {}).get("namespace", "default")
    if "emptyDir" in v:
        return Volume(name, "emptyDir", volume_dir(pod_dir, "emptyDir", name))
    if "configMap" in v or "secret" in v:
        kind, key = ("ConfigMap", "configMap") if "configMap" in v else ("Secret", "secret")
        src = v[key] or {}
        ref = src.get("name", "") if kind == "ConfigMap" else src.get("secretName", "")
        files = _items(kind, await obj(kind, ref), src, int(src.get("defaultMode", 0o644)), ref)
        return Volume(name, key, volume_dir(pod_dir, key, name), files=files)
    if "downwardAPI" in v:
        src = v["downwardAPI"] or {}
        files = _downward(pod, src.get("items") or [], int(src.get("defaultMode", 0o644)), host_ips, pod_ips)
        return Volume(name, "downwardAPI", volume_dir(pod_dir, "downwardAPI", name), files=files)
    if "projected" in v:
        src = v["projected"] or {}
        mode = int(src.get("defaultMode", 0o644))
        files = {}
        for s in src.get("sources") or []:
            if "serviceAccountToken" in s:
                t = s["serviceAccountToken"] or {}
                files[t.get("path", "token")] = ((await _token(api, pod, t, tokens)).encode(), mode)
            elif "configMap" in s or "secret" in s:
                kind, key = ("ConfigMap", "configMap") if "configMap" in s else ("Secret", "secret")
                ref = (s[key] or {}).get("name", "")
                files.update(_items(kind, await obj(kind, ref), s[key] or {}, mode, ref))
            elif "downwardAPI" in s:
                files.update(_downward(pod, (s["downwardAPI"] or {}).get("items") or [], mode, host_ips, pod_ips))
        return Volume(name, "projected", volume_dir(pod_dir, "projected", name), files=files)
    if "persistentVolumeClaim" in v:
        src = v["persistentVolumeClaim"] or {}
        claim = src.get("claimName", "")
        pvc = await api.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}")
        if pvc is None:
            raise VolumePending(f'persistentvolumeclaim "{claim}" not found')
        pv_name = (pvc.get("spec") or {}).get("volumeName")
        if not pv_name or (pvc.get("status") or {}).get("phase") != "Bound":
            raise VolumePending(f'persistentvolumeclaim "{claim}" is not bound')
        pv = await api.get(f"/api/v1/persistentvolumes/{pv_name}")
        if pv is None:
            raise VolumePending(f'persistentvolume "{pv_name}" not found')
        spec = pv.get("spec") or {}
        path = (spec.get("local") or {}).get("path") or (spec.get("hostPath") or {}).get("path")
        if not path:
            raise VolumePending(f"persistentvolume {pv_name} has neither spec.local.path nor spec.hostPath.path "
                                "(the lab runtime mounts only directory-backed volumes)")
        return Volume(name, "persistentVolumeClaim", Path(path), host_type="Directory",
                      read_only=bool(src.get("readOnly")), extra={"pv": pv_name})
    if "hostPath" in v:
        src = v["hostPath"] or {}
        return Volume(name, "hostPath", Path(src.get("path", "")), host_type=src.get("type", "") or "")
    raise VolumePending("the lab runtime does not support this volume type (supported: emptyDir, configMap, "
                        "secret, downwardAPI, projected, persistentVolumeClaim, hostPath)")


def check_host_type(path: Path, kind: str) -> None:
    """Upstream ``hostPath`` type checks (``checkType``), creating for the ``...OrCreate`` kinds."""
    if kind == "DirectoryOrCreate" and not path.exists():
        path.mkdir(mode=0o755, parents=True)
    elif kind == "FileOrCreate" and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o644)
    if kind in ("", None):
        return
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VolumePending(f"hostPath type check failed: {path} is not a "
                            f"{'directory' if 'Directory' in kind else kind.lower()}") from None
    checks = {"Directory": stat.S_ISDIR, "DirectoryOrCreate": stat.S_ISDIR, "File": stat.S_ISREG,
              "FileOrCreate": stat.S_ISREG, "Socket": stat.S_ISSOCK, "CharDevice": stat.S_ISCHR,
              "BlockDevice": stat.S_ISBLK}
    names = {"Directory": "directory", "DirectoryOrCreate": "directory", "File": "file", "FileOrCreate": "file",
             "Socket": "socket", "CharDevice": "character device", "BlockDevice": "block device"}
    check = checks.get(kind)
    if check is None:
        raise VolumePending(f"hostPath type {kind!r} is not one of {', '.join(checks)}")
    if not check(st.st_mode):
        raise VolumePending(f"hostPath type check failed: {path} is not a {names[kind]}")


def write_files(target: Path, files: Mapping[str, tuple[bytes, int]]) -> None:
    """Upstream ``AtomicWriter``: the payload goes to a fresh ``..<timestamp>`` directory, ``..data``
    is swapped to it with a rename (readers see the old or the new set, never half), the user-visible
    names are symlinks through ``..data``, and the previous payload directory is removed.

    Every pod writes at least one such volume (``kube-api-access-*``) before its containers start,
    so the first write of a volume does only what a fresh directory needs: no look for an old
    payload, stale names or a leftover ``..data_tmp``, and ``..data`` made in place (nothing can
    read the directory yet). On a disk file system every file, directory or symlink created
    costs far more than the rest, and a projected volume of three files needs nine of them."""
    fresh = _make_dir(target)
    data_link = target / "..data"
    with_old = None if fresh else (os.readlink(data_link) if data_link.is_symlink() else None)
    if with_old is not None and _same(target / with_old, files):
        return
    ts = f"..{time.strftime('%Y_%m_%d_%H_%M_%S', time.gmtime())}.{time.monotonic_ns() % 10**9:09d}"
    os.mkdir(target / ts, 0o755)
    for rel, (content, mode) in files.items():
        p = target / ts / rel
        if "/" in rel:
            p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, content) if len(content) < 65536 else _write_all(fd, content)
            os.fchmod(fd, mode & 0o777)  # exactly the mode asked for, whatever the umask
        finally:
            os.close(fd)
    if fresh:  # nobody can be reading a directory made just now: ``..data`` is simply created
        os.symlink(ts, data_link)
    else:
        tmp = target / "..data_tmp"
        with _suppress_missing():
            tmp.unlink()
        os.symlink(ts, tmp)
        os.rename(tmp, data_link)
    tops = {rel.split("/", 1)[0] for rel in files}
    for top in tops:
        link = target / top
        if fresh or not link.is_symlink():
            os.symlink(f"..data/{top}", link)
    if not fresh:
        for entry in target.iterdir():
            if entry.name.startswith(".."):
                continue
            if entry.name not in tops:
                entry.unlink()
    if with_old is not None:
        shutil.rmtree(target / with_old, ignore_errors=True)


def _make_dir(target: Path) -> bool:
    """Create ``target`` (and its parents); whether it is new (False: it was there already)."""
    try:
        os.mkdir(target, 0o777)
    except FileExistsError:
        return False
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(target, 0o777)
        except FileExistsError:
            return False
    return True


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view):]


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, *_: object) -> bool:
        return et is FileNotFoundError


def _same(old: Path, files: Mapping[str, tuple[bytes, int]]) -> bool:
    try:
        existing = {str(p.relative_to(old)) for p in old.rglob("*") if p.is_file()}
        if existing != set(files):
            return False
        return all((old / rel).read_bytes() == c and (old / rel).stat().st_mode & 0o777 == m & 0o777
                   for rel, (c, m) in files.items())
    except OSError:
        return False


def apply(volumes: list[Volume]) -> None:
    """Make every volume exist on the host (blocking: call from a thread)."""
    for v in volumes:
        if v.kind == "emptyDir":
            v.path.mkdir(parents=True, exist_ok=True)
            v.path.chmod(0o777)  # upstream emptyDir is world-writable
        elif v.files is not None:
            write_files(v.path, v.files)
        elif v.kind in ("hostPath", "persistentVolumeClaim"):
            check_host_type(v.path, v.host_type)


@dataclass(frozen=True)
class Mount:
    """A bind mount the shim makes inside the container's mount namespace."""

    source: str
    target: str
    read_only: bool

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "readOnly": self.read_only}


def container_mounts(container: Mapping[str, Any], volumes: list[Volume]) -> list[Mount]:
    """The container's ``volumeMounts`` as bind mounts (``subPath`` below the volume, created if absent)."""
    by_name = {v.name: v for v in volumes}
    out: list[Mount] = []
    for m in container.get("volumeMounts") or []:
        v = by_name.get(m.get("name", ""))
        if v is None:
            raise VolumePending(f'volumeMount "{m.get("name")}" of container "{container.get("name")}" names no volume')
        source = v.path
        sub = m.get("subPath") or ""
        if sub:
            if sub.startswith("/") or ".." in Path(sub).parts:
                raise VolumePending(f"subPath {sub!r} must be a relative path within the volume")
            source = v.path / sub
            if not source.exists() and v.files is None:
                source.mkdir(parents=True, exist_ok=True)
        ro = bool(m.get("readOnly")) or v.read_only or v.kind in _ALWAYS_RO
        out.append(Mount(str(source), str(m.get("mountPath", "")), ro))
    return out
