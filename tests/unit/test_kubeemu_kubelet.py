"""The lab kubelet against a real emulator and a fake PodNetwork (no namespaces are made)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

pytest.importorskip("aiohttp")

from kubeemu.kubelet import LabKubelet, LabNode
from kubeemu.runner import ServerThread
from tests.waiting import wait_until


class FakeNetwork:
    """Records create/delete calls (and when); ``fail_for`` makes create raise for that pod key,
    ``fail_times`` for the first so many creates of that key."""

    def __init__(self) -> None:
        self.live: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.calls: list[tuple[str, str, str, tuple[str, ...]]] = []
        self.created_at: list[tuple[str, float]] = []  # (pod key, monotonic time) of every create
        self.fail_for: set[str] = set()
        self.fail_times: dict[str, int] = {}

    def create(self, node: str, pod_key: str, ips: tuple[str, ...]) -> None:
        self.calls.append(("create", node, pod_key, ips))
        self.created_at.append((pod_key, time.monotonic()))
        if pod_key in self.fail_for or self.fail_times.get(pod_key, 0) > 0:
            if pod_key in self.fail_times:
                self.fail_times[pod_key] -= 1
            raise OSError("injected: netns creation failed")
        self.live[pod_key] = (node, ips)

    def delete(self, node: str, pod_key: str, ips: tuple[str, ...]) -> None:
        self.calls.append(("delete", node, pod_key, ips))
        self.live.pop(pod_key, None)


def _http(url: str, method: str = "GET", body: Any = None) -> Any:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def _run_kubelet(kubelet: LabKubelet) -> tuple[asyncio.AbstractEventLoop, asyncio.Task[None], threading.Thread]:
    loop = asyncio.new_event_loop()
    task = loop.create_task(kubelet.run())

    def drive() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    return loop, task, t


def _stop_kubelet(loop: asyncio.AbstractEventLoop, task: asyncio.Task[None], t: threading.Thread) -> None:
    loop.call_soon_threadsafe(task.cancel)
    t.join(5)
    loop.close()


def test_lab_kubelet_runs_and_removes_pods() -> None:
    net = FakeNetwork()
    with ServerThread(name="kl", graceful_pods=True) as srv:
        nodes = [LabNode("e1", "198.18.0.11", ("10.10.1.0/24",), reserved=frozenset({"10.10.1.2"})),
                 LabNode("e2", "198.18.0.12", ("10.10.2.0/24",))]
        kubelet = LabKubelet(srv.url, nodes, net, renew_interval=0.2)
        run = _run_kubelet(kubelet)
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
            assert net.live == {"default/p": ("e1", ("10.10.1.3",))}

            net.fail_for.add("default/bad")
            bad = {"metadata": {"name": "bad"}, "spec": {"nodeName": "e2", "containers": [{"name": "c",
                                                                                           "image": "x"}]}}
            _http(srv.url + "/api/v1/namespaces/default/pods", "POST", bad)
            bad_url = srv.url + "/api/v1/namespaces/default/pods/bad"
            bad_status = wait_until(lambda: (st := _http(bad_url)["status"]).get("containerStatuses") and st, 5,
                                    "pod bad reported with its containers waiting")  # fmt: skip
            assert bad_status["phase"] == "Pending" and "podIP" not in bad_status
            assert bad_status["containerStatuses"][0]["state"] == {"waiting": {"reason": "ContainerCreating"}}
            event = wait_until(lambda: next((e for e in _http(srv.url + "/api/v1/namespaces/default/events")["items"]
                                             if e["reason"] == "FailedCreatePodSandBox"), None), 5,
                               "a FailedCreatePodSandBox event")  # fmt: skip
            assert event["type"] == "Warning" and event["involvedObject"]["name"] == "bad"
            assert event["message"] == "Failed to create pod sandbox: injected: netns creation failed"

            _http(srv.url + "/api/v1/namespaces/default/pods/p", "DELETE")
            wait_until(
                lambda: _http(srv.url + "/api/v1/namespaces/default/pods/p").get("code") == 404,
                5,
                "pod p deleted",
            )
            assert "default/p" not in net.live
            assert ("delete", "e1", "default/p", ("10.10.1.3",)) in net.calls
            assert not [c for c in net.calls if c[2] == "default/elsewhere"]
        finally:
            _stop_kubelet(*run)


def test_lab_kubelet_reports_capacity_and_rejects_what_does_not_fit() -> None:
    net = FakeNetwork()
    with ServerThread(name="kl2", graceful_pods=True) as srv:
        nodes = [LabNode("e1", "198.18.0.11", ("10.10.1.0/24",), resources={"cpu": "1", "pods": 2})]
        kubelet = LabKubelet(srv.url, nodes, net, renew_interval=1.0)
        run = _run_kubelet(kubelet)
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
            _stop_kubelet(*run)


def test_allocation_takes_one_address_per_family_primary_first() -> None:
    """Like a dual-stack CNI's host-local IPAM with one range per family: one address from each
    of the node's pod CIDRs, in ``spec.podCIDRs`` order, skipping either family's reserved ones."""
    n = LabNode("b1", "fd00:198:18::11", ("fd00:10:40:1::/64", "10.40.1.0/24"),
                reserved=frozenset({"10.40.1.2", "fd00:10:40:1::2", "fd00:10:40:1::3"}), secondary_ip="198.18.0.11")
    assert n.host_ips == ("fd00:198:18::11", "198.18.0.11")
    assert n.allocate() == ("fd00:10:40:1::4", "10.40.1.3")
    assert n.allocate() == ("fd00:10:40:1::5", "10.40.1.4")
    v6only = LabNode("c1", "fd00:198:18::21", ("fd00:10:50:1::/64",))
    assert v6only.allocate() == ("fd00:10:50:1::2",)
    # One family full: nothing is taken from the other, and the error names the full range.
    tight = LabNode("d1", "198.18.0.31", ("10.60.1.0/24", "fd00:10:60:1::/126"))
    assert tight.allocate() == ("10.60.1.2", "fd00:10:60:1::2")
    with pytest.raises(RuntimeError, match=r"pod CIDR fd00:10:60:1::/126 is full"):
        tight.allocate()
    assert tight.used == {"10.60.1.2", "fd00:10:60:1::2"}
    with pytest.raises(ValueError, match="no more than one CIDR for each IP family"):
        LabNode("x", "198.18.0.1", ("10.0.0.0/24", "10.0.1.0/24"))
    with pytest.raises(ValueError, match=r"node x: node IPs 198.18.0.1 and 198.18.0.2 are of one family"):
        LabNode("x", "198.18.0.1", ("10.0.0.0/24",), secondary_ip="198.18.0.2")


def test_dual_stack_pods_get_both_families_and_keep_them_across_a_restart() -> None:
    """An IPv6-primary dual-stack node: the Node lists both podCIDRs and InternalIPs primary
    first; a pod's podIPs are one per family, primary first, podIP the primary, hostIPs the
    node's; a restarted kubelet adopts the addresses from status.podIPs and hands out new ones."""
    net = FakeNetwork()

    def node() -> LabNode:
        return LabNode("b1", "fd00:198:18::11", ("fd00:10:40:1::/64", "10.40.1.0/24"),
                       reserved=frozenset({"10.40.1.2", "fd00:10:40:1::2"}), secondary_ip="198.18.0.11")

    def pod(name: str) -> dict[str, Any]:
        return {"metadata": {"name": name}, "spec": {"nodeName": "b1", "containers": [{"name": "c", "image": "x"}]}}

    def running(name: str) -> Any:
        return wait_until(lambda: (p := _http(f"{srv.url}/api/v1/namespaces/default/pods/{name}"))["status"].get(
            "phase") == "Running" and p, 5, f"pod {name} Running")

    with ServerThread(name="kl3", graceful_pods=True) as srv:
        run = _run_kubelet(LabKubelet(srv.url, [node()], net, renew_interval=1.0))
        try:
            got = wait_until(lambda: (n := _http(srv.url + "/api/v1/nodes/b1")).get("kind") == "Node" and n, 5,
                             "Node b1 registered")
            assert got["spec"]["podCIDRs"] == ["fd00:10:40:1::/64", "10.40.1.0/24"]
            assert got["spec"]["podCIDR"] == "fd00:10:40:1::/64"
            assert [a["address"] for a in got["status"]["addresses"] if a["type"] == "InternalIP"] == [
                "fd00:198:18::11", "198.18.0.11"]
            _http(srv.url + "/api/v1/namespaces/default/pods", "POST", pod("a"))
            st = running("a")["status"]
            assert st["podIPs"] == [{"ip": "fd00:10:40:1::3"}, {"ip": "10.40.1.3"}]
            assert st["podIP"] == "fd00:10:40:1::3"
            assert st["hostIP"] == "fd00:198:18::11"
            assert st["hostIPs"] == [{"ip": "fd00:198:18::11"}, {"ip": "198.18.0.11"}]
            assert net.live["default/a"] == ("b1", ("fd00:10:40:1::3", "10.40.1.3"))
        finally:
            _stop_kubelet(*run)
        net.calls.clear()
        run = _run_kubelet(LabKubelet(srv.url, [node()], net, renew_interval=1.0))
        try:
            wait_until(lambda: ("create", "b1", "default/a", ("fd00:10:40:1::3", "10.40.1.3")) in net.calls, 5,
                       "pod a re-announced with its addresses")
            _http(srv.url + "/api/v1/namespaces/default/pods", "POST", pod("b"))
            assert running("b")["status"]["podIPs"] == [{"ip": "fd00:10:40:1::4"}, {"ip": "10.40.1.4"}]
            _http(srv.url + "/api/v1/namespaces/default/pods/a", "DELETE")
            wait_until(lambda: ("delete", "b1", "default/a", ("fd00:10:40:1::3", "10.40.1.3")) in net.calls, 5,
                       "pod a's network removed with both addresses")
        finally:
            _stop_kubelet(*run)


class BatchingNetwork(FakeNetwork):
    """A FakeNetwork with ``create_many``: records each call's pods; node e1's first call waits for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.gate = threading.Event()

    def create_many(self, node: str, pods: list[tuple[str, tuple[str, ...]]]) -> list[str | Exception | None]:
        if node == "e1" and not any(k.startswith("ns/p") for b in self.batches for k in b):
            self.gate.wait(5)
        self.batches.append([key for key, _ in pods])
        out: list[str | Exception | None] = []
        for key, ips in pods:
            try:
                self.create(node, key, ips)
                out.append(f"ns-{key}")
            except OSError as e:
                out.append(e)
        return out


def test_pods_waiting_for_their_network_share_the_next_batch_and_fail_alone() -> None:
    """Pods that arrive while a node's network call runs go together into the next one; one
    pod's failure is that pod's alone; another node's pods are not held up by the first."""
    net = BatchingNetwork()
    net.fail_for.add("ns/p2")
    kubelet = LabKubelet("http://127.0.0.1:1", [LabNode("e1", "198.18.0.11", ("10.10.1.0/24",)),
                                               LabNode("e2", "198.18.0.12", ("10.10.2.0/24",))], net)

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(kubelet._create_network("e1", "ns/p0", ("10.10.1.2",)))
        await asyncio.sleep(0.05)  # p0's call runs (held at the gate): the next pods wait
        rest = [asyncio.ensure_future(kubelet._create_network("e1", f"ns/p{i}", (f"10.10.1.{i + 2}",)))
                for i in (1, 2, 3)]
        other = await asyncio.wait_for(kubelet._create_network("e2", "ns/q", ("10.10.2.2",)), 5)
        assert other == "ns-ns/q" and net.batches == [["ns/q"]]  # e2 served while e1's call waits
        net.gate.set()
        return [other, *await asyncio.gather(first, *rest, return_exceptions=True)]

    results = asyncio.run(scenario())
    assert net.batches == [["ns/q"], ["ns/p0"], ["ns/p1", "ns/p2", "ns/p3"]]
    assert results[1:3] == ["ns-ns/p0", "ns-ns/p1"] and results[4] == "ns-ns/p3"
    assert isinstance(results[3], OSError) and "injected" in str(results[3])
    assert kubelet._net_batches == {} and kubelet._net_waiting == {}


def test_a_deleted_pods_late_status_and_delete_never_touch_a_new_pod_of_its_name() -> None:
    """Upstream's status manager puts the pod's uid into every status patch and its final
    DELETE: a report about the old ``p`` must not land on (or delete) a new ``p``, as the tree
    manager re-creates a deleted leaf copy under its old name within milliseconds."""
    with ServerThread(name="kl", graceful_pods=True) as srv:
        kubelet = LabKubelet(srv.url, [LabNode("e1", "198.18.0.11", ("10.10.1.0/24",))], FakeNetwork(),
                             renew_interval=0.2)
        loop, task, t = _run_kubelet(kubelet)

        def call(coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

        pods = srv.url + "/api/v1/namespaces/default/pods"
        try:
            wait_until(lambda: _http(srv.url + "/api/v1/nodes/e1").get("kind") == "Node", 5, "Node e1 registered")
            # Bound to a node this kubelet does not run: only the calls below touch it.
            body = {"metadata": {"name": "p"}, "spec": {"nodeName": "not-ours", "containers": [{"name": "c",
                                                                                               "image": "x"}]}}
            old_uid = _http(pods, "POST", body)["metadata"]["uid"]
            _http(pods + "/p", "DELETE", {"gracePeriodSeconds": 0})
            new_uid = _http(pods, "POST", body)["metadata"]["uid"]
            assert new_uid != old_uid

            call(kubelet._patch_status("default", "p", old_uid, {"phase": "Failed", "reason": "Old"}))
            assert _http(pods + "/p")["status"].get("phase") != "Failed"
            call(kubelet._patch_status("default", "p", new_uid, {"phase": "Failed", "reason": "Mine"}))
            assert _http(pods + "/p")["status"]["reason"] == "Mine"

            old = {"metadata": {"namespace": "default", "name": "p", "uid": old_uid,
                                "deletionTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"nodeName": "e1"}}
            call(kubelet._delete("default/p", old_uid, old, "MODIFIED"))
            assert _http(pods + "/p")["metadata"]["uid"] == new_uid
        finally:
            _stop_kubelet(loop, task, t)


def test_a_pod_whose_network_failed_is_tried_again_after_the_back_off_and_not_once_deleted() -> None:
    """Upstream's pod worker requeues a failed sync after its back-off (10 s, jittered by up to
    half): ``flaky``'s network fails twice, then is made, and the pod runs; the tries are at
    least the back-off apart and its status events in between (the kubelet's own patches) do not
    start one. ``doomed`` always fails and is deleted during its back-off: never tried again."""
    net = FakeNetwork()
    retry = 0.4
    with ServerThread(name="kl-retry", graceful_pods=True) as srv:
        kubelet = LabKubelet(srv.url, [LabNode("e1", "198.18.0.11", ("10.10.1.0/24",))], net, renew_interval=1.0,
                             sandbox_retry_s=retry)  # fmt: skip
        run = _run_kubelet(kubelet)
        try:
            wait_until(lambda: _http(srv.url + "/api/v1/nodes/e1").get("kind") == "Node", 5, "Node e1 registered")
            net.fail_times["default/flaky"] = 2
            net.fail_for.add("default/doomed")
            for name in ("flaky", "doomed"):
                _http(srv.url + "/api/v1/namespaces/default/pods", "POST",
                      {"metadata": {"name": name}, "spec": {"nodeName": "e1", "containers": [{"name": "c",
                                                                                              "image": "x"}]}})
            got = wait_until(lambda: (p := _http(srv.url + "/api/v1/namespaces/default/pods/flaky"))["status"]
                             .get("phase") == "Running" and p, 10, "flaky Running after two failed tries")  # fmt: skip
            tries = [at for key, at in net.created_at if key == "default/flaky"]
            assert len(tries) == 3, net.calls
            assert all(b - a >= retry for a, b in itertools.pairwise(tries)), tries
            assert net.live["default/flaky"] == ("e1", (got["status"]["podIP"],))
            events = [e for e in _http(srv.url + "/api/v1/namespaces/default/events")["items"]
                      if e["reason"] == "FailedCreatePodSandBox" and e["involvedObject"]["name"] == "flaky"]
            assert len(events) == 2

            wait_until(lambda: sum(c[2] == "default/doomed" for c in net.calls) >= 1, 5, "doomed tried once")
            _http(srv.url + "/api/v1/namespaces/default/pods/doomed", "DELETE")
            wait_until(lambda: _http(srv.url + "/api/v1/namespaces/default/pods/doomed").get("code") == 404, 5,
                       "doomed deleted")  # fmt: skip
            before = sum(c[0] == "create" and c[2] == "default/doomed" for c in net.calls)
            time.sleep(3 * retry)
            assert sum(c[0] == "create" and c[2] == "default/doomed" for c in net.calls) == before
        finally:
            _stop_kubelet(*run)
