"""What a root pod depends on, and what the leaf copies of those objects should look like: pure
functions for :mod:`tree.deps` (no API access).

In order:

1. :func:`references`: every object a pod spec names, as upstream's kubelet and admission read
   them: ConfigMaps and Secrets of volumes (and projected volume sources), of ``env[].valueFrom``
   and ``envFrom`` of every container (init and ephemeral ones included), Secrets of
   ``imagePullSecrets`` and of CSI volumes' ``nodePublishSecretRef``, the ServiceAccount
   (``serviceAccountName``, "default" when unset, as the ServiceAccount admission plugin sets
   it), PVCs of ``persistentVolumeClaim`` volumes. Each with whether it is optional: upstream the
   kubelet starts a container without a missing *optional* ConfigMap/Secret, and pulls without a
   missing image pull Secret (an event, no failure), so those are optional too. Not a
   reference: ``kube-root-ca.crt`` in a projected volume with a ``serviceAccountToken`` source
   (the ``kube-api-access-*`` volume the ServiceAccount admission adds): the leaf's kubelet
   projects a token of the leaf's API server there, and the CA that verifies that server is the
   leaf's own ``kube-root-ca.crt`` (see "Service-account tokens" in :mod:`tree.deps`).
2. :func:`base_name`: the leaf name a copy wants before collisions: the root name, except the
   root's ``kube-root-ca.crt`` (the root API server's CA, published in every namespace), which
   arrives as ``master-root-ca.crt`` as Kosmos names it, so it never fights the leaf's own
   ``kube-root-ca.crt`` (the leaf's CA, kept by the leaf's root-ca-cert-publisher).
3. :func:`desired_copy`: the body of the leaf copy of a ConfigMap, Secret, ServiceAccount or
   PVC: the root object's user labels and annotations plus :func:`tree.identity.ownership`, its
   payload, and nothing the root's controllers wrote (binder annotations, ``volumeName``).
   :func:`copy_differs` says whether a leaf copy must be rewritten. :func:`rename` rewrites a
   pod's references to the leaf names (for the pod syncer).
4. :func:`mirror_pv`: the root PV that mirrors the leaf PV of a leaf PVC: the leaf PV's volume
   source and capacity, bound to the root PVC by ``claimRef`` (name and UID), node affinity to
   the virtual node (see :mod:`tree.deps`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from scheduler.podutil import QuantityError, parse_quantity
from tree import identity

Obj = dict[str, Any]

CONFIGMAPS = "configmaps"
SECRETS = "secrets"
SERVICEACCOUNTS = "serviceaccounts"
PVCS = "persistentvolumeclaims"
#: Kinds by plural, for messages and metrics.
KINDS = {CONFIGMAPS: "ConfigMap", SECRETS: "Secret", SERVICEACCOUNTS: "ServiceAccount", PVCS: "PersistentVolumeClaim"}
#: The plurals whose copies :meth:`tree.deps.Dependencies.release` collects (PVCs hold data:
#: their leaf copy lives as long as the root PVC does).
RELEASED = (CONFIGMAPS, SECRETS, SERVICEACCOUNTS)

ROOT_CA = "kube-root-ca.crt"
#: The leaf name of the root's ``kube-root-ca.crt`` (Kosmos' name).
MASTER_ROOT_CA = "master-root-ca.crt"
#: Longest name of a ConfigMap, Secret, ServiceAccount, PVC (a DNS subdomain).
NAME_MAX = 253

#: Legacy, non-expiring service-account token Secrets: never copied to a leaf.
SA_TOKEN_TYPE = "kubernetes.io/service-account-token"
#: The virtual node a leaf PVC was first used from (the root pod's ``spec.nodeName``): the mirrored
#: PV's node affinity in cluster and party modes.
ROOT_NODE_ANNOTATION = "kosmos.io/root-node"
#: Root PVs mirrored from a leaf carry the leaf's Cluster name and the leaf PV's UID.
MIRROR_CLUSTER_LABEL = "kosmos.io/cluster"
MIRROR_UID_LABEL = "kosmos.io/leaf-pv-uid"
MIRROR_NAME_ANNOTATION = "kosmos.io/leaf-pv"
SELECTED_NODE = "volume.kubernetes.io/selected-node"
HOSTNAME_LABEL = "kubernetes.io/hostname"
#: Annotations the root's own controllers and tools write; never copied to a leaf.
_DROPPED_ANNOTATION_PREFIXES = ("pv.kubernetes.io/", "volume.kubernetes.io/", "volume.beta.kubernetes.io/",
                                "kubectl.kubernetes.io/last-applied-configuration", "kubernetes.io/")
#: PV spec fields that are not its volume source (the rest is copied to the root mirror as is).
_PV_NON_SOURCE = ("capacity", "accessModes", "claimRef", "persistentVolumeReclaimPolicy", "storageClassName",
                  "mountOptions", "volumeMode", "nodeAffinity", "volumeAttributesClassName")


@dataclass(frozen=True)
class Ref:
    """One object a pod names: its plural, name, whether the pod starts without it, and where
    the pod names it (for messages)."""

    plural: str
    name: str
    optional: bool
    where: str


def _containers(spec: Mapping[str, Any]) -> Iterator[Obj]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            if isinstance(c, dict):
                yield c


def references(pod: Mapping[str, Any]) -> list[Ref]:
    """Every object ``pod`` names (see the module's step 1), in spec order, duplicates kept."""
    spec = pod.get("spec") or {}
    out: list[Ref] = []

    def add(plural: str, name: Any, optional: Any, where: str) -> None:
        if name:
            out.append(Ref(plural, str(name), bool(optional), where))

    for v in spec.get("volumes") or []:
        vname = v.get("name", "")
        if cm := v.get("configMap"):
            add(CONFIGMAPS, cm.get("name"), cm.get("optional"), f"volume {vname}")
        if sec := v.get("secret"):
            add(SECRETS, sec.get("secretName"), sec.get("optional"), f"volume {vname}")
        if pvc := v.get("persistentVolumeClaim"):
            add(PVCS, pvc.get("claimName"), False, f"volume {vname}")
        if csi := v.get("csi"):
            add(SECRETS, (csi.get("nodePublishSecretRef") or {}).get("name"), False, f"volume {vname}")
        sources = (v.get("projected") or {}).get("sources") or []
        token = any(src.get("serviceAccountToken") for src in sources)
        for src in sources:
            if cm := src.get("configMap"):
                if token and cm.get("name") == ROOT_CA:
                    continue  # the CA of the token beside it: the leaf's own (see the module's step 1)
                add(CONFIGMAPS, cm.get("name"), cm.get("optional"), f"projected volume {vname}")
            if sec := src.get("secret"):
                add(SECRETS, sec.get("name"), sec.get("optional"), f"projected volume {vname}")
    for c in _containers(spec):
        cname = c.get("name", "")
        for e in c.get("env") or []:
            vf = e.get("valueFrom") or {}
            if ref := vf.get("configMapKeyRef"):
                add(CONFIGMAPS, ref.get("name"), ref.get("optional"), f"env {e.get('name')} of container {cname}")
            if ref := vf.get("secretKeyRef"):
                add(SECRETS, ref.get("name"), ref.get("optional"), f"env {e.get('name')} of container {cname}")
        for ef in c.get("envFrom") or []:
            if ref := ef.get("configMapRef"):
                add(CONFIGMAPS, ref.get("name"), ref.get("optional"), f"envFrom of container {cname}")
            if ref := ef.get("secretRef"):
                add(SECRETS, ref.get("name"), ref.get("optional"), f"envFrom of container {cname}")
    for ips in spec.get("imagePullSecrets") or []:
        add(SECRETS, ips.get("name"), True, "imagePullSecrets")
    add(SERVICEACCOUNTS, spec.get("serviceAccountName") or spec.get("serviceAccount") or "default", False,
        "serviceAccountName")
    return out


def rename(pod: Mapping[str, Any], renames: Mapping[tuple[str, str], str]) -> Obj:
    """A copy of ``pod`` with every reference :func:`references` reads rewritten by ``renames``
    (``{(plural, root name): leaf name}``, what :meth:`tree.deps.Dependencies.ensure` returns),
    the same walk, so what is copied and what is renamed never disagree. The ``kube-root-ca.crt``
    beside a projected token stays (the leaf's own CA, see the module's step 1)."""
    out: Obj = json.loads(json.dumps(pod))  # not deepcopy: it would keep two references to one dict shared
    spec = out.get("spec") or {}

    def new(plural: str, name: Any) -> Any:
        return renames.get((plural, str(name)), name) if name else name

    def key(ref: Any, field: str, plural: str) -> None:
        if isinstance(ref, dict) and ref.get(field):
            ref[field] = new(plural, ref[field])

    for v in spec.get("volumes") or []:
        key(v.get("configMap"), "name", CONFIGMAPS)
        key(v.get("secret"), "secretName", SECRETS)
        key(v.get("persistentVolumeClaim"), "claimName", PVCS)
        key((v.get("csi") or {}).get("nodePublishSecretRef"), "name", SECRETS)
        sources = (v.get("projected") or {}).get("sources") or []
        token = any(src.get("serviceAccountToken") for src in sources)
        for src in sources:
            if not (token and (src.get("configMap") or {}).get("name") == ROOT_CA):
                key(src.get("configMap"), "name", CONFIGMAPS)
            key(src.get("secret"), "name", SECRETS)
    for c in _containers(spec):
        for e in c.get("env") or []:
            vf = e.get("valueFrom") or {}
            key(vf.get("configMapKeyRef"), "name", CONFIGMAPS)
            key(vf.get("secretKeyRef"), "name", SECRETS)
        for ef in c.get("envFrom") or []:
            key(ef.get("configMapRef"), "name", CONFIGMAPS)
            key(ef.get("secretRef"), "name", SECRETS)
    for ips in spec.get("imagePullSecrets") or []:
        key(ips, "name", SECRETS)
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    if (SERVICEACCOUNTS, sa) in renames:
        spec["serviceAccountName"] = renames[(SERVICEACCOUNTS, sa)]
        if spec.get("serviceAccount"):
            spec["serviceAccount"] = spec["serviceAccountName"]
    return out


def names_used(pod: Mapping[str, Any]) -> set[tuple[str, str]]:
    """(plural, name) of every object a (leaf) pod names."""
    return {(r.plural, r.name) for r in references(pod)}


def base_name(plural: str, name: str) -> str:
    """The leaf name a copy wants (the module's step 2)."""
    return MASTER_ROOT_CA if plural == CONFIGMAPS and name == ROOT_CA else name


def _user_meta(root_obj: Mapping[str, Any], root_id: str) -> tuple[dict[str, str], dict[str, str]]:
    meta = root_obj.get("metadata") or {}
    own_labels, own_ann = identity.ownership(root_id, root_obj)
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()} | own_labels
    ann = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()
           if not str(k).startswith(_DROPPED_ANNOTATION_PREFIXES)} | own_ann
    return labels, ann


def desired_copy(plural: str, root_obj: Mapping[str, Any], root_id: str, leaf_name: str, leaf_namespace: str,
                 *, root_node: str = "", selected_node: str = "") -> Obj:
    """The leaf copy of ``root_obj`` (the module's step 3). For PVCs: ``root_node`` is recorded
    (:data:`ROOT_NODE_ANNOTATION`) and ``selected_node`` set as ``volume.kubernetes.io/selected-node``
    when given (one-per-node mode: the leaf pod is bound by ``nodeName`` and no scheduler would
    select a node for a WaitForFirstConsumer claim)."""
    labels, ann = _user_meta(root_obj, root_id)
    meta: Obj = {"name": leaf_name, "namespace": leaf_namespace, "labels": labels, "annotations": ann}
    body: Obj = {"apiVersion": "v1", "kind": KINDS[plural], "metadata": meta}
    if plural == CONFIGMAPS:
        for key in ("data", "binaryData", "immutable"):
            if root_obj.get(key) is not None:
                body[key] = root_obj[key]
    elif plural == SECRETS:
        body["type"] = root_obj.get("type") or "Opaque"
        for key in ("data", "immutable"):
            if root_obj.get(key) is not None:
                body[key] = root_obj[key]
    elif plural == SERVICEACCOUNTS:
        # Neither ``secrets`` (legacy token Secrets of the root) nor ``imagePullSecrets`` (the root
        # pod already lists them itself: the root's ServiceAccount admission copied them there).
        if root_obj.get("automountServiceAccountToken") is not None:
            body["automountServiceAccountToken"] = root_obj["automountServiceAccountToken"]
    elif plural == PVCS:
        spec = root_obj.get("spec") or {}
        # No ``volumeName`` (a root PV), ``selector`` (labels of root PVs; a provisioner refuses
        # a claim with one), ``dataSource``/``dataSourceRef`` (root snapshots and claims).
        body["spec"] = {k: spec[k] for k in ("accessModes", "resources", "storageClassName", "volumeMode",
                                              "volumeAttributesClassName") if spec.get(k) is not None}
        if root_node:
            ann[ROOT_NODE_ANNOTATION] = root_node
        if selected_node:
            ann[SELECTED_NODE] = selected_node
    return body


def storage(obj: Mapping[str, Any], where: str = "spec") -> Any:
    """The storage request of a PVC (``where="spec"``) or its capacity (``"status"``), else None."""
    if where == "spec":
        return (((obj.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
    return ((obj.get(where) or {}).get("capacity") or {}).get("storage")


def larger(a: Any, b: Any) -> bool:
    """Quantity ``a`` > quantity ``b`` (an unparsable or missing one is never larger)."""
    try:
        return a is not None and (b is None or parse_quantity(a) > parse_quantity(b))
    except QuantityError:
        return False


def copy_differs(plural: str, desired: Mapping[str, Any], leaf: Mapping[str, Any]) -> bool:
    """Whether ``leaf`` must be rewritten to be ``desired`` (PVCs: only a larger request, the one
    change a bound claim takes; labels and annotations we own or copied)."""
    if plural == PVCS:
        return larger(storage(desired), storage(leaf))
    dm, lm = desired.get("metadata") or {}, leaf.get("metadata") or {}
    if (dm.get("labels") or {}) != (lm.get("labels") or {}):
        return True
    if any((lm.get("annotations") or {}).get(k) != v for k, v in (dm.get("annotations") or {}).items()):
        return True
    keys = {CONFIGMAPS: ("data", "binaryData", "immutable"), SECRETS: ("data", "type", "immutable"),
            SERVICEACCOUNTS: ("automountServiceAccountToken",)}[plural]
    return any((desired.get(k) or None) != (leaf.get(k) or None) for k in keys)


def mirror_pv(leaf_pv: Mapping[str, Any], root_pvc: Mapping[str, Any], *, name: str, cluster: str,
              nodes: list[str]) -> Obj:
    """The root PV mirroring ``leaf_pv`` (the module's step 4), bound to ``root_pvc``, with a
    required node affinity ``kubernetes.io/hostname In nodes`` (the virtual nodes its data can be
    reached from)."""
    lmeta, lspec = leaf_pv.get("metadata") or {}, leaf_pv.get("spec") or {}
    pmeta, pspec = root_pvc.get("metadata") or {}, root_pvc.get("spec") or {}
    spec: Obj = {k: v for k, v in lspec.items() if k not in _PV_NON_SOURCE}
    spec.update({
        "capacity": dict(lspec.get("capacity") or {}),
        "accessModes": list(lspec.get("accessModes") or pspec.get("accessModes") or []),
        "persistentVolumeReclaimPolicy": lspec.get("persistentVolumeReclaimPolicy") or "Delete",
        "volumeMode": lspec.get("volumeMode") or "Filesystem",
        "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": pmeta.get("namespace"),
                     "name": pmeta.get("name"), "uid": pmeta.get("uid")},
        "nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": sorted(nodes)}]}]}},
    })
    if pspec.get("storageClassName"):
        spec["storageClassName"] = pspec["storageClassName"]
    if lspec.get("mountOptions"):
        spec["mountOptions"] = lspec["mountOptions"]
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name,
                         "labels": {MIRROR_CLUSTER_LABEL: cluster, MIRROR_UID_LABEL: str(lmeta.get("uid")),
                                    identity.MANAGED_BY_LABEL: identity.MANAGED_BY},
                         "annotations": {MIRROR_NAME_ANNOTATION: str(lmeta.get("name"))}},
            "spec": spec}


def pv_hostnames(pv: Mapping[str, Any]) -> list[str]:
    """The ``kubernetes.io/hostname`` values of a PV's required node affinity (a local volume's node)."""
    out: list[str] = []
    terms = ((((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {})
             .get("nodeSelectorTerms") or [])
    for t in terms:
        for e in t.get("matchExpressions") or []:
            if e.get("key") == HOSTNAME_LABEL and e.get("operator") == "In":
                out.extend(str(v) for v in e.get("values") or [])
    return sorted(set(out))


def mirror_differs(desired: Mapping[str, Any], root_pv: Mapping[str, Any]) -> bool:
    """Whether the root mirror's capacity must grow (an expansion in the leaf); its node affinity
    is immutable upstream and never rewritten."""
    return larger(((desired.get("spec") or {}).get("capacity") or {}).get("storage"),
                  ((root_pv.get("spec") or {}).get("capacity") or {}).get("storage"))
