"""The scheduling framework's contract: what a plugin sees and returns, after kube-scheduler's
``pkg/scheduler/framework`` (interface.go, types.go, cycle_state.go).

One scheduling cycle for one pod, in order (upstream's extension points, the ones we run):

1. ``PreFilter`` once per pod: compute what the filters need (parsed affinity, topology counts)
   into the :class:`CycleState`; may narrow the candidate nodes (:class:`PreFilterResult`) or
   reject the pod outright.
2. ``Filter`` per candidate node (a sample of the nodes, ``percentageOfNodesToScore``): any
   non-success rejects the node; the reasons are collected per node for the FailedScheduling
   message (``0/7 nodes are available: 3 Insufficient cpu, ...``).
3. ``PreScore`` once over the feasible nodes, ``Score`` per feasible node (0..100), then
   ``NormalizeScore`` per plugin over all nodes, weights applied, highest total wins (ties broken
   at random among the best, as upstream's ``selectHost``).
4. ``Reserve`` (assume: the pod counts on the node in the cache before the bind lands),
   ``PreBind`` (e.g. volume binding), then the bind through ``pods/binding``; a failure after
   Reserve calls ``Unreserve`` in reverse order and forgets the assumed pod.

Plugins are plain objects implementing any subset of the protocols below; the profile (see
``scheduler.profile``) lists them per extension point with weights, like a
KubeSchedulerConfiguration. Pods and nodes are the API's JSON objects (dicts), parsed once into
:class:`PodInfo` / :class:`NodeInfo` where the hot paths need typed values.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Obj = dict[str, Any]

#: Upstream's score range (framework.MinNodeScore / MaxNodeScore).
MIN_NODE_SCORE = 0
MAX_NODE_SCORE = 100


class Code(enum.IntEnum):
    """framework.Code: how a plugin's answer is to be taken."""

    SUCCESS = 0
    ERROR = 1  # an internal error: the pod is retried with back-off, the node is not blamed
    UNSCHEDULABLE = 2  # this node cannot take the pod now; preemption or a change may help
    UNSCHEDULABLE_AND_UNRESOLVABLE = 3  # this node will never take the pod (e.g. node affinity)
    WAIT = 4  # Permit only
    SKIP = 5  # PreFilter/PreScore: this plugin has nothing to do for this pod


@dataclass(frozen=True)
class Status:
    """A plugin's answer. ``reasons`` are the texts counted in FailedScheduling messages
    (``Insufficient cpu``, ``node(s) didn't match Pod's node affinity/selector``)."""

    code: Code = Code.SUCCESS
    reasons: tuple[str, ...] = ()
    plugin: str = ""

    @property
    def ok(self) -> bool:
        return self.code == Code.SUCCESS

    @property
    def rejected(self) -> bool:
        return self.code in (Code.UNSCHEDULABLE, Code.UNSCHEDULABLE_AND_UNRESOLVABLE)

    def with_plugin(self, name: str) -> Status:
        return Status(self.code, self.reasons, name)

    def message(self) -> str:
        return ", ".join(self.reasons)


SUCCESS = Status()
SKIP = Status(Code.SKIP)


def unschedulable(*reasons: str) -> Status:
    return Status(Code.UNSCHEDULABLE, tuple(reasons))


def unresolvable(*reasons: str) -> Status:
    return Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE, tuple(reasons))


def error(message: str) -> Status:
    return Status(Code.ERROR, (message,))


@dataclass
class Resource:
    """framework.Resource: cpu in millicores, memory and ephemeral storage in bytes, the number
    of pods, and extended/scalar resources by name (``example.com/gpu``, ``hugepages-2Mi``)."""

    milli_cpu: int = 0
    memory: int = 0
    ephemeral_storage: int = 0
    allowed_pod_number: int = 0
    scalar: dict[str, int] = field(default_factory=dict)

    def add(self, other: Resource) -> None:
        self.milli_cpu += other.milli_cpu
        self.memory += other.memory
        self.ephemeral_storage += other.ephemeral_storage
        self.allowed_pod_number += other.allowed_pod_number
        for k, v in other.scalar.items():
            self.scalar[k] = self.scalar.get(k, 0) + v

    def sub(self, other: Resource) -> None:
        self.milli_cpu -= other.milli_cpu
        self.memory -= other.memory
        self.ephemeral_storage -= other.ephemeral_storage
        self.allowed_pod_number -= other.allowed_pod_number
        for k, v in other.scalar.items():
            self.scalar[k] = self.scalar.get(k, 0) - v


@dataclass
class PodInfo:
    """framework.PodInfo: the pod plus what every cycle would otherwise re-parse. ``requests``
    is the effective request (upstream ``resource.PodRequests``: max(sum of containers and
    restartable init containers, each init container) + overhead); ``non_zero_requests`` uses
    upstream's defaults (100m cpu, 200Mi memory) for containers that request nothing, for scoring."""

    pod: Obj
    requests: Resource
    non_zero_requests: Resource
    #: ``spec.affinity.podAffinity``/``podAntiAffinity`` required and preferred terms, as given.
    required_affinity: list[Obj] = field(default_factory=list)
    required_anti_affinity: list[Obj] = field(default_factory=list)
    preferred_affinity: list[Obj] = field(default_factory=list)
    preferred_anti_affinity: list[Obj] = field(default_factory=list)

    @property
    def key(self) -> str:
        m = self.pod["metadata"]
        return f"{m.get('namespace', '')}/{m['name']}"

    @property
    def uid(self) -> str:
        return str(self.pod["metadata"].get("uid", ""))


@dataclass
class NodeInfo:
    """framework.NodeInfo: a node and the pods on it (assumed ones included), with running
    totals the filters read in O(1). ``generation`` grows on every change, so snapshots can
    copy only what changed."""

    node: Obj
    pods: list[PodInfo] = field(default_factory=list)
    pods_with_affinity: list[PodInfo] = field(default_factory=list)
    pods_with_required_anti_affinity: list[PodInfo] = field(default_factory=list)
    requested: Resource = field(default_factory=Resource)
    non_zero_requested: Resource = field(default_factory=Resource)
    allocatable: Resource = field(default_factory=Resource)
    #: (protocol, hostIP, hostPort) in use on the node.
    used_ports: set[tuple[str, str, int]] = field(default_factory=set)
    #: "namespace/claim" -> number of pods on the node using it.
    pvc_ref_counts: dict[str, int] = field(default_factory=dict)
    generation: int = 0

    @functools.cached_property
    def name(self) -> str:
        """The node's name, read once: a NodeInfo stands for one node for its whole life (the
        node object may be replaced, its name never changes), and the plugins key their tables
        by it in loops over every node."""
        return str(self.node["metadata"]["name"])

    @property
    def labels(self) -> Mapping[str, str]:
        return self.node["metadata"].get("labels") or {}


class CycleState:
    """Per-pod, per-cycle scratch space shared by the plugins of one profile (framework.CycleState).
    Keys are plugin-chosen strings; values are whatever the plugin stored."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        #: Set by the scheduler: skip this plugin's Filter/Score (it answered SKIP in Pre*).
        self.skip_filter: set[str] = set()
        self.skip_score: set[str] = set()

    def write(self, key: str, value: Any) -> None:
        self._data[key] = value

    def read(self, key: str) -> Any:
        """The value stored under ``key``; KeyError if the PreFilter that writes it did not run."""
        return self._data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def clone(self) -> CycleState:
        c = CycleState()
        c._data = dict(self._data)
        c.skip_filter = set(self.skip_filter)
        c.skip_score = set(self.skip_score)
        return c


@dataclass(frozen=True)
class PreFilterResult:
    """framework.PreFilterResult: the only nodes worth filtering (None: all of them)."""

    node_names: frozenset[str] | None = None


@dataclass(frozen=True)
class ClusterEvent:
    """framework.ClusterEvent: a change that may make an unschedulable pod schedulable
    (resource ``Pod``/``Node``/``PersistentVolumeClaim``/..., action ``Add``/``Update``/``Delete``)."""

    resource: str
    action: str


class Snapshot(Protocol):
    """The cache's view for one cycle (``framework.SharedLister``): every node with its pods."""

    def node_infos(self) -> list[NodeInfo]: ...

    def get(self, node_name: str) -> NodeInfo | None: ...

    def have_pods_with_affinity(self) -> list[NodeInfo]: ...

    def have_pods_with_required_anti_affinity(self) -> list[NodeInfo]: ...


class Handle(Protocol):
    """What the framework hands its plugins (``framework.Handle``): the cycle's snapshot, the
    listers of the other informers (PVCs, PVs, StorageClasses, Services, policies) and the API
    client for PreBind writes."""

    def snapshot(self) -> Snapshot: ...

    def lister(self, resource: str) -> Mapping[str, Obj]:
        """Cached objects of ``resource`` (``persistentvolumeclaims``, ``persistentvolumes``,
        ``storageclasses``, ``services``, ``distributionpolicies``, ...) by ``ns/name`` or name."""
        ...


@runtime_checkable
class Plugin(Protocol):
    name: str


@runtime_checkable
class PreFilterPlugin(Plugin, Protocol):
    def pre_filter(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> tuple[PreFilterResult | None,
                                                                                          Status]: ...


@runtime_checkable
class FilterPlugin(Plugin, Protocol):
    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status: ...


@runtime_checkable
class FilterFactoryPlugin(FilterPlugin, Protocol):
    """Optional, for the hot path (an addition to upstream's interface, same semantics): a filter
    plugin may compile its Filter for one pod once per cycle. ``filter_fn`` returns a function
    of the node giving exactly what ``filter(state, pod, node)`` would, or None when ``filter``
    would pass every node for this pod (the framework then does not call it: e.g. NodeName for
    a pod without ``spec.nodeName``). The pod's data is read once instead of once per node."""

    def filter_fn(self, state: CycleState, pod: PodInfo) -> Callable[[NodeInfo], Status] | None: ...


@runtime_checkable
class PreScorePlugin(Plugin, Protocol):
    def pre_score(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> Status: ...


@runtime_checkable
class ScorePlugin(Plugin, Protocol):
    def score(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> tuple[int, Status]: ...


@runtime_checkable
class BatchScorePlugin(ScorePlugin, Protocol):
    """Optional, for the hot path (an addition to upstream's interface, same semantics): a score
    plugin may also score all feasible nodes in one call, returning the list of ``score`` results
    in the nodes' order (no per-node Status: a plugin that can fail per node does not implement
    it). The framework prefers it; a call per node and a Status tuple per node cost more than the
    arithmetic of the cheap scorers at hundreds of nodes per pod."""

    def score_nodes(self, state: CycleState, pod: PodInfo, nodes: list[NodeInfo]) -> list[int]: ...


@runtime_checkable
class NormalizeScorePlugin(Plugin, Protocol):
    """Score plugins that also rescale their raw scores to 0..100 over all feasible nodes."""

    def normalize_score(self, state: CycleState, pod: PodInfo, scores: dict[str, int]) -> Status: ...


@runtime_checkable
class ReservePlugin(Plugin, Protocol):
    def reserve(self, state: CycleState, pod: PodInfo, node_name: str) -> Status: ...

    def unreserve(self, state: CycleState, pod: PodInfo, node_name: str) -> None: ...


@runtime_checkable
class PreBindPlugin(Plugin, Protocol):
    def pre_bind(self, state: CycleState, pod: PodInfo, node_name: str) -> Status: ...


@runtime_checkable
class EnqueueExtensions(Plugin, Protocol):
    """Plugins that can reject pods say which cluster events may change their mind, so the queue
    moves only those pods out of the unschedulable part (upstream ``EventsToRegister``)."""

    def events_to_register(self) -> Iterable[ClusterEvent]: ...


def default_normalize(scores: dict[str, int], reverse: bool = False) -> None:
    """Upstream's ``helper.DefaultNormalizeScore``: scale to 0..100 by the maximum (reversed:
    100 - scaled), in place."""
    top = max(scores.values(), default=0)
    if top == 0:
        if reverse:  # every node alike (e.g. no taints anywhere): one C-level update
            scores.update(dict.fromkeys(scores, MAX_NODE_SCORE))
        return
    for k, v in scores.items():
        s = MAX_NODE_SCORE * v // top
        scores[k] = MAX_NODE_SCORE - s if reverse else s
