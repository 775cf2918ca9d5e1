"""ClusterTree without an API server: ``clusterTreeOptions`` read and refused with field paths
(tree/spec.py), and the virtual nodes forged from leaf nodes and pods (tree/forge.py):
membership per mode, capacity (Pending pods counted, ours and terminal ones not, init
containers as the scheduler counts them), labels agreed by the members, taints, Ready; the
leaf-resources record of a virtual node and NetworkUnavailable from the fabric's reachability
record of the pair root -> leaf."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fabric.control.reachability import PairState
from tree import forge, identity, vnode
from tree.spec import Mode, SpecError, TreeSpec, read

Obj = dict[str, Any]
REF = {"namespace": "kosmos-system", "name": "kc"}


def cluster(name: str = "c1", **tree: Any) -> Obj:
    return {"metadata": {"name": name, "uid": "u-1"},
            "spec": {"clusterTreeOptions": {"enable": True, "kubeconfigSecretRef": REF, **tree}}}


def node(name: str, cpu: str = "4", memory: str = "8Gi", pods: str = "110", ready: bool = True,
         unschedulable: bool = False, **labels: str) -> Obj:
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"unschedulable": unschedulable},
            "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": pods},
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def pod(name: str, node_name: str | None = None, cpu: str = "1", phase: str = "Running",
        labels: dict[str, str] | None = None, **spec: Any) -> Obj:
    s: Obj = {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}], **spec}
    if node_name:
        s["nodeName"] = node_name
    return {"metadata": {"name": name, "namespace": "default", "labels": labels or {}}, "spec": s,
            "status": {"phase": phase}}


def forged(spec: TreeSpec, nodes: list[Obj], pods: list[Obj] = (), **kw: Any) -> dict[str, forge.VirtualNode]:  # type: ignore[assignment]
    return forge.virtual_nodes(spec, nodes, pods, root_id="me", **kw)


# ---------------------------------------------------------------------------------------------
# spec
# ---------------------------------------------------------------------------------------------


def test_modes_follow_kosmos_rules_unless_given() -> None:
    assert read(cluster()).mode is Mode.CLUSTER
    assert read(cluster(leafModels=[{"nodeSelector": {"nodeName": "n1"}}])).mode is Mode.NODE
    party = read(cluster(leafModels=[{"leafNodeName": "gpu", "nodeSelector": {"labelSelector": {
        "matchLabels": {"pool": "gpu"}}}}]))
    assert party.mode is Mode.PARTY and party.party_node_name(party.models[0]) == "kosmos-c1-gpu"
    assert read(cluster(leafNodeMode="node")).mode is Mode.NODE
    assert read({"metadata": {"name": "c1"}, "spec": {}}).enable is False


@pytest.mark.parametrize(("tree", "path"), [
    ({"kubeconfigSecretRef": None}, "spec.clusterTreeOptions.kubeconfigSecretRef"),
    ({"leafModels": [{"nodeSelector": {"nodeName": "a"}}, {"leafNodeName": "p", "nodeSelector": {
        "labelSelector": {}}}]}, "spec.clusterTreeOptions.leafModels"),
    ({"leafNodeMode": "party", "leafModels": [{"nodeSelector": {"labelSelector": {}}}]},
     "spec.clusterTreeOptions.leafModels[0].leafNodeName"),
    ({"leafNodeMode": "party", "leafModels": [{"leafNodeName": "a", "nodeSelector": {"labelSelector": {}}},
                                              {"leafNodeName": "a", "nodeSelector": {"labelSelector": {}}}]},
     "spec.clusterTreeOptions.leafModels[1].leafNodeName"),
    ({"leafNodeMode": "party", "leafModels": [{"leafNodeName": "a"}]},
     "spec.clusterTreeOptions.leafModels[0].nodeSelector.labelSelector"),
    ({"leafModels": [{"leafNodeName": "a", "nodeSelector": {"labelSelector": {"matchExpressions": [
        {"key": "k", "operator": "In"}]}}}]}, "spec.clusterTreeOptions.leafModels[0].nodeSelector.labelSelector"),
    ({"leafModels": [{"labels": {"kosmos.io/cluster": "x"}}]},
     "spec.clusterTreeOptions.leafModels[0].labels[kosmos.io/cluster]"),
    ({"leafNodeMode": "tree"}, "spec.clusterTreeOptions.leafNodeMode"),
])
def test_unusable_options_are_refused_with_their_field(tree: Obj, path: str) -> None:
    with pytest.raises(SpecError) as e:
        read(cluster(**tree))
    assert path in [p for p, _ in e.value.problems], e.value.problems
    assert str(e.value).startswith("Cluster c1: ")


# ---------------------------------------------------------------------------------------------
# forge
# ---------------------------------------------------------------------------------------------


def test_cluster_mode_sums_usable_nodes_minus_pods_that_are_not_ours() -> None:
    spec = read(cluster())
    z1 = {"topology.kubernetes.io/zone": "z1"}
    nodes = [node("a", **z1), node("b", cpu="2", **z1), node("down", ready=False, **z1),
             node("cordoned", unschedulable=True, **z1)]
    pods = [pod("run", "a", cpu="500m"), pod("pending"), pod("ours", "a", labels={identity.ROOT_LABEL: "me"}),
            pod("done", "b", phase="Succeeded"), pod("on-down", "down", cpu="3"),
            pod("other-root", "b", labels={identity.ROOT_LABEL: "someone-else"})]
    (vn,) = forged(spec, nodes, pods).values()
    assert vn.name == "kosmos-c1" and vn.members == ("a", "b", "cordoned", "down")
    # 6 cpu - 0.5 (run) - 1 (Pending, no node yet) - 1 (another root's pod); 220 pods - 3
    assert vn.resources == {"cpu": "3500m", "memory": str(16 * 2**30), "pods": "217"}
    assert vn.labels["topology.kubernetes.io/zone"] == "z1"
    assert vn.labels[forge.CLUSTER_LABEL] == "c1" and vn.labels["kosmos.io/node"] == "true"
    assert vn.taints == [{"key": "kosmos.io/node", "value": "true", "effect": "NoSchedule"}]
    assert (vn.ready, vn.reason) == ("True", forge.REASON_READY)


def test_requests_are_the_schedulers_init_containers_and_overhead_included() -> None:
    spec = read(cluster())
    big_init = pod("p", "a", cpu="1", initContainers=[{"name": "i", "resources": {"requests": {"cpu": "3"}}}],
                   overhead={"cpu": "250m"})
    (vn,) = forged(spec, [node("a")], [big_init]).values()
    assert vn.resources["cpu"] == "750m"  # 4 - (max(3, 1) + 0.25)


def test_zone_disagreement_drops_the_label_and_nothing_goes_negative() -> None:
    spec = read(cluster())
    nodes = [node("a", cpu="1", **{"topology.kubernetes.io/zone": "z1"}), node("b", cpu="1")]
    (vn,) = forged(spec, nodes, [pod("hog", "a", cpu="8")]).values()
    assert "topology.kubernetes.io/zone" not in vn.labels
    assert vn.resources["cpu"] == "1"  # a: 1 - 8 is 0 (not -7, which would eat b's room); b: 1
    (empty,) = forged(spec, [], []).values()
    assert (empty.ready, empty.reason) == ("False", forge.REASON_NO_NODES)
    assert empty.resources == {"cpu": "0", "memory": "0", "pods": "0"}


def test_unreachable_leaf_is_not_ready_with_the_message() -> None:
    (vn,) = forged(read(cluster()), [node("a")], unreachable="gone since t0").values()
    assert (vn.ready, vn.reason, vn.message) == ("False", forge.REASON_UNREACHABLE, "gone since t0")


def test_node_mode_copies_the_leaf_node_and_its_taints() -> None:
    spec = read(cluster(leafNodeMode="node", leafModels=[{"nodeSelector": {"labelSelector": {
        "matchLabels": {"join": "yes"}}}, "labels": {"extra": "1"}}]))
    taint = {"key": "dedicated", "value": "db", "effect": "NoSchedule"}
    nodes = [node("a", join="yes", disk="ssd", **{"node-role.kubernetes.io/control-plane": ""}), node("b")]
    nodes[0]["spec"]["taints"] = [taint, {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]
    out = forged(spec, nodes, [pod("x", "a"), pod("y", "b")])
    assert list(out) == ["a"]
    a = out["a"]
    assert a.labels["disk"] == "ssd" and a.labels["extra"] == "1" and a.labels["kubernetes.io/hostname"] == "a"
    assert "node-role.kubernetes.io/control-plane" not in a.labels
    assert taint in a.taints and all(t["key"] != "node.kubernetes.io/not-ready" for t in a.taints)
    assert a.resources["cpu"] == "3"


def test_party_mode_first_match_wins_and_pending_pods_count_where_they_may_land() -> None:
    spec = read(cluster(leafModels=[
        {"leafNodeName": "gpu", "nodeSelector": {"labelSelector": {"matchLabels": {"pool": "gpu"}}},
         "taints": [{"key": "gpu", "effect": "NoSchedule"}]},
        {"leafNodeName": "all", "nodeSelector": {"labelSelector": {}}}]))
    nodes = [node("g1", pool="gpu"), node("c1", pool="cpu"), node("c2", pool="cpu")]
    pods = [pod("wants-gpu", nodeSelector={"pool": "gpu"}), pod("anywhere", cpu="2")]
    out = forged(spec, nodes, pods)
    assert out["kosmos-c1-gpu"].members == ("g1",) and out["kosmos-c1-all"].members == ("c1", "c2")
    assert {"key": "gpu", "effect": "NoSchedule"} in out["kosmos-c1-gpu"].taints
    assert out["kosmos-c1-gpu"].resources["cpu"] == "1"  # 4 - 1 - 2: both Pending pods may land there
    assert out["kosmos-c1-all"].resources["cpu"] == "6"  # 8 - 2: only "anywhere" may land there
    assert out["kosmos-c1-gpu"].model == "gpu"


def test_the_scheduler_reads_the_owner_annotation_we_write() -> None:
    from scheduler.plugins.kosmos_volumebinding import OWNED_BY_CLUSTER
    from tree.vnode import OWNER_ANNOTATION

    assert OWNER_ANNOTATION == OWNED_BY_CLUSTER


# ---------------------------------------------------------------------------------------------
# the leaf-resources record and NetworkUnavailable
# ---------------------------------------------------------------------------------------------


def test_the_record_tells_each_members_room_from_the_same_walk() -> None:
    spec = read(cluster())
    nodes = [node("a", cpu="4", **{"topology.kubernetes.io/zone": "z1", "pool": "x"}),
             node("b", cpu="2", unschedulable=True), node("c", cpu="2", ready=False)]
    pods = [pod("p", "a", cpu="1"), pod("mine", "a", cpu="2", labels={identity.ROOT_LABEL: "me"}),
            pod("done", "a", cpu="1", phase="Succeeded"), pod("q", "b", cpu="500m"), pod("pending", cpu="1")]
    vn = forged(spec, nodes, pods)["kosmos-c1"]
    doc = json.loads(forge.leaf_resources(vn, "c1"))
    assert doc["schema"] == forge.RECORD_SCHEMA and doc["virtualNode"] == "kosmos-c1" and doc["ready"] is True
    assert doc["allocatable"] == vn.resources and vn.resources["cpu"] == "2"  # 4 - 1 (p) - 1 (pending)
    a, b, c = doc["nodes"]
    assert (a["name"], a["ready"], a["schedulable"], a["pods"], a["ourPods"]) == ("a", True, True, 2, 1)
    assert a["free"]["cpu"] == "1" and a["free"]["pods"] == "108"  # 4 - 1 - 2 (ours too: the leaf's view)
    assert a["labels"] == {"topology.kubernetes.io/zone": "z1"}  # placement labels only
    assert (b["schedulable"], b["free"]["cpu"], b["pods"]) == (False, "1500m", 1)
    assert (c["ready"], c["free"]["cpu"], c["pods"]) == (False, "2", 0)
    # the same inputs in another order: the same bytes (no churn of versions)
    again = forged(spec, list(reversed(nodes)), list(reversed(pods)))["kosmos-c1"]
    assert forge.leaf_resources(again, "c1") == forge.leaf_resources(vn, "c1")
    more = forged(spec, nodes, [*pods, pod("r", "a", cpu="100m")])["kosmos-c1"]
    assert forge.leaf_resources(more, "c1") != forge.leaf_resources(vn, "c1")


def test_network_condition_from_the_pairs_record() -> None:
    down = PairState("root", "leaf", False, "every node of root that probes the gateways of leaf gets no answer")
    got = forge.network_condition("root", "leaf", down, {"root", "leaf"})
    assert (got.status, got.reason, got.message) == ("True", forge.REASON_FABRIC_UNREACHABLE, down.reason)
    up = PairState("root", "leaf", True, "the fabric connects root to leaf", rtt_ms=0.4, loss=0.0)
    got = forge.network_condition("root", "leaf", up, {"root", "leaf"})
    assert (got.status, got.reason, got.message) == ("False", forge.REASON_FABRIC_REACHABLE, up.reason) and got.known
    # RTT and loss are not in the condition: a record that changes only them changes no Node
    assert forge.network_condition("root", "leaf", PairState("root", "leaf", True, up.reason, 9.0, 0.5),
                                   {"root", "leaf"}) == got
    # the record is the answer even before the names are known (it names the pair itself)
    assert forge.network_condition("root", "leaf", down, None).status == "True"
    # a record of another pair answers nothing for this one
    other = PairState("leaf", "root", False, "one way")
    assert forge.network_condition("root", "leaf", other, {"root", "leaf"}) == forge.NETWORK_UNKNOWN


def test_network_condition_without_a_record() -> None:
    def unreachable(root: str, leaf: str, clusters: set[str]) -> str:
        c = forge.network_condition(root, leaf, None, clusters)
        assert (c.status, c.reason) == ("True", forge.REASON_FABRIC_UNREACHABLE), c
        return c.message

    # the reflector's records name every configured cluster: one they do not name is not configured
    assert "leaf cluster other is not in the Kosmos fabric's configuration" in unreachable("root", "other",
                                                                                           {"root", "leaf"})
    assert "root cluster nope is not" in unreachable("nope", "leaf", {"root", "leaf"})
    # no records at all (the reflector has not answered): the Node keeps what it says
    assert forge.network_condition("root", "leaf", None, None) == forge.NETWORK_UNKNOWN
    # both named but no record of the pair (one that did not decode): no answer either
    assert forge.network_condition("root", "leaf", None, {"root", "leaf"}) == forge.NETWORK_UNKNOWN
    # the root's own cluster as a leaf: no pair to ask about
    assert forge.network_condition("root", "root", None, {"root", "leaf"}).status == "False"
    assert forge.network_condition("root", "root", None, None) == forge.NETWORK_UNKNOWN


def test_network_condition_on_the_virtual_node() -> None:
    spec = read(cluster())
    bad = forge.NetworkCondition("True", forge.REASON_FABRIC_UNREACHABLE, "m")
    assert forged(spec, [node("a")], network=bad)["kosmos-c1"].network == bad
    assert forged(spec, [node("a")])["kosmos-c1"].network is None
    assert not forge.NETWORK_UNKNOWN.known


def test_the_node_status_carries_network_unavailable_only_when_the_fabric_is_asked() -> None:
    spec = read(cluster())
    down = forge.NetworkCondition("True", forge.REASON_FABRIC_UNREACHABLE, "m")
    old = {"type": forge.NETWORK_UNAVAILABLE, "status": "True", "reason": forge.REASON_FABRIC_UNREACHABLE,
           "message": "m", "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    current = {"status": {"conditions": [old]}}

    def by_type(conds: list[Obj]) -> dict[str, Obj]:
        return {c["type"]: c for c in conds}

    asked = forged(spec, [node("a")], network=down)["kosmos-c1"]
    got = by_type(vnode.conditions(asked, current, "2026-02-02T00:00:00Z"))[forge.NETWORK_UNAVAILABLE]
    assert (got["status"], got["reason"], got["lastTransitionTime"]) == ("True", forge.REASON_FABRIC_UNREACHABLE,
                                                                          "2026-01-01T00:00:00Z")
    assert not vnode._same_status(asked, {"conditions": []})
    unknown = forged(spec, [node("a")], network=forge.NETWORK_UNKNOWN)["kosmos-c1"]
    assert by_type(vnode.conditions(unknown, current, "2026-02-02T00:00:00Z"))[forge.NETWORK_UNAVAILABLE] == old
    not_asked = forged(spec, [node("a")])["kosmos-c1"]
    assert forge.NETWORK_UNAVAILABLE not in by_type(vnode.conditions(not_asked, current, "2026-02-02T00:00:00Z"))
    status = vnode.status_body(not_asked, None, "2026-02-02T00:00:00Z")
    assert vnode._same_status(not_asked, status)
    status["conditions"].append(old)
    assert not vnode._same_status(not_asked, status)  # one left from before is written away


def test_the_node_advertises_the_managers_kubelet_server_when_it_serves_one() -> None:
    spec = read(cluster())
    served = forged(spec, [node("a")], address="10.1.2.3", kubelet_port=10443)["kosmos-c1"]
    status = vnode.status_body(served, None, "2026-02-02T00:00:00Z")
    assert status["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10443}}
    assert status["addresses"] == [{"type": "InternalIP", "address": "10.1.2.3"}]
    assert vnode._same_status(served, status)
    assert not vnode._same_status(served, {**status, "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}})
    assert not vnode._same_status(served, {**status, "addresses": [{"type": "InternalIP", "address": "10.9.9.9"}]})
    assert not vnode._same_status(served, {k: v for k, v in status.items() if k != "daemonEndpoints"})
    # without a kubelet server the Node's endpoint and addresses are not ours: neither written nor compared
    bare = forged(spec, [node("a")])["kosmos-c1"]
    body = vnode.status_body(bare, None, "2026-02-02T00:00:00Z")
    assert "daemonEndpoints" not in body and "addresses" not in body
    assert vnode._same_status(bare, {**body, "addresses": [{"type": "InternalIP", "address": "10.9.9.9"}]})


def _random_change(rng: Any, p: Obj) -> Obj:
    """One change a leaf pod may go through: its status, its annotations, its binding, its requests,
    a label (ours or not), its phase to a terminal one."""
    q: Obj = json.loads(json.dumps(p))
    what = rng.randrange(7)
    if what == 0:
        q["status"] = {"phase": rng.choice(["Pending", "Running"]), "podIP": f"10.0.0.{rng.randrange(9)}"}
    elif what == 1:
        q["metadata"].setdefault("annotations", {})["a"] = str(rng.randrange(9))
    elif what == 2:
        q["spec"]["nodeName"] = rng.choice(["n1", "n2", "n3"])
    elif what == 3:
        q["spec"]["containers"][0]["resources"]["requests"]["cpu"] = rng.choice(["100m", "1", "2"])
    elif what == 4:
        q["metadata"]["labels"] = {identity.ROOT_LABEL: "me"} if rng.random() < 0.5 else {}
    elif what == 5:
        q["status"] = {"phase": rng.choice(["Succeeded", "Failed", "Running"])}
    else:
        q["status"]["conditions"] = [{"type": "Ready", "status": rng.choice(["True", "False"])}]
    return q


@pytest.mark.parametrize("mode", [{}, {"leafNodeMode": "node"}])
def test_a_pass_only_on_footprint_changes_equals_a_pass_on_every_event(mode: Obj) -> None:
    """The leaf reconciler skips a pass for a pod change that keeps the pod's footprint
    (forge.pod_footprint): after random event sequences the virtual nodes it last forged are
    those a pass on every event would have forged."""
    import random

    rng = random.Random(17)
    spec = read(cluster(**mode))
    nodes = [node("n1"), node("n2", cpu="2"), node("n3", ready=False)]
    for _round in range(30):
        pods: dict[str, Obj] = {}
        last = forged(spec, nodes, [])
        skipped = 0
        for _step in range(60):
            name = f"p{rng.randrange(8)}"
            old = pods.get(name)
            if old is None:
                new: Obj | None = pod(name, rng.choice([None, "n1", "n2"]), cpu=rng.choice(["100m", "1"]))
            elif rng.random() < 0.1:
                new = None  # deleted
            else:
                new = _random_change(rng, old)
            if new is None:
                del pods[name]
            else:
                pods[name] = new
            relevant = old is None or new is None or \
                forge.pod_footprint(old, "me") != forge.pod_footprint(new, "me")
            full = forged(spec, nodes, list(pods.values()))
            if relevant:
                last = full
            else:
                skipped += 1
            assert last == full
        assert skipped > 0  # the sequences do exercise the skip


def test_the_record_lists_the_leafs_pending_pods_ours_with_their_root_uid() -> None:
    """Issue 19 item 2, "Pending leaf pods are counted": every Pending pod with no node that may
    land on a member is in the record's ``pending`` (the scheduler's per-node view holds room
    for it); a copy of ours carries its root pod's UID; none at all leaves the bytes unchanged."""
    spec = read(cluster())
    nodes = [node("a", cpu="4")]
    bound = [pod("p", "a", cpu="1")]
    ours = {identity.ROOT_LABEL: "me", identity.ROOT_UID_LABEL: "root-1"}
    waiting = [pod("z-theirs", cpu="2"), pod("a-ours", cpu="500m", labels=ours),
               pod("elsewhere", cpu="1", nodeSelector={"pool": "none"}), pod("done", cpu="1", phase="Failed")]
    vn = forged(spec, nodes, [*bound, *waiting])["kosmos-c1"]
    doc = json.loads(forge.leaf_resources(vn, "c1"))
    assert doc["pending"] == [{"requests": {"cpu": "500m", "memory": "0", "pods": "1"}, "rootUID": "root-1"},
                              {"requests": {"cpu": "2", "memory": "0", "pods": "1"}}]
    assert vn.resources["cpu"] == "1"  # 4 - 1 - 2: ours is the root scheduler's to count, as before
    plain = forged(spec, nodes, bound)["kosmos-c1"]
    assert "pending" not in json.loads(forge.leaf_resources(plain, "c1"))
