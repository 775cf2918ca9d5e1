"""``kubectl explain`` against kubeemu: OpenAPI v3 documents for built-in kinds and CRDs.

kubectl 1.32 reads ``/openapi/v3`` (the index), then the group-version's document, finds the
kind through the ``x-kubernetes-group-version-kind`` of the resource's paths and renders the
schema's descriptions and field types. Each test uses its own kubectl cache directory so that
nothing cached by an earlier test (or an earlier CRD version) answers for the server.
"""

from __future__ import annotations

import json
import uuid
from typing import Any


def test_explain_pod_containers(kubectl: Any) -> None:
    out = kubectl("explain", "pod.spec.containers").stdout
    assert out.startswith("KIND:       Pod\nVERSION:    v1\n\nFIELD: containers <[]Container>\n")
    assert "List of containers belonging to the pod." in out
    assert "name\t<string> -required-\n" in out
    assert "livenessProbe\t<Probe>\n" in out
    assert "resources\t<ResourceRequirements>\n" in out


def test_explain_deployment_service_and_recursive(kubectl: Any) -> None:
    out = kubectl("explain", "deployment.spec.strategy").stdout
    assert out.startswith("GROUP:      apps\nKIND:       Deployment\nVERSION:    v1\n")
    assert "rollingUpdate\t<RollingUpdateDeployment>" in out
    out = kubectl("explain", "service.spec.ports.targetPort").stdout
    # upstream's IntOrString schema is a string with format int-or-string: explain says <string>
    assert "FIELD: targetPort <string>" in out and "IntOrString is a type that can hold an int32" in out
    out = kubectl("explain", "svc", "--recursive").stdout
    assert "    clusterIP\t<string>\n" in out and "      targetPort\t<string>\n" in out
    out = kubectl("explain", "pod.spec.nope", ok=False).stderr
    assert 'field "nope" does not exist' in out


def _crd(group: str, size_doc: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A namespaced Gizmo CRD in ``group`` (plural ``gizmos``; the group is unique per test, and
    kubectl is always given the fully qualified ``gizmos.GROUP``)."""
    spec_props: dict[str, Any] = {"size": {"type": "integer", "description": size_doc}}
    spec_props.update(extra or {})
    schema = {
        "type": "object",
        "description": "A Gizmo is a thing for tests.",
        "properties": {
            "spec": {
                "type": "object",
                "description": "What the gizmo should be.",
                "required": ["size"],
                "properties": spec_props,
            },
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"gizmos.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "gizmos", "singular": "gizmo", "kind": "Gizmo"},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}],
        },
    }


def test_explain_crd_follows_schema_changes(kubectl: Any, raw: Any) -> None:
    group = f"g{uuid.uuid4().hex[:6]}.example.com"
    kubectl("apply", "-f", "-", stdin=json.dumps(_crd(group, "How big the gizmo is.")))
    # kubectl caches discovery (here: per test); a real client sees a new group after a refresh
    kubectl("api-resources", "--api-group", group)
    try:
        out = kubectl("explain", f"gizmos.{group}").stdout
        assert f"GROUP:      {group}\nKIND:       Gizmo\nVERSION:    v1\n" in out
        assert "A Gizmo is a thing for tests." in out and "metadata\t<ObjectMeta>" in out
        out = kubectl("explain", f"gizmos.{group}.spec").stdout
        assert "size\t<integer> -required-\n    How big the gizmo is." in out
        color = {"color": {"type": "string", "description": "Paint it.", "enum": ["red", "blue"]}}
        kubectl("apply", "-f", "-", stdin=json.dumps(_crd(group, "Bigger is better.", color)))
        out = kubectl("explain", f"gizmos.{group}.spec").stdout
        assert "Bigger is better." in out and "color\t<string>\n  enum: red, blue\n    Paint it." in out
        _, index = raw.request("GET", "/openapi/v3")
        assert f"apis/{group}/v1" in index["paths"]
    finally:
        kubectl("delete", "crd", f"gizmos.{group}")
    _, index = raw.request("GET", "/openapi/v3")
    assert f"apis/{group}/v1" not in index["paths"]


def test_explain_through_openapi_v2_protobuf(kubectl: Any) -> None:
    """``--output=plaintext-openapiv2`` reads /openapi/v2 in gnostic's protobuf form."""
    out = kubectl("explain", "pods.spec.containers.ports", "--output=plaintext-openapiv2").stdout
    assert "KIND:     Pod\nVERSION:  v1\n" in out and "RESOURCE: ports <[]Object>" in out
    assert "containerPort\t<integer> -required-" in out
    out = kubectl("explain", "deployment.spec.strategy.rollingUpdate", "--output=plaintext-openapiv2").stdout
    assert "maxSurge\t<string>" in out
