"""The pin and stranded leaf copies (issue 19, "never strand a pod"; :mod:`tree.podsync`,
:func:`tree.pods.leaf_pod`): a cluster-mode copy of a root pod annotated ``kosmos.io/leaf-node``
is pinned to that leaf node (ANDed into the pod's own translated affinity); a copy Unschedulable
in its leaf past ``stranded_after`` is re-created without its pin when pinned, has its root pod
evicted once when a controller owns it, gets only an Event when bare; a copy the leaf schedules
in time is left alone. Against in-process API servers (:mod:`tests.tree_env`), the tests playing
the leaf's scheduler."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scheduler.kube import resource_path
from tests.tree_env import ROOT_ID, TreeEnv, tree_env
from tests.unit.test_tree_pods import root_pod as pure_root_pod
from tests.unit.test_tree_pods_sync import RUNNING, copies, one_copy, sample, syncer
from tests.waiting import wait_until
from tree.leaf import Options
from tree.pods import (
    CLUSTER_SELECTOR_ANNOTATION,
    LEAF_NODE_ANNOTATION,
    PINNED_ANNOTATION,
    leaf_node_pin,
    leaf_pod,
    leaf_update,
    pinned_node,
    unschedulable,
)
from tree.spec import Mode

Obj = dict[str, Any]
STRANDED_AFTER = 1.0
PIN_FIELD = {"key": "metadata.name", "operator": "In", "values": ["a"]}
UNSCHEDULABLE = {"phase": "Pending", "conditions": [
    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
     "message": "0/1 nodes are available: 1 Insufficient cpu."}]}


# ---------------------------------------------------------------------- the pure part


def test_the_pin_is_anded_into_every_required_term_and_marks_the_copy() -> None:
    pod = pure_root_pod()
    sel = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]},
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z2"]}]}]}}}}
    pod["metadata"]["annotations"] = {CLUSTER_SELECTOR_ANNOTATION: json.dumps(sel), LEAF_NODE_ANNOTATION: "a"}
    assert leaf_node_pin(pod) == ("a", "")
    out = leaf_pod(pod, root_id="r", leaf_name="web", mode=Mode.CLUSTER, pin="a")
    terms = out["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert [t["matchExpressions"][0]["values"] for t in terms] == [["z1"], ["z2"]]
    assert all(t["matchFields"] == [PIN_FIELD] for t in terms)
    assert pinned_node(out) == "a"
    # no affinity of its own: one term with the pin only
    bare = leaf_pod(pure_root_pod(), root_id="r", leaf_name="web", mode=Mode.CLUSTER, pin="a")
    assert bare["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [{"matchFields": [PIN_FIELD]}]}
    # the pin annotation is the copy's own: an update from the root does not remove it
    assert not any(op.get("path", "").endswith("pinned-leaf-node") for op in leaf_update(pod, out, "r") or [])
    # only cluster mode pins; no pin, no mark
    for mode in (Mode.NODE, Mode.PARTY):
        assert pinned_node(leaf_pod(pod, root_id="r", leaf_name="web", mode=mode, pin="a")) is None
    assert PINNED_ANNOTATION not in leaf_pod(pod, root_id="r", leaf_name="web", mode=Mode.CLUSTER)["metadata"][
        "annotations"]


def test_a_bad_pin_value_is_named_and_unschedulable_reads_the_condition() -> None:
    for bad in ("", "Not_A_Node", "a" * 254, "-a"):
        pod = pure_root_pod()
        pod["metadata"]["annotations"] = {LEAF_NODE_ANNOTATION: bad}
        pin, problem = leaf_node_pin(pod)
        assert pin is None and LEAF_NODE_ANNOTATION in problem and repr(bad) in problem
    assert leaf_node_pin(pure_root_pod()) == (None, "")
    copy: Obj = {"metadata": {}, "spec": {}, "status": UNSCHEDULABLE}
    assert unschedulable(copy) == "0/1 nodes are available: 1 Insufficient cpu."
    assert unschedulable({**copy, "spec": {"nodeName": "a"}}) is None
    assert unschedulable({**copy, "status": {"phase": "Pending"}}) is None
    waiting = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                  "reason": "SchedulingGated"}]}
    assert unschedulable({**copy, "status": waiting}) is None


# ---------------------------------------------------------------------- the syncer


@pytest.fixture
def env() -> Iterator[TreeEnv]:
    with tree_env(graceful_pods=True) as e:
        e.add_node("leaf1", "a")
        e.add_node("leaf1", "b")
        e.add_cluster("leaf1", "leaf1")
        opts = Options(root_id=ROOT_ID, leaf_timeout=0.5, unreachable_after=1.0, lease_period=0.2,
                       status_period=60.0, resync_period=1.0, root_timeout=5.0, stranded_after=STRANDED_AFTER)
        e.start_manager(options=opts)
        wait_until(lambda: e.vnode("kosmos-leaf1"), 10, "the virtual node kosmos-leaf1")
        yield e


def events(env: TreeEnv, uid: str) -> list[Obj]:
    items: list[Obj] = env.root.get(resource_path("v1", "events", "default"))["items"]
    return [e for e in items if e["involvedObject"].get("uid") == uid]


def stranded(env: TreeEnv, action: str) -> float:
    return sample(env, "fabric_tree_pods_stranded_total", action=action)


def owned_pod(env: TreeEnv, name: str) -> Obj:
    # the owner's UID is an existing object's, so the emulator's garbage collector keeps the pod
    holder = env.root.create(resource_path("v1", "configmaps", "default"),
                             {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-rs"}})
    return env.add_root_pod(name, "kosmos-leaf1", owners=[
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{name}-rs", "uid": holder["metadata"]["uid"],
         "controller": True}])


def test_a_stranded_pinned_copy_is_created_again_without_the_pin(env: TreeEnv) -> None:
    pod = env.add_root_pod("web", "kosmos-leaf1", annotations={LEAF_NODE_ANNOTATION: "a"})
    uid = pod["metadata"]["uid"]
    first = one_copy(env, uid)
    assert pinned_node(first) == "a"
    assert first["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [{"matchFields": [PIN_FIELD]}]}
    env.set_leaf_status("leaf1", first, UNSCHEDULABLE)

    def again() -> Obj | None:
        c = copies(env, uid)
        return c[0] if len(c) == 1 and c[0]["metadata"]["uid"] != first["metadata"]["uid"] else None

    second = wait_until(again, 15, "a second, unpinned copy")
    assert pinned_node(second) is None and "affinity" not in second["spec"]
    root = env.root_pod("web") or {}
    assert LEAF_NODE_ANNOTATION not in (root["metadata"].get("annotations") or {})  # a restart does not pin
    ev = wait_until(lambda: events(env, uid) or None, 10, "the Event on the root pod")
    assert [e["reason"] for e in ev] == ["LeafNodeUnpinned"]
    assert "leaf node a" in ev[0]["message"] and "Insufficient cpu" in ev[0]["message"]
    assert stranded(env, "unpinned") == 1 and stranded(env, "evicted") == 0
    # the unpinned copy is placed by the leaf: bound and running, nothing more happens
    env.bind_leaf("leaf1", second, "b")
    env.set_leaf_status("leaf1", second, RUNNING)
    wait_until(lambda: (env.root_pod("web") or {}).get("status", {}).get("phase") == "Running", 10, "Running")
    assert [c["metadata"]["uid"] for c in copies(env, uid)] == [second["metadata"]["uid"]]


def test_a_stranded_owned_pod_is_evicted_once(env: TreeEnv) -> None:
    pod = owned_pod(env, "web")
    uid = pod["metadata"]["uid"]
    copy = one_copy(env, uid)
    assert pinned_node(copy) is None
    evictions: list[str] = []
    root_api = syncer(env).root
    request = root_api.request

    def counting(method: str, path: str, *a: Any, **kw: Any) -> Any:
        if path.endswith("/eviction"):
            evictions.append(path)
        return request(method, path, *a, **kw)

    root_api.request = counting  # type: ignore[method-assign]
    env.set_leaf_status("leaf1", copy, UNSCHEDULABLE)
    wait_until(lambda: (env.root_pod("web") or {}).get("metadata", {}).get("deletionTimestamp") or
               env.root_pod("web") is None, 15, "the root pod evicted")
    for _ in range(3):  # more steps over the same pod evict nothing more
        syncer(env).sync_one(uid)
    wait_until(lambda: env.root_pod("web") is None, 15, "the root pod gone (its copy deleted first)")
    assert copies(env, uid) == []
    assert evictions == ["/api/v1/namespaces/default/pods/web/eviction"]
    assert stranded(env, "evicted") == 1
    ev = events(env, uid)
    assert [e["reason"] for e in ev] == ["LeafCannotHostPod"], ev
    assert "Insufficient cpu" in ev[0]["message"] and "ReplicaSet web-rs" in ev[0]["message"]


def test_a_stranded_bare_pod_gets_an_event_only(env: TreeEnv) -> None:
    pod = env.add_root_pod("bare", "kosmos-leaf1")
    uid = pod["metadata"]["uid"]
    copy = one_copy(env, uid)
    env.set_leaf_status("leaf1", copy, UNSCHEDULABLE)
    ev = wait_until(lambda: events(env, uid) or None, 15, "the Event on the root pod")
    assert [e["reason"] for e in ev] == ["LeafCannotHostPod"]
    assert "no controller" in ev[0]["message"] and "Insufficient cpu" in ev[0]["message"]
    time.sleep(STRANDED_AFTER + 1.5)  # further steps (resync every second) post nothing more
    syncer(env).sync_one(uid)
    assert len(events(env, uid)) == 1
    assert stranded(env, "reported") == 1
    root = env.root_pod("bare") or {}
    assert not root["metadata"].get("deletionTimestamp")
    assert [c["metadata"]["uid"] for c in copies(env, uid)] == [copy["metadata"]["uid"]]


def test_a_copy_scheduled_before_the_deadline_is_left_alone(env: TreeEnv) -> None:
    pod = owned_pod(env, "quick")
    uid = pod["metadata"]["uid"]
    copy = one_copy(env, uid)
    env.set_leaf_status("leaf1", copy, UNSCHEDULABLE)
    time.sleep(STRANDED_AFTER / 4)
    env.bind_leaf("leaf1", copy, "a")
    env.set_leaf_status("leaf1", copy, RUNNING)
    wait_until(lambda: (env.root_pod("quick") or {}).get("status", {}).get("phase") == "Running", 10, "Running")
    time.sleep(STRANDED_AFTER + 1.5)
    syncer(env).sync_one(uid)
    assert not (env.root_pod("quick") or {})["metadata"].get("deletionTimestamp")
    assert [c["metadata"]["uid"] for c in copies(env, uid)] == [copy["metadata"]["uid"]]
    assert events(env, uid) == []
    assert sum(stranded(env, a) for a in ("unpinned", "evicted", "reported")) == 0


def test_a_bad_pin_is_an_event_and_an_unpinned_copy(env: TreeEnv) -> None:
    pod = env.add_root_pod("odd", "kosmos-leaf1", annotations={LEAF_NODE_ANNOTATION: "Not_A_Node"})
    uid = pod["metadata"]["uid"]
    copy = one_copy(env, uid)
    assert pinned_node(copy) is None and "affinity" not in copy["spec"]
    ev = wait_until(lambda: events(env, uid) or None, 10, "the Event on the root pod")
    assert ev[0]["reason"] == "LeafNodePinIgnored" and "Not_A_Node" in ev[0]["message"]
