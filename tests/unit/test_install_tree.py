"""``fabric-tool join --tree`` / ``unjoin`` of a tree leaf (issue 17 item 7), against in-process
API servers (kubeemu): the ``--leaf-model`` values read into ``clusterTreeOptions`` (and refused
with clear errors), the leaf kubeconfig flattened into the host's Secret, the virtual nodes
waited for; unjoin disables the tree, has the virtual nodes removed (by kosmos-tree when one
holds its Lease, else by the tool, which says so) and deletes in the leaf only this root's
copies of the synced kinds: a leaf user's objects of the same names, and another root's, survive.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.kube import Api, ApiError, resource_path
from tests.tree_env import TreeEnv, tree_env
from tests.waiting import wait_until
from tools import install
from tree.leaf import Options
from tree.spec import read


def test_leaf_models_become_cluster_tree_options() -> None:
    ref = {"namespace": "kosmos-system", "name": "x-leaf-kubeconfig"}
    assert install.tree_options("x", []) == {"enable": True, "leafNodeMode": "cluster", "kubeconfigSecretRef": ref}
    assert install.tree_options("x", ["node"])["leafNodeMode"] == "node"
    opts = install.tree_options("x", ["party=pool=gpu,zone in (a,b),!spot", "party=pool=cpu"])
    assert opts["leafModels"] == [
        {"leafNodeName": "pool-gpu-zone-in-a-b-spot", "nodeSelector": {"labelSelector": {
            "matchLabels": {"pool": "gpu"},
            "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]},
                                 {"key": "spot", "operator": "DoesNotExist"}]}}},
        {"leafNodeName": "pool-cpu", "nodeSelector": {"labelSelector": {"matchLabels": {"pool": "cpu"}}}}]
    spec = read({"metadata": {"name": "x", "uid": "u"}, "spec": {"clusterTreeOptions": opts}})
    assert [m.selects({"metadata": {"name": "n", "labels": {"pool": "gpu", "zone": "a"}}}) for m in spec.models] == [
        True, False]


@pytest.mark.parametrize(("models", "expect"), [
    (["nodes"], "--leaf-model 'nodes': expected one of cluster, node, party=SELECTOR"),
    (["party"], "--leaf-model 'party': expected one of"),
    (["cluster=x"], "--leaf-model 'cluster=x': expected one of"),
    (["cluster", "node"], "one leaf model per cluster"),
    (["node", "party=a=b"], "one leaf model per cluster"),
    (["party="], "the party's label selector is empty"),
    (["party=a in (b"], "unable to parse requirement"),
    (["party=pool=a", "party=pool==a"], "is also leafModels[0]'s"),
])
def test_bad_leaf_models_are_refused(models: list[str], expect: str) -> None:
    with pytest.raises(install.InstallUsageError, match=None) as e:
        install.tree_options("x", models)
    assert expect in str(e.value)


def test_the_leaf_kubeconfig_is_its_context_alone_with_files_inlined(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(b"CA")
    (tmp_path / "tok").write_text("secret-token\n")
    kc = {"apiVersion": "v1", "kind": "Config", "current-context": "a",
          "clusters": [{"name": "ca", "cluster": {"server": "https://a:6443", "certificate-authority": "ca.crt"}},
                       {"name": "cb", "cluster": {"server": "https://b:6443"}}],
          "users": [{"name": "ua", "user": {"tokenFile": str(tmp_path / "tok")}}, {"name": "ub", "user": {}}],
          "contexts": [{"name": "a", "context": {"cluster": "ca", "user": "ua"}},
                       {"name": "b", "context": {"cluster": "cb", "user": "ub"}}]}
    path = tmp_path / "kc"
    path.write_text(yaml.safe_dump(kc))
    out = install.leaf_kubeconfig(install.Target(str(path), None))
    assert out["current-context"] == "a" and [c["name"] for c in out["contexts"]] == ["a"]
    ca = base64.b64encode(b"CA").decode()
    assert out["clusters"] == [{"name": "a", "cluster": {"server": "https://a:6443", "certificate-authority-data": ca}}]
    assert out["users"] == [{"name": "a", "user": {"token": "secret-token"}}]
    with pytest.raises(install.InstallUsageError, match="no context 'c'"):
        install.leaf_kubeconfig(install.Target(str(path), "c"))


# -- against API servers ------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[TreeEnv, Path]]:
    with tree_env() as e:
        e.leaf("leaf")
        e.add_node("leaf", "n1", cpu="3")
        if not _has_ns(e.root):
            e.root.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                 "metadata": {"name": "kube-system"}})
        kc = {"apiVersion": "v1", "kind": "Config", "current-context": "root",
              "clusters": [{"name": n, "cluster": {"server": u}} for n, u in
                           (("root", e.root.host), ("leaf", e.leaf("leaf").host))],
              "users": [{"name": "u", "user": {}}],
              "contexts": [{"name": n, "context": {"cluster": n, "user": "u"}} for n in ("root", "leaf")]}
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(kc))
        yield e, path


def _has_ns(api: Api) -> bool:
    try:
        api.get(resource_path("v1", "namespaces", name="kube-system"))
        return True
    except ApiError:
        return False


def _root_id(api: Api) -> str:
    return str(api.get(resource_path("v1", "namespaces", name="kube-system"))["metadata"]["uid"])


def _seed_leaf(leaf: Api, rid: str) -> None:
    """This root's copies (namespace apps), a leaf user's objects of the same names (users),
    another root's copy (apps/theirs)."""
    for ns in ("apps", "users"):
        leaf.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    ours = {"kosmos.io/root-cluster": rid, "kosmos.io/root-uid": "u1"}
    for ns, labels in (("apps", ours), ("users", {})):
        meta: dict[str, Any] = {"name": "app", "labels": labels}
        leaf.create(resource_path("v1", "configmaps", ns), {"metadata": meta, "data": {"k": "v"}})
        leaf.create(resource_path("v1", "secrets", ns), {"metadata": meta, "data": {}})
        leaf.create(resource_path("v1", "serviceaccounts", ns), {"metadata": meta})
        leaf.create(resource_path("v1", "pods", ns),
                    {"metadata": meta, "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
        leaf.create(resource_path("v1", "persistentvolumeclaims", ns),
                    {"metadata": meta, "spec": {"accessModes": ["ReadWriteOnce"],
                                                "resources": {"requests": {"storage": "1Gi"}}}})
    theirs = {"kosmos.io/root-cluster": "other", "kosmos.io/root-uid": "x"}
    leaf.create(resource_path("v1", "configmaps", "apps"), {"metadata": {"name": "theirs", "labels": theirs}})


def _left(leaf: Api) -> set[str]:
    out = set()
    for plural in ("pods", "configmaps", "secrets", "serviceaccounts", "persistentvolumeclaims"):
        for o in leaf.get(resource_path("v1", plural))["items"]:
            if o["metadata"]["name"] in ("app", "theirs"):
                out.add(f"{plural}/{o['metadata']['namespace']}/{o['metadata']['name']}")
    return out


def _run(env: tuple[TreeEnv, Path], with_manager: bool) -> list[str]:
    e, path = env
    host, member = install.Target(str(path), "root"), install.Target(str(path), "leaf")
    rid = _root_id(e.root)
    if with_manager:
        opts = Options(root_id=rid, leaf_timeout=0.5, unreachable_after=1.0, lease_period=0.2, status_period=60.0,
                       resync_period=1.0, root_timeout=5.0)
        e.start_manager(options=opts, leader_elect=True, lease_duration=3.0, renew_deadline=2.0, retry_period=0.5)
    said: list[str] = []
    if with_manager:
        install.join_tree("leaf", host, member, [], timeout_s=30, progress=said.append)
    else:  # join without waiting, then the node a manager would have made
        install.join_tree("leaf", host, member, [], wait=False, progress=said.append)
        m = e.start_manager(options=Options(root_id=rid, leaf_timeout=0.5, unreachable_after=1.0, lease_period=0.2,
                                            status_period=60.0, resync_period=1.0, root_timeout=5.0))
        wait_until(lambda: e.vnode("kosmos-leaf"), 20, "the virtual node")
        e.stop_manager(m)
    vn = e.vnode("kosmos-leaf")
    assert vn is not None and vn["status"]["allocatable"]["cpu"] == "3"
    sec = e.root.get(resource_path("v1", "secrets", "kosmos-system", "leaf-leaf-kubeconfig"))
    kc = yaml.safe_load(base64.b64decode(sec["data"]["kubeconfig"]))
    assert [c["cluster"]["server"] for c in kc["clusters"]] == [e.leaf("leaf").host]
    _seed_leaf(e.leaf("leaf"), rid)
    e.add_node("leaf", "n2")  # the leaf's own objects are not ours to touch
    install.unjoin("leaf", host, member, timeout_s=30, progress=said.append)
    assert e.vnode("kosmos-leaf") is None
    assert _left(e.leaf("leaf")) == {"pods/users/app", "configmaps/users/app", "secrets/users/app",
                                     "serviceaccounts/users/app", "persistentvolumeclaims/users/app",
                                     "configmaps/apps/theirs"}
    assert {n["metadata"]["name"] for n in e.leaf("leaf").get("/api/v1/nodes")["items"]} == {"n1", "n2"}
    with pytest.raises(ApiError):
        e.root.get(resource_path("v1", "secrets", "kosmos-system", "leaf-leaf-kubeconfig"))
    assert e.root.get(resource_path("kosmos.io/v1alpha1", "clusters"))["items"] == []
    return said


def test_join_and_unjoin_with_a_running_manager(env: tuple[TreeEnv, Path]) -> None:
    said = _run(env, with_manager=True)
    assert any("waiting for kosmos-tree" in s for s in said), said
    assert any("clusterTreeOptions.enable set false" in s for s in said), said


def test_unjoin_without_a_manager_removes_the_virtual_nodes_itself(env: tuple[TreeEnv, Path]) -> None:
    said = _run(env, with_manager=False)
    assert any("no kosmos-tree holds the Lease kube-system/kosmos-tree: removed the virtual nodes kosmos-leaf here"
               in s for s in said), said


def test_a_cluster_is_no_leaf_of_itself(tmp_path: Path) -> None:
    t = install.Target(str(tmp_path / "kc"), "root")
    with pytest.raises(install.InstallUsageError, match="a cluster is no leaf of itself"):
        install.join("root", t, t, install.JoinOptions(), tree=[], reflector="x:1", dry_run=True)


def test_cli_leaf_model_needs_tree_and_is_checked_before_anything(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tools import cli

    kc = str(tmp_path / "kc")
    assert cli.main(["join", "leaf", "--kubeconfig", kc, "--leaf-model", "node"]) == 2
    assert "--leaf-model needs --tree" in capsys.readouterr().err
    assert cli.main(["join", "leaf", "--kubeconfig", kc, "--tree", "--leaf-model", "nodes", "--dry-run"]) == 2
    assert "--leaf-model 'nodes': expected one of cluster, node, party=SELECTOR" in capsys.readouterr().err


def test_a_fabric_join_keeps_the_live_tree_options() -> None:
    obj = install.cluster_object("leaf", install.JoinOptions(network_type="p2p"), [], [])
    tree = {"enable": True, "leafNodeMode": "node", "kubeconfigSecretRef": {"namespace": "n", "name": "s"}}
    live = {"spec": {"clusterLinkOptions": {"networkType": "gateway"}, "clusterTreeOptions": tree}}
    kept = install.keep_live_tree(obj, live)
    assert kept["spec"] == {"clusterLinkOptions": {"networkType": "p2p"}, "clusterTreeOptions": tree}
    assert install.keep_live_tree(obj, {"spec": {}}) == obj


def test_a_fabric_join_of_a_host_does_not_wait_for_its_virtual_nodes() -> None:
    """They run no agent (found in the lab: ``join root`` of a tree host timed out on them)."""
    vn = {"metadata": {"name": "kosmos-leaf", "labels": {"app.kubernetes.io/managed-by": "kosmos-tree"},
                       "annotations": {"kosmos-io/owned-by-cluster": "leaf", "kosmos.io/cluster-uid": "u"}}}
    assert install._is_virtual_node(vn)
    assert not install._is_virtual_node({"metadata": {"name": "r1", "labels": {"kubernetes.io/hostname": "r1"}}})
