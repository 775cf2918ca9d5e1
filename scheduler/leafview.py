"""The per-node view of one leaf cluster behind a virtual node: "does this pod fit on some real
node of the leaf" and "how many of these fit", with placements in flight reserved (issue 19,
items 1 and 2).

Why: a virtual node advertises the SUM of its leaf's free resources, so a 12-CPU pod passes a
virtual node whose ten leaf nodes have 8 free CPUs each and then sits Pending in the leaf. The
tree manager publishes per virtual node a record (``tree.kosmos.io/leaf-resources``, see
``tree/forge.py``) with every member leaf node's free resources and placement labels; a
:class:`LeafView` is built from it and answers per node.

Flow:

1. :func:`parse_record` turns the record's JSON into immutable :class:`LeafNode` values (free
   vector, placement labels, hard taints when the record carries ``taints``, usable = ready and
   schedulable). The caller's dicts are never kept.
2. :meth:`LeafView.apply_record` diffs them against the view: only the leaf nodes whose value
   changed are moved (:meth:`LeafView.upsert_node` / :meth:`LeafView.remove_node`); an unchanged
   leaf node costs one equality test. Reservations the record accounts for are dropped (that
   record counts their pods in the node's ``free``): on a leaf node that changed, those the
   caller confirmed (:meth:`LeafView.confirm`: the leaf bound the pod there) and, when the
   node's ``ourPods`` rose by k, the oldest others up to k in all. A record where the node is
   unchanged was written before the bind (records move only when their content does), so the
   reservation stays; :meth:`LeafView.expire` is the backstop. The record's ``pending`` (the
   leaf's Pending pods with no node yet) is held as reservations without a deadline on their
   best-fit nodes (:meth:`LeafView._hold_pending`), but a copy of ours that already has one.
3. A pod's leaf placement (:class:`Placement`: node selector, required node affinity,
   tolerations, as the leaf scheduler will see them) and its request (:class:`Demand`) are asked
   with :meth:`LeafView.fits` and :meth:`LeafView.count`; :meth:`LeafView.candidates` lists the
   free vectors of the tightest leaf nodes where it fits (the fragmentation score's input,
   :mod:`scheduler.fragmentation`; kept per class and demand until a shape that belongs in the
   list appears or goes, and per view until any node changes: the score asks every view for
   every pod, and between two pods only one leaf changes).
4. :meth:`LeafView.assume` reserves a pod's request on one concrete leaf node (best fit, below,
   or the node a score chose, ``prefer``, while it still fits);
   :meth:`LeafView.forget` releases it (refused, bind failed, deleted); :meth:`LeafView.expire`
   drops reservations past their deadline. Reserved requests are subtracted from their node's
   free in every answer.

The structure (per view):

- Usable leaf nodes are grouped into *classes*: equal placement labels except the hostname, and
  equal hard (NoSchedule/NoExecute) taints. A fleet has few classes (zones x arch x taints), and
  a placement that does not name the hostname (or ``metadata.name``) matches a whole class or
  none of it, so it is evaluated once per class, not per node (cached per placement).
- Inside a class, leaf nodes with an identical *effective* free vector (record free minus
  reservations) are grouped into one *shape* with a multiplicity; the shapes are also kept in a
  list sorted by free cpu (``bisect``), so a cold question starts at the first shape with the
  demand's cpu and can stop early.
- Every class keeps, for each recently asked :class:`Demand` (the *tracked* demands, an LRU of
  :data:`TRACKED` entries shared by the classes), the number of pods of that demand that fit in
  the class (sum over nodes of ``min over resources of floor(free / request)``) and the number
  of its nodes where at least one fits. A node's change adjusts every tracked figure of its class
  by ``new - old`` for that one node: no pass over the class.

Complexity (n usable leaf nodes, S distinct shapes (<= n), C classes, K tracked demands, d
resources a demand names):

- ``fits``/``count`` of a tracked demand: O(C) (a sum over the matching classes; C is small).
- ``fits`` of a demand not tracked: the shapes from the most cpu down, stopping at the first
  fit: O(d) when the biggest node fits, O(S d) at worst (a pod that fits nowhere for a resource
  other than cpu). Asked a second time, the demand is tracked.
- ``count`` of a demand not tracked: one pass over the shapes with enough cpu, O(S d), then it
  is tracked.
- A placement naming the hostname or ``metadata.name``: a pass over the nodes of the matching
  classes, O(n d) (rare: such a pod names one node).
- A leaf node's change (record delta, reservation, release): O(K d) plus O(log S) to keep the
  sorted list (and an O(S) memmove in C when a shape appears or goes).
- ``apply_record`` with one changed node: O(n) for the whole document (JSON decoding, an equality
  test per node; unchanged nodes are not parsed again, :func:`parse_record`'s cache) plus one
  change above; never a rebuild.
- ``assume``: the best-fit scan (below), from the least cpu up, stopping once a one-copy node
  is found and no shape of the same cpu remains: O(d) to O(S d); then one change.

``fabric-tool bench leafview`` measures these at 5,000 leaf nodes beside a brute-force oracle.

Best fit, the reservation rule: among the usable leaf nodes that admit the pod and have room,
the one where the fewest further copies of the pod would fit (the tightest for this pod's own
shape, so big holes stay for big pods), then the least free cpu, then the node name. Leaves
running a first-fit or bin-packing scheduler place there or somewhere as good; a leaf running
upstream's LeastAllocated may place elsewhere: the reservation then keeps room on the wrong
node while the leaf uses another, until it expires, and the records (which count the pod where
it really is) keep the rest of the view right. Between the record that first counts a pod and
the release of its reservation the pod counts twice (conservative: never a false fit).

Resource semantics (upstream NodeResourcesFit): a demand fits a node when every resource it
requests with a positive quantity is at most the node's free; a resource the node does not list
has zero free; ``pods`` is always requested (1). Labels the record does not carry (it carries
:data:`tree.forge.PLACEMENT_LABELS`) are absent, so a leaf placement on another label matches
no node here: the pod is kept off rather than stranded.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import operator
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.framework import Obj, Resource
from scheduler.podutil import QuantityError, pod_requests, resource_list
from scheduler.selectors import NodeSelector, find_untolerated, hard_taint

_log = logging.getLogger(__name__)

#: The record kind and schema this module reads (``tree.forge.RECORD_KIND``/``RECORD_SCHEMA``;
#: repeated, as the scheduler does not import the tree manager).
RECORD_KIND = "tree.kosmos.io/leaf-resources"
RECORD_SCHEMA = "tree.kosmos.io/leaf-resources/v1"
HOSTNAME_LABEL = "kubernetes.io/hostname"
#: The root pod's annotation holding the leaf placement (``tree.pods.CLUSTER_SELECTOR_ANNOTATION``).
CLUSTER_SELECTOR_ANNOTATION = "kosmos.io/cluster-selector"
#: How many recent demands every class keeps counts for.
TRACKED = 64
#: How many (demand, limit) candidate lists a class keeps (cleared when full).
CLASS_CANDIDATES = 128
#: How many placements' matching classes a view remembers (cleared when full).
MATCH_CACHE = 1024

#: A resource vector: sorted (resource name, positive amount); cpu in millicores, the rest in
#: units (bytes, pods, devices). Absent = zero, so equal vectors are equal tuples.
Vector = tuple[tuple[str, int], ...]
#: A hard taint as the class key holds it.
TaintKey = tuple[str, str, str]


class RecordError(ValueError):
    """A leaf-resources record that cannot be read; the message names the record and field."""


def vector(amounts: Mapping[str, int]) -> Vector:
    """Canonical :data:`Vector` of ``amounts`` (zero and negative amounts dropped)."""
    return tuple(sorted((k, int(v)) for k, v in amounts.items() if v > 0))


def resource_vector(r: Resource) -> dict[str, int]:
    out = {"cpu": r.milli_cpu, "memory": r.memory, "ephemeral-storage": r.ephemeral_storage,
           "pods": r.allowed_pod_number}
    out.update(r.scalar)
    return out


@dataclass(frozen=True)
class Demand:
    """What one pod takes on a leaf node: its effective request plus one ``pods`` slot."""

    amounts: Vector

    @classmethod
    def of(cls, amounts: Mapping[str, int]) -> Demand:
        a = {k: v for k, v in amounts.items() if k != "pods"}
        a["pods"] = 1
        return cls(vector(a))

    @classmethod
    def of_pod(cls, pod: Obj) -> Demand:
        """The pod's effective request (:func:`scheduler.podutil.pod_requests`)."""
        return cls.of(resource_vector(pod_requests(pod)))


def per_node(free: Mapping[str, int], demand: Vector) -> int:
    """How many pods of ``demand`` fit in ``free``: min over requested resources of floor(free/q)."""
    n = -1
    for k, q in demand:
        c = free.get(k, 0) // q
        if c <= 0:
            return 0
        if n < 0 or c < n:
            n = c
    return max(n, 0)


@dataclass(frozen=True)
class LeafNode:
    """One member leaf node as a record tells it (immutable)."""

    name: str
    free: Vector
    labels: tuple[tuple[str, str], ...] = ()
    #: Hard taints (NoSchedule/NoExecute) as (key, value, effect), sorted.
    taints: tuple[TaintKey, ...] = ()
    usable: bool = True
    #: Pods of this root bound to the node (the record's ``ourPods``): a rise is our pods landing.
    our_pods: int = 0

    @property
    def class_key(self) -> tuple[tuple[tuple[str, str], ...], tuple[TaintKey, ...]]:
        return tuple(kv for kv in self.labels if kv[0] != HOSTNAME_LABEL), self.taints


def make_node(name: str, free: Mapping[str, int], labels: Mapping[str, str] | None = None,
              taints: Iterable[Mapping[str, Any]] = (), usable: bool = True, our_pods: int = 0) -> LeafNode:
    """A :class:`LeafNode` from plain values (soft taints dropped: they never reject)."""
    hard = tuple(sorted({(str(t.get("key") or ""), str(t.get("value") or ""), str(t.get("effect") or ""))
                         for t in taints if hard_taint(dict(t))}))
    return LeafNode(name=name, free=vector(free), labels=tuple(sorted((labels or {}).items())),
                    taints=hard, usable=usable, our_pods=our_pods)


@dataclass(frozen=True)
class Record:
    """A parsed leaf-resources record."""

    virtual_node: str
    cluster: str
    ready: bool
    nodes: tuple[LeafNode, ...]
    #: The tree mode of the virtual node (``cluster``, ``node``, ``party``; "" when the record
    #: does not say): LeafNodeFit pins a ``cluster`` leaf copy to its reserved leaf node.
    mode: str = ""
    #: The leaf's Pending pods with no node yet (the record's ``pending``): each one's demand
    #: and, for a copy of this root's pod, the root pod's UID ("" for the leaf's own pods).
    pending: tuple[tuple[Demand, str], ...] = ()


#: Key prefix of the reservations held for a record's Pending leaf pods (:meth:`LeafView.apply_record`).
PENDING_KEY = "leaf-pending/"


def parse_record(data: bytes | str | Mapping[str, Any], where: str = "leaf-resources record",
                 cache: dict[str, tuple[Any, LeafNode]] | None = None) -> Record:
    """The record's JSON (``tree.forge.leaf_resources``) as a :class:`Record`; :class:`RecordError`
    naming ``where`` and the field when it cannot be read. Per-node ``taints`` are read when
    present (the v1 record has none: then no node counts as tainted).

    ``cache`` (name -> (the node's JSON object, its LeafNode), from the previous record; refilled
    with this one's): a node whose JSON object is equal to the cached one is not parsed again and
    keeps the same LeafNode object, so the view's diff sees it unchanged by identity. Only a
    record given as JSON text fills it: a caller's dicts may change after the call."""
    if cache is not None and not isinstance(data, (bytes, str)):
        cache.clear()
        cache = None
    try:
        doc = json.loads(data) if isinstance(data, (bytes, str)) else data
    except ValueError as e:
        raise RecordError(f"{where}: not JSON: {e}") from None
    if not isinstance(doc, Mapping):
        raise RecordError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != RECORD_SCHEMA:
        raise RecordError(f"{where}: schema {doc.get('schema')!r} is not {RECORD_SCHEMA!r}")
    raws = doc.get("nodes") or ()
    if not isinstance(raws, Sequence):
        raise RecordError(f"{where}.nodes: expected a list, got {type(raws).__name__}")
    old = dict(cache) if cache is not None else {}
    if cache is not None:
        cache.clear()
    nodes: list[LeafNode] = []
    names: set[str] = set()
    for i, n in enumerate(raws):
        if not isinstance(n, Mapping) or not isinstance(n.get("name"), str):
            raise RecordError(f"{where}.nodes[{i}]: expected an object with a string name, got {n!r}")
        name = n["name"]
        if name in names:
            raise RecordError(f"{where}.nodes[{i}]: leaf node {name!r} is listed twice")
        names.add(name)
        hit = old.get(name)
        node = hit[1] if hit is not None and hit[0] == n else _parse_node(n, f"{where}.nodes[{i}]")
        if cache is not None:
            cache[name] = (n, node)
        nodes.append(node)
    return Record(virtual_node=str(doc.get("virtualNode") or ""), cluster=str(doc.get("cluster") or ""),
                  ready=bool(doc.get("ready")), nodes=tuple(nodes), mode=str(doc.get("mode") or ""),
                  pending=_parse_pending(doc.get("pending") or (), f"{where}.pending"))


def _parse_pending(raws: Any, where: str) -> tuple[tuple[Demand, str], ...]:
    if not isinstance(raws, Sequence) or isinstance(raws, (str, bytes)):
        raise RecordError(f"{where}: expected a list, got {type(raws).__name__}")
    out = []
    for i, p in enumerate(raws):
        if not isinstance(p, Mapping) or not isinstance(p.get("requests") or {}, Mapping):
            raise RecordError(f"{where}[{i}]: expected an object with requests, got {p!r}")
        try:
            amounts = resource_vector(resource_list(p.get("requests") or {}, f"{where}[{i}].requests"))
        except QuantityError as e:
            raise RecordError(str(e)) from None
        out.append((Demand.of(amounts), str(p.get("rootUID") or "")))
    return tuple(out)


def _parse_node(n: Mapping[str, Any], where: str) -> LeafNode:
    try:
        free = resource_vector(resource_list(n.get("free") or {}, f"{where}.free"))
    except QuantityError as e:
        raise RecordError(str(e)) from None
    labels = n.get("labels") or {}
    taints = n.get("taints") or ()
    if not isinstance(labels, Mapping) or not isinstance(taints, Sequence):
        raise RecordError(f"{where}: labels must be an object and taints a list")
    ours = n.get("ourPods", 0)
    if not isinstance(ours, int) or isinstance(ours, bool) or ours < 0:
        raise RecordError(f"{where}.ourPods: expected a count, got {ours!r}")
    return make_node(n["name"], free, {str(k): str(v) for k, v in labels.items()},
                     [t for t in taints if isinstance(t, Mapping)],
                     usable=bool(n.get("ready")) and bool(n.get("schedulable")), our_pods=ours)


class Placement:
    """A pod's placement inside the leaf: ``nodeSelector`` AND required node affinity, and the
    tolerations checked against hard taints (upstream's NodeAffinity and TaintToleration
    Filters). Compiled once; ``key`` identifies equal placements for the per-class cache."""

    __slots__ = ("key", "names_node", "node_selector", "required", "tolerations")

    def __init__(self, node_selector: Mapping[str, str] | None = None, affinity: Mapping[str, Any] | None = None,
                 tolerations: Sequence[Mapping[str, Any]] = ()) -> None:
        self.node_selector = tuple(sorted((node_selector or {}).items()))
        na = (affinity or {}).get("nodeAffinity") or {}
        req = na.get("requiredDuringSchedulingIgnoredDuringExecution")
        terms = list((req or {}).get("nodeSelectorTerms") or ()) if req is not None else None
        self.required = NodeSelector(terms) if terms is not None else None
        self.tolerations = [dict(t) for t in tolerations]
        self.key = json.dumps([self.node_selector, terms, self.tolerations], sort_keys=True, default=str)
        self.names_node = any(k == HOSTNAME_LABEL for k, _ in self.node_selector) or any(
            t.get("matchFields") or any(e.get("key") == HOSTNAME_LABEL for e in t.get("matchExpressions") or ())
            for t in terms or ())

    @classmethod
    def of_leaf_pod(cls, pod: Obj) -> Placement:
        """The placement of a pod as it is in the leaf (selectors and tolerations in its spec)."""
        spec = pod.get("spec") or {}
        return cls(spec.get("nodeSelector"), spec.get("affinity"), spec.get("tolerations") or ())

    @classmethod
    def of_root_pod(cls, pod: Obj) -> Placement:
        """What the tree manager gives the leaf copy of a root pod (``tree.pods``,
        ``recoverSelectors``): the placement in the annotation :data:`CLUSTER_SELECTOR_ANNOTATION`,
        or none (the leaf may use any node). Party-mode selectors need nothing here: a party's
        record lists only its members. An unreadable annotation is the tree manager's error to
        report; here it counts as no placement."""
        raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(CLUSTER_SELECTOR_ANNOTATION)
        doc: Any = {}
        if raw:
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {}
        if not isinstance(doc, Mapping):
            doc = {}
        wanted = ((doc.get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution")
        aff = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": wanted}} if wanted else None
        return cls(doc.get("nodeSelector"), aff, doc.get("tolerations") or ())

    def admits(self, labels: Mapping[str, str], name: str, taints: Iterable[TaintKey]) -> bool:
        for k, v in self.node_selector:
            if labels.get(k) != v:
                return False
        if self.required is not None and not self.required.match_labels(labels, name):
            return False
        if taints:
            objs = [{"key": k, "value": v, "effect": e} for k, v, e in taints]
            if find_untolerated(objs, self.tolerations) is not None:
                return False
        return True


ANY = Placement()
_CPU = operator.itemgetter(0)


class _Class:
    """Usable leaf nodes with equal labels (hostname aside) and hard taints."""

    __slots__ = ("cands", "labels", "order", "shapes", "taints", "tracked")

    def __init__(self, labels: dict[str, str], taints: tuple[TaintKey, ...]) -> None:
        self.labels = labels
        self.taints = taints
        #: shape -> (its free as a dict, the names of the nodes having it)
        self.shapes: dict[Vector, tuple[dict[str, int], set[str]]] = {}
        #: (free cpu, shape) of every shape, ascending: the cold paths start at the demand's cpu.
        self.order: list[tuple[int, Vector]] = []
        #: tracked demand -> [pods that fit, nodes where one fits]
        self.tracked: dict[Vector, list[int]] = {}
        #: (demand, limit) -> :meth:`candidates`' answer, dropped when a shape that could be in
        #: it appears or goes (:meth:`_touch`).
        self.cands: dict[tuple[Vector, int], list[tuple[int, Vector, dict[str, int]]]] = {}

    def add(self, shape: Vector, name: str) -> None:
        entry = self.shapes.get(shape)
        if entry is None:
            free = dict(shape)
            entry = self.shapes[shape] = (free, set())
            bisect.insort(self.order, (free.get("cpu", 0), shape))
            self._touch(free)
        entry[1].add(name)
        self._adjust(entry[0], 1)

    def remove(self, shape: Vector, name: str) -> None:
        free, names = self.shapes[shape]
        names.discard(name)
        if not names:
            del self.shapes[shape]
            del self.order[bisect.bisect_left(self.order, (free.get("cpu", 0), shape))]
            self._touch(free)
        self._adjust(free, -1)

    def _touch(self, free: Mapping[str, int]) -> None:
        """A shape with ``free`` appeared or went: drop the cached candidate lists it belongs
        in (it fits the demand, and the list is short or reaches its cpu). A shape the demand
        does not fit, or with more cpu than a full list's last, changes nothing there."""
        if not self.cands:
            return
        cpu = free.get("cpu", 0)
        for key in [k for k, lst in self.cands.items()
                    if per_node(free, k[0]) and (len(lst) < k[1] or cpu <= lst[-1][0])]:
            del self.cands[key]

    def candidates(self, d: Vector, limit: int) -> list[tuple[int, Vector, dict[str, int]]]:
        """(cpu, shape, free) of the ``limit`` tightest shapes in cpu where one ``d`` fits, in
        :attr:`order` (cached until a shape that could be in it appears or goes)."""
        key = (d, limit)
        out = self.cands.get(key)
        if out is not None:
            return out
        out = []
        shapes = self.shapes
        for cpu, shape in itertools.islice(self.order, self._start(d), None):
            free = shapes[shape][0]
            if per_node(free, d):
                out.append((cpu, shape, free))
                if len(out) >= limit:
                    break
        if len(self.cands) >= CLASS_CANDIDATES:
            self.cands.clear()
        self.cands[key] = out
        return out

    def _adjust(self, free: Mapping[str, int], sign: int) -> None:
        for d, acc in self.tracked.items():
            c = per_node(free, d)
            if c:
                acc[0] += sign * c
                acc[1] += sign

    def _start(self, d: Vector) -> int:
        """The first shape of :attr:`order` with at least the demand's cpu."""
        cpu = dict(d).get("cpu", 0)
        return bisect.bisect_left(self.order, (cpu,)) if cpu else 0

    def compute(self, d: Vector) -> list[int]:
        """[pods that fit, nodes where one fits]: one pass over the shapes with enough cpu."""
        pods = nodes = 0
        shapes = self.shapes
        for _cpu, shape in itertools.islice(self.order, self._start(d), None):
            free, names = shapes[shape]
            c = per_node(free, d)
            if c:
                pods += c * len(names)
                nodes += len(names)
        return [pods, nodes]

    def any_fit(self, d: Vector) -> bool:
        """Some node fits ``d``: the shapes from the most cpu down, the first that fits ends it."""
        shapes = self.shapes
        order = self.order
        return any(per_node(shapes[order[i][1]][0], d) for i in range(len(order) - 1, self._start(d) - 1, -1))

    def best(self, d: Vector, best: tuple[int, int, str] | None) -> tuple[int, int, str] | None:
        """The best fit (pods of ``d`` that fit, free cpu, name) of this class and ``best``: the
        shapes from the least cpu up; once one copy is the tightest count, only shapes of the
        same cpu can still beat it."""
        shapes = self.shapes
        for cpu, shape in itertools.islice(self.order, self._start(d), None):
            if best is not None and best[0] == 1 and cpu > best[1]:
                break
            free, names = shapes[shape]
            n = per_node(free, d)
            if n and (best is None or (n, cpu) <= best[:2]):
                cand = (n, cpu, min(names))
                if best is None or cand < best:
                    best = cand
        return best


@dataclass
class Reservation:
    """A pod's request held on one leaf node until the leaf confirms or refuses."""

    key: str
    node: str
    demand: Demand
    deadline: float | None = None
    #: The leaf bound the pod (on :attr:`node`): released by the next record changing that node.
    confirmed: bool = False


@dataclass
class _Entry:
    node: LeafNode
    shape: Vector
    reserved: dict[str, int] = field(default_factory=dict)


class LeafView:
    """The per-node view of one virtual node's leaf (see the module docstring)."""

    def __init__(self, name: str = "", *, tracked: int = TRACKED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self._nodes: dict[str, _Entry] = {}
        self._classes: dict[Any, _Class] = {}
        self._tracked: OrderedDict[Vector, None] = OrderedDict()
        #: Demands ``fits`` answered once without tracking them.
        self._seen: OrderedDict[Vector, None] = OrderedDict()
        #: The last record's nodes, by name: (its JSON object, its LeafNode) (:func:`parse_record`).
        self._raw: dict[str, tuple[Any, LeafNode]] = {}
        self._capacity = max(1, tracked)
        #: placement key -> the matching classes; cleared when a class appears or goes.
        self._matches: dict[str, list[_Class]] = {}
        self.reservations: dict[str, Reservation] = {}
        #: Bumped whenever a usable node is placed or unplaced (every change of an answer).
        self.version = 0
        #: (demand, placement key, limit) -> (version, :meth:`candidate_shapes`' answer).
        self._cand_cache: dict[tuple[Vector, str, int], tuple[int, list[tuple[Vector, dict[str, int]]]]] = {}
        #: Records applied so far.
        self.records = 0
        #: The last record's tree mode (:attr:`Record.mode`).
        self.mode = ""
        #: The last record's Pending leaf pods (:attr:`Record.pending`), held by :meth:`_hold_pending`.
        self._pending: tuple[tuple[Demand, str], ...] = ()

    # -- input ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def class_count(self) -> int:
        """How many classes the usable nodes fall into (few, whatever the fleet's size)."""
        return len(self._classes)

    @property
    def tracked(self) -> tuple[Demand, ...]:
        """The demands whose counts every class keeps up to date, least recently asked first."""
        return tuple(Demand(d) for d in self._tracked)

    @property
    def shape_count(self) -> int:
        """How many distinct (class, effective free) shapes there are: a cold query's pass."""
        return sum(len(c.shapes) for c in self._classes.values())

    def nodes(self) -> Iterator[LeafNode]:
        return (e.node for e in self._nodes.values())

    def free_of(self, name: str) -> dict[str, int]:
        """The effective free of a leaf node: its record's free minus reservations on it."""
        e = self._nodes[name]
        return dict(e.shape)

    def apply_record(self, record: Record | bytes | str | Mapping[str, Any]) -> int:
        """Bring the view to ``record``; returns how many leaf nodes changed. Confirmed
        reservations on a changed node are released (the record counts their pods)."""
        if not isinstance(record, Record):
            record = parse_record(record, f"record {self.name or '?'}", self._raw)
        self.records += 1
        self.mode = record.mode
        changed: set[str] = set()
        known = self._nodes
        for n in record.nodes:
            e = known.get(n.name)
            if e is None or (e.node is not n and e.node != n):
                changed.add(n.name)
        gone: list[str] = []
        if len(known) + sum(1 for n in changed if n not in known) != len(record.nodes):
            listed = {n.name for n in record.nodes}
            gone = [k for k in known if k not in listed]
        for k in self._landed(record, changed):
            self.forget(k)
        for n in record.nodes:
            if n.name in changed:
                self.upsert_node(n)
        for name in gone:
            self.remove_node(name)
        if changed or gone or record.pending != self._pending:
            self._pending = record.pending
            self._hold_pending()
        return len(changed) + len(gone)

    def _hold_pending(self) -> None:
        """Hold room for the leaf's Pending pods (the record's ``pending``): each is reserved
        (no deadline, key :data:`PENDING_KEY` + index) on its best-fit node, as the leaf's
        scheduler will put it on some node that fits, and the next pods must not count on that
        room. A copy of ours whose root pod already has a reservation here is skipped (that
        reservation holds it); one whose reservation expired is held again. Placed afresh on
        every record that changes a node or the list: a pod that fits nowhere is held nowhere
        (the leaf cannot place it either)."""
        for k in [k for k in self.reservations if k.startswith(PENDING_KEY)]:
            self.forget(k)
        if not self._pending:
            return
        held = {k.rsplit("/", 1)[-1] for k in self.reservations}
        for i, (demand, root_uid) in enumerate(self._pending):
            if root_uid and root_uid in held:
                continue
            self.assume(f"{PENDING_KEY}{i}", demand)

    def _landed(self, record: Record, changed: set[str]) -> list[str]:
        """The reservations ``record`` accounts for, on each changed node: the confirmed ones,
        and when its ``ourPods`` rose by k, the oldest unconfirmed ones up to k in all (a rise is
        k of our pods bound there, counted in its free from now on). A pod the leaf put on
        another node than the one reserved is not matched: its reservation waits for
        :meth:`expire` (room held too long, never too little)."""
        if not changed or not self.reservations:
            return []
        on: dict[str, list[Reservation]] = {}
        for r in self.reservations.values():  # oldest first
            if r.node in changed and not r.key.startswith(PENDING_KEY):
                on.setdefault(r.node, []).append(r)
        done: list[str] = []
        for n in record.nodes:
            rs = on.get(n.name)
            if not rs:
                continue
            old = self._nodes[n.name].node
            confirmed = [r.key for r in rs if r.confirmed]
            rise = max(0, n.our_pods - old.our_pods) - len(confirmed)
            done += confirmed + [r.key for r in rs if not r.confirmed][:max(0, rise)]
        return done

    def upsert_node(self, node: LeafNode) -> None:
        """Add or replace one leaf node (a delta); its reservations stay on it."""
        old = self._nodes.get(node.name)
        reserved = old.reserved if old is not None else {}
        if old is not None:
            self._unplace(old)
        e = _Entry(node, self._effective(node, reserved), reserved)
        self._nodes[node.name] = e
        self._place(e)

    def remove_node(self, name: str) -> None:
        """Take a leaf node out; reservations on it are dropped (the pod must be placed again)."""
        e = self._nodes.pop(name, None)
        if e is None:
            return
        self._unplace(e)
        for r in [r for r in self.reservations.values() if r.node == name]:
            del self.reservations[r.key]

    @staticmethod
    def _effective(node: LeafNode, reserved: Mapping[str, int]) -> Vector:
        if not reserved:
            return node.free
        free = dict(node.free)
        for k, v in reserved.items():
            free[k] = free.get(k, 0) - v
        return vector(free)

    def _place(self, e: _Entry) -> None:
        if not e.node.usable:
            return
        self.version += 1
        key = e.node.class_key
        c = self._classes.get(key)
        if c is None:
            c = self._classes[key] = _Class(dict(key[0]), key[1])
            for d in self._tracked:
                c.tracked[d] = [0, 0]
            self._matches.clear()
        c.add(e.shape, e.node.name)

    def _unplace(self, e: _Entry) -> None:
        if not e.node.usable:
            return
        self.version += 1
        key = e.node.class_key
        c = self._classes[key]
        c.remove(e.shape, e.node.name)
        if not c.shapes:
            del self._classes[key]
            self._matches.clear()

    def _reshape(self, e: _Entry) -> None:
        self._unplace(e)
        e.shape = self._effective(e.node, e.reserved)
        self._place(e)

    # -- queries ----------------------------------------------------------------------------

    def _classes_for(self, p: Placement) -> list[_Class]:
        m = self._matches.get(p.key)
        if m is None:
            if len(self._matches) >= MATCH_CACHE:  # pods' placements are the users': bounded
                self._matches.clear()
            m = self._matches[p.key] = [c for c in self._classes.values() if p.admits(c.labels, "", c.taints)]
        return m

    def _track(self, d: Vector) -> None:
        if d in self._tracked:
            self._tracked.move_to_end(d)
            return
        self._tracked[d] = None
        for c in self._classes.values():
            c.tracked[d] = c.compute(d)
        if len(self._tracked) > self._capacity:
            old, _ = self._tracked.popitem(last=False)
            for c in self._classes.values():
                c.tracked.pop(old, None)

    def _admitted(self, p: Placement) -> Iterator[tuple[str, Mapping[str, int]]]:
        """(name, effective free) of every usable node ``p`` admits (the per-node path)."""
        for c in self._classes_for(p) if not p.names_node else self._classes.values():
            for free, names in c.shapes.values():
                for name in names:
                    if not p.names_node or p.admits(dict(self._nodes[name].node.labels), name, c.taints):
                        yield name, free

    def stats(self, demand: Demand, placement: Placement = ANY) -> tuple[int, int]:
        """(pods of ``demand`` that fit, leaf nodes where at least one fits)."""
        d = demand.amounts
        if placement.names_node:
            pods = nodes = 0
            for _name, free in self._admitted(placement):
                n = per_node(free, d)
                if n:
                    pods, nodes = pods + n, nodes + 1
            return pods, nodes
        self._track(d)
        pods = nodes = 0
        for c in self._classes_for(placement):
            acc = c.tracked[d]
            pods += acc[0]
            nodes += acc[1]
        return pods, nodes

    def fits(self, demand: Demand, placement: Placement = ANY) -> bool:
        """Does one pod of ``demand`` fit on some usable leaf node ``placement`` admits? A demand
        asked for the first time is answered by a scan that stops at the first fit; asked again,
        it is tracked (a Deployment's pods all ask the same)."""
        d = demand.amounts
        if placement.names_node or d in self._tracked or self._again(d):
            return self.stats(demand, placement)[1] > 0
        return any(c.any_fit(d) for c in self._classes_for(placement))

    def _again(self, d: Vector) -> bool:
        """Has ``fits`` seen ``d`` before (then it gets tracked)? Remembers the last few."""
        if d in self._seen:
            del self._seen[d]
            return True
        self._seen[d] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return False

    def count(self, demand: Demand, placement: Placement = ANY) -> int:
        """How many pods of ``demand`` fit, node by node (floor per node, summed)."""
        return self.stats(demand, placement)[0]

    def best_fit(self, demand: Demand, placement: Placement = ANY) -> str | None:
        """The leaf node a reservation goes to (module docstring, "Best fit"), or None."""
        d = demand.amounts
        best: tuple[int, int, str] | None = None
        if placement.names_node:
            for name, free in self._admitted(placement):
                n = per_node(free, d)
                if n and (best is None or (n, free.get("cpu", 0), name) < best):
                    best = (n, free.get("cpu", 0), name)
        else:
            for cl in self._classes_for(placement):
                best = cl.best(d, best)
        return None if best is None else best[2]

    def admits_fit(self, name: str, demand: Demand, placement: Placement = ANY) -> bool:
        """Is leaf node ``name`` usable, admitted by ``placement``, with room for ``demand``?"""
        e = self._nodes.get(name)
        if e is None or not e.node.usable or not per_node(dict(e.shape), demand.amounts):
            return False
        return placement.admits(dict(e.node.labels), name, e.node.taints)

    def node_of(self, shape: Vector, placement: Placement = ANY) -> str | None:
        """A usable leaf node ``placement`` admits whose effective free is ``shape`` (one of
        :meth:`candidate_shapes`' answers): the first by name, as :meth:`best_fit` breaks ties."""
        if placement.names_node:
            names = [name for name, _free in self._admitted(placement) if self._nodes[name].shape == shape]
            return min(names) if names else None
        found: str | None = None
        for cl in self._classes_for(placement):
            entry = cl.shapes.get(shape)
            if entry is not None:
                first = min(entry[1])
                if found is None or first < found:
                    found = first
        return found

    def candidates(self, demand: Demand, placement: Placement = ANY, limit: int = 64) -> list[dict[str, int]]:
        """The effective free vectors (one per distinct shape) of up to ``limit`` usable leaf
        nodes ``placement`` admits where one pod of ``demand`` fits, the tightest in cpu first
        (the ``limit`` tightest of every matching class, then the tightest of those): what a
        score weighing leaf nodes looks at. The dicts are the view's own: read, never modify."""
        return [free for _shape, free in self.candidate_shapes(demand, placement, limit)]

    def candidate_shapes(self, demand: Demand, placement: Placement = ANY,
                         limit: int = 64) -> list[tuple[Vector, dict[str, int]]]:
        """:meth:`candidates` with each free vector's :data:`Vector` beside it (a hashable key
        for a caller's per-shape cache, :class:`scheduler.fragmentation.DeltaCache`).

        Cached per (demand, placement, limit) until the view changes (any node placed or
        unplaced: :attr:`version`): between two pods only the leaf the previous pod went to
        changes, so the other views answer from the cache (the fragmentation score asks every
        view for every pod). A placement naming a node is not cached. The list is shared:
        read, never modify."""
        d = demand.amounts
        if placement.names_node:
            seen: set[int] = set()
            named: list[tuple[Vector, dict[str, int]]] = []
            for name, free in self._admitted(placement):
                if id(free) not in seen and per_node(free, d):
                    seen.add(id(free))
                    named.append((self._nodes[name].shape, dict(free)))
                    if len(named) >= limit:
                        break
            return named
        ckey = (d, placement.key, limit)
        hit = self._cand_cache.get(ckey)
        if hit is not None and hit[0] == self.version:
            return hit[1]
        classes = self._classes_for(placement)
        if len(classes) == 1:
            merged = classes[0].candidates(d, limit)
        else:
            merged = [c for cl in classes for c in cl.candidates(d, limit)]
            if len(merged) > limit:  # stable: equal cpu keeps the class order
                merged.sort(key=_CPU)
                del merged[limit:]
        out = [(shape, free) for _cpu, shape, free in merged]
        if len(self._cand_cache) >= MATCH_CACHE:  # demands x placements: bounded
            self._cand_cache.clear()
        self._cand_cache[ckey] = (self.version, out)
        return out

    # -- reservations -----------------------------------------------------------------------

    def assume(self, key: str, demand: Demand, placement: Placement = ANY, *, node: str | None = None,
               ttl: float | None = None, prefer: str | None = None) -> str | None:
        """Reserve ``demand`` for pod ``key`` on its best-fit leaf node (or on ``node``, when the
        caller knows where the leaf put it); returns the node, None when nothing fits. A key
        already reserved is released first. ``ttl``: seconds until :meth:`expire` drops it.
        ``prefer``: a leaf node a score chose (LeafNodeFragmentation's least fragmenting one),
        taken when it is still usable, admits ``placement`` and has room (else best fit: the
        view may have changed since the score)."""
        self.forget(key)
        if node is None and prefer is not None and self.admits_fit(prefer, demand, placement):
            node = prefer
        if node is None:
            node = self.best_fit(demand, placement)
            if node is None:
                return None
        if node not in self._nodes:
            raise KeyError(f"view {self.name or '?'}: assume {key}: no leaf node {node!r}")
        r = Reservation(key, node, demand, None if ttl is None else self.clock() + ttl)
        self.reservations[key] = r
        self._hold(r, 1)
        return node

    def confirm(self, key: str, node: str | None = None) -> None:
        """The leaf has bound pod ``key`` (on leaf node ``node``, when the caller knows it: the
        reservation moves there if the leaf chose another node than ours). The reservation goes
        with the next record that changes that node."""
        r = self.reservations.get(key)
        if r is None:
            return
        if node is not None and node != r.node and node in self._nodes:
            self._hold(r, -1)
            r.node = node
            self._hold(r, 1)
        r.confirmed = True

    def forget(self, key: str) -> bool:
        """Release pod ``key``'s reservation (refused, failed, deleted). False: there was none."""
        r = self.reservations.pop(key, None)
        if r is None:
            return False
        self._hold(r, -1)
        return True

    def _hold(self, r: Reservation, sign: int) -> None:
        """Add (1) or take away (-1) ``r``'s demand on its node."""
        e = self._nodes.get(r.node)
        if e is None:
            return
        for k, v in r.demand.amounts:
            left = e.reserved.get(k, 0) + sign * v
            if left:
                e.reserved[k] = left
            else:
                e.reserved.pop(k, None)
        self._reshape(e)

    def expire(self, now: float | None = None) -> list[str]:
        """Release the reservations past their deadline (the leaf never confirmed); their keys."""
        now = self.clock() if now is None else now
        gone = [r.key for r in self.reservations.values() if r.deadline is not None and r.deadline <= now]
        for k in gone:
            self.forget(k)
        if gone and any(uid for _d, uid in self._pending):
            self._hold_pending()  # a copy of ours still Pending, its reservation gone: held again
        return gone
