"""Both profiles of one real :class:`scheduler.scheduler.Scheduler` (the real plugin REGISTRY,
``default_config()``) against an emulated API server with the Kosmos CRDs installed from
``deploy/scheduler/crds``: the wiring of profiles, listers/informers and the ClusterEvents the
Kosmos plugins register, end to end through the loop.

- The two profiles hold the plugins the issue names (``kosmos-scheduler``: LeafNodeTaintToleration
  instead of TaintToleration, VolumeBinding and LeafNodeVolumeBinding, LeafNodeDistribution,
  LeafNodeWorkloadPolicy) and every lister a plugin reads exists in the core's Handle.
- A pod of ``kosmos-scheduler`` named by a DistributionPolicy (name -> leaf) lands on a virtual
  node (label ``kosmos.io/node=true``, taint ``kosmos.io/node=true:NoSchedule``); a
  ``default-scheduler`` pod never does: it lands on a real node, and one that asks for the
  virtual nodes stays Pending with upstream's untolerated-taint reason.
- A policy created after the pod was found unschedulable re-queues it (the ``DistributionPolicy``
  Add event the plugin registers is the one the core's informer emits).
- WorkloadPolicy {a: 3, b: 7}, Required: 10 replicas land exactly so; an 11th stays Pending.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeemu.runner import ServerThread
from scheduler import kube
from scheduler.plugins import REGISTRY
from scheduler.profile import DEFAULT_SCHEDULER, KOSMOS_SCHEDULER, default_config
from scheduler.scheduler import Scheduler
from tests import crds
from tests.waiting import wait_until

pytestmark = pytest.mark.unit

CRDS = Path(__file__).resolve().parents[2] / "deploy" / "scheduler" / "crds"
LEAF_TAINT = {"key": "kosmos.io/node", "value": "true", "effect": "NoSchedule"}


@pytest.fixture
def api() -> Iterator[kube.Api]:
    with ServerThread(name="profiles", bookmark_interval=0.3) as s:
        a = kube.Api(s.url)
        crds.install(a, sorted(CRDS.glob("*.yaml")), [f"/apis/kosmos.io/v1alpha1/{plural}" for plural in (
            "distributionpolicies", "clusterdistributionpolicies", "workloadpolicies")])
        yield a


@pytest.fixture
def ns(api: kube.Api) -> str:
    name = f"t-{uuid.uuid4().hex[:6]}"
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


@pytest.fixture
def sched(api: kube.Api) -> Iterator[Scheduler]:
    s = Scheduler(kube.Api(api.host), default_config(), registry=REGISTRY, leader_elect=False)
    s.start(sync_timeout=20)
    yield s
    s.stop()


def node(name: str, leaf: bool = False, cluster: str = "") -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if leaf:
        labels["kosmos.io/node"] = "true"
    if cluster:
        labels["kosmos.io/cluster"] = cluster
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "spec": {"taints": [LEAF_TAINT]} if leaf else {},
            "status": {"allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"},
                       "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def pod(name: str, scheduler_name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"schedulerName": scheduler_name,
                     "containers": [{"name": "c", "image": "pause", "resources": {"requests": {"cpu": "100m"}}}],
                     **spec}}


def pods(api: kube.Api, ns: str) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in api.get(f"/api/v1/namespaces/{ns}/pods")["items"]}


def node_of(api: kube.Api, ns: str, name: str) -> str:
    return str(pods(api, ns)[name]["spec"].get("nodeName") or "")


def scheduled_condition(api: kube.Api, ns: str, name: str) -> dict[str, Any] | None:
    p = pods(api, ns)[name]
    return next((c for c in (p.get("status") or {}).get("conditions") or [] if c["type"] == "PodScheduled"), None)


def test_profiles_and_listers_are_wired(sched: Scheduler) -> None:
    default, kosmos = sched.profiles[DEFAULT_SCHEDULER], sched.profiles[KOSMOS_SCHEDULER]
    assert "TaintToleration" in default.plugins and "LeafNodeTaintToleration" not in default.plugins
    assert not {"LeafNodeDistribution", "LeafNodeVolumeBinding", "LeafNodeWorkloadPolicy"} & set(default.plugins)
    assert "TaintToleration" not in kosmos.plugins
    assert {"LeafNodeTaintToleration", "VolumeBinding", "LeafNodeVolumeBinding", "LeafNodeDistribution",
            "LeafNodeWorkloadPolicy", "NodeResourcesFit", "InterPodAffinity",
            "PodTopologySpread"} <= set(kosmos.plugins)
    for res in ("namespaces", "replicasets", "statefulsets", "replicationcontrollers", "services",
                "persistentvolumeclaims", "persistentvolumes", "storageclasses", "distributionpolicies",
                "clusterdistributionpolicies", "workloadpolicies"):
        assert isinstance(sched.handle.lister(res), dict), res
    # The events the Kosmos plugins register are the ones the core's informers emit.
    emitted = set(sched._event_names.values()) | {"Pod", "Node"}
    for name in ("LeafNodeDistribution", "LeafNodeWorkloadPolicy", "LeafNodeVolumeBinding"):
        for ev in kosmos.events_for(name):
            assert ev.resource in emitted, (name, ev)
    assert {ev.resource for ev in kosmos.events_for("LeafNodeDistribution")} >= {
        "DistributionPolicy", "ClusterDistributionPolicy"}


def test_distribution_policy_sends_a_kosmos_pod_to_a_leaf_and_default_pods_never(
        api: kube.Api, ns: str, sched: Scheduler) -> None:
    for n in (node("host-0"), node("host-1"), node("leaf-a", leaf=True), node("leaf-b", leaf=True)):
        api.create("/api/v1/nodes", n)
    # Before any policy: "web" has nothing that sends it to a leaf. It must still run, anywhere.
    api.create(f"/apis/kosmos.io/v1alpha1/namespaces/{ns}/distributionpolicies", {
        "apiVersion": "kosmos.io/v1alpha1", "kind": "DistributionPolicy", "metadata": {"name": "to-leaf"},
        "spec": {"resourceSelectors": [{"name": "web", "policyName": "leaf"}],
                 "policyTerms": [{"name": "leaf", "nodeType": "leaf"}]}})
    wait_until(lambda: sched.handle.lister("distributionpolicies"), 10, "the policy reached the lister")
    api.create(f"/api/v1/namespaces/{ns}/pods", pod("web", KOSMOS_SCHEDULER))
    for i in range(4):
        api.create(f"/api/v1/namespaces/{ns}/pods", pod(f"plain-{i}", DEFAULT_SCHEDULER))
    api.create(f"/api/v1/namespaces/{ns}/pods",
               pod("wants-leaf", DEFAULT_SCHEDULER, nodeSelector={"kosmos.io/node": "true"}))
    wait_until(lambda: node_of(api, ns, "web"), 20, "web bound")
    assert node_of(api, ns, "web") in ("leaf-a", "leaf-b")
    for i in range(4):
        wait_until(lambda i=i: node_of(api, ns, f"plain-{i}"), 20, f"plain-{i} bound")  # type: ignore[misc]
        assert node_of(api, ns, f"plain-{i}") in ("host-0", "host-1")
    cond = wait_until(lambda: scheduled_condition(api, ns, "wants-leaf"), 20, "wants-leaf marked unschedulable")
    assert cond["status"] == "False" and cond["reason"] == "Unschedulable"
    assert cond["message"] == ("0/4 nodes are available: 2 node(s) didn't match Pod's node affinity/selector, "
                               "2 node(s) had untolerated taint {kosmos.io/node: true}.")
    assert node_of(api, ns, "wants-leaf") == ""


def test_a_new_distribution_policy_requeues_the_pod_it_admits(api: kube.Api, ns: str, sched: Scheduler) -> None:
    """An adv term naming a node the pod's nodeSelector excludes keeps it Pending; the policy's
    update (the DistributionPolicy Update event) moves it, and it lands where the new term says."""
    for n in (node("host-0"), node("leaf-a", leaf=True)):
        api.create("/api/v1/nodes", n)
    path = f"/apis/kosmos.io/v1alpha1/namespaces/{ns}/distributionpolicies"
    api.create(path, {"apiVersion": "kosmos.io/v1alpha1", "kind": "DistributionPolicy", "metadata": {"name": "p"},
                      "spec": {"resourceSelectors": [{"namePrefix": "db", "policyName": "nowhere"}],
                               "policyTerms": [{"name": "nowhere", "nodeType": "adv",
                                                "advancedTerm": {"nodeName": "absent"}}]}})
    wait_until(lambda: sched.handle.lister("distributionpolicies"), 10, "the policy reached the lister")
    api.create(f"/api/v1/namespaces/{ns}/pods", pod("db-0", KOSMOS_SCHEDULER))
    wait_until(lambda: scheduled_condition(api, ns, "db-0"), 20, "db-0 marked unschedulable")
    cur = api.get(f"{path}/p")
    cur["spec"]["policyTerms"] = [{"name": "nowhere", "nodeType": "leaf"}]
    api.update(f"{path}/p", cur)
    wait_until(lambda: node_of(api, ns, "db-0"), 30, "db-0 bound after the policy changed")
    assert node_of(api, ns, "db-0") == "leaf-a"


def test_workload_policy_required_quotas_end_to_end(api: kube.Api, ns: str, sched: Scheduler) -> None:
    for n in (node("host-0"), node("leaf-a", leaf=True, cluster="a"), node("leaf-b", leaf=True, cluster="b")):
        api.create("/api/v1/nodes", n)
    api.create(f"/apis/kosmos.io/v1alpha1/namespaces/{ns}/workloadpolicies", {
        "apiVersion": "kosmos.io/v1alpha1", "kind": "WorkloadPolicy", "metadata": {"name": "wp"},
        "spec": {"topologyKey": "kosmos.io/cluster", "labelSelector": {"matchLabels": {"app": "wl"}},
                 "allocationType": "Required", "allocationMethod": "Balance",
                 "allocationPolicy": [{"name": "a", "replicas": 3}, {"name": "b", "replicas": 7}]}})
    wait_until(lambda: sched.handle.lister("workloadpolicies"), 10, "the policy reached the lister")
    labels = {"app": "wl", "workload-policy/kosmos.io": "wp"}
    for i in range(10):
        api.create(f"/api/v1/namespaces/{ns}/pods", pod(f"wl-{i}", KOSMOS_SCHEDULER, labels))

    def placed() -> dict[str, int] | None:
        got = [node_of(api, ns, f"wl-{i}") for i in range(10)]
        if not all(got):
            return None
        return {n: got.count(n) for n in set(got)}
    assert wait_until(placed, 30, "10 replicas bound") == {"leaf-a": 3, "leaf-b": 7}
    api.create(f"/api/v1/namespaces/{ns}/pods", pod("wl-10", KOSMOS_SCHEDULER, labels))
    cond = wait_until(lambda: scheduled_condition(api, ns, "wl-10"), 20, "the 11th replica marked unschedulable")
    assert cond["reason"] == "Unschedulable"
    assert node_of(api, ns, "wl-10") == ""
