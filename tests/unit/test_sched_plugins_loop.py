"""Upstream's in-tree plugins inside the real scheduling loop, against an emulated API server
(``kubeemu.runner.ServerThread`` on 127.0.0.1, no root): required anti-affinity spreads replicas
one per node and leaves the extra one Pending with upstream's reason; topology spread over zones
keeps maxSkew; a WaitForFirstConsumer claim gets ``volume.kubernetes.io/selected-node`` from
VolumeBinding's PreBind and the pod is bound once the claim is (the test plays the provisioner).

Needs the scheduling loop (``scheduler.scheduler``, built beside the plugins); skipped where it is
not there yet.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kubeemu.runner import ServerThread
from scheduler.plugins import REGISTRY
from tests.waiting import wait_until

sched_mod = pytest.importorskip("scheduler.scheduler")
kube = pytest.importorskip("scheduler.kube")
profile = pytest.importorskip("scheduler.profile")


@pytest.fixture
def api() -> Iterator[Any]:
    with ServerThread(name="plugins", bookmark_interval=0.3) as s:
        yield kube.Api(s.url)


@pytest.fixture
def ns(api: Any) -> str:
    name = f"t-{uuid.uuid4().hex[:6]}"
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


@pytest.fixture
def scheduler(api: Any) -> Iterator[Any]:
    started: list[Any] = []

    def start() -> Any:
        s = sched_mod.Scheduler(kube.Api(api.host), profile.default_config(), registry=REGISTRY, leader_elect=False)
        s.start(sync_timeout=20)
        started.append(s)
        return s
    yield start
    for s in started:
        s.kill()


def node(name: str, zone: str, cpu: str = "4") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                  "topology.kubernetes.io/zone": zone}},
            "status": {"allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
                       "capacity": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def pod(name: str, labels: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "pause",
                                     "resources": {"requests": {"cpu": "100m"}}}], **spec}}


def pods(api: Any, ns: str) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in api.get(f"/api/v1/namespaces/{ns}/pods")["items"]}


def condition(p: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in (p.get("status") or {}).get("conditions") or [] if c["type"] == "PodScheduled"), None)


def test_required_anti_affinity_one_per_node(api: Any, ns: str, scheduler: Any) -> None:
    for i, z in enumerate(("a", "a", "b")):
        api.create("/api/v1/nodes", node(f"n{i}", z))
    scheduler()
    anti = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}
    for i in range(4):
        api.create(f"/api/v1/namespaces/{ns}/pods", pod(f"web-{i}", {"app": "web"}, affinity=anti))

    def three_bound() -> dict[str, str] | None:
        bound = {n: p["spec"]["nodeName"] for n, p in pods(api, ns).items() if p["spec"].get("nodeName")}
        return bound if len(bound) == 3 else None
    bound = wait_until(three_bound, 30, "3 of 4 anti-affine pods bound")
    assert sorted(bound.values()) == ["n0", "n1", "n2"]
    pending = next(n for n in pods(api, ns) if n not in bound)
    cond = wait_until(lambda: condition(pods(api, ns)[pending]), 20, "PodScheduled condition")
    assert cond["message"] == "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules."


def test_topology_spread_over_zones(api: Any, ns: str, scheduler: Any) -> None:
    for i, z in enumerate(("a", "a", "a", "b")):
        api.create("/api/v1/nodes", node(f"n{i}", z))
    scheduler()
    tsc = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app": "db"}}}]
    zone = {"n0": "a", "n1": "a", "n2": "a", "n3": "b"}
    for i in range(6):
        api.create(f"/api/v1/namespaces/{ns}/pods", pod(f"db-{i}", {"app": "db"}, topologySpreadConstraints=tsc))
        # one at a time: each placement is checked against the skew the previous ones made
        wait_until(lambda i=i: pods(api, ns)[f"db-{i}"]["spec"].get("nodeName"), 20, f"db-{i} bound")
    per_zone = {"a": 0, "b": 0}
    for p in pods(api, ns).values():
        per_zone[zone[p["spec"]["nodeName"]]] += 1
    assert per_zone == {"a": 3, "b": 3}


def test_wait_for_first_consumer_claim_selected_node(api: Any, ns: str, scheduler: Any) -> None:
    api.create("/api/v1/nodes", node("n0", "a"))
    api.create("/api/v1/nodes", node("n1", "b"))
    api.create("/apis/storage.k8s.io/v1/storageclasses", {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": f"wffc-{ns}"},
        "provisioner": "lab.kosmos.io/test", "volumeBindingMode": "WaitForFirstConsumer",
        "allowedTopologies": [{"matchLabelExpressions": [{"key": "topology.kubernetes.io/zone", "values": ["b"]}]}]})
    api.create(f"/api/v1/namespaces/{ns}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": f"wffc-{ns}",
                 "resources": {"requests": {"storage": "1Gi"}}}})
    scheduler()
    api.create(f"/api/v1/namespaces/{ns}/pods", pod("user", {}, volumes=[
        {"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]))
    claim_path = f"/api/v1/namespaces/{ns}/persistentvolumeclaims/data"

    def selected() -> str | None:
        return ((api.get(claim_path)["metadata"].get("annotations") or {})
                .get("volume.kubernetes.io/selected-node"))
    assert wait_until(selected, 20, "selected-node annotation on the claim") == "n1"  # zone b only
    assert not pods(api, ns)["user"]["spec"].get("nodeName")  # PreBind waits for the bind
    # the provisioner's part: a PV for the claim, the claim bound to it
    api.patch(claim_path, {"metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
                           "spec": {"volumeName": f"pv-{ns}"}})
    assert wait_until(lambda: pods(api, ns)["user"]["spec"].get("nodeName"), 20, "pod bound") == "n1"
