"""Per cluster-pair reachability: the rules that derive each pair's
:class:`~fabric.control.reachability.PairState` from what the reflector knows. Pure (the unit
tests drive :func:`derive` directly); the reflector calls it whenever its inputs change and
publishes the records (``Reflector._publish_reachability``). Kept apart from the record contract
(:mod:`fabric.control.reachability`) because it needs the planner, which add-ons must not import.

One record per ordered pair of distinct clusters of the configuration; a cluster that leaves the
configuration takes its records with it (no record: the cluster is not in the fabric, or the
reflector has no answer yet: it publishes nothing during its startup hold). The rules, the first
that applies (the tree manager, the MCS controller and the scheduler read only their outcome):

1. the pair shares no address family (:func:`fabric.control.planner.unreachable_pairs`):
   unreachable;
2. either cluster has no node in the topology (no agent announced one, or all were
   withdrawn): unreachable;
3. the probes. Who probes whom across clusters is the planner's rule: every node with
   ``vx-bridge`` (any node of a P2P cluster; the active and standby gateway of a gateway-mode
   cluster) probes the active and standby gateway of every other cluster (P2P clusters elect
   them too) in the families both nodes carry. Internal nodes of a gateway-mode cluster probe
   only their own gateways and never a remote cluster's, so they say nothing about a pair; a
   target's nodes other than its gateways are never probed, which is why the old rule "every
   node of the target reported" could never fire for a cluster of more than two nodes. The
   *probers* of ``source -> target`` are the source's ``vx-bridge`` nodes that have a session
   with the reflector and probe at least one gateway of the target. Then:

   * some prober exists and every one finds all its targets unreachable: unreachable (one
     prober whose own link is down does not cut its cluster off while another still gets
     through; a whole cluster cut off, or a target whose gateways are all dead, does);
   * some prober exists and one of them gets through: reachable (the reason says when some
     others do not);
   * no prober has a session (the source's gateways lost the reflector, e.g. a cluster cut off
     the underlay that carries its control sessions too): the reverse measurement stands in,
     as a tunnel probe is a round trip. Unreachable if the target's probers all find the
     source unreachable, else reachable and said to be unmeasured.

RTT and loss: agents add to their peer reports the median round trip and the loss ratio of each
probed peer over their probes' window (rate-limited there: a report when a value moves by more
than a fifth, or every 30 s; fabric/agent/quality.py). A reachable pair's ``rtt_ms`` and
``loss`` are the medians over every (connected prober of the source, answering gateway of the
target) measurement (:func:`pair_quality`), rounded (RTT to two significant digits, loss to
hundredths) so that jitter does not re-put records: a record changes when the pair's quality
moves, not with every report. None while no prober measured the pair.

Latency: an agent reports within its probes' detection time (0.3 s with the defaults) and the
reflector republishes on the next event-loop turn (see ``Reflector._reachability_changed``), so a
cut reaches a subscriber in about 0.3 s plus two network hops, except for reports the reflector
holds from an agent that was itself just cut off (``report_settle``, 2 s).
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Collection, Mapping

from fabric import types
from fabric.control import planner, reachability
from fabric.control.reachability import PairState

#: ``(rtt_ms, loss)`` of a pair, as the source's probes measured it (either may be None).
Quality = tuple[float | None, float | None]


def probe_targets(topology: types.Topology) -> dict[types.NodeKey, frozenset[types.NodeKey]]:
    """Per node, the gateways of *other* clusters it probes through the tunnel: the planner's
    rule (``probe=True`` peers of another cluster, fabric.control.planner), derived from the
    roles and families instead of planning every node. Nodes that probe no other cluster
    (internal nodes of a gateway-mode cluster) are left out. The targets depend only on the
    prober's cluster and families, so they are computed once per such class and shared:
    O(nodes + classes x gateways). The unit tests check it against the planner's plans."""
    configs = {c.name: c for c in topology.config.clusters if c.mode in planner.SUPPORTED_MODES}
    by_cluster: dict[str, list[types.NodeAnnouncement]] = {}
    for n in topology.nodes:
        if n.cluster in configs:
            by_cluster.setdefault(n.cluster, []).append(n)

    def families(n: types.NodeAnnouncement) -> frozenset[int]:
        return frozenset(types.family_of(ip) for ip in n.underlay_ips) & frozenset(configs[n.cluster].families)

    gateways: list[tuple[types.NodeKey, frozenset[int]]] = []
    for name, nodes in by_cluster.items():
        role = topology.role(name)
        names = {*role.actives, role.standby} - {""} if role is not None else set()
        gateways += [(n.key, families(n)) for n in nodes if n.name in names]
    hot = {k for k, _ in gateways}
    classes: dict[tuple[str, frozenset[int]], frozenset[types.NodeKey]] = {}
    out: dict[types.NodeKey, frozenset[types.NodeKey]] = {}
    for name, nodes in by_cluster.items():
        probers = nodes
        if configs[name].mode is types.ClusterMode.GATEWAY:
            probers = [n for n in nodes if n.key in hot]
        for p in probers:
            cls = (name, families(p))
            targets = classes.get(cls)
            if targets is None:
                targets = classes[cls] = frozenset(k for k, fams in gateways if k.cluster != name and fams & cls[1])
            if targets:
                out[p.key] = targets
    return out


def inputs(
    topology: types.Topology,
    connected: Collection[types.NodeKey],
    reports: Mapping[types.NodeKey, Collection[types.NodeKey]],
    measured: Mapping[types.NodeKey, Mapping[types.NodeKey, tuple[float | None, float]]],
) -> tuple[object, ...]:
    """Everything :func:`derive` and :func:`pair_quality` read, reduced to what can change their
    outcome: equal values mean equal records, so the reflector derives again only when this
    changes (issue 21: at 100 clusters a derivation walks 9,900 pairs, ~0.1 s, and a bring-up
    of 10,000 agents asked for one after nearly every flush, though only a few changed a record).

    What counts: the configuration, the roles, which clusters have a node, and per node that can
    probe or be probed across clusters (every node of a P2P cluster, the named gateways of a
    gateway-mode one; :func:`probe_targets`) its announcement (its families), its session, its
    latest report and its measurements. Internal nodes of gateway-mode clusters say nothing
    about a pair, so their joins, leaves and sessions change nothing here. Found by bisection
    in the key-sorted nodes: O(clusters and probing nodes, times log nodes), not O(nodes); a
    bring-up of 10,000 agents asks after every session it admits."""
    hot: dict[str, set[str]] = {}
    for r in topology.roles:
        hot.setdefault(r.cluster, set()).update(name for name in (*r.actives, r.standby) if name)
    p2p = {c.name for c in topology.config.clusters if c.mode is types.ClusterMode.P2P}
    nodes = topology.nodes
    populated: set[str] = set()
    relevant: list[tuple[object, ...]] = []
    lo = 0
    while lo < len(nodes):  # one step per cluster that has nodes, in key order
        cluster = nodes[lo].cluster
        hi = bisect.bisect_right(nodes, cluster, lo=lo, key=_cluster_of)
        populated.add(cluster)
        if cluster in p2p:
            members = list(nodes[lo:hi])
        else:
            members = []
            for name in sorted(hot.get(cluster, ())):
                i = bisect.bisect_left(nodes, name, lo=lo, hi=hi, key=_name_of)
                if i < hi and nodes[i].name == name:
                    members.append(nodes[i])
        for n in members:
            key = n.key
            mine = measured.get(key)
            relevant.append((n, key in connected, frozenset(reports.get(key, ())),
                             tuple(sorted(mine.items())) if mine else ()))  # fmt: skip
        lo = hi
    return topology.config, topology.roles, frozenset(populated), tuple(relevant)


def speaks_for_pairs(topology: types.Topology, key: types.NodeKey) -> bool:
    """Can the session, report or measurements of node ``key`` change :func:`inputs`? Only for a
    node of a P2P cluster or a named gateway (active or standby) of another cluster: the rest are
    the internal nodes :func:`inputs` leaves out. A node that becomes a gateway does so in a new
    topology (its roles), which the reflector derives from anyway; so it may skip deriving for
    the sessions of the rest (a bring-up of 10,000 agents opens 9,800 of them)."""
    config = topology.config.cluster(key.cluster)
    if config is not None and config.mode is types.ClusterMode.P2P:
        return True
    role = topology.role(key.cluster)
    return role is not None and key.name in (*role.actives, role.standby)


def _cluster_of(n: types.NodeAnnouncement) -> str:
    return n.cluster


def _name_of(n: types.NodeAnnouncement) -> str:
    return n.name


def derive(
    topology: types.Topology,
    connected: Collection[types.NodeKey],
    reports: Mapping[types.NodeKey, Collection[types.NodeKey]],
    quality: Mapping[tuple[str, str], Quality] | None = None,
    targets: Mapping[types.NodeKey, frozenset[types.NodeKey]] | None = None,
) -> dict[tuple[str, str], PairState]:
    """Every ordered pair's :class:`PairState`, by ``(source, target)``: see the module
    docstring for the rules. ``topology``: the reflector's flushed topology (gateway roles
    elected); ``connected``: nodes with a session; ``reports``: each node's latest counted peer
    report (the probed peers it finds unreachable); ``quality``: measured RTT/loss per pair
    (passed through to reachable pairs only); ``targets``: :func:`probe_targets` of
    ``topology`` when the caller has it already. Costs O(probers x target clusters +
    clusters^2), plus the gateways of each prober that reports something."""
    config = topology.config
    populated = {n.cluster for n in topology.nodes}
    no_family = {frozenset((a, b)): why for a, b, why in planner.unreachable_pairs(config)}
    # (source cluster, target cluster) -> per connected prober: does it get through?
    through: dict[tuple[str, str], dict[types.NodeKey, bool]] = {}
    # Shared target sets, by target cluster: lists, not sets (the keys of a target set are
    # distinct already; hashing every gateway's key per prober class was most of a derivation at
    # 100 clusters, issue 21).
    split: dict[int, dict[str, list[types.NodeKey]]] = {}
    for prober, ts in (probe_targets(topology) if targets is None else targets).items():
        if prober not in connected:
            continue
        by_target = split.get(id(ts))
        if by_target is None:
            by_target = split[id(ts)] = {}
            for key in ts:
                by_target.setdefault(key.cluster, []).append(key)
        down = reports.get(prober)
        if not down:
            for cluster in by_target:
                through.setdefault((prober.cluster, cluster), {})[prober] = True
            continue
        down_set = set(down)
        for cluster, gws in by_target.items():
            through.setdefault((prober.cluster, cluster), {})[prober] = not all(g in down_set for g in gws)

    def probes(source: str, target: str) -> dict[types.NodeKey, bool] | None:
        return through.get((source, target))

    states: dict[tuple[str, str], PairState] = {}
    for a in config.clusters:
        for b in config.clusters:
            if a.name == b.name:
                continue
            s, t = a.name, b.name

            def unreachable(why: str, s: str = s, t: str = t) -> None:
                states[(s, t)] = PairState(s, t, False, why)

            if (why := no_family.get(frozenset((s, t)))) is not None:
                unreachable(f"the fabric cannot connect {s} and {t}: {why}")
                continue
            empty = next((c for c in (s, t) if c not in populated), None)
            if empty is not None:
                unreachable(f"cluster {empty} has no node in the fabric: none of its agents has announced one, "
                            f"or all were withdrawn")  # fmt: skip
                continue
            measured = probes(s, t)
            if measured is not None:
                if not any(measured.values()):
                    unreachable(f"every node of {s} that probes the gateways of {t} gets no answer through the "
                                f"tunnel: check the underlay between them (UDP 4876, 4866 for IPv6)")  # fmt: skip
                    continue
                rtt, loss = (quality or {}).get((s, t), (None, None))
                why = (f"the fabric connects {s} to {t}: its probes of {t}'s gateways are answered"
                       if all(measured.values()) else
                       f"the fabric connects {s} to {t}, but some nodes of {s} get no answer from {t}'s gateways "
                       f"(fabric-tool status shows which)")  # fmt: skip
                states[(s, t)] = PairState(s, t, True, why, rtt, loss)
                continue
            reverse = probes(t, s)
            if reverse is not None and not any(reverse.values()):
                unreachable(f"no node of {s} that probes {t} is connected to the reflector, and every node of {t} "
                            f"that probes the gateways of {s} gets no answer through the tunnel")  # fmt: skip
                continue
            states[(s, t)] = PairState(s, t, True, f"no node of {s} that probes {t} is connected to the reflector: "
                                       f"not measured, assumed reachable")  # fmt: skip
    return states


def pair_quality(
    topology: types.Topology,
    connected: Collection[types.NodeKey],
    reports: Mapping[types.NodeKey, Collection[types.NodeKey]],
    measured: Mapping[types.NodeKey, Mapping[types.NodeKey, tuple[float | None, float]]],
    targets: Mapping[types.NodeKey, frozenset[types.NodeKey]] | None = None,
) -> dict[tuple[str, str], Quality]:
    """Per ordered cluster pair, ``(rtt_ms, loss)``: medians over each connected prober's
    measurement (``measured``: prober -> probed peer -> (rtt ms or None, loss)) of each gateway
    of the target it probes and does not report unreachable, rounded (module docstring). Pairs
    nobody measured are left out; an RTT is None when no probe was answered."""
    rtts: dict[tuple[str, str], list[float]] = {}
    losses: dict[tuple[str, str], list[float]] = {}
    if targets is None:
        targets = probe_targets(topology)
    for prober, mine in measured.items():
        ts = targets.get(prober)
        if prober not in connected or not mine or not ts:
            continue
        down = set(reports.get(prober, ()))
        for t in ts:
            if t in down or t not in mine:
                continue
            rtt, loss = mine[t]
            pair = (prober.cluster, t.cluster)
            losses.setdefault(pair, []).append(loss)
            if rtt is not None:
                rtts.setdefault(pair, []).append(rtt)
    return {
        pair: (reachability.round_rtt(statistics.median(rtts[pair])) if pair in rtts else None,
               reachability.round_loss(statistics.median(ls)))
        for pair, ls in losses.items()
    }  # fmt: skip
