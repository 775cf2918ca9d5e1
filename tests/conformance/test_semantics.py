"""kubeemu's subresources and refusals through the official clients: ``/scale`` (Python client and
``kubectl scale``), ``pods/binding``, ``pods/eviction`` against PodDisruptionBudgets,
``serviceaccounts/token`` (``kubectl create token``; the JWT verified with the server's published
key), discovery of the subresources, and bad manifests refused the upstream way (422 naming the
field; an unknown kind refused by kubectl from discovery).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubeemu.runner import ServerThread
from tests.conformance.conftest import Raw


def _deployment(name: str, replicas: int = 2) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}, "spec": {
        "replicas": replicas, "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [
            {"name": "web", "image": "python:3", "command": ["python3", "-m", "http.server", "8080"]}]}}}}


def _b64json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_discovery_lists_the_subresources(raw: Raw) -> None:
    _, core = raw.request("GET", "/api/v1")
    by = {r["name"]: r for r in core["resources"]}
    assert by["pods/eviction"] == {"name": "pods/eviction", "singularName": "", "namespaced": True, "group": "policy",
                                   "version": "v1", "kind": "Eviction", "verbs": ["create"]}
    assert by["pods/binding"]["kind"] == "Binding" and by["pods/binding"]["verbs"] == ["create"]
    assert by["serviceaccounts/token"] == {"name": "serviceaccounts/token", "singularName": "", "namespaced": True,
                                           "group": "authentication.k8s.io", "version": "v1",
                                           "kind": "TokenRequest", "verbs": ["create"]}
    _, apps = raw.request("GET", "/apis/apps/v1")
    names = {r["name"]: r for r in apps["resources"]}
    for plural in ("deployments", "replicasets", "statefulsets"):
        assert names[f"{plural}/scale"]["kind"] == "Scale" and names[f"{plural}/scale"]["group"] == "autoscaling"
        assert names[f"{plural}/scale"]["verbs"] == ["get", "patch", "update"]
    assert "controllerrevisions" in names and "daemonsets/scale" not in names
    _, batch = raw.request("GET", "/apis/batch/v1")
    assert {r["name"] for r in batch["resources"]} == {"jobs", "jobs/status", "cronjobs", "cronjobs/status"}
    _, storage = raw.request("GET", "/apis/storage.k8s.io/v1")
    sc = next(r for r in storage["resources"] if r["name"] == "storageclasses")
    assert sc["shortNames"] == ["sc"] and sc["namespaced"] is False


def test_scale_subresource_python_client(api: Any, ns: str) -> None:
    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment(ns, _deployment("web"))
    s = apps.read_namespaced_deployment_scale("web", ns)
    assert s.kind == "Scale" and s.api_version == "autoscaling/v1"
    assert s.spec.replicas == 2 and s.status.replicas == 0 and s.status.selector == "app=web"
    s.spec.replicas = 5
    s = apps.replace_namespaced_deployment_scale("web", ns, s)
    assert s.spec.replicas == 5
    d = apps.read_namespaced_deployment("web", ns)
    assert d.spec.replicas == 5 and d.metadata.generation == 2
    s = apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 1}})
    assert s.spec.replicas == 1
    stale = client.V1Scale(metadata=client.V1ObjectMeta(name="web", resource_version="1"),
                           spec=client.V1ScaleSpec(replicas=3))
    with pytest.raises(client.ApiException) as ei:
        apps.replace_namespaced_deployment_scale("web", ns, stale)
    assert ei.value.status == 409
    with pytest.raises(client.ApiException) as ei:
        apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": -1}})
    body = json.loads(ei.value.body)
    assert ei.value.status == 422 and body["message"] == (
        'Scale.autoscaling "web" is invalid: spec.replicas: Invalid value: -1: must be greater than or equal to 0')


def test_kubectl_scale_and_invalid_manifests(kubectl: Any, ns: str, tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text(json.dumps(_deployment("kweb")))
    kubectl("apply", "-n", ns, "-f", str(f))
    out = kubectl("scale", "-n", ns, "deployment/kweb", "--replicas=4").stdout
    assert "deployment.apps/kweb scaled" in out
    got = json.loads(kubectl("get", "-n", ns, "deployment", "kweb", "-o", "json").stdout)
    assert got["spec"]["replicas"] == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"""apiVersion: v1
kind: Pod
metadata: {{name: bad, namespace: {ns}}}
spec:
  containers:
  - name: web
    image: python:3
    readinessProbe: {{periodSeconds: 5}}
  volumes:
  - name: cfg
    configMap: {{}}
""")
    p = kubectl("apply", "-f", str(bad), ok=False)
    assert p.returncode != 0
    assert ('The Pod "bad" is invalid: \n* spec.volumes[0].configMap.name: Required value\n'
            "* spec.containers[0].readinessProbe: Required value: must specify a handler type") in p.stderr
    unknown = tmp_path / "foo.yaml"
    unknown.write_text(f"apiVersion: v1\nkind: Foo\nmetadata: {{name: x, namespace: {ns}}}\n")
    p = kubectl("apply", "-f", str(unknown), ok=False)
    assert p.returncode != 0 and 'no matches for kind "Foo" in version "v1"' in p.stderr


def test_binding(v1: Any, ns: str, mkpod: Any, raw: Raw) -> None:
    v1.create_namespaced_pod(ns, mkpod("b"))
    assert v1.read_namespaced_pod("b", ns).spec.node_name is None  # nobody binds it but a scheduler
    code, out = raw.request("POST", f"/api/v1/namespaces/{ns}/pods/b/binding", {
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": "b"}, "target": {"kind": "Node", "name": "n1"}})
    assert code == 201 and out["status"] == "Success"
    p = v1.read_namespaced_pod("b", ns)
    assert p.spec.node_name == "n1" and any(c.type == "PodScheduled" and c.status == "True"
                                            for c in p.status.conditions)
    code, out = raw.request("POST", f"/api/v1/namespaces/{ns}/pods/b/binding", {
        "metadata": {"name": "b"}, "target": {"name": "n2"}})
    assert code == 409 and out["message"] == (
        'Operation cannot be fulfilled on pods/binding "b": pod b is already assigned to node "n1"')


def _running(v1: Any, ns: str, name: str, ready: bool = True) -> None:
    v1.patch_namespaced_pod_status(name, ns, {"status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}]}})


def test_eviction_honours_the_disruption_budget(api: Any, v1: Any, ns: str, mkpod: Any) -> None:
    policy = client.PolicyV1Api(api)
    for name in ("e1", "e2"):
        v1.create_namespaced_pod(ns, mkpod(name, app="e"))
        _running(v1, ns, name)
    policy.create_namespaced_pod_disruption_budget(ns, {"metadata": {"name": "pdb"}, "spec": {
        "minAvailable": 1, "selector": {"matchLabels": {"app": "e"}}}})
    evict = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "e1", "namespace": ns}}
    # no status yet: the disruption controller has not processed the budget
    with pytest.raises(client.ApiException) as ei:
        v1.create_namespaced_pod_eviction("e1", ns, evict)
    body = json.loads(ei.value.body)
    assert ei.value.status == 429 and body["reason"] == "TooManyRequests"
    assert body["message"] == "Cannot evict pod as it would violate the pod's disruption budget."
    assert body["details"]["causes"] == [{"reason": "DisruptionBudget",
                                          "message": "The disruption budget pdb is still being processed by the "
                                                     "server."}]
    status = {"observedGeneration": 1, "disruptionsAllowed": 1, "currentHealthy": 2, "desiredHealthy": 1,
              "expectedPods": 2}
    policy.patch_namespaced_pod_disruption_budget_status("pdb", ns, {"status": status})
    v1.create_namespaced_pod_eviction("e1", ns, evict)
    gone = v1.list_namespaced_pod(ns).items
    assert [p.metadata.name for p in gone] == ["e2"]
    pdb = policy.read_namespaced_pod_disruption_budget("pdb", ns)
    assert pdb.status.disruptions_allowed == 0 and "e1" in pdb.status.disrupted_pods
    with pytest.raises(client.ApiException) as ei:
        v1.create_namespaced_pod_eviction("e2", ns, dict(evict, metadata={"name": "e2", "namespace": ns}))
    body = json.loads(ei.value.body)
    assert ei.value.status == 429 and body["details"]["causes"] == [{
        "reason": "DisruptionBudget", "message": "The disruption budget pdb needs 1 healthy pods and has 2 currently"}]
    # a pending pod is not protected by the budget
    v1.create_namespaced_pod(ns, mkpod("e3", app="e"))
    v1.create_namespaced_pod_eviction("e3", ns, dict(evict, metadata={"name": "e3", "namespace": ns}))
    assert sorted(p.metadata.name for p in v1.list_namespaced_pod(ns).items) == ["e2"]


def test_token_request_is_a_verifiable_jwt(v1: Any, ns: str, mkpod: Any, raw: Raw, emu: ServerThread) -> None:
    crypto = pytest.importorskip("cryptography")
    assert crypto is not None
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    v1.create_namespaced_pod(ns, mkpod("tp"))
    pod = v1.read_namespaced_pod("tp", ns)
    sa = v1.read_namespaced_service_account("default", ns)
    before = int(time.time())
    tr = v1.create_namespaced_service_account_token("default", ns, {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": ["lab"], "expirationSeconds": 1200,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "tp", "uid": pod.metadata.uid}}})
    assert tr.spec.audiences == ["lab"] and tr.spec.expiration_seconds == 1200
    token = tr.status.token
    head, payload, sig = token.split(".")
    header, claims = _b64json(head), _b64json(payload)
    assert header["alg"] == "RS256"
    assert claims["iss"] == "https://kubernetes.default.svc.cluster.local" and claims["aud"] == ["lab"]
    assert claims["sub"] == f"system:serviceaccount:{ns}:default"
    assert claims["kubernetes.io"] == {"namespace": ns, "serviceaccount": {"name": "default", "uid": sa.metadata.uid},
                                       "pod": {"name": "tp", "uid": pod.metadata.uid}}
    assert before + 1200 <= claims["exp"] <= int(time.time()) + 1200
    _, jwks = raw.request("GET", "/openid/v1/jwks")
    (key,) = jwks["keys"]
    assert key["kid"] == header["kid"]
    pub = rsa.RSAPublicNumbers(int.from_bytes(base64.urlsafe_b64decode(key["e"] + "=="), "big"),
                               int.from_bytes(base64.urlsafe_b64decode(key["n"] + "=="), "big")).public_key()
    pub.verify(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)), f"{head}.{payload}".encode(),
               padding.PKCS1v15(), hashes.SHA256())  # raises if the signature is wrong
    with pytest.raises(client.ApiException) as ei:
        v1.create_namespaced_service_account_token("default", ns, {"spec": {"expirationSeconds": 60}})
    assert ei.value.status == 422 and json.loads(ei.value.body)["message"] == (
        'TokenRequest.authentication.k8s.io "default" is invalid: spec.expirationSeconds: Invalid value: 60: may '
        "not specify a duration less than 10 minutes")
    with pytest.raises(client.ApiException) as ei:
        v1.create_namespaced_service_account_token("default", ns, {"spec": {"boundObjectRef": {
            "kind": "Pod", "apiVersion": "v1", "name": "tp", "uid": str(uuid.uuid4())}}})
    assert ei.value.status == 409


def test_kubectl_create_token(kubectl: Any, ns: str) -> None:
    p = kubectl("create", "token", "default", "-n", ns, "--duration=20m", ok=False)
    if "the body of the request was in an unknown format" in p.stderr:
        # kubectl sends the TokenRequest as protobuf; decoding it is the protobuf work of issue 15
        # (branch i15-api). Once merged this runs; the Python client test above covers the API.
        pytest.skip("kubectl sends TokenRequest as protobuf, which this server does not decode yet")
    assert p.returncode == 0, p.stderr
    out = p.stdout.strip()
    claims = _b64json(out.split(".")[1])
    assert claims["sub"] == f"system:serviceaccount:{ns}:default" and claims["exp"] - claims["iat"] == 1200


def test_custom_resource_scale(api: Any, raw: Raw, ns: str) -> None:
    group = f"s{uuid.uuid4().hex[:6]}.example.com"
    schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    ext = client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition({"metadata": {"name": f"widgets.{group}"}, "spec": {
        "group": group, "scope": "Namespaced", "names": {"plural": "widgets", "kind": "Widget"},
        "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema},
                      "subresources": {"status": {}, "scale": {
                          "specReplicasPath": ".spec.size", "statusReplicasPath": ".status.ready",
                          "labelSelectorPath": ".status.selector"}}}]}})
    _, doc = raw.request("GET", f"/apis/{group}/v1")
    assert {r["name"] for r in doc["resources"]} == {"widgets", "widgets/status", "widgets/scale"}
    co = client.CustomObjectsApi(api)
    co.create_namespaced_custom_object(group, "v1", ns, "widgets", {
        "apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 2}})
    co.patch_namespaced_custom_object_status(group, "v1", ns, "widgets", "w", {"status": {
        "ready": 1, "selector": "app=w"}})
    s = co.get_namespaced_custom_object_scale(group, "v1", ns, "widgets", "w")
    assert s["spec"] == {"replicas": 2} and s["status"] == {"replicas": 1, "selector": "app=w"}
    co.patch_namespaced_custom_object_scale(group, "v1", ns, "widgets", "w", {"spec": {"replicas": 7}})
    assert co.get_namespaced_custom_object(group, "v1", ns, "widgets", "w")["spec"]["size"] == 7


def test_eviction_of_an_unready_pod(api: Any, v1: Any, ns: str, mkpod: Any) -> None:
    """IfHealthyBudget (the default): an unready pod may go while the budget is met, even at 0 allowed."""
    policy = client.PolicyV1Api(api)
    v1.create_namespaced_pod(ns, mkpod("u1", app="u"))
    _running(v1, ns, "u1", ready=False)
    policy.create_namespaced_pod_disruption_budget(ns, {"metadata": {"name": "pdb"}, "spec": {
        "minAvailable": 1, "selector": {"matchLabels": {"app": "u"}}}})
    policy.patch_namespaced_pod_disruption_budget_status("pdb", ns, {"status": {
        "observedGeneration": 1, "disruptionsAllowed": 0, "currentHealthy": 1, "desiredHealthy": 1,
        "expectedPods": 2}})
    v1.create_namespaced_pod_eviction("u1", ns, {"metadata": {"name": "u1", "namespace": ns}})
    assert v1.list_namespaced_pod(ns).items == []
    assert policy.read_namespaced_pod_disruption_budget("pdb", ns).status.disruptions_allowed == 0


def test_new_kinds_through_the_typed_clients(api: Any, ns: str, raw: Raw) -> None:
    batch, storage, apps = client.BatchV1Api(api), client.StorageV1Api(api), client.AppsV1Api(api)
    tmpl = {"metadata": {"labels": {"app": "j"}}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "c", "image": "python:3", "command": ["true"]}]}}
    job = batch.create_namespaced_job(ns, {"metadata": {"name": "j"}, "spec": {"template": tmpl}})
    assert job.spec.backoff_limit == 6 and job.spec.completion_mode == "NonIndexed"
    assert job.spec.selector.match_labels == {"batch.kubernetes.io/controller-uid": job.metadata.uid}
    batch.patch_namespaced_job_status("j", ns, {"status": {"active": 1}})
    assert batch.read_namespaced_job("j", ns).status.active == 1
    cj = batch.create_namespaced_cron_job(ns, {"metadata": {"name": "cj"}, "spec": {
        "schedule": "0 * * * *", "jobTemplate": {"spec": {"template": tmpl}}}})
    assert cj.spec.concurrency_policy == "Allow" and cj.spec.successful_jobs_history_limit == 3
    name = f"sc-{uuid.uuid4().hex[:6]}"
    sc = storage.create_storage_class({"metadata": {"name": name}, "provisioner": "kosmos.io/lab-local"})
    assert sc.reclaim_policy == "Delete" and sc.volume_binding_mode == "Immediate"
    storage.delete_storage_class(name)
    rev = apps.create_namespaced_controller_revision(ns, {"metadata": {"name": "r-1"}, "revision": 1,
                                                           "data": {"spec": {"template": tmpl}}})
    assert rev.revision == 1
    # (the typed client refuses this before sending: plain HTTP shows the server's answer)
    code, out = raw.request("POST", f"/apis/batch/v1/namespaces/{ns}/cronjobs", {
        "metadata": {"name": "bad"}, "spec": {"jobTemplate": {"spec": {"template": tmpl}}}})
    assert code == 422 and out["message"] == 'CronJob.batch "bad" is invalid: spec.schedule: Required value'
