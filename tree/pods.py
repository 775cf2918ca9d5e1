"""A root pod's leaf copy, and what flows between them: pure functions, no API access.

A pod bound to a virtual node in the root runs as a *leaf copy* in the leaf cluster. Three
functions say what each side should hold; :mod:`tree.podsync` diffs and writes.

:func:`leaf_pod` (root -> leaf, at creation), as Kosmos' ``FitPod`` does:

- metadata: the leaf name (:func:`tree.identity.leaf_name`, chosen by the caller), the root's
  namespace, labels and annotations plus the ownership ones (:func:`tree.identity.ownership`)
  and :data:`SYNCED_KEYS_ANNOTATION` (the label and annotation keys that came from the root, so
  a key the root drops later is removed while keys the leaf's own controllers add are kept).
  uid, resourceVersion, ownerReferences, finalizers, generateName, managedFields, timestamps are
  the root's and are not copied; neither is ``status``.
- placement: the root pod's ``nodeSelector``, ``tolerations``, ``topologySpreadConstraints``
  and required node affinity are for the *root* scheduler (they chose the virtual node, and
  include the ``kosmos.io/node`` toleration); Kosmos' ``recoverSelectors`` replaces them with the
  JSON of the annotation :data:`CLUSTER_SELECTOR_ANNOTATION` (``{nodeSelector, affinity,
  tolerations, topologySpreadConstraints}``, Kosmos' ``ClustersNodeSelection``), or clears them
  when it is absent, so the leaf scheduler places the pod by what its author meant for the leaf.
  The ``kosmos.io/node`` toleration thus goes with the rest (no leaf node has that taint).
  ``nodeName`` is cleared, except in node mode (one virtual node per leaf node, same name): the
  leaf copy is bound to that leaf node directly. Party mode: the party's label selector is added
  to every required node affinity term (Kosmos ``fitNodeAffinity`` replaces the terms; ANDing
  keeps a cluster-selector affinity meaningful too). ``schedulerName: kosmos-scheduler`` is
  cleared (Kosmos: the leaf runs its own default scheduler).
- the pin (cluster mode only, ``pin`` given: :func:`leaf_node_pin` read the root pod's
  :data:`LEAF_NODE_ANNOTATION`, written by the scheduler's LeafNodeFit PreBind with the leaf node
  its reservation holds room on): ``matchFields metadata.name In [node]`` is ANDed into every
  required node affinity term (one term with just that when there is none), so the pod's own
  translated affinity still holds and the leaf's scheduler can use that node only. The copy
  carries :data:`PINNED_ANNOTATION` = the node (not among the synced keys: :func:`leaf_update`
  leaves it), which is how :mod:`tree.podsync` knows the copy is pinned when it is stranded.
- service account: ``automountServiceAccountToken: false`` (as Kosmos): the root pod already
  carries its token volume (``kube-api-access-*``) and the leaf must not add a second one; the
  legacy ``default-token-*`` Secret volumes and mounts are dropped (Kosmos). The projected
  ``serviceAccountToken`` source stays as it is: the leaf's kubelet asks the leaf's API for a
  bound, expiring token of the leaf's copy of the ServiceAccount, and the ``kube-root-ca.crt``
  beside it stays the leaf's own CA (no root token is ever copied: :mod:`tree.deps`).
- references: ``renames`` maps ``(plural, root name)`` -> leaf name for the objects the
  dependency syncer copied under another name (what :meth:`tree.deps.Dependencies.ensure`
  returns); they are rewritten by :func:`tree.deps_refs.rename`, the one walk over the same
  references :func:`tree.deps_refs.references` copies (volumes: configMap, secret, projected
  sources, persistentVolumeClaim, CSI secrets; ``env[].valueFrom``, ``envFrom``,
  ``imagePullSecrets``, ``serviceAccountName``), so what is copied and what is renamed never
  disagree. A pod whose own name changed in the leaf gets ``spec.hostname`` = its root name
  (unless it has one), so it sees its name.
- dropped because the leaf recomputes or refuses them: ``priority`` and ``preemptionPolicy``
  (the leaf's Priority admission derives them from ``priorityClassName`` and refuses a value that
  disagrees), ``ephemeralContainers`` (only through their subresource), ``readinessGates`` (their
  conditions are set by root controllers; no one would set them in the leaf), ``schedulingGates``.

:func:`should_sync`: which pods bound to a virtual node are copied at all. As Kosmos'
``RootPodReconciler``: not those in ``kube-system``, not those a DaemonSet owns (unless annotated
:data:`DAEMONSET_ALLOW_ANNOTATION`: a root DaemonSet that tolerates every taint, kube-proxy say,
must not run its pods inside the leaves), not those of Kosmos' global DaemonSets (label
:data:`KOSMOS_DAEMONSET_LABEL`). They stay Pending in the root, as with Kosmos.

:func:`root_status` (leaf -> root): the root pod's status as the leaf copy's says: ``phase``,
``message``, ``reason``, ``podIP(s)``, ``hostIP(s)``, ``startTime``, the container statuses
(init, regular, ephemeral) and the kubelet's conditions (``PodReadyToStartContainers``,
``Initialized``, ``ContainersReady``, ``Ready``); the root's other conditions (``PodScheduled``
from the root scheduler, ``DisruptionTarget``, readiness gates) and ``qosClass`` (computed by the
root's API server at creation) stay. ``hostIP`` is the *leaf node's* address: a virtual node has
no address of its own, and through the fabric the leaf node's address is reachable from the root
(Kosmos, too, copies the leaf status; Liqo remaps). None when nothing differs: no write.

:func:`leaf_update` (root -> leaf, later): the fields a pod update may change (ValidatePodUpdate)
and Kosmos updates: container and init container images, labels, annotations,
``activeDeadlineSeconds`` (only set or lowered, as the API allows). A JSON patch that first tests
the leaf copy's UID, or None when nothing differs. Labels and annotations that someone changed in
the leaf are put back; keys the leaf's own controllers added are left alone.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

from tree import identity
from tree.deps_refs import rename
from tree.spec import Mode

Obj = dict[str, Any]
#: ``(plural, root name)`` -> leaf name of a dependency copied under another name.
Renames = Mapping[tuple[str, str], str]

#: Kosmos' ``KosmosSelectorKey``: JSON ``{nodeSelector, affinity, tolerations,
#: topologySpreadConstraints}`` placing the leaf copy inside the leaf.
CLUSTER_SELECTOR_ANNOTATION = "kosmos.io/cluster-selector"
#: JSON ``{"labels": [...], "annotations": [...]}``: the keys of the leaf copy that came from the
#: root pod (see the module).
SYNCED_KEYS_ANNOTATION = "kosmos.io/synced-keys"
#: A root pod owned by a DaemonSet is copied only with this annotation (Kosmos' key).
DAEMONSET_ALLOW_ANNOTATION = "kosmos-io/daemonset-allow"
#: Pods of Kosmos' global DaemonSets (its ShadowDaemonSets) are not copied (Kosmos' key).
KOSMOS_DAEMONSET_LABEL = "daemonset.kosmos.io/managed"
#: Namespaces whose pods are never copied.
SKIPPED_NAMESPACES = ("kube-system",)
#: The root pod's annotation naming the leaf node its copy is pinned to (the scheduler's
#: ``scheduler.plugins.kosmos_leaffit.LEAF_NODE_ANNOTATION``).
LEAF_NODE_ANNOTATION = "kosmos.io/leaf-node"
#: The leaf copy's annotation: the leaf node this copy was pinned to at creation.
PINNED_ANNOTATION = "kosmos.io/pinned-leaf-node"
#: A Kubernetes object name (DNS-1123 subdomain), what a node name must be.
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: Kosmos' scheduler name, cleared in the leaf.
KOSMOS_SCHEDULER = "kosmos-scheduler"
#: The kubelet's own pod conditions: the leaf's kubelet is the one that sets them.
KUBELET_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")
#: Status fields copied verbatim from the leaf copy (absent in the leaf: absent in the root).
STATUS_FIELDS = ("phase", "message", "reason", "podIP", "podIPs", "hostIP", "hostIPs", "startTime",
                 "initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses", "resize",
                 "resourceClaimStatuses")

_META_KEPT = ("namespace", "labels", "annotations")
_SPEC_DROPPED = ("priority", "preemptionPolicy", "ephemeralContainers", "readinessGates", "schedulingGates")
_LEGACY_TOKEN = "default-token"
_CONTAINER_LISTS = ("initContainers", "containers")


class PodError(ValueError):
    """A root pod that cannot be copied (e.g. an unreadable cluster-selector annotation)."""


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def should_sync(root_pod: Mapping[str, Any]) -> bool:
    """Whether a root pod bound to a virtual node is copied to its leaf (see the module)."""
    meta = _meta(root_pod)
    if meta.get("namespace") in SKIPPED_NAMESPACES or KOSMOS_DAEMONSET_LABEL in (meta.get("labels") or {}):
        return False
    if any(ref.get("kind") == "DaemonSet" for ref in meta.get("ownerReferences") or []):
        return DAEMONSET_ALLOW_ANNOTATION in (meta.get("annotations") or {})
    return True


def leaf_pod(root_pod: Mapping[str, Any], *, root_id: str, leaf_name: str, mode: Mode,
             party_selector: Mapping[str, Any] | None = None, renames: Renames | None = None,
             pin: str | None = None) -> Obj:
    """The leaf copy of ``root_pod`` to create, named ``leaf_name`` (see the module).

    ``party_selector``: the party's ``labelSelector`` (party mode). ``pin``: the leaf node the
    copy must run on (cluster mode; ignored in the others). Raises :class:`PodError` when the
    cluster-selector annotation is not the JSON object Kosmos defines."""
    renames = renames or {}
    meta = _meta(root_pod)
    root_name = str(meta.get("name") or "")
    labels, annotations = desired_meta(root_pod, root_id)
    out_meta: Obj = {"name": leaf_name, "namespace": meta.get("namespace") or "default",
                     "labels": labels, "annotations": annotations}
    spec: Obj = rename({"spec": root_pod.get("spec") or {}}, renames)["spec"]  # a copy, references renamed
    for k in _SPEC_DROPPED:
        spec.pop(k, None)
    if spec.get("schedulerName") == KOSMOS_SCHEDULER:
        spec.pop("schedulerName")
    if mode is not Mode.NODE:
        spec.pop("nodeName", None)
    _placement(spec, cluster_selector(root_pod))
    if mode is Mode.PARTY and party_selector is not None:
        _and_party(spec, party_selector)
    if mode is Mode.CLUSTER and pin:
        _and_terms(spec, [], [{"key": "metadata.name", "operator": "In", "values": [pin]}])
        annotations[PINNED_ANNOTATION] = pin
    spec["automountServiceAccountToken"] = False
    _drop_legacy_tokens(spec)
    if leaf_name != root_name and not spec.get("hostname"):
        spec["hostname"] = root_name[:63]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": out_meta, "spec": spec}


def desired_meta(root_pod: Mapping[str, Any], root_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) the leaf copy of ``root_pod`` carries: the root's, the ownership
    ones over them, and the record of the root's keys."""
    meta = _meta(root_pod)
    own_labels, own_annotations = identity.ownership(root_id, root_pod)
    root_labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    root_annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()
                        if k != SYNCED_KEYS_ANNOTATION}
    record = json.dumps({"labels": sorted(root_labels), "annotations": sorted(root_annotations)},
                        separators=(",", ":"))
    return ({**root_labels, **own_labels},
            {**root_annotations, **own_annotations, SYNCED_KEYS_ANNOTATION: record})


def cluster_selector(root_pod: Mapping[str, Any]) -> Obj | None:
    """The parsed :data:`CLUSTER_SELECTOR_ANNOTATION`, None when absent."""
    raw = (_meta(root_pod).get("annotations") or {}).get(CLUSTER_SELECTOR_ANNOTATION)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise PodError(f"annotation {CLUSTER_SELECTOR_ANNOTATION} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise PodError(f"annotation {CLUSTER_SELECTOR_ANNOTATION} must be a JSON object, got {raw!r}")
    return doc


def _placement(spec: Obj, cns: Mapping[str, Any] | None) -> None:
    """Kosmos' ``recoverSelectors``: the root's placement out, the cluster selector's in."""
    cns = cns or {}
    for key in ("nodeSelector", "tolerations", "topologySpreadConstraints"):
        if cns.get(key):
            spec[key] = copy.deepcopy(cns[key])
        else:
            spec.pop(key, None)
    affinity: Obj = dict(spec.get("affinity") or {})
    node_aff: Obj = dict(affinity.get("nodeAffinity") or {})
    node_aff.pop("requiredDuringSchedulingIgnoredDuringExecution", None)
    wanted = ((cns.get("affinity") or {}).get("nodeAffinity") or {})
    if wanted.get("requiredDuringSchedulingIgnoredDuringExecution"):
        node_aff["requiredDuringSchedulingIgnoredDuringExecution"] = copy.deepcopy(
            wanted["requiredDuringSchedulingIgnoredDuringExecution"])
    if wanted.get("preferredDuringSchedulingIgnoredDuringExecution"):
        node_aff["preferredDuringSchedulingIgnoredDuringExecution"] = copy.deepcopy(
            wanted["preferredDuringSchedulingIgnoredDuringExecution"])
    _set_or_drop(affinity, "nodeAffinity", node_aff)
    _set_or_drop(spec, "affinity", affinity)


def _set_or_drop(d: Obj, key: str, value: Obj) -> None:
    if value:
        d[key] = value
    else:
        d.pop(key, None)


def selector_requirements(sel: Mapping[str, Any]) -> list[Obj]:
    """A LabelSelector as node selector requirements (Kosmos ``fitNodeAffinity``)."""
    reqs: list[Obj] = [{"key": k, "operator": "In", "values": [str(v)]}
                       for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        req: Obj = {"key": e["key"], "operator": e["operator"]}
        if e.get("values"):
            req["values"] = list(e["values"])
        reqs.append(req)
    return reqs


def _and_party(spec: Obj, party_selector: Mapping[str, Any]) -> None:
    reqs = selector_requirements(party_selector)
    if reqs:
        _and_terms(spec, reqs, [])


def _and_terms(spec: Obj, expressions: list[Obj], fields: list[Obj]) -> None:
    """AND ``expressions`` (matchExpressions) and ``fields`` (matchFields) into every required
    node affinity term of ``spec`` (one term with just them when there is none)."""
    affinity = spec.setdefault("affinity", {})
    node_aff = affinity.setdefault("nodeAffinity", {})
    required = node_aff.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    for t in terms:
        if expressions:
            t["matchExpressions"] = list(t.get("matchExpressions") or []) + copy.deepcopy(expressions)
        if fields:
            t["matchFields"] = list(t.get("matchFields") or []) + copy.deepcopy(fields)
    required["nodeSelectorTerms"] = terms


def leaf_node_pin(root_pod: Mapping[str, Any]) -> tuple[str | None, str]:
    """(the leaf node ``root_pod``'s copy is to be pinned to, the problem with the annotation):
    (None, "") without :data:`LEAF_NODE_ANNOTATION`; (None, why) when it cannot name a node."""
    raw = (_meta(root_pod).get("annotations") or {}).get(LEAF_NODE_ANNOTATION)
    if raw is None:
        return None, ""
    if not isinstance(raw, str) or len(raw) > 253 or not _NODE_NAME.match(raw):
        return None, f"annotation {LEAF_NODE_ANNOTATION}={raw!r} is not a node name; the leaf copy is not pinned"
    return raw, ""


def pinned_node(leaf_pod_now: Mapping[str, Any]) -> str | None:
    """The leaf node a leaf copy was pinned to at creation (:data:`PINNED_ANNOTATION`), if any."""
    v = (_meta(leaf_pod_now).get("annotations") or {}).get(PINNED_ANNOTATION)
    return str(v) if v else None


def unschedulable(leaf_pod_now: Mapping[str, Any]) -> str | None:
    """The leaf scheduler's message when the leaf copy is Pending, unbound and its
    ``PodScheduled`` condition is False with reason ``Unschedulable``; None otherwise."""
    if (leaf_pod_now.get("spec") or {}).get("nodeName") or _meta(leaf_pod_now).get("deletionTimestamp"):
        return None
    status = leaf_pod_now.get("status") or {}
    if status.get("phase") not in (None, "", "Pending"):
        return None
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled":
            if c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return str(c.get("message") or "Unschedulable")
            return None
    return None


def _drop_legacy_tokens(spec: Obj) -> None:
    """Kosmos: the legacy ``default-token-*`` Secret volumes and their mounts do not go to the leaf."""
    vols = [v for v in spec.get("volumes") or [] if not str(v.get("name", "")).startswith(_LEGACY_TOKEN)]
    if vols:
        spec["volumes"] = vols
    else:
        spec.pop("volumes", None)
    for key in _CONTAINER_LISTS:
        for c in spec.get(key) or []:
            mounts = [m for m in c.get("volumeMounts") or [] if not str(m.get("name", "")).startswith(_LEGACY_TOKEN)]
            if mounts:
                c["volumeMounts"] = mounts
            else:
                c.pop("volumeMounts", None)


# ---------------------------------------------------------------------- leaf -> root


def desired_status(leaf_pod: Mapping[str, Any], root_pod: Mapping[str, Any]) -> Obj:
    """The root pod's whole status as the leaf copy says (see the module).

    The result shares its values with the two pods (no copies): it is compared and sent, never
    changed, and the informers' objects it comes from are not changed either (every event brings
    a new object). Deep copies of the container statuses and conditions here were about a seventh of
    the pod workers' CPU (cProfile), computed at every event of the pod in the root or the leaf."""
    leaf_status = leaf_pod.get("status") or {}
    root_status_now = root_pod.get("status") or {}
    out = {k: v for k, v in root_status_now.items() if k not in STATUS_FIELDS and k != "conditions"}
    for k in STATUS_FIELDS:
        if leaf_status.get(k) not in (None, "", []):
            out[k] = leaf_status[k]
    conditions = [c for c in root_status_now.get("conditions") or [] if c.get("type") not in KUBELET_CONDITIONS]
    conditions += [c for c in leaf_status.get("conditions") or [] if c.get("type") in KUBELET_CONDITIONS]
    if conditions:
        out["conditions"] = conditions
    return out


def root_status(leaf_pod: Mapping[str, Any], root_pod: Mapping[str, Any]) -> Obj | None:
    """The root pod's new status, or None when it already says what the leaf copy says.

    A leaf copy that has no status yet (phase empty) tells nothing: None, so a freshly created
    copy does not wipe the root's Pending status."""
    if not (leaf_pod.get("status") or {}).get("phase"):
        return None
    want = desired_status(leaf_pod, root_pod)
    return None if want == (root_pod.get("status") or {}) else want


# ---------------------------------------------------------------------- root -> leaf, later


def _escape(key: str) -> str:
    """A JSON pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _synced_keys(leaf: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    raw = (_meta(leaf).get("annotations") or {}).get(SYNCED_KEYS_ANNOTATION) or "{}"
    try:
        doc = json.loads(raw)
        return set(doc.get("labels") or ()), set(doc.get("annotations") or ())
    except (ValueError, AttributeError):
        return set(), set()


def leaf_update(root_pod: Mapping[str, Any], leaf_pod_now: Mapping[str, Any], root_id: str) -> list[Obj] | None:
    """The JSON patch (RFC 6902) that brings the leaf copy's updatable fields to the root pod's,
    guarded by a test of its UID; None when nothing differs (see the module)."""
    ops: list[Obj] = []
    meta = _meta(leaf_pod_now)
    want_labels, want_annotations = desired_meta(root_pod, root_id)
    had_labels, had_annotations = _synced_keys(leaf_pod_now)
    for field_name, want, had in (("labels", want_labels, had_labels),
                                  ("annotations", want_annotations, had_annotations)):
        have = dict(meta.get(field_name) or {})
        changes: list[Obj] = []
        for k, v in sorted(want.items()):
            if have.get(k) != v:
                changes.append({"op": "add", "path": f"/metadata/{field_name}/{_escape(k)}", "value": v})
        for k in sorted(had - set(want)):
            if k in have:
                changes.append({"op": "remove", "path": f"/metadata/{field_name}/{_escape(k)}"})
        if changes and field_name not in meta:
            changes.insert(0, {"op": "add", "path": f"/metadata/{field_name}", "value": {}})
        ops += changes
    root_spec, leaf_spec = root_pod.get("spec") or {}, leaf_pod_now.get("spec") or {}
    for key in _CONTAINER_LISTS:
        images = {c.get("name"): c.get("image") for c in root_spec.get(key) or []}
        for i, c in enumerate(leaf_spec.get(key) or []):
            want_image = images.get(c.get("name"))
            if want_image and want_image != c.get("image"):
                ops.append({"op": "replace", "path": f"/spec/{key}/{i}/image", "value": want_image})
    ads_root, ads_leaf = root_spec.get("activeDeadlineSeconds"), leaf_spec.get("activeDeadlineSeconds")
    if ads_root is not None and (ads_leaf is None or int(ads_root) < int(ads_leaf)):
        ops.append({"op": "add", "path": "/spec/activeDeadlineSeconds", "value": int(ads_root)})
    if not ops:
        return None
    return [{"op": "test", "path": "/metadata/uid", "value": meta.get("uid")}, *ops]
