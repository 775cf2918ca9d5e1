"""CRDs and custom resources, fault hooks, and the other clients: kubernetes.aio,
kubernetes_asyncio and kubectl."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubeemu.runner import ServerThread
from tests.waiting import wait_until


def _crd(group: str, plural: str, kind: str, scope: str = "Namespaced") -> dict[str, Any]:
    schema = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "scope": scope,
                     "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "shortNames": ["wd"]},
                     "versions": [
                         {"name": "v1", "served": True, "storage": True, "schema": schema,
                          "subresources": {"status": {}}},
                         {"name": "v1beta1", "served": True, "storage": False, "schema": schema}]}}


def test_crd_registers_resource_and_discovery(api: Any, ns: str, raw: Any) -> None:
    group = f"g{uuid.uuid4().hex[:6]}.example.com"
    ext = client.ApiextensionsV1Api(api)
    crd = ext.create_custom_resource_definition(_crd(group, "widgets", "Widget"))
    assert {c.type: c.status for c in crd.status.conditions}["Established"] == "True"
    _, apis = raw.request("GET", "/apis")
    g = next(x for x in apis["groups"] if x["name"] == group)
    assert [v["version"] for v in g["versions"]] == ["v1", "v1beta1"]
    _, rl = raw.request("GET", f"/apis/{group}/v1")
    assert {r["name"] for r in rl["resources"]} == {"widgets", "widgets/status"}
    co = client.CustomObjectsApi(api)
    w = co.create_namespaced_custom_object(group, "v1", ns, "widgets", {
        "apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1},
        "status": {"ok": True}})
    assert "status" not in w and w["metadata"]["generation"] == 1
    w = co.patch_namespaced_custom_object(group, "v1", ns, "widgets", "w", {"spec": {"size": 2}})
    assert w["metadata"]["generation"] == 2
    w = co.patch_namespaced_custom_object_status(group, "v1", ns, "widgets", "w", {"status": {"ok": True}})
    assert w["status"] == {"ok": True} and w["metadata"]["generation"] == 2
    beta = co.get_namespaced_custom_object(group, "v1beta1", ns, "widgets", "w")
    assert beta["apiVersion"] == f"{group}/v1beta1"
    code, _ = raw.request("PATCH", f"/apis/{group}/v1/namespaces/{ns}/widgets/w", {"spec": {}},
                            "application/strategic-merge-patch+json")
    assert code == 415  # custom resources do not take strategic merge patch
    ext.delete_custom_resource_definition(f"widgets.{group}")
    code, _ = raw.request("GET", f"/apis/{group}/v1/namespaces/{ns}/widgets")
    assert code == 404


def test_crd_name_must_match(api: Any) -> None:
    body = _crd("ex.example.com", "things", "Thing")
    body["metadata"]["name"] = "wrong.example.com"
    with pytest.raises(client.ApiException) as ei:
        client.ApiextensionsV1Api(api).create_custom_resource_definition(body)
    assert ei.value.status == 422


def test_fault_injection_500_and_latency(raw: Any, v1: Any) -> None:
    raw.request("POST", "/_kubeemu/faults", {"error_count": 2, "error_path": "/configmaps"})
    try:
        with pytest.raises(client.ApiException) as ei:
            v1.list_namespaced_config_map("default")
        assert ei.value.status == 500 and json.loads(ei.value.body)["reason"] == "InternalError"
        v1.list_namespace()  # other paths unaffected
        with pytest.raises(client.ApiException):
            v1.list_namespaced_config_map("default")
        v1.list_namespaced_config_map("default")  # budget spent
        raw.request("POST", "/_kubeemu/faults", {"latency_ms": 200})
        t0 = time.monotonic()
        v1.list_namespace()
        assert time.monotonic() - t0 >= 0.19
    finally:
        raw.request("DELETE", "/_kubeemu/faults")


def test_fault_drop_and_expire_watches(emu: ServerThread, raw: Any, ns: str) -> None:
    import threading
    import urllib.request

    results: dict[str, Any] = {}

    def watch(key: str) -> None:
        try:
            with urllib.request.urlopen(f"{emu.url}/api/v1/namespaces/{ns}/pods?watch=1&resourceVersion=0",
                                        timeout=10) as r:
                results[key] = [json.loads(x) for x in r.read().splitlines() if x.strip()]
        except Exception as e:  # the dropped watch ends with a broken chunked stream
            results[key] = e

    t = threading.Thread(target=watch, args=("expire",))
    t.start()
    wait_until(lambda: raw.request("GET", "/_kubeemu/stats")[1]["watches"] >= 1, 5, "the expire watch registered")
    _, n = raw.request("POST", "/_kubeemu/watches/expire")
    t.join(5)
    assert n["watches"] >= 1
    assert results["expire"][-1]["type"] == "ERROR" and results["expire"][-1]["object"]["code"] == 410
    t = threading.Thread(target=watch, args=("drop",))
    t.start()
    wait_until(lambda: raw.request("GET", "/_kubeemu/stats")[1]["watches"] >= 1, 5, "the drop watch registered")
    raw.request("POST", "/_kubeemu/watches/drop")
    t.join(5)
    assert not t.is_alive() and (isinstance(results["drop"], Exception) or results["drop"] == [])


def test_official_aio_client(emu: ServerThread, ns: str) -> None:
    aio = pytest.importorskip("kubernetes.aio")

    async def run() -> None:
        cfg = aio.client.Configuration()
        cfg.host = emu.url
        async with aio.client.ApiClient(cfg) as api:
            v1 = aio.client.CoreV1Api(api)
            cm = await v1.create_namespaced_config_map(ns, {"metadata": {"name": "aio"}, "data": {"a": "1"}})
            got = await v1.read_namespaced_config_map("aio", ns)
            assert got.metadata.uid == cm.metadata.uid
            lst = await v1.list_namespaced_config_map(ns, label_selector="!nothing")
            assert "aio" in [c.metadata.name for c in lst.items]
            w = aio.watch.Watch()
            names = []
            async for e in w.stream(v1.list_namespaced_config_map, ns, timeout_seconds=1):
                names.append((e["type"], e["object"].metadata.name))
            assert ("ADDED", "aio") in names
            with pytest.raises(aio.client.ApiException) as ei:
                await v1.read_namespaced_config_map("nope", ns)
            assert ei.value.status == 404

    asyncio.run(run())


def test_kubernetes_asyncio_client(emu: ServerThread, ns: str) -> None:
    ka = pytest.importorskip("kubernetes_asyncio")

    async def run() -> None:
        cfg = ka.client.Configuration()
        cfg.host = emu.url
        async with ka.client.ApiClient(cfg) as api:
            v1 = ka.client.CoreV1Api(api)
            start = (await v1.list_namespaced_pod(ns)).metadata.resource_version
            await v1.create_namespaced_pod(ns, {"metadata": {"name": "ka"}, "spec": {"containers": [
                {"name": "c", "image": "x"}]}})
            await v1.patch_namespaced_pod_status("ka", ns, {"status": {"phase": "Running"}})
            seen = []
            w = ka.watch.Watch()
            async with w.stream(v1.list_namespaced_pod, ns, resource_version=start, timeout_seconds=1) as s:
                async for e in s:
                    seen.append((e["type"], e["object"].status.phase))
            assert seen == [("ADDED", "Pending"), ("MODIFIED", "Running")]
            cm = await v1.create_namespaced_config_map(ns, {"metadata": {"name": "kac"}})
            cm.data = {"x": "1"}
            await v1.replace_namespaced_config_map("kac", ns, cm)
            with pytest.raises(ka.client.ApiException) as ei:
                await v1.replace_namespaced_config_map("kac", ns, cm)
            assert ei.value.status == 409

    asyncio.run(run())




def test_kubectl_create_get_patch_apply_delete(kubectl: Any, ns: str, tmp_path: Path) -> None:
    manifest = f"""apiVersion: v1
kind: Pod
metadata: {{name: kp, namespace: {ns}, labels: {{app: k}}}}
spec:
  containers: [{{name: c, image: busybox, env: [{{name: A, value: "1"}}]}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: kcm, namespace: {ns}}}
data: {{a: "1"}}
"""
    f = tmp_path / "m.yaml"
    f.write_text(manifest)
    out = kubectl("create", "-f", str(f)).stdout
    assert "pod/kp created" in out and "configmap/kcm created" in out
    got = json.loads(kubectl("get", "pod", "kp", "-n", ns, "-o", "json").stdout)
    assert got["metadata"]["labels"] == {"app": "k"}
    table = kubectl("get", "pods", "-n", ns, "-o", "wide").stdout
    assert table.split()[:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"] and "kp" in table
    kubectl("patch", "configmap", "kcm", "-n", ns, "-p", '{"data":{"b":"2"}}')
    kubectl("patch", "configmap", "kcm", "-n", ns, "--type=json", "-p", '[{"op":"remove","path":"/data/a"}]')
    assert json.loads(kubectl("get", "cm", "kcm", "-n", ns, "-o", "json").stdout)["data"] == {"b": "2"}
    # A pod's image may change in place; its env may not (upstream's pod update rule).
    f.write_text(manifest.replace("image: busybox", "image: busybox:1.36").replace('a: "1"', 'a: "9"'))
    kubectl("apply", "-f", str(f))
    assert json.loads(kubectl("get", "cm", "kcm", "-n", ns, "-o", "json").stdout)["data"]["a"] == "9"
    got = json.loads(kubectl("get", "pod", "kp", "-n", ns, "-o", "json").stdout)
    assert got["spec"]["containers"][0]["image"] == "busybox:1.36"
    f.write_text(manifest.replace('value: "1"', 'value: "2"'))
    p = kubectl("apply", "-f", str(f), ok=False)
    assert p.returncode != 0
    assert 'The Pod "kp" is invalid: spec: Forbidden: pod updates may not change fields' in p.stderr
    f.write_text(manifest)
    kubectl("label", "pod", "kp", "-n", ns, "extra=yes")
    assert "kp" in kubectl("get", "pods", "-n", ns, "-l", "extra=yes", "-o", "name").stdout
    out = kubectl("delete", "-f", str(f)).stdout
    assert "deleted" in out
    p = kubectl("get", "pod", "kp", "-n", ns, ok=False)
    assert p.returncode != 0 and "NotFound" in p.stderr


def test_kubectl_apply_crd_and_custom_resource(kubectl: Any, ns: str, tmp_path: Path) -> None:
    group = f"k{uuid.uuid4().hex[:6]}.example.com"
    crd = tmp_path / "crd.json"
    crd.write_text(json.dumps(_crd(group, "gadgets", "Gadget")))
    kubectl("apply", "-f", str(crd))
    cr = tmp_path / "cr.yaml"
    cr.write_text(f"apiVersion: {group}/v1\nkind: Gadget\nmetadata: {{name: g1, namespace: {ns}}}\nspec: {{n: 1}}\n")
    kubectl("apply", "-f", str(cr))
    assert "g1" in kubectl("get", "gadgets", "-n", ns).stdout
    kubectl("delete", "crd", f"gadgets.{group}")


def test_kubectl_server_side_apply_and_get_nodes(kubectl: Any, ns: str, tmp_path: Path) -> None:
    f = tmp_path / "cm.yaml"
    f.write_text(f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: ssa, namespace: {ns}}}\ndata: {{k: v}}\n")
    kubectl("apply", "--server-side", "-f", str(f))
    assert json.loads(kubectl("get", "cm", "ssa", "-n", ns, "-o", "json").stdout)["data"] == {"k": "v"}
    name = f"kn-{uuid.uuid4().hex[:6]}"
    kubectl("create", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                                                     "status": {"addresses": [{"type": "InternalIP",
                                                                               "address": "198.18.9.9"}],
                                                                "conditions": [{"type": "Ready", "status": "True"}]}}))
    wide = kubectl("get", "node", name, "-o", "wide").stdout
    assert "198.18.9.9" in wide and "Ready" in wide
    kubectl("delete", "node", name)


def _schema_crd(group: str) -> dict[str, Any]:
    """A CRD with a structural schema: what a real API server validates and prunes by."""
    spec_schema = {
        "type": "object",
        "required": ["mode"],
        "properties": {
            "mode": {"type": "string", "enum": ["a", "b"]},
            "cidr": {"type": "string", "maxLength": 18, "pattern": "^[0-9./]+$"},
            "size": {"type": "integer"},
            "items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
                "name": {"type": "string"}}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    status_schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    body = _crd(group, "gizmos", "Gizmo")
    body["spec"]["names"]["shortNames"] = ["gz"]
    for v in body["spec"]["versions"]:
        v["schema"] = {"openAPIV3Schema": {"type": "object", "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
            "spec": spec_schema, "status": status_schema}}}
    return body


def test_custom_resources_are_validated_and_pruned_by_their_schema(api: Any, ns: str, raw: Any) -> None:
    """Issue 14: like kube-apiserver, 422 Invalid with a cause per field on create, update and
    status update, and fields the schema does not declare dropped (unless preserved)."""
    group = f"s{uuid.uuid4().hex[:6]}.example.com"
    ext = client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(_schema_crd(group))
    co = client.CustomObjectsApi(api)

    def body(**spec: Any) -> dict[str, Any]:
        return {"apiVersion": f"{group}/v1", "kind": "Gizmo", "metadata": {"name": "g"}, "spec": spec}

    with pytest.raises(client.ApiException) as ei:
        co.create_namespaced_custom_object(group, "v1", ns, "gizmos", body(
            mode="mesh", cidr="10.0.0.0/8x", size="2", items=[{}, {}, {}]))
    assert ei.value.status == 422
    status = json.loads(ei.value.body)
    assert status["kind"] == "Status" and status["reason"] == "Invalid" and status["code"] == 422
    assert status["details"]["name"] == "g" and status["details"]["group"] == group
    assert status["details"]["kind"] == "Gizmo"
    causes = {c["field"]: (c["reason"], c["message"]) for c in status["details"]["causes"]}
    assert causes == {
        "spec.mode": ("FieldValueNotSupported", 'Unsupported value: "mesh": supported values: "a", "b"'),
        "spec.cidr": ("FieldValueInvalid", 'Invalid value: "10.0.0.0/8x": spec.cidr in body should match '
                                           "'^[0-9./]+$'"),
        "spec.size": ("FieldValueTypeInvalid",
                      'Invalid value: "2": spec.size in body must be of type integer: "string"'),
        "spec.items": ("FieldValueTooMany", "Too many: 3: must have at most 2 items"),
    }
    assert status["message"].startswith(f'Gizmo.{group} "g" is invalid: [')
    with pytest.raises(client.ApiException) as ei:
        co.create_namespaced_custom_object(group, "v1", ns, "gizmos", body())
    assert [(c["field"], c["message"]) for c in json.loads(ei.value.body)["details"]["causes"]] == [
        ("spec.mode", "Required value")]

    # Unknown fields are pruned, except under x-kubernetes-preserve-unknown-fields.
    g = co.create_namespaced_custom_object(group, "v1", ns, "gizmos", body(
        mode="a", extra=1, items=[{"name": "i", "junk": True}], free={"any": {"thing": 1}}))
    assert g["spec"] == {"mode": "a", "items": [{"name": "i"}], "free": {"any": {"thing": 1}}}
    assert co.get_namespaced_custom_object(group, "v1", ns, "gizmos", "g")["spec"] == g["spec"]

    # Updates are checked too: a patch to an invalid value, and the status subresource.
    with pytest.raises(client.ApiException) as ei:
        co.patch_namespaced_custom_object(group, "v1", ns, "gizmos", "g", {"spec": {"mode": "c"}})
    assert ei.value.status == 422
    assert [c["field"] for c in json.loads(ei.value.body)["details"]["causes"]] == ["spec.mode"]
    with pytest.raises(client.ApiException) as ei:
        co.patch_namespaced_custom_object_status(group, "v1", ns, "gizmos", "g", {"status": {"ok": "yes"}})
    assert [c["field"] for c in json.loads(ei.value.body)["details"]["causes"]] == ["status.ok"]
    g = co.patch_namespaced_custom_object_status(group, "v1", ns, "gizmos", "g", {"status": {"ok": True, "x": 1}})
    assert g["status"] == {"ok": True}
    assert g["spec"]["mode"] == "a"
    ext.delete_custom_resource_definition(f"gizmos.{group}")


def test_kubectl_reports_the_invalid_field_of_a_custom_resource(kubectl: Any, ns: str, tmp_path: Path) -> None:
    group = f"v{uuid.uuid4().hex[:6]}.example.com"
    crd = tmp_path / "crd.json"
    crd.write_text(json.dumps(_schema_crd(group)))
    kubectl("apply", "-f", str(crd))
    cr = tmp_path / "cr.yaml"
    cr.write_text(f"apiVersion: {group}/v1\nkind: Gizmo\nmetadata: {{name: g1, namespace: {ns}}}\nspec: {{mode: z}}\n")
    p = kubectl("apply", "-f", str(cr), ok=False)
    assert p.returncode != 0
    assert 'is invalid: spec.mode: Unsupported value: "z": supported values: "a", "b"' in p.stderr, p.stderr
    kubectl("delete", "crd", f"gizmos.{group}")


def test_field_validation_strict_refuses_unknown_fields_and_warn_says_what_was_pruned(
        api: Any, ns: str, emu: ServerThread) -> None:
    group = f"f{uuid.uuid4().hex[:6]}.example.com"
    client.ApiextensionsV1Api(api).create_custom_resource_definition(_schema_crd(group))
    path = f"{emu.url}/apis/{group}/v1/namespaces/{ns}/gizmos"

    def post(query: str, name: str) -> tuple[int, dict[str, Any], list[str]]:
        body = {"apiVersion": f"{group}/v1", "kind": "Gizmo", "metadata": {"name": name},
                "spec": {"mode": "a", "extra": 1, "items": [{"name": "i", "junk": 2}]}}
        req = urllib.request.Request(path + query, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read()), r.headers.get_all("Warning") or []
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers.get_all("Warning") or []

    code, status, _ = post("?fieldValidation=Strict", "strict")
    assert code == 400 and status["reason"] == "BadRequest"
    assert status["message"] == ('Gizmo in version "v1" cannot be handled as a Gizmo: strict decoding error: '
                                 'unknown field "spec.extra", unknown field "spec.items[0].junk"')
    code, obj, warnings = post("", "warn")
    assert code == 201 and obj["spec"] == {"mode": "a", "items": [{"name": "i"}]}
    assert warnings == ['299 - "unknown field \\"spec.extra\\""', '299 - "unknown field \\"spec.items[0].junk\\""']
    code, _, warnings = post("?fieldValidation=Ignore", "ignore")
    assert code == 201 and warnings == []
