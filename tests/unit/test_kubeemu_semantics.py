"""kubeemu's API semantics on the store itself: upstream defaulting, the mutating admission
plugins (ServiceAccount, DefaultTolerationSeconds, DefaultStorageClass, the Job selector),
validation with upstream's field paths and texts, immutability, nodePort allocation.

The expected texts are upstream's (``pkg/apis/core/validation/validation.go``,
``pkg/apis/apps/validation``, ``pkg/apis/batch/validation``, apimachinery's ``field`` errors):
a client or a human matches on them, so they are compared whole.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubeemu import defaults, validation
from kubeemu.errors import ApiError
from kubeemu.objects import DeleteOptions
from kubeemu.resources import Registry
from kubeemu.store import Store

Obj = dict[str, Any]


@pytest.fixture
def store() -> Store:
    return Store(Registry(), ("10.96.0.0/24", "fd00:96::/112"))


def create(store: Store, key: tuple[str, str], body: Obj, ns: str = "default") -> Obj:
    rt = store.registry.get(key)
    assert rt is not None
    return store.create(rt, ns, copy.deepcopy(body))


def update(store: Store, key: tuple[str, str], body: Obj, ns: str = "default") -> Obj:
    rt = store.registry.get(key)
    assert rt is not None
    return store.update(rt, ns, body["metadata"]["name"], copy.deepcopy(body))


def refused(fn: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as ei:
        fn(*args)
    return ei.value


PODS = ("", "pods")
SVC = ("", "services")
PVC = ("", "persistentvolumeclaims")
DEPLOY = ("apps", "deployments")
STS = ("apps", "statefulsets")
DS = ("apps", "daemonsets")
RS = ("apps", "replicasets")
JOB = ("batch", "jobs")
CJ = ("batch", "cronjobs")
SC = ("storage.k8s.io", "storageclasses")
EPS = ("discovery.k8s.io", "endpointslices")


def pod(name: str = "p", **spec: Any) -> Obj:
    body: Obj = {"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}
    body["spec"].update(spec)
    return body


def template(labels: dict[str, str], **spec: Any) -> Obj:
    s: Obj = {"containers": [{"name": "c", "image": "nginx"}]}
    s.update(spec)
    return {"metadata": {"labels": labels}, "spec": s}


# ---------------------------------------------------------------------------- defaulting


def test_pod_defaults_as_upstream(store: Store) -> None:
    body = pod(containers=[{
        "name": "web", "image": "nginx", "ports": [{"containerPort": 80}],
        "readinessProbe": {"httpGet": {"port": 80}},
        "livenessProbe": {"tcpSocket": {"port": 80}, "initialDelaySeconds": 2},
    }, {"name": "side", "image": "registry.local:5000/tools:1.2"}, {"name": "pinned", "image": "a/b@sha256:00"}])
    got = create(store, PODS, body)
    spec = got["spec"]
    assert {k: spec[k] for k in ("restartPolicy", "terminationGracePeriodSeconds", "dnsPolicy", "schedulerName",
                                 "securityContext", "enableServiceLinks", "serviceAccountName", "serviceAccount",
                                 "priority", "preemptionPolicy")} == {
        "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
        "schedulerName": "default-scheduler", "securityContext": {}, "enableServiceLinks": True,
        "serviceAccountName": "default", "serviceAccount": "default", "priority": 0,
        "preemptionPolicy": "PreemptLowerPriority"}
    web, side, pinned = spec["containers"]
    assert [web["imagePullPolicy"], side["imagePullPolicy"], pinned["imagePullPolicy"]] == [
        "Always", "IfNotPresent", "IfNotPresent"]
    assert web["terminationMessagePath"] == "/dev/termination-log" and web["terminationMessagePolicy"] == "File"
    assert web["ports"] == [{"containerPort": 80, "protocol": "TCP"}]
    assert web["readinessProbe"] == {"httpGet": {"port": 80, "path": "/", "scheme": "HTTP"}, "timeoutSeconds": 1,
                                     "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3}
    assert web["livenessProbe"]["initialDelaySeconds"] == 2 and web["livenessProbe"]["failureThreshold"] == 3
    # DefaultTolerationSeconds
    assert spec["tolerations"] == [
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 300}]
    # ServiceAccount admission: the projected token volume, mounted read-only in every container
    (vol,) = spec["volumes"]
    assert vol["name"].startswith("kube-api-access-") and len(vol["name"]) == len("kube-api-access-") + 5
    assert vol["projected"] == {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1",
                                                                       "fieldPath": "metadata.namespace"}}]}}]}
    for c in spec["containers"]:
        assert c["volumeMounts"] == [{"name": vol["name"], "readOnly": True,
                                      "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]
    assert got["status"] == {"phase": "Pending", "qosClass": "BestEffort"}
    # re-sending the stored object is a no-op: defaulting is idempotent
    assert update(store, PODS, got)["metadata"]["resourceVersion"] == got["metadata"]["resourceVersion"]


def test_pod_defaults_keep_what_is_set(store: Store) -> None:
    tol = [{"operator": "Exists"}]
    got = create(store, PODS, pod(restartPolicy="Never", automountServiceAccountToken=False, tolerations=tol,
                                  volumes=[{"name": "scratch"}]))
    assert got["spec"]["restartPolicy"] == "Never"
    assert got["spec"]["tolerations"] == tol  # tolerates everything already
    # a volume naming no source is an emptyDir (SetDefaults_Volume); no token volume when automount is off
    assert got["spec"]["volumes"] == [{"name": "scratch", "emptyDir": {}}]
    assert "volumeMounts" not in got["spec"]["containers"][0]


def test_pod_requests_default_to_limits_and_qos(store: Store) -> None:
    res = {"limits": {"cpu": "500m", "memory": "128Mi"}}
    got = create(store, PODS, pod(containers=[{"name": "c", "image": "x:1", "resources": res}]))
    assert got["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "500m", "memory": "128Mi"}
    assert got["status"]["qosClass"] == "Guaranteed"
    burst = pod("b", containers=[{"name": "c", "image": "x:1", "resources": {"requests": {"cpu": "100m"}}}])
    assert create(store, PODS, burst)["status"]["qosClass"] == "Burstable"


def test_service_account_must_exist(store: Store) -> None:
    e = refused(create, store, PODS, pod(serviceAccountName="robot"))
    assert e.code == 403 and e.reason == "Forbidden"
    assert e.message == ('pods "p" is forbidden: error looking up service account default/robot: serviceaccount '
                         '"robot" not found')
    create(store, ("", "serviceaccounts"), {"metadata": {"name": "robot"}, "automountServiceAccountToken": False})
    got = create(store, PODS, pod(serviceAccountName="robot"))
    assert got["spec"]["serviceAccountName"] == "robot" and "volumes" not in got["spec"]


def test_workload_defaults(store: Store) -> None:
    d = create(store, DEPLOY, {"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"app": "d"}},
                                                                   "template": template({"app": "d"})}})
    assert {k: d["spec"][k] for k in ("replicas", "strategy", "revisionHistoryLimit", "progressDeadlineSeconds")} == {
        "replicas": 1, "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%",
                                                                               "maxSurge": "25%"}},
        "revisionHistoryLimit": 10, "progressDeadlineSeconds": 600}
    tspec = d["spec"]["template"]["spec"]
    assert tspec["restartPolicy"] == "Always" and tspec["containers"][0]["imagePullPolicy"] == "Always"
    assert "volumes" not in tspec and "tolerations" not in tspec  # admission plugins act on pods only
    assert d["metadata"]["generation"] == 1
    recreate = create(store, DEPLOY, {"metadata": {"name": "r"}, "spec": {
        "selector": {"matchLabels": {"app": "r"}}, "strategy": {"type": "Recreate"},
        "template": template({"app": "r"})}})
    assert recreate["spec"]["strategy"] == {"type": "Recreate"}

    s = create(store, STS, {"metadata": {"name": "s"}, "spec": {
        "selector": {"matchLabels": {"app": "s"}}, "serviceName": "s", "template": template({"app": "s"}),
        "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}})
    assert {k: s["spec"][k] for k in ("replicas", "podManagementPolicy", "updateStrategy", "revisionHistoryLimit",
                                      "persistentVolumeClaimRetentionPolicy")} == {
        "replicas": 1, "podManagementPolicy": "OrderedReady",
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}, "revisionHistoryLimit": 10,
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"}}
    claim = s["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["volumeMode"] == "Filesystem" and claim["kind"] == "PersistentVolumeClaim"

    ds = create(store, DS, {"metadata": {"name": "ds"}, "spec": {"selector": {"matchLabels": {"app": "x"}},
                                                                 "template": template({"app": "x"})}})
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    rs = create(store, RS, {"metadata": {"name": "rs"}, "spec": {"selector": {"matchLabels": {"app": "y"}},
                                                                 "template": template({"app": "y"})}})
    assert rs["spec"]["replicas"] == 1


def test_job_defaults_and_generated_selector(store: Store) -> None:
    job = create(store, JOB, {"metadata": {"name": "j"}, "spec": {
        "template": template({"app": "j"}, restartPolicy="Never")}})
    uid = job["metadata"]["uid"]
    spec = job["spec"]
    assert {k: spec[k] for k in ("completions", "parallelism", "backoffLimit", "completionMode", "suspend",
                                 "podReplacementPolicy")} == {
        "completions": 1, "parallelism": 1, "backoffLimit": 6, "completionMode": "NonIndexed", "suspend": False,
        "podReplacementPolicy": "TerminatingOrFailed"}
    assert spec["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    assert spec["template"]["metadata"]["labels"] == {
        "app": "j", "batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": "j",
        "controller-uid": uid, "job-name": "j"}
    assert job["metadata"]["labels"] == {"app": "j"}  # the Job's labels default to the template's (as sent)
    e = refused(create, store, JOB, {"metadata": {"name": "k"}, "spec": {
        "selector": {"matchLabels": {"app": "k"}}, "template": template({"app": "k"}, restartPolicy="Never")}})
    assert e.code == 422 and "spec.selector: Invalid value: " in e.message and "`selector` not auto-generated" in \
        e.message
    manual = create(store, JOB, {"metadata": {"name": "m"}, "spec": {
        "manualSelector": True, "parallelism": 2, "selector": {"matchLabels": {"app": "m"}},
        "template": template({"app": "m"}, restartPolicy="OnFailure")}})
    assert "completions" not in manual["spec"] and manual["spec"]["parallelism"] == 2
    cj = create(store, CJ, {"metadata": {"name": "c"}, "spec": {"schedule": "*/5 * * * *", "jobTemplate": {
        "spec": {"template": template({}, restartPolicy="OnFailure")}}}})
    assert {k: cj["spec"][k] for k in ("concurrencyPolicy", "suspend", "successfulJobsHistoryLimit",
                                       "failedJobsHistoryLimit")} == {
        "concurrencyPolicy": "Allow", "suspend": False, "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 1}
    assert cj["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 6


def test_service_defaults_and_node_ports(store: Store) -> None:
    svc = create(store, SVC, {"metadata": {"name": "web"}, "spec": {"type": "NodePort", "selector": {"app": "w"},
                                                                    "ports": [{"port": 80}]}})
    spec = svc["spec"]
    assert spec["sessionAffinity"] == "None" and spec["ipFamilyPolicy"] == "SingleStack"
    assert spec["ipFamilies"] == ["IPv4"] and spec["clusterIPs"] == [spec["clusterIP"]]
    assert spec["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80, "nodePort": 30000}]
    assert spec["externalTrafficPolicy"] == "Cluster" and spec["internalTrafficPolicy"] == "Cluster"
    dual = create(store, SVC, {"metadata": {"name": "dual"}, "spec": {"ipFamilyPolicy": "PreferDualStack",
                                                                      "ports": [{"port": 53, "protocol": "UDP"}]}})
    assert dual["spec"]["ipFamilies"] == ["IPv4", "IPv6"] and ":" in dual["spec"]["clusterIPs"][1]
    e = refused(create, store, SVC, {"metadata": {"name": "clash"}, "spec": {
        "type": "NodePort", "ports": [{"port": 80, "nodePort": 30000}]}})
    assert e.message == ('Service "clash" is invalid: spec.ports[0].nodePort: Invalid value: 30000: provided port '
                         "is already allocated")
    e = refused(create, store, SVC, {"metadata": {"name": "far"}, "spec": {
        "type": "NodePort", "ports": [{"port": 80, "nodePort": 40000}]}})
    assert e.message == ('Service "far" is invalid: spec.ports[0].nodePort: Invalid value: 40000: provided port is '
                         "not in the valid range. The range of valid ports is 30000-32767")
    # an update that leaves the nodePort out keeps it; turning to ClusterIP releases it
    again = copy.deepcopy(svc)
    again["spec"]["ports"] = [{"port": 80}]
    assert update(store, SVC, again)["spec"]["ports"][0]["nodePort"] == 30000
    back = copy.deepcopy(store.get(store.registry.get(SVC), "default", "web"))  # type: ignore[arg-type]
    back["spec"]["type"] = "ClusterIP"
    assert "nodePort" not in update(store, SVC, back)["spec"]["ports"][0]
    taken = create(store, SVC, {"metadata": {"name": "taken"}, "spec": {
        "type": "NodePort", "ports": [{"port": 80, "nodePort": 30000}]}})
    assert taken["spec"]["ports"][0]["nodePort"] == 30000


def test_pvc_default_storage_class(store: Store) -> None:
    claim = {"metadata": {"name": "c"}, "spec": {"accessModes": ["ReadWriteOnce"],
                                                 "resources": {"requests": {"storage": "1Gi"}}}}
    got = create(store, PVC, claim)
    assert got["spec"]["volumeMode"] == "Filesystem" and "storageClassName" not in got["spec"]
    sc = create(store, SC, {"metadata": {"name": "lab-local", "annotations": {
        "storageclass.kubernetes.io/is-default-class": "true"}}, "provisioner": "kosmos.io/lab-local",
        "volumeBindingMode": "WaitForFirstConsumer"}, ns="")
    assert sc["reclaimPolicy"] == "Delete" and "namespace" not in sc["metadata"]
    assert create(store, PVC, dict(claim, metadata={"name": "d"}))["spec"]["storageClassName"] == "lab-local"
    explicit = copy.deepcopy(claim)
    explicit["metadata"]["name"] = "e"
    explicit["spec"]["storageClassName"] = ""
    assert create(store, PVC, explicit)["spec"]["storageClassName"] == ""  # "" means no class, as upstream


# ---------------------------------------------------------------------------- validation texts


def test_probe_without_handler(store: Store) -> None:
    e = refused(create, store, PODS, pod("x", containers=[{"name": "c", "image": "i", "readinessProbe": {
        "periodSeconds": 5}}]))
    assert e.code == 422 and e.reason == "Invalid"
    assert e.message == ('Pod "x" is invalid: spec.containers[0].readinessProbe: Required value: must specify a '
                         "handler type")
    assert e.details is not None and e.details["causes"] == [{
        "reason": "FieldValueRequired", "message": "Required value: must specify a handler type",
        "field": "spec.containers[0].readinessProbe"}]
    e = refused(create, store, PODS, pod("y", containers=[{"name": "c", "image": "i", "livenessProbe": {
        "exec": {"command": ["true"]}, "httpGet": {"port": 80}}}]))
    assert e.message == ('Pod "y" is invalid: spec.containers[0].livenessProbe.httpGet: Forbidden: may not specify '
                         "more than 1 handler type")


def test_volume_sources(store: Store) -> None:
    e = refused(create, store, PODS, pod("v", volumes=[{"name": "a", "configMap": {}, "secret": {"secretName": "s"}}]))
    # upstream checks the sources in its fixed order: secret comes first, configMap is the extra one
    assert e.message == ('Pod "v" is invalid: spec.volumes[0].configMap: Forbidden: may not specify more than 1 volume '
                         "type")
    e = refused(create, store, PODS, pod("n", volumes=[{"name": "a", "persistentVolumeClaim": {}}]))
    assert e.message == 'Pod "n" is invalid: spec.volumes[0].persistentVolumeClaim.claimName: Required value'

    e = refused(create, store, PODS, pod("w", volumes=[{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}],
                                         containers=[{"name": "c", "image": "i", "volumeMounts": [
                                             {"name": "b", "mountPath": "/b"}]}]))
    assert e.message == ('Pod "w" is invalid: [spec.volumes[1].name: Duplicate value: "a", '
                         'spec.containers[0].volumeMounts[0].name: Not found: "b"]')
    # a volume naming no source is defaulted to emptyDir before validation; validation's own rule
    # shows when defaulting is bypassed (a template validated as such)
    causes = validation.pod_spec({"containers": [{"name": "c", "image": "i"}], "volumes": [{"name": "a"}]}, "spec")
    assert causes == [("FieldValueRequired", "spec.volumes[0]", "Required value: must specify a volume type")]


def test_container_checks(store: Store) -> None:
    e = refused(create, store, PODS, pod("c", restartPolicy="Sometimes", containers=[
        {"name": "Web_1", "image": "i", "ports": [{"containerPort": 70000, "protocol": "ICMP"}],
         "env": [{"name": "A=B", "value": "1"}],
         "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}},
        {"name": "side"}]))
    assert e.details is not None
    got = [(c["field"], c["message"]) for c in e.details["causes"]]
    assert got == [
        ("spec.containers[0].name", 'Invalid value: "Web_1": ' + validation.DNS1123_LABEL_MSG),
        ("spec.containers[0].ports[0].containerPort", "Invalid value: 70000: must be between 1 and 65535, inclusive"),
        ("spec.containers[0].ports[0].protocol", 'Unsupported value: "ICMP": supported values: "SCTP", "TCP", "UDP"'),
        ("spec.containers[0].env[0].name", 'Invalid value: "A=B": a valid environment variable name must consist '
                                           "only of printable ASCII characters other than '='"),
        ("spec.containers[0].resources.requests", 'Invalid value: "2": must be less than or equal to cpu limit of 1'),
        ("spec.containers[1].image", "Required value"),
        ("spec.restartPolicy", 'Unsupported value: "Sometimes": supported values: "Always", "OnFailure", "Never"'),
    ]
    e = refused(create, store, PODS, pod("d", containers=[]))
    assert e.message == 'Pod "d" is invalid: spec.containers: Required value'
    e = refused(create, store, PODS, pod("q", containers=[{"name": "c", "image": "i", "resources": {
        "limits": {"memory": "lots"}}}]))
    assert e.code == 400 and "quantities must match the regular expression" in e.message


def test_template_selector_and_restart_policy(store: Store) -> None:
    e = refused(create, store, DEPLOY, {"metadata": {"name": "web"}, "spec": {
        "selector": {"matchLabels": {"app": "web"}}, "template": template({"app": "other"})}})
    assert e.message == ('Deployment.apps "web" is invalid: spec.template.metadata.labels: Invalid value: '
                         'map[string]string{"app":"other"}: `selector` does not match template `labels`')
    e = refused(create, store, DEPLOY, {"metadata": {"name": "web"}, "spec": {"template": template({"app": "x"})}})
    assert e.message == 'Deployment.apps "web" is invalid: spec.selector: Required value'
    e = refused(create, store, STS, {"metadata": {"name": "s"}, "spec": {
        "selector": {"matchLabels": {"app": "s"}}, "template": template({"app": "s"}, restartPolicy="Never")}})
    assert e.message == ('StatefulSet.apps "s" is invalid: spec.template.spec.restartPolicy: Unsupported value: '
                         '"Never": supported values: "Always"')
    e = refused(create, store, JOB, {"metadata": {"name": "j"}, "spec": {"template": template({})}})
    assert e.message == ('Job.batch "j" is invalid: spec.template.spec.restartPolicy: Unsupported value: "Always": '
                         'supported values: "OnFailure", "Never"')
    e = refused(create, store, DEPLOY, {"metadata": {"name": "p"}, "spec": {
        "selector": {"matchLabels": {"app": "p"}}, "template": template({"app": "p"}, containers=[
            {"name": "c", "image": "i", "readinessProbe": {}}])}})
    assert e.message == ('Deployment.apps "p" is invalid: spec.template.spec.containers[0].readinessProbe: '
                         "Required value: must specify a handler type")


def test_service_and_pvc_checks(store: Store) -> None:
    e = refused(create, store, SVC, {"metadata": {"name": "s"}, "spec": {"type": "Magic", "ports": [
        {"port": 80}, {"name": "b", "port": 0}]}})
    assert e.details is not None
    assert [(c["field"], c["message"]) for c in e.details["causes"]] == [
        ("spec.type", 'Unsupported value: "Magic": supported values: "ClusterIP", "ExternalName", "LoadBalancer", '
                      '"NodePort"'),
        ("spec.ports[0].name", "Required value"),
        ("spec.ports[1].port", "Invalid value: 0: must be between 1 and 65535, inclusive"),
        # targetPort defaults to port, so it is out of range too (as upstream reports it)
        ("spec.ports[1].targetPort", "Invalid value: 0: must be between 1 and 65535, inclusive"),
    ]
    e = refused(create, store, SVC, {"metadata": {"name": "t"}, "spec": {}})
    assert e.message == 'Service "t" is invalid: spec.ports: Required value'
    e = refused(create, store, SVC, {"metadata": {"name": "u"}, "spec": {"ports": [{"port": 80, "nodePort": 30001}]}})
    assert e.message == ("Service \"u\" is invalid: spec.ports[0].nodePort: Forbidden: may not be used when `type` "
                         "is 'ClusterIP'")
    e = refused(create, store, PVC, {"metadata": {"name": "c"}, "spec": {"accessModes": ["ReadWriteSometimes"]}})
    assert e.message == ('PersistentVolumeClaim "c" is invalid: [spec.accessModes: Unsupported value: '
                         '"ReadWriteSometimes": supported values: "ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce", '
                         '"ReadWriteOncePod", spec.resources[storage]: Required value]')
    e = refused(create, store, PVC, {"metadata": {"name": "c"}, "spec": {"resources": {"requests": {
        "storage": "1Gi"}}}})
    assert e.message == ('PersistentVolumeClaim "c" is invalid: spec.accessModes: Required value: at least 1 access '
                         "mode is required")


def test_endpointslice_checks(store: Store) -> None:
    """ValidateEndpointSlice: an address type, addresses of that type, DNS-label hostnames and
    port names, unique port names; the address type cannot change."""
    e = refused(create, store, EPS, {"metadata": {"name": "s"}, "addressType": "Bogus",
                                     "endpoints": [{"addresses": ["10.0.0.1"]}]})
    assert e.message == ('EndpointSlice.discovery.k8s.io "s" is invalid: addressType: Unsupported value: "Bogus": '
                         'supported values: "FQDN", "IPv4", "IPv6"')
    e = refused(create, store, EPS, {"metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": [
        {"addresses": ["10.0.0.1", "fd00::1"], "hostname": "Web_0"}, {"addresses": []}],
        "ports": [{"name": "http", "port": 80}, {"name": "http", "port": 70000, "protocol": "ICMP"}]})
    assert e.details is not None
    assert [(c["field"], c["message"]) for c in e.details["causes"]] == [
        ("endpoints[0].addresses[1]", 'Invalid value: "fd00::1": must be a valid IPv4 address'),
        ("endpoints[0].hostname", 'Invalid value: "Web_0": ' + validation.DNS1123_LABEL_MSG),
        ("endpoints[1].addresses", "Required value: must contain at least 1 address"),
        ("ports[1].name", 'Duplicate value: "http"'),
        ("ports[1].protocol", 'Unsupported value: "ICMP": supported values: "SCTP", "TCP", "UDP"'),
        ("ports[1].port", "Invalid value: 70000: must be between 1 and 65535, inclusive"),
    ]
    ok = create(store, EPS, {"metadata": {"name": "v6"}, "addressType": "IPv6",
                             "endpoints": [{"addresses": ["fd00::1"], "conditions": {"ready": True}}],
                             "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})
    e = refused(update, store, EPS, {**ok, "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"]}]})
    assert "addressType: Invalid value: \"IPv4\": field is immutable" in e.message


# ---------------------------------------------------------------------------- immutability


def test_pod_update_rules(store: Store) -> None:
    got = create(store, PODS, pod("p", containers=[{"name": "c", "image": "a:1", "env": [{"name": "X",
                                                                                          "value": "1"}]}]))
    newer = copy.deepcopy(got)
    newer["spec"]["containers"][0]["image"] = "a:2"
    newer["spec"]["activeDeadlineSeconds"] = 60
    newer["spec"]["tolerations"].append({"key": "k", "operator": "Exists"})
    got = update(store, PODS, newer)
    assert got["spec"]["containers"][0]["image"] == "a:2"
    bad = copy.deepcopy(got)
    bad["spec"]["containers"][0]["env"][0]["value"] = "2"
    e = refused(update, store, PODS, bad)
    assert e.code == 422 and e.message.startswith('Pod "p" is invalid: spec: Forbidden: ' + validation.POD_UPDATE_MSG)
    bad = copy.deepcopy(got)
    bad["spec"]["tolerations"] = []
    assert refused(update, store, PODS, bad).code == 422  # removing tolerations is not allowed


def test_workload_update_rules(store: Store) -> None:
    d = create(store, DEPLOY, {"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"app": "d"}},
                                                                   "template": template({"app": "d"})}})
    d2 = copy.deepcopy(d)
    d2["spec"]["selector"] = {"matchLabels": {"app": "d", "tier": "x"}}
    d2["spec"]["template"]["metadata"]["labels"]["tier"] = "x"
    e = refused(update, store, DEPLOY, d2)
    assert e.message == ('Deployment.apps "d" is invalid: spec.selector: Invalid value: '
                         '{"matchLabels":{"app":"d","tier":"x"}}: field is immutable')
    s = create(store, STS, {"metadata": {"name": "s"}, "spec": {
        "selector": {"matchLabels": {"app": "s"}}, "serviceName": "s", "template": template({"app": "s"})}})
    s2 = copy.deepcopy(s)
    s2["spec"]["replicas"] = 3
    assert update(store, STS, s2)["spec"]["replicas"] == 3
    s3 = copy.deepcopy(s2)
    s3["spec"]["serviceName"] = "other"
    s3["metadata"].pop("resourceVersion")
    e = refused(update, store, STS, s3)
    assert e.message == 'StatefulSet.apps "s" is invalid: spec: Forbidden: ' + validation.STATEFULSET_UPDATE_MSG
    j = create(store, JOB, {"metadata": {"name": "j"}, "spec": {"template": template({}, restartPolicy="Never")}})
    j2 = copy.deepcopy(j)
    j2["spec"]["template"]["spec"]["containers"][0]["image"] = "other"
    e = refused(update, store, JOB, j2)
    assert e.message.startswith('Job.batch "j" is invalid: spec.template: Invalid value: ')
    assert e.message.endswith(": field is immutable")
    j3 = copy.deepcopy(j)
    j3["spec"]["suspend"] = True
    assert update(store, JOB, j3)["spec"]["suspend"] is True


def test_pvc_update_rules(store: Store) -> None:
    # Growth needs a class that allows expansion (the resize admission plugin); see below for one that does not.
    create(store, SC, {"metadata": {"name": "grow"}, "provisioner": "x", "allowVolumeExpansion": True}, ns="")
    create(store, SC, {"metadata": {"name": "fixed"}, "provisioner": "x"}, ns="")
    c = create(store, PVC, {"metadata": {"name": "c"}, "spec": {"accessModes": ["ReadWriteOnce"],
                                                                "storageClassName": "grow",
                                                                "resources": {"requests": {"storage": "1Gi"}}}})
    c2 = copy.deepcopy(c)
    c2["spec"]["resources"]["requests"]["storage"] = "2Gi"
    e = refused(update, store, PVC, c2)
    assert e.message == 'PersistentVolumeClaim "c" is invalid: spec: Forbidden: ' + validation.PVC_UPDATE_MSG
    rt = store.registry.get(PVC)
    assert rt is not None
    bound = store.update(rt, "default", "c", dict(c, status={"phase": "Bound"}), subresource="status")
    b2 = copy.deepcopy(bound)
    b2["spec"]["resources"]["requests"]["storage"] = "2Gi"
    b2["spec"]["volumeName"] = "pv-1"
    assert update(store, PVC, b2)["spec"]["resources"]["requests"]["storage"] == "2Gi"
    b3 = copy.deepcopy(store.get(rt, "default", "c"))
    b3["spec"]["resources"]["requests"]["storage"] = "1Gi"
    e = refused(update, store, PVC, b3)
    assert e.message == ('PersistentVolumeClaim "c" is invalid: spec.resources.requests.storage: Forbidden: field '
                         "can not be less than previous value")
    f = create(store, PVC, {"metadata": {"name": "f"}, "spec": {"accessModes": ["ReadWriteOnce"],
                                                                "storageClassName": "fixed",
                                                                "resources": {"requests": {"storage": "1Gi"}}}})
    bound = store.update(rt, "default", "f", dict(f, status={"phase": "Bound"}), subresource="status")
    f2 = copy.deepcopy(bound)
    f2["spec"]["resources"]["requests"]["storage"] = "2Gi"
    e = refused(update, store, PVC, f2)
    assert e.code == 403 and "must support resize" in e.message


# ---------------------------------------------------------------------------- helpers


def test_selector_string_and_quantities() -> None:
    sel = {"matchLabels": {"b": "2", "a": "1"}, "matchExpressions": [
        {"key": "c", "operator": "In", "values": ["y", "x"]}, {"key": "d", "operator": "DoesNotExist"}]}
    assert validation.selector_string(sel) == "a=1,b=2,c in (x,y),!d"
    assert validation.selector_matches(sel, {"a": "1", "b": "2", "c": "x"})
    assert not validation.selector_matches(sel, {"a": "1", "b": "2", "c": "x", "d": ""})
    q = validation.parse_quantity
    assert q("500m") * 2 == q("1") and q("1Gi") == q("1024Mi") and q("1e3") == q("1k")
    with pytest.raises(validation.QuantityError):
        q("1 GB")
    assert defaults.image_pull_policy("nginx:latest") == "Always"
    assert defaults.image_pull_policy("localhost:5000/nginx") == "Always"
    assert defaults.image_pull_policy("localhost:5000/nginx:1") == "IfNotPresent"


def test_node_ports_shared_by_port_number(store: Store) -> None:
    """TCP and UDP of one port number get one nodePort (upstream's initNodePorts)."""
    dns = create(store, SVC, {"metadata": {"name": "dns"}, "spec": {"type": "NodePort", "ports": [
        {"name": "tcp", "port": 53, "protocol": "TCP"}, {"name": "udp", "port": 53, "protocol": "UDP"},
        {"name": "other", "port": 54}]}})
    assert [p["nodePort"] for p in dns["spec"]["ports"]] == [30000, 30000, 30001]
    e = refused(create, store, SVC, {"metadata": {"name": "twice"}, "spec": {"type": "NodePort", "ports": [
        {"name": "a", "port": 80, "nodePort": 30100}, {"name": "b", "port": 81, "nodePort": 30100}]}})
    assert e.message == ('Service "twice" is invalid: spec.ports[1].nodePort: Invalid value: 30100: provided port '
                         "is already allocated")
    rt = store.registry.get(SVC)
    assert rt is not None
    store.delete(rt, "default", "dns", DeleteOptions())
    assert create(store, SVC, {"metadata": {"name": "again"}, "spec": {"type": "NodePort", "ports": [
        {"port": 80}]}})["spec"]["ports"][0]["nodePort"] == 30000  # released with its Service


def test_service_families_the_cluster_cannot_give() -> None:
    single = Store(Registry(), ("10.96.0.0/24",))
    e = refused(create, single, SVC, {"metadata": {"name": "d"}, "spec": {
        "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"], "ports": [{"port": 80}]}})
    assert e.message == ('Service "d" is invalid: [spec.ipFamilyPolicy: Invalid value: "RequireDualStack": this '
                         'cluster is not configured for dual-stack services, spec.ipFamilies[1]: Invalid value: '
                         '"IPv6": not configured on this cluster]')
    prefer = create(single, SVC, {"metadata": {"name": "p"}, "spec": {"ipFamilyPolicy": "PreferDualStack",
                                                                     "ports": [{"port": 80}]}})
    assert prefer["spec"]["ipFamilies"] == ["IPv4"] and len(prefer["spec"]["clusterIPs"]) == 1
    dual = Store(Registry(), ("fd00:96::/112", "10.96.0.0/24"))
    v6first = create(dual, SVC, {"metadata": {"name": "r"}, "spec": {
        "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4"], "ports": [{"port": 80}]}})
    assert v6first["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    headless = create(dual, SVC, {"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}})
    assert headless["spec"]["ipFamilies"] == ["IPv6"] and headless["spec"]["clusterIPs"] == ["None"]
