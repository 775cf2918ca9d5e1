"""Object semantics through the official sync client: metadata, writes, patches, deletion."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from kubernetes import client

from tests.waiting import wait_until

ApiException = client.ApiException


def test_discovery_documents(raw: Any) -> None:
    for path in ("/version", "/api", "/api/", "/apis", "/apis/", "/api/v1", "/api/v1/", "/apis/apps/v1/"):
        code, _ = raw.request("GET", path)
        assert code == 200, path
    _, apis = raw.request("GET", "/apis")
    names = {g["name"] for g in apis["groups"]}
    assert {"apps", "coordination.k8s.io", "discovery.k8s.io", "apiextensions.k8s.io"} <= names
    _, core = raw.request("GET", "/api/v1")
    res = {r["name"]: r for r in core["resources"]}
    for r in ("pods", "pods/status", "pods/binding", "nodes/status", "services", "endpoints", "configmaps",
              "secrets", "serviceaccounts", "persistentvolumeclaims/status", "persistentvolumes", "events",
              "namespaces"):
        assert r in res, r
    assert res["nodes"]["namespaced"] is False and res["pods"]["namespaced"] is True
    _, ver = raw.request("GET", "/version")
    assert ver["major"] == "1" and ver["gitVersion"].startswith("v1.")


def test_discovery_through_client(api: Any) -> None:
    groups = client.ApisApi(api).get_api_versions()
    assert "apps" in {g.name for g in groups.groups}
    rl = client.CoreV1Api(api).get_api_resources()
    assert "pods" in {r.name for r in rl.resources}
    assert client.VersionApi(api).get_code().major == "1"


def test_create_sets_metadata(v1: Any, ns: str, mkpod: Any) -> None:
    p = v1.create_namespaced_pod(ns, mkpod("a"))
    assert p.metadata.uid and p.metadata.creation_timestamp is not None
    assert int(p.metadata.resource_version) > 0
    assert p.status.phase == "Pending"
    got = v1.read_namespaced_pod("a", ns)
    assert got.metadata.resource_version == p.metadata.resource_version


def test_generate_name(v1: Any, ns: str) -> None:
    cm = v1.create_namespaced_config_map(ns, {"metadata": {"generateName": "cfg-"}, "data": {"a": "1"}})
    assert cm.metadata.name.startswith("cfg-") and len(cm.metadata.name) == len("cfg-") + 5


def test_resource_version_single_counter_and_no_bump_on_noop(v1: Any, ns: str) -> None:
    a = v1.create_namespaced_config_map(ns, {"metadata": {"name": "a"}, "data": {"k": "v"}})
    b = v1.create_namespaced_config_map(ns, {"metadata": {"name": "b"}, "data": {"k": "v"}})
    assert int(b.metadata.resource_version) > int(a.metadata.resource_version)
    same = v1.patch_namespaced_config_map("a", ns, {"data": {"k": "v"}})
    assert same.metadata.resource_version == a.metadata.resource_version
    changed = v1.patch_namespaced_config_map("a", ns, {"data": {"k": "w"}})
    assert int(changed.metadata.resource_version) > int(b.metadata.resource_version)


def test_already_exists_409(v1: Any, ns: str) -> None:
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "dup"}})
    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_config_map(ns, {"metadata": {"name": "dup"}})
    assert ei.value.status == 409
    body = _body(ei.value)
    assert body["reason"] == "AlreadyExists" and body["message"] == 'configmaps "dup" already exists'
    assert body["details"] == {"name": "dup", "kind": "configmaps"}


def _body(e: Any) -> dict[str, Any]:
    import json

    data: dict[str, Any] = json.loads(e.body)
    return data


def test_not_found_404(v1: Any, ns: str) -> None:
    with pytest.raises(ApiException) as ei:
        v1.read_namespaced_secret("missing", ns)
    body = _body(ei.value)
    assert ei.value.status == 404 and body["kind"] == "Status" and body["status"] == "Failure"
    assert body["reason"] == "NotFound" and body["message"] == 'secrets "missing" not found'


def test_missing_namespace_404(v1: Any) -> None:
    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_config_map("no-such-ns", {"metadata": {"name": "x"}})
    assert ei.value.status == 404 and _body(ei.value)["message"] == 'namespaces "no-such-ns" not found'


def test_invalid_422(v1: Any, ns: str, raw: Any) -> None:
    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_config_map(ns, {"metadata": {"name": "Bad_Name"}})
    body = _body(ei.value)
    assert ei.value.status == 422 and body["reason"] == "Invalid"
    assert body["details"]["causes"][0]["field"] == "metadata.name"
    code, err = raw.request("POST", f"/api/v1/namespaces/{ns}/pods", {"metadata": {"name": "x"}, "spec": {}})
    assert code == 422 and "spec.containers" in err["message"]  # the typed client refuses to send this


def test_put_optimistic_concurrency(v1: Any, ns: str) -> None:
    cm = v1.create_namespaced_config_map(ns, {"metadata": {"name": "occ"}, "data": {"n": "0"}})
    cm.data = {"n": "1"}
    updated = v1.replace_namespaced_config_map("occ", ns, cm)
    assert updated.data == {"n": "1"}
    cm.data = {"n": "2"}  # still carries the old resourceVersion
    with pytest.raises(ApiException) as ei:
        v1.replace_namespaced_config_map("occ", ns, cm)
    body = _body(ei.value)
    assert ei.value.status == 409 and body["reason"] == "Conflict"
    assert "the object has been modified" in body["message"]


def test_put_name_mismatch_400(raw: Any, ns: str) -> None:
    raw.request("POST", f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "m1"}})
    code, body = raw.request("PUT", f"/api/v1/namespaces/{ns}/configmaps/m1", {"metadata": {"name": "m2"}})
    assert code == 400 and body["reason"] == "BadRequest"


def test_generation_bumps_on_spec_not_status(api: Any, ns: str) -> None:
    apps = client.AppsV1Api(api)
    d = apps.create_namespaced_deployment(ns, {
        "metadata": {"name": "d"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}},
                              "spec": {"containers": [{"name": "c", "image": "x"}]}}},
        "status": {"replicas": 99},
    })
    assert d.metadata.generation == 1 and (d.status is None or d.status.replicas is None)
    d2 = apps.patch_namespaced_deployment("d", ns, {"spec": {"replicas": 3}})
    assert d2.metadata.generation == 2
    d3 = apps.patch_namespaced_deployment_status("d", ns, {"status": {"replicas": 3, "observedGeneration": 2}})
    assert d3.metadata.generation == 2 and d3.status.replicas == 3
    d4 = apps.patch_namespaced_deployment("d", ns, {"metadata": {"labels": {"x": "y"}}})
    assert d4.metadata.generation == 2


def test_status_subresource_split(v1: Any, ns: str, mkpod: Any) -> None:
    v1.create_namespaced_pod(ns, mkpod("s"))
    p = v1.patch_namespaced_pod("s", ns, {"status": {"phase": "Running"}, "metadata": {"labels": {"l": "1"}}})
    assert p.status.phase == "Pending" and p.metadata.labels == {"l": "1"}  # main resource ignores status
    p = v1.patch_namespaced_pod_status("s", ns, {"status": {"phase": "Running", "podIP": "10.1.2.3"},
                                                 "spec": {"nodeName": "n1"}})
    assert p.status.phase == "Running" and p.spec.node_name is None  # status ignores spec
    p.status.phase = "Succeeded"
    p = v1.replace_namespaced_pod_status("s", ns, p)
    assert v1.read_namespaced_pod_status("s", ns).status.phase == "Succeeded"


def test_merge_patch(v1: Any, ns: str, raw: Any) -> None:
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "mp"}, "data": {"a": "1", "b": "2"}})
    code, out = raw.request("PATCH", f"/api/v1/namespaces/{ns}/configmaps/mp", {"data": {"a": None, "c": "3"}},
                            "application/merge-patch+json")
    assert code == 200 and out["data"] == {"b": "2", "c": "3"}
    # (a Deployment's template: a pod's container list may not change after creation)
    code, _ = raw.request("POST", f"/apis/apps/v1/namespaces/{ns}/deployments", _deployment("mp", [
        {"name": "a", "image": "x"}, {"name": "b", "image": "y"}]))
    assert code == 201
    code, out = raw.request("PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/mp",
                            {"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "z"}]}}}},
                            "application/merge-patch+json")
    # lists are replaced whole
    assert code == 200 and [c["name"] for c in out["spec"]["template"]["spec"]["containers"]] == ["a"]


def _deployment(name: str, containers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
        "metadata": {"labels": {"app": name}}, "spec": {"containers": containers}}}}



def test_strategic_merge_patch_merge_keys(v1: Any, ns: str) -> None:
    apps = client.AppsV1Api(v1.api_client)
    body = _deployment("smp", [
        {"name": "a", "image": "x", "env": [{"name": "E1", "value": "1"}, {"name": "E2", "value": "2"}],
         "ports": [{"containerPort": 80}]},
        {"name": "b", "image": "y"}])
    apps.create_namespaced_deployment(ns, body)
    p = apps.patch_namespaced_deployment("smp", ns, {"spec": {"template": {"spec": {"containers": [
        {"name": "a", "env": [{"name": "E2", "value": "two"}, {"name": "E3", "value": "3"},
                              {"name": "E1", "$patch": "delete"}],
         "ports": [{"containerPort": 443}]}]}}}})
    by = {c.name: c for c in p.spec.template.spec.containers}
    assert set(by) == {"a", "b"} and by["a"].image == "x"
    assert [(e.name, e.value) for e in by["a"].env] == [("E2", "two"), ("E3", "3")]
    assert sorted(x.container_port for x in by["a"].ports) == [80, 443]
    p = apps.patch_namespaced_deployment("smp", ns, {"spec": {"template": {"spec": {"containers": [
        {"name": "b", "$patch": "delete"}]}}}})
    assert [c.name for c in p.spec.template.spec.containers] == ["a"]


def test_strategic_merge_conditions_by_type(v1: Any, ns: str, mkpod: Any) -> None:
    v1.create_namespaced_pod(ns, mkpod("cond"))
    v1.patch_namespaced_pod_status("cond", ns, {"status": {"conditions": [
        {"type": "Ready", "status": "False"}, {"type": "Initialized", "status": "True"}]}})
    p = v1.patch_namespaced_pod_status("cond", ns, {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    conds = {c.type: c.status for c in p.status.conditions}
    assert conds == {"Ready": "True", "Initialized": "True"}


def test_json_patch(v1: Any, ns: str, raw: Any) -> None:
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "jp"}, "data": {"a": "1"}})
    ops = [{"op": "test", "path": "/data/a", "value": "1"}, {"op": "add", "path": "/data/b", "value": "2"},
           {"op": "remove", "path": "/data/a"}]
    code, obj = raw.request("PATCH", f"/api/v1/namespaces/{ns}/configmaps/jp", ops, "application/json-patch+json")
    assert code == 200 and obj["data"] == {"b": "2"}
    code, err = raw.request("PATCH", f"/api/v1/namespaces/{ns}/configmaps/jp",
                            [{"op": "test", "path": "/data/b", "value": "nope"}], "application/json-patch+json")
    assert code == 422 and err["kind"] == "Status"


def test_patch_with_stale_resource_version_conflicts(v1: Any, ns: str) -> None:
    cm = v1.create_namespaced_config_map(ns, {"metadata": {"name": "prv"}, "data": {"a": "1"}})
    v1.patch_namespaced_config_map("prv", ns, {"data": {"a": "2"}})
    with pytest.raises(ApiException) as ei:
        v1.patch_namespaced_config_map("prv", ns, {"metadata": {"resourceVersion": cm.metadata.resource_version},
                                                   "data": {"a": "3"}})
    assert ei.value.status == 409


def test_secret_string_data(v1: Any, ns: str) -> None:
    s = v1.create_namespaced_secret(ns, {"metadata": {"name": "s"}, "stringData": {"user": "admin"},
                                         "data": {"x": base64.b64encode(b"y").decode()}})
    assert base64.b64decode(s.data["user"]) == b"admin" and s.data["x"] and s.type == "Opaque"
    assert s.string_data is None


def test_service_cluster_ip_allocation(v1: Any, ns: str) -> None:
    spec = {"ports": [{"port": 80}]}
    a = v1.create_namespaced_service(ns, {"metadata": {"name": "a"}, "spec": spec})
    b = v1.create_namespaced_service(ns, {"metadata": {"name": "b"}, "spec": spec})
    assert a.spec.cluster_ip.startswith("10.96.0.") and a.spec.cluster_ip != b.spec.cluster_ip
    assert a.spec.cluster_ips == [a.spec.cluster_ip]
    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_service(ns, {"metadata": {"name": "c"}, "spec": {**spec, "clusterIP": a.spec.cluster_ip}})
    assert ei.value.status == 422 and "already allocated" in _body(ei.value)["message"]
    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_service(ns, {"metadata": {"name": "d"}, "spec": {**spec, "clusterIP": "192.168.0.1"}})
    assert ei.value.status == 422
    head = v1.create_namespaced_service(ns, {"metadata": {"name": "h"}, "spec": {**spec, "clusterIP": "None"}})
    assert head.spec.cluster_ip == "None"
    ip = a.spec.cluster_ip
    v1.delete_namespaced_service("a", ns)
    again = v1.create_namespaced_service(ns, {"metadata": {"name": "e"}, "spec": {**spec, "clusterIP": ip}})
    assert again.spec.cluster_ip == ip  # released on delete


def test_finalizers_and_deletion_timestamp(v1: Any, ns: str) -> None:
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "f", "finalizers": ["example.com/hold"]}})
    v1.delete_namespaced_config_map("f", ns)
    held = v1.read_namespaced_config_map("f", ns)
    assert held.metadata.deletion_timestamp is not None
    with pytest.raises(ApiException) as ei:
        v1.patch_namespaced_config_map("f", ns, {"metadata": {"finalizers": ["example.com/hold", "new/one"]}})
    assert ei.value.status == 422
    v1.patch_namespaced_config_map("f", ns, {"metadata": {"$deleteFromPrimitiveList/finalizers":
                                                          ["example.com/hold"]}})
    with pytest.raises(ApiException) as ei:
        v1.read_namespaced_config_map("f", ns)
    assert ei.value.status == 404


def test_delete_preconditions(v1: Any, ns: str) -> None:
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "pre"}})
    with pytest.raises(ApiException) as ei:
        v1.delete_namespaced_config_map("pre", ns, body=client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid="not-the-uid")))
    assert ei.value.status == 409


def test_a_uid_in_a_put_body_is_a_precondition_and_a_patch_may_not_change_the_uid(raw: Any, ns: str,
                                                                                    mkpod: Any) -> None:
    """Upstream: a PUT body's non-empty metadata.uid is a storage precondition (main resource and
    subresources; checked before the object's existence, so a missing object fails it with an
    empty uid): 409. A PATCH carries none; a patched uid is refused as immutable: 422."""
    cm_path, pod_path = f"/api/v1/namespaces/{ns}/configmaps/pre", f"/api/v1/namespaces/{ns}/pods/pre"
    code, cm = raw.request("POST", f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "pre"}})
    assert code == 201
    uid = cm["metadata"]["uid"]
    code, pod = raw.request("POST", f"/api/v1/namespaces/{ns}/pods", mkpod("pre"))
    assert code == 201

    code, err = raw.request("PUT", cm_path, {"metadata": {"name": "pre", "uid": "not-the-uid"}, "data": {"a": "1"}})
    assert (code, err["reason"]) == (409, "Conflict")
    assert err["message"] == (f'Operation cannot be fulfilled on configmaps "pre": Precondition failed: '
                              f'UID in precondition: not-the-uid, UID in object meta: {uid}')
    status = {"metadata": {"name": "pre", "uid": "not-the-uid"}, "status": {"phase": "Running"}}
    code, err = raw.request("PUT", pod_path + "/status", status)
    assert (code, err["reason"]) == (409, "Conflict") and "UID in precondition: not-the-uid" in err["message"]
    code, err = raw.request("PUT", f"/api/v1/namespaces/{ns}/configmaps/absent",
                            {"metadata": {"name": "absent", "uid": uid}})
    assert code == 409 and err["message"].endswith(f"UID in precondition: {uid}, UID in object meta: ")
    code, err = raw.request("PUT", f"/api/v1/namespaces/{ns}/configmaps/absent", {"metadata": {"name": "absent"}})
    assert code == 404

    for path, body in ((cm_path, {"metadata": {"uid": "not-the-uid"}, "data": {"a": "1"}}),
                       (pod_path + "/status", {"metadata": {"uid": "not-the-uid"}, "status": {"phase": "Running"}})):
        code, err = raw.request("PATCH", path, body, "application/merge-patch+json")
        assert (code, err["reason"]) == (422, "Invalid"), path
        assert 'metadata.uid: Invalid value: "not-the-uid": field is immutable' in err["message"], path
    code, now = raw.request("GET", cm_path)
    assert now["metadata"]["resourceVersion"] == cm["metadata"]["resourceVersion"]  # nothing was written

    code, got = raw.request("PUT", cm_path, {"metadata": {"name": "pre", "uid": uid}, "data": {"a": "2"}})
    assert code == 200 and got["data"] == {"a": "2"}
    code, got = raw.request("PATCH", pod_path + "/status", {"metadata": {"uid": pod["metadata"]["uid"]},
                                                            "status": {"phase": "Running"}},
                            "application/merge-patch+json")
    assert code == 200 and got["status"]["phase"] == "Running"


def test_a_uid_in_a_scale_body_is_a_precondition_on_its_parent(raw: Any, ns: str) -> None:
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}}
    code, made = raw.request("POST", f"/apis/apps/v1/namespaces/{ns}/deployments", dep)
    assert code == 201
    scale = f"/apis/apps/v1/namespaces/{ns}/deployments/web/scale"
    code, err = raw.request("PUT", scale, {"metadata": {"name": "web", "uid": "not-the-uid"}, "spec": {"replicas": 3}})
    assert (code, err["message"]) == (409, f'Operation cannot be fulfilled on deployments/scale.apps "web": '
                                           f'Precondition failed: UID in precondition: not-the-uid, '
                                           f'UID in object meta: {made["metadata"]["uid"]}')
    code, err = raw.request("PATCH", scale, {"metadata": {"uid": "not-the-uid"}, "spec": {"replicas": 3}},
                            "application/merge-patch+json")
    assert code == 409
    code, got = raw.request("PUT", scale, {"metadata": {"name": "web", "uid": made["metadata"]["uid"]},
                                           "spec": {"replicas": 3}})
    assert code == 200 and got["spec"]["replicas"] == 3


def test_namespace_deletion_cascade(v1: Any) -> None:
    v1.create_namespace({"metadata": {"name": "doomed"}})
    v1.create_namespaced_config_map("doomed", {"metadata": {"name": "c1"}})
    v1.create_namespaced_config_map("doomed", {"metadata": {"name": "c2", "finalizers": ["x/y"]}})
    v1.delete_namespace("doomed")
    nsobj = v1.read_namespace("doomed")
    assert nsobj.status.phase == "Terminating" and nsobj.metadata.deletion_timestamp is not None
    with pytest.raises(ApiException) as ei:
        v1.create_namespaced_config_map("doomed", {"metadata": {"name": "late"}})
    assert ei.value.status == 403
    wait_until(
        lambda: [c.metadata.name for c in v1.list_namespaced_config_map("doomed").items] == ["c2"],
        5,
        "c1 deleted with its namespace, c2 held by its finalizer",
    )
    assert v1.read_namespace("doomed").status.phase == "Terminating"  # held by c2's finalizer
    v1.patch_namespaced_config_map("c2", "doomed", {"metadata": {"finalizers": None}})

    def gone() -> bool:
        try:
            v1.read_namespace("doomed")
        except ApiException as e:
            return e.status == 404
        return False

    wait_until(gone, 5, "namespace doomed gone")


def test_deletecollection_with_selector(v1: Any, ns: str) -> None:
    for i, tier in enumerate(["a", "a", "b"]):
        v1.create_namespaced_config_map(ns, {"metadata": {"name": f"dc{i}", "labels": {"tier": tier}}})
    v1.delete_collection_namespaced_config_map(ns, label_selector="tier=a")
    left = sorted(c.metadata.name for c in v1.list_namespaced_config_map(ns).items if c.metadata.name != "kube-root")
    assert left == ["dc2"]


def test_owner_reference_gc_background(v1: Any, ns: str) -> None:
    owner = v1.create_namespaced_config_map(ns, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "dep1", "ownerReferences": [ref]}})
    v1.create_namespaced_secret(ns, {"metadata": {"name": "dep2", "ownerReferences": [ref]}})
    other = v1.create_namespaced_config_map(ns, {"metadata": {"name": "other"}})
    ref2 = {"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": other.metadata.uid}
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "shared", "ownerReferences": [ref, ref2]}})
    v1.delete_namespaced_config_map("owner", ns)
    wait_until(
        lambda: {c.metadata.name for c in v1.list_namespaced_config_map(ns).items} == {"other", "shared"},
        5,
        "dep1 garbage-collected, shared kept",
    )
    wait_until(
        lambda: not v1.list_namespaced_secret(ns, field_selector="metadata.name=dep2").items,
        5,
        "secret dep2 garbage-collected",
    )


def test_owner_reference_orphan(v1: Any, ns: str) -> None:
    owner = v1.create_namespaced_config_map(ns, {"metadata": {"name": "o"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": owner.metadata.uid}
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "kept", "ownerReferences": [ref]}})
    v1.delete_namespaced_config_map("o", ns, propagation_policy="Orphan")
    # The garbage collector orphans the dependent (drops the reference) and never deletes it: a
    # read that 404s fails at once instead of passing after a fixed sleep.
    wait_until(lambda: v1.read_namespaced_config_map("kept", ns).metadata.owner_references is None, 5,
               "the dependent orphaned (ownerReferences dropped)")
    assert v1.read_namespaced_config_map("kept", ns).metadata.uid


def test_label_selectors(v1: Any, ns: str, mkpod: Any) -> None:
    for name, labels in [("p1", {"app": "web", "tier": "fe"}), ("p2", {"app": "web", "tier": "be"}),
                         ("p3", {"app": "db"}), ("p4", {})]:
        v1.create_namespaced_pod(ns, mkpod(name, **labels))

    def sel(s: str) -> list[str]:
        return sorted(p.metadata.name for p in v1.list_namespaced_pod(ns, label_selector=s).items)

    assert sel("app=web") == ["p1", "p2"]
    assert sel("app==db") == ["p3"]
    assert sel("app!=web") == ["p3", "p4"]
    assert sel("tier in (fe,be)") == ["p1", "p2"]
    assert sel("app notin (web)") == ["p3", "p4"]
    assert sel("tier") == ["p1", "p2"]
    assert sel("!tier") == ["p3", "p4"]
    assert sel("app=web,tier=be") == ["p2"]


def test_field_selectors(v1: Any, ns: str, mkpod: Any) -> None:
    for name, node in [("f1", "n1"), ("f2", "n2"), ("f3", None)]:
        body = mkpod(name)
        if node:
            body["spec"]["nodeName"] = node
        v1.create_namespaced_pod(ns, body)
    v1.patch_namespaced_pod_status("f2", ns, {"status": {"phase": "Running"}})

    def sel(s: str) -> list[str]:
        return sorted(p.metadata.name for p in v1.list_namespaced_pod(ns, field_selector=s).items)

    assert sel("spec.nodeName=n1") == ["f1"]
    assert sel("spec.nodeName=") == ["f3"]
    assert sel("status.phase=Running") == ["f2"]
    assert sel("status.phase!=Running,metadata.name!=f3") == ["f1"]
    assert sel("metadata.namespace=" + ns) == ["f1", "f2", "f3"]
    everywhere = v1.list_pod_for_all_namespaces(field_selector=f"metadata.name=f1,metadata.namespace={ns}")
    assert [p.metadata.name for p in everywhere.items] == ["f1"]
    with pytest.raises(ApiException) as ei:
        v1.list_namespaced_pod(ns, field_selector="spec.bogus=1")
    assert ei.value.status == 400


def test_limit_continue_consistent(v1: Any, ns: str) -> None:
    for i in range(5):
        v1.create_namespaced_config_map(ns, {"metadata": {"name": f"c{i}"}})
    page = v1.list_namespaced_config_map(ns, limit=2)
    names = [c.metadata.name for c in page.items]
    assert names == ["c0", "c1"] and page.metadata._continue and page.metadata.remaining_item_count == 3
    v1.delete_namespaced_config_map("c3", ns)  # after the first page: the snapshot still has it
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "c9"}})
    rest: list[str] = []
    token = page.metadata._continue
    while token:
        p = v1.list_namespaced_config_map(ns, limit=2, _continue=token)
        assert p.metadata.resource_version == page.metadata.resource_version
        rest += [c.metadata.name for c in p.items]
        token = p.metadata._continue
    assert names + rest == ["c0", "c1", "c2", "c3", "c4"]  # c3 from the snapshot, c9 not in it
    assert sorted(c.metadata.name for c in v1.list_namespaced_config_map(ns).items) == ["c0", "c1", "c2", "c4", "c9"]


def test_continue_expired_410(v1: Any, ns: str, raw: Any) -> None:
    for i in range(3):
        v1.create_namespaced_config_map(ns, {"metadata": {"name": f"e{i}"}})
    page = v1.list_namespaced_config_map(ns, limit=1)
    v1.create_namespaced_config_map(ns, {"metadata": {"name": "bump"}})
    raw.request("POST", "/_kubeemu/compact")
    with pytest.raises(ApiException) as ei:
        v1.list_namespaced_config_map(ns, limit=1, _continue=page.metadata._continue)
    assert ei.value.status == 410 and _body(ei.value)["reason"] == "Expired"


def test_node_and_lease_and_endpointslice(api: Any, ns: str) -> None:
    v1 = client.CoreV1Api(api)
    name = f"node-{ns}"
    n = v1.create_node({"metadata": {"name": name}, "spec": {"podCIDR": "10.1.0.0/24"},
                        "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.5"}]}})
    assert n.status.addresses[0].address == "198.18.0.5"  # nodes keep status on create
    v1.patch_node_status(name, {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    assert v1.read_node(name).status.conditions[0].status == "True"
    coord = client.CoordinationV1Api(api)
    lease = coord.create_namespaced_lease(ns, {"metadata": {"name": name}, "spec": {"holderIdentity": name,
                                                                                    "leaseDurationSeconds": 40}})
    lease.spec.renew_time = "2025-01-01T00:00:00.000000Z"
    coord.replace_namespaced_lease(name, ns, lease)
    disc = client.DiscoveryV1Api(api)
    disc.create_namespaced_endpoint_slice(ns, {"metadata": {"name": "es", "labels": {
        "kubernetes.io/service-name": "svc"}}, "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.5"]}]})
    assert len(disc.list_namespaced_endpoint_slice(ns, label_selector="kubernetes.io/service-name=svc").items) == 1
    v1.delete_node(name)


def test_pod_binding(v1: Any, ns: str, mkpod: Any, raw: Any) -> None:
    v1.create_namespaced_pod(ns, mkpod("b"))
    code, _ = raw.request("POST", f"/api/v1/namespaces/{ns}/pods/b/binding",
                          {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "b"},
                           "target": {"apiVersion": "v1", "kind": "Node", "name": "n7"}})
    assert code == 201
    assert v1.read_namespaced_pod("b", ns).spec.node_name == "n7"
    code, body = raw.request("POST", f"/api/v1/namespaces/{ns}/pods/b/binding",
                             {"target": {"kind": "Node", "name": "n8"}})
    assert code == 409 and body["reason"] == "Conflict"


def test_pv_pvc_serviceaccount_events(v1: Any, ns: str) -> None:
    pv = v1.create_persistent_volume({"metadata": {"name": f"pv-{ns}"}, "spec": {
        "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/tmp"}}})
    assert pv.status.phase == "Pending"
    v1.patch_persistent_volume_status(pv.metadata.name, {"status": {"phase": "Available"}})
    pvc = v1.create_namespaced_persistent_volume_claim(ns, {"metadata": {"name": "c"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    assert pvc.status.phase == "Pending"
    assert v1.read_namespaced_service_account("default", ns).metadata.name == "default"
    v1.create_namespaced_event(ns, {"metadata": {"name": "ev1"}, "involvedObject": {"kind": "Pod", "name": "p"},
                                    "reason": "Started", "type": "Normal"})
    assert len(v1.list_namespaced_event(ns, field_selector="involvedObject.name=p,reason=Started").items) == 1
    v1.delete_persistent_volume(pv.metadata.name)


def test_daemonset_stored(api: Any, ns: str) -> None:
    apps = client.AppsV1Api(api)
    ds = apps.create_namespaced_daemon_set(ns, {"metadata": {"name": "ds"}, "spec": {
        "selector": {"matchLabels": {"a": "b"}},
        "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}})
    assert ds.metadata.generation == 1
    apps.patch_namespaced_daemon_set_status("ds", ns, {"status": {"numberReady": 2, "currentNumberScheduled": 2,
                                                                  "desiredNumberScheduled": 2,
                                                                  "numberMisscheduled": 0}})
    assert apps.read_namespaced_daemon_set("ds", ns).status.number_ready == 2


def test_dry_run_does_not_store(v1: Any, ns: str) -> None:
    out = v1.create_namespaced_config_map(ns, {"metadata": {"name": "dry"}}, dry_run="All")
    assert out.metadata.uid
    with pytest.raises(ApiException):
        v1.read_namespaced_config_map("dry", ns)
