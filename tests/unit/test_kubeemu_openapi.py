"""kubeemu.openapi: upstream definitions restored, CRD schemas published, unknown fields found."""

from __future__ import annotations

from typing import Any

import pytest

from kubeemu import openapi
from kubeemu.resources import Registry
from kubeemu.store import Store

pytestmark = pytest.mark.unit
CORE = "io.k8s.api.core.v1."


def test_builtin_definitions_are_upstream_swagger() -> None:
    defs = openapi.builtin_definitions()
    pod = defs[CORE + "Pod"]
    assert pod["type"] == "object"  # not ["object", "null"]
    assert pod["x-kubernetes-group-version-kind"] == [{"group": "", "kind": "Pod", "version": "v1"}]
    assert "enum" not in pod["properties"]["kind"] and pod["properties"]["kind"]["type"] == "string"
    assert pod["properties"]["spec"]["$ref"] == f"#/definitions/{CORE}PodSpec"
    containers = defs[CORE + "PodSpec"]["properties"]["containers"]
    assert containers["x-kubernetes-patch-merge-key"] == "name" and containers["type"] == "array"
    assert defs["io.k8s.apimachinery.pkg.util.intstr.IntOrString"]["format"] == "int-or-string"
    assert defs[CORE + "Container"]["required"] == ["name"]


def test_v3_documents_per_group_version() -> None:
    api = openapi.OpenAPI(Registry(), Store(Registry(), ("10.96.0.0/24",)))
    index = api.v3_index()["paths"]
    assert {"api/v1", "apis/apps/v1", "apis/networking.k8s.io/v1"} <= set(index)
    found = api.v3_document("apis/apps/v1")
    assert found is not None
    doc, digest = found
    assert index["apis/apps/v1"]["serverRelativeURL"] == f"/openapi/v3/apis/apps/v1?hash={digest}"
    schemas = doc["components"]["schemas"]
    assert "io.k8s.api.apps.v1.Deployment" in schemas and CORE + "PodSpec" in schemas  # refs followed
    assert CORE + "Service" not in schemas  # other group-versions' kinds stay out
    spec = schemas["io.k8s.api.apps.v1.Deployment"]["properties"]["spec"]
    assert spec["allOf"] == [{"$ref": "#/components/schemas/io.k8s.api.apps.v1.DeploymentSpec"}]
    op = doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]
    assert op["get"]["x-kubernetes-group-version-kind"] == {"group": "apps", "kind": "Deployment", "version": "v1"}
    assert any(p["name"] == "fieldValidation" for p in op["patch"]["parameters"])
    # ServiceCIDR is GA (networking.k8s.io/v1) only from v1.33: taken from there
    net = api.v3_document("apis/networking.k8s.io/v1")
    assert net is not None and "io.k8s.api.networking.v1.ServiceCIDR" in net[0]["components"]["schemas"]
    assert api.v3_document("apis/nope/v1") is None


def test_crd_definitions_as_apiextensions_publishes_them() -> None:
    crd: dict[str, Any] = {
        "spec": {
            "group": "fabric.kosmos.io",
            "names": {"kind": "Cluster", "plural": "clusters"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object"}}}},
                },
                {"name": "v0", "served": False},
            ],
        }
    }
    defs = openapi.crd_definitions(crd)
    assert list(defs) == [("fabric.kosmos.io", "v1", "Cluster")]
    kinds = defs[("fabric.kosmos.io", "v1", "Cluster")]
    one = kinds["io.kosmos.fabric.v1.Cluster"]
    assert one["properties"]["metadata"]["$ref"] == "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    assert one["x-kubernetes-group-version-kind"] == [{"group": "fabric.kosmos.io", "kind": "Cluster", "version": "v1"}]
    assert kinds["io.kosmos.fabric.v1.ClusterList"]["properties"]["items"]["items"]["$ref"].endswith(".v1.Cluster")


def test_prune_unknown_fields() -> None:
    pod_schema = openapi.builtin_definitions()[CORE + "Pod"]
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "x": 1,
        "metadata": {"labels": {"a.b/c": "d"}, "y": 2},
        "spec": {
            "containers": [{"name": "c", "resources": {"limits": {"cpu": "1"}}, "z": 3}],
            "overhead": {"cpu": "1"},
        },
    }
    assert openapi.prune_unknown(body, pod_schema) == ["x", "metadata.y", "spec.containers[0].z"]
    assert body == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"labels": {"a.b/c": "d"}},
        "spec": {"containers": [{"name": "c", "resources": {"limits": {"cpu": "1"}}}], "overhead": {"cpu": "1"}},
    }
    patch: dict[str, Any] = {
        "spec": {"$setElementOrder/containers": [{"name": "c"}], "containers": [{"name": "c", "$patch": "delete"}]}
    }
    assert openapi.prune_unknown(patch, pod_schema, patch=True) == []
    # free-form objects (RawExtension, no properties) take anything
    event = openapi.builtin_definitions()["io.k8s.apimachinery.pkg.apis.meta.v1.WatchEvent"]
    assert openapi.prune_unknown({"type": "ADDED", "object": {"any": {"thing": 1}}}, event) == []
