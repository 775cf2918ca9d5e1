"""The runtime's pure parts: env resolution and $(VAR) expansion, volume plans and the atomic
writer, restart back-off, probe thresholds, pod status from container states."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
from typing import Any

import pytest

from kubeemu.runtime import env as envmod
from kubeemu.runtime import volumes
from kubeemu.runtime.backoff import Backoff
from kubeemu.runtime.probes import ProbeWorker

POD: dict[str, Any] = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "web", "tier": "x"},
                 "annotations": {"a": "1"}},
    "spec": {"nodeName": "n1", "serviceAccountName": "sa",
             "containers": [{"name": "c", "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}}}]},
}
CM = {"data": {"k": "v", "bad-name!": "x", "n": "1"}}
SEC = {"data": {"pw": base64.b64encode(b"s3").decode()}}


def test_expand_like_upstream() -> None:
    env = {"A": "1", "B": "two"}
    assert envmod.expand("$(A)-$(B)", env) == "1-two"
    assert envmod.expand("$(MISSING)", env) == "$(MISSING)"
    assert envmod.expand("$$(A)", env) == "$(A)"
    assert envmod.expand("cost $5 $(A", env) == "cost $5 $(A"


def test_build_env_order_sources_and_errors() -> None:
    c = {"name": "c",
         "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "P_"},
                     {"secretRef": {"name": "nope", "optional": True}}],
         "env": [{"name": "X", "value": "$(P_k)/$(Y)"}, {"name": "Y", "value": "y"},
                 {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "pw"}}},
                 {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "gone", "optional": True}}},
                 {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                 {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                 {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                 {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                 {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                 {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}}]}
    objs = {("ConfigMap", "cm"): CM, ("Secret", "sec"): SEC, ("Secret", "nope"): None}
    env = envmod.build_env(POD, c, objs, ("198.18.0.1",), ("10.0.0.5",))
    assert env["P_k"] == "v" and "P_bad-name!" not in env
    assert env["X"] == "v/$(Y)"  # only what is defined before it expands
    assert (env["PW"], env["NAME"], env["APP"], env["SA"], env["IP"], env["HOST"], env["MEM"]) == \
        ("s3", "p", "web", "sa", "10.0.0.5", "198.18.0.1", "64")
    assert "OPT" not in env
    with pytest.raises(envmod.ConfigError, match='configmap "cm2" not found'):
        envmod.build_env(POD, {"envFrom": [{"configMapRef": {"name": "cm2"}}]}, {("ConfigMap", "cm2"): None}, (), ())
    with pytest.raises(envmod.ConfigError, match="couldn't find key gone in ConfigMap ns/cm"):
        envmod.build_env(POD, {"env": [{"name": "G", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "gone"}}}]},
                         objs, (), ())


def test_dual_stack_downward_api_is_primary_first_as_upstream() -> None:
    """``status.podIP`` / ``status.hostIP`` are the primaries; the plural fields join every
    address, primary first, with commas (upstream podFieldSelectorRuntimeValue)."""
    fields = ("status.podIP", "status.podIPs", "status.hostIP", "status.hostIPs")
    c = {"env": [{"name": f.replace(".", "_"), "valueFrom": {"fieldRef": {"fieldPath": f}}} for f in fields]}
    env = envmod.build_env(POD, c, {}, ("fd00:198:18::11", "198.18.0.11"), ("fd00:10:40::3", "10.40.0.3"))
    assert [env[f.replace(".", "_")] for f in fields] == [
        "fd00:10:40::3", "fd00:10:40::3,10.40.0.3", "fd00:198:18::11", "fd00:198:18::11,198.18.0.11"]


def test_command_line() -> None:
    assert envmod.command_line({"command": ["echo", "$(A)"], "args": ["$(B)", "$$(A)"]}, {"A": "1", "B": "2"}) == \
        ["echo", "1", "2", "$(A)"]
    assert envmod.command_line({}, {}) == envmod.IDLE
    assert envmod.command_line({"args": ["python3", "-V"]}, {}) == ["python3", "-V"]
    assert envmod.field_value(POD, "metadata.labels") == 'app="web"\ntier="x"'


class FakeApi:
    def __init__(self, objects: dict[str, dict[str, Any]], token_code: int = 201) -> None:
        self.objects = objects
        self.token_code = token_code
        self.posted: list[tuple[str, dict[str, Any]]] = []

    async def get(self, path: str) -> dict[str, Any] | None:
        return self.objects.get(path)

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.posted.append((path, body))
        if self.token_code == 201:
            return 201, {"status": {"token": "signed.jwt.token"}}
        return 404, {"kind": "Status", "code": 404, "details": {}}


def _pod_with(vols: list[dict[str, Any]]) -> dict[str, Any]:
    return {**POD, "spec": {**POD["spec"], "volumes": vols}}


def test_volumes_resolve_and_write(tmp_path: pathlib.Path) -> None:
    api = FakeApi({"/api/v1/namespaces/ns/configmaps/cm": CM, "/api/v1/namespaces/ns/secrets/sec": SEC})
    vols = [{"name": "e", "emptyDir": {}},
            {"name": "c", "configMap": {"name": "cm", "items": [{"key": "k", "path": "sub/kk", "mode": 0o600}],
                                        "defaultMode": 0o640}},
            {"name": "s", "secret": {"secretName": "sec"}},
            {"name": "o", "configMap": {"name": "absent", "optional": True}},
            {"name": "d", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
            {"name": "pr", "projected": {"sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 600, "audience": "api"}},
                {"configMap": {"name": "cm", "items": [{"key": "n", "path": "n"}]}},
                {"downwardAPI": {"items": [{"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}]
    got = asyncio.run(volumes.resolve(_pod_with(vols), api, tmp_path, ("h",), ("10.0.0.5",)))
    volumes.apply(got)
    root = tmp_path / "volumes"
    assert (root / "kubernetes.io~empty-dir" / "e").is_dir()
    kk = root / "kubernetes.io~configmap" / "c" / "sub" / "kk"
    assert kk.read_text() == "v" and os.stat(kk).st_mode & 0o777 == 0o600
    assert os.readlink(root / "kubernetes.io~configmap" / "c" / "sub") == "..data/sub"
    assert (root / "kubernetes.io~secret" / "s" / "pw").read_bytes() == b"s3"
    assert [e for e in (root / "kubernetes.io~configmap" / "o").iterdir() if not e.name.startswith("..")] == []
    assert (root / "kubernetes.io~downward-api" / "d" / "labels").read_text() == 'app="web"\ntier="x"'
    pr = root / "kubernetes.io~projected" / "pr"
    assert (pr / "token").read_text() == "signed.jwt.token" and (pr / "n").read_text() == "1"
    assert (pr / "ns").read_text() == "ns"
    path, body = api.posted[0]
    assert path == "/api/v1/namespaces/ns/serviceaccounts/sa/token"
    assert body["spec"]["audiences"] == ["api"] and body["spec"]["boundObjectRef"]["uid"] == "u-1"
    # An update swaps ..data atomically and drops keys that went away.
    cmdir = root / "kubernetes.io~secret" / "s"
    before = os.readlink(cmdir / "..data")
    volumes.write_files(cmdir, {"other": (b"o", 0o644)})
    assert os.readlink(cmdir / "..data") != before and not (cmdir / "pw").exists()
    assert (cmdir / "other").read_text() == "o" and not (cmdir / before).exists()
    # Mounts: configMap/secret/projected always read-only; readOnly honoured; subPath.
    ms = volumes.container_mounts({"name": "c", "volumeMounts": [
        {"name": "e", "mountPath": "/e", "subPath": "x"}, {"name": "c", "mountPath": "/c"},
        {"name": "e", "mountPath": "/ro", "readOnly": True}]}, got)
    assert [(m.target, m.read_only) for m in ms] == [("/e", False), ("/c", True), ("/ro", True)]
    assert ms[0].source.endswith("empty-dir/e/x")


def test_volumes_pending_and_placeholder_token(tmp_path: pathlib.Path) -> None:
    api = FakeApi({}, token_code=404)
    with pytest.raises(volumes.VolumePending, match=r'MountVolume\.SetUp failed for volume "c" : configmap "cm" not'):
        asyncio.run(volumes.resolve(_pod_with([{"name": "c", "configMap": {"name": "cm"}}]), api, tmp_path, (), ()))
    pvc = {"name": "data", "persistentVolumeClaim": {"claimName": "claim"}}
    with pytest.raises(volumes.VolumePending, match='persistentvolumeclaim "claim" not found'):
        asyncio.run(volumes.resolve(_pod_with([pvc]), api, tmp_path, (), ()))
    api.objects["/api/v1/namespaces/ns/persistentvolumeclaims/claim"] = {"spec": {}, "status": {"phase": "Pending"}}
    with pytest.raises(volumes.VolumePending, match='persistentvolumeclaim "claim" is not bound'):
        asyncio.run(volumes.resolve(_pod_with([pvc]), api, tmp_path, (), ()))
    api.objects["/api/v1/namespaces/ns/persistentvolumeclaims/claim"] = {"spec": {"volumeName": "pv1"},
                                                                          "status": {"phase": "Bound"}}
    api.objects["/api/v1/persistentvolumes/pv1"] = {"spec": {"local": {"path": str(tmp_path / "pvdir")}}}
    (tmp_path / "pvdir").mkdir()
    got = asyncio.run(volumes.resolve(_pod_with([pvc]), api, tmp_path, (), ()))
    assert got[0].path == tmp_path / "pvdir"
    tok = asyncio.run(volumes.resolve(_pod_with([{"name": "t", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token"}}]}}]), api, tmp_path, (), ()))[0].files
    assert tok is not None
    _header, claims, sig = tok["token"][0].decode().split(".")
    body = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    assert sig == "" and body["sub"] == "system:serviceaccount:ns:sa"


def test_host_path_type_checks(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    volumes.check_host_type(f, "File")
    with pytest.raises(volumes.VolumePending, match=f"hostPath type check failed: {f} is not a directory"):
        volumes.check_host_type(f, "Directory")
    with pytest.raises(volumes.VolumePending, match="is not a directory"):
        volumes.check_host_type(tmp_path / "missing", "Directory")
    volumes.check_host_type(tmp_path / "made" / "dir", "DirectoryOrCreate")
    assert (tmp_path / "made" / "dir").is_dir()
    volumes.check_host_type(tmp_path / "new-file", "FileOrCreate")
    assert (tmp_path / "new-file").is_file()
    with pytest.raises(volumes.VolumePending, match="is not a socket"):
        volumes.check_host_type(f, "Socket")


def test_backoff_doubles_caps_and_resets() -> None:
    b = Backoff()
    assert not b.is_in_backoff_since("k", event_time=100.0, now=100.0)  # first restart: immediate
    b.next("k", 100.0)
    assert b.get("k") == 10.0
    assert b.is_in_backoff_since("k", event_time=105.0, now=110.0)
    assert not b.is_in_backoff_since("k", event_time=105.0, now=115.0)
    t = 115.0
    for want in (20, 40, 80, 160, 300, 300):
        b.next("k", t)
        assert b.get("k") == want
        t += want
    # Ten minutes (twice the maximum) without a restart: back to the first delay.
    b.next("k", t + 601)
    assert b.get("k") == 10.0


def test_probe_thresholds() -> None:
    pw = ProbeWorker("readiness", {"periodSeconds": 2, "initialDelaySeconds": 5, "successThreshold": 2,
                                   "failureThreshold": 2}, started=100.0)
    assert pw.result is None and not pw.due(104.0) and pw.due(105.0)
    pw.record(True, "", 105.0)
    assert pw.result is None and pw.next_due == 107.0
    pw.record(True, "", 107.0)
    assert pw.result is True
    pw.record(False, "x", 109.0)
    assert pw.result is True
    pw.record(False, "x", 111.0)
    assert pw.result is False
    assert ProbeWorker("liveness", {}, started=0.0).result is True  # alive until proven otherwise


def test_mount_targets_resolve_symlinks_inside_the_container_root(tmp_path: pathlib.Path) -> None:
    from kubeemu.runtime.shim import resolve_in_root

    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # absolute: must mean <root>/run, not the host's /run
    (root / "etc").mkdir()
    (root / "etc" / "up").symlink_to("../../../../outside")
    assert resolve_in_root(root, "/var/run/secrets/x") == root / "run" / "secrets" / "x"
    assert resolve_in_root(root, "/etc/up/y") == root / "outside" / "y"  # '..' stops at the root
    assert resolve_in_root(root, "/../../a") == root / "a"


def _worker(tmp_path: pathlib.Path, policy: str, init: bool = False) -> Any:
    from kubeemu.runtime.pods import PodInfo, PodWorker, Runtime

    spec: dict[str, Any] = {"restartPolicy": policy, "containers": [{"name": "a"}, {"name": "b"}]}
    if init:
        spec["initContainers"] = [{"name": "i"}]
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": spec, "status": {}}

    async def sink(_st: dict[str, Any]) -> None:
        return None

    rt = Runtime(tmp_path, FakeApi({}))
    w = PodWorker(rt, pod, PodInfo("ns", "p", "u", "n1", ("10.0.0.5",), ("198.18.0.1",), None), sink)
    w.volumes = []
    return w


def _set(w: Any, name: str, state: str, code: int = 0, done: bool = False) -> None:
    from kubeemu.runtime.pods import Attempt

    cs = w.containers[name]
    att = Attempt(0, pathlib.Path("/nonexistent"), pid=1, started_at="2026-01-01T00:00:00Z")
    if state == "exited":
        att.exit = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                    "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:00:01Z"}
    cs.current = att
    cs.done = done


@pytest.mark.parametrize(("policy", "a", "b", "phase"), [
    ("Always", ("running", 0, False), ("running", 0, False), "Running"),
    ("Always", ("exited", 1, False), ("running", 0, False), "Running"),
    ("Never", ("exited", 0, True), ("exited", 0, True), "Succeeded"),
    ("Never", ("exited", 0, True), ("exited", 2, True), "Failed"),
    ("OnFailure", ("exited", 0, True), ("exited", 1, False), "Running"),
    ("OnFailure", ("exited", 0, True), ("exited", 0, True), "Succeeded"),
    ("Always", ("running", 0, False), ("waiting", 0, False), "Pending"),
])
def test_pod_phase_as_upstream_get_phase(tmp_path: pathlib.Path, policy: str, a: tuple[str, int, bool],
                                         b: tuple[str, int, bool], phase: str) -> None:
    w = _worker(tmp_path, policy)
    for name, (state, code, done) in (("a", a), ("b", b)):
        if state != "waiting":
            _set(w, name, state, code, done)
    st = w.status()
    assert st["phase"] == phase
    conds = {c["type"]: c for c in st["conditions"]}
    if phase in ("Succeeded", "Failed"):
        assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "PodCompleted"


def test_status_conditions_and_init_containers(tmp_path: pathlib.Path) -> None:
    w = _worker(tmp_path, "Always", init=True)
    st = w.status()
    assert st["phase"] == "Pending"
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Initialized"]["status"] == "False"
    assert conds["Initialized"]["message"] == "containers with incomplete status: [i]"
    assert [s["state"]["waiting"]["reason"] for s in st["containerStatuses"]] == ["PodInitializing"] * 2
    _set(w, "i", "exited", 0, done=True)
    _set(w, "a", "running")
    _set(w, "b", "running")
    st = w.status()
    conds = {c["type"]: c for c in st["conditions"]}
    assert st["phase"] == "Running" and conds["Initialized"]["status"] == "True"
    assert conds["Ready"]["status"] == "True" and conds["ContainersReady"]["status"] == "True"
    assert st["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert st["podIP"] == "10.0.0.5" and st["hostIP"] == "198.18.0.1" and st["qosClass"] == "BestEffort"
    # A crash-looping container: waiting CrashLoopBackOff, its exit as lastState, pod not Ready.
    _set(w, "b", "exited", 3)
    w.containers["b"].waiting = ("CrashLoopBackOff", "back-off 10s restarting failed container=b pod=p_ns(u)")
    st = w.status()
    b = st["containerStatuses"][1]
    assert b["state"]["waiting"]["reason"] == "CrashLoopBackOff" and b["lastState"]["terminated"]["exitCode"] == 3
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["message"] == "containers with unready status: [b]"
    assert st["phase"] == "Running"


def test_projected_tokens_are_reused_until_80_percent_of_their_life(tmp_path: pathlib.Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi({})
    vols = [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "token",
                                                                             "expirationSeconds": 1000}}]}}]
    cache: volumes.TokenCache = {}
    now = [1000.0]
    monkeypatch.setattr("kubeemu.runtime.volumes.time.time", lambda: now[0])
    for _ in range(2):
        asyncio.run(volumes.resolve(_pod_with(vols), api, tmp_path, (), (), cache))
    assert len(api.posted) == 1
    now[0] += 801  # past 80 % of 1000 s
    asyncio.run(volumes.resolve(_pod_with(vols), api, tmp_path, (), (), cache))
    assert len(api.posted) == 2


def test_cri_log_lines() -> None:
    import io
    import re

    from kubeemu.runtime import shim

    long = b"x" * (shim.MAX_LINE + 5)
    data = b"one\n\n" + long + b"\nlast"
    # However the pipe delivers the bytes (all at once, in pieces, byte by byte near the cut),
    # the entries are the same, and another stream's bytes in between change nothing.
    for sizes in ([len(data)], [2, 3, 7000, 9000, len(data)], [1] * len(data)):
        out = io.BytesIO()
        log = shim._Log(out)
        pos = 0
        for n in sizes:
            if pos < len(data):
                log.feed("stdout", data[pos:pos + n])
                log.feed("stderr", b"")
                pos += n
        log.feed("stdout", b"", eof=True)
        lines = out.getvalue().split(b"\n")[:-1]
        parsed = [ln.split(b" ", 3) for ln in lines]
        assert all(re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", p[0]) for p in parsed)
        assert [(p[1], p[2], len(p[3])) for p in parsed] == [
            (b"stdout", b"F", 3), (b"stdout", b"F", 0), (b"stdout", b"P", shim.MAX_LINE), (b"stdout", b"F", 5),
            (b"stdout", b"F", 4)], sizes
    out = io.BytesIO()
    log = shim._Log(out)
    log.feed("stdout", b"x" * (shim.MAX_LINE - 1) + b"\n" + b"y" * shim.MAX_LINE + b"\n", eof=True)
    assert [ln.split(b" ", 3)[2] for ln in out.getvalue().split(b"\n")[:-1]] == [b"F", b"P", b"F"]
