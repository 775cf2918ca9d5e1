"""The scheduler's API access against kubeemu (no root): informers list then watch, reconcile on a
re-list, answer an expired resourceVersion with a re-list, treat an absent CRD as empty and pick
it up once installed; the ``kosmos-scheduler`` command line (``--help``, bad config, a real run
that binds a pod and serves ``/healthz`` and ``/metrics``, clean exit on SIGTERM)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeemu.runner import ServerThread
from scheduler.kube import Api, ApiError, Informer, resource_path
from tests.scheduler_doubles import node, pod
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def emu() -> Iterator[ServerThread]:
    with ServerThread(name="sched-kube", bookmark_interval=0.3, log_size=50) as s:
        yield s


@pytest.fixture
def api(emu: ServerThread) -> Api:
    return Api(emu.url)


def _cm(name: str, v: str = "1") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"},
            "data": {"v": v}}


def test_relist_reconciles_the_store(api: Api) -> None:
    inf = Informer(api, "v1", "configmaps")
    seen: list[tuple[str, str]] = []
    inf.add_handler(lambda t, old, new: seen.append((t, (new or old or {})["metadata"]["name"])))
    path = resource_path("v1", "configmaps", "default")
    api.create(path, _cm("a"))
    api.create(path, _cm("b"))
    inf._list()
    assert sorted(seen) == [("ADDED", "a"), ("ADDED", "b")]
    seen.clear()
    api.update(resource_path("v1", "configmaps", "default", "a"), _cm("a", "2"))
    api.request("DELETE", resource_path("v1", "configmaps", "default", "b"))
    api.create(path, _cm("c"))
    inf._list()  # as after a gap: only what changed meanwhile
    assert sorted(seen) == [("ADDED", "c"), ("DELETED", "b"), ("MODIFIED", "a")]
    assert sorted(inf.store) == ["default/a", "default/c"]


def test_expired_resource_version_needs_a_relist(api: Api) -> None:
    inf = Informer(api, "v1", "configmaps")
    inf._list()
    old = inf.resource_version
    for i in range(80):  # more changes than the server's watch log keeps (50)
        api.create(resource_path("v1", "configmaps", "default"), _cm(f"x{i}"))
    inf.resource_version = old
    try:
        assert inf._watch() is False
    except ApiError as e:
        assert e.status == 410


def test_watch_follows_changes_and_absent_crd_is_picked_up_later(api: Api) -> None:
    inf = Informer(api, "kosmos.io/v1alpha1", "workloadpolicies")
    inf.ABSENT_RETRY_S = 0.3
    inf.start()
    try:
        wait_until(inf.synced.is_set, 10, "informer synced on an absent CRD")
        assert not inf.served and inf.store == {}
        crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
               "metadata": {"name": "workloadpolicies.kosmos.io"},
               "spec": {"group": "kosmos.io", "scope": "Namespaced",
                        "names": {"plural": "workloadpolicies", "singular": "workloadpolicy",
                                  "kind": "WorkloadPolicy", "listKind": "WorkloadPolicyList"},
                        "versions": [{"name": "v1alpha1", "served": True, "storage": True,
                                      "schema": {"openAPIV3Schema": {"type": "object",
                                                                     "x-kubernetes-preserve-unknown-fields": True}}}]}}
        api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        wait_until(lambda: inf.served, 10, "CRD served")
        api.create(resource_path("kosmos.io/v1alpha1", "workloadpolicies", "default"), {
            "apiVersion": "kosmos.io/v1alpha1", "kind": "WorkloadPolicy", "metadata": {"name": "wp"},
            "spec": {"topologyKey": "topology.kubernetes.io/zone"}})
        wait_until(lambda: "default/wp" in inf.store, 10, "policy seen through the watch")
    finally:
        inf.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scheduler.main", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=False, **kw)


def test_help_has_examples() -> None:
    r = _cli("--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and "--leader-elect" in r.stdout and "KubeSchedulerConfiguration" in r.stdout


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n"
                   "profiles:\n- schedulerName: x\n  plugins:\n    filter:\n      enabled: [{name: Nope}]\n")
    r = _cli("--master", "http://127.0.0.1:1", "--config", str(cfg), "--leader-elect=false")
    assert r.returncode == 2
    assert "plugin 'Nope' (filter) is not registered" in r.stderr
    r = _cli("--master", "http://127.0.0.1:1", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "missing.yaml" in r.stderr


def test_the_command_schedules_and_serves_health(api: Api) -> None:
    ns = f"t-{uuid.uuid4().hex[:6]}"
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    api.create("/api/v1/nodes", node("n0"))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.main", "--master", api.host, "--leader-elect=false",
                             "--listen", f"127.0.0.1:{port}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        p = {**pod("p"), "metadata": {"name": "p", "namespace": ns}}
        api.create(resource_path("v1", "pods", ns), p)
        # No plugins are registered yet in scheduler.plugins: the pod still lands on the only node.
        wait_until(lambda: api.get(resource_path("v1", "pods", ns, "p"))["spec"].get("nodeName"), 30,
                   "pod bound by the kosmos-scheduler process")

        def get(path: str) -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return str(r.read().decode())
            except OSError:
                return None

        health = wait_until(lambda: get("/healthz"), 20, "/healthz")
        assert health.startswith("ok")
        metrics = get("/metrics") or ""
        assert 'fabric_scheduler_schedule_attempts_total{profile="default-scheduler",result="scheduled"} 1.0' in metrics
        assert "fabric_scheduler_pending_pods" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_sigkill_mid_stream_then_a_new_process_finishes_the_job(api: Api) -> None:
    """The acceptance scenario with real processes: SIGKILL the scheduler while pods stream in
    and it binds them, start another; every pod ends bound once, none moves, none is lost."""
    ns = f"t-{uuid.uuid4().hex[:6]}"
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    for i in range(4):
        api.create("/api/v1/nodes", node(f"n{i}"))

    ports: dict[int, int] = {}

    def start() -> subprocess.Popen[str]:
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "scheduler.main", "--master", api.host,
                                 "--leader-elect=false", "--listen", f"127.0.0.1:{port}"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        ports[proc.pid] = port
        return proc

    def get_ok(proc: subprocess.Popen[str]) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[proc.pid]}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def bound() -> dict[str, str]:
        return {p["metadata"]["name"]: p["spec"]["nodeName"]
                for p in api.get(resource_path("v1", "pods", ns))["items"] if p["spec"].get("nodeName")}

    def create_all() -> None:
        for i in range(N):
            api.create(resource_path("v1", "pods", ns),
                       {**pod(f"p{i}"), "metadata": {"name": f"p{i}", "namespace": ns}})

    N = 150
    first = start()
    second: subprocess.Popen[str] | None = None
    creator = threading.Thread(target=create_all)
    try:
        wait_until(lambda: get_ok(first), 30, "the first scheduler up")
        creator.start()  # pods keep coming while the scheduler dies and a new one starts
        wait_until(lambda: len(bound()) >= 10, 30, "the first scheduler binding pods")
        first.kill()
        first.wait(10)
        before = bound()
        second = start()
        creator.join(60)
        after = wait_until(lambda: (b := bound()) and len(b) == N and b, 60, f"all {N} pods bound")
        assert 10 <= len(before) < N
        assert all(after[n] == node_name for n, node_name in before.items())  # nothing re-bound

        def scheduled() -> dict[str, int]:
            out: dict[str, int] = {}
            for e in api.get(resource_path("v1", "events", ns))["items"]:
                if e["reason"] == "Scheduled":
                    name = e["involvedObject"]["name"]
                    out[name] = out.get(name, 0) + int(e.get("count") or 1)
            return out

        # The new process reports every pod it bound; only binds in flight at the kill (at most
        # the 16 bind workers) may have landed without their Event.
        late = set(after) - set(before)
        ev = wait_until(lambda: (s := scheduled()) and len(late & set(s)) >= len(late) - 16 and s, 30,
                        "Scheduled events of the pods the second process bound")
        assert max(ev.values()) == 1  # no pod was bound (and reported) twice
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


def test_get_or_none_is_the_object_none_on_404_and_raises_on_other_errors(api: Api) -> None:
    path = resource_path("v1", "configmaps", "default", "a")
    assert api.get_or_none(path) is None
    api.create(resource_path("v1", "configmaps", "default"), _cm("a"))
    assert api.get_or_none(path, timeout=5.0)["data"] == {"v": "1"}
    api.request("POST", "/_kubeemu/faults", {"error_count": 1, "error_code": 503})
    with pytest.raises(ApiError) as e:
        api.get_or_none(path)
    assert e.value.status == 503
    assert api.get_or_none(path) is not None  # the one fault is spent
