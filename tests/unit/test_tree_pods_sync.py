"""Pods root -> leaf -> root (:mod:`tree.podsync`) against in-process API servers: a root pod
bound to a virtual node gets one leaf copy with the right fields; the status the leaf reports
(the tests play the leaf's kubelet) comes back; updates go down; deletion works both ways with
grace periods; a copy deleted or edited in the leaf is put back; a restarted manager duplicates
nothing; two roots sharing a leaf stay apart; a StatefulSet pod recreated under the same name
gets exactly one copy; an unreachable leaf stalls nobody else."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from scheduler.kube import ApiError, resource_path
from tests.tree_env import ROOT_ID, TreeEnv, pod_gets, tree_env
from tests.waiting import wait_until
from tree import identity
from tree.leaf import Options
from tree.podsync import PodSyncer

Obj = dict[str, Any]
RUNNING = {"phase": "Running", "podIP": "10.20.0.7", "podIPs": [{"ip": "10.20.0.7"}], "hostIP": "192.0.2.1",
           "startTime": "2026-01-01T00:00:00Z",
           "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"},
                          {"type": "PodScheduled", "status": "True"}],
           "containerStatuses": [{"name": "c", "ready": True, "restartCount": 0, "image": "busybox",
                                  "imageID": "", "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}}}]}


@pytest.fixture
def env() -> Iterator[TreeEnv]:
    with tree_env(graceful_pods=True) as e:
        e.add_node("leaf1", "a")
        e.add_cluster("leaf1", "leaf1")
        yield e


def started(env: TreeEnv, **kw: Any) -> None:
    env.start_manager(**kw)
    wait_until(lambda: env.vnode("kosmos-leaf1"), 10, "the virtual node kosmos-leaf1")


def syncer(env: TreeEnv, cluster: str = "leaf1") -> PodSyncer:
    pods = env.managers[0].reconcilers[cluster].pods
    assert pods is not None
    return pods


def sample(env: TreeEnv, name: str, **labels: str) -> float:
    return env.managers[0].metrics.registry.get_sample_value(name, {"cluster": "leaf1", **labels}) or 0.0


def copies(env: TreeEnv, uid: str, leaf: str = "leaf1", root_id: str = ROOT_ID) -> list[Obj]:
    return env.leaf_pods(leaf, identity.selector(root_id, uid))


def one_copy(env: TreeEnv, uid: str, leaf: str = "leaf1", root_id: str = ROOT_ID, timeout: float = 10) -> Obj:
    got = wait_until(lambda: (c := copies(env, uid, leaf, root_id)) and len(c) == 1 and c, timeout,
                     f"one leaf copy of {uid}")
    return got[0]


def gone_for_good(env: TreeEnv, leaf: str, ns: str, name: str) -> None:
    """Play the leaf's kubelet: a pod being deleted is confirmed with grace 0."""
    try:
        env.leaf(leaf).request("DELETE", resource_path("v1", "pods", ns, name), {"gracePeriodSeconds": 0})
    except ApiError as e:
        if e.status != 404:
            raise


def test_bound_root_pod_gets_one_leaf_copy_with_the_right_fields(env: TreeEnv) -> None:
    started(env)
    sel = '{"nodeSelector": {"disk": "ssd"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]}'
    pod = env.add_root_pod("web", "kosmos-leaf1", namespace="app", labels={"app": "web"},
                           annotations={"kosmos.io/cluster-selector": sel, "note": "x"},
                           nodeSelector={"kosmos.io/node": "true"},
                           tolerations=[{"key": "kosmos.io/node", "operator": "Equal", "value": "true",
                                         "effect": "NoSchedule"}])
    uid = pod["metadata"]["uid"]
    leaf = one_copy(env, uid)
    meta, spec = leaf["metadata"], leaf["spec"]
    assert meta["name"] == "web" and meta["namespace"] == "app"
    assert meta["uid"] != uid and not meta.get("ownerReferences")
    assert meta["labels"]["app"] == "web"
    assert identity.root_of(leaf) == (ROOT_ID, uid)
    assert meta["annotations"][identity.ROOT_NAME_ANNOTATION] == "app/web"
    assert meta["annotations"]["note"] == "x"
    assert "nodeName" not in spec  # cluster mode: the leaf's scheduler places it
    assert spec["nodeSelector"] == {"disk": "ssd"}  # the cluster selector's placement, not the root's
    assert {"key": "gpu", "operator": "Exists"} in spec["tolerations"]
    assert not any(t.get("key") == "kosmos.io/node" for t in spec["tolerations"])
    assert spec["automountServiceAccountToken"] is False
    # the namespace was created on demand
    assert env.leaf("leaf1").get("/api/v1/namespaces/app")["metadata"]["name"] == "app"


def test_leaf_status_flows_back_and_an_equal_status_is_not_written_again(env: TreeEnv) -> None:
    started(env)
    pod = env.add_root_pod("web", "kosmos-leaf1")
    leaf = one_copy(env, pod["metadata"]["uid"])
    env.set_leaf_status("leaf1", leaf, RUNNING)
    root = wait_until(lambda: (p := env.root_pod("web")) and p["status"].get("phase") == "Running" and p, 10,
                      "the root pod Running")
    st = root["status"]
    assert st["podIP"] == "10.20.0.7" and st["podIPs"] == [{"ip": "10.20.0.7"}] and st["hostIP"] == "192.0.2.1"
    assert st["containerStatuses"][0]["state"] == {"running": {"startedAt": "2026-01-01T00:00:01Z"}}
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "True"
    rv = root["metadata"]["resourceVersion"]
    # another step over the same pod finds nothing to write
    manager = env.managers[0]
    before = sample(env, "fabric_tree_pod_writes_total", kind="root-status")
    wait_until(lambda: (syncer(env).root_pods.get(pod["metadata"]["uid"]) or {})["metadata"]["resourceVersion"] == rv,
               10, "the syncer's view of the root pod up to date")
    syncer(env).sync_one(pod["metadata"]["uid"])
    assert (env.root_pod("web") or {})["metadata"]["resourceVersion"] == rv
    assert sample(env, "fabric_tree_pod_writes_total", kind="root-status") == before
    assert manager.metrics.registry.get_sample_value("fabric_tree_pod_sync_seconds_count", {"cluster": "leaf1"})


def test_updates_flow_down_and_a_leaf_edit_is_put_back(env: TreeEnv) -> None:
    started(env)
    pod = env.add_root_pod("web", "kosmos-leaf1", labels={"app": "web", "gone": "soon"})
    uid = pod["metadata"]["uid"]
    leaf = one_copy(env, uid)
    env.root.patch(resource_path("v1", "pods", "default", "web"),
                   {"metadata": {"labels": {"app": "web2", "gone": None}, "annotations": {"a": "1"}},
                    "spec": {"activeDeadlineSeconds": 600}})
    env.root.request("PATCH", resource_path("v1", "pods", "default", "web"),
                     [{"op": "replace", "path": "/spec/containers/0/image", "value": "nginx"}],
                     ctype="application/json-patch+json")

    def updated() -> Obj | None:
        c = copies(env, uid)
        if not c:
            return None
        m, s = c[0]["metadata"], c[0]["spec"]
        ok = (m["labels"].get("app") == "web2" and "gone" not in m["labels"] and m["annotations"].get("a") == "1"
              and s["containers"][0]["image"] == "nginx" and s.get("activeDeadlineSeconds") == 600)
        return c[0] if ok else None
    leaf = wait_until(updated, 10, "the leaf copy updated")
    assert leaf["metadata"]["uid"] == one_copy(env, uid)["metadata"]["uid"]  # patched, not recreated
    # someone edits the copy in the leaf: put back; a label the leaf's own controllers add stays
    env.leaf("leaf1").patch(resource_path("v1", "pods", "default", leaf["metadata"]["name"]),
                            {"metadata": {"labels": {"app": "tampered", "leaf-own": "yes"}}})
    wait_until(lambda: (c := copies(env, uid)) and c[0]["metadata"]["labels"]["app"] == "web2" and c, 10,
               "the edited label put back")
    assert copies(env, uid)[0]["metadata"]["labels"]["leaf-own"] == "yes"


def test_root_deletion_deletes_the_copy_with_its_grace_then_finishes_the_root_pod(env: TreeEnv) -> None:
    started(env)
    pod = env.add_root_pod("web", "kosmos-leaf1", terminationGracePeriodSeconds=45)
    uid = pod["metadata"]["uid"]
    leaf = one_copy(env, uid)
    env.bind_leaf("leaf1", leaf, "a")
    env.root.request("DELETE", resource_path("v1", "pods", "default", "web"), {"gracePeriodSeconds": 20})
    terminating = wait_until(lambda: (c := copies(env, uid)) and c[0]["metadata"].get("deletionTimestamp") and c[0],
                             10, "the leaf copy terminating")
    assert terminating["metadata"]["deletionGracePeriodSeconds"] == 20
    assert env.root_pod("web") is not None  # the root pod waits for its copy
    gone_for_good(env, "leaf1", "default", leaf["metadata"]["name"])
    wait_until(lambda: env.root_pod("web") is None, 10, "the root pod gone once its copy is gone")


def test_a_copy_deleted_in_the_leaf_is_recreated_and_the_root_pod_stays(env: TreeEnv) -> None:
    started(env)
    pod = env.add_root_pod("web", "kosmos-leaf1")
    uid = pod["metadata"]["uid"]
    first = one_copy(env, uid)
    env.leaf("leaf1").request("DELETE", resource_path("v1", "pods", "default", "web"))
    gone_for_good(env, "leaf1", "default", "web")
    again = wait_until(lambda: (c := copies(env, uid)) and c[0]["metadata"]["uid"] != first["metadata"]["uid"] and c[0],
                       10, "the copy created again")
    assert again["metadata"]["name"] == "web"
    root = env.root_pod("web")
    assert root is not None and root["metadata"]["uid"] == uid and not root["metadata"].get("deletionTimestamp")


def test_a_copy_whose_root_pod_is_gone_is_deleted(env: TreeEnv) -> None:
    started(env)
    pod = env.add_root_pod("web", "kosmos-leaf1")
    uid = pod["metadata"]["uid"]
    one_copy(env, uid)
    env.root.request("DELETE", resource_path("v1", "pods", "default", "web"), {"gracePeriodSeconds": 0})
    wait_until(lambda: (c := copies(env, uid)) == [] or (c and c[0]["metadata"].get("deletionTimestamp")), 10,
               "the orphaned copy deleted")


def test_pods_not_ours_and_pods_on_other_nodes_are_left_alone(env: TreeEnv) -> None:
    started(env)
    env.add_node("leaf1", "b")
    theirs = env.add_pod("leaf1", "theirs", node="b")
    env.root.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "real"}})
    other = env.add_root_pod("elsewhere", "real")
    mine = env.add_root_pod("web", "kosmos-leaf1")
    one_copy(env, mine["metadata"]["uid"])
    assert copies(env, other["metadata"]["uid"]) == []
    names = {p["metadata"]["name"] for p in env.leaf("leaf1").get("/api/v1/pods")["items"]}
    assert names == {"theirs", "web"}
    assert env.leaf("leaf1").get(resource_path("v1", "pods", "default", "theirs"))["metadata"]["uid"] == \
        theirs["metadata"]["uid"]


def test_a_name_taken_in_the_leaf_gives_a_suffixed_copy_with_the_root_hostname(env: TreeEnv) -> None:
    started(env)
    env.add_pod("leaf1", "web", node="a")  # a leaf user's pod holds the name
    pod = env.add_root_pod("web", "kosmos-leaf1")
    leaf = one_copy(env, pod["metadata"]["uid"])
    assert leaf["metadata"]["name"] == "web-" + identity.suffix(ROOT_ID, pod["metadata"]["uid"])
    assert leaf["spec"]["hostname"] == "web"


def test_restarted_manager_resumes_without_duplicates(env: TreeEnv) -> None:
    started(env)
    uids = [env.add_root_pod(f"p{i}", "kosmos-leaf1")["metadata"]["uid"] for i in range(5)]
    before = {u: one_copy(env, u)["metadata"]["uid"] for u in uids}
    env.stop_manager(env.managers[0])
    extra = env.add_root_pod("late", "kosmos-leaf1")  # created while no manager runs
    started(env)
    late = one_copy(env, extra["metadata"]["uid"])
    assert late["metadata"]["name"] == "late"
    wait_until(lambda: sample(env, "fabric_tree_pods_synced") == 6, 10, "6 pods synced")
    after = {u: one_copy(env, u)["metadata"]["uid"] for u in uids}
    assert after == before
    assert len(env.leaf("leaf1").get("/api/v1/pods")["items"]) == 6


def test_two_roots_sharing_a_leaf_are_isolated(env: TreeEnv) -> None:
    started(env)
    with tree_env(graceful_pods=True) as other:
        other.leaves["leaf1"] = env.leaves["leaf1"]  # the same leaf server
        try:
            other.add_cluster("leaf1", "leaf1")
            opts = Options(root_id="other-root", leaf_timeout=0.5, unreachable_after=1.0, lease_period=0.2,
                           status_period=60.0, resync_period=1.0, root_timeout=5.0)
            other.start_manager(options=opts)
            wait_until(lambda: other.vnode("kosmos-leaf1"), 10, "the other root's virtual node")
            mine = env.add_root_pod("web", "kosmos-leaf1", namespace="app")
            theirs = other.add_root_pod("web", "kosmos-leaf1", namespace="app")
            a = one_copy(env, mine["metadata"]["uid"])
            b = one_copy(other, theirs["metadata"]["uid"], root_id="other-root")
            assert a["metadata"]["uid"] != b["metadata"]["uid"]
            assert a["metadata"]["name"] != b["metadata"]["name"] and "web" in {a["metadata"]["name"],
                                                                                b["metadata"]["name"]}
            env.set_leaf_status("leaf1", b, RUNNING)
            wait_until(lambda: (p := other.root_pod("web", "app")) and p["status"].get("phase") == "Running", 10,
                       "the other root's pod Running")
            assert (env.root_pod("web", "app") or {}).get("status", {}).get("phase") != "Running"
            # deleting one root's pod deletes its copy only
            other.root.request("DELETE", resource_path("v1", "pods", "app", "web"), {"gracePeriodSeconds": 0})
            wait_until(lambda: not [c for c in copies(other, theirs["metadata"]["uid"], root_id="other-root")
                                    if not c["metadata"].get("deletionTimestamp")], 10, "the other root's copy deleted")
            gone_for_good(env, "leaf1", "app", b["metadata"]["name"])
            assert one_copy(env, mine["metadata"]["uid"])["metadata"]["uid"] == a["metadata"]["uid"]
        finally:
            del other.leaves["leaf1"]  # env stops the shared server


def test_statefulset_pod_recreated_under_the_same_name_gets_exactly_one_copy(env: TreeEnv) -> None:
    started(env)
    old = env.add_root_pod("db-0", "kosmos-leaf1", terminationGracePeriodSeconds=30)
    old_copy = one_copy(env, old["metadata"]["uid"])
    env.bind_leaf("leaf1", old_copy, "a")
    # the StatefulSet controller's pod is force-deleted and recreated at once under the same name
    env.root.request("DELETE", resource_path("v1", "pods", "default", "db-0"), {"gracePeriodSeconds": 0})
    new = env.add_root_pod("db-0", "kosmos-leaf1")
    wait_until(lambda: (c := copies(env, old["metadata"]["uid"])) and c[0]["metadata"].get("deletionTimestamp"), 10,
               "the old copy terminating")
    # the new pod waits: no second copy while the old one terminates
    wait_until(lambda: syncer(env).root_pods.get(new["metadata"]["uid"]), 10, "the new root pod seen")
    with pytest.raises(Exception, match="retry"):
        syncer(env).sync_one(new["metadata"]["uid"])
    assert copies(env, new["metadata"]["uid"]) == []
    gone_for_good(env, "leaf1", "default", old_copy["metadata"]["name"])
    leaf = one_copy(env, new["metadata"]["uid"])
    assert leaf["metadata"]["name"] == "db-0" and "hostname" not in leaf["spec"]
    names = [p["metadata"]["name"] for p in env.leaf("leaf1").get("/api/v1/pods")["items"]]
    assert names == ["db-0"]


def test_an_unreachable_leaf_stalls_nobody_else(env: TreeEnv) -> None:
    env.add_node("leaf2", "b")
    env.add_cluster("leaf2", "leaf2")
    started(env)
    wait_until(lambda: env.vnode("kosmos-leaf2"), 10, "kosmos-leaf2")
    env.fault("leaf2", latency_ms=5_000)
    try:
        stuck = env.add_root_pod("stuck", "kosmos-leaf2")
        pods = [env.add_root_pod(f"p{i}", "kosmos-leaf1") for i in range(3)]
        for p in pods:
            one_copy(env, p["metadata"]["uid"], timeout=5)
    finally:
        env.fault("leaf2")
    one_copy(env, stuck["metadata"]["uid"], leaf="leaf2", timeout=30)


def test_a_refused_pod_gets_an_event_and_the_others_go_on(env: TreeEnv) -> None:
    started(env, dependencies=None)  # the leaf refuses a pod whose ServiceAccount it lacks
    env.root.create(resource_path("v1", "serviceaccounts", "default"),
                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "missing-in-leaf"}})
    bad = env.add_root_pod("bad", "kosmos-leaf1", serviceAccountName="missing-in-leaf",
                           automountServiceAccountToken=False)
    good = env.add_root_pod("good", "kosmos-leaf1")
    one_copy(env, good["metadata"]["uid"])

    def event() -> Obj | None:
        items = env.root.get(resource_path("v1", "events", "default"))["items"]
        return next((e for e in items if e["involvedObject"].get("uid") == bad["metadata"]["uid"]), None)
    ev = wait_until(event, 10, "a Warning Event on the refused pod")
    assert ev["reason"] == "ProviderCreateFailed" and ev["type"] == "Warning"
    assert "missing-in-leaf" in ev["message"]
    assert copies(env, bad["metadata"]["uid"]) == []
    assert sample(env, "fabric_tree_pod_sync_errors_total", reason="refused") >= 1


def test_node_and_party_modes_place_the_copy_as_their_virtual_node_says(env: TreeEnv) -> None:
    env.add_node("leaf2", "n1", labels={"join": "yes"})
    env.add_cluster("leaf2", "leaf2", leafNodeMode="node",
                    leafModels=[{"nodeSelector": {"labelSelector": {"matchLabels": {"join": "yes"}}}}])
    env.add_node("leaf3", "g1", labels={"pool": "gpu"})
    env.add_cluster("leaf3", "leaf3", leafModels=[
        {"leafNodeName": "gpu", "nodeSelector": {"labelSelector": {"matchLabels": {"pool": "gpu"}}}}])
    started(env)
    wait_until(lambda: env.vnode("n1") and env.vnode("kosmos-leaf3-gpu"), 10, "the node and party virtual nodes")
    on_node = env.add_root_pod("on-node", "n1")
    in_party = env.add_root_pod("in-party", "kosmos-leaf3-gpu")
    assert one_copy(env, on_node["metadata"]["uid"], leaf="leaf2")["spec"]["nodeName"] == "n1"
    party = one_copy(env, in_party["metadata"]["uid"], leaf="leaf3")
    assert "nodeName" not in party["spec"]
    terms = party["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms == {"nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In",
                                                                  "values": ["gpu"]}]}]}


def test_daemonset_and_kube_system_pods_are_not_copied(env: TreeEnv) -> None:
    started(env)
    # the owner's UID is an existing object's, so the emulator's garbage collector keeps the pod
    holder = env.root.create(resource_path("v1", "configmaps", "default"),
                             {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "proxy"}})
    ds = env.add_root_pod("proxy-x", "kosmos-leaf1", owners=[
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "proxy", "uid": holder["metadata"]["uid"]}])
    system = env.add_root_pod("dns", "kosmos-leaf1", namespace="kube-system")
    marker = env.add_root_pod("marker", "kosmos-leaf1")
    one_copy(env, marker["metadata"]["uid"])
    for p in (ds, system):
        wait_until(lambda p=p: syncer(env).root_pods.get(p["metadata"]["uid"]), 10, "the root pod seen")
    syncer(env).sync_one(ds["metadata"]["uid"])
    syncer(env).sync_one(system["metadata"]["uid"])
    assert copies(env, ds["metadata"]["uid"]) == [] and copies(env, system["metadata"]["uid"]) == []


class FakeDeps:
    """A dependency syncer: a ConfigMap renamed, one refused; what is released is recorded."""

    def __init__(self) -> None:
        self.released: list[list[str]] = []
        self.running = False

    def ensure(self, root_pod: Obj, leaf_namespace: str) -> dict[tuple[str, str], str]:
        if root_pod["metadata"]["name"] == "needs-missing":
            raise DependencyError("ConfigMap default/missing not found in the root")
        return {("configmaps", "cm"): "cm-1234"}

    def release(self, leaf_pods_of_ours: Any) -> None:
        self.released.append(sorted(p["metadata"]["name"] for p in leaf_pods_of_ours))

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False


class DependencyError(Exception):
    pass


def test_dependencies_and_converter_hooks(env: TreeEnv) -> None:
    deps = FakeDeps()

    def convert(leaf: Obj, root: Obj, cluster: str) -> Obj:
        leaf["spec"]["nodeSelector"] = {"converted": f"{root['metadata']['name']}@{cluster}"}
        return leaf
    started(env, dependencies=lambda _spec, _root, _leaf: deps, converter=convert)
    assert wait_until(lambda: deps.running, 10, "the dependency syncer started")
    pod = env.add_root_pod("web", "kosmos-leaf1", volumes=[{"name": "cfg", "configMap": {"name": "cm"}}])
    leaf = one_copy(env, pod["metadata"]["uid"])
    assert leaf["spec"]["volumes"][0]["configMap"]["name"] == "cm-1234"
    assert leaf["spec"]["nodeSelector"] == {"converted": "web@leaf1"}
    wait_until(lambda: ["web"] in deps.released, 10, "the live copies handed to release")
    bad = env.add_root_pod("needs-missing", "kosmos-leaf1")

    def event() -> Obj | None:
        items = env.root.get(resource_path("v1", "events", "default"))["items"]
        return next((e for e in items if e["involvedObject"].get("uid") == bad["metadata"]["uid"]), None)
    ev = wait_until(event, 10, "an Event naming the missing dependency")
    assert ev["reason"] == "ProviderCreateFailed" and "default/missing" in ev["message"]
    assert sample(env, "fabric_tree_pod_sync_errors_total", reason="dependency") >= 1
    env.stop_manager(env.managers[0])
    assert not deps.running


def test_many_pods_and_a_restart_midway_leave_exactly_one_copy_each(env: TreeEnv) -> None:
    started(env)
    first = [env.add_root_pod(f"a{i}", "kosmos-leaf1")["metadata"]["uid"] for i in range(20)]
    seen = {u: one_copy(env, u)["metadata"]["uid"] for u in first[:5]}
    env.stop_manager(env.managers[0])  # the rest may or may not have copies yet
    second = [env.add_root_pod(f"b{i}", "kosmos-leaf1")["metadata"]["uid"] for i in range(20)]
    started(env)
    for u in first + second:
        one_copy(env, u)
    assert {u: one_copy(env, u)["metadata"]["uid"] for u in seen} == seen
    leaf_pods = env.leaf("leaf1").get("/api/v1/pods")["items"]
    assert sorted(p["metadata"]["labels"][identity.ROOT_UID_LABEL] for p in leaf_pods) == sorted(first + second)


def test_a_finished_pod_is_not_copied_again(env: TreeEnv) -> None:
    started(env)
    pod = env.add_root_pod("job-x", "kosmos-leaf1", restartPolicy="Never")
    uid = pod["metadata"]["uid"]
    leaf = one_copy(env, uid)
    env.set_leaf_status("leaf1", leaf, {"phase": "Succeeded", "containerStatuses": [
        {"name": "c", "ready": False, "restartCount": 0, "image": "busybox", "imageID": "",
         "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]})
    wait_until(lambda: (p := env.root_pod("job-x")) and p["status"].get("phase") == "Succeeded", 10,
               "the root pod Succeeded")
    gone_for_good(env, "leaf1", "default", leaf["metadata"]["name"])
    wait_until(lambda: syncer(env).copies_of(uid) == [], 10, "the syncer sees the copy gone")
    wait_until(lambda: (syncer(env).root_pods.get(uid) or {}).get("status", {}).get("phase") == "Succeeded", 10,
               "the syncer sees the root pod Succeeded")
    syncer(env).sync_one(uid)
    assert copies(env, uid) == []
    assert (env.root_pod("job-x") or {}).get("status", {}).get("phase") == "Succeeded"


def test_a_create_reads_the_root_pod_afresh_only_while_the_informer_may_miss_our_status_write(
        env: TreeEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain create uses the root informer's copy (no GET); after a status write of ours the
    informer has not shown yet, the create reads the root pod first, so a pod we just finished is
    not run again from the informer's stale view."""
    started(env)
    s = syncer(env)
    gets = pod_gets(s.root)
    pod = env.add_root_pod("job-y", "kosmos-leaf1", restartPolicy="Never")
    uid = pod["metadata"]["uid"]
    leaf = one_copy(env, uid)
    assert gets == []  # the informer's copy was current: no GET
    stale = s.root_pods.get(uid)
    assert stale is not None and stale["status"].get("phase") != "Succeeded"
    env.set_leaf_status("leaf1", leaf, {"phase": "Succeeded", "containerStatuses": [
        {"name": "c", "ready": False, "restartCount": 0, "image": "busybox", "imageID": "",
         "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]})
    wait_until(lambda: (p := env.root_pod("job-y")) and p["status"].get("phase") == "Succeeded", 10,
               "the root pod Succeeded")
    gone_for_good(env, "leaf1", "default", leaf["metadata"]["name"])
    wait_until(lambda: s.copies_of(uid) == [], 10, "the syncer sees the copy gone")
    # the informer as it may be right after our status write: not showing it yet
    monkeypatch.setattr(s.root_pods, "get", lambda u: stale if u == uid else None)
    s._written[uid] = ""  # our write in flight (its answer not seen)
    s.sync_one(uid)
    assert copies(env, uid) == [] and gets  # read afresh: Succeeded, not copied again
