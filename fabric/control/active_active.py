"""Active/active gateways (issue 21 section 2): the design, and its pure pieces.

Why
---

A gateway-mode cluster funnels all its inter-cluster traffic through one active gateway; the
standby idles. ``activeGateways: N`` (per cluster, default 1: nothing changes for existing
users) lets N gateways carry traffic at once, and losing one moves only its share of the flows.

The shape
---------

* **Roles.** :class:`~fabric.types.GatewayRole` keeps ``active`` (the first active gateway, as
  before) and gains ``also_active`` (the N-1 others). The standby stays: a hot node outside the
  actives that holds the same devices and peers, ready to be promoted. Election
  (:func:`pick_also_active`, called by :func:`fabric.control.election.elect`) is sticky like
  the single-active rule: an also-active gateway keeps its role while it is up and nobody
  reports it; one that is reported (or gone) drops out at once and the best healthy candidate
  (the standby first: it is hot already) fills the place.
* **Hot nodes** are the actives plus the standby, so every active gateway has ``vx-bridge``
  and ``vx-local``, and every bridge node of the other clusters has a peer (static neighbour +
  FDB entry) for each of them (``probe=True``: the failover detection watches every active).
* **Routes as groups.** Where the planner routed a destination "via C's active gateway", it
  now routes it via *every* active gateway of C: :attr:`~fabric.types.RouteEntry.vias` holds
  their overlay IPs, sorted (:func:`route_vias`); ``via`` stays the first active's, so a
  consumer that knows only ``via`` still routes through a forwarding gateway. This holds for
  remote clusters (over ``vx-bridge``, C's pod/service CIDRs and ``vx-local`` hosts) and for
  C's own non-active nodes (internal nodes and the standby, over ``vx-local``, everything of
  the other clusters). ``vias`` is set whenever the cluster asks for N > 1, even while only one
  active is left, so the agent keeps one group object and only its members change.
* **Agent.** A route with ``vias`` becomes ``dst nhid G`` where ``G`` is a *resilient* nexthop
  group (``ip nexthop add id G group a/b type resilient``, kernel >= 5.13) over the members'
  ordinary onlink nexthop objects. Resilient = a fixed table of hash buckets: a flow hashes to
  a bucket, a bucket names a member. Replacing the group's member list in place moves only the
  buckets of the removed member (they are orphaned and reassigned at once); the survivors'
  buckets are untouched, so their flows see no change at all. A newly added member takes over
  buckets only once they have been idle (the kernel's idle timer), so growing the group does
  not move established flows either. The route owner therefore never swaps a route to a new
  group when the members change: it replaces the members of the group the route already uses
  (matched by the most members in common, so the rule also holds after an agent restart).
* **Failover.** Nothing new: peers probe every active gateway through the tunnel; when one is
  reported unreachable, election drops it from ``also_active`` (or moves ``active``), the
  planner's delta changes ``vias`` of the affected routes, and the agents replace the group's
  members - within the existing detection time (~0.3 s in the lab).

Return traffic
--------------

Flows need not be symmetric through the gateways: a gateway only routes (no conntrack state
of ours, no NAT), and global-IP translation is stateless and 1:1 (each side translates its own
addresses the same way on every node that has the tunnel program; see the planner), so a
reply that hashes to the other gateway is translated and forwarded the same way. What can
break asymmetric flows is stateful filtering on a gateway node (a conntrack ``INVALID`` drop
rule of someone else's, or ``rp_filter`` strict with routes that do not point back out of the
receiving device - ours do: both directions use the same device on each hop). The hash is
the kernel's multipath hash (``net.ipv4.fib_multipath_hash_policy``, per network namespace:
0 = L3 only, so flows between the same two hosts share a gateway; 1 = L4 spreads them).

Symmetry matters for one thing: a flow whose requests cross gateway A and whose replies cross
gateway B is hit by the loss of *either*. The kernel's flow hash is symmetric (source and
destination are put in order before hashing), a fresh resilient group fills its buckets in
member order, and both sides list the same gateways in the same order (sorted by address: the
``vx-bridge`` and ``vx-local`` addresses of a node share the underlay's host bits). So on one
kernel (the lab) every flow's replies leave by the gateway its requests came in by - the lab
test checks it per flow, and cutting one gateway loses no packet of the other's flows. Across
machines the hash is also seeded per boot unless ``net.ipv4.fib_multipath_hash_seed`` (kernel
>= 6.11) is set to the same value on every node; without it, flows are spread on both sides
independently: still correct (stateless), but a gateway's loss then also costs a short gap to
the flows whose replies used it. So the agent sets one seed fabric-wide (derived from the fabric
CA, or ``--multipath-hash-seed``) in its node's namespace while the plan has routes with
``vias``, and hashes IPv6 by addresses only (IPv6's default policy hashes the flow label, which
differs between a flow's two directions): :mod:`fabric.agent.multipath`. The seed keys IPv4,
IPv6 and the resilient groups alike (read in the kernel source; tested on a real kernel in
tests/privileged/test_multipath_seed_kernel.py).

Symmetry also needs the two ends' bucket tables to agree. Fresh groups, and the removal of a
member (its orphaned buckets are handed out at once, in bucket order), keep them equal; a
member *added* back takes over buckets only as each goes idle on that node, so after a heal the
two ends may disagree for the flows whose buckets moved on one side only until they idle there
too (a short gap for those flows if a gateway is lost in that window).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterable, Sequence


def pick_also_active(
    want: int,
    cands: Sequence[str],
    active: str,
    current: Sequence[str],
    healthy: Collection[str],
    rank: Callable[[str], tuple[int, ...]],
) -> tuple[str, ...]:
    """The active gateways beside ``active`` for a cluster that asks for ``want`` in all.

    ``cands``: the candidates present; ``current``: the cluster's ``also_active`` now;
    ``healthy``: the candidates that are up and reported unreachable by nobody; ``rank``: the
    election's order (smaller is better). Sticky: a current also-active gateway that is still a
    healthy candidate keeps its place (its flows must not move); the free places go to the best
    healthy candidates by ``rank``. An unhealthy node is never picked: a gateway its peers cannot
    reach would black-hole its share of flows. Result: most preferred first, without ``active``,
    at most ``want - 1`` names.
    """
    if want <= 1:
        return ()
    present = set(cands)
    keep = [n for n in current if n in present and n != active and n in healthy]
    keep = list(dict.fromkeys(keep))[: want - 1]
    free = sorted((n for n in cands if n != active and n not in keep and n in healthy), key=rank)
    return tuple(keep + free[: want - 1 - len(keep)])


def route_vias(vias: Iterable[str], configured: int) -> tuple[str, tuple[str, ...]]:
    """``(via, vias)`` of a route to a destination behind the active gateways whose overlay IPs
    are ``vias`` (active first), for a cluster configured with ``configured`` actives.

    ``via`` is the first active's address (what a single-next-hop consumer uses); ``vias`` is the
    sorted, de-duplicated set when ``configured`` > 1 (even with one member left, so the agent
    keeps its group and only the members change) and empty otherwise (the classic route).
    Raises ValueError when ``vias`` is empty: there is nothing to route through.
    """
    ordered = list(dict.fromkeys(vias))
    if not ordered:
        raise ValueError("a route needs at least one active gateway")
    if configured <= 1:
        return ordered[0], ()
    return ordered[0], tuple(sorted(ordered, key=_address_order))


def _address_order(ip: str) -> tuple[int, int]:
    """Numeric order of an address (text order would put 10.0.0.10 before 10.0.0.9)."""
    a = ipaddress.ip_address(ip)
    return a.version, int(a)
