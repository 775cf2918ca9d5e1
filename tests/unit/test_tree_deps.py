"""tree.deps: a root pod's ConfigMaps, Secrets, ServiceAccount and PVCs copied into a leaf (renamed
on collisions, kube-root-ca.crt as master-root-ca.crt), edits propagated, unreferenced copies
released, PVCs provisioned in the leaf with their PVs mirrored and bound in the root, restarts.

In-process kubeemu root and leaf (tests/tree_env.py); the leaf's provisioner and binder are
played by :meth:`TreeEnv.provision` (what they write, no controller running)."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from scheduler.kube import Api, ApiError, resource_path
from tests.tree_env import ROOT_CA_PEM, ROOT_ID, TreeEnv
from tests.waiting import wait_until
from tree import identity
from tree.deps import DependencyError, RootObjects
from tree.deps_refs import MIRROR_CLUSTER_LABEL, ROOT_NODE_ANNOTATION, SELECTED_NODE, names_used, references, rename

Obj = dict[str, Any]
NS = "app"


@pytest.fixture
def env() -> Iterator[TreeEnv]:
    e = TreeEnv()
    try:
        e.root_namespace(NS)
        yield e
    finally:
        e.close()


def path(plural: str, name: str | None = None, ns: str | None = NS) -> str:
    return resource_path("v1", plural, ns, name)


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def cm(api: Api, name: str, ns: str = NS, **data: str) -> Obj:
    got: Obj = api.create(path("configmaps", ns=ns), {"metadata": {"name": name}, "data": data})
    return got


def secret(api: Api, name: str, ns: str = NS, type_: str = "Opaque", **data: str) -> Obj:
    got: Obj = api.create(path("secrets", ns=ns), {"metadata": {"name": name}, "type": type_,
                                                   "data": {k: b64(v) for k, v in data.items()}})
    return got


def get(api: Api, plural: str, name: str, ns: str | None = NS) -> Obj | None:
    try:
        got: Obj = api.get(resource_path("v1", plural, ns, name))
        return got
    except ApiError as e:
        if e.status == 404:
            return None
        raise


def copies(api: Api, plural: str, root_uid: str, ns: str = NS) -> list[Obj]:
    items: list[Obj] = api.get(path(plural, ns=ns), labelSelector=identity.selector(ROOT_ID, root_uid))["items"]
    return items


def base_renames(env: TreeEnv) -> dict[tuple[str, str], str]:
    """The renames every pod of namespace NS has: its default ServiceAccount's."""
    sa = env.root.get(path("serviceaccounts", "default"))
    return {("serviceaccounts", "default"): f"default-{identity.suffix(ROOT_ID, sa['metadata']['uid'])}"}


def root_pod(env: TreeEnv, name: str, *, volumes: list[Obj] | None = None, node: str = "kosmos-c1",
             **spec: Any) -> Obj:
    """A pod created in the root (its admission adds the kube-api-access volume), bound to ``node``."""
    containers = spec.pop("containers", [{"name": "c", "image": "busybox"}])
    pod: Obj = env.root.create(path("pods"), {"metadata": {"name": name},
                                              "spec": {"containers": containers, "volumes": volumes or [],
                                                       "nodeName": node, **spec}})
    return pod


def test_references_reads_every_kind_of_reference() -> None:
    pod = {"spec": {
        "serviceAccountName": "runner",
        "imagePullSecrets": [{"name": "pull"}],
        "volumes": [{"name": "a", "configMap": {"name": "cm-vol"}},
                    {"name": "b", "secret": {"secretName": "sec-vol", "optional": True}},
                    {"name": "c", "persistentVolumeClaim": {"claimName": "data"}},
                    {"name": "d", "csi": {"driver": "x", "nodePublishSecretRef": {"name": "csi-sec"}}},
                    {"name": "e", "projected": {"sources": [{"configMap": {"name": "cm-proj"}},
                                                            {"secret": {"name": "sec-proj"}},
                                                            {"serviceAccountToken": {"path": "token"}}]}}],
        "initContainers": [{"name": "i", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {
            "name": "cm-init", "key": "k"}}}]}],
        "containers": [{"name": "m", "envFrom": [{"secretRef": {"name": "sec-from"}},
                                                 {"configMapRef": {"name": "cm-from", "optional": True}}],
                        "env": [{"name": "Y", "valueFrom": {"secretKeyRef": {"name": "sec-env", "key": "k"}}}]}],
        "ephemeralContainers": [{"name": "dbg", "envFrom": [{"configMapRef": {"name": "cm-eph"}}]}],
    }}
    got = {(r.plural, r.name, r.optional) for r in references(pod)}
    assert got == {
        ("configmaps", "cm-vol", False), ("secrets", "sec-vol", True), ("persistentvolumeclaims", "data", False),
        ("secrets", "csi-sec", False), ("configmaps", "cm-proj", False), ("secrets", "sec-proj", False),
        ("configmaps", "cm-init", False), ("secrets", "sec-from", False), ("configmaps", "cm-from", True),
        ("secrets", "sec-env", False), ("configmaps", "cm-eph", False), ("secrets", "pull", True),
        ("serviceaccounts", "runner", False)}
    assert ("serviceaccounts", "default", False) in {(r.plural, r.name, r.optional) for r in references({"spec": {}})}


def test_rename_rewrites_what_references_reads() -> None:
    token = {"serviceAccountToken": {"path": "token"}}
    ca = {"configMap": {"name": "kube-root-ca.crt"}}
    pod = {"spec": {
        "serviceAccount": "runner", "serviceAccountName": "runner", "imagePullSecrets": [{"name": "pull"}],
        "volumes": [{"name": "a", "configMap": {"name": "cm"}}, {"name": "b", "secret": {"secretName": "sec"}},
                    {"name": "c", "persistentVolumeClaim": {"claimName": "data"}},
                    {"name": "d", "csi": {"driver": "x", "nodePublishSecretRef": {"name": "sec"}}},
                    {"name": "api", "projected": {"sources": [token, ca]}},
                    {"name": "e", "projected": {"sources": [ca, {"secret": {"name": "sec"}}]}}],
        "initContainers": [{"name": "i", "envFrom": [{"configMapRef": {"name": "cm"}}]}],
        "containers": [{"name": "m",
                        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "k"}}},
                                {"name": "Y", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}],
                        "envFrom": [{"secretRef": {"name": "pull"}}]}]}}
    renames = {("configmaps", "cm"): "cm-1", ("secrets", "sec"): "sec-1", ("secrets", "pull"): "pull-1",
               ("persistentvolumeclaims", "data"): "data-1", ("serviceaccounts", "runner"): "runner-1",
               ("configmaps", "kube-root-ca.crt"): "master-root-ca.crt"}
    before = copy.deepcopy(pod)

    out = rename(pod, renames)

    assert pod == before  # a copy
    assert names_used(out) == {(plural, renames.get((plural, name), name)) for plural, name in names_used(pod)}
    assert out["spec"]["serviceAccount"] == "runner-1"
    api = next(v for v in out["spec"]["volumes"] if v["name"] == "api")
    assert api["projected"]["sources"][1] == ca  # the leaf's own CA beside the leaf's token


def test_the_ca_beside_a_projected_token_is_the_leafs_own() -> None:
    token = {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}
    ca = {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
    api_access = {"spec": {"volumes": [{"name": "kube-api-access-x", "projected": {"sources": [token, ca]}}]}}
    assert ("configmaps", "kube-root-ca.crt") not in {(r.plural, r.name) for r in references(api_access)}
    user_ca = {"spec": {"volumes": [{"name": "ca", "projected": {"sources": [ca]}}]}}
    assert ("configmaps", "kube-root-ca.crt") in {(r.plural, r.name) for r in references(user_ca)}


def test_every_reference_kind_is_copied_with_its_ownership(env: TreeEnv) -> None:
    root, leaf = env.root, env.leaf("l1")
    made = {("configmaps", n): cm(root, n, v=n) for n in ("cm-vol", "cm-proj", "cm-env", "cm-from")}
    made |= {("secrets", n): secret(root, n, v=n) for n in ("sec-vol", "sec-proj", "sec-env", "sec-from", "pull")}
    root.create(path("serviceaccounts"), {"metadata": {"name": "runner"}, "automountServiceAccountToken": True})
    pod = root_pod(env, "web", serviceAccountName="runner", imagePullSecrets=[{"name": "pull"}], volumes=[
        {"name": "a", "configMap": {"name": "cm-vol"}},
        {"name": "b", "secret": {"secretName": "sec-vol"}},
        {"name": "c", "projected": {"sources": [{"configMap": {"name": "cm-proj"}}, {"secret": {"name": "sec-proj"}}]}},
        {"name": "gone", "configMap": {"name": "not-there", "optional": True}},
        {"name": "rootca", "configMap": {"name": "kube-root-ca.crt"}},
    ], containers=[{"name": "c", "image": "busybox",
                    "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "v"}}},
                            {"name": "B", "valueFrom": {"secretKeyRef": {"name": "sec-env", "key": "v"}}}],
                    "envFrom": [{"configMapRef": {"name": "cm-from"}}, {"secretRef": {"name": "sec-from"}}]}])
    deps = env.start_deps("l1", "c1")

    renames = deps.ensure(pod, NS)

    # The pod asks for the root's CA: it arrives under Kosmos' name (SA runner keeps its own).
    assert renames == {("configmaps", "kube-root-ca.crt"): "master-root-ca.crt"}
    ca = get(leaf, "configmaps", "master-root-ca.crt")
    assert ca is not None and ca["data"] == {"ca.crt": ROOT_CA_PEM}
    assert get(leaf, "configmaps", "kube-root-ca.crt") is None  # the leaf's own name is left to the leaf
    for (plural, name), obj in made.items():
        copy = get(leaf, plural, name)
        assert copy is not None, (plural, name)
        assert copy["data"] == obj["data"]
        assert identity.is_copy_of(copy, ROOT_ID, obj["metadata"]["uid"])
        assert copy["metadata"]["annotations"][identity.ROOT_NAME_ANNOTATION] == f"{NS}/{name}"
    sa = get(leaf, "serviceaccounts", "runner")
    assert sa is not None and sa["automountServiceAccountToken"] is True
    assert identity.is_ours(sa, ROOT_ID)
    assert get(leaf, "configmaps", "not-there") is None  # optional and missing: skipped
    assert deps.metrics.dependency_writes.labels("c1", "ConfigMap", "create")._value.get() == 5


def test_collisions_rename_and_a_shared_configmap_is_one_copy(env: TreeEnv) -> None:
    root, leaf = env.root, env.leaf("l1")
    leaf.create("/api/v1/namespaces", {"metadata": {"name": NS}})
    users = cm(leaf, "settings", mine="yes")  # a leaf user's ConfigMap with the root's name
    cm(leaf, "master-root-ca.crt", ca="leaf user's")
    root_cm = cm(root, "settings", theirs="root")
    vols = [{"name": "s", "configMap": {"name": "settings"}}, {"name": "ca", "configMap": {"name": "kube-root-ca.crt"}}]
    pods = [root_pod(env, f"p{i}", volumes=vols) for i in range(3)]
    deps = env.start_deps("l1", "c1")

    results = [deps.ensure(p, NS) for p in pods]

    name = f"settings-{identity.suffix(ROOT_ID, root_cm['metadata']['uid'])}"
    assert all(r[("configmaps", "settings")] == name for r in results)
    assert results[0][("configmaps", "kube-root-ca.crt")].startswith("master-root-ca.crt-")
    assert [c["metadata"]["name"] for c in copies(leaf, "configmaps", root_cm["metadata"]["uid"])] == [name]
    assert get(leaf, "configmaps", name)["data"] == {"theirs": "root"}  # type: ignore[index]
    still = get(leaf, "configmaps", "settings")
    assert still is not None and still["data"] == {"mine": "yes"}
    assert still["metadata"]["resourceVersion"] == users["metadata"]["resourceVersion"]


def test_concurrent_ensures_of_a_shared_configmap_make_one_copy(env: TreeEnv) -> None:
    root_cm = cm(env.root, "shared", v="1")
    pods = [root_pod(env, f"p{i}", volumes=[{"name": "a", "configMap": {"name": "shared"}}]) for i in range(12)]
    deps = env.start_deps("l1", "c1")

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda p: deps.ensure(p, NS), pods))

    assert all(r == results[0] for r in results)
    assert len(copies(env.leaf("l1"), "configmaps", root_cm["metadata"]["uid"])) == 1
    sa = env.root.get(path("serviceaccounts", "default"))
    assert len(copies(env.leaf("l1"), "serviceaccounts", sa["metadata"]["uid"])) == 1


def test_a_missing_or_refused_dependency_raises_naming_it(env: TreeEnv) -> None:
    root, leaf = env.root, env.leaf("l1")
    cm(root, "here", a="1")
    secret(root, "legacy", type_="kubernetes.io/service-account-token", token="never")
    deps = env.start_deps("l1", "c1")
    pod = root_pod(env, "p", volumes=[{"name": "a", "configMap": {"name": "here"}},
                                      {"name": "b", "secret": {"secretName": "nope"}},
                                      {"name": "c", "secret": {"secretName": "legacy"}}],
                   imagePullSecrets=[{"name": "absent"}])  # upstream pulls without it: not an error

    with pytest.raises(DependencyError) as e:
        deps.ensure(pod, NS)

    msg = str(e.value)
    assert "Secret app/nope: not found in the root cluster" in msg and "volume b of pod app/p" in msg
    assert "Secret app/legacy: is a legacy service-account token Secret" in msg
    assert "absent" not in msg
    assert get(leaf, "configmaps", "here") is not None  # the others were copied all the same
    assert get(leaf, "secrets", "legacy") is None
    assert deps.metrics.dependency_errors.labels("c1", "Secret", "missing")._value.get() == 1
    assert deps.metrics.dependency_errors.labels("c1", "Secret", "refused")._value.get() == 1


def test_missing_service_account_raises(env: TreeEnv) -> None:
    pod = root_pod(env, "p")
    env.root.request("DELETE", path("serviceaccounts", "default"))
    deps = env.start_deps("l1", "c1")
    with pytest.raises(DependencyError, match="ServiceAccount app/default: not found"):
        deps.ensure(pod, NS)


def test_root_edits_propagate_and_leaf_edits_are_put_back(env: TreeEnv) -> None:
    root, leaf = env.root, env.leaf("l1")
    cm(root, "conf", level="info")
    secret(root, "creds", password="one")
    cm(root, "unused", x="1")
    pod = root_pod(env, "p", volumes=[{"name": "a", "configMap": {"name": "conf"}},
                                      {"name": "b", "secret": {"secretName": "creds"}}])
    deps = env.start_deps("l1", "c1", resync_period=3600.0)  # events alone, no resync
    deps.ensure(pod, NS)

    root.patch(path("configmaps", "conf"), {"data": {"level": "debug", "extra": "x"}})
    root.patch(path("secrets", "creds"), {"data": {"password": b64("two")}})
    root.patch(path("configmaps", "unused"), {"data": {"x": "2"}})
    wait_until(lambda: (get(leaf, "configmaps", "conf") or {}).get("data") == {"level": "debug", "extra": "x"},
               10, "the ConfigMap edit reached the leaf copy")
    wait_until(lambda: (get(leaf, "secrets", "creds") or {}).get("data") == {"password": b64("two")},
               10, "the Secret edit reached the leaf copy")

    leaf.patch(path("configmaps", "conf"), {"data": {"level": "hacked"}})
    wait_until(lambda: (get(leaf, "configmaps", "conf") or {}).get("data") == {"level": "debug", "extra": "x"},
               10, "the leaf copy put back")
    assert get(leaf, "configmaps", "unused") is None  # only objects with a copy are written


def test_leaves_share_one_set_of_root_informers_and_a_stopped_one_hears_nothing(env: TreeEnv) -> None:
    """The manager's RootObjects: one informer per root kind for every leaf's Dependencies, each
    subscribed while it runs; edits reach every leaf's copy; one stopped leaves the others be."""
    root, l1, l2 = env.root, env.leaf("l1"), env.leaf("l2")
    cm(root, "conf", level="info")
    pod = root_pod(env, "p", volumes=[{"name": "a", "configMap": {"name": "conf"}}])
    shared = RootObjects(Api(root.host))
    shared.start()
    try:
        first = env.start_deps("l1", "c1", resync_period=3600.0, root_objects=shared)
        second = env.start_deps("l2", "c2", resync_period=3600.0, root_objects=shared)
        assert first._root_inf is second._root_inf is shared.informers
        first.ensure(pod, NS)
        second.ensure(pod, NS)
        root.patch(path("configmaps", "conf"), {"data": {"level": "debug"}})
        for leaf in (l1, l2):
            wait_until(lambda leaf=leaf: (get(leaf, "configmaps", "conf") or {}).get("data") == {"level": "debug"},
                       10, "the edit reached each leaf's copy")
        env.stop_deps(first)
        assert all(inf._thread is not None and inf._thread.is_alive() for inf in shared.informers.values())
        assert shared._subscribers == [second._on_root]
        root.patch(path("configmaps", "conf"), {"data": {"level": "warn"}})
        wait_until(lambda: (get(l2, "configmaps", "conf") or {}).get("data") == {"level": "warn"}, 10,
                   "the edit reached the running leaf's copy")
        assert (get(l1, "configmaps", "conf") or {}).get("data") == {"level": "debug"}  # the stopped one: no write
    finally:
        shared.stop()


def leaf_pod(root_pod: Obj, renames: dict[tuple[str, str], str]) -> Obj:
    """The leaf pod as the pod syncer makes it (for these tests: references renamed, no more)."""
    pod = rename(root_pod, renames)
    return {"metadata": {"name": root_pod["metadata"]["name"], "namespace": NS}, "spec": pod["spec"]}


def test_release_deletes_only_unreferenced_copies_of_ours(env: TreeEnv) -> None:
    root, leaf = env.root, env.leaf("l1")
    leaf.create("/api/v1/namespaces", {"metadata": {"name": NS}})
    cm(leaf, "shared", owner="leaf user")
    cm(root, "shared", owner="root")
    cm(root, "solo", v="1")
    keep = root_pod(env, "keep", volumes=[{"name": "a", "configMap": {"name": "shared"}},
                                          {"name": "ca", "configMap": {"name": "kube-root-ca.crt"}}])
    drop = root_pod(env, "drop", volumes=[{"name": "a", "configMap": {"name": "solo"}}])
    deps = env.start_deps("l1", "c1")
    renames = deps.ensure(keep, NS)
    deps.ensure(drop, NS)
    shared, sa = renames[("configmaps", "shared")], renames[("serviceaccounts", "default")]
    wait_until(lambda: len(deps._copies("configmaps")) == 3, 10, "the leaf informer saw the copies")

    deps.release([leaf_pod(keep, renames)])

    assert get(leaf, "configmaps", "solo") is None
    assert get(leaf, "configmaps", shared) is not None
    assert get(leaf, "configmaps", "master-root-ca.crt") is not None
    assert get(leaf, "serviceaccounts", sa) is not None  # still named by the kept pod
    assert (get(leaf, "configmaps", "shared") or {}).get("data") == {"owner": "leaf user"}

    deps.release([])

    assert get(leaf, "configmaps", shared) is None and get(leaf, "serviceaccounts", sa) is None
    assert get(leaf, "configmaps", "master-root-ca.crt") is None
    # Never a leaf user's object of a copy's name: their ConfigMap, the leaf's own default SA.
    assert (get(leaf, "configmaps", "shared") or {}).get("data") == {"owner": "leaf user"}
    assert get(leaf, "serviceaccounts", "default") is not None


def test_a_recreated_root_object_gets_a_new_copy_and_the_old_one_is_released(env: TreeEnv) -> None:
    root, leaf = env.root, env.leaf("l1")
    old_cm = cm(root, "conf", v="old")
    first = root_pod(env, "p1", volumes=[{"name": "a", "configMap": {"name": "conf"}}])
    deps = env.start_deps("l1", "c1")
    r1 = deps.ensure(first, NS)
    assert ("configmaps", "conf") not in r1
    root.request("DELETE", path("configmaps", "conf"))
    new_cm = cm(root, "conf", v="new")
    second = root_pod(env, "p2", volumes=[{"name": "a", "configMap": {"name": "conf"}}])

    r2 = deps.ensure(second, NS)

    # The old copy (a running pod may still use it) keeps its content and the name; the new one is renamed.
    renamed = r2[("configmaps", "conf")]
    assert renamed == f"conf-{identity.suffix(ROOT_ID, new_cm['metadata']['uid'])}"
    assert (get(leaf, "configmaps", "conf") or {}).get("data") == {"v": "old"}
    assert (get(leaf, "configmaps", renamed) or {}).get("data") == {"v": "new"}
    wait_until(lambda: len(deps._copies("configmaps")) == 2, 10, "the leaf informer saw the copies")
    deps.release([leaf_pod(second, r2)])
    assert copies(leaf, "configmaps", old_cm["metadata"]["uid"]) == []
    assert get(leaf, "configmaps", renamed) is not None


def test_ensure_reads_the_root_object_itself_not_a_store_behind_a_recreate(env: TreeEnv) -> None:
    """The cause of the flaky test above: ensure took the root object from the informer's store,
    which may not have seen a delete-and-recreate yet; the new pod then got the old object's copy
    (the old content) for good. Here the store is held behind the recreate on purpose."""
    root = env.root
    cm(root, "conf", v="old")
    deps = env.start_deps("l1", "c1")
    deps.ensure(root_pod(env, "p1", volumes=[{"name": "a", "configMap": {"name": "conf"}}]), NS)
    frozen = deps._root_inf["configmaps"]
    frozen.stop()
    frozen.join(10)
    root.request("DELETE", path("configmaps", "conf"))
    new_cm = cm(root, "conf", v="new")
    assert frozen.store[f"{NS}/conf"]["metadata"]["uid"] != new_cm["metadata"]["uid"]  # behind

    renames = deps.ensure(root_pod(env, "p2", volumes=[{"name": "a", "configMap": {"name": "conf"}}]), NS)

    assert (get(env.leaf("l1"), "configmaps", renames[("configmaps", "conf")]) or {}).get("data") == {"v": "new"}


def test_release_keeps_what_ensure_just_handed_out(env: TreeEnv) -> None:
    now = [1000.0]
    cm(env.root, "fresh", v="1")
    pod = root_pod(env, "p", volumes=[{"name": "a", "configMap": {"name": "fresh"}}])
    deps = env.start_deps("l1", "c1", pin_seconds=30.0, clock=lambda: now[0])
    deps.ensure(pod, NS)  # the pod syncer has not created the leaf pod yet

    deps.release([])
    assert get(env.leaf("l1"), "configmaps", "fresh") is not None

    now[0] += 31
    deps.release([])
    assert get(env.leaf("l1"), "configmaps", "fresh") is None


def test_a_second_instance_finds_the_copies_by_uid(env: TreeEnv) -> None:
    root, leaf = env.root, env.leaf("l1")
    leaf.create("/api/v1/namespaces", {"metadata": {"name": NS}})
    cm(leaf, "conf", owner="leaf user")  # forces a rename, which the second instance must find again
    root_cm = cm(root, "conf", v="1")
    pod = root_pod(env, "p", volumes=[{"name": "a", "configMap": {"name": "conf"}}])
    first = env.start_deps("l1", "c1")
    renames = first.ensure(pod, NS)
    before = {c["metadata"]["uid"] for p in ("configmaps", "serviceaccounts")
              for c in leaf.get(path(p), labelSelector=identity.selector(ROOT_ID))["items"]}
    env.stop_deps(first)

    second = env.start_deps("l1", "c1")
    assert second.ensure(pod, NS) == renames
    after = {c["metadata"]["uid"] for p in ("configmaps", "serviceaccounts")
             for c in leaf.get(path(p), labelSelector=identity.selector(ROOT_ID))["items"]}
    assert after == before
    assert len(copies(leaf, "configmaps", root_cm["metadata"]["uid"])) == 1


@contextlib.contextmanager
def pvc_setup(env: TreeEnv, mode: str = "cluster", node: str = "") -> Iterator[tuple[Obj, Obj]]:
    """A root PVC ``data`` (class ``fast``, 1Gi) used by pod ``p`` and ensured into leaf ``l1``;
    yields (root PVC, root pod)."""
    env.storage_class(env.root, "fast")
    env.storage_class(env.leaf("l1"), "fast")
    pvc: Obj = env.root.create(path("persistentvolumeclaims"), {
        "metadata": {"name": "data", "annotations": {"volume.kubernetes.io/selected-node": "kosmos-c1"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                 "resources": {"requests": {"storage": "1Gi"}}}})
    node = node or ("leaf-n1" if mode == "node" else "kosmos-c1")
    pod = root_pod(env, "p", node=node, volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}])
    yield pvc, pod


def test_pvc_is_provisioned_in_the_leaf_and_its_pv_mirrored_and_bound_in_the_root(env: TreeEnv) -> None:
    root, leaf = env.root, env.leaf("l1")
    with pvc_setup(env) as (pvc, pod):
        deps = env.start_deps("l1", "c1")
        assert deps.ensure(pod, NS) == base_renames(env)
        leaf_pvc = get(leaf, "persistentvolumeclaims", "data")
        assert leaf_pvc is not None and leaf_pvc["spec"]["storageClassName"] == "fast"
        assert not leaf_pvc["spec"].get("volumeName")
        ann = leaf_pvc["metadata"]["annotations"]
        assert SELECTED_NODE not in ann and ann[ROOT_NODE_ANNOTATION] == "kosmos-c1"
        assert identity.is_copy_of(leaf_pvc, ROOT_ID, pvc["metadata"]["uid"])

        leaf_pv = env.provision("l1", NS, "data", node="leaf-n1")

        def mirrored() -> Obj | None:
            pvs = root.get("/api/v1/persistentvolumes", labelSelector=f"{MIRROR_CLUSTER_LABEL}=c1")["items"]
            return pvs[0] if pvs and pvs[0].get("status", {}).get("phase") == "Bound" else None
        wait_until(mirrored, 10, "the leaf PV mirrored into the root")
        pv = mirrored()
        assert pv is not None and pv["metadata"]["name"] == leaf_pv["metadata"]["name"]
        assert pv["spec"]["claimRef"]["uid"] == pvc["metadata"]["uid"]
        assert pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"] == [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["kosmos-c1"]}]}]
        assert pv["spec"]["capacity"] == {"storage": "1Gi"} and pv["spec"]["local"] == leaf_pv["spec"]["local"]

        def root_pvc() -> Obj:
            got: Obj = root.get(path("persistentvolumeclaims", "data"))
            return got
        wait_until(lambda: root_pvc().get("status", {}).get("phase") == "Bound", 10, "the root PVC Bound")
        assert root_pvc()["spec"]["volumeName"] == pv["metadata"]["name"]
        assert root_pvc()["status"]["capacity"] == {"storage": "1Gi"}

        # Resize: the root request flows down; the leaf's expansion flows back up.
        root.patch(path("persistentvolumeclaims", "data"), {"spec": {"resources": {"requests": {"storage": "2Gi"}}}})
        wait_until(lambda: (get(leaf, "persistentvolumeclaims", "data") or {})["spec"]["resources"]["requests"]
                   ["storage"] == "2Gi", 10, "the larger request patched down")
        leaf.patch(resource_path("v1", "persistentvolumes", name=leaf_pv["metadata"]["name"]),
                   {"spec": {"capacity": {"storage": "2Gi"}}})
        leaf.patch(path("persistentvolumeclaims", "data") + "/status", {"status": {"capacity": {"storage": "2Gi"}}})
        wait_until(lambda: root_pvc()["status"]["capacity"] == {"storage": "2Gi"}, 10, "root PVC capacity grown")
        wait_until(lambda: root.get(resource_path("v1", "persistentvolumes", name=pv["metadata"]["name"]))
                   ["spec"]["capacity"] == {"storage": "2Gi"}, 10, "root PV capacity grown")

        # Deleting the root PVC deletes the leaf copy (by UID) and, reclaim policy Delete, the mirror.
        root.request("DELETE", path("persistentvolumeclaims", "data"))
        wait_until(lambda: get(leaf, "persistentvolumeclaims", "data") is None, 10, "the leaf PVC deleted")
        wait_until(lambda: get(root, "persistentvolumes", pv["metadata"]["name"], ns=None) is None, 10,
                   "the mirror deleted")


def test_retained_mirror_is_released_and_node_mode_keeps_the_real_node(env: TreeEnv) -> None:
    root, leaf = env.root, env.leaf("l1")
    with pvc_setup(env, mode="node") as (_pvc, pod):
        deps = env.start_deps("l1", "c1", mode="node")
        deps.ensure(pod, NS)
        leaf_pvc = get(leaf, "persistentvolumeclaims", "data")
        # One-per-node: the leaf pod is bound by nodeName, no leaf scheduler selects a node for it.
        assert leaf_pvc is not None and leaf_pvc["metadata"]["annotations"][SELECTED_NODE] == "leaf-n1"
        leaf_pv = env.provision("l1", NS, "data", node="leaf-n1", reclaim="Retain")
        name = leaf_pv["metadata"]["name"]
        wait_until(lambda: (get(root, "persistentvolumes", name, ns=None) or {}).get("status", {}).get("phase")
                   == "Bound", 10, "the mirror Bound")
        mirror = get(root, "persistentvolumes", name, ns=None)
        assert mirror is not None
        assert mirror["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0][
            "values"] == ["leaf-n1"]

        root.request("DELETE", path("persistentvolumeclaims", "data"))
        wait_until(lambda: get(leaf, "persistentvolumeclaims", "data") is None, 10, "the leaf PVC deleted")
        wait_until(lambda: (get(root, "persistentvolumes", name, ns=None) or {}).get("status", {}).get("phase")
                   == "Released", 10, "the retained mirror Released")


def test_party_mode_mirror_is_pinned_to_the_party_the_claim_was_first_used_from(env: TreeEnv) -> None:
    with pvc_setup(env, node="kosmos-c1-gpu") as (_pvc, pod):
        deps = env.start_deps("l1", "c1", mode="party")
        deps.ensure(pod, NS)
        name = env.provision("l1", NS, "data", node="leaf-gpu-3")["metadata"]["name"]
        wait_until(lambda: get(env.root, "persistentvolumes", name, ns=None), 10, "mirrored")
        mirror = get(env.root, "persistentvolumes", name, ns=None)
        assert mirror is not None
        assert mirror["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0][
            "values"] == ["kosmos-c1-gpu"]


def test_a_pvc_bound_elsewhere_is_refused(env: TreeEnv) -> None:
    root = env.root
    with pvc_setup(env) as (_pvc, pod):
        deps = env.start_deps("l1", "c1")
        deps.ensure(pod, NS)
        leaf_pv = env.provision("l1", NS, "data")
        wait_until(lambda: (get(root, "persistentvolumeclaims", "data") or {}).get("spec", {}).get("volumeName"),
                   10, "the root PVC bound to its mirror")
        # Another leaf's Dependencies: the claim's data lives in l1.
        other = env.start_deps("l2", "c2")
        with pytest.raises(DependencyError, match=f"PersistentVolumeClaim app/data: is bound to PersistentVolume "
                                                  f"{leaf_pv['metadata']['name']}, which is not a volume of leaf "
                                                  f"cluster c2"):
            other.ensure(pod, NS)
        assert get(env.leaf("l2"), "persistentvolumeclaims", "data") is None
        # The same leaf again (a StatefulSet pod recreated): the existing copy, no second volume.
        assert deps.ensure(pod, NS) == base_renames(env)
        assert len(env.leaf("l1").get(path("persistentvolumeclaims"))["items"]) == 1


def test_a_restarted_instance_collects_a_pvc_deleted_while_it_was_down(env: TreeEnv) -> None:
    root, leaf = env.root, env.leaf("l1")
    with pvc_setup(env) as (_pvc, pod):
        first = env.start_deps("l1", "c1")
        first.ensure(pod, NS)
        name = env.provision("l1", NS, "data")["metadata"]["name"]
        wait_until(lambda: get(root, "persistentvolumes", name, ns=None) is not None, 10, "mirrored")
        env.stop_deps(first)
        root.request("DELETE", path("persistentvolumeclaims", "data"))

        env.start_deps("l1", "c1")
        wait_until(lambda: get(leaf, "persistentvolumeclaims", "data") is None, 10, "the leaf PVC collected")
        wait_until(lambda: get(root, "persistentvolumes", name, ns=None) is None, 10, "the mirror collected")


def test_pvc_and_pv_writes_never_land_on_an_object_recreated_under_its_name(env: TreeEnv) -> None:
    """The PVCs and the mirror as the worker read them, then each deleted and made again under
    the same name by someone else (a new uid) before the write: every patch carries the uid it
    was computed from, the API server refuses it (422: metadata.uid is immutable), and the new
    objects stay as they were made. By name alone, each would have landed on the new object."""
    root, leaf = env.root, env.leaf("l1")
    pvcs, pvs = "persistentvolumeclaims", "persistentvolumes"
    with pvc_setup(env) as (unbound_root_pvc, pod):
        deps = env.start_deps("l1", "c1")
        deps.ensure(pod, NS)
        name = env.provision("l1", NS, "data", reclaim="Retain")["metadata"]["name"]
        wait_until(lambda: (get(root, pvcs, "data") or {}).get("status", {}).get("phase") == "Bound", 10,
                   "the root PVC bound to its mirror")
        bound_root_pvc, leaf_pvc = get(root, pvcs, "data"), get(leaf, pvcs, "data")
        mirror = get(root, pvs, name, ns=None)
        assert bound_root_pvc is not None and mirror is not None and leaf_pvc is not None
        root.request("DELETE", path(pvcs, "data"))
        wait_until(lambda: get(leaf, pvcs, "data") is None, 10, "the leaf PVC deleted")
        wait_until(lambda: (get(root, pvs, name, ns=None) or {}).get("status", {}).get("phase") == "Released", 10,
                   "the retained mirror Released")
        root.request("DELETE", resource_path("v1", pvs, name=name))
        claim = {"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                                                         "resources": {"requests": {"storage": "1Gi"}}}}
        new_objects = [
            (root, path(pvcs, "data"), root.create(path(pvcs), claim)),
            (leaf, path(pvcs, "data"), leaf.create(path(pvcs), claim)),
            (root, resource_path("v1", pvs, name=name), root.create(resource_path("v1", pvs), {
                "metadata": {"name": name}, "spec": {k: v for k, v in mirror["spec"].items() if k != "claimRef"}})),
        ]
        assert all(new["metadata"]["uid"] not in (leaf_pvc["metadata"]["uid"], mirror["metadata"]["uid"],
                                                  bound_root_pvc["metadata"]["uid"]) for _, _, new in new_objects)
        grown = {**leaf_pvc, "status": {**leaf_pvc["status"], "capacity": {"storage": "2Gi"}}}
        refused: list[Callable[[], None]] = [
            lambda: deps._bind_root_pvc(unbound_root_pvc, grown, name),  # volumeName and annotations
            lambda: deps._bind_root_pvc(bound_root_pvc, grown, name),  # status
            lambda: deps._update(pvcs, {**leaf_pvc, "spec": {**leaf_pvc["spec"], "resources": {
                "requests": {"storage": "2Gi"}}}}, leaf_pvc),  # the leaf copy's request
            # the mirror's status (as when Released, or Bound) and capacity: the same patch helper
            lambda: deps._patch(root, resource_path("v1", pvs, name=name, sub="status"), mirror,
                                {"status": {"phase": "Released"}}),
            lambda: deps._patch(root, resource_path("v1", pvs, name=name), mirror,
                                {"spec": {"capacity": {"storage": "2Gi"}}}),
        ]
        for write in refused:
            with pytest.raises(ApiError) as e:
                write()
            assert e.value.status == 422 and "metadata.uid" in e.value.message, e.value.message
        for api, at, new in new_objects:
            now = api.get(at)
            assert now["metadata"]["uid"] == new["metadata"]["uid"]
            assert now["metadata"]["resourceVersion"] == new["metadata"]["resourceVersion"], f"{at} was written"


def test_pvc_flow_with_the_leafs_and_roots_own_volume_controllers(env: TreeEnv, tmp_path: Any) -> None:
    """The same flow against the lab's real PV binder, protection, provisioner and resizer in
    the leaf (and binder and protection in the root, which must not fight the mirror)."""
    root, leaf = env.root, env.leaf("l1")
    env.add_node("l1", "leaf-n1")
    env.start_controllers(leaf, "persistentvolume-binder,pvc-protection,pv-protection,persistentvolume-expander,"
                                "lab-local-provisioner", storage_root=tmp_path / "l1")
    env.start_controllers(root, "persistentvolume-binder,pvc-protection,pv-protection")
    with pvc_setup(env) as (pvc, pod):
        deps = env.start_deps("l1", "c1")
        renames = deps.ensure(pod, NS)
        # The leaf pod as the pod syncer makes it, bound to a leaf node by the leaf's scheduler.
        leaf_pod_body = leaf_pod(pod, renames)
        leaf_pod_body["spec"]["nodeName"] = "leaf-n1"
        leaf.create(path("pods"), leaf_pod_body)

        def root_pvc() -> Obj:
            got: Obj = root.get(path("persistentvolumeclaims", "data"))
            return got
        wait_until(lambda: root_pvc().get("status", {}).get("phase") == "Bound", 20, "the root PVC Bound")
        leaf_pvc = get(leaf, "persistentvolumeclaims", "data")
        assert leaf_pvc is not None and leaf_pvc["metadata"]["annotations"][SELECTED_NODE] == "leaf-n1"
        mirror = get(root, "persistentvolumes", root_pvc()["spec"]["volumeName"], ns=None)
        assert mirror is not None and mirror["spec"]["claimRef"]["uid"] == pvc["metadata"]["uid"]
        assert mirror["metadata"]["name"] == leaf_pvc["spec"]["volumeName"]
        assert mirror["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0][
            "values"] == ["kosmos-c1"]
        assert "pv.kubernetes.io/provisioned-by" not in mirror["metadata"].get("annotations", {})
        wait_until(lambda: (get(root, "persistentvolumes", mirror["metadata"]["name"], ns=None) or {})
                   .get("status", {}).get("phase") == "Bound", 10, "the mirror stays Bound under the root's binder")

        root.patch(path("persistentvolumeclaims", "data"), {"spec": {"resources": {"requests": {"storage": "3Gi"}}}})
        # The leaf's resizer finishes once a pod using the claim runs on its node.
        leaf.patch(path("pods", "p") + "/status", {"status": {"phase": "Running"}})
        wait_until(lambda: root_pvc()["status"].get("capacity") == {"storage": "3Gi"}, 20,
                   "the leaf's expansion reached the root PVC")
        wait_until(lambda: (get(root, "persistentvolumes", mirror["metadata"]["name"], ns=None) or {})
                   .get("spec", {}).get("capacity") == {"storage": "3Gi"}, 10, "and the root PV")

        root.request("DELETE", path("pods", "p"), {"gracePeriodSeconds": 0})
        leaf.request("DELETE", path("pods", "p"), {"gracePeriodSeconds": 0})
        root.request("DELETE", path("persistentvolumeclaims", "data"))
        wait_until(lambda: get(leaf, "persistentvolumeclaims", "data") is None, 20, "the leaf PVC gone")
        wait_until(lambda: get(leaf, "persistentvolumes", leaf_pvc["spec"]["volumeName"], ns=None) is None, 20,
                   "the leaf's reclaimer deleted its volume")
        wait_until(lambda: get(root, "persistentvolumes", mirror["metadata"]["name"], ns=None) is None, 20,
                   "the mirror deleted")
