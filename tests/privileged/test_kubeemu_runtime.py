"""The lab kubelet's process runtime on a real kernel: containers as processes in a pod's namespaces.

Each test starts a kubeemu API server (in a thread), a throwaway network namespace per pod (lo
up with the pod IP on it: enough for probes against the pod IP), and a :class:`LabKubelet` with a
runtime rooted in a temp dir. Everything is removed afterwards: pods are deleted through the API
(the kubelet kills their processes), the kubelet's leftovers are killed by recorded PID + start
time, and the namespaces are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("aiohttp")

from kubeemu.ctrl.rootca import self_signed_ca
from kubeemu.kubelet import LabKubelet, LabNode
from kubeemu.runner import ServerThread
from kubeemu.runtime import procs, spawner
from kubeemu.runtime.pods import Runtime
from tests.waiting import wait_until

NODE_IP = "198.18.0.11"


class NetnsNetwork:
    """``PodNetwork`` with one bare namespace per pod: ``lo`` up, the pod's IPs (one per family) on ``lo``."""

    def __init__(self) -> None:
        self.prefix = f"kt{uuid.uuid4().hex[:6]}"
        self.live: dict[str, str] = {}

    def name(self, pod_key: str) -> str:
        return f"{self.prefix}-{pod_key.replace('/', '-')}"[:60]

    def create(self, node: str, pod_key: str, ips: tuple[str, ...]) -> str:
        ns = self.name(pod_key)
        if not pathlib.Path(f"/run/netns/{ns}").exists():
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            for ip in ips:
                host = "/128 nodad" if ":" in ip else "/32"
                subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}{host.split()[0]}", "dev", "lo",
                                *host.split()[1:]], check=True)
        self.live[pod_key] = ns
        return ns

    def node_netns(self, node: str) -> str:
        """The node's own namespace (hostNetwork pods), made on first use with the node IP on lo."""
        ns = f"{self.prefix}-node-{node}"
        if not pathlib.Path(f"/run/netns/{ns}").exists():
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{NODE_IP}/32", "dev", "lo"], check=True)
        return ns

    def delete(self, node: str, pod_key: str, ips: tuple[str, ...]) -> None:
        ns = self.live.pop(pod_key, self.name(pod_key))
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def cleanup(self) -> None:
        for ns in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
            if ns.startswith(self.prefix):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _http(url: str, method: str = "GET", body: Any = None, ctype: str = "application/json") -> Any:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


class LoopThread:
    """A coroutine on its own event loop in a thread (the kubelet, a DNS responder: they run beside
    the test's blocking HTTP calls); ``stop`` cancels it and closes the loop."""

    def __init__(self, coro: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(coro)
        self.thread = threading.Thread(target=self._drive, daemon=True)
        self.thread.start()

    def _drive(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self.task)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        self.loop.close()


class KubeletThread(LoopThread):
    """A LabKubelet on its own event loop in a thread; ``stop`` cancels it (containers keep running)."""

    def __init__(self, url: str, root: pathlib.Path, net: NetnsNetwork, resources: dict[str, Any] | None = None):
        self.kubelet = LabKubelet(url, [LabNode("n1", NODE_IP, ("10.77.1.0/24",), resources=resources or {})], net,
                                  renew_interval=1.0, root=root, poll=0.2)
        super().__init__(self.kubelet.run())


@pytest.fixture
def env(tmp_path: pathlib.Path) -> Iterator[dict[str, Any]]:
    net = NetnsNetwork()
    root = tmp_path / "kubelet"
    with ServerThread(name="rt", graceful_pods=True) as srv:
        state: dict[str, Any] = {"url": srv.url, "root": root, "net": net, "kubelets": []}
        # What the controller-manager's root-ca-cert-publisher does (the token volume needs it).
        _http(f"{srv.url}/api/v1/namespaces/default/configmaps", "POST",
              {"metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": self_signed_ca("rt")}})

        def start(resources: dict[str, Any] | None = None) -> KubeletThread:
            k = KubeletThread(srv.url, root, net, resources)
            state["kubelets"].append(k)
            return k

        state["start"] = start
        try:
            yield state
        finally:
            for k in state["kubelets"]:
                with contextlib.suppress(Exception):
                    k.stop()
            Runtime(root, None).kill_recorded_all()  # type: ignore[arg-type]
            net.cleanup()


def _pod(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": "n1", "containers": containers, "terminationGracePeriodSeconds": 2, **spec}}


def _get(url: str, name: str) -> dict[str, Any]:
    return dict(_http(f"{url}/api/v1/namespaces/default/pods/{name}"))


def _cstatus(url: str, name: str, container: str = "c") -> dict[str, Any]:
    for s in (_get(url, name).get("status") or {}).get("containerStatuses") or []:
        if s["name"] == container:
            return dict(s)
    return {}


def _events(url: str, pod: str) -> list[tuple[str, str, str]]:
    items = _http(f"{url}/api/v1/namespaces/default/events")["items"]
    return [(e["type"], e["reason"], e["message"]) for e in items if e["involvedObject"]["name"] == pod]


def _running_pid(rt: Runtime, name: str, container: str = "c") -> int:
    w = rt._find("default", name)
    cs = w.containers[container] if w else None
    return cs.current.pid if cs and cs.current and cs.current.running else 0


def _exec(rt: Runtime, name: str, cmd: list[str], container: str = "c") -> str:
    argv = rt.exec_argv("default", name, container, cmd)
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout


def test_container_runs_in_pod_namespaces_with_volumes_env_and_hostname(env: dict[str, Any]) -> None:
    url = env["url"]
    _http(f"{url}/api/v1/namespaces/default/configmaps", "POST",
          {"metadata": {"name": "cfg"}, "data": {"greeting": "hello", "k2": "v2"}})
    _http(f"{url}/api/v1/namespaces/default/secrets", "POST",
          {"metadata": {"name": "sec"}, "data": {"pw": "czNjcjN0"}})  # s3cr3t
    hostdir = env["root"].parent / "host"
    hostdir.mkdir()
    (hostdir / "data.txt").write_text("from host\n")
    k = env["start"]()
    pod = _pod("web", [{
        "name": "c", "image": "python:3",
        "command": ["sh", "-c", "echo started $(GREETING) as $POD; echo oops >&2; exec sleep 300"],
        "env": [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "pw"}}}],
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "workingDir": "/work-dir",
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "scratch", "mountPath": "/scratch"},
                         {"name": "host", "mountPath": "/host", "readOnly": True},
                         {"name": "info", "mountPath": "/etc/podinfo"}],
    }], volumes=[{"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "greeting", "path": "g.txt"}]}},
                 {"name": "scratch", "emptyDir": {}},
                 {"name": "host", "hostPath": {"path": str(hostdir), "type": "Directory"}},
                 {"name": "info", "downwardAPI": {"items": [{"path": "name",
                                                             "fieldRef": {"fieldPath": "metadata.name"}}]}}])
    _http(f"{url}/api/v1/namespaces/default/pods", "POST", pod)
    st = wait_until(lambda: (s := _cstatus(url, "web")).get("state", {}).get("running") and s, 20, "web running")
    assert st["restartCount"] == 0 and st["ready"] is True
    got = _get(url, "web")
    assert got["status"]["phase"] == "Running"
    assert {c["type"]: c["status"] for c in got["status"]["conditions"]}["Ready"] == "True"
    rt: Runtime = k.kubelet.runtime
    pid = _running_pid(rt, "web")
    # Network namespace: the pod's; mount and UTS namespaces: its own.
    ns = env["net"].live["default/web"]
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
    assert os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
    assert os.stat(f"/proc/{pid}/ns/uts").st_ino != os.stat("/proc/self/ns/uts").st_ino
    # The container's mount namespace holds no copy of the host's /run/netns entries (they would keep
    # other pods' network namespaces alive) and no host /run at all.
    mounts = pathlib.Path(f"/proc/{pid}/mountinfo").read_text()
    assert [ln for ln in mounts.splitlines() if " nsfs " in ln or "/run/netns" in ln] == []
    assert _exec(rt, "web", ["cat", "/etc/hostname"]).strip() == "web"
    assert _exec(rt, "web", ["hostname"]).strip() == "web"
    assert _exec(rt, "web", ["cat", "/etc/cfg/g.txt"]) == "hello"
    assert _exec(rt, "web", ["cat", "/etc/podinfo/name"]) == "web"
    assert _exec(rt, "web", ["cat", "/host/data.txt"]) == "from host\n"
    assert _exec(rt, "web", ["pwd"]).strip() == "/work-dir"
    environ = _exec(rt, "web", ["env"])
    assert "PW=s3cr3t" in environ and "CFG_k2=v2" in environ and "GREETING=hello" in environ
    assert "10.77.1.2" in _exec(rt, "web", ["ip", "-4", "addr", "show", "lo"])
    # read-only honoured, emptyDir writable and shared with the host-side volume dir
    ro = subprocess.run(rt.exec_argv("default", "web", "c", ["touch", "/host/x"]), capture_output=True, text=True)
    assert ro.returncode != 0 and "Read-only" in ro.stderr
    _exec(rt, "web", ["sh", "-c", "echo w > /scratch/f"])
    uid = got["metadata"]["uid"]
    assert (env["root"] / "pods" / uid / "volumes" / "kubernetes.io~empty-dir" / "scratch" / "f").read_text() == "w\n"
    assert not pathlib.Path("/work-dir").exists() and not pathlib.Path("/etc/cfg").exists()  # host untouched
    # The log: CRI format, both streams, $(VAR) expanded in the command.
    log = rt.log_path("default", "web", "c", previous=False)
    assert log == env["root"] / "pods" / f"default_web_{uid}" / "c" / "0.log"
    lines = wait_until(lambda: len(x := log.read_text().splitlines()) >= 2 and x, 5, "two log lines")
    streams = {ln.split(" ", 3)[1]: ln.split(" ", 3)[3] for ln in lines}
    assert streams == {"stdout": "started hello as web", "stderr": "oops"}
    assert all(ln.split(" ")[2] == "F" and ln.split(" ")[0].endswith("Z") for ln in lines)
    with pytest.raises(LookupError, match='previous terminated container "c" in pod "web" not found'):
        rt.log_path("default", "web", "c", previous=True)
    # Deletion: the process is killed (SIGTERM), the pod goes, its directories too.
    start = procs.start_time(pid)
    _http(f"{url}/api/v1/namespaces/default/pods/web", "DELETE")
    wait_until(lambda: _get(url, "web").get("code") == 404, 20, "web deleted")
    assert not procs.same(pid, start)
    assert not (env["root"] / "pods" / uid).exists()
    assert "default/web" not in env["net"].live


def test_restart_backoff_exit_codes_and_previous_log(env: dict[str, Any]) -> None:
    url = env["url"]
    k = env["start"]()
    _http(f"{url}/api/v1/namespaces/default/pods", "POST",
          _pod("crash", [{"name": "c", "image": "x", "command": ["sh", "-c", "echo attempt; exit 3"]}]))
    st = wait_until(lambda: (s := _cstatus(url, "crash")).get("restartCount", 0) >= 1
                    and s.get("state", {}).get("waiting", {}).get("reason") == "CrashLoopBackOff" and s, 40,
                    "crash restarted and backing off")
    assert "back-off" in st["state"]["waiting"]["message"]
    term = st["lastState"]["terminated"]
    assert term["exitCode"] == 3 and term["reason"] == "Error" and term["finishedAt"]
    assert _get(url, "crash")["status"]["phase"] == "Running"  # restartPolicy Always
    rt: Runtime = k.kubelet.runtime
    backoff = ("Warning", "BackOff", f"Back-off restarting failed container c in pod crash_default("
               f"{_get(url, 'crash')['metadata']['uid']})")
    wait_until(lambda: backoff in _events(url, "crash"), 10, "a BackOff event")
    assert ("Normal", "Started", "Started container c") in _events(url, "crash")
    prev = rt.log_path("default", "crash", "c", previous=True)
    assert prev.read_text().split(" ", 3)[3] == "attempt\n"
    # restartPolicy Never: exit 0 -> Succeeded; OnFailure with exit 1 -> restarted
    _http(f"{url}/api/v1/namespaces/default/pods", "POST",
          _pod("once", [{"name": "c", "image": "x", "command": ["true"]}], restartPolicy="Never"))
    wait_until(lambda: _get(url, "once")["status"].get("phase") == "Succeeded", 20, "once Succeeded")
    term = _cstatus(url, "once")["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    _http(f"{url}/api/v1/namespaces/default/pods", "POST",
          _pod("fail", [{"name": "c", "image": "x", "command": ["sh", "-c", "exit 7"]}], restartPolicy="Never"))
    wait_until(lambda: _get(url, "fail")["status"].get("phase") == "Failed", 20, "fail Failed")
    assert _cstatus(url, "fail")["state"]["terminated"]["exitCode"] == 7
    assert _cstatus(url, "fail")["restartCount"] == 0


def test_probes_drive_ready_and_liveness_restarts(env: dict[str, Any]) -> None:
    url = env["url"]
    env["start"]()
    web = {"name": "c", "image": "x", "command": ["python3", "-m", "http.server", "8080"],
           "workingDir": "/srv-x",
           "ports": [{"name": "http", "containerPort": 8080}],
           "readinessProbe": {"httpGet": {"path": "/ready.txt", "port": "http"}, "periodSeconds": 1,
                              "failureThreshold": 1}}
    _http(f"{url}/api/v1/namespaces/default/pods", "POST", _pod("probe", [web]))
    wait_until(lambda: _cstatus(url, "probe").get("state", {}).get("running"), 20, "probe running")
    cond = {c["type"]: c for c in _get(url, "probe")["status"]["conditions"]}
    assert cond["Ready"]["status"] == "False" and cond["Ready"]["reason"] == "ContainersNotReady"
    # The file appears inside the container: readiness turns True.
    rt: Runtime = env["kubelets"][0].kubelet.runtime
    _exec(rt, "probe", ["sh", "-c", "echo ok > /srv-x/ready.txt"])
    wait_until(lambda: _cstatus(url, "probe").get("ready") is True, 20, "probe ready")
    assert {c["type"]: c["status"] for c in _get(url, "probe")["status"]["conditions"]}["Ready"] == "True"
    _exec(rt, "probe", ["rm", "/srv-x/ready.txt"])
    wait_until(lambda: _cstatus(url, "probe").get("ready") is False, 20, "probe unready again")
    unhealthy = ("Warning", "Unhealthy", "Readiness probe failed: HTTP probe failed with statuscode: 404")
    wait_until(lambda: unhealthy in _events(url, "probe"), 10, "an Unhealthy event")
    # Liveness (tcpSocket on a port nobody listens on) restarts the container.
    live = {"name": "c", "image": "x", "command": ["sleep", "300"],
            "livenessProbe": {"tcpSocket": {"port": 9}, "periodSeconds": 1, "failureThreshold": 2}}
    _http(f"{url}/api/v1/namespaces/default/pods", "POST", _pod("live", [live]))
    st = wait_until(lambda: (s := _cstatus(url, "live")).get("restartCount", 0) >= 1 and s, 30, "live restarted")
    assert st["lastState"]["terminated"]["exitCode"] in (137, 143)
    # exec probe
    ex = {"name": "c", "image": "x", "command": ["sleep", "300"],
          "readinessProbe": {"exec": {"command": ["test", "-f", "/etc/hostname"]}, "periodSeconds": 1}}
    _http(f"{url}/api/v1/namespaces/default/pods", "POST", _pod("exprobe", [ex]))
    wait_until(lambda: _cstatus(url, "exprobe").get("ready") is True, 20, "exec probe ready")


def test_kubelet_restart_adopts_processes(env: dict[str, Any]) -> None:
    url = env["url"]
    k1 = env["start"]()
    _http(f"{url}/api/v1/namespaces/default/pods", "POST",
          _pod("keep", [{"name": "c", "image": "x", "command": ["sleep", "300"],
                         "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1}}]))
    _http(f"{url}/api/v1/namespaces/default/pods", "POST",
          _pod("crashy", [{"name": "c", "image": "x", "command": ["sh", "-c", "exit 1"]}]))
    wait_until(lambda: _cstatus(url, "keep").get("state", {}).get("running"), 20, "keep running")
    wait_until(lambda: _cstatus(url, "crashy").get("restartCount", 0) >= 1, 30, "crashy restarted")
    uid = _get(url, "keep")["metadata"]["uid"]
    pid = _running_pid(k1.kubelet.runtime, "keep")
    start = procs.start_time(pid)
    shim = json.loads(next((env["root"] / "pods" / uid / "containers" / "c").glob("*/shim.json")).read_text())
    spawner1 = spawner.recorded(env["root"])
    assert spawner1 is not None and procs.same(*spawner1)
    k1.stop()
    assert procs.same(pid, start)  # the container outlives its kubelet
    assert procs.same(shim["pid"], shim["start"])  # and so does its shim, started by the spawner
    assert not procs.same(*spawner1)  # which ended with its kubelet
    restarts = _cstatus(url, "crashy")["restartCount"]
    k2 = env["start"]()
    wait_until(lambda: _running_pid(k2.kubelet.runtime, "keep") == pid, 20, "keep adopted with the same PID")
    def probed_ready() -> bool:
        w = k2.kubelet.runtime._find("default", "keep")
        cur = w.containers["c"].current if w else None
        probe = cur.probes.get("readiness") if cur else None
        return probe is not None and probe.result is True

    wait_until(probed_ready, 20, "keep's readiness probed again by the new kubelet")
    wait_until(lambda: _cstatus(url, "keep").get("ready") is True, 10, "keep Ready")
    assert _get(url, "keep")["metadata"]["uid"] == uid
    time.sleep(0)  # nothing to wait for: the adoption above is the assertion
    assert len(list((env["root"] / "pods" / uid / "containers" / "c").glob("[0-9]*"))) == 1  # no second copy
    assert _cstatus(url, "crashy")["restartCount"] >= restarts  # kept across the restart
    # A pod deleted while no kubelet ran is cleaned up by the next one.
    k2.stop()
    _http(f"{url}/api/v1/namespaces/default/pods/keep", "DELETE", {"gracePeriodSeconds": 0})
    env["start"]()
    wait_until(lambda: not procs.same(pid, start), 20, "orphaned container killed")
    wait_until(lambda: not (env["root"] / "pods" / uid).exists(), 10, "orphan's directory removed")


def test_a_killed_spawner_is_started_again_and_its_shims_live_on(env: dict[str, Any]) -> None:
    url = env["url"]
    k = env["start"]()
    rt: Runtime = k.kubelet.runtime
    _http(f"{url}/api/v1/namespaces/default/pods", "POST",
          _pod("first", [{"name": "c", "image": "x", "command": ["sleep", "300"]}]))
    wait_until(lambda: _cstatus(url, "first").get("state", {}).get("running"), 20, "first running")
    pid = _running_pid(rt, "first")
    old = spawner.recorded(env["root"])
    assert old is not None and procs.same(*old)
    os.kill(old[0], signal.SIGKILL)
    assert procs.wait_gone(*old, 5.0)
    _http(f"{url}/api/v1/namespaces/default/pods", "POST",
          _pod("second", [{"name": "c", "image": "x", "command": ["sleep", "300"]}]))
    wait_until(lambda: _cstatus(url, "second").get("state", {}).get("running"), 20, "second running")
    new = spawner.recorded(env["root"])
    assert new is not None and new != old and procs.same(*new)
    assert _running_pid(rt, "first") == pid and _cstatus(url, "first")["restartCount"] == 0
    # The killed spawner was reaped by the kubelet when it started the next one: no zombie.
    assert not pathlib.Path(f"/proc/{old[0]}").exists() or procs.start_time(old[0]) != old[1]


def test_admission_rejects_what_does_not_fit(env: dict[str, Any]) -> None:
    url = env["url"]
    env["start"]({"cpu": "2", "pods": 2, "example.com/gpu": 1})
    node = wait_until(lambda: (n := _http(f"{url}/api/v1/nodes/n1")).get("kind") == "Node" and n, 10,
                      "node registered")
    assert node["status"]["capacity"]["cpu"] == "2" and node["status"]["allocatable"]["example.com/gpu"] == "1"
    assert node["status"]["capacity"]["memory"] == "8Gi"
    big = {"name": "c", "image": "x", "resources": {"requests": {"cpu": "1500m"}}}
    _http(f"{url}/api/v1/namespaces/default/pods", "POST", _pod("a", [big]))
    wait_until(lambda: _get(url, "a")["status"].get("phase") == "Running", 20, "a Running")
    _http(f"{url}/api/v1/namespaces/default/pods", "POST", _pod("b", [big]))
    st = wait_until(lambda: (p := _get(url, "b"))["status"].get("phase") == "Failed" and p["status"], 20, "b Failed")
    assert st["reason"] == "OutOfcpu"
    rejected = ("Warning", "OutOfcpu", "Node didn't have enough resource: cpu, requested: 1500, used: 1500, "
                "capacity: 2000")
    wait_until(lambda: rejected in _events(url, "b"), 10, "an OutOfcpu event")
    assert st["message"] == ("Pod was rejected: Node didn't have enough resource: cpu, requested: 1500, used: 1500, "
                             "capacity: 2000")
    small = {"name": "c", "image": "x"}
    _http(f"{url}/api/v1/namespaces/default/pods", "POST", _pod("c", [small]))
    wait_until(lambda: _get(url, "c")["status"].get("phase") == "Running", 20, "c Running")
    _http(f"{url}/api/v1/namespaces/default/pods", "POST", _pod("d", [small]))
    st = wait_until(lambda: (p := _get(url, "d"))["status"].get("phase") == "Failed" and p["status"], 20, "d Failed")
    assert st["reason"] == "OutOfpods"


def test_pvc_waits_until_bound_then_mounts_the_pv_and_init_containers_run_first(env: dict[str, Any]) -> None:
    url = env["url"]
    pvdir = env["root"].parent / "pv-data"
    pvdir.mkdir()
    host_run_secrets = pathlib.Path("/run/secrets").exists()  # /var/run -> /run on the host
    env["start"]()
    _http(f"{url}/api/v1/namespaces/default/persistentvolumeclaims", "POST",
          {"metadata": {"name": "claim"}, "spec": {"accessModes": ["ReadWriteOnce"],
                                                   "resources": {"requests": {"storage": "1Gi"}}}})
    sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    pod = _pod("db", [{"name": "c", "image": "x", "command": ["sh", "-c", "cat /data/init.txt; exec sleep 300"],
                       "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tok", "mountPath": sa_dir}]}],
               initContainers=[{"name": "init", "image": "x", "command": ["sh", "-c", "echo seeded > /data/init.txt"],
                                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
               volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "claim"}},
                        {"name": "tok", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}])
    _http(f"{url}/api/v1/namespaces/default/pods", "POST", pod)
    ev = wait_until(lambda: [e for e in _events(url, "db") if e[1] == "FailedMount"], 20, "db waiting on its PVC")
    assert ev[0] == ("Warning", "FailedMount", 'MountVolume.SetUp failed for volume "data" : persistentvolumeclaim '
                     '"claim" is not bound')
    assert _get(url, "db")["status"]["phase"] == "Pending"
    assert _cstatus(url, "db")["state"]["waiting"]["reason"] in ("ContainerCreating", "PodInitializing")
    _http(f"{url}/api/v1/persistentvolumes", "POST",
          {"metadata": {"name": "pv1"}, "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                                                 "local": {"path": str(pvdir)}}})
    _http(f"{url}/api/v1/namespaces/default/persistentvolumeclaims/claim", "PATCH", {"spec": {"volumeName": "pv1"}},
          "application/merge-patch+json")
    _http(f"{url}/api/v1/namespaces/default/persistentvolumeclaims/claim/status", "PATCH",
          {"status": {"phase": "Bound"}}, "application/merge-patch+json")
    wait_until(lambda: _cstatus(url, "db").get("state", {}).get("running"), 20, "db running")
    init = _get(url, "db")["status"]["initContainerStatuses"][0]
    assert init["state"]["terminated"]["exitCode"] == 0 and init["state"]["terminated"]["reason"] == "Completed"
    assert (pvdir / "init.txt").read_text() == "seeded\n"  # written by the init container into the PV
    rt: Runtime = env["kubelets"][0].kubelet.runtime
    log = rt.log_path("default", "db", "c", previous=False)
    wait_until(lambda: "seeded" in log.read_text(), 10, "app container read the init container's file")
    token = _exec(rt, "db", ["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"])
    assert token.count(".") == 2  # a JWT (TokenRequest, or the unsigned placeholder without that endpoint)
    assert pathlib.Path("/run/secrets").exists() == host_run_secrets  # the mount point was made in the container


def test_start_and_config_errors_are_reported_as_upstream(env: dict[str, Any]) -> None:
    url = env["url"]
    env["start"]()
    _http(f"{url}/api/v1/namespaces/default/pods", "POST",
          _pod("nocmd", [{"name": "c", "image": "x", "command": ["no-such-binary-kubeemu"]}], restartPolicy="Never"))
    wait_until(lambda: _get(url, "nocmd")["status"].get("phase") == "Failed", 20, "nocmd Failed")
    term = _cstatus(url, "nocmd")["state"]["terminated"]
    assert term["exitCode"] == 128 and term["reason"] == "StartError"
    assert 'exec: "no-such-binary-kubeemu": executable file not found in $PATH' in term["message"]
    cfg = {"name": "c", "image": "x", "command": ["sleep", "300"],
           "env": [{"name": "V", "valueFrom": {"configMapKeyRef": {"name": "later", "key": "k"}}}]}
    _http(f"{url}/api/v1/namespaces/default/pods", "POST", _pod("needscm", [cfg]))
    st = wait_until(lambda: (s := _cstatus(url, "needscm")).get("state", {}).get("waiting", {}).get("reason")
                    == "CreateContainerConfigError" and s, 20, "needscm waiting for its ConfigMap")
    assert st["state"]["waiting"]["message"] == 'configmap "later" not found' and st["restartCount"] == 0
    _http(f"{url}/api/v1/namespaces/default/configmaps", "POST", {"metadata": {"name": "later"}, "data": {"k": "v"}})
    wait_until(lambda: _cstatus(url, "needscm").get("state", {}).get("running"), 20, "needscm running")
    assert _cstatus(url, "needscm")["restartCount"] == 0


def test_a_containers_children_end_with_it(env: dict[str, Any]) -> None:
    url = env["url"]
    k = env["start"]()
    _http(f"{url}/api/v1/namespaces/default/pods", "POST",
          _pod("tree", [{"name": "c", "image": "x", "command": ["sh", "-c", "sleep 301 & sleep 302 & wait"]}]))
    wait_until(lambda: _cstatus(url, "tree").get("state", {}).get("running"), 20, "tree running")
    rt: Runtime = k.kubelet.runtime
    pid = _running_pid(rt, "tree")
    children = wait_until(lambda: len(c := _children(pid)) == 2 and c, 10, "two children of the container's sh")
    starts = {c: procs.start_time(c) for c in children}
    _http(f"{url}/api/v1/namespaces/default/pods/tree", "DELETE")
    wait_until(lambda: _get(url, "tree").get("code") == 404, 20, "tree deleted")
    assert not any(procs.same(c, s) for c, s in starts.items())


def _children(pid: int) -> list[int]:
    try:
        text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def test_host_network_pods_run_in_the_nodes_namespace(env: dict[str, Any]) -> None:
    url = env["url"]
    k = env["start"]()
    _http(f"{url}/api/v1/namespaces/default/pods", "POST",
          _pod("agent", [{"name": "c", "image": "x", "command": ["sleep", "300"]}], hostNetwork=True))
    wait_until(lambda: _cstatus(url, "agent").get("state", {}).get("running"), 20, "agent running")
    st = _get(url, "agent")["status"]
    assert st["podIP"] == NODE_IP and st["hostIP"] == NODE_IP
    rt: Runtime = k.kubelet.runtime
    pid = _running_pid(rt, "agent")
    node_ns = env["net"].node_netns("n1")
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{node_ns}").st_ino
    assert _exec(rt, "agent", ["hostname"]).strip() == "n1"
    assert "default/agent" not in env["net"].live  # no pod network was made
    _http(f"{url}/api/v1/namespaces/default/pods/agent", "DELETE")
    wait_until(lambda: _get(url, "agent").get("code") == 404, 20, "agent deleted")
    assert pathlib.Path(f"/run/netns/{node_ns}").exists()  # the node's namespace stays


def test_startup_probe_gates_readiness(env: dict[str, Any]) -> None:
    url = env["url"]
    k = env["start"]()
    c = {"name": "c", "image": "x", "command": ["sleep", "300"],
         "startupProbe": {"exec": {"command": ["test", "-f", "/tmp/started"]}, "periodSeconds": 1,
                          "failureThreshold": 100},
         "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1}}
    _http(f"{url}/api/v1/namespaces/default/pods", "POST", _pod("slow", [c]))
    wait_until(lambda: _cstatus(url, "slow").get("state", {}).get("running"), 20, "slow running")
    rt: Runtime = k.kubelet.runtime
    w = rt._find("default", "slow")
    assert w is not None
    att = w.containers["c"].current
    assert att is not None
    wait_until(lambda: att.probes["startup"].failures >= 2, 20, "the startup probe failing a few times")
    st = _cstatus(url, "slow")
    assert st["started"] is False and st["ready"] is False
    assert att.probes["readiness"].result is None  # readiness waits for startup
    _exec(rt, "slow", ["touch", "/tmp/started"])
    st = wait_until(lambda: (s := _cstatus(url, "slow")).get("ready") and s, 20, "slow started and ready")
    assert st["started"] is True and st["restartCount"] == 0


def test_pre_stop_hook_runs_before_sigterm(env: dict[str, Any], tmp_path: pathlib.Path) -> None:
    """lifecycle.preStop (exec) runs inside the container before SIGTERM, within the grace period:
    the hook's mark is written while the process still runs, and the SIGTERM trap's mark after."""
    url = env["url"]
    env["start"]()
    shared = tmp_path / "shared"
    shared.mkdir()
    c = {"name": "c", "image": "busybox",
         "command": ["sh", "-c", "trap 'echo term >> /shared/log; exit 0' TERM; while true; do sleep 0.1; done"],
         "volumeMounts": [{"name": "s", "mountPath": "/shared"}],
         "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo hook >> /shared/log"]}}}}
    _http(f"{url}/api/v1/namespaces/default/pods", "POST",
          _pod("hooked", [c], volumes=[{"name": "s", "hostPath": {"path": str(shared)}}]))
    wait_until(lambda: _cstatus(url, "hooked").get("state", {}).get("running"), 20, "hooked running")
    _http(f"{url}/api/v1/namespaces/default/pods/hooked", "DELETE")
    wait_until(lambda: (shared / "log").exists() and "term" in (shared / "log").read_text(), 20,
               "the hook and the TERM trap to run")
    assert (shared / "log").read_text().split() == ["hook", "term"]
