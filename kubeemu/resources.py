"""The resource types one emulated cluster serves: built-ins plus CRD-registered kinds.

A ``ResourceType`` is what discovery advertises and what the URL router resolves: group,
served versions, plural, kind, scope and subresources. Objects are stored once per
(group, plural), whatever version they were written with; reading through another served
version only rewrites ``apiVersion`` (CRD conversion strategy ``None``, as upstream).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

_log = logging.getLogger(__name__)

_COMMON_FIELDS = frozenset({"metadata.name", "metadata.namespace"})
_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass
class ResourceType:
    """One served resource. ``status`` is True when it has a status subresource (the split)."""

    group: str
    versions: tuple[str, ...]
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status: bool = False
    generation: bool = False
    builtin: bool = True
    extra_subresources: tuple[str, ...] = ()
    field_labels: frozenset[str] = field(default_factory=frozenset)
    # per-version status subresource for CRDs (version -> has status)
    version_status: dict[str, bool] = field(default_factory=dict)
    # per-version scale subresource for CRDs: version -> (specReplicasPath, statusReplicasPath,
    # labelSelectorPath); built-ins with "scale" use spec.replicas/status.replicas/spec.selector
    scale_paths: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.singular:
            self.singular = self.kind.lower()
        self.field_labels = self.field_labels | _COMMON_FIELDS

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    def api_version(self, version: str | None = None) -> str:
        v = version or self.versions[0]
        return f"{self.group}/{v}" if self.group else v

    def has_status(self, version: str) -> bool:
        return self.version_status.get(version, self.status)

    def describe(self, version: str) -> list[dict[str, object]]:
        """APIResource entries for discovery: the resource and its subresources."""
        main: dict[str, object] = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(_VERBS),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        out: list[dict[str, object]] = [main]
        if self.has_status(version):
            out.append(
                {"name": f"{self.plural}/status", "singularName": "", "namespaced": self.namespaced,
                 "kind": self.kind, "verbs": ["get", "patch", "update"]}
            )
        for sub in self.extra_subresources:
            if sub == "scale" and not self.builtin and version not in self.scale_paths:
                continue
            group, gversion, kind, verbs = SUBRESOURCES.get(sub, ("", "", "", ("update",)))
            entry: dict[str, object] = {"name": f"{self.plural}/{sub}", "singularName": "",
                                        "namespaced": self.namespaced}
            if group:
                entry["group"], entry["version"] = group, gversion
            entry["kind"] = kind or self.kind
            entry["verbs"] = list(verbs)
            out.append(entry)
        return out

    def has_scale(self, version: str) -> bool:
        """Does this version serve ``/scale`` (built-ins: always when listed; CRDs: per version)?"""
        return "scale" in self.extra_subresources and (self.builtin or version in self.scale_paths)

    def scale_paths_of(self, version: str) -> tuple[str, str, str]:
        """(specReplicasPath, statusReplicasPath, labelSelectorPath) of the ``/scale`` subresource."""
        return self.scale_paths.get(version, (".spec.replicas", ".status.replicas", ""))


#: Subresources other than status: name -> (group, version, kind, verbs) as discovery lists them
#: (an empty group/version: the parent's; an empty kind: the parent's kind).
SUBRESOURCES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "binding": ("", "", "Binding", ("create",)),
    "eviction": ("policy", "v1", "Eviction", ("create",)),
    "scale": ("autoscaling", "v1", "Scale", ("get", "patch", "update")),
    "token": ("authentication.k8s.io", "v1", "TokenRequest", ("create",)),
    "finalize": ("", "", "", ("update",)),
    "log": ("", "", "Pod", ("get",)),
    "exec": ("", "", "PodExecOptions", ("create", "get")),
}


def builtin_types() -> list[ResourceType]:
    """The built-in kinds (issue 8's list, plus ReplicaSet/StatefulSet as stored objects)."""
    pod_fields = frozenset({
        "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
        "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName",
    })
    ev_fields = frozenset({
        "involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
        "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
        "reason", "reportingComponent", "source", "type",
    })
    return [
        ResourceType("", ("v1",), "namespaces", "Namespace", False, short_names=("ns",), status=True,
                     extra_subresources=("finalize",), field_labels=frozenset({"status.phase"})),
        ResourceType("", ("v1",), "nodes", "Node", False, short_names=("no",), status=True,
                     field_labels=frozenset({"spec.unschedulable"})),
        ResourceType("", ("v1",), "pods", "Pod", True, short_names=("po",), categories=("all",), status=True,
                     extra_subresources=("binding", "eviction"), field_labels=pod_fields),
        ResourceType("", ("v1",), "services", "Service", True, short_names=("svc",), categories=("all",),
                     status=True),
        ResourceType("", ("v1",), "endpoints", "Endpoints", True, singular="endpoints", short_names=("ep",)),
        ResourceType("", ("v1",), "configmaps", "ConfigMap", True, short_names=("cm",)),
        ResourceType("", ("v1",), "secrets", "Secret", True, field_labels=frozenset({"type"})),
        ResourceType("", ("v1",), "serviceaccounts", "ServiceAccount", True, short_names=("sa",),
                     extra_subresources=("token",)),
        ResourceType("", ("v1",), "persistentvolumeclaims", "PersistentVolumeClaim", True, short_names=("pvc",),
                     status=True),
        ResourceType("", ("v1",), "persistentvolumes", "PersistentVolume", False, short_names=("pv",), status=True),
        ResourceType("", ("v1",), "events", "Event", True, short_names=("ev",), field_labels=ev_fields),
        ResourceType("coordination.k8s.io", ("v1",), "leases", "Lease", True),
        ResourceType("discovery.k8s.io", ("v1",), "endpointslices", "EndpointSlice", True,
                     field_labels=frozenset({"addressType"})),
        ResourceType("apps", ("v1",), "deployments", "Deployment", True, short_names=("deploy",),
                     categories=("all",), status=True, generation=True, extra_subresources=("scale",)),
        ResourceType("apps", ("v1",), "daemonsets", "DaemonSet", True, short_names=("ds",), categories=("all",),
                     status=True, generation=True),
        ResourceType("apps", ("v1",), "replicasets", "ReplicaSet", True, short_names=("rs",), categories=("all",),
                     status=True, generation=True, extra_subresources=("scale",)),
        ResourceType("apps", ("v1",), "statefulsets", "StatefulSet", True, short_names=("sts",),
                     categories=("all",), status=True, generation=True, extra_subresources=("scale",)),
        ResourceType("apps", ("v1",), "controllerrevisions", "ControllerRevision", True),
        ResourceType("batch", ("v1",), "jobs", "Job", True, categories=("all",), status=True, generation=True),
        ResourceType("batch", ("v1",), "cronjobs", "CronJob", True, short_names=("cj",), categories=("all",),
                     status=True, generation=True),
        ResourceType("storage.k8s.io", ("v1",), "storageclasses", "StorageClass", False, short_names=("sc",)),
        ResourceType("storage.k8s.io", ("v1",), "csinodes", "CSINode", False),
        ResourceType("storage.k8s.io", ("v1",), "volumeattachments", "VolumeAttachment", False, status=True),
        ResourceType("apiextensions.k8s.io", ("v1",), "customresourcedefinitions", "CustomResourceDefinition",
                     False, short_names=("crd", "crds"), status=True, generation=True),
        # Stored, not enforced: the emulator authorizes every request. Served so that manifests
        # with RBAC, disruption budgets and ServiceCIDRs load as they would into a real cluster.
        ResourceType("rbac.authorization.k8s.io", ("v1",), "clusterroles", "ClusterRole", False),
        ResourceType("rbac.authorization.k8s.io", ("v1",), "clusterrolebindings", "ClusterRoleBinding", False),
        ResourceType("rbac.authorization.k8s.io", ("v1",), "roles", "Role", True),
        ResourceType("rbac.authorization.k8s.io", ("v1",), "rolebindings", "RoleBinding", True),
        ResourceType("policy", ("v1",), "poddisruptionbudgets", "PodDisruptionBudget", True, short_names=("pdb",),
                     status=True, generation=True),
        ResourceType("networking.k8s.io", ("v1",), "servicecidrs", "ServiceCIDR", False, status=True),
        ResourceType("storage.k8s.io", ("v1",), "storageclasses", "StorageClass", False, short_names=("sc",)),
    ]


class Registry:
    """Resource types by (group, plural) and by (group, version, plural) for routing."""

    def __init__(self) -> None:
        self._types: dict[tuple[str, str], ResourceType] = {}
        for rt in builtin_types():
            self.add(rt)

    def add(self, rt: ResourceType) -> None:
        self._types[rt.key] = rt

    def remove(self, key: tuple[str, str]) -> None:
        self._types.pop(key, None)

    def get(self, key: tuple[str, str]) -> ResourceType | None:
        return self._types.get(key)

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        rt = self._types.get((group, plural))
        if rt is None or version not in rt.versions:
            return None
        return rt

    def all(self) -> list[ResourceType]:
        return list(self._types.values())

    def groups(self) -> dict[str, list[str]]:
        """group -> served versions, preferred first, in registration order (core group excluded)."""
        out: dict[str, list[str]] = {}
        for rt in self._types.values():
            if not rt.group:
                continue
            vs = out.setdefault(rt.group, [])
            for v in rt.versions:
                if v not in vs:
                    vs.append(v)
        return out

    def in_group_version(self, group: str, version: str) -> list[ResourceType]:
        return [rt for rt in self._types.values() if rt.group == group and version in rt.versions]
