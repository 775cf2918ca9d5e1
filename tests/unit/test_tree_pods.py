"""The pure functions of :mod:`tree.pods`: a root pod's leaf copy (Kosmos' FitPod), the status
it sends back, and the updates that flow down."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tree import identity
from tree.deps_refs import names_used
from tree.pods import (
    CLUSTER_SELECTOR_ANNOTATION,
    DAEMONSET_ALLOW_ANNOTATION,
    KOSMOS_DAEMONSET_LABEL,
    SYNCED_KEYS_ANNOTATION,
    PodError,
    leaf_pod,
    leaf_update,
    root_status,
    should_sync,
)
from tree.spec import Mode

Obj = dict[str, Any]
ROOT = "root-a"
LEAF_TOLERATION = {"key": "kosmos.io/node", "operator": "Equal", "value": "true", "effect": "NoSchedule"}


def root_pod(**spec: Any) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "app", "uid": "u-1", "resourceVersion": "42",
                     "generateName": "web-", "creationTimestamp": "2026-01-01T00:00:00Z",
                     "finalizers": ["example.com/keep"], "labels": {"app": "web"}, "annotations": {"a": "1"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "rs"}]},
        "spec": {"nodeName": "kosmos-leaf1", "schedulerName": "kosmos-scheduler", "priority": 1000,
                 "priorityClassName": "high", "preemptionPolicy": "PreemptLowerPriority",
                 "serviceAccountName": "sa", "nodeSelector": {"kosmos.io/node": "true"},
                 "tolerations": [LEAF_TOLERATION],
                 "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                     "nodeSelectorTerms": [{"matchExpressions": [{"key": "kosmos.io/cluster", "operator": "In",
                                                                  "values": ["leaf1"]}]}]}},
                              "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
                 "readinessGates": [{"conditionType": "example.com/ready"}],
                 "containers": [{"name": "c", "image": "nginx:1",
                                 "env": [{"name": "E", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
                                         {"name": "S", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "k"}}}],
                                 "envFrom": [{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "sec"}}],
                                 "volumeMounts": [{"name": "default-token-abc", "mountPath": "/old"},
                                                  {"name": "data", "mountPath": "/data"}]}],
                 "initContainers": [{"name": "init", "image": "busybox:1"}],
                 "imagePullSecrets": [{"name": "pull"}],
                 "volumes": [{"name": "default-token-abc", "secret": {"secretName": "default-token-abc"}},
                             {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                             {"name": "cfg", "configMap": {"name": "cm"}},
                             {"name": "sec", "secret": {"secretName": "sec"}},
                             {"name": "kube-api-access-x", "projected": {"sources": [
                                 {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                                 {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt",
                                                                                       "path": "ca.crt"}]}},
                                 {"downwardAPI": {"items": []}}]}}],
                 **spec},
        "status": {"phase": "Pending", "qosClass": "BestEffort",
                   "conditions": [{"type": "PodScheduled", "status": "True"}]},
    }


def test_leaf_copy_is_fitted_as_kosmos_does() -> None:
    pod = root_pod()
    before = copy.deepcopy(pod)
    out = leaf_pod(pod, root_id=ROOT, leaf_name="web", mode=Mode.CLUSTER)
    assert pod == before  # the root pod is not touched
    meta, spec = out["metadata"], out["spec"]
    assert set(meta) == {"name", "namespace", "labels", "annotations"}
    assert meta["name"] == "web" and meta["namespace"] == "app"
    assert meta["labels"] == {"app": "web", identity.ROOT_LABEL: ROOT, identity.ROOT_UID_LABEL: "u-1",
                              identity.MANAGED_BY_LABEL: identity.MANAGED_BY}
    assert meta["annotations"]["a"] == "1" and meta["annotations"][identity.ROOT_NAME_ANNOTATION] == "app/web"
    assert json.loads(meta["annotations"][SYNCED_KEYS_ANNOTATION]) == {"labels": ["app"], "annotations": ["a"]}
    assert "status" not in out
    for gone in ("nodeName", "schedulerName", "priority", "preemptionPolicy", "nodeSelector", "tolerations",
                 "readinessGates", "hostname"):
        assert gone not in spec, gone
    assert spec["priorityClassName"] == "high"
    # the root's required node affinity is the root scheduler's; the rest of the affinity stays
    assert spec["affinity"] == {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    assert spec["automountServiceAccountToken"] is False
    assert [v["name"] for v in spec["volumes"]] == ["data", "cfg", "sec", "kube-api-access-x"]
    assert spec["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    # no token Secret from the dependency syncer: the projection stays as it is
    assert "serviceAccountToken" in spec["volumes"][3]["projected"]["sources"][0]


def test_node_mode_keeps_the_node_name() -> None:
    out = leaf_pod(root_pod(nodeName="leaf-node-3"), root_id=ROOT, leaf_name="web", mode=Mode.NODE)
    assert out["spec"]["nodeName"] == "leaf-node-3"


def test_cluster_selector_annotation_is_the_leaf_placement() -> None:
    pod = root_pod()
    cns = {"nodeSelector": {"disk": "ssd"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
           "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}],
           "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
               "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]}]}}}}
    pod["metadata"]["annotations"][CLUSTER_SELECTOR_ANNOTATION] = json.dumps(cns)
    spec = leaf_pod(pod, root_id=ROOT, leaf_name="web", mode=Mode.CLUSTER)["spec"]
    assert spec["nodeSelector"] == {"disk": "ssd"}
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert spec["topologySpreadConstraints"] == cns["topologySpreadConstraints"]
    assert spec["affinity"]["nodeAffinity"] == cns["affinity"]["nodeAffinity"]
    assert spec["affinity"]["podAntiAffinity"] == {"preferredDuringSchedulingIgnoredDuringExecution": []}
    pod["metadata"]["annotations"][CLUSTER_SELECTOR_ANNOTATION] = "{not json"
    with pytest.raises(PodError, match=CLUSTER_SELECTOR_ANNOTATION):
        leaf_pod(pod, root_id=ROOT, leaf_name="web", mode=Mode.CLUSTER)


def test_party_mode_adds_the_party_selector_to_every_required_term() -> None:
    party = {"matchLabels": {"pool": "gpu"}, "matchExpressions": [{"key": "tier", "operator": "Exists"}]}
    spec = leaf_pod(root_pod(), root_id=ROOT, leaf_name="web", mode=Mode.PARTY, party_selector=party)["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]},
                                           {"key": "tier", "operator": "Exists"}]}]
    pod = root_pod()
    pod["metadata"]["annotations"][CLUSTER_SELECTOR_ANNOTATION] = json.dumps(
        {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]},
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z2"]}]}]}}}})
    spec = leaf_pod(pod, root_id=ROOT, leaf_name="web", mode=Mode.PARTY, party_selector=party)["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [[r["key"] for r in t["matchExpressions"]] for t in terms] == [["zone", "pool", "tier"]] * 2


def test_renames_rewrite_every_reference_and_a_renamed_pod_keeps_its_hostname() -> None:
    renames = {("configmaps", "cm"): "cm-x", ("secrets", "sec"): "sec-x", ("secrets", "pull"): "pull-x",
               ("persistentvolumeclaims", "data"): "data-x", ("serviceaccounts", "sa"): "sa-x",
               ("configmaps", "kube-root-ca.crt"): "master-root-ca.crt"}
    spec = leaf_pod(root_pod(), root_id=ROOT, leaf_name="web-1234", mode=Mode.CLUSTER, renames=renames)["spec"]
    c = spec["containers"][0]
    assert c["env"][0]["valueFrom"]["configMapKeyRef"]["name"] == "cm-x"
    assert c["env"][1]["valueFrom"]["secretKeyRef"]["name"] == "sec-x"
    assert c["envFrom"] == [{"configMapRef": {"name": "cm-x"}}, {"secretRef": {"name": "sec-x"}}]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "data-x"
    assert vols["cfg"]["configMap"]["name"] == "cm-x"
    assert vols["sec"]["secret"]["secretName"] == "sec-x"
    # The token projection stays (the leaf's kubelet mounts a bound token of the leaf's copy of
    # the account) and so does the CA beside it: the leaf's own.
    assert vols["kube-api-access-x"] == root_pod()["spec"]["volumes"][-1]
    assert spec["imagePullSecrets"] == [{"name": "pull-x"}]
    assert spec["serviceAccountName"] == "sa-x"
    assert spec["hostname"] == "web"


def test_an_explicit_root_ca_volume_gets_the_roots_ca_and_the_token_keeps_the_leafs() -> None:
    """A pod that mounts ``kube-root-ca.crt`` itself wants the root's CA (``master-root-ca.crt``);
    the CA beside its projected token is the leaf's, whose API server the token is for."""
    pod = root_pod()
    pod["spec"]["volumes"].append({"name": "root-ca", "configMap": {"name": "kube-root-ca.crt"}})
    pod["spec"]["volumes"].append({"name": "bundle", "projected": {"sources": [
        {"configMap": {"name": "kube-root-ca.crt"}}, {"downwardAPI": {"items": []}}]}})
    renames = {("configmaps", "kube-root-ca.crt"): "master-root-ca.crt"}  # what deps.ensure returns for it

    vols = {v["name"]: v for v in leaf_pod(pod, root_id=ROOT, leaf_name="web", mode=Mode.CLUSTER,
                                           renames=renames)["spec"]["volumes"]}

    assert vols["root-ca"]["configMap"]["name"] == "master-root-ca.crt"
    assert vols["bundle"]["projected"]["sources"][0]["configMap"]["name"] == "master-root-ca.crt"
    api = vols["kube-api-access-x"]["projected"]["sources"]
    assert api[0] == {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}
    assert api[1]["configMap"]["name"] == "kube-root-ca.crt"


def test_a_renamed_secret_is_renamed_wherever_the_pod_names_it() -> None:
    pod = root_pod(containers=[{"name": "c", "image": "nginx:1",
                                "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "tls", "key": "k"}}}],
                                "envFrom": [{"secretRef": {"name": "tls"}}]}],
                   initContainers=[{"name": "i", "image": "busybox:1",
                                    "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "tls", "key": "k"}}}],
                                    "envFrom": [{"secretRef": {"name": "tls", "optional": True}}]}],
                   imagePullSecrets=[{"name": "tls"}],
                   volumes=[{"name": "v", "secret": {"secretName": "tls"}},
                            {"name": "p", "projected": {"sources": [
                                {"secret": {"name": "tls", "items": [{"key": "k", "path": "k"}]}},
                                {"serviceAccountToken": {"path": "token"}}]}},
                            {"name": "csi", "csi": {"driver": "x", "nodePublishSecretRef": {"name": "tls"}}}])
    renames = {("secrets", "tls"): "tls-5f3a"}
    before = copy.deepcopy(pod)

    out = leaf_pod(pod, root_id=ROOT, leaf_name="web", mode=Mode.CLUSTER, renames=renames)

    spec = out["spec"]
    for c in spec["containers"] + spec["initContainers"]:
        assert c["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "tls-5f3a", c["name"]
        assert c["envFrom"][0]["secretRef"]["name"] == "tls-5f3a", c["name"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["v"]["secret"]["secretName"] == "tls-5f3a"
    assert vols["p"]["projected"]["sources"][0]["secret"]["name"] == "tls-5f3a"
    assert vols["p"]["projected"]["sources"][1] == {"serviceAccountToken": {"path": "token"}}
    assert vols["csi"]["csi"]["nodePublishSecretRef"]["name"] == "tls-5f3a"
    assert spec["imagePullSecrets"] == [{"name": "tls-5f3a"}]
    # Every reference the leaf pod makes is one the dependency syncer copied, under its leaf name.
    assert ("secrets", "tls") not in names_used(out) and ("secrets", "tls-5f3a") in names_used(out)
    assert pod == before  # the root pod is not touched


def leaf_of(pod: Obj, **status: Any) -> Obj:
    out = leaf_pod(pod, root_id=ROOT, leaf_name="web", mode=Mode.CLUSTER)
    out["metadata"]["uid"] = "leaf-uid"
    if status:
        out["status"] = status
    return out


def test_root_status_from_the_leaf_keeps_the_root_scheduler_condition_and_qos() -> None:
    pod = root_pod()
    assert root_status(leaf_of(pod), pod) is None  # no status yet: nothing to tell
    leaf = leaf_of(pod, phase="Running", podIP="10.1.0.5", podIPs=[{"ip": "10.1.0.5"}], hostIP="192.0.2.9",
                   startTime="2026-01-01T00:00:05Z", qosClass="Burstable",
                   conditions=[{"type": "PodScheduled", "status": "True", "reason": "leaf"},
                               {"type": "Ready", "status": "True"}],
                   containerStatuses=[{"name": "c", "ready": True, "state": {"running": {}}}])
    st = root_status(leaf, pod)
    assert st is not None
    assert st["phase"] == "Running" and st["podIP"] == "10.1.0.5" and st["hostIP"] == "192.0.2.9"
    assert st["qosClass"] == "BestEffort"
    assert st["conditions"] == [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]
    assert st["containerStatuses"] == [{"name": "c", "ready": True, "state": {"running": {}}}]
    pod["status"] = st
    assert root_status(leaf, pod) is None  # equal: no write


def test_leaf_update_patches_what_the_api_lets_change_and_puts_edits_back() -> None:
    pod = root_pod()
    leaf = leaf_of(pod)
    leaf["spec"]["activeDeadlineSeconds"] = 100
    assert leaf_update(pod, leaf, ROOT) is None
    newer = copy.deepcopy(pod)
    newer["metadata"]["labels"] = {"app": "web2"}
    newer["metadata"]["annotations"] = {"b": "2"}
    newer["spec"]["containers"][0]["image"] = "nginx:2"
    newer["spec"]["initContainers"][0]["image"] = "busybox:2"
    newer["spec"]["activeDeadlineSeconds"] = 50
    leaf["metadata"]["labels"]["leaf-own"] = "kept"
    ops = leaf_update(newer, leaf, ROOT)
    assert ops is not None and ops[0] == {"op": "test", "path": "/metadata/uid", "value": "leaf-uid"}
    by_path = {o["path"]: o for o in ops[1:]}
    assert by_path["/metadata/labels/app"]["value"] == "web2"
    assert by_path["/metadata/annotations/b"]["value"] == "2"
    assert by_path["/metadata/annotations/a"]["op"] == "remove"
    assert by_path["/spec/containers/0/image"]["value"] == "nginx:2"
    assert by_path["/spec/initContainers/0/image"]["value"] == "busybox:2"
    assert by_path["/spec/activeDeadlineSeconds"]["value"] == 50
    assert "/metadata/labels/leaf-own" not in by_path  # the leaf's own label is not ours to remove
    assert by_path[f"/metadata/annotations/{SYNCED_KEYS_ANNOTATION.replace('/', '~1')}"]["op"] == "add"
    # a deadline may only be lowered, never raised or unset (ValidatePodUpdate)
    raised = copy.deepcopy(pod)
    raised["spec"]["activeDeadlineSeconds"] = 500
    assert leaf_update(raised, leaf_of(pod) | {"spec": leaf["spec"] | {"activeDeadlineSeconds": 100}}, ROOT) is None
    # an edit of one of our labels in the leaf is put back
    tampered = leaf_of(pod)
    tampered["metadata"]["labels"]["app"] = "other"
    assert leaf_update(pod, tampered, ROOT) == [{"op": "test", "path": "/metadata/uid", "value": "leaf-uid"},
                                               {"op": "add", "path": "/metadata/labels/app", "value": "web"}]


def test_which_root_pods_are_copied() -> None:
    assert should_sync(root_pod())
    system = root_pod()
    system["metadata"]["namespace"] = "kube-system"
    assert not should_sync(system)
    ds = root_pod()
    ds["metadata"]["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "proxy", "uid": "d"}]
    assert not should_sync(ds)
    ds["metadata"]["annotations"][DAEMONSET_ALLOW_ANNOTATION] = "true"
    assert should_sync(ds)
    shadow = root_pod()
    shadow["metadata"]["labels"][KOSMOS_DAEMONSET_LABEL] = "true"
    assert not should_sync(shadow)
