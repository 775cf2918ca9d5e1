"""Incremental planning: the plan of a node as a union of parts, and the stateful planner the
reflector keeps.

A node's state is the union of a *self* part, one part per peer node and one per remote
cluster, each a pure function of a small slice of the topology (:func:`plan_parts`; its union
equals :func:`fabric.control.planner.plan`, which a randomized test checks).
:class:`IncrementalPlanner` recomputes only the parts whose inputs changed and turns them into
per-node deltas, so a join or leave costs time proportional to the change. It also holds, per
viewer class, the union of all its ``node:`` and ``cluster:`` parts, so a node planned in full (a
new one: thousands per flush at a bring-up) costs a copy of that union plus its own parts, not a
walk over every node; and cluster parts by what they depend on, shared by viewer classes alike.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping

from fabric import types
from fabric.control.planner import (
    VIEWS,
    ClusterView,
    View,
    canonical,
    contribution,
    device,
    local_hosts,
    local_peer,
    routed,
    tunnel_mtu,
)

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# The plan as a union of parts (incremental planning)
# --------------------------------------------------------------------------------------------
#
# plan(topology, key) is the reference. For the reflector's hot path the same plan is also the
# disjoint union of *parts*, each keyed by its source:
#
# * ``self`` - the node's own devices, programs, translations, hairpin routes and (internal
#   nodes of gateway-mode clusters) the bridge-CIDR route to the active gateway;
# * ``node:CLUSTER/NAME`` - what one other node contributes: its peers and the routes that
#   name it (a P2P node's pod CIDRs);
# * ``cluster:NAME`` - the whole-cluster routes of another cluster: its service CIDRs, its pod
#   CIDRs where they are routed as a whole (gateway mode, or seen from a non-active node) and,
#   for a gateway-mode cluster, the prefixes of its nodes' vx-local addresses (``local_hosts``;
#   its signature includes them: a join that moves them changes that cluster's part).
#
# Except ``self``, a part depends on the viewer only through its :class:`ViewerClass` (cluster,
# families, role), so one computation serves every node of a class. A change of the topology
# changes the parts of a few sources (see :func:`node_signature`, :func:`cluster_signature`); the
# other parts are equal by construction, so a viewer's new plan is its old plan with the changed
# parts swapped, whatever the size of the fabric. The entry keys of different sources never
# collide in a validated topology (addresses, MACs and CIDRs are refused when they overlap), which
# is what makes the union well defined; tests/unit/test_incremental_planner.py checks the union
# against plan() over random topologies and changes.

SELF_SOURCE = "self"
#: The entry table of IncrementalPlanner is rebuilt from the live plans once it has this many
#: entries, or twice as many as after its last rebuild.
CANON_MIN_REBUILD = 1 << 16


def node_source(key: types.NodeKey) -> str:
    """The source name of the part node ``key`` contributes to other nodes' plans."""
    return f"node:{key}"


def cluster_source(name: str) -> str:
    """The source name of the whole-cluster routes of cluster ``name``."""
    return f"cluster:{name}"


@dataclasses.dataclass(frozen=True, slots=True)
class ViewerClass:
    """Everything about a viewer that its ``node:`` and ``cluster:`` parts depend on.

    Nodes of one class see every other node and cluster alike, so a part is computed once per
    class. For P2P nodes the role is irrelevant (their routes never depend on their own
    cluster's gateways) and normalised away, so a service-gateway move re-plans nobody fully.
    """

    cluster: str
    #: The families the node carries (its cluster's, where it has an underlay address).
    families: tuple[int, ...]
    gateway_mode: bool
    has_bridge: bool
    #: Active or standby gateway (gateway mode only).
    hot: bool
    #: An active gateway itself (gateway mode only): it routes over vx-bridge.
    active: bool
    #: Per family of ``families``: the own active gateway's vx-local address a non-active node of
    #: a gateway-mode cluster routes everything through ("" when there is none).
    local_vias: tuple[str, ...]
    #: Per family of ``families``: with active/active gateways, the vx-local addresses of all of
    #: them (the route's ``vias``; empty tuples otherwise, see ``active_active.route_vias``).
    local_groups: tuple[tuple[str, ...], ...] = ()

    @property
    def routes_via_local(self) -> bool:
        return self.gateway_mode and not self.active


def _viewer_class(view: View, node: types.NodeAnnouncement) -> ViewerClass | None:
    own = view.clusters.get(node.cluster)
    if own is None:
        return None
    families = tuple(f for f in own.families if node.underlay(f) is not None)
    if not own.gateway_mode:
        return ViewerClass(node.cluster, families, False, True, False, False, ())
    hot = node.key in view.hot_keys
    active = own.is_active(node.key)
    vias: list[str] = []
    groups: list[tuple[str, ...]] = []
    for f in families:
        gw = own.gateway_route(f, view.locals[f]) if not active else None
        vias.append(gw[0] if gw is not None else "")
        groups.append(gw[1] if gw is not None else ())
    return ViewerClass(node.cluster, families, True, hot, hot, active, tuple(vias), tuple(groups))


def _class_basis(cv: ClusterView) -> tuple[object, ...]:
    """What :func:`_viewer_class` reads of a node's cluster (besides the node itself and the
    configuration): equal bases in two views of one configuration give every unchanged node of
    the cluster the same class in both."""
    return cv.config, cv.families, tuple(h.key for h in cv.hot), cv.actives


def viewer_class(topology: types.Topology, key: types.NodeKey) -> ViewerClass | None:
    """The class of node ``key`` in ``topology`` (None: it plans nothing)."""
    view = VIEWS.get(topology)
    node = view.by_key.get(key)
    if node is None:
        raise KeyError(f"node {key} is not in the topology")
    return _viewer_class(view, node)


def node_signature(topology: types.Topology, key: types.NodeKey) -> object:
    """What the ``node:`` part of ``key`` depends on besides the viewer class and the
    configuration: equal signatures in two topologies of one configuration mean equal parts for
    every viewer class. None for a node that is not in the topology."""
    return _node_signature(VIEWS.get(topology), key)


def _node_signature(view: View, key: types.NodeKey) -> object:
    x = view.by_key.get(key)
    if x is None:
        return None
    xc = view.clusters.get(x.cluster)
    if xc is None:
        return (x,)
    return (x, key in view.hot_keys)


def cluster_signature(topology: types.Topology, name: str) -> object:
    """What the ``cluster:`` part of ``name`` depends on besides the viewer class and the
    configuration (see :func:`node_signature`)."""
    return _cluster_signature(VIEWS.get(topology), name)


def _cluster_signature(view: View, name: str) -> object:
    cv = view.clusters.get(name)
    if cv is None:
        return None
    # A gateway-mode cluster's part also routes its nodes' vx-local prefixes.
    hosts = tuple(local_hosts(view, cv, f) for f in cv.families) if cv.gateway_mode else ()
    return (cv.actives, view.reach.get(name, frozenset()), hosts)


def plan_parts(topology: types.Topology, key: types.NodeKey) -> dict[str, dict[str, types.Entry]]:
    """Every non-empty part of node ``key``'s plan by source; their union is ``plan(topology,
    key)`` (tests check it). Raises KeyError for a node that is not in the topology."""
    view = VIEWS.get(topology)
    node = view.by_key.get(key)
    if node is None:
        raise KeyError(f"node {key} is not in the topology")
    cls = _viewer_class(view, node)
    out: dict[str, dict[str, types.Entry]] = {}
    if cls is None:
        return out
    counter = PartCounter()
    parts = {SELF_SOURCE: _self_part(view, node, cls)}
    for other in topology.nodes:
        if other.key != key:
            parts[node_source(other.key)] = _node_part(view, cls, other, counter)
    for c in view.clusters:
        parts[cluster_source(c)] = _cluster_part(view, cls, c, counter)
    return {s: p for s, p in parts.items() if p}


class PartCounter:
    """Planner work done, counted (not timed): the scaling tests assert on these."""

    __slots__ = ("full_plans", "parts")

    def __init__(self) -> None:
        self.parts = 0
        self.full_plans = 0


def _route(dst: str, via: str, device: str, vias: tuple[str, ...] = ()) -> tuple[str, types.RouteEntry]:
    return f"route/{dst}", types.RouteEntry(dst=dst, via=via, device=device, vias=vias)


def _self_part(view: View, node: types.NodeAnnouncement, cls: ViewerClass) -> dict[str, types.Entry]:
    own = view.clusters[cls.cluster]
    entries: list[types.Entry] = []
    glob = own.config.global_cidrs
    if glob:
        entries += [types.Translation(lo, gl) for lo, gl in glob]
        entries.append(types.Program(types.HAIRPIN_DEVICE, types.PROGRAM_HAIRPIN))
        for _lo, gl in glob:
            if types.family_of(gl) in cls.families:
                unspecified = "0.0.0.0" if types.family_of(gl) == 4 else "::"
                entries.append(types.RouteEntry(dst=gl, via=unspecified, device=types.HAIRPIN_DEVICE))
    for i, f in enumerate(cls.families):
        underlay = node.underlay(f)
        assert underlay is not None
        mtu = tunnel_mtu(underlay, node.underlay_mtu)
        if cls.has_bridge:
            entries.append(device(node.key, types.bridge_device(f), underlay, view.bridges[f], mtu))
            if glob:
                entries.append(types.Program(types.bridge_device(f), types.PROGRAM_TUNNEL))
        if cls.gateway_mode:
            entries.append(device(node.key, types.local_device(f), underlay, view.locals[f], mtu))
            if not cls.active and not cls.hot and cls.local_vias[i]:
                dst = canonical(view.bridges[f])
                entries.append(
                    types.RouteEntry(
                        dst=dst, via=cls.local_vias[i], device=types.local_device(f), vias=cls.local_groups[i]
                    )
                )
    return {types.entry_key(e): e for e in entries}


def _node_part(
    view: View, cls: ViewerClass, x: types.NodeAnnouncement, counter: PartCounter
) -> dict[str, types.Entry]:
    """What node ``x`` contributes to the plan of a node of class ``cls`` (not ``x`` itself)."""
    counter.parts += 1
    out: dict[str, types.Entry] = {}
    xc = view.clusters.get(x.cluster)
    if xc is None:
        return out
    same = x.cluster == cls.cluster
    x_hot = x.key in view.hot_keys
    if xc.gateway_mode and not x_hot and not (same and cls.hot):
        # Neither a bridge peer nor a vx-local peer of this viewer, and routed as part of its
        # cluster: nothing (most node parts in a gateway-mode fabric; a flush computes one per
        # changed node and viewer class, so this is the common case, issue 21).
        return out
    x_bridge = not xc.gateway_mode or x_hot
    for f in cls.families:
        bridge = view.bridges[f]
        x_ul = x.underlay(f)
        if cls.has_bridge and x_bridge and not (cls.gateway_mode and same) and view.supports(x, f):
            (peer_key, peer), _ = contribution(bridge, x, ())
            if not same and x_hot:
                peer = dataclasses.replace(peer, probe=True)
            out[peer_key] = peer
        if cls.gateway_mode and same and (cls.hot or x_hot) and x_ul is not None:
            peer = local_peer(view.locals[f], x)
            if x_hot:
                peer = dataclasses.replace(peer, probe=True)
            out[types.entry_key(peer)] = peer
        if same or f not in xc.families or x_ul is None:
            continue
        if not cls.routes_via_local and not xc.gateway_mode:
            _, routes = contribution(bridge, x, xc.config.global_cidrs)
            out.update(routes)
    return out


def _cluster_part(
    view: View,
    cls: ViewerClass,
    name: str,
    counter: PartCounter,
    routes: dict[tuple[str, str, str, tuple[str, ...]], tuple[str, types.Entry]] | None = None,
    canon: dict[types.Entry, types.Entry] | None = None,
) -> dict[str, types.Entry]:
    """The whole-cluster routes of cluster ``name`` in the plan of a node of class ``cls``.

    ``routes``, when given, holds the (key, entry) of every route made so far by (destination,
    next hop, device, next hops), each entry interned in ``canon``, and is filled with the new
    ones: a part is then a few dict look-ups, and its entries the objects the caller already
    holds (see ``IncrementalPlanner._held_cluster_part``)."""
    counter.parts += 1
    out: dict[str, types.Entry] = {}
    cv = view.clusters.get(name)
    if cv is None or name == cls.cluster:
        return out
    for i, f in enumerate(cls.families):
        if f not in cv.families:
            continue
        if cls.routes_via_local:
            via = cls.local_vias[i]
            vias = cls.local_groups[i]
            if not via:
                continue
            device = types.local_device(f)
        else:
            gw = cv.gateway_route(f, view.bridges[f])
            if gw is None:
                continue
            via, vias = gw
            device = types.bridge_device(f)
        for dst in _cluster_dsts(view, cv, name, f, cls.routes_via_local):
            if routes is None:
                k, route = _route(dst, via, device, vias)
                out[k] = route
                continue
            rk = (dst, via, device, vias)
            made = routes.get(rk)
            if made is None:
                k, route = _route(dst, via, device, vias)
                made = routes[rk] = (k, canon.setdefault(route, route) if canon is not None else route)
            out[made[0]] = made[1]
    return out


def _cluster_dsts(view: View, cv: ClusterView, name: str, f: int, via_local: bool) -> tuple[str, ...]:
    """The canonical destinations of the whole-cluster routes of family ``f`` of cluster
    ``name`` (``cv``) for a viewer that routes via its own gateway's vx-local (``via_local``) or
    over vx-bridge, in the order :func:`_cluster_part` adds them: they depend on the viewer only
    through ``via_local`` (the next hop is the caller's), so they are computed once per view."""
    memo = (name, f, via_local)
    got = view.cluster_dsts.get(memo)
    if got is not None:
        return got
    glob = cv.config.global_cidrs
    gw_reachable = any(a.underlay(f) is not None for a in cv.actives)
    dsts: list[str] = []
    if via_local:
        reachable = gw_reachable if cv.gateway_mode else f in view.reach.get(name, frozenset())
        if reachable:
            dsts += routed(cv.config.pod_cidrs, glob)
        if gw_reachable:
            dsts += routed(cv.config.service_cidrs, glob)
            if cv.gateway_mode:
                dsts += local_hosts(view, cv, f)
    else:
        dsts += routed(cv.config.service_cidrs, glob)
        if cv.gateway_mode:
            dsts += routed(cv.config.pod_cidrs, glob)
            dsts += local_hosts(view, cv, f)
    made = view.cluster_dsts[memo] = tuple(canonical(d) for d in dsts if types.family_of(d) == f)
    return made


class _Sig:
    """A cluster signature (:func:`cluster_signature`) with its hash computed once: held parts
    are keyed by it, looked up per viewer class and changed cluster."""

    __slots__ = ("_hash", "value")

    def __init__(self, value: object) -> None:
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _Sig) and self._hash == other._hash and self.value == other.value)


@dataclasses.dataclass(slots=True)
class _Plan:
    """What one node's plan holds beyond its class's union of parts (IncrementalPlanner): the
    plan is the union of class ``cls`` without the keys ``own`` (the node's own part, which is
    in the union but not in its plan: a node is not its own peer) plus ``mine``, its self part.
    An update changes the union once for the whole class, so it changes every such plan without
    a copy per node (issue 21: hold per agent only what differs)."""

    cls: ViewerClass | None
    own: frozenset[str] = frozenset()
    mine: dict[str, types.Entry] = dataclasses.field(default_factory=dict)


_NO_PARTS: tuple[dict[str, types.Entry], dict[str, types.Entry]] = ({}, {})


def _inert(view: View, key: types.NodeKey) -> bool:
    """Is node ``key``'s part empty for every viewer class in ``view`` except the hot ones of
    its own cluster (a non-hot node of a gateway-mode cluster, or a node not there at all)? See
    the first return of :func:`_node_part`."""
    x = view.by_key.get(key)
    if x is None:
        return True
    xc = view.clusters.get(x.cluster)
    return xc is None or (xc.gateway_mode and key not in view.hot_keys)


def _contributors(view: View, cls: ViewerClass) -> Iterator[types.NodeAnnouncement]:
    """The nodes whose part can be non-empty for class ``cls``: the bridge nodes (every node of
    a P2P cluster, the hot ones of a gateway-mode cluster) and, for a hot class, the other nodes
    of its own cluster; every other node is :func:`_inert` for it. A new class's union then
    walks these, not all nodes (issue 21: at a bring-up of 100 gateway-mode clusters each new
    class walked up to 10,000 nodes to find ~300 with a part)."""
    yield from view.bridge_nodes
    own = view.clusters.get(cls.cluster)
    if cls.hot and own is not None and own.gateway_mode:
        yield from (x for x in own.nodes if x.key not in view.hot_keys)


def state_from_entries(entries: Mapping[str, types.Entry]) -> types.NodeState:
    """A NodeState from entries already keyed by :func:`types.entry_key` (the layout of
    ``NodeState.from_entries`` without re-deriving every key)."""
    ordered = [entries[k] for k in sorted(entries)]
    return types.NodeState(
        devices=tuple(e for e in ordered if isinstance(e, types.VxlanDevice)),
        peers=tuple(e for e in ordered if isinstance(e, types.Peer)),
        routes=tuple(e for e in ordered if isinstance(e, types.RouteEntry)),
        translations=tuple(e for e in ordered if isinstance(e, types.Translation)),
        programs=tuple(e for e in ordered if isinstance(e, types.Program)),
    )


def diff_entries(old: Mapping[str, types.Entry], new: Mapping[str, types.Entry]) -> types.StateDelta:
    """:func:`types.diff_states` on keyed entries."""
    if not old:  # a new node's whole plan (thousands per flush at a bring-up): nothing to compare
        return types.StateDelta(tuple(new[k] for k in sorted(new)), ())
    # Identity first: the planner's entries are interned, so an unchanged one is the same object.
    upserts = tuple(e for k in sorted(new) if (o := old.get(k)) is not (e := new[k]) and o != e)
    removals = tuple(k for k in sorted(old) if k not in new)
    return types.StateDelta(upserts, removals)


class IncrementalPlanner:
    """The plans of every node of a changing topology, kept up to date part by part.

    :meth:`update` adopts a new topology and returns, per node whose plan changed, the delta
    from its previous plan (equal to ``diff_states(plan(old, key), plan(new, key))``). Work per
    update is O(nodes) cheap signature compares to find what changed, then per node O(what
    changed for it): the parts of the changed sources are computed once per viewer class, and a
    viewer only swaps them in. A viewer whose own class or announcement changed, a new node and
    every node after a configuration change are planned in full, from the union of their class's
    parts (held per class and kept current the same way: a copy, not a :func:`plan` over every
    node; tests check the result equals :func:`plan`).

    Deltas are shared: viewers of one class that see the same changes get the very same
    StateDelta object, so the caller can encode one message for all of them.
    """

    def __init__(self) -> None:
        self.topology: types.Topology | None = None
        self._view: View | None = None
        #: Per node what its plan holds beyond its class's union (see :class:`_Plan`): its plan
        #: is not kept as a dict of its own (at 100 gateway-mode clusters, ~900 entries a node,
        #: the largest part of the planner's memory per node; issue 21).
        self._plans: dict[types.NodeKey, _Plan] = {}
        self._config: types.FabricConfig | None = None
        #: Work counters (see PartCounter), cumulative.
        self.counter = PartCounter()
        #: One object per distinct entry value held in the plans (entries are frozen and
        #: hashable): nodes of one viewer class hold equal routes and peers, and a full plan
        #: builds its own objects, so without this every node kept its own copies (most of the
        #: reflector's memory per agent, and millions of objects for the cyclic garbage
        #: collector to walk at 10,000 agents; issue 21). Rebuilt from the live plans when it
        #: has doubled since the last rebuild, so entries of nodes gone are not kept forever.
        self._canon: dict[types.Entry, types.Entry] = {}
        self._canon_rebuild_at = CANON_MIN_REBUILD
        #: Time spent planning nodes in full (new nodes, changed viewers), cumulative: the
        #: reflector bounds its flushes by it (see "Bounded flushes" in reflector.py).
        self.full_plan_seconds = 0.0
        #: ... and computing the changed parts per viewer class (grows with the changed nodes).
        self.changes_seconds = 0.0
        #: ... and building a class's union of parts (once per class, O(nodes)), not counted in
        #: ``full_plan_seconds``: the reflector divides that by the nodes planned.
        self.union_seconds = 0.0
        #: Per viewer class, the union of every ``node:`` and ``cluster:`` part at the current
        #: topology, its entries interned: the plan of a node planned in full is its class's
        #: union without its own node part, plus its self part (:meth:`_full`), a dict copy
        #: instead of a :func:`plan` over every node (full plans of new nodes were the largest
        #: single cost of a bring-up, issue 21). Every update brings each held union to the new
        #: topology with the changed parts it computes anyway, and drops those of classes no
        #: node has any more.
        self._unions: dict[ViewerClass, dict[str, types.Entry]] = {}
        #: Per class, a number that changes whenever its union's content may have (a new number
        #: from one counter, never reused): what a cache of something derived from a union (the
        #: reflector's encoded snapshot chunks, see :meth:`snapshot_source`) is keyed by.
        self._union_versions: dict[ViewerClass, int] = {}
        self._next_union_version = 0
        #: Cluster parts by what they depend on (see :meth:`_held_cluster_part`), of the current
        #: signatures (and, during an update, the old ones).
        self._cluster_parts: dict[tuple[object, ...], dict[str, types.Entry]] = {}
        #: Every whole-cluster route made, by (destination, next hop, device, next hops), as
        #: (entry key, interned entry): a cluster part of a new signature is mostly the routes of
        #: the last one (issue 21). Cleared with the entry table's rebuild.
        self._routes: dict[tuple[str, str, str, tuple[str, ...]], tuple[str, types.Entry]] = {}
        #: The cluster signatures of the current topology (``_sigs_view``), see :meth:`update`.
        self._sigs: dict[str, _Sig] = {}
        self._sigs_view: View | None = None
        #: Every planned node's viewer class at ``_classes_view`` (the current topology's view,
        #: see :meth:`update`): a node keeps its class while its announcement and its cluster's
        #: class basis (:func:`_class_basis`) stay, so an update classifies only the nodes that
        #: changed and those of clusters whose gateways did (issue 21: classifying all 10,000
        #: nodes twice was half of a flush that changed two plans).
        self._classes: dict[types.NodeKey, ViewerClass | None] = {}
        self._classes_view: View | None = None

    def entries(self, key: types.NodeKey) -> Mapping[str, types.Entry]:
        """The current plan of ``key`` as keyed entries (empty for an unknown node)."""
        return self._materialized(key)

    def state(self, key: types.NodeKey) -> types.NodeState:
        """The current plan of ``key``, built on demand (not cached: it is needed once per
        snapshot, and a cached copy of every plan doubled the reflector's memory per node)."""
        return state_from_entries(self._materialized(key))

    def size(self, key: types.NodeKey) -> int:
        p = self._plans.get(key)
        if p is None or p.cls is None:
            return 0
        return len(self._unions[p.cls]) - len(p.own) + len(p.mine)

    def values(self, key: types.NodeKey) -> Iterator[types.Entry]:
        """The entries of ``key``'s current plan, unordered, without building its dict."""
        p = self._plans.get(key)
        if p is None or p.cls is None:
            return
        own = p.own
        for k, e in self._unions[p.cls].items():
            if k not in own:
                yield e
        yield from p.mine.values()

    def _materialized(self, key: types.NodeKey) -> dict[str, types.Entry]:
        """The plan of ``key`` as a dict of its own (a new one per call)."""
        p = self._plans.get(key)
        if p is None or p.cls is None:
            return {}
        union = self._unions[p.cls]
        out = {k: e for k, e in union.items() if k not in p.own} if p.own else dict(union)
        out.update(p.mine)
        return out

    def planned(self, key: types.NodeKey, ann: types.NodeAnnouncement) -> bool:
        """Is ``ann`` (this very announcement) planned already?"""
        return self._view is not None and self._view.by_key.get(key) == ann

    def update(self, new: types.Topology) -> dict[types.NodeKey, types.StateDelta]:
        """Adopt ``new``; returns the delta of every node whose plan changed (a new node's delta
        is its whole plan). Nodes no longer in the topology are forgotten."""
        old_view, old_config = self._view, self._config
        view = VIEWS.get(new)
        self.topology, self._view, self._config = new, view, new.config
        for gone in [k for k in self._plans if k not in view.by_key]:
            del self._plans[gone]
        self._maybe_rebuild_canon()
        if old_view is None or old_config != new.config:
            previous = {k: self._materialized(k) for k in self._plans}  # while the unions are the old ones
            self._unions.clear()
            self._union_versions.clear()
            self._cluster_parts.clear()
            self._routes.clear()
            self._sigs, self._sigs_view = {}, None
            self._classes_view = None
            self._plans.clear()
            every: dict[types.NodeKey, types.StateDelta] = {}
            for n in new.nodes:
                if d := self._full(view, n, _viewer_class(view, n), previous.pop(n.key, {})):
                    every[n.key] = d
            return every

        # Which sources changed: O(nodes) cheap compares (identity first), once per update.
        changed_nodes = [
            key
            for key in view.by_key.keys() | old_view.by_key.keys()
            if _node_signature(old_view, key) != _node_signature(view, key)
        ]
        # The old signatures are the objects the last update made (the keys of the held cluster
        # parts), an unchanged new one is the old object: a part is then found by identity, not
        # by hashing and comparing a signature (cluster actives, vx-local CIDRs) per viewer class
        # and changed cluster (issue 21: 60,000 deep hashes per flush at 100 clusters).
        last = self._sigs if self._sigs_view is old_view else {}
        sigs: dict[str, tuple[_Sig, _Sig]] = {}
        for c in view.clusters:
            o = last.get(c) or _Sig(_cluster_signature(old_view, c))
            value = _cluster_signature(view, c)
            sigs[c] = (o, o if o.value == value else _Sig(value))
        self._sigs, self._sigs_view = {c: n for c, (_o, n) in sigs.items()}, view
        changed_clusters = [c for c, (o, n) in sigs.items() if o is not n]
        changed_set = set(changed_nodes)
        # A non-hot node of a gateway-mode cluster contributes only to the hot viewers of its own
        # cluster (see _node_part): at a bring-up nearly every changed node, so each viewer class
        # looks only at the changed nodes that can be in its plan (issue 21).
        seen: tuple[list[types.NodeKey], dict[str, list[types.NodeKey]]] = ([], {})
        for key in changed_nodes:
            if _inert(old_view, key) and _inert(view, key):
                seen[1].setdefault(key.cluster, []).append(key)
            else:
                seen[0].append(key)

        # Per class: the old and new union of the changed parts, computed once.
        class_changes: dict[ViewerClass, tuple[dict[str, types.Entry], dict[str, types.Entry]]] = {}
        per_node: dict[tuple[ViewerClass, types.NodeKey], tuple[dict[str, types.Entry], dict[str, types.Entry]]] = {}
        deltas: dict[tuple[ViewerClass, types.NodeKey | None], types.StateDelta] = {}
        out: dict[types.NodeKey, types.StateDelta] = {}
        # Viewers planned in full: their class or announcement changed (their old plans are read
        # before the unions change), or they are new.
        classes: list[ViewerClass | None] = []
        before: dict[types.NodeKey, dict[str, types.Entry]] = {}
        known = self._classes if self._classes_view is old_view else {}
        stable = {
            c for c, cv in view.clusters.items()
            if known and (ocv := old_view.clusters.get(c)) is not None and _class_basis(ocv) == _class_basis(cv)
        }  # fmt: skip
        keys: list[types.NodeKey] = []
        for node in new.nodes:
            key = node.key
            keys.append(key)
            old_node = old_view.by_key.get(key)
            if old_node is node and node.cluster in stable and key in known:
                classes.append(known[key])  # the same node, the same class basis: the same class
                continue
            cls = _viewer_class(view, node)
            classes.append(cls)
            if old_node is not None and key in self._plans and (
                old_node != node or cls != _viewer_class(old_view, old_node)
            ):
                before[key] = self._materialized(key)
        self._classes, self._classes_view = dict(zip(keys, classes, strict=True)), view
        if changed_nodes or changed_clusters:  # the held unions to the new topology
            for ucls, union in self._unions.items():
                changes = class_changes.get(ucls)
                if changes is None:
                    changes = self._changes(old_view, view, ucls, seen, changed_clusters, per_node, sigs)
                    class_changes[ucls] = changes
                old_u, new_u = changes
                if old_u or new_u:
                    self._union_changed(ucls)
                for k in old_u.keys() - new_u.keys():
                    del union[k]  # no other source has it: keys of sources never collide
                union.update(new_u)  # interned already (see _changes)
        live: set[ViewerClass] = set()
        for node, cls in zip(new.nodes, classes, strict=True):
            key = node.key
            if cls is not None:
                live.add(cls)
            if key in before or key not in self._plans:
                d = self._full(view, node, cls, before.pop(key, {}))
                if d:
                    out[key] = d
                continue
            if cls is None or not (changed_nodes or changed_clusters):
                continue
            excl = key if key in changed_set else None
            shared = deltas.get((cls, excl))
            if shared is None:
                changes = class_changes.get(cls)
                if changes is None:
                    changes = self._changes(old_view, view, cls, seen, changed_clusters, per_node, sigs)
                    class_changes[cls] = changes
                old_u, new_u = changes
                if excl is not None:
                    # The viewer's own node part is not in its plan.
                    mine_old, mine_new = per_node.get((cls, excl), _NO_PARTS)
                    self._plans[key].own = frozenset(mine_new)  # its own part, as seen by its class
                    old_u = {k: e for k, e in old_u.items() if k not in mine_old}
                    new_u = {k: e for k, e in new_u.items() if k not in mine_new}
                # Its upserts are new_u's entries, interned already (see _changes).
                shared = deltas[(cls, excl)] = diff_entries(old_u, new_u)
            elif excl is not None:
                self._plans[key].own = frozenset(per_node.get((cls, excl), _NO_PARTS)[1])
            if shared:  # the union already holds it: nothing to apply per viewer
                out[key] = shared
        for gone_cls in [c for c in self._unions if c not in live]:
            del self._unions[gone_cls]
            self._union_versions.pop(gone_cls, None)
        if changed_clusters:  # keep the parts of the current signatures only
            self._cluster_parts = {k: p for k, p in self._cluster_parts.items() if k[-1] == sigs[str(k[0])][1]}
        return out

    def _changes(
        self,
        old_view: View,
        view: View,
        cls: ViewerClass,
        seen: tuple[list[types.NodeKey], dict[str, list[types.NodeKey]]],
        changed_clusters: list[str],
        per_node: dict[tuple[ViewerClass, types.NodeKey], tuple[dict[str, types.Entry], dict[str, types.Entry]]],
        sigs: Mapping[str, tuple[_Sig, _Sig]],
    ) -> tuple[dict[str, types.Entry], dict[str, types.Entry]]:
        """The old and new union of the changed parts for class ``cls``: of the changed nodes
        ``seen`` by it (every class sees ``seen[0]``; the hot classes of a cluster also see
        that cluster's in ``seen[1]``, whose parts are empty for every other class) and of the
        changed clusters. Fills ``per_node`` with the node parts it computed. The entries of
        the new union are interned (the held objects of equal value)."""
        started = time.perf_counter()
        old_u: dict[str, types.Entry] = {}
        new_u: dict[str, types.Entry] = {}
        c, canon = self.counter, self._canon
        keys = seen[0] + seen[1].get(cls.cluster, []) if cls.hot else seen[0]
        for key in keys:
            o, n = old_view.by_key.get(key), view.by_key.get(key)
            po = _node_part(old_view, cls, o, c) if o is not None else {}
            pn = _node_part(view, cls, n, c) if n is not None else {}
            if pn:
                pn = {k: canon.setdefault(e, e) for k, e in pn.items()}
            per_node[(cls, key)] = (po, pn)
            old_u.update(po)
            new_u.update(pn)
        for name in changed_clusters:
            old_sig, new_sig = sigs[name]
            old_u.update(self._held_cluster_part(old_view, cls, name, old_sig))
            new_u.update(self._held_cluster_part(view, cls, name, new_sig))
        self.changes_seconds += time.perf_counter() - started
        return old_u, new_u

    def _held_cluster_part(self, view: View, cls: ViewerClass, name: str, sig: object) -> dict[str, types.Entry]:
        """:func:`_cluster_part` of cluster ``name`` (signature ``sig`` in ``view``), held: it
        depends on the viewer only through what the key below names, so viewer classes of many
        clusters share one (every active gateway's), and the part computed as new by one update
        is the old one of the next (at 100 gateway-mode clusters, where a bring-up changes every
        cluster in every flush, these were most of a flush; issue 21). Callers must not change
        what it returns. Only parts of the current signatures are kept (see :meth:`update`)."""
        if name == cls.cluster:
            return {}
        key = (name, cls.families, cls.routes_via_local, cls.local_vias, cls.local_groups, sig)
        part = self._cluster_parts.get(key)
        if part is None:
            part = self._cluster_parts[key] = _cluster_part(view, cls, name, self.counter, self._routes, self._canon)
        return part

    def _maybe_rebuild_canon(self) -> None:
        """Drop the entries no plan holds any more once the table doubled (amortised O(1))."""
        if len(self._canon) < self._canon_rebuild_at:
            return
        held = (*self._unions.values(), *(p.mine for p in self._plans.values()))
        self._canon = {e: e for entries in held for e in entries.values()}
        self._routes.clear()  # its entries were interned in the table replaced
        self._canon_rebuild_at = max(CANON_MIN_REBUILD, 2 * len(self._canon))

    def _full(
        self, view: View, node: types.NodeAnnouncement, cls: ViewerClass | None, old: Mapping[str, types.Entry]
    ) -> types.StateDelta:
        """Plan ``node`` (of class ``cls`` in ``view``, the current topology) in full, from its
        class's union of parts: equal to ``plan(topology, key)`` (the parts' union is the plan,
        and the entry keys of different sources never collide). Returns the delta from ``old``,
        its previous plan; keeps only its :class:`_Plan`."""
        started, building = time.perf_counter(), self.union_seconds
        self.counter.full_plans += 1
        new: dict[str, types.Entry] = {}
        plan_of = _Plan(cls)
        if cls is not None:
            union = self._union(view, cls)
            own = _node_part(view, cls, node, self.counter)  # a node is not its own peer
            new = {k: e for k, e in union.items() if k not in own} if own else dict(union)
            canon = self._canon
            mine = {k: canon.setdefault(e, e) for k, e in _self_part(view, node, cls).items()}
            new.update(mine)
            plan_of = _Plan(cls, frozenset(own), mine)
        delta = diff_entries(old, new)
        self._plans[node.key] = plan_of
        # Not the union's first build (once per class, not per node: see union_seconds).
        self.full_plan_seconds += time.perf_counter() - started - (self.union_seconds - building)
        return delta

    def _union(self, view: View, cls: ViewerClass) -> dict[str, types.Entry]:
        """The union of every ``node:`` and ``cluster:`` part for class ``cls`` at ``view`` (the
        current topology): held, or computed now (once per class, O(nodes) parts)."""
        union = self._unions.get(cls)
        if union is None:
            started = time.perf_counter()
            canon, c = self._canon, self.counter
            union = {}
            for x in _contributors(view, cls):
                for k, e in _node_part(view, cls, x, c).items():
                    union[k] = canon.setdefault(e, e)
            for name in view.clusters:
                union.update(_cluster_part(view, cls, name, c, self._routes, canon))  # interned
            self._unions[cls] = union
            self._union_changed(cls)
            self.union_seconds += time.perf_counter() - started
        return union

    def classes(self) -> int:
        """How many viewer classes have a union held (the live ones)."""
        return len(self._unions)

    def _union_changed(self, cls: ViewerClass) -> None:
        self._next_union_version += 1
        self._union_versions[cls] = self._next_union_version

    def snapshot_source(
        self, key: types.NodeKey
    ) -> tuple[ViewerClass, int, Mapping[str, types.Entry], Mapping[str, types.Entry]] | None:
        """``(class, union version, union, own entries)`` when node ``key``'s plan is exactly
        its class's union plus its own entries (no key of the union left out: its own node part
        is empty, as for every node outside the hot gateways of a gateway-mode cluster); None
        otherwise (or for an unknown node). The union is the planner's own dict: read it before
        the next :meth:`update`. Lets the reflector encode a class's entries once for every
        snapshot of the class (issue 21: "encode each distinct message once")."""
        p = self._plans.get(key)
        if p is None or p.cls is None or p.own:
            return None
        return p.cls, self._union_versions[p.cls], self._unions[p.cls], p.mine


