"""Who the simulated agents are: the P2P and gateway shapes of N nodes, their
announcements, and the change (a joiner joining or leaving) with the agents it must reach,
computed with the real planner.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from tools.bench import common as bc

_log = logging.getLogger(__name__)


# -- who the agents are ----------------------------------------------------------------------

#: Nodes per cluster of the gateway shape (fewer when N < 2 * CLUSTER_SIZE: at least 2 clusters).
CLUSTER_SIZE = 100
#: Gateway candidates per cluster of the gateway shape (its first nodes).
GATEWAY_CANDIDATES = 3
#: Underlay addresses per gateway-shape cluster (its node subnet): room for CLUSTER_SIZE nodes and
#: the joiner, aligned, so a cluster's vx-local addresses collapse into a few routes as in life.
UNDERLAY_BLOCK = 128
#: Without ``--shape``, the p2p and interleaved shapes run only up to this N (their state grows with N^2).
P2P_DEFAULT_MAX_N = 1000
#: The joiner's index: above any N this benchmark runs.
JOINER = 60_000


def shapes_for(opts: bc.Options, n: int) -> tuple[str, ...]:
    """The shapes to run at ``n``: ``--shape`` if given, else gateway (clusters in their own
    underlay blocks, as fleets are addressed) and subnets (the same, declared) at every N, and
    the two whose state grows with N^2, p2p and interleaved (the worst case of gateway mode:
    every node routes every other cluster's nodes one by one), up to P2P_DEFAULT_MAX_N."""
    if opts.shapes:
        return opts.shapes
    return ("p2p", "gateway", "subnets", "interleaved") if n <= P2P_DEFAULT_MAX_N else ("gateway", "subnets")


@dataclasses.dataclass(frozen=True)
class Shape:
    """The simulated fabric of one run: each agent's cluster and announcement, and the reflector's
    configuration. A pure function of (kind, n), so the driver, the workers and the bare server
    agree on it without exchanging it.

    Agent ``i`` (and the joiner, :data:`JOINER`) has node name ``n{i}`` and a unique underlay
    with unique host bits in the default vx-local range 198.19.0.0/16. ``p2p``: underlay
    198.18.0.10 + i; clusters ``a``/``b`` alternate (10.0.0.0/9, 10.128.0.0/9, /24 per node).
    ``gateway``: agent ``i`` is in cluster ``c{i % C}`` at position ``i // C``; cluster k owns
    the /16 10.0.0.0 + k * 2^16 (its node at position p the /24 number p; the joiner the last
    /24, 255, of c0) and, like a real cluster's node subnet, the underlay block 198.18.0.0 +
    k * 128 (its node at position p the address p + 1 of the block; the joiner 101 of c0's).
    ``subnets``: the same agents, and each cluster declares its underlay block as ``nodeCIDRs``,
    so other clusters route its vx-local addresses as one fixed /25. In both a join inside the
    block changes only the plans of its cluster's hot gateways
    (:func:`fabric.control.planner.local_hosts`: without ``nodeCIDRs``, the widest prefix around
    a cluster's nodes that holds no other cluster's address, here the block or more).
    ``interleaved``: the gateway shape's clusters, but agent ``i`` has the underlay address
    198.18.0.0 + i + 1 (the joiner N + 1, in the cluster agent N would join), so neighbouring
    addresses belong to different clusters, every cluster's vx-local addresses are host routes and
    a join changes the plans of every node outside its cluster: the worst case of gateway mode.
    """

    kind: str
    n: int

    def __post_init__(self) -> None:
        if self.kind not in bc.CONTROL_SHAPES:
            raise ValueError(f"unknown shape {self.kind!r} (known: {', '.join(bc.CONTROL_SHAPES)})")
        if not 1 <= self.n < JOINER:
            raise ValueError(f"N={self.n}: the control benchmark simulates 1 to {JOINER - 1} agents")
        if self.kind in ("gateway", "subnets") and self.clusters * UNDERLAY_BLOCK > 65536:
            raise ValueError(f"N={self.n}: the gateway shape's underlay blocks of {UNDERLAY_BLOCK} addresses "
                             f"fit at most {65536 // UNDERLAY_BLOCK} clusters (vx-local host bits must stay unique)")

    @property
    def clusters(self) -> int:
        return 2 if self.kind == "p2p" else max(2, -(-self.n // CLUSTER_SIZE))

    @property
    def suffix(self) -> str:
        """Figure-name suffix: ``_n100`` for p2p (the names of earlier runs), ``_gateway_n100``."""
        return f"_n{self.n}" if self.kind == "p2p" else f"_{self.kind}_n{self.n}"

    @property
    def label(self) -> str:
        return f"{self.kind} N={self.n:,}"

    def place(self, i: int) -> tuple[int, int]:
        """(cluster index, position in the cluster) of agent ``i``."""
        if self.kind == "interleaved" and i == JOINER:
            return self.n % self.clusters, self.n // self.clusters  # the next agent's: no neighbour of its cluster
        if self.kind != "p2p" and i == JOINER:
            return 0, 255
        c = self.clusters
        return i % c, i // c

    def cluster_name(self, k: int) -> str:
        return ("a", "b")[k] if self.kind == "p2p" else f"c{k}"

    def _cluster_base(self, k: int) -> int:
        if self.kind == "p2p":
            return int(ipaddress.ip_address("10.0.0.0" if k == 0 else "10.128.0.0"))
        return int(ipaddress.ip_address("10.0.0.0")) + k * 65536

    def announcement(self, i: int) -> Any:
        from fabric import types

        k, pos = self.place(i)
        cidr = f"{ipaddress.ip_address(self._cluster_base(k) + pos * 256)}/24"
        if self.kind == "p2p":
            underlay = ipaddress.ip_address(int(ipaddress.ip_address("198.18.0.10")) + i)
        elif self.kind == "interleaved":
            slot = self.n if i == JOINER else i
            underlay = ipaddress.ip_address(int(ipaddress.ip_address("198.18.0.0")) + slot + 1)
        else:
            slot = CLUSTER_SIZE if i == JOINER else pos
            underlay = ipaddress.ip_address(int(ipaddress.ip_address("198.18.0.0")) + k * UNDERLAY_BLOCK + slot + 1)
        return types.NodeAnnouncement(self.cluster_name(k), f"n{i}", str(underlay), (cidr,))

    def config_doc(self) -> dict[str, Any]:
        """The reflector's topology file (no node list: nodes come from the announcements)."""
        if self.kind == "p2p":
            return {
                "clusters": [
                    {"name": "a", "mode": "p2p", "podCIDRs": ["10.0.0.0/9"]},
                    {"name": "b", "mode": "p2p", "podCIDRs": ["10.128.0.0/9"]},
                ]
            }
        clusters = []
        for k in range(self.clusters):
            doc: dict[str, Any] = {
                "name": self.cluster_name(k),
                "mode": "gateway",
                "podCIDRs": [f"{ipaddress.ip_address(self._cluster_base(k))}/16"],
            }
            if self.kind == "subnets":  # the cluster's underlay block, as a real node subnet
                base = ipaddress.ip_address(int(ipaddress.ip_address("198.18.0.0")) + k * UNDERLAY_BLOCK)
                doc["nodeCIDRs"] = [f"{base}/{32 - (UNDERLAY_BLOCK.bit_length() - 1)}"]
            members = range(k, self.n, self.clusters)
            candidates = [f"n{i}" for i in members[:GATEWAY_CANDIDATES]]
            if candidates:
                doc["gateways"] = candidates
            clusters.append(doc)
        return {"clusters": clusters}

    def fabric_config(self) -> Any:
        """The configuration the reflector reads from :meth:`config_doc` (the same parser)."""
        from fabric import topology

        return topology.parse(self.config_doc(), f"bench control {self.kind} shape").fabric_config()


def agent_index(name: str) -> int:
    """Agent index of node name ``n{i}``; ValueError for any other name."""
    if not name.startswith("n") or not name[1:].isdigit():
        raise ValueError(f"node name {name!r} is not a simulated agent's (n<index>)")
    return int(name[1:])


@dataclasses.dataclass(frozen=True)
class Change:
    """What the joiner's join does to the N agents' plans, as the planner computes it.

    ``groups``: (agent indexes, the delta each of them gets), agents whose plan does not change
    left out; the leave changes the same agents (checked), with the inverse deltas.
    """

    groups: tuple[tuple[tuple[int, ...], Any], ...]
    roles: tuple[Any, ...]

    @property
    def affected(self) -> frozenset[int]:
        return frozenset(i for idx, _ in self.groups for i in idx)

    def delta_bytes(self, version: int) -> list[tuple[tuple[int, ...], bytes]]:
        """Per group, the serialized Delta message of ``version`` (what the reflector would send)."""
        from fabric.control import codec

        return [(idx, bytes(codec.delta_message(d, version).SerializeToString())) for idx, d in self.groups]


def planned_change(shape: Shape, roles: Sequence[Any] | None = None) -> Change:
    """The agents a join of the joiner changes and their deltas, by the real planner.

    ``roles`` are the gateway roles in force (the reflector's, from GetStatus); None = what
    ``election.elect`` gives with every agent connected (the bare baseline has no reflector). The
    roles after the join and after the leave are elected from those, as the reflector does.

    Cost: the planner plans every node of one viewer class alike (``incremental.viewer_class``: the
    class is everything a node's view of the others depends on), so the delta is computed once
    per class with ``plan`` (O(classes * plan size), a few per cluster) instead of once per node
    (O(N * plan size), which is O(N^2) in the p2p shape). A node whose class changes with the
    join is computed on its own. Workers check the result against what the reflector sends.
    """
    from fabric import types
    from fabric.control import election, incremental, planner

    config = shape.fabric_config()
    anns = [shape.announcement(i) for i in range(shape.n)]
    joiner = shape.announcement(JOINER)
    keys = {a.key for a in anns}

    def topo(nodes: list[Any], rs: Sequence[Any]) -> Any:
        return types.Topology(config, tuple(sorted(nodes, key=lambda a: a.key)), tuple(sorted(rs)))

    before = topo(anns, ())
    before = before.with_roles(election.elect(before, keys, {}) if roles is None else roles)
    after = topo([*anns, joiner], before.roles)
    after = after.with_roles(election.elect(after, keys | {joiner.key}, {}))
    left = topo(anns, after.roles)
    left = left.with_roles(election.elect(left, keys, {}))
    # A leave that restores the roles restores the topology (the usual case): its plans are known.
    stages = (before, after) if left == before else (before, after, left)
    # One topology at a time: the planner caches the view of the last topology it planned.
    classes = [[incremental.viewer_class(t, a.key) for a in anns] for t in stages]
    groups: dict[Any, list[int]] = {}
    for i in range(shape.n):
        cls = tuple(c[i] for c in classes)
        same = cls[0] is not None and all(c == cls[0] for c in cls)
        groups.setdefault(cls if same else ("node", i), []).append(i)
    reps = [idx[0] for idx in groups.values()]
    plans = [{r: planner.plan(t, anns[r].key) for r in reps} for t in stages]
    if len(plans) == 2:
        plans.append(plans[0])
    out: list[tuple[tuple[int, ...], Any]] = []
    for idx in groups.values():
        r = idx[0]
        join = types.diff_states(plans[0][r], plans[1][r])
        leave = types.diff_states(plans[1][r], plans[2][r])
        if bool(join) != bool(leave):
            raise RuntimeError(
                f"{shape.label}: the planner changes agent n{r}'s plan on the "
                f"{'join' if join else 'leave'} only; the benchmark assumes a leave undoes its join"
            )
        if join:
            out.append((tuple(idx), join))
    return Change(tuple(out), tuple(before.roles))
