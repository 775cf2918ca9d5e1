"""The lab kubelet against a real emulator and a fake PodNetwork (no namespaces are made)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest

pytest.importorskip("aiohttp")

from kubeemu.kubelet import LabKubelet, LabNode
from kubeemu.runner import ServerThread
from tests.waiting import wait_until


class FakeNetwork:
    """Records create/delete calls; ``fail_for`` makes create raise for that pod key."""

    def __init__(self) -> None:
        self.live: dict[str, tuple[str, str]] = {}
        self.calls: list[tuple[str, str, str, str]] = []
        self.fail_for: set[str] = set()

    def create(self, node: str, pod_key: str, ip: str) -> None:
        self.calls.append(("create", node, pod_key, ip))
        if pod_key in self.fail_for:
            raise OSError("injected: netns creation failed")
        self.live[pod_key] = (node, ip)

    def delete(self, node: str, pod_key: str, ip: str) -> None:
        self.calls.append(("delete", node, pod_key, ip))
        self.live.pop(pod_key, None)


def _http(url: str, method: str = "GET", body: Any = None) -> Any:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def test_lab_kubelet_runs_and_removes_pods() -> None:
    net = FakeNetwork()
    with ServerThread(name="kl", graceful_pods=True) as srv:
        nodes = [LabNode("e1", "198.18.0.11", ("10.10.1.0/24",), reserved=frozenset({"10.10.1.2"})),
                 LabNode("e2", "198.18.0.12", ("10.10.2.0/24",))]
        kubelet = LabKubelet(srv.url, nodes, net, renew_interval=0.2)
        loop = asyncio.new_event_loop()
        task = loop.create_task(kubelet.run())

        def drive() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)

        t = threading.Thread(target=drive, daemon=True)
        t.start()
        try:
            node = wait_until(
                lambda: (n := _http(srv.url + "/api/v1/nodes/e1")).get("kind") == "Node" and n,
                5,
                "Node e1 registered",
            )
            assert node["spec"]["podCIDR"] == "10.10.1.0/24"
            assert {"type": "InternalIP", "address": "198.18.0.11"} in node["status"]["addresses"]
            assert node["status"]["conditions"][0]["type"] == "Ready"
            lease_url = srv.url + "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/e1"
            lease = wait_until(lambda: (x := _http(lease_url)).get("kind") == "Lease" and x, 5, "Lease e1 created")
            first = lease["metadata"]["resourceVersion"]
            wait_until(lambda: _http(lease_url)["metadata"]["resourceVersion"] != first, 3, "Lease e1 renewed")

            pod = {"metadata": {"name": "p"}, "spec": {"nodeName": "e1",
                                                       "containers": [{"name": "c", "image": "x"}]}}
            _http(srv.url + "/api/v1/namespaces/default/pods", "POST", pod)
            other = {"metadata": {"name": "elsewhere"}, "spec": {"nodeName": "not-ours",
                                                                 "containers": [{"name": "c", "image": "x"}]}}
            _http(srv.url + "/api/v1/namespaces/default/pods", "POST", other)
            got = wait_until(
                lambda: (p := _http(srv.url + "/api/v1/namespaces/default/pods/p"))["status"].get("phase") == "Running"
                and p,
                5,
                "pod p Running",
            )
            assert got["status"]["podIP"] == "10.10.1.3"  # .2 reserved by the lab
            assert got["status"]["hostIP"] == "198.18.0.11"
            assert {c["type"]: c["status"] for c in got["status"]["conditions"]}["Ready"] == "True"
            assert net.live == {"default/p": ("e1", "10.10.1.3")}

            net.fail_for.add("default/bad")
            bad = {"metadata": {"name": "bad"}, "spec": {"nodeName": "e2", "containers": [{"name": "c",
                                                                                           "image": "x"}]}}
            _http(srv.url + "/api/v1/namespaces/default/pods", "POST", bad)
            wait_until(
                lambda: _http(srv.url + "/api/v1/namespaces/default/pods/bad")["status"].get("reason")
                == "NetworkSetupFailed",
                5,
                "pod bad failed with NetworkSetupFailed",
            )

            _http(srv.url + "/api/v1/namespaces/default/pods/p", "DELETE")
            wait_until(
                lambda: _http(srv.url + "/api/v1/namespaces/default/pods/p").get("code") == 404,
                5,
                "pod p deleted",
            )
            assert "default/p" not in net.live
            assert ("delete", "e1", "default/p", "10.10.1.3") in net.calls
            assert not [c for c in net.calls if c[2] == "default/elsewhere"]
        finally:
            loop.call_soon_threadsafe(task.cancel)
            t.join(5)
            loop.close()


def test_lab_kubelet_reports_capacity_and_rejects_what_does_not_fit() -> None:
    net = FakeNetwork()
    with ServerThread(name="kl2", graceful_pods=True) as srv:
        nodes = [LabNode("e1", "198.18.0.11", ("10.10.1.0/24",), resources={"cpu": "1", "pods": 2})]
        kubelet = LabKubelet(srv.url, nodes, net, renew_interval=1.0)
        loop = asyncio.new_event_loop()
        task = loop.create_task(kubelet.run())

        def drive() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)

        t = threading.Thread(target=drive, daemon=True)
        t.start()
        try:
            node = wait_until(lambda: (n := _http(srv.url + "/api/v1/nodes/e1")).get("kind") == "Node" and n, 5,
                              "Node e1 registered")
            assert node["status"]["capacity"] == {"cpu": "1", "ephemeral-storage": "50Gi", "memory": "8Gi",
                                                  "pods": "2"}
            assert node["status"]["allocatable"] == node["status"]["capacity"]

            def pod(name: str, cpu: str) -> dict[str, Any]:
                return {"metadata": {"name": name}, "spec": {"nodeName": "e1", "containers": [
                    {"name": "c", "image": "x", "resources": {"requests": {"cpu": cpu}}}]}}

            def phase(name: str) -> str:
                return str(_http(f"{srv.url}/api/v1/namespaces/default/pods/{name}")["status"].get("phase", ""))

            _http(srv.url + "/api/v1/namespaces/default/pods", "POST", pod("a", "600m"))
            wait_until(lambda: phase("a") == "Running", 5, "a Running")
            _http(srv.url + "/api/v1/namespaces/default/pods", "POST", pod("b", "600m"))
            wait_until(lambda: phase("b") == "Failed", 5, "b rejected")
            b = _http(f"{srv.url}/api/v1/namespaces/default/pods/b")["status"]
            assert b["reason"] == "OutOfcpu" and "requested: 600, used: 600, capacity: 1000" in b["message"]
            assert "default/b" not in net.live  # a rejected pod gets no network
            _http(srv.url + "/api/v1/namespaces/default/pods", "POST", pod("c", "100m"))
            wait_until(lambda: phase("c") == "Running", 5, "c Running")
            _http(srv.url + "/api/v1/namespaces/default/pods", "POST", pod("d", "0"))
            wait_until(lambda: phase("d") == "Failed", 5, "d rejected")
            assert _http(f"{srv.url}/api/v1/namespaces/default/pods/d")["status"]["reason"] == "OutOfpods"
            # Deleting a pod frees its share: the next one fits.
            _http(srv.url + "/api/v1/namespaces/default/pods/a", "DELETE")
            wait_until(lambda: _http(srv.url + "/api/v1/namespaces/default/pods/a").get("code") == 404, 5, "a gone")
            _http(srv.url + "/api/v1/namespaces/default/pods", "POST", pod("e", "800m"))
            wait_until(lambda: phase("e") == "Running", 5, "e Running")
        finally:
            loop.call_soon_threadsafe(task.cancel)
            t.join(5)
            loop.close()
