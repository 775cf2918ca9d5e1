"""The virtual nodes a leaf cluster should have, from its nodes and pods: pure functions, no API.

In order (:func:`virtual_nodes`):

1. Membership: every leaf node (not being deleted) joins the virtual node of its mode: the one
   ``kosmos-<cluster>`` (cluster mode), its namesake (node mode, for the leaf nodes the models
   select, every one when there are none) or ``kosmos-<cluster>-<leafNodeName>`` of the first
   party whose selector matches it (party mode). Cluster and party virtual nodes exist even with
   no member (Ready=False, no capacity), so a leaf briefly without nodes does not make them flap.
2. Capacity = allocatable = the sum of ``status.allocatable`` over the *usable* members (Ready,
   schedulable, not being deleted) minus what the leaf's pods that are not ours use there:
   their effective requests (the scheduler's :func:`scheduler.podutil.pod_requests`:
   max(init containers, containers + sidecars) + overhead) and one ``pods`` slot each. Pods
   bound to a usable member count against that leaf node, floored at zero per leaf node (one
   overcommitted node does not eat its neighbours' room); Pending pods with no node yet
   (Kosmos ignores them and overcommits) count against every virtual node having a usable member
   the pod's nodeSelector and required node affinity accept: the leaf's scheduler may put them
   on any of those. Terminal pods (Succeeded, Failed) count for nothing. "Ours" are the pods this
   root put there (label :data:`tree.identity.ROOT_LABEL` = this root's id): the root scheduler counts them
   already. Nothing goes below zero.
3. Labels: ``kosmos.io/node=true``, ``kosmos.io/cluster``, ``kubernetes.io/hostname``, the
   model's labels, and the :data:`AGREED_LABELS` (region, zone, os, arch) when every member has
   the same value; in node mode the leaf node's own labels too (``node-role.kubernetes.io/*``
   and ``kosmos.io/*`` excepted). Taints: ``kosmos.io/node=true:NoSchedule``, the model's, and in
   node mode the leaf node's (lifecycle taints ``node.kubernetes.io/*`` excepted: the root's own
   controllers set those).
4. The Ready condition: False ``LeafUnreachable`` when the leaf's API has not answered past the
   threshold (the caller decides, passes ``unreachable``), else False ``LeafNodesNotReady`` with
   no usable member, else True ``LeafReady``. Messages carry no clock, so an unchanged state is
   an unchanged object (no write).
5. The NetworkUnavailable condition, only when the fabric is asked (``network`` given; see
   :func:`network_condition`, which decides it from the fabric's reachability record of the
   pair root -> leaf).
6. The leaf room of each member (:class:`LeafRoom`), from the same walk over the same pods as
   step 2: what :func:`leaf_resources` publishes as the virtual node's add-on record, with the
   leaf's Pending pods that may land on a member (:class:`PendingPod`, ours too, with their root
   UID): the scheduler's per-node view holds room for them (``scheduler.leafview``).
7. The kubelet endpoint: every virtual node has the manager's kubelet server (:mod:`tree.kubelet`)
   as its InternalIP and kubelet port, when one is given.

The record (:func:`leaf_resources`, kind :data:`RECORD_KIND`, named after the virtual node) is
JSON with sorted keys and no clock, so an unchanged leaf gives identical bytes and the
publisher's version does not move (``README.md``, "ClusterTree", has the schema).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fabric.control.reachability import PairState
from scheduler.framework import Resource
from scheduler.podutil import QuantityError, pod_requests, resource_list
from scheduler.policy import LEAF_NODE_LABEL, LEAF_TAINT
from scheduler.selectors import RequiredNodeAffinity
from tree.identity import ROOT_UID_LABEL, is_ours
from tree.spec import LeafModel, Mode, TreeSpec

_log = logging.getLogger(__name__)

Obj = dict[str, Any]

CLUSTER_LABEL = "kosmos.io/cluster"
HOSTNAME_LABEL = "kubernetes.io/hostname"
#: Labels copied from the members when they all agree.
AGREED_LABELS = ("topology.kubernetes.io/region", "topology.kubernetes.io/zone", "kubernetes.io/os",
                 "kubernetes.io/arch")
#: Leaf node labels and taints never copied in node mode (the root's own, or ours).
_SKIPPED_LABEL_PREFIXES = ("node-role.kubernetes.io/", "kosmos.io/")
_SKIPPED_TAINT_PREFIX = "node.kubernetes.io/"

READY, NOT_READY = "True", "False"
REASON_READY = "LeafReady"
REASON_UNREACHABLE = "LeafUnreachable"
REASON_NO_NODES = "LeafNodesNotReady"

#: The add-on record kind of a virtual node's leaf room; the record's name is the virtual node's.
RECORD_KIND = "tree.kosmos.io/leaf-resources"
#: ``schema`` of the record's JSON: bumped only for a change old readers would misread.
RECORD_SCHEMA = "tree.kosmos.io/leaf-resources/v1"
#: Leaf node labels a record carries per node (what placement inside the leaf looks at).
PLACEMENT_LABELS = (HOSTNAME_LABEL, *AGREED_LABELS)

NETWORK_UNAVAILABLE = "NetworkUnavailable"
REASON_FABRIC_UNREACHABLE = "KosmosFabricUnreachable"
REASON_FABRIC_REACHABLE = "KosmosFabricReachable"


@dataclass(frozen=True)
class NetworkCondition:
    """A virtual node's ``NetworkUnavailable`` condition as the fabric says it: ``status``
    "True" (the fabric cannot reach the leaf) or "False"; "" = the fabric is asked but has not
    answered yet (the Node keeps the condition it has, so a reflector restart flaps nothing)."""

    status: str
    reason: str = ""
    message: str = ""

    @property
    def known(self) -> bool:
        return bool(self.status)


#: The fabric is asked but its answer is not known yet.
NETWORK_UNKNOWN = NetworkCondition("")


@dataclass(frozen=True)
class LeafRoom:
    """One member leaf node as its virtual node's record tells it. ``free``: allocatable minus
    the requests of every pod bound to it that is not terminal, ours included (what the leaf's
    own scheduler sees), never below zero; ``pods``: those pods; ``our_pods``: how many of them
    this root put there. Pending pods without a node are in no node's ``free``. ``taints``:
    the leaf node's hard taints (NoSchedule/NoExecute; lifecycle ``node.kubernetes.io/*`` ones
    left out, as for virtual node taints: ``ready``/``schedulable`` say what they say), as
    ``{key, value, effect}`` sorted: a pod the leaf copy does not tolerate them for cannot land
    there, and the scheduler's per-node view must know it."""

    name: str
    ready: bool
    schedulable: bool
    allocatable: dict[str, str]
    free: dict[str, str]
    pods: int
    our_pods: int
    labels: dict[str, str]
    taints: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class PendingPod:
    """One leaf pod without a node yet, as its virtual node's record tells it: its effective
    request (``requests``, one ``pods`` slot included) and, for a copy of this root's pod, the
    root pod's UID (``root_uid``: the scheduler may already hold room for it under that UID)."""

    requests: dict[str, str]
    root_uid: str = ""


@dataclass
class VirtualNode:
    """One virtual node as it should be; :mod:`tree.vnode` turns it into API writes."""

    name: str
    mode: Mode
    model: str  # the party's leafNodeName, or ""
    labels: dict[str, str]
    taints: list[Obj]
    resources: dict[str, str]  # capacity = allocatable
    ready: str  # "True"/"False"
    reason: str
    message: str
    members: tuple[str, ...] = ()
    node_info: dict[str, str] = field(default_factory=dict)
    #: None: the fabric is not asked (no condition on the Node); see :class:`NetworkCondition`.
    network: NetworkCondition | None = None
    #: Every member's room, by name (the record's ``nodes``).
    leaves: tuple[LeafRoom, ...] = ()
    #: The leaf's Pending pods with no node yet that may land on a member (the record's
    #: ``pending``): what the scheduler's per-node view holds room for (:class:`PendingPod`).
    pending: tuple[PendingPod, ...] = ()
    #: The tree manager's kubelet server (:mod:`tree.kubelet`): the Node's InternalIP and
    #: ``daemonEndpoints.kubeletEndpoint.Port``, where the root API server sends ``pods/log`` and
    #: ``pods/exec``; "" and 0: not set.
    address: str = ""
    kubelet_port: int = 0


def is_usable(node: Obj) -> bool:
    """Ready, schedulable and not being deleted: a leaf node whose room counts."""
    if (node.get("metadata") or {}).get("deletionTimestamp") or (node.get("spec") or {}).get("unschedulable"):
        return False
    return is_ready(node)


def is_ready(node: Obj) -> bool:
    conds = (node.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _requested(r: Resource) -> list[str]:
    """The names of the resources ``r`` asks a positive amount of (``pods`` always)."""
    out = [k for k, v in (("cpu", r.milli_cpu), ("memory", r.memory), ("ephemeral-storage", r.ephemeral_storage))
           if v > 0]
    return [*out, "pods", *(k for k, v in r.scalar.items() if v > 0)]


def format_resources(r: Resource, names: Iterable[str]) -> dict[str, str]:
    """A ResourceList (strings, as the API writes them) for ``names``, never below zero."""
    out: dict[str, str] = {}
    for n in sorted(set(names) | {"cpu", "memory", "pods"}):
        if n == "cpu":
            m = max(0, r.milli_cpu)
            out[n] = str(m // 1000) if m % 1000 == 0 else f"{m}m"
        elif n == "memory":
            out[n] = str(max(0, r.memory))
        elif n == "ephemeral-storage":
            out[n] = str(max(0, r.ephemeral_storage))
        elif n == "pods":
            out[n] = str(max(0, r.allowed_pod_number))
        else:
            out[n] = str(max(0, r.scalar.get(n, 0)))
    return out


def _membership(spec: TreeSpec, nodes: Iterable[Obj]) -> dict[str, tuple[LeafModel | None, list[Obj]]]:
    """Virtual node name -> (its model, its member leaf nodes)."""
    out: dict[str, tuple[LeafModel | None, list[Obj]]] = {}
    if spec.mode is Mode.CLUSTER:
        out[spec.cluster_node_name] = (spec.model_for({}), [])
    elif spec.mode is Mode.PARTY:
        for m in spec.models:
            out[spec.party_node_name(m)] = (m, [])
    for n in sorted(nodes, key=lambda n: str(n["metadata"]["name"])):
        if n["metadata"].get("deletionTimestamp"):
            continue
        if spec.mode is Mode.CLUSTER:
            out[spec.cluster_node_name][1].append(n)
        elif spec.mode is Mode.PARTY:
            party = spec.model_for(n)
            if party is not None:
                out[spec.party_node_name(party)][1].append(n)
        else:
            model = spec.model_for(n) if spec.models else None
            if model is not None or not spec.models:
                out[str(n["metadata"]["name"])] = (model, [n])
    return out


def _agreed(members: list[Obj], key: str) -> str | None:
    values = {((n["metadata"].get("labels") or {}).get(key)) for n in members}
    if len(values) != 1:
        return None
    return values.pop()


def virtual_nodes(spec: TreeSpec, nodes: Iterable[Obj], pods: Iterable[Obj], *, root_id: str,
                  unreachable: str | None = None, kubelet_version: str = "",
                  network: NetworkCondition | None = None, address: str = "",
                  kubelet_port: int = 0) -> dict[str, VirtualNode]:
    """The virtual nodes ``spec``'s Cluster should have, by name (see the module's steps);
    ``address`` and ``kubelet_port``: where this manager's kubelet server listens (step 7)."""
    groups = _membership(spec, nodes)
    alloc_of: dict[str, Resource] = {}  # member leaf node with a readable allocatable -> it
    node_free: dict[str, Resource] = {}  # usable leaf node -> what pods not ours leave
    names: dict[str, set[str]] = {}
    usable_of: dict[str, list[Obj]] = {}
    for vname, (_model, members) in groups.items():
        keys: set[str] = set()
        usable: list[Obj] = []
        for n in members:
            nname = str(n["metadata"]["name"])
            alloc = (n.get("status") or {}).get("allocatable") or {}
            try:
                alloc_of[nname] = resource_list(alloc, f"leaf node {nname} status.allocatable")
            except QuantityError as e:
                _log.warning("Cluster %s: %s; the node counts for nothing", spec.cluster, e)
                continue
            if not is_usable(n):
                continue
            node_free[nname] = _plus(Resource(), alloc_of[nname])
            keys |= set(alloc)
            usable.append(n)
        names[vname], usable_of[vname] = keys, usable
    used: dict[str, tuple[Resource, int, int]] = {}  # leaf node -> (requests of all its pods, pods, ours)
    pending: list[tuple[Obj, Resource]] = []
    for p in pods:
        if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):  # pod_footprint reads the same
            continue
        try:
            req = pod_requests(p)
        except QuantityError as e:
            _log.warning("Cluster %s: %s; the pod counts as one pod slot only", spec.cluster, e)
            req = Resource()
        req.allowed_pod_number = 1
        ours = is_ours(p, root_id)
        node_name = str((p.get("spec") or {}).get("nodeName") or "")
        if node_name:
            total, count, mine = used.get(node_name) or (Resource(), 0, 0)
            total.add(req)
            used[node_name] = (total, count + 1, mine + ours)
        else:
            pending.append((p, req))
        if ours:
            continue
        if node_name in node_free:
            node_free[node_name].sub(req)
    free: dict[str, Resource] = {}
    waiting: dict[str, tuple[PendingPod, ...]] = {}
    for vname, usable in usable_of.items():
        total = Resource()
        for n in usable:
            total.add(_floor(node_free[str(n["metadata"]["name"])]))  # one node's excess is not another's loss
        here: list[tuple[str, PendingPod]] = []
        for p, req in pending:
            affinity = RequiredNodeAffinity(p)
            if usable and (affinity.trivial or any(affinity.match(n) for n in usable)):
                who = is_ours(p, root_id)
                if not who:  # ours are counted by the root's scheduler already
                    total.sub(req)
                meta = p.get("metadata") or {}
                root_uid = str((meta.get("labels") or {}).get(ROOT_UID_LABEL) or "") if who else ""
                key = f"{meta.get('namespace')}/{meta.get('name')}"
                here.append((key, PendingPod(format_resources(req, _requested(req)), root_uid)))
        free[vname] = total
        waiting[vname] = tuple(pp for _k, pp in sorted(here, key=lambda kv: kv[0]))
    out: dict[str, VirtualNode] = {}
    for vname, (model, members) in groups.items():
        vn = _forge(spec, vname, model, members, usable_of[vname], format_resources(free[vname], names[vname]),
                    unreachable, kubelet_version)
        vn.network = network
        vn.address, vn.kubelet_port = address, kubelet_port
        vn.leaves = tuple(_room(n, alloc_of, used) for n in members)
        vn.pending = waiting.get(vname, ())
        out[vname] = vn
    return out


def _room(node: Obj, alloc_of: Mapping[str, Resource], used: Mapping[str, tuple[Resource, int, int]]) -> LeafRoom:
    name = str(node["metadata"]["name"])
    alloc = alloc_of.get(name)
    keys = set((node.get("status") or {}).get("allocatable") or {}) if alloc is not None else set()
    total, count, ours = used.get(name) or (Resource(), 0, 0)
    left = _plus(Resource(), alloc or Resource())
    left.sub(total)
    labels = (node["metadata"].get("labels") or {})
    return LeafRoom(name=name, ready=is_ready(node),
                    schedulable=not (node.get("spec") or {}).get("unschedulable")
                    and not node["metadata"].get("deletionTimestamp"),
                    allocatable=format_resources(alloc or Resource(), keys), free=format_resources(left, keys),
                    pods=count, our_pods=ours,
                    labels={k: str(labels[k]) for k in PLACEMENT_LABELS if k in labels},
                    taints=_hard_taints(node))


#: Taint effects that keep a pod without a toleration off a node (PreferNoSchedule does not).
_HARD_EFFECTS = ("NoSchedule", "NoExecute")


def _hard_taints(node: Obj) -> tuple[tuple[str, str, str], ...]:
    """The leaf node's hard taints as sorted (key, value, effect), the lifecycle ones
    (:data:`_SKIPPED_TAINT_PREFIX`) left out; a malformed entry (not an object) is skipped."""
    out: set[tuple[str, str, str]] = set()
    for t in (node.get("spec") or {}).get("taints") or ():
        if not isinstance(t, Mapping) or t.get("effect") not in _HARD_EFFECTS:
            continue
        key = str(t.get("key") or "")
        if key.startswith(_SKIPPED_TAINT_PREFIX):
            continue
        out.add((key, str(t.get("value") or ""), str(t["effect"])))
    return tuple(sorted(out))


def pod_footprint(pod: Obj, root_id: str) -> tuple[bool, bool, Any]:
    """What :func:`virtual_nodes` reads of a pod: terminal or not, ours or not, its spec (requests,
    ``nodeName``, node selector and affinity). Two versions of a pod with the same footprint give
    the same virtual nodes, so a change that keeps it (the pod's status going Pending -> Running,
    its conditions, annotations) needs no new pass."""
    return ((pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"), is_ours(pod, root_id),
            pod.get("spec"))


def leaf_resources(vn: VirtualNode, cluster: str) -> bytes:
    """The add-on record of ``vn`` (:data:`RECORD_KIND`): its leaf's room per member node, as
    canonical JSON (sorted keys, no clock), so equal content is equal bytes. A node's ``taints``
    (its hard taints, :class:`LeafRoom`) is written only when it has some: an untainted node's
    entry is what it was, and a reader that does not know the field sees the node as before
    (untainted), which is no misreading of the rest; hence no schema bump."""
    doc = {
        "schema": RECORD_SCHEMA,
        "cluster": cluster,
        "virtualNode": vn.name,
        "mode": str(vn.mode),
        "model": vn.model,
        "ready": vn.ready == READY,
        "reason": vn.reason,
        "allocatable": vn.resources,
        "nodes": [_room_doc(r) for r in vn.leaves],
    }
    if vn.pending:  # written only when there are some: a leaf with none gives the bytes it gave before
        doc["pending"] = [{"requests": pp.requests, **({"rootUID": pp.root_uid} if pp.root_uid else {})}
                          for pp in vn.pending]
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _room_doc(r: LeafRoom) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": r.name, "ready": r.ready, "schedulable": r.schedulable,
                           "allocatable": r.allocatable, "free": r.free, "pods": r.pods, "ourPods": r.our_pods,
                           "labels": r.labels}
    if r.taints:
        doc["taints"] = [{"key": k, "value": v, "effect": e} for k, v, e in r.taints]
    return doc


def network_condition(root: str, leaf: str, pair: PairState | None,
                      clusters: Collection[str] | None) -> NetworkCondition:
    """``NetworkUnavailable`` of leaf cluster ``leaf``'s virtual nodes as root cluster ``root``
    sees it, from the fabric's reachability records (:mod:`fabric.control.reachability`; the
    reflector derives them, :mod:`fabric.control.reachability_rules`). The first that applies:

    1. ``pair``, the record ``<root>/<leaf>``: True ``KosmosFabricUnreachable`` when it says
       unreachable, else False ``KosmosFabricReachable``; the message is the record's reason.
       Its RTT and loss are left out, so a record that changes only those changes no Node;
    2. no record, and ``clusters`` (every cluster the reflector's records name: its
       configuration, as it publishes a record for every ordered pair of configured clusters)
       lacks ``root`` or ``leaf``: True, that cluster is not in the fabric's configuration;
       ``leaf`` the root's own fabric cluster: False (there is no pair to ask about);
    3. otherwise (``clusters`` None: the reflector has given no answer yet; or a record that
       did not decode) :data:`NETWORK_UNKNOWN`: the Node keeps what it says.

    Pure: the same record and names give the same condition, so an unchanged answer is no write."""
    if pair is not None and pair.source == root and pair.target == leaf:
        if pair.reachable:
            return NetworkCondition("False", REASON_FABRIC_REACHABLE, pair.reason)
        return NetworkCondition("True", REASON_FABRIC_UNREACHABLE, pair.reason)
    if clusters is None:
        return NETWORK_UNKNOWN
    for name, role in ((root, "root"), (leaf, "leaf")):
        if name not in clusters:
            return NetworkCondition("True", REASON_FABRIC_UNREACHABLE,
                                    f"the {role} cluster {name} is not in the Kosmos fabric's configuration")
    if root == leaf:
        return NetworkCondition("False", REASON_FABRIC_REACHABLE,
                                f"the leaf cluster {leaf} is the root's own cluster in the Kosmos fabric")
    return NETWORK_UNKNOWN


def _floor(r: Resource) -> Resource:
    return Resource(max(0, r.milli_cpu), max(0, r.memory), max(0, r.ephemeral_storage), max(0, r.allowed_pod_number),
                    {k: max(0, v) for k, v in r.scalar.items()})


def _plus(r: Resource, other: Resource) -> Resource:
    r.add(other)
    return r


def _forge(spec: TreeSpec, name: str, model: LeafModel | None, members: list[Obj], usable: list[Obj],
           resources: dict[str, str], unreachable: str | None, kubelet_version: str) -> VirtualNode:
    labels: dict[str, str] = {}
    taints: list[Obj] = [dict(LEAF_TAINT)]
    if spec.mode is Mode.NODE and members:
        leaf = members[0]
        labels.update({k: v for k, v in ((leaf["metadata"].get("labels") or {}).items())
                       if not k.startswith(_SKIPPED_LABEL_PREFIXES)})
        taints += [dict(t) for t in (leaf.get("spec") or {}).get("taints") or ()
                   if not str(t.get("key", "")).startswith(_SKIPPED_TAINT_PREFIX) and t.get("key") != LEAF_TAINT["key"]]
    for key in AGREED_LABELS:
        agreed = _agreed(members, key) if members else None
        if agreed is not None:
            labels[key] = agreed
        else:
            labels.pop(key, None)
    if model is not None:
        labels.update(model.labels)
        taints += [dict(t) for t in model.taints if all(_taint_id(t) != _taint_id(o) for o in taints)]
    labels[LEAF_NODE_LABEL] = "true"
    labels[CLUSTER_LABEL] = spec.cluster
    if len(name) <= 63:
        labels[HOSTNAME_LABEL] = name
    else:
        labels.pop(HOSTNAME_LABEL, None)
    what = {Mode.CLUSTER: f"leaf cluster {spec.cluster}", Mode.NODE: f"leaf node {name} of {spec.cluster}",
            Mode.PARTY: f"party {model.name if model else '?'} of leaf cluster {spec.cluster}"}[spec.mode]
    if unreachable is not None:
        ready, reason, message = NOT_READY, REASON_UNREACHABLE, unreachable
    elif not usable:
        ready, reason = NOT_READY, REASON_NO_NODES
        message = f"{what}: none of its {len(members)} leaf node(s) is Ready and schedulable"
    else:
        ready, reason = READY, REASON_READY
        message = f"{what}: {len(usable)} of {len(members)} leaf node(s) Ready and schedulable"
    info = {"kubeletVersion": kubelet_version} if kubelet_version else {}
    for key, field_name in (("kubernetes.io/os", "operatingSystem"), ("kubernetes.io/arch", "architecture")):
        if key in labels:
            info[field_name] = labels[key]
    return VirtualNode(name=name, mode=spec.mode, model=model.name if (model and spec.mode is Mode.PARTY) else "",
                       labels=labels, taints=taints, resources=resources, ready=ready, reason=reason, message=message,
                       members=tuple(str(n["metadata"]["name"]) for n in members), node_info=info)


def _taint_id(t: Mapping[str, Any]) -> tuple[str, str]:
    return (str(t.get("key", "")), str(t.get("effect", "")))
