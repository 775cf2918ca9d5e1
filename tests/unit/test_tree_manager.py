"""The tree manager against in-process API servers (kubeemu on 127.0.0.1): a root with the
Cluster CRD, leaves with nodes and pods. Each leaf mode appears with its names, labels, taint,
capacity and Lease; capacity follows the leaf; an unreachable leaf turns NotReady past the
threshold and Ready again; a node deleted by hand comes back; a party's selector change moves
membership; a deleted or disabled Cluster loses its virtual nodes and nothing else; one hanging
leaf does not stall another; a restarted manager neither duplicates nor flaps a node."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest

from scheduler.kube import resource_path
from scheduler.podutil import parse_quantity
from tests.tree_env import REPO, SECRET_NS, TreeEnv, leaf_kubeconfig, ready, resources, tree_env
from tests.waiting import wait_until
from tree import forge
from tree.identity import ROOT_LABEL
from tree.vnode import OWNER_UID_ANNOTATION, owner

Obj = dict[str, Any]
LEAF_TAINT = {"key": "kosmos.io/node", "value": "true", "effect": "NoSchedule"}


@pytest.fixture
def env() -> Iterator[TreeEnv]:
    with tree_env() as e:
        yield e


def values(node: Obj | None) -> dict[str, Fraction]:
    return {k: parse_quantity(v) for k, v in resources(node).items()}


def wait_values(env: TreeEnv, name: str, want: dict[str, Any], timeout: float = 10.0) -> Obj:
    want_v = {k: parse_quantity(v) for k, v in want.items()}

    def check() -> Obj | None:
        n = env.vnode(name)
        got = values(n)
        return n if n is not None and all(got.get(k) == v for k, v in want_v.items()) else None
    return wait_until(check, timeout, f"{name} with {want} (now {resources(env.vnode(name))})")


def wait_ready(env: TreeEnv, name: str, status: str, reason: str, timeout: float = 10.0) -> Obj:
    return wait_until(lambda: (n := env.vnode(name)) is not None and ready(n) == (status, reason) and n, timeout,
                      f"{name} Ready={status} ({reason}), now {ready(env.vnode(name))}")


def test_cluster_mode_node_with_labels_taint_capacity_and_lease(env: TreeEnv) -> None:
    zone = {"topology.kubernetes.io/zone": "z1", "topology.kubernetes.io/region": "r1"}
    env.add_node("leaf1", "a", cpu="4", memory="8Gi", labels=zone)
    env.add_node("leaf1", "b", cpu="2", memory="4Gi", labels={**zone, "topology.kubernetes.io/zone": "z2"})
    env.add_node("leaf1", "down", ready=False, labels=zone)
    env.add_pod("leaf1", "running", node="a", cpu="500m", memory="1Gi")
    env.add_pod("leaf1", "pending", cpu="1", memory="1Gi")  # no node yet: counted too
    env.add_pod("leaf1", "ours", node="a", cpu="2", labels={ROOT_LABEL: "root-under-test"})
    env.add_cluster("leaf1", "leaf1")
    env.start_manager()
    n = wait_values(env, "kosmos-leaf1", {"cpu": "4500m", "memory": "10Gi", "pods": "218"})
    labels = n["metadata"]["labels"]
    assert labels["kosmos.io/node"] == "true" and labels["kosmos.io/cluster"] == "leaf1"
    assert labels["topology.kubernetes.io/region"] == "r1" and "topology.kubernetes.io/zone" not in labels
    assert n["spec"]["taints"] == [LEAF_TAINT]
    assert values(n) == {k: parse_quantity(v) for k, v in n["status"]["capacity"].items()}
    assert ready(n) == ("True", forge.REASON_READY)
    assert owner(n) == ("leaf1", env.root.get(resource_path("kosmos.io/v1alpha1", "clusters", name="leaf1"))[
        "metadata"]["uid"])
    lease = wait_until(lambda: env.lease("kosmos-leaf1"), 5, "the node's Lease")
    assert lease["spec"]["holderIdentity"] == "kosmos-leaf1"
    assert lease["metadata"]["ownerReferences"][0]["uid"] == n["metadata"]["uid"]
    first = lease["spec"]["renewTime"]
    wait_until(lambda: (env.lease("kosmos-leaf1") or {}).get("spec", {}).get("renewTime") != first, 5,
               "the Lease renewed")
    assert set(env.nodes()) == {"kosmos-leaf1"}  # the leaf's own nodes are not in the root


def test_node_mode_one_virtual_node_per_selected_leaf_node(env: TreeEnv) -> None:
    env.add_node("leaf1", "n1", cpu="8", labels={"join": "yes", "disk": "ssd"},
                 taints=[{"key": "dedicated", "value": "db", "effect": "NoSchedule"}])
    env.add_node("leaf1", "n2", cpu="2", labels={"join": "yes"})
    env.add_node("leaf1", "n3", labels={"join": "no"})
    env.add_pod("leaf1", "p", node="n1", cpu="3")
    env.add_cluster("leaf1", "leaf1", leafNodeMode="node",
                    leafModels=[{"nodeSelector": {"labelSelector": {"matchLabels": {"join": "yes"}}}}])
    env.start_manager()
    n1 = wait_values(env, "n1", {"cpu": "5"})
    n2 = wait_values(env, "n2", {"cpu": "2"})
    assert "n3" not in env.nodes()
    assert n1["metadata"]["labels"]["disk"] == "ssd" and n1["metadata"]["labels"]["kosmos.io/cluster"] == "leaf1"
    assert LEAF_TAINT in n1["spec"]["taints"]
    assert {"key": "dedicated", "value": "db", "effect": "NoSchedule"} in n1["spec"]["taints"]
    assert n2["spec"]["taints"] == [LEAF_TAINT]
    # a leaf node's label change moves it in or out
    env.patch_node("leaf1", "n3", {"metadata": {"labels": {"join": "yes"}}})
    wait_values(env, "n3", {"cpu": "4"})
    env.patch_node("leaf1", "n2", {"metadata": {"labels": {"join": "no"}}})
    wait_until(lambda: "n2" not in env.nodes(), 10, "n2 removed once its leaf node left the selection")


def test_party_mode_and_a_selector_change_moves_membership(env: TreeEnv) -> None:
    env.add_node("leaf1", "g1", cpu="8", labels={"pool": "gpu"})
    env.add_node("leaf1", "c1", cpu="2", labels={"pool": "cpu"})
    env.add_node("leaf1", "c2", cpu="2", labels={"pool": "cpu"})
    models = [{"leafNodeName": "gpu", "nodeSelector": {"labelSelector": {"matchLabels": {"pool": "gpu"}}},
               "labels": {"accelerator": "yes"}},
              {"leafNodeName": "cpu", "nodeSelector": {"labelSelector": {"matchLabels": {"pool": "cpu"}}}}]
    env.add_cluster("leaf1", "leaf1", leafModels=models)
    env.start_manager()
    gpu = wait_values(env, "kosmos-leaf1-gpu", {"cpu": "8"})
    wait_values(env, "kosmos-leaf1-cpu", {"cpu": "4"})
    assert gpu["metadata"]["labels"]["accelerator"] == "yes"
    assert gpu["metadata"]["annotations"]["kosmos.io/leaf-model"] == "gpu"
    # c2 moves to the gpu party through a selector change
    models[0]["nodeSelector"] = {"labelSelector": {"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["g1", "c2"]}]}}
    env.patch_cluster("leaf1", {"leafModels": models})
    wait_values(env, "kosmos-leaf1-gpu", {"cpu": "10"})
    wait_values(env, "kosmos-leaf1-cpu", {"cpu": "2"})
    # a party removed: its node goes, the other stays with its UID
    cpu_uid = env.vnode("kosmos-leaf1-cpu")["metadata"]["uid"]  # type: ignore[index]
    env.patch_cluster("leaf1", {"leafModels": [models[1]]})
    wait_until(lambda: "kosmos-leaf1-gpu" not in env.nodes(), 10, "the gpu party's node removed")
    wait_values(env, "kosmos-leaf1-cpu", {"cpu": "4"})
    assert env.vnode("kosmos-leaf1-cpu")["metadata"]["uid"] == cpu_uid  # type: ignore[index]


def test_capacity_follows_leaf_nodes_and_pods(env: TreeEnv) -> None:
    env.add_node("leaf1", "a", cpu="4", labels={"topology.kubernetes.io/zone": "z1"})
    env.add_cluster("leaf1", "leaf1")
    env.start_manager()
    wait_values(env, "kosmos-leaf1", {"cpu": "4", "pods": "110"})
    env.add_pod("leaf1", "p1", node="a", cpu="1500m")
    wait_values(env, "kosmos-leaf1", {"cpu": "2500m", "pods": "109"})
    env.leaf("leaf1").patch(resource_path("v1", "pods", "default", "p1", "status"), {"status": {"phase": "Succeeded"}})
    wait_values(env, "kosmos-leaf1", {"cpu": "4", "pods": "110"})
    env.add_node("leaf1", "b", cpu="2", labels={"topology.kubernetes.io/zone": "z1"})
    n = wait_values(env, "kosmos-leaf1", {"cpu": "6"})
    assert n["metadata"]["labels"]["topology.kubernetes.io/zone"] == "z1"
    env.patch_node("leaf1", "a", {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}, status=True)
    wait_values(env, "kosmos-leaf1", {"cpu": "2"})
    env.patch_node("leaf1", "b", {"spec": {"unschedulable": True}})
    n = wait_ready(env, "kosmos-leaf1", "False", forge.REASON_NO_NODES)
    assert values(n)["cpu"] == 0
    env.add_node("leaf1", "c", cpu="1", labels={"topology.kubernetes.io/zone": "z9"})
    n = wait_ready(env, "kosmos-leaf1", "True", forge.REASON_READY)
    assert "topology.kubernetes.io/zone" not in n["metadata"]["labels"]  # members disagree now


def test_unreachable_leaf_turns_not_ready_past_the_threshold_and_recovers(env: TreeEnv) -> None:
    env.add_node("leaf1", "a")
    env.add_cluster("leaf1", "leaf1")
    env.start_manager()
    n = wait_ready(env, "kosmos-leaf1", "True", forge.REASON_READY)
    env.fault("leaf1", error_count=10**9, error_code=503)
    n = wait_ready(env, "kosmos-leaf1", "False", forge.REASON_UNREACHABLE)
    cond = next(c for c in n["status"]["conditions"] if c["type"] == "Ready")
    assert "has not answered for more than 1 s" in cond["message"] and "503" in cond["message"]
    assert "kosmos-leaf1" in env.nodes() and values(n)["cpu"] == 4  # kept, last known capacity
    renewed = (env.lease("kosmos-leaf1") or {})["spec"]["renewTime"]
    assert (env.lease("kosmos-leaf1") or {})["spec"]["renewTime"] == renewed  # no renewal while down
    env.fault("leaf1")
    wait_ready(env, "kosmos-leaf1", "True", forge.REASON_READY)
    wait_until(lambda: (env.lease("kosmos-leaf1") or {})["spec"]["renewTime"] != renewed, 5, "Lease renewed again")


def test_a_virtual_node_deleted_or_edited_by_hand_is_put_back(env: TreeEnv) -> None:
    env.add_node("leaf1", "a")
    env.add_cluster("leaf1", "leaf1")
    env.start_manager()
    old = wait_ready(env, "kosmos-leaf1", "True", forge.REASON_READY)
    env.root.request("DELETE", resource_path("v1", "nodes", name="kosmos-leaf1"))
    new = wait_until(lambda: (n := env.vnode("kosmos-leaf1")) is not None
                     and n["metadata"]["uid"] != old["metadata"]["uid"] and n, 10, "the node recreated")
    wait_values(env, "kosmos-leaf1", {"cpu": "4"})
    wait_until(lambda: (env.lease("kosmos-leaf1") or {}).get("metadata", {}).get("ownerReferences", [{}])[0].get(
        "uid") == new["metadata"]["uid"], 10, "the Lease owned by the new node")
    # our taint removed and a label of ours changed by hand: put back; a label someone added stays
    env.root.patch(resource_path("v1", "nodes", name="kosmos-leaf1"),
                   {"metadata": {"labels": {"kosmos.io/cluster": "x", "team": "blue"}}, "spec": {"taints": []}})
    n = wait_until(lambda: (n := env.vnode("kosmos-leaf1")) is not None and LEAF_TAINT in (
        n["spec"].get("taints") or []) and n["metadata"]["labels"]["kosmos.io/cluster"] == "leaf1" and n, 10,
        "taint and label restored")
    assert n["metadata"]["labels"]["team"] == "blue"


def test_deleted_or_disabled_cluster_loses_its_nodes_and_nothing_else(env: TreeEnv) -> None:
    for leaf in ("leaf1", "leaf2", "leaf3"):
        env.add_node(leaf, f"{leaf}-n")
    env.add_cluster("leaf1", "leaf1")
    env.add_cluster("leaf2", "leaf2", leafNodeMode="node")
    env.add_cluster("leaf3", "leaf3")
    # a real root node, and a node that looks like a virtual node of leaf1 but is not ours
    env.root.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "root-node"}})
    env.root.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": "foreign", "labels": {"kosmos.io/node": "true", "kosmos.io/cluster": "leaf1"}}})
    env.start_manager()
    wait_until(lambda: {"kosmos-leaf1", "leaf2-n", "kosmos-leaf3"} <= set(env.nodes()), 10, "all virtual nodes")
    env.delete_cluster("leaf1")
    wait_until(lambda: "kosmos-leaf1" not in env.nodes(), 10, "leaf1's node removed")
    env.patch_cluster("leaf2", {"enable": False})
    wait_until(lambda: "leaf2-n" not in env.nodes(), 10, "leaf2's node removed")
    assert {"root-node", "foreign", "kosmos-leaf3"} == set(env.nodes())
    wait_until(lambda: env.lease("kosmos-leaf1") is None and env.lease("leaf2-n") is None, 10, "their Leases gone")
    # a Cluster created again under the same name gets a new node, not the old UID's
    env.add_cluster("leaf1", "leaf1")
    n = wait_until(lambda: env.vnode("kosmos-leaf1"), 10, "leaf1's node again")
    uid = env.root.get(resource_path("kosmos.io/v1alpha1", "clusters", name="leaf1"))["metadata"]["uid"]
    assert n["metadata"]["annotations"][OWNER_UID_ANNOTATION] == uid


def test_one_hanging_leaf_does_not_stall_another(env: TreeEnv) -> None:
    env.add_node("leaf1", "a")
    env.add_node("leaf2", "b")
    env.add_cluster("leaf1", "leaf1")
    env.add_cluster("leaf2", "leaf2")
    env.start_manager()
    wait_ready(env, "kosmos-leaf1", "True", forge.REASON_READY)
    wait_ready(env, "kosmos-leaf2", "True", forge.REASON_READY)
    env.fault("leaf2", latency_ms=5_000)  # every request to leaf2 hangs 10x the leaf timeout
    try:
        for i in range(3):
            env.add_pod("leaf1", f"p{i}", node="a", cpu="1")
            wait_values(env, "kosmos-leaf1", {"cpu": str(3 - i)}, timeout=5)
        wait_ready(env, "kosmos-leaf2", "False", forge.REASON_UNREACHABLE)
        assert ready(env.vnode("kosmos-leaf1")) == ("True", forge.REASON_READY)
    finally:
        env.fault("leaf2")
    wait_ready(env, "kosmos-leaf2", "True", forge.REASON_READY, timeout=20)


def test_restarted_manager_neither_duplicates_nor_flaps(env: TreeEnv) -> None:
    env.add_node("leaf1", "a")
    env.add_node("leaf1", "b", labels={"pool": "x"})
    env.add_node("leaf2", "c")
    env.add_cluster("leaf1", "leaf1", leafModels=[{"leafNodeName": "x", "nodeSelector": {
        "labelSelector": {"matchLabels": {"pool": "x"}}}}])
    env.add_cluster("leaf2", "leaf2", leafNodeMode="node")
    m = env.start_manager()
    wait_ready(env, "kosmos-leaf1-x", "True", forge.REASON_READY)
    wait_ready(env, "c", "True", forge.REASON_READY)

    def snapshot() -> dict[str, tuple[str, str, str]]:
        out = {}
        for name, n in env.nodes().items():
            cond = next(c for c in n["status"]["conditions"] if c["type"] == "Ready")
            out[name] = (n["metadata"]["uid"], cond["status"], cond["lastTransitionTime"])
        return out
    before = snapshot()
    versions = {k: n["metadata"]["resourceVersion"] for k, n in env.nodes().items()}
    env.stop_manager(m)
    m2 = env.start_manager()
    wait_until(lambda: len(m2.reconcilers) == 2 and all(r.passes >= 5 for r in m2.reconcilers.values()), 15,
               "five passes of each new reconciler over the synced leaves (probes every 0.2 s)")
    assert snapshot() == before
    assert {k: n["metadata"]["resourceVersion"] for k, n in env.nodes().items()} == versions


def test_restart_facing_an_unreachable_leaf_keeps_its_nodes(env: TreeEnv) -> None:
    env.add_node("leaf1", "a")
    env.add_node("leaf1", "b")
    env.add_cluster("leaf1", "leaf1", leafNodeMode="node")
    m = env.start_manager()
    wait_ready(env, "a", "True", forge.REASON_READY)
    wait_ready(env, "b", "True", forge.REASON_READY)
    uids = {k: n["metadata"]["uid"] for k, n in env.nodes().items()}
    env.stop_manager(m)
    env.fault("leaf1", error_count=10**9, error_code=503)
    env.start_manager()
    wait_ready(env, "a", "False", forge.REASON_UNREACHABLE)
    wait_ready(env, "b", "False", forge.REASON_UNREACHABLE)
    assert {k: n["metadata"]["uid"] for k, n in env.nodes().items()} == uids
    env.fault("leaf1")
    wait_ready(env, "a", "True", forge.REASON_READY)
    assert {k: n["metadata"]["uid"] for k, n in env.nodes().items()} == uids


def test_kubeconfig_secret_missing_then_fixed_then_pointing_elsewhere(env: TreeEnv) -> None:
    env.add_node("leaf1", "a", cpu="4")
    env.add_node("leaf2", "b", cpu="2")
    env.add_cluster("leaf1", "leaf1")
    env.start_manager()
    wait_values(env, "kosmos-leaf1", {"cpu": "4"})
    # the Secret now names leaf2's API: the reconciler reconnects (the node stays, same UID)
    uid = env.vnode("kosmos-leaf1")["metadata"]["uid"]  # type: ignore[index]
    kc = base64.b64encode(leaf_kubeconfig(env.leaf("leaf2").host, "leaf2").encode()).decode()
    env.root.patch(resource_path("v1", "secrets", SECRET_NS, "leaf1-kubeconfig"), {"data": {"kubeconfig": kc}})
    wait_values(env, "kosmos-leaf1", {"cpu": "2"})
    assert env.vnode("kosmos-leaf1")["metadata"]["uid"] == uid  # type: ignore[index]
    # a reference to a Secret that does not exist: NotReady past the threshold, naming the Secret
    env.patch_cluster("leaf1", {"kubeconfigSecretRef": {"namespace": SECRET_NS, "name": "nope"}})
    n = wait_ready(env, "kosmos-leaf1", "False", forge.REASON_UNREACHABLE)
    cond = next(c for c in n["status"]["conditions"] if c["type"] == "Ready")
    assert f"Secret {SECRET_NS}/nope" in cond["message"] and "404" in cond["message"]
    # the Secret appears: connected without waiting for the resync
    env.root.create(resource_path("v1", "secrets", SECRET_NS), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nope"}, "data": {"kubeconfig": kc}})
    wait_ready(env, "kosmos-leaf1", "True", forge.REASON_READY)


def test_unusable_options_leave_the_nodes_as_they_are(env: TreeEnv) -> None:
    env.add_node("leaf1", "a")
    env.add_cluster("leaf1", "leaf1")
    m = env.start_manager()
    n = wait_ready(env, "kosmos-leaf1", "True", forge.REASON_READY)
    # a mix of node and party models is refused; the running spec stays
    env.patch_cluster("leaf1", {"leafModels": [{"nodeSelector": {"nodeName": "a"}},
                                               {"leafNodeName": "p", "nodeSelector": {"labelSelector": {}}}]})
    wait_until(lambda: m.metrics.spec_errors.labels("leaf1")._value.get() == 1, 10, "the spec error counted")
    env.stop_manager(m)
    m2 = env.start_manager()  # a restart with only the bad spec known: nothing collected
    wait_until(lambda: m2.metrics.spec_errors.labels("leaf1")._value.get() == 1, 10, "the spec error seen")
    m2.kick()
    wait_until(lambda: m2.metrics.spec_errors.labels("leaf1")._value.get() == 1 and not m2.reconcilers, 5,
               "no reconciler for the unusable spec")
    assert env.vnode("kosmos-leaf1")["metadata"]["uid"] == n["metadata"]["uid"]  # type: ignore[index]


def test_only_the_lease_holder_acts_and_a_standby_takes_over(env: TreeEnv) -> None:
    env.add_node("leaf1", "a")
    env.add_cluster("leaf1", "leaf1")
    timing = {"lease_duration": 1.5, "renew_deadline": 1.0, "retry_period": 0.2}
    first = env.start_manager(leader_elect=True, identity="first", **timing)
    wait_ready(env, "kosmos-leaf1", "True", forge.REASON_READY)
    second = env.start_manager(leader_elect=True, identity="second", **timing)
    wait_until(lambda: first.reconcilers and not second.reconcilers, 5, "the first replica leads alone")
    env.stop_manager(first)  # releases the Lease
    wait_until(lambda: second.reconcilers, 10, "the standby took over")
    env.root.request("DELETE", resource_path("v1", "nodes", name="kosmos-leaf1"))
    wait_ready(env, "kosmos-leaf1", "True", forge.REASON_READY)


def test_kosmos_tree_command_line() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tree.main", *args], capture_output=True, text=True, timeout=60,
                              cwd=REPO, check=False)
    out = run("--help")
    assert out.returncode == 0 and "--leaf-unreachable-after" in out.stdout and "kubeconfigSecretRef" in out.stdout
    bad = run("--leaf-unreachable-after", "0")
    assert bad.returncode == 2 and "must be a positive number of seconds" in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there any more
    down = run("--master", f"http://127.0.0.1:{port}", "--leader-elect=false")
    assert down.returncode == 1 and "connecting to the root cluster" in down.stderr
