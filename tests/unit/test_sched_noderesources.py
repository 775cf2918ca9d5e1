"""Pod requests (upstream ``resource.PodRequests``), NodeInfo upkeep, NodeResourcesFit filter and
scores, BalancedAllocation; score expectations are upstream's own test cases
(least_allocated_test.go, most_allocated_test.go, balanced_allocation_test.go)."""

from __future__ import annotations

import pytest

from scheduler.framework import Code
from scheduler.plugins import REGISTRY
from scheduler.plugins.noderesources import NodeResourcesBalancedAllocation, NodeResourcesFit, broken_linear
from scheduler.podutil import (
    QuantityError,
    add_pod,
    milli_value,
    new_node_info,
    new_pod_info,
    pod_requests,
    remove_pod,
    value,
)
from tests.sched_builders import FakeHandle, node, pod, run_filter, run_scores, snapshot


def c(name: str, cpu: str | None = None, memory: str | None = None, restart: str | None = None, **extra: str) -> dict:
    reqs = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
    reqs.update({k.replace("__", "/"): v for k, v in extra.items()})
    out: dict = {"name": name, "image": "i", "resources": {"requests": reqs}}
    if restart:
        out["restartPolicy"] = restart
    return out


def test_quantities() -> None:
    assert milli_value("500m") == 500
    assert milli_value("1.5") == 1500
    assert milli_value(2) == 2000
    assert value("1Gi") == 2**30
    assert value("1G") == 10**9
    assert value("2e3") == 2000
    assert value("100n") == 1  # rounded up like Quantity.Value()
    with pytest.raises(QuantityError, match="'12x'"):
        value("12x")


@pytest.mark.parametrize(("spec", "cpu", "mem"), [
    ({"containers": [c("a", "1", "1Gi"), c("b", "500m", "1Gi")]}, 1500, 2 * 2**30),
    # a classic init container bigger than the containers wins
    ({"containers": [c("a", "1")], "initContainers": [c("i", "3")]}, 3000, 0),
    # a sidecar (restartable init container) adds to the sum and to the init containers after it
    ({"containers": [c("a", "1")], "initContainers": [c("s", "500m", restart="Always"), c("i", "2")]},
     2500, 0),
    ({"containers": [c("a", "2")], "initContainers": [c("s", "500m", restart="Always"), c("i", "1")]},
     2500, 0),
    # overhead on top
    ({"containers": [c("a", "1", "1Gi")], "overhead": {"cpu": "250m", "memory": "120Mi"}},
     1250, 2**30 + 120 * 2**20),
])
def test_pod_requests(spec: dict, cpu: int, mem: int) -> None:
    r = pod_requests({"metadata": {"name": "p"}, "spec": spec})
    assert (r.milli_cpu, r.memory) == (cpu, mem)


def test_non_zero_requests_default_only_missing_requests() -> None:
    p = {"metadata": {"name": "p"}, "spec": {"containers": [c("a"), c("b", "0", "0"), c("e", "200m")]}}
    nz = pod_requests(p, non_zero=True)
    assert nz.milli_cpu == 100 + 0 + 200
    assert nz.memory == 200 * 2**20 + 0 + 200 * 2**20
    assert pod_requests(p).milli_cpu == 200


def test_node_info_totals_ports_claims() -> None:
    n = node("n1", cpu="4", memory="8Gi", pods="10", example__gpu="2")
    ni = new_node_info(n)
    assert (ni.allocatable.milli_cpu, ni.allocatable.memory, ni.allocatable.allowed_pod_number) == (4000, 8 * 2**30, 10)
    assert ni.allocatable.scalar == {"example/gpu": 2}
    p = pod("a", cpu="1", containers=[{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}],
                                       "resources": {"requests": {"cpu": "1"}}}],
            volumes=[{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}])
    add_pod(ni, new_pod_info(p))
    assert ni.requested.milli_cpu == 1000
    assert ("TCP", "0.0.0.0", 8080) in ni.used_ports
    assert ni.pvc_ref_counts == {"default/data": 1}
    assert remove_pod(ni, p)
    assert ni.requested.milli_cpu == 0 and not ni.used_ports and not ni.pvc_ref_counts and not ni.pods
    assert not remove_pod(ni, p)


FIT_CASES = [
    # (name, pod, existing requests on the node, expected code, reasons)
    ("fits", pod(cpu="1", memory="1Gi"), [], Code.SUCCESS, ()),
    ("cpu", pod(cpu="3"), [pod("e", cpu="2", node="n1")], Code.UNSCHEDULABLE, ("Insufficient cpu",)),
    ("cpu and memory", pod(cpu="3", memory="30Gi"), [pod("e", cpu="2", memory="4Gi", node="n1")],
     Code.UNSCHEDULABLE, ("Insufficient cpu", "Insufficient memory")),
    ("larger than the node: unresolvable", pod(cpu="5"), [], Code.UNSCHEDULABLE_AND_UNRESOLVABLE,
     ("Insufficient cpu",)),
    ("extended resource", pod(containers=[c("a", **{"example.com__gpu": "2"})]), [pod("e", node="n1", containers=[
        c("a", **{"example.com__gpu": "1"})])], Code.UNSCHEDULABLE, ("Insufficient example.com/gpu",)),
    ("extended resource the node lacks", pod(containers=[c("a", **{"vendor.io__fpga": "1"})]), [],
     Code.UNSCHEDULABLE_AND_UNRESOLVABLE, ("Insufficient vendor.io/fpga",)),
    ("init container counts", pod(containers=[c("a", "1")], initContainers=[c("i", "3")]),
     [pod("e", cpu="2", node="n1")], Code.UNSCHEDULABLE, ("Insufficient cpu",)),
    ("overhead counts", pod(cpu="1500m", overhead={"cpu": "600m"}), [pod("e", cpu="2", node="n1")],
     Code.UNSCHEDULABLE, ("Insufficient cpu",)),
    ("empty pod still needs a pod slot", pod(), [pod(f"e{i}", node="n1") for i in range(3)],
     Code.UNSCHEDULABLE, ("Too many pods",)),
    ("too many pods and cpu", pod(cpu="4"), [pod(f"e{i}", cpu="100m", node="n1") for i in range(3)],
     Code.UNSCHEDULABLE, ("Too many pods", "Insufficient cpu")),
]


@pytest.mark.parametrize(("name", "p", "existing", "code", "reasons"), FIT_CASES, ids=[x[0] for x in FIT_CASES])
def test_fit_filter(name: str, p: dict, existing: list, code: Code, reasons: tuple) -> None:
    n = node("n1", cpu="4", memory="32Gi", pods="3", **{"example.com__gpu": "2"})
    infos = snapshot([n], existing)
    st = run_filter(NodeResourcesFit(FakeHandle(infos), {}), p, infos)["n1"]
    assert (st.code, st.reasons) == (code, reasons)
    if not st.ok:
        assert st.plugin == "NodeResourcesFit"


def test_fit_ignored_resources() -> None:
    n = node("n1")
    infos = snapshot([n])
    p = pod(containers=[c("a", **{"example.com__gpu": "1", "vendor.io__fpga": "1"})])
    assert not run_filter(NodeResourcesFit(FakeHandle(infos), {}), p, infos)["n1"].ok
    fit = NodeResourcesFit(FakeHandle(infos), {"ignoredResources": ["example.com/gpu"],
                                               "ignoredResourceGroups": ["vendor.io"]})
    assert run_filter(fit, p, infos)["n1"].ok


def _two_nodes() -> list:
    # upstream: "nothing scheduled, resources requested, differently sized nodes"
    return snapshot([node("node1", cpu="4000m", memory="10000"), node("node2", cpu="6000m", memory="10000")])


def _cpu_and_memory() -> dict:
    return pod(containers=[c("a", "1000m", "2000"), c("b", "2000m", "3000")])


def test_least_allocated_upstream_case() -> None:
    infos = _two_nodes()
    assert run_scores(NodeResourcesFit(FakeHandle(infos), {}), _cpu_and_memory(), infos) == {"node1": 37, "node2": 50}


def test_most_allocated_upstream_case() -> None:
    infos = _two_nodes()
    fit = NodeResourcesFit(FakeHandle(infos), {"scoringStrategy": {"type": "MostAllocated"}})
    assert run_scores(fit, _cpu_and_memory(), infos) == {"node1": 62, "node2": 50}


def test_balanced_allocation_upstream_case() -> None:
    infos = _two_nodes()
    assert run_scores(NodeResourcesBalancedAllocation(FakeHandle(infos), {}), _cpu_and_memory(), infos) == {
        "node1": 87, "node2": 100}


def test_balanced_allocation_skips_best_effort() -> None:
    infos = _two_nodes()
    assert run_scores(NodeResourcesBalancedAllocation(FakeHandle(infos), {}), pod(), infos) == {
        "node1": 0, "node2": 0}


def test_least_allocated_weights() -> None:
    infos = _two_nodes()
    fit = NodeResourcesFit(FakeHandle(infos), {"scoringStrategy": {
        "type": "LeastAllocated", "resources": [{"name": "cpu", "weight": 3}, {"name": "memory", "weight": 1}]}})
    # node1: cpu 25*3 + mem 50 = 125 / 4 = 31; node2: (50*3 + 50) / 4 = 50
    assert run_scores(fit, _cpu_and_memory(), infos) == {"node1": 31, "node2": 50}


def test_requested_to_capacity_ratio() -> None:
    infos = _two_nodes()
    shape = [{"utilization": 0, "score": 0}, {"utilization": 100, "score": 10}]  # bin packing
    fit = NodeResourcesFit(FakeHandle(infos), {"scoringStrategy": {
        "type": "RequestedToCapacityRatio", "requestedToCapacityRatio": {"shape": shape}}})
    # node1: cpu 75%, mem 50% -> round((75+50)/2) = 63; node2: 50, 50 -> 50
    assert run_scores(fit, _cpu_and_memory(), infos) == {"node1": 63, "node2": 50}


def test_fit_rejects_bad_strategy() -> None:
    with pytest.raises(ValueError, match="'Spread'"):
        NodeResourcesFit(FakeHandle(), {"scoringStrategy": {"type": "Spread"}})


def test_registry_names() -> None:
    for name in ("NodeResourcesFit", "NodeResourcesBalancedAllocation", "NodeName", "NodeUnschedulable",
                 "NodePorts", "TaintToleration", "NodeAffinity", "InterPodAffinity", "PodTopologySpread",
                 "VolumeBinding", "VolumeZone"):
        cls = REGISTRY[name]
        plugin = cls(FakeHandle(), {})
        assert plugin.name == name
        assert list(plugin.events_to_register())


@pytest.mark.parametrize(("points", "cases"), [
    # upstream TestBrokenLinearFunction
    ([(10, 1), (90, 9)], [(-10, 1), (0, 1), (9, 1), (10, 1), (15, 1), (19, 1), (20, 2), (89, 8), (90, 9), (99, 9),
                          (100, 9), (110, 9)]),
    ([(0, 2), (40, 10), (100, 0)], [(-10, 2), (0, 2), (20, 6), (30, 8), (40, 10), (70, 5), (100, 0), (110, 0)]),
    ([(0, 2), (40, 2), (100, 2)], [(-10, 2), (0, 2), (20, 2), (40, 2), (70, 2), (110, 2)]),
])
def test_broken_linear_function(points: list, cases: list) -> None:
    f = broken_linear(points)
    assert [(p, f(p)) for p, _ in cases] == cases


def _rtcr(shape: list, resources: list) -> dict:
    return {"scoringStrategy": {"type": "RequestedToCapacityRatio", "resources": resources,
                                "requestedToCapacityRatio": {"shape": [{"utilization": u, "score": s}
                                                                       for u, s in shape]}}}


def test_requested_to_capacity_ratio_upstream_cases() -> None:
    spread_args = _rtcr([(0, 10), (100, 0)], [{"name": "memory", "weight": 1}, {"name": "cpu", "weight": 1}])
    infos = snapshot([node("node1", cpu="4000m", memory="10000"), node("node2", cpu="4000m", memory="10000")])
    explicit_zero = pod(containers=[c("a", "0", "0")])
    assert run_scores(NodeResourcesFit(FakeHandle(infos), spread_args), explicit_zero, infos) == {
        "node1": 100, "node2": 100}
    infos = _two_nodes()
    assert run_scores(NodeResourcesFit(FakeHandle(infos), spread_args), pod(cpu="3000m", memory="5000"), infos) == {
        "node1": 38, "node2": 50}
    # TestResourceBinPackingSingleExtended / MultipleExtended
    single = _rtcr([(0, 0), (100, 1)], [{"name": "intel.com/foo", "weight": 1}])
    infos = snapshot([node("machine1", **{"intel.com__foo": "8"}), node("machine2", **{"intel.com__foo": "4"})])
    p = pod(containers=[c("a", **{"intel.com__foo": "2"})])
    assert run_scores(NodeResourcesFit(FakeHandle(infos), single), p, infos) == {"machine1": 2, "machine2": 5}
    multi = _rtcr([(0, 0), (100, 1)], [{"name": "intel.com/foo", "weight": 3}, {"name": "intel.com/bar", "weight": 5}])
    infos = snapshot([node("machine1", **{"intel.com__foo": "8", "intel.com__bar": "4"}),
                      node("machine2", **{"intel.com__foo": "4", "intel.com__bar": "8"})])
    p = pod(containers=[c("a", **{"intel.com__foo": "2", "intel.com__bar": "2"})])
    assert run_scores(NodeResourcesFit(FakeHandle(infos), multi), p, infos) == {"machine1": 4, "machine2": 3}
    assert run_scores(NodeResourcesFit(FakeHandle(infos), multi), pod(), infos) == {"machine1": 0, "machine2": 0}


def test_host_ports_and_claims_of_a_pod() -> None:
    from scheduler.podutil import host_ports, pvc_names
    p = pod("web", containers=[{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80},
                                                       {"containerPort": 81}]}],
            initContainers=[{"name": "once", "ports": [{"containerPort": 1, "hostPort": 9001}]},
                            {"name": "side", "restartPolicy": "Always",
                             "ports": [{"containerPort": 2, "hostPort": 9002, "protocol": "UDP",
                                        "hostIP": "10.0.0.1"}]}],
            volumes=[{"name": "a", "persistentVolumeClaim": {"claimName": "data"}},
                     {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
                     {"name": "tmp", "emptyDir": {}}])
    # upstream GetHostPorts: containers and restartable init containers only
    assert sorted(host_ports(p)) == [("TCP", "0.0.0.0", 80), ("UDP", "10.0.0.1", 9002)]
    # generic ephemeral volumes are claims named <pod>-<volume>
    assert list(pvc_names(p)) == ["default/data", "default/web-scratch"]
