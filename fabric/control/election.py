"""Gateway election, a pure function of the topology and the liveness evidence.

Every gateway-mode cluster (and every P2P cluster, for its service CIDRs) has one active gateway
and at most one hot standby, chosen among its candidates that are present, by the fewest peers
reporting them unreachable, then by the order of the candidates; an incumbent keeps its role
while it is as good as any other (no flapping). The reflector stores the result in the
topology (``Topology.roles``) so that :func:`fabric.control.planner.plan` stays pure.

Evidence, and what it proves (issue 21 section 3). A session says the *agent* talks to the
reflector; the probes through the tunnel say the *dataplane* forwards (the peer's kernel
answers them, no process is involved). A gateway forwards with its agent dead or restarting, so
a session that ended is not by itself a dead gateway: a node whose session ended less than the
reflector's session-loss grace ago (``lingering``) keeps its roles unless its peers also report
it unreachable - then it is dead (a cut machine loses both at once, and the probes detect it in
0.3 s). It is the split routers make between a control plane that restarts and forwarding that
goes on (graceful restart with BFD: the forwarding path's own liveness decides, not the routing
session's), and what Submariner learnt under load: a gateway that failed to renew its lease
under heavy load lost its role (submariner#2747), and since submariner#2763 a lost lease leaves
the cable driver as it is, so losing the control side alone disrupts nothing. Only past the
grace without a session is the node taken for gone. The probes' word is weighed too: one peer
alone reporting a node that keeps its session may be a starved or flaky prober, so its report
counts only once it has stood a while (:func:`confirmed_scores`); a real failure is seen by all
the node's peers at once.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from fabric import types
from fabric.control import active_active

_log = logging.getLogger(__name__)

#: A lone report (one peer says a node with a session is unreachable, nobody else does) counts
#: only once it has stood this long: see :func:`confirmed_scores`.
LONE_REPORT_CONFIRM_S = 0.5

# --------------------------------------------------------------------------------------------
# Election
# --------------------------------------------------------------------------------------------


def candidates(cluster: types.ClusterConfig, present: Collection[str]) -> list[str]:
    """Gateway candidates of ``cluster`` that are in the topology, most preferred first: the
    configured ``gateways`` in their order, or every node by name when none are configured."""
    if cluster.gateways:
        return [n for n in cluster.gateways if n in present]
    return sorted(present)


def elect(
    topology: types.Topology,
    connected: Collection[types.NodeKey],
    unreachable: Mapping[types.NodeKey, int],
    lingering: Collection[types.NodeKey] = frozenset(),
) -> tuple[types.GatewayRole, ...]:
    """The gateway roles the reflector should plan with, given its liveness view.

    ``connected``: nodes with an open session. ``lingering``: nodes whose session ended within
    the session-loss grace (see the module docstring): they count as *up* for keeping a role
    (never preferred over a connected candidate for taking one). ``unreachable``: per node, how
    many *other* nodes currently report it unreachable through the tunnel (their probes stopped
    being answered). A candidate is *healthy* when up and reported by nobody.

    Rules, per cluster (pure, deterministic for equal inputs):

    * The current active gateway keeps the role while it is up (connected or lingering) and
      nobody reports it (sticky: a healed old gateway does not take the role back; an agent
      restart on the active gateway moves nothing).
    * Otherwise the role moves to the best up candidate - connected before lingering, fewest
      reports, then the configured order - but only if that candidate is strictly better than
      the current one (or the current one is not up any more). One peer whose own link is broken reports every
      gateway alike and so moves nothing; a dead gateway is reported by all its peers and moves.
    * Without any connected candidate the current gateway stays (its dataplane may still work);
      with no current gateway, the first candidate in the topology is taken.
    * The standby is kept while it is a healthy candidate; otherwise the best remaining
      candidate (connected first) replaces it.

    * Active/active (``activeGateways: N`` > 1): ``also_active`` holds up to N-1 more actives,
      healthy candidates only, sticky (see :func:`~fabric.control.active_active.pick_also_active`);
      the standby is chosen among the candidates that are not active.

    One value per cluster: the planned state names each active gateway of a cluster once.
    """
    present: dict[str, list[str]] = {}
    for n in topology.nodes:
        present.setdefault(n.cluster, []).append(n.name)
    roles: list[types.GatewayRole] = []
    for c in topology.config.clusters:
        cands = candidates(c, present.get(c.name, ()))
        if cands:
            roles.append(
                _elect_cluster(
                    c.name, cands, topology.role(c.name), connected, unreachable, lingering,
                    c.active_gateways if c.mode == types.ClusterMode.GATEWAY else 1,
                )
            )
    return tuple(sorted(roles))


def unreachable_scores(
    reports: Mapping[types.NodeKey, Collection[types.NodeKey]],
    probe_targets: Mapping[types.NodeKey, Collection[str]],
) -> dict[types.NodeKey, int]:
    """Per node, how many *other* nodes report it unreachable: the input of :func:`elect`.

    ``reports``: each reporter's latest set of unreachable peers; ``probe_targets``: the peers
    (``cluster/node``) each reporter was planned to probe. A reporter that cannot reach *any*
    of its two or more targets is isolated itself - its own link is down, or it just came back
    and its probes have not been answered yet - and says nothing about the others, so its report
    is not counted. Without this, a healed old gateway's stale report would make the new active
    gateway look dead and pull the role back (a flap).
    """
    return {k: len(by) for k, by in _reporters(reports, probe_targets).items()}


def _reporters(
    reports: Mapping[types.NodeKey, Collection[types.NodeKey]],
    probe_targets: Mapping[types.NodeKey, Collection[str]],
) -> dict[types.NodeKey, list[types.NodeKey]]:
    """Per node, the reporters whose report of it counts (see :func:`unreachable_scores`)."""
    out: dict[types.NodeKey, list[types.NodeKey]] = {}
    for reporter, down in reports.items():
        targets = set(probe_targets.get(reporter, ()))
        if len(targets) >= 2 and targets <= {str(k) for k in down}:
            continue
        for k in down:
            if k != reporter:
                out.setdefault(k, []).append(reporter)
    return out


def confirmed_scores(
    reports: Mapping[types.NodeKey, Collection[types.NodeKey]],
    probe_targets: Mapping[types.NodeKey, Collection[str]],
    since: Mapping[types.NodeKey, Mapping[types.NodeKey, float]],
    now: float,
    connected: Collection[types.NodeKey],
    confirm_s: float = LONE_REPORT_CONFIRM_S,
) -> tuple[dict[types.NodeKey, int], float | None]:
    """:func:`unreachable_scores` as the election should weigh them, and the earliest time a
    lone report not counted yet will count (None: nothing pending).

    Independent confirmation (issue 21 section 3): a prober starved of CPU, or one whose own
    path is flaky, says something about itself as much as about its target. So a node that
    still has its session and is reported by exactly one peer is not taken for dead until that
    report has stood ``confirm_s`` (``since[reporter][target]``: when the reporter first said
    so). A second peer's report, or the node's session being gone as well, is the confirmation
    and counts at once, so a real cut - seen by every peer of the node together - still moves
    the role within the probes' detection time; a node with one peer only fails over
    ``confirm_s`` later (0.3 + 0.5 s: still under a second).
    """
    by = _reporters(reports, probe_targets)
    scores = {k: len(rs) for k, rs in by.items()}
    pending: float | None = None
    for k, rs in by.items():
        if len(rs) != 1 or k not in connected:
            continue
        at = since.get(rs[0], {}).get(k, now) + confirm_s
        if now < at:
            del scores[k]
            pending = at if pending is None else min(pending, at)
    return scores, pending


def _elect_cluster(
    cluster: str,
    cands: list[str],
    current: types.GatewayRole | None,
    connected: Collection[types.NodeKey],
    unreachable: Mapping[types.NodeKey, int],
    lingering: Collection[types.NodeKey],
    want: int = 1,
) -> types.GatewayRole:
    """:func:`elect` for one cluster with at least one candidate present; ``want`` active
    gateways in all (active/active, see :mod:`fabric.control.active_active`)."""
    order = {name: i for i, name in enumerate(cands)}
    live = {name for name in cands if types.NodeKey(cluster, name) in connected}
    up = live | {name for name in cands if types.NodeKey(cluster, name) in lingering}
    score = {name: unreachable.get(types.NodeKey(cluster, name), 0) for name in cands}

    def rank(name: str) -> tuple[int, int, int]:
        return (0 if name in live else 1 if name in up else 2, score[name], order[name])

    active = current.active if current is not None and current.active in order else ""
    if not active:
        active = min(cands, key=rank)
    elif active not in up or score[active] > 0:
        best = min(up, key=rank) if up else ""
        if best and best != active and (active not in up or score[best] < score[active]):
            active = best
    healthy = {n for n in up if score[n] == 0}
    also = active_active.pick_also_active(
        want, cands, active, current.also_active if current is not None else (), healthy, rank
    )
    rest = [n for n in cands if n != active and n not in also]
    standby = current.standby if current is not None and current.standby in rest else ""
    if rest and (not standby or standby not in up or score[standby] > 0):
        best = min(rest, key=rank)
        if not standby or rank(best) < rank(standby):
            standby = best
    return types.GatewayRole(cluster, active, standby, also)
