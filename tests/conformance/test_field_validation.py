"""Server-side field validation of built-in kinds, as kubectl 1.32 uses it.

kubeemu's OpenAPI v3 documents list ``fieldValidation`` on each kind's PATCH operation, so kubectl
leaves unknown fields to the server (``--validate=strict``, the default, sends Strict). The server
drops unknown fields as decoding into the Go types does upstream: Strict refuses them with
upstream's text, Warn keeps the request and says so in a ``Warning`` header per field.
"""

from __future__ import annotations

import json
from typing import Any


def _pod(ns: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "foo": 1,
            "containers": [
                {"name": "c", "image": "busybox", "bar": True, "ports": [{"containerPort": 80, "baz": "x"}]}
            ],
        },
    }


def test_strict_refuses_unknown_fields_with_upstream_text(kubectl: Any, ns: str) -> None:
    out = kubectl("create", "-f", "-", stdin=json.dumps(_pod(ns, "strict")), ok=False)
    assert out.returncode == 1
    # in the order of the body kubectl sends (it re-marshals the manifest: keys sorted)
    assert (
        'Error from server (BadRequest): error when creating "STDIN": Pod in version "v1" cannot be handled as '
        'a Pod: strict decoding error: unknown field "spec.containers[0].bar", unknown field '
        '"spec.containers[0].ports[0].baz", unknown field "spec.foo"'
    ) in out.stderr
    assert kubectl("get", "pod", "strict", "-n", ns, ok=False).returncode == 1  # nothing was created


def test_warn_drops_unknown_fields_and_says_so(kubectl: Any, ns: str) -> None:
    out = kubectl("create", "--validate=warn", "-f", "-", stdin=json.dumps(_pod(ns, "warned")))
    assert 'Warning: unknown field "spec.foo"' in out.stderr
    assert 'Warning: unknown field "spec.containers[0].ports[0].baz"' in out.stderr
    stored = json.loads(kubectl("get", "pod", "warned", "-n", ns, "-o", "json").stdout)
    assert "foo" not in stored["spec"] and "bar" not in stored["spec"]["containers"][0]
    assert "baz" not in stored["spec"]["containers"][0]["ports"][0]


def test_patch_strict_warn_and_known_fields_pass(kubectl: Any, ns: str, raw: Any) -> None:
    kubectl("create", "configmap", "cm", "-n", ns, "--from-literal=a=b")
    code, body = raw.request(
        "PATCH",
        f"/api/v1/namespaces/{ns}/configmaps/cm?fieldValidation=Strict",
        {"data": {"c": "d"}, "nope": 1},
        "application/merge-patch+json",
    )
    assert code == 400 and body["message"] == (
        'ConfigMap in version "v1" cannot be handled as a ConfigMap: strict decoding error: unknown field "nope"'
    )
    # kubectl patch sends no fieldValidation: the server's default, Warn
    out = kubectl("patch", "configmap", "cm", "-n", ns, "--type=merge", "-p", '{"data": {"c": "d"}, "nope": 1}')
    assert 'Warning: unknown field "nope"' in out.stderr
    out = kubectl("patch", "configmap", "cm", "-n", ns, "-p", '{"data": {"e": "f"}}')  # strategic merge
    assert "Warning" not in out.stderr, out.stderr
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "d"}},
            "strategy": {"rollingUpdate": {"maxSurge": "50%"}},
            "template": {
                "metadata": {"labels": {"app": "d"}},
                "spec": {
                    "containers": [
                        {
                            "name": "c",
                            "image": "busybox",
                            "resources": {"limits": {"cpu": "1"}},
                            "readinessProbe": {"httpGet": {"port": 8080, "path": "/"}},
                        }
                    ]
                },
            },
        },
    }
    out = kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
    assert "Warning" not in out.stderr, out.stderr
