"""Defaulting of built-in kinds, as kube-apiserver applies it when it decodes a request body.

Upstream fills unset fields in ``SetDefaults_*`` functions (``pkg/apis/core/v1/defaults.go``,
``pkg/apis/apps/v1/defaults.go``, ``pkg/apis/batch/v1/defaults.go``, ``storage/v1``) on every
create *and* update, before admission and validation. Controllers, kubelets and ``kubectl`` read
the defaulted object (a Deployment's ``strategy``, a probe's ``periodSeconds``, a Service's
``ipFamilies``), so these values are part of the API, not cosmetics.

Order, per object: the kind's own defaults (:func:`apply`), then for pod templates the pod spec
defaults (:func:`pod_spec`), for StatefulSet claim templates the PVC defaults. Every function
only fills what is absent, so applying it to an already defaulted object changes nothing (an
update that re-sends the stored object stays a no-op). What needs other objects (the default
ServiceAccount's token volume, the default StorageClass, ClusterIPs, nodePorts) is admission's
and the store's work: :mod:`kubeemu.admission` and :mod:`kubeemu.store`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kubeemu import validation
from kubeemu.objects import Obj, metadata_of

_log = logging.getLogger(__name__)

Defaulter = Callable[[Obj], None]


def _d(obj: dict[str, Any], key: str) -> dict[str, Any]:
    """The dict at ``obj[key]``, created (and set) when absent or null."""
    v = obj.get(key)
    if not isinstance(v, dict):
        v = {}
        obj[key] = v
    return v


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The dict items of a list field (anything else is validation's to report)."""
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def image_pull_policy(image: str) -> str:
    """``Always`` for ``:latest`` or no tag (and no digest), else ``IfNotPresent`` (SetDefaults_Container)."""
    ref = image.split("@", 1)
    if len(ref) == 2:
        return "IfNotPresent"  # a digest pins the image
    last = ref[0].rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else "latest"
    return "Always" if tag == "latest" else "IfNotPresent"


def _probe(p: dict[str, Any]) -> None:
    """SetDefaults_Probe plus the handler defaults (HTTPGetAction: path ``/``, scheme HTTP)."""
    p.setdefault("timeoutSeconds", 1)
    p.setdefault("periodSeconds", 10)
    p.setdefault("successThreshold", 1)
    p.setdefault("failureThreshold", 3)
    _handler(p)


def _handler(h: dict[str, Any]) -> None:
    get = h.get("httpGet")
    if isinstance(get, dict):
        get.setdefault("path", "/")
        get.setdefault("scheme", "HTTP")


def _container(c: dict[str, Any], host_network: bool) -> None:
    """SetDefaults_Container, SetDefaults_ContainerPort, probes and lifecycle handlers."""
    if isinstance(c.get("image"), str) and c["image"]:
        c.setdefault("imagePullPolicy", image_pull_policy(c["image"]))
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    c.setdefault("resources", {})
    for port in _dicts(c.get("ports")):
        port.setdefault("protocol", "TCP")
        if host_network and "containerPort" in port:
            port.setdefault("hostPort", port["containerPort"])
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        if isinstance(c.get(kind), dict):
            _probe(c[kind])
    life = c.get("lifecycle")
    if isinstance(life, dict):
        for hook in ("postStart", "preStop"):
            if isinstance(life.get(hook), dict):
                _handler(life[hook])
    for ev in _dicts(c.get("env")):
        fr = (ev.get("valueFrom") or {}).get("fieldRef") if isinstance(ev.get("valueFrom"), dict) else None
        if isinstance(fr, dict):
            fr.setdefault("apiVersion", "v1")


def _volume(v: dict[str, Any]) -> None:
    """SetDefaults_Volume: a volume naming no source is an emptyDir; sources' own defaults."""
    sources = [k for k in v if k != "name"]
    if not sources:
        v["emptyDir"] = {}
    for k in ("configMap", "secret"):
        if isinstance(v.get(k), dict):
            v[k].setdefault("defaultMode", 420)
    if isinstance(v.get("projected"), dict):
        v["projected"].setdefault("defaultMode", 420)
        for src in _dicts(v["projected"].get("sources")):
            sat = src.get("serviceAccountToken")
            if isinstance(sat, dict):
                sat.setdefault("expirationSeconds", 3600)
            for item in _dicts((src.get("downwardAPI") or {}).get("items")):
                if isinstance(item.get("fieldRef"), dict):
                    item["fieldRef"].setdefault("apiVersion", "v1")
    if isinstance(v.get("downwardAPI"), dict):
        v["downwardAPI"].setdefault("defaultMode", 420)
        for item in _dicts(v["downwardAPI"].get("items")):
            if isinstance(item.get("fieldRef"), dict):
                item["fieldRef"].setdefault("apiVersion", "v1")
    hp = v.get("hostPath")
    if isinstance(hp, dict):
        hp.setdefault("type", "")


def pod_spec(spec: dict[str, Any]) -> None:
    """SetDefaults_PodSpec and everything under it (containers, init containers, volumes)."""
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    if spec.get("serviceAccount") and not spec.get("serviceAccountName"):
        spec["serviceAccountName"] = spec["serviceAccount"]  # the deprecated alias, as upstream
    host = spec.get("hostNetwork") is True
    for key in ("initContainers", "containers"):
        for c in _dicts(spec.get(key)):
            _container(c, host)
    for v in _dicts(spec.get("volumes")):
        _volume(v)


def pod_template(tmpl: Any) -> None:
    """A PodTemplateSpec: the pod spec defaults (the template's metadata is left as written)."""
    if isinstance(tmpl, dict):
        pod_spec(_d(tmpl, "spec"))


def _pod(obj: Obj) -> None:
    """SetDefaults_Pod: the spec's defaults, and requests default to limits (pods only: a
    template keeps what was written, its pods get the requests)."""
    pod_spec(_d(obj, "spec"))
    spec = obj["spec"]
    for key in ("initContainers", "containers"):
        for c in _dicts(spec.get(key)):
            res = c.get("resources")
            lim = res.get("limits") if isinstance(res, dict) else None
            if isinstance(res, dict) and isinstance(lim, dict) and lim:
                req = _d(res, "requests")
                for k, v in lim.items():
                    req.setdefault(k, v)
    # Upstream's Priority admission plugin: no PriorityClass named, no default class -> 0.
    spec.setdefault("priority", 0)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")


def _same_quantity(a: Any, b: Any) -> bool:
    try:
        return validation.parse_quantity(a) == validation.parse_quantity(b)
    except validation.QuantityError:
        return False


def qos_class(spec: dict[str, Any]) -> str:
    """The pod's QoS class (upstream GetPodQOS): Guaranteed when every container limits cpu and
    memory with requests equal to limits, BestEffort when none asks for either, else Burstable."""
    requests_seen = False
    guaranteed = True
    for key in ("initContainers", "containers"):
        for c in _dicts(spec.get(key)):
            res = _d(c, "resources") if isinstance(c.get("resources"), dict) else {}
            req = res.get("requests") if isinstance(res.get("requests"), dict) else {}
            lim = res.get("limits") if isinstance(res.get("limits"), dict) else {}
            assert isinstance(req, dict) and isinstance(lim, dict)
            for r in ("cpu", "memory"):
                if r in req or r in lim:
                    requests_seen = True
                if r not in lim or not _same_quantity(req.get(r, lim[r]), lim[r]):
                    guaranteed = False
    if not requests_seen:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def _replicas(spec: dict[str, Any]) -> None:
    spec.setdefault("replicas", 1)


def _deployment(obj: Obj) -> None:
    """apps/v1 SetDefaults_Deployment."""
    spec = _d(obj, "spec")
    _replicas(spec)
    strategy = _d(spec, "strategy")
    strategy.setdefault("type", "RollingUpdate")
    if strategy["type"] == "RollingUpdate":
        ru = _d(strategy, "rollingUpdate")
        ru.setdefault("maxUnavailable", "25%")
        ru.setdefault("maxSurge", "25%")
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    pod_template(spec.get("template"))


def _replicaset(obj: Obj) -> None:
    spec = _d(obj, "spec")
    _replicas(spec)
    pod_template(spec.get("template"))


def _statefulset(obj: Obj) -> None:
    """apps/v1 SetDefaults_StatefulSet; claim templates get the PVC defaults."""
    spec = _d(obj, "spec")
    spec.setdefault("podManagementPolicy", "OrderedReady")
    strategy = _d(spec, "updateStrategy")
    strategy.setdefault("type", "RollingUpdate")
    if strategy["type"] == "RollingUpdate":
        _d(strategy, "rollingUpdate").setdefault("partition", 0)
    retention = _d(spec, "persistentVolumeClaimRetentionPolicy")
    retention.setdefault("whenDeleted", "Retain")
    retention.setdefault("whenScaled", "Retain")
    _replicas(spec)
    spec.setdefault("revisionHistoryLimit", 10)
    pod_template(spec.get("template"))
    for claim in _dicts(spec.get("volumeClaimTemplates")):
        claim.setdefault("apiVersion", "v1")
        claim.setdefault("kind", "PersistentVolumeClaim")
        _pvc_spec(_d(claim, "spec"))
        claim.setdefault("status", {"phase": "Pending"})


def _daemonset(obj: Obj) -> None:
    """apps/v1 SetDefaults_DaemonSet."""
    spec = _d(obj, "spec")
    strategy = _d(spec, "updateStrategy")
    strategy.setdefault("type", "RollingUpdate")
    if strategy["type"] == "RollingUpdate":
        ru = _d(strategy, "rollingUpdate")
        ru.setdefault("maxUnavailable", 1)
        ru.setdefault("maxSurge", 0)
    spec.setdefault("revisionHistoryLimit", 10)
    pod_template(spec.get("template"))


def job_spec(spec: dict[str, Any], meta: dict[str, Any] | None) -> None:
    """batch/v1 SetDefaults_Job (``meta``: the Job's metadata, whose labels default to the template's)."""
    if "completions" not in spec and "parallelism" not in spec:
        spec["completions"] = 1
    spec.setdefault("parallelism", 1)
    if "backoffLimit" not in spec:
        spec["backoffLimit"] = 2147483647 if spec.get("backoffLimitPerIndex") is not None else 6
    tmpl = spec.get("template")
    labels = (metadata_of(tmpl).get("labels") if isinstance(tmpl, dict) else None) or None
    if meta is not None and labels and not meta.get("labels"):
        meta["labels"] = dict(labels)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
    pod_template(tmpl)


def _job(obj: Obj) -> None:
    job_spec(_d(obj, "spec"), _d(obj, "metadata"))


def _cronjob(obj: Obj) -> None:
    """batch/v1 SetDefaults_CronJob; the job template gets the Job defaults."""
    spec = _d(obj, "spec")
    spec.setdefault("concurrencyPolicy", "Allow")
    spec.setdefault("suspend", False)
    spec.setdefault("successfulJobsHistoryLimit", 3)
    spec.setdefault("failedJobsHistoryLimit", 1)
    jt = spec.get("jobTemplate")
    if isinstance(jt, dict):
        job_spec(_d(jt, "spec"), None)


def _service(obj: Obj) -> None:
    """SetDefaults_Service. ClusterIPs, ipFamilies and nodePorts are allocated by the store."""
    spec = _d(obj, "spec")
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("type", "ClusterIP")
    for p in _dicts(spec.get("ports")):
        p.setdefault("protocol", "TCP")
        if p.get("targetPort") in (None, 0, "") and "port" in p:
            p["targetPort"] = p["port"]
    stype = spec["type"]
    if stype in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    if stype != "ExternalName":
        spec.setdefault("internalTrafficPolicy", "Cluster")
    if stype == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)
    if spec["sessionAffinity"] == "ClientIP":
        cfg = _d(_d(spec, "sessionAffinityConfig"), "clientIP")
        cfg.setdefault("timeoutSeconds", 10800)


def _pvc_spec(spec: dict[str, Any]) -> None:
    spec.setdefault("volumeMode", "Filesystem")


def _pvc(obj: Obj) -> None:
    _pvc_spec(_d(obj, "spec"))


def _pv(obj: Obj) -> None:
    spec = _d(obj, "spec")
    spec.setdefault("persistentVolumeReclaimPolicy", "Retain")
    spec.setdefault("volumeMode", "Filesystem")


def _storageclass(obj: Obj) -> None:
    """storage/v1 SetDefaults_StorageClass."""
    obj.setdefault("reclaimPolicy", "Delete")
    obj.setdefault("volumeBindingMode", "Immediate")


def _secret(obj: Obj) -> None:
    obj.setdefault("type", "Opaque")


_BY_KEY: dict[tuple[str, str], Defaulter] = {
    ("", "pods"): _pod,
    ("", "services"): _service,
    ("", "secrets"): _secret,
    ("", "persistentvolumeclaims"): _pvc,
    ("", "persistentvolumes"): _pv,
    ("", "podtemplates"): lambda o: pod_template(o.get("template")),
    ("", "replicationcontrollers"): _replicaset,
    ("apps", "deployments"): _deployment,
    ("apps", "replicasets"): _replicaset,
    ("apps", "statefulsets"): _statefulset,
    ("apps", "daemonsets"): _daemonset,
    ("batch", "jobs"): _job,
    ("batch", "cronjobs"): _cronjob,
    ("storage.k8s.io", "storageclasses"): _storageclass,
}


def apply(key: tuple[str, str], obj: Obj) -> None:
    """Fill the unset fields of a built-in object of kind ``key`` (group, plural), in place."""
    fn = _BY_KEY.get(key)
    if fn is not None:
        fn(obj)


__all__ = ["apply", "image_pull_policy", "job_spec", "pod_spec", "pod_template", "qos_class"]
