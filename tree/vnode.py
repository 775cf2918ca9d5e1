"""Virtual nodes in the root cluster: who owns one, and the writes that make it as forged.

Ownership lives in the Node itself, so a restarted manager knows exactly what is its own:
label ``app.kubernetes.io/managed-by=kosmos-tree``, annotations ``kosmos-io/owned-by-cluster``
(the Cluster's name, Kosmos' key, which the scheduler reads) and ``kosmos.io/cluster-uid`` (that
Cluster's UID, so a Cluster deleted and created again under the same name does not adopt the
old one's nodes). The other labels we set (``kosmos.io/node``, ``kosmos.io/cluster``) are not
part of the identity: edited by hand, they are put back. A Node lacking any of them is never written or
deleted, whatever its name; deletions carry the Node's UID as a precondition, so a Node
recreated meanwhile by someone else under the same name is not deleted either.

What we set on a Node we also record (annotations ``kosmos.io/managed-labels``,
``kosmos.io/managed-taints``), so a label or taint we stop setting is removed while those others
added (``kubectl label``, the node lifecycle controller's taints) stay. In order, per virtual
node (:meth:`RootWriter.ensure`):

1. absent: create it (metadata, taints, status), then write the status again when the server
   dropped it on create (upstream keeps a Node's status on create; some servers do not);
2. metadata or taints differ: one merge patch of the Node;
3. status differs (capacity, allocatable, conditions, nodeInfo, the kubelet endpoint and
   InternalIP when the manager serves one), or its heartbeat is older than
   the status period: one merge patch of ``nodes/status``. A condition keeps its
   ``lastTransitionTime`` while its status does not change. ``NetworkUnavailable`` is written
   only when the fabric is asked (``vn.network``), as a CNI plugin writes it; the conditions
   list is replaced whole by the merge patch, so without the fabric it goes away;
4. its Lease in ``kube-node-lease`` (holder = the node, owned by it, so the garbage collector
   takes it with the node) renewed by :meth:`RootWriter.renew_lease` while the leaf answers.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any

from scheduler.kube import Api, ApiError, resource_path
from scheduler.podutil import QuantityError, parse_quantity
from scheduler.policy import LEAF_NODE_LABEL
from tree.forge import NETWORK_UNAVAILABLE, VirtualNode
from tree.identity import MANAGED_BY, MANAGED_BY_LABEL

_log = logging.getLogger(__name__)

Obj = dict[str, Any]

#: Kosmos' own key; kosmos-scheduler's LeafNodeVolumeBinding reads it (a unit test holds the two equal).
OWNER_ANNOTATION = "kosmos-io/owned-by-cluster"
OWNER_UID_ANNOTATION = "kosmos.io/cluster-uid"
MODE_ANNOTATION = "kosmos.io/leaf-node-mode"
MODEL_ANNOTATION = "kosmos.io/leaf-model"
MANAGED_LABELS_ANNOTATION = "kosmos.io/managed-labels"
MANAGED_TAINTS_ANNOTATION = "kosmos.io/managed-taints"
#: Label selector of the root Nodes the manager watches (ours, and any other virtual node).
NODE_SELECTOR = f"{LEAF_NODE_LABEL}=true"
LEASE_NAMESPACE = "kube-node-lease"
_PRESSURES = ("MemoryPressure", "DiskPressure", "PIDPressure")


def now_rfc3339(micro: bool = False) -> str:
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ"
    return datetime.datetime.now(datetime.UTC).strftime(fmt)


def owner(node: Obj) -> tuple[str, str] | None:
    """(Cluster name, Cluster UID) of a virtual node we made; None for any other Node."""
    meta = node.get("metadata") or {}
    labels, ann = meta.get("labels") or {}, meta.get("annotations") or {}
    if labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
        return None
    name, uid = ann.get(OWNER_ANNOTATION), ann.get(OWNER_UID_ANNOTATION)
    if not name or not uid:
        return None
    return str(name), str(uid)


def _taint_key(t: Mapping[str, Any]) -> str:
    return f"{t.get('key', '')}:{t.get('effect', '')}"


def _split(text: str | None) -> set[str]:
    return {s for s in (text or "").split(",") if s}


def desired_metadata(vn: VirtualNode, cluster: str, uid: str, current: Obj | None) -> tuple[Obj, list[Obj]]:
    """(labels and annotations to merge-patch, the full taint list) for ``vn`` over ``current``."""
    meta = (current or {}).get("metadata") or {}
    cur_labels, cur_ann = meta.get("labels") or {}, meta.get("annotations") or {}
    labels: dict[str, Any] = {**vn.labels, MANAGED_BY_LABEL: MANAGED_BY}
    for k in _split(cur_ann.get(MANAGED_LABELS_ANNOTATION)) - set(labels):
        if k in cur_labels:
            labels[k] = None  # we set it before, not any more
    ann: dict[str, Any] = {OWNER_ANNOTATION: cluster, OWNER_UID_ANNOTATION: uid, MODE_ANNOTATION: str(vn.mode),
                           MANAGED_LABELS_ANNOTATION: ",".join(sorted(vn.labels)),
                           MANAGED_TAINTS_ANNOTATION: ",".join(sorted(_taint_key(t) for t in vn.taints))}
    if vn.model:
        ann[MODEL_ANNOTATION] = vn.model
    elif MODEL_ANNOTATION in cur_ann:
        ann[MODEL_ANNOTATION] = None
    ours_before = _split(cur_ann.get(MANAGED_TAINTS_ANNOTATION))
    want = {_taint_key(t) for t in vn.taints}
    kept = [t for t in (((current or {}).get("spec") or {}).get("taints") or [])
            if _taint_key(t) not in ours_before and _taint_key(t) not in want]
    return {"labels": labels, "annotations": ann}, [*vn.taints, *kept]


def _metadata_patch(vn: VirtualNode, cluster: str, uid: str, current: Obj) -> Obj | None:
    meta_patch, taints = desired_metadata(vn, cluster, uid, current)
    meta = current.get("metadata") or {}
    changed = {}
    for part in ("labels", "annotations"):
        cur = meta.get(part) or {}
        diff = {k: v for k, v in meta_patch[part].items() if cur.get(k) != v and not (v is None and k not in cur)}
        if diff:
            changed[part] = diff
    body: Obj = {}
    if changed:
        body["metadata"] = changed
    if _taints_norm(taints) != _taints_norm((current.get("spec") or {}).get("taints") or []):
        body["spec"] = {"taints": taints}
    return body or None


def _taints_norm(taints: list[Obj]) -> list[tuple[str, str, str]]:
    return sorted((str(t.get("key", "")), str(t.get("value") or ""), str(t.get("effect", ""))) for t in taints)


def conditions(vn: VirtualNode, current: Obj | None, now: str) -> list[Obj]:
    """Ready as forged, the pressure conditions (always False: the leaf's kubelets evict), and
    NetworkUnavailable as the fabric says (absent when the fabric is not asked; the Node's own
    while the fabric has not answered yet)."""
    old = {c.get("type"): c for c in (((current or {}).get("status") or {}).get("conditions") or [])}
    want = [("Ready", vn.ready, vn.reason, vn.message),
            *((p, "False", "LeafNoPressure", "the leaf's kubelets watch pressure") for p in _PRESSURES)]
    if vn.network is not None and vn.network.known:
        want.append((NETWORK_UNAVAILABLE, vn.network.status, vn.network.reason, vn.network.message))
    out = []
    for ctype, status, reason, message in want:
        prev = old.get(ctype) or {}
        since = prev.get("lastTransitionTime") if prev.get("status") == status else None
        out.append({"type": ctype, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": since or now})
    if vn.network is not None and not vn.network.known and NETWORK_UNAVAILABLE in old:
        out.append(old[NETWORK_UNAVAILABLE])
    return out


def _same_resources(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal by value, as the API server may rewrite a quantity (``2000000000`` -> ``2G``)."""
    if set(a) != set(b):
        return False
    try:
        return all(parse_quantity(a[k]) == parse_quantity(b[k]) for k in a)
    except QuantityError:
        return False


def _same_status(vn: VirtualNode, status: Obj) -> bool:
    """True when ``status`` already says what ``vn`` says (heartbeat times aside)."""
    if not (_same_resources(vn.resources, status.get("capacity") or {})
            and _same_resources(vn.resources, status.get("allocatable") or {})):
        return False
    info = status.get("nodeInfo") or {}
    if any(info.get(k) != v for k, v in vn.node_info.items()):
        return False
    conds = {c.get("type"): (c.get("status"), c.get("reason"), c.get("message"))
             for c in status.get("conditions") or []}
    if conds.get("Ready") != (vn.ready, vn.reason, vn.message):
        return False
    if vn.network is None:
        if NETWORK_UNAVAILABLE in conds:
            return False
    elif vn.network.known and conds.get(NETWORK_UNAVAILABLE) != (vn.network.status, vn.network.reason,
                                                                  vn.network.message):
        return False
    if vn.kubelet_port and _kubelet_port(status) != vn.kubelet_port:
        return False
    if vn.address and status.get("addresses") != _addresses(vn):
        return False
    return all((conds.get(p) or ("",))[0] == "False" for p in _PRESSURES)


def _kubelet_port(status: Obj) -> int | None:
    port = ((status.get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}).get("Port")
    return int(port) if isinstance(port, int | str) and str(port).isdigit() else None


def _addresses(vn: VirtualNode) -> list[Obj]:
    """The Node's addresses: the tree manager's kubelet server, where the root API server dials
    the virtual node's kubelet (a real kube-apiserver takes the InternalIP first)."""
    return [{"type": "InternalIP", "address": vn.address}]


def _heartbeat_age(status: Obj, clock: Callable[[], datetime.datetime]) -> float:
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready" and c.get("lastHeartbeatTime"):
            try:
                t = datetime.datetime.strptime(c["lastHeartbeatTime"], "%Y-%m-%dT%H:%M:%SZ").replace(
                    tzinfo=datetime.UTC)
            except ValueError:
                return float("inf")
            return (clock() - t).total_seconds()
    return float("inf")


def status_body(vn: VirtualNode, current: Obj | None, now: str) -> Obj:
    """The ``status`` of ``vn``; resources ``current`` has and ``vn`` not are nulled (merge patch)."""
    cur = (current or {}).get("status") or {}
    res: dict[str, Any] = dict(vn.resources)
    gone = {k: None for part in ("capacity", "allocatable") for k in (cur.get(part) or {}) if k not in res}
    body: Obj = {"capacity": {**gone, **res}, "allocatable": {**gone, **res},
                 "conditions": conditions(vn, current, now), "nodeInfo": dict(vn.node_info)}
    if vn.kubelet_port:
        body["daemonEndpoints"] = {"kubeletEndpoint": {"Port": vn.kubelet_port}}
    if vn.address:
        body["addresses"] = _addresses(vn)
    return body


class RootWriter:
    """The root-cluster writes of one leaf's reconciler; ``count(kind)`` feeds the metrics."""

    def __init__(self, api: Api, cluster: str, uid: str, *, status_period: float, lease_duration: float,
                 timeout: float, count: Callable[[str], None] = lambda _k: None,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)) -> None:
        self.api = api
        self.cluster = cluster
        self.uid = uid
        self.status_period = status_period
        self.lease_duration = lease_duration
        self.timeout = timeout
        self.count = count
        self.clock = clock
        self._leases: dict[str, Obj] = {}

    def _req(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
        return self.api.request(method, path, body, ctype=ctype, timeout=self.timeout)

    def ensure(self, vn: VirtualNode, current: Obj | None) -> Obj | None:
        """Make the Node ``vn`` (``current``: the Node as last seen, None when absent); returns
        the Node as written, or None when a Node of that name is not ours (left alone)."""
        now = now_rfc3339()
        path = resource_path("v1", "nodes", name=vn.name)
        if current is None:  # the informer may lag behind our own create
            current = self.api.get_or_none(path, timeout=self.timeout)
        if current is None:
            meta, taints = desired_metadata(vn, self.cluster, self.uid, None)
            body = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": vn.name, "labels": meta["labels"], "annotations": meta["annotations"]},
                    "spec": {"taints": taints}, "status": status_body(vn, None, now)}
            try:
                current = self._req("POST", resource_path("v1", "nodes"), body)
                self.count("create")
                _log.info("Cluster %s: created virtual node %s (%s mode)", self.cluster, vn.name, vn.mode)
            except ApiError as e:
                if e.status != 409:
                    raise
                current = self.api.get_or_none(path, timeout=self.timeout)
                if current is None:
                    return None
        assert current is not None
        if owner(current) != (self.cluster, self.uid):
            return None
        patch = _metadata_patch(vn, self.cluster, self.uid, current)
        if patch:
            patch["metadata"] = {**patch.get("metadata", {}),
                                 "resourceVersion": current["metadata"].get("resourceVersion")}
            current = self._req("PATCH", resource_path("v1", "nodes", name=vn.name), patch,
                                "application/merge-patch+json")
            self.count("node")
        assert current is not None
        cur_status = current.get("status") or {}
        want = status_body(vn, current, now)
        stale = _heartbeat_age(cur_status, self.clock) >= self.status_period
        if stale or not _same_status(vn, cur_status):
            current = self._req("PATCH", resource_path("v1", "nodes", name=vn.name, sub="status"),
                                {"status": want}, "application/merge-patch+json")
            self.count("status")
        return current

    def mark(self, node: Obj, ready: str, reason: str, message: str) -> None:
        """Only the Ready condition of an existing virtual node (its leaf was never read by this
        process, so nothing else is known better than what the Node says)."""
        now = now_rfc3339()
        conds = []
        for c in (node.get("status") or {}).get("conditions") or []:
            if c.get("type") == "Ready":
                if (c.get("status"), c.get("reason"), c.get("message")) == (ready, reason, message):
                    return
                since = c.get("lastTransitionTime") if c.get("status") == ready else None
                c = {**c, "status": ready, "reason": reason, "message": message, "lastHeartbeatTime": now,
                     "lastTransitionTime": since or now}
            conds.append(c)
        if not any(c.get("type") == "Ready" for c in conds):
            conds.append({"type": "Ready", "status": ready, "reason": reason, "message": message,
                          "lastHeartbeatTime": now, "lastTransitionTime": now})
        name = node["metadata"]["name"]
        self._req("PATCH", resource_path("v1", "nodes", name=name, sub="status"), {"status": {"conditions": conds}},
                  "application/merge-patch+json")
        self.count("status")

    def delete(self, node: Obj) -> None:
        """Delete a virtual node of ours (UID precondition) and its Lease."""
        if owner(node) is None:
            raise ValueError(f"node {node['metadata']['name']} is not a virtual node of kosmos-tree; not deleting")
        name, uid = node["metadata"]["name"], node["metadata"].get("uid")
        try:
            self._req("DELETE", resource_path("v1", "nodes", name=name),
                      {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}})
            self.count("delete")
            _log.info("Cluster %s: deleted virtual node %s", owner(node)[0], name)  # type: ignore[index]
        except ApiError as e:
            if e.status not in (404, 409):
                raise
        self._leases.pop(name, None)
        self._delete_lease(name, uid)

    def _delete_lease(self, name: str, node_uid: str | None) -> None:
        path = resource_path("coordination.k8s.io/v1", "leases", LEASE_NAMESPACE, name)
        try:
            lease = self._req("GET", path)
        except ApiError as e:
            if e.status == 404:
                return
            raise
        refs = (lease.get("metadata") or {}).get("ownerReferences") or []
        if any(r.get("kind") == "Node" and r.get("uid") == node_uid for r in refs):
            try:
                self._req("DELETE", path, {"apiVersion": "v1", "kind": "DeleteOptions",
                                           "preconditions": {"uid": lease["metadata"].get("uid")}})
            except ApiError as e:
                if e.status not in (404, 409):
                    raise

    def renew_lease(self, node: Obj) -> None:
        """Create or renew the node's Lease (owned by the Node, as the kubelet's). The Lease as
        last written is kept, so a renewal is one PUT (its resourceVersion makes a concurrent
        writer's change a 409, after which the Lease is read again)."""
        name, uid = node["metadata"]["name"], node["metadata"].get("uid")
        ref = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}
        spec = {"holderIdentity": name, "leaseDurationSeconds": max(1, round(self.lease_duration)),
                "renewTime": now_rfc3339(micro=True)}
        path = resource_path("coordination.k8s.io/v1", "leases", LEASE_NAMESPACE, name)
        lease = self._leases.get(name)
        if lease is None or ((lease.get("metadata") or {}).get("ownerReferences") or [{}])[0].get("uid") != uid:
            try:
                lease = self._req("GET", path)
            except ApiError as e:
                if e.status != 404:
                    raise
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": name, "namespace": LEASE_NAMESPACE, "ownerReferences": [ref]},
                        "spec": spec}
                try:
                    self._leases[name] = self._req(
                        "POST", resource_path("coordination.k8s.io/v1", "leases", LEASE_NAMESPACE), body)
                    self.count("lease")
                except ApiError as e2:
                    if e2.status != 409:
                        raise
                return
        assert lease is not None
        lease = {**lease, "spec": {**(lease.get("spec") or {}), **spec},
                 "metadata": {**lease["metadata"], "ownerReferences": [ref]}}
        try:
            self._leases[name] = self._req("PUT", path, lease)
        except ApiError:
            self._leases.pop(name, None)
            raise
        self.count("lease")
