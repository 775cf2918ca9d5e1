"""Issue 17 item 7, end to end: ``fabric-tool lab up`` of an ``examples/tree.yaml``-like topology
gives a root with its three leaves joined (one per leaf model), the lab restarts a killed
``kosmos-tree`` and a killed scheduler, and ``fabric-tool unjoin`` of one leaf removes its
virtual nodes and the objects the tree put into it, and nothing else.

The lab (module fixture, its own name): host ``root`` (node r1), leaves ``leafa`` (``tree:
cluster``, node a1), ``leafb`` (``tree: node``, nodes b1 and b2, b2 with cpu 2 / memory 4Gi)
and ``leafc`` (``tree: "party=pool=gpu"``, node c1, labelled ``pool=gpu`` by the test). Tests run
in file order:

1. ``lab kubeconfig`` has a context per cluster, the root's included; the virtual nodes are in
   the host: ``kosmos-leafa``, ``b1``, ``b2``, ``kosmos-leafc-pool-gpu``, each labelled
   ``kosmos.io/node=true`` and ``kosmos.io/cluster=<leaf>``, tainted
   ``kosmos.io/node=true:NoSchedule``, with the allocatable of their leaf nodes (the leaves run
   no pods); the party node takes c1 once c1 carries ``pool=gpu``;
2. ``kosmos-tree`` SIGKILLed: the supervisor starts a new one (``lab status`` counts the
   restart), the virtual nodes stay the same objects (UIDs unchanged);
3. a leaf's scheduler SIGKILLed: restarted and counted likewise;
4. ``fabric-tool unjoin leafb --lab NAME``: b1 and b2 leave the host, the other virtual nodes
   stay (same UIDs), Cluster leafb and its kubeconfig Secret are gone, leafb's ConfigMap, Secret
   and ServiceAccount labelled ``kosmos.io/root-cluster=<root id>`` are deleted, and a leaf
   user's objects of the same names (another namespace) and another root's object survive.

Needs root (the lab) and kubectl.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest
import yaml

from kubeemu import quantity
from tests.lab.conftest import needs_kubectl
from tests.lab.tree_lab import TreeLab, lease_holder, node_ready, topology, tree_lab_running
from tests.waiting import wait_until

pytestmark = needs_kubectl

TOPOLOGY = topology("""\
      - name: leafa
        tree: cluster
        podCIDRs: [10.41.0.0/16]
        serviceCIDRs: [10.141.0.0/20]
        nodes: [{name: a1, pods: 0}]
      - name: leafb
        tree: node
        podCIDRs: [10.42.0.0/16]
        serviceCIDRs: [10.142.0.0/20]
        nodes:
          - {name: b1, pods: 0}
          - {name: b2, pods: 0, resources: {cpu: "2", memory: 4Gi}}
      - name: leafc
        tree: "party=pool=gpu"
        podCIDRs: [10.43.0.0/16]
        serviceCIDRs: [10.143.0.0/20]
        nodes: [{name: c1, pods: 0}]
    """)

VNODES = {"kosmos-leafa": ("leafa", ["a1"]), "b1": ("leafb", ["b1"]), "b2": ("leafb", ["b2"]),
          "kosmos-leafc-pool-gpu": ("leafc", ["c1"])}
RESOURCES = ("cpu", "memory", "pods")


@pytest.fixture(scope="module")
def tlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TreeLab]:
    with tree_lab_running(TreeLab, TOPOLOGY, tmp_path_factory.mktemp("tree")) as running:
        yield running


def _alloc(node: dict[str, Any]) -> dict[str, Fraction]:
    """The node's allocatable cpu, memory and pods as numbers (``8Gi`` == ``8589934592``)."""
    a = (node.get("status") or {}).get("allocatable") or {}
    return {k: quantity.parse(str(a.get(k))) for k in RESOURCES}


def test_a_context_per_cluster_and_the_three_modes_virtual_nodes(tlab: TreeLab) -> None:
    contexts = tlab.kubectl("root", "config", "get-contexts", "-o", "name").stdout.split()
    assert sorted(contexts) == ["leafa", "leafb", "leafc", "root"]
    tlab.kubectl("leafc", "label", "node", "c1", "pool=gpu")
    for leaf in ("leafa", "leafb", "leafc"):
        assert tlab.get(leaf, "pods", "-A")["items"] == [], f"{leaf} runs pods: capacities below assume none"

    def all_there() -> dict[str, dict[str, Any]] | None:
        nodes = tlab.host_nodes()
        if not all(v in nodes for v in VNODES):
            return None
        party = nodes["kosmos-leafc-pool-gpu"]
        return nodes if node_ready(party) == "True" else None

    nodes = wait_until(all_there, 60, "the four virtual nodes, the party one Ready with c1")
    assert sorted(n for n in nodes if n not in VNODES) == ["r1"]
    for vname, (leaf, members) in VNODES.items():
        vn = nodes[vname]
        labels = vn["metadata"]["labels"]
        assert labels["kosmos.io/node"] == "true" and labels["kosmos.io/cluster"] == leaf, (vname, labels)
        assert {"key": "kosmos.io/node", "value": "true", "effect": "NoSchedule"} in vn["spec"]["taints"], vname
        leaf_nodes = {n["metadata"]["name"]: n for n in tlab.get(leaf, "nodes")["items"]}
        (member,) = members
        assert _alloc(vn) == _alloc(leaf_nodes[member]), (vname, _alloc(vn), _alloc(leaf_nodes[member]))
        assert node_ready(vn) == "True", vname
    assert _alloc(nodes["b2"])["cpu"] == 2 and _alloc(nodes["b2"])["memory"] == 4 * 2**30


def test_a_killed_tree_manager_is_restarted_and_the_nodes_stay(tlab: TreeLab) -> None:
    before = {n: v["metadata"]["uid"] for n, v in tlab.host_nodes().items() if n in VNODES}
    old = tlab.tree()["pid"]
    holder = lease_holder(tlab)
    assert holder is not None
    restarts = tlab.status()["restarts"].get("tree", 0)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (tlab.tree()["pid"] not in (None, old)) or None, 60, "a new kosmos-tree")
    assert tlab.status()["restarts"]["tree"] == restarts + 1
    assert f"kosmos-tree {tlab.tree()['pid']} (restarts {restarts + 1})" in tlab.lab("status").stdout
    # The new manager takes the Lease once the dead one's lapses, and keeps the same nodes.
    wait_until(lambda: lease_holder(tlab) not in (None, holder) or None, 60, "the new kosmos-tree holding the Lease")
    after = {n: v["metadata"]["uid"] for n, v in tlab.host_nodes().items() if n in VNODES}
    assert after == before


def test_a_killed_scheduler_is_restarted(tlab: TreeLab) -> None:
    old = tlab.kube("leafa")["scheduler_pid"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (tlab.kube("leafa")["scheduler_pid"] not in (None, old)) or None, 60, "a new scheduler")
    assert tlab.status()["restarts"]["scheduler/leafa"] == 1


def test_a_killed_cluster_dns_is_restarted(tlab: TreeLab) -> None:
    old = tlab.kube("leafa")["dns_pid"]
    assert old
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (tlab.kube("leafa")["dns_pid"] not in (None, old)) or None, 60, "a new cluster DNS")
    assert tlab.status()["restarts"]["dns/leafa"] == 1


def _objects(root_id: str) -> str:
    ours = {"kosmos.io/root-cluster": root_id, "kosmos.io/root-uid": "u-1", "app.kubernetes.io/managed-by":
            "kosmos-tree"}
    other = {"kosmos.io/root-cluster": "another-root", "kosmos.io/root-uid": "u-2"}
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in ("apps", "users")]
    for ns, labels in (("apps", ours), ("users", {})):
        meta = {"name": "app", "namespace": ns, "labels": labels}
        docs += [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}},
                 {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {"k": "v"}},
                 {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}]
    docs.append({"apiVersion": "v1", "kind": "ConfigMap", "data": {"k": "v"},
                 "metadata": {"name": "theirs", "namespace": "apps", "labels": other}})
    return yaml.safe_dump_all(docs)


def test_unjoin_of_one_leaf_removes_its_virtual_nodes_and_copies_and_nothing_else(tlab: TreeLab) -> None:
    root_id = tlab.get("root", "namespace", "kube-system")["metadata"]["uid"]
    tlab.apply("leafb", _objects(root_id))
    keep = {n: v["metadata"]["uid"] for n, v in tlab.host_nodes().items() if n not in ("b1", "b2")}
    out = tlab.tool("unjoin", "leafb", "--lab", tlab.name, "--timeout", "60")
    assert "waiting for kosmos-tree" in out.stderr, out.stderr  # the manager removed them, not the tool
    nodes = tlab.host_nodes()
    assert "b1" not in nodes and "b2" not in nodes
    assert {n: v["metadata"]["uid"] for n, v in nodes.items()} == keep
    assert sorted(c["metadata"]["name"] for c in tlab.get("root", "clusters")["items"]) == ["leafa", "leafc"]
    secrets = {s["metadata"]["name"] for s in tlab.get("root", "secrets", "-n", "kosmos-system")["items"]}
    assert "leafb-leaf-kubeconfig" not in secrets and {"leafa-leaf-kubeconfig", "leafc-leaf-kubeconfig"} <= secrets
    for kind in ("configmap", "secret", "serviceaccount"):
        assert tlab.get("leafb", kind, "app", "-n", "apps", check=False) is None, kind
        assert tlab.get("leafb", kind, "app", "-n", "users", check=False) is not None, kind
    assert tlab.get("leafb", "configmap", "theirs", "-n", "apps", check=False) is not None
    assert {n["metadata"]["name"] for n in tlab.get("leafb", "nodes")["items"]} == {"b1", "b2"}
    # The other leaves are untouched: still Ready in the host.
    assert all(node_ready(nodes[n]) == "True" for n in ("kosmos-leafa", "kosmos-leafc-pool-gpu"))
