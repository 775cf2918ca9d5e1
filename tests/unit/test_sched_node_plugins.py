"""NodeName, NodeUnschedulable, NodePorts, TaintToleration and NodeAffinity: fits / does not fit
with upstream's reasons and codes, and their scores (upstream's taint_toleration_test.go and
node_affinity_test.go cases where they exist)."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.framework import Code, CycleState
from scheduler.plugins.nodeaffinity import NodeAffinity
from scheduler.plugins.nodebasic import NodeName, NodePorts, NodeUnschedulable
from scheduler.plugins.tainttoleration import TaintToleration
from scheduler.podutil import new_pod_info
from tests.sched_builders import FakeHandle, node, pod, run_filter, run_scores, snapshot

OK = (Code.SUCCESS, ())


def one(plugin_cls: type, p: dict, n: dict, existing: list | None = None, args: dict | None = None) -> tuple:
    infos = snapshot([n], existing or [])
    st = run_filter(plugin_cls(FakeHandle(infos), args or {}), p, infos)[n["metadata"]["name"]]
    return st.code, st.reasons


def test_node_name() -> None:
    assert one(NodeName, pod(nodeName="n1"), node("n1")) == OK
    assert one(NodeName, pod(nodeName="n2"), node("n1")) == (
        Code.UNSCHEDULABLE_AND_UNRESOLVABLE, ("node(s) didn't match the requested node name",))
    assert one(NodeName, pod(), node("n1")) == OK


@pytest.mark.parametrize(("tolerations", "fits"), [
    ([], False),
    ([{"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}], True),
    ([{"operator": "Exists"}], True),
    ([{"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoExecute"}], False),
])
def test_node_unschedulable(tolerations: list, fits: bool) -> None:
    got = one(NodeUnschedulable, pod(tolerations=tolerations), node("n1", unschedulable=True))
    assert got == (OK if fits else (Code.UNSCHEDULABLE_AND_UNRESOLVABLE, ("node(s) were unschedulable",)))
    assert one(NodeUnschedulable, pod(tolerations=tolerations), node("n1")) == OK


def _ported(name: str, *ports: tuple[str, str, int], node_name: str = "") -> dict:
    return pod(name, node=node_name, containers=[{"name": "c", "ports": [
        {"containerPort": 1, "protocol": proto, "hostIP": ip, "hostPort": hp} for proto, ip, hp in ports]}])


@pytest.mark.parametrize(("want", "used", "fits"), [
    ([("UDP", "127.0.0.1", 8080)], [("UDP", "127.0.0.1", 9090)], True),
    ([("UDP", "127.0.0.1", 8080)], [("UDP", "127.0.0.1", 8080)], False),
    ([("TCP", "127.0.0.1", 8080)], [("UDP", "127.0.0.1", 8080)], True),
    ([("TCP", "127.0.0.1", 8001)], [("TCP", "127.0.0.2", 8001)], True),
    ([("TCP", "0.0.0.0", 8001)], [("TCP", "127.0.0.1", 8001)], False),
    ([("TCP", "127.0.0.1", 8001)], [("TCP", "0.0.0.0", 8001)], False),
    ([("TCP", "", 8001)], [("TCP", "10.0.0.1", 8001)], False),  # empty hostIP is 0.0.0.0
])
def test_node_ports(want: list, used: list, fits: bool) -> None:
    got = one(NodePorts, _ported("p", *want), node("n1"), [_ported("e", *used, node_name="n1")])
    assert got == (OK if fits else (Code.UNSCHEDULABLE,
                                    ("node(s) didn't have free ports for the requested pod ports",)))


TAINT = {"key": "dedicated", "value": "user1", "effect": "NoSchedule"}


@pytest.mark.parametrize(("taints", "tolerations", "reason"), [
    ([TAINT], [], "node(s) had untolerated taint {dedicated: user1}"),
    ([TAINT], [{"key": "dedicated", "value": "user1", "effect": "NoSchedule"}], None),
    ([TAINT], [{"key": "dedicated", "operator": "Equal", "value": "user2", "effect": "NoSchedule"}],
     "node(s) had untolerated taint {dedicated: user1}"),
    ([TAINT], [{"key": "dedicated", "operator": "Exists"}], None),
    ([TAINT], [{"operator": "Exists"}], None),
    ([{"key": "foo", "value": "bar", "effect": "PreferNoSchedule"}], [], None),  # soft: not filtered
    ([{"key": "gone", "effect": "NoExecute"}], [{"key": "gone", "operator": "Exists", "effect": "NoSchedule"}],
     "node(s) had untolerated taint {gone: }"),
    ([{"key": "kosmos.io/node", "value": "true", "effect": "NoSchedule"}], [],
     "node(s) had untolerated taint {kosmos.io/node: true}"),
])
def test_taint_toleration_filter(taints: list, tolerations: list, reason: str | None) -> None:
    got = one(TaintToleration, pod(tolerations=tolerations), node("n1", taints=taints))
    assert got == (OK if reason is None else (Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (reason,)))


def test_taint_toleration_score() -> None:
    # upstream: "the more intolerable taints a node has, the lower score it gets"
    soft = [{"key": f"k{i}", "value": "v", "effect": "PreferNoSchedule"} for i in range(2)]
    infos = snapshot([node("n0"), node("n1", taints=soft[:1]), node("n2", taints=soft)])
    p = pod(tolerations=[{"key": "k9", "operator": "Exists"}])
    assert run_scores(TaintToleration(FakeHandle(infos), {}), p, infos) == {"n0": 100, "n1": 50, "n2": 0}
    # tolerating one of them (a PreferNoSchedule toleration): that taint no longer counts
    p = pod(tolerations=[{"key": "k0", "operator": "Exists", "effect": "PreferNoSchedule"}])
    assert run_scores(TaintToleration(FakeHandle(infos), {}), p, infos) == {"n0": 100, "n1": 100, "n2": 0}
    # a NoSchedule toleration does not make a PreferNoSchedule taint tolerable
    p = pod(tolerations=[{"key": "k0", "operator": "Exists", "effect": "NoSchedule"}])
    assert run_scores(TaintToleration(FakeHandle(infos), {}), p, infos) == {"n0": 100, "n1": 50, "n2": 0}


def req_affinity(*terms: dict) -> dict:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}}


def expr(key: str, op: str, *values: str) -> dict:
    e: dict[str, Any] = {"key": key, "operator": op}
    if values:
        e["values"] = list(values)
    return e


AFF_POD = "node(s) didn't match Pod's node affinity/selector"


@pytest.mark.parametrize(("spec", "labels", "fits"), [
    ({"nodeSelector": {"foo": "bar"}}, {"foo": "bar"}, True),
    ({"nodeSelector": {"foo": "bar"}}, {"foo": "baz"}, False),
    ({"nodeSelector": {"foo": "bar"}}, {}, False),
    ({"affinity": req_affinity({"matchExpressions": [expr("foo", "In", "bar", "value2")]})}, {"foo": "bar"}, True),
    ({"affinity": req_affinity({"matchExpressions": [expr("kernel-version", "Gt", "0204")]})},
     {"kernel-version": "0206"}, True),
    ({"affinity": req_affinity({"matchExpressions": [expr("kernel-version", "Gt", "0204")]})},
     {"kernel-version": "0200"}, False),
    ({"affinity": req_affinity({"matchExpressions": [expr("mem-type", "NotIn", "DDR", "DDR2")]})},
     {"mem-type": "DDR3"}, True),
    ({"affinity": req_affinity({"matchExpressions": [expr("mem-type", "NotIn", "DDR")]})}, {}, True),
    ({"affinity": req_affinity({"matchExpressions": [expr("GPU", "Exists")]})}, {"GPU": "NVIDIA-GRID-K1"}, True),
    ({"affinity": req_affinity({"matchExpressions": [expr("GPU", "DoesNotExist")]})}, {"GPU": "x"}, False),
    ({"affinity": req_affinity({"matchExpressions": [expr("foo", "In", "bar")]},
                               {"matchExpressions": [expr("diffkey", "In", "wrong")]})}, {"foo": "bar"}, True),
    # an empty term matches nothing; no terms at all match nothing
    ({"affinity": req_affinity({})}, {"foo": "bar"}, False),
    ({"affinity": req_affinity()}, {"foo": "bar"}, False),
    # nodeSelector AND affinity
    ({"nodeSelector": {"foo": "bar"}, "affinity": req_affinity({"matchExpressions": [expr("x", "Exists")]})},
     {"foo": "bar"}, False),
    ({"affinity": req_affinity({"matchFields": [expr("metadata.name", "In", "n1")]})}, {}, True),
    ({"affinity": req_affinity({"matchFields": [expr("metadata.name", "NotIn", "n1")]})}, {}, False),
    ({"affinity": req_affinity({"matchExpressions": [expr("x", "Bogus", "y")]})}, {"x": "y"}, False),
])
def test_node_affinity_filter(spec: dict, labels: dict, fits: bool) -> None:
    got = one(NodeAffinity, pod(**spec), node("n1", labels=labels))
    assert got == (OK if fits else (Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (AFF_POD,)))


def test_node_affinity_prefilter_names() -> None:
    na = NodeAffinity(FakeHandle(), {})
    p = pod(affinity=req_affinity({"matchFields": [expr("metadata.name", "In", "n1")]},
                                  {"matchFields": [expr("metadata.name", "In", "n2")]}))
    res, st = na.pre_filter(CycleState(), new_pod_info(p), [])
    assert st.ok and res is not None and res.node_names == frozenset({"n1", "n2"})
    p = pod(affinity=req_affinity({"matchFields": [expr("metadata.name", "In", "n1"),
                                                   expr("metadata.name", "In", "n2")]}))
    _, st = na.pre_filter(CycleState(), new_pod_info(p), [])
    assert (st.code, st.reasons) == (Code.UNSCHEDULABLE_AND_UNRESOLVABLE, ("pod affinity terms conflict",))
    _, st = na.pre_filter(CycleState(), new_pod_info(pod()), [])
    assert st.code == Code.SKIP


def test_node_affinity_added_affinity() -> None:
    args = {"addedAffinity": req_affinity({"matchExpressions": [expr("zone", "In", "foo")]})["nodeAffinity"]}
    assert one(NodeAffinity, pod(), node("n1", labels={"zone": "foo"}), args=args) == OK
    assert one(NodeAffinity, pod(), node("n1", labels={"zone": "bar"}), args=args) == (
        Code.UNSCHEDULABLE_AND_UNRESOLVABLE, ("node(s) didn't match scheduler-enforced node affinity",))


def test_node_affinity_score() -> None:
    # upstream "all nodes matches the preferred scheduling requirements of pod, ..."-style case
    pref = [{"weight": 2, "preference": {"matchExpressions": [expr("foo", "In", "bar")]}},
            {"weight": 4, "preference": {"matchExpressions": [expr("key", "In", "value")]}},
            {"weight": 5, "preference": {"matchExpressions": [expr("az", "In", "az1")]}}]
    infos = snapshot([node("m1", labels={"foo": "bar"}),
                      node("m2", labels={"key": "value"}),
                      node("m3", labels={"foo": "bar", "key": "value", "az": "az1"})])
    p = pod(affinity={"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": pref}})
    na = NodeAffinity(FakeHandle(infos), {})
    assert run_scores(na, p, infos, normalize=False) == {"m1": 2, "m2": 4, "m3": 11}
    assert run_scores(na, p, infos) == {"m1": 18, "m2": 36, "m3": 100}
    assert run_scores(na, pod(), infos) == {"m1": 0, "m2": 0, "m3": 0}
