"""Control-plane benchmark: topology change -> the last affected simulated agent reporting it applied.

Processes (all on this machine, talking over unix sockets in a private temporary directory; no
namespaces, no kernel objects, so no root needed)::

    driver (this module's run())
      |-- fabric-reflector  (python -m fabric.control.reflector_cli; --grace-period 0 so a leave is
      |                      immediate, --startup-hold 0, keepalives every 30 s)
      |-- W worker processes (python -m tools.bench.control worker): N light agents in total,
      |                      each its own channel (own connection) and SyncNode stream
      '-- 1 joiner process   (the same worker code with one agent that joins/leaves on command)

**Shapes** (``--shape``; :class:`Shape`): ``p2p`` = two P2P clusters, so every agent's plan holds
a peer and a route for every other node (O(N^2) state in the reflector and in the snapshots: the
worst case); ``gateway`` = gateway-mode clusters of :data:`CLUSTER_SIZE` nodes (at least two
clusters), each with :data:`GATEWAY_CANDIDATES` gateway candidates, one /16 pod CIDR per cluster
and a /24 per node, where internal nodes hold O(1) peers, each cluster in its own underlay
block, so a join inside it changes only its cluster's hot gateways' plans (the others route the
widest prefix around the cluster's vx-local addresses, which the join does not move);
``subnets`` = the same clusters declaring their underlay blocks as ``nodeCIDRs``;
``interleaved`` = the same clusters with their nodes' underlay addresses interleaved, so every
join changes the routes of every node outside its cluster (the worst case of gateway mode).
Default: ``gateway`` and ``subnets`` for every N, ``p2p`` and ``interleaved`` (whose state grows
with N^2) for N up to :data:`P2P_DEFAULT_MAX_N`. Figures of ``p2p`` keep their names
(``join_fanout_p50_n1000``); the others carry the shape (``join_fanout_p50_gateway_n1000``).

A **light agent** speaks the real SyncNode protocol with the generated stubs: Announce, a
Keepalive, then it validates every message it receives with the agents' own state machine,
``fabric.control.client.SyncStream`` (each entry decoded by ``fabric.control.codec``; chunks
only before END_OF_SNAPSHOT; deltas only after it, with increasing versions; here also: every
removal must name an entry it holds) and answers every END_OF_SNAPSHOT
and Delta with ``Applied(version)``, stamping ``time.monotonic()`` (one clock for every process
of the machine) as it sends it.

One **change** = the joiner announces a new node (it joins the first cluster; in the interleaved
shape the one agent N would join), then leaves again
(the reflector withdraws it at once: a second change). Each join is an agent start: a new
channel (connected before the stream opens, so fan-out does not include connecting), closed at
the leave. A change affects only some agents (in the gateway shape, not the internal nodes of
the joiner's cluster). The driver computes which, with the real planner (:func:`planned_change`:
``plan`` before and after the join, once per planner viewer class, with the gateway roles the
reflector reports in GetStatus), and tells each worker its affected agents after bring-up
(``expect``). A worker reports one ``applied`` line per change version when all its affected
agents applied it, and reports an error when an agent it was not told about receives a delta: so
the driver's computation and what the reflector sends are checked against each other in every
run. Fan-out time = the last affected agent's Applied stamp - the moment the joiner opened its
stream (join) or cancelled it (leave). Reflector CPU per change comes from /proc/PID/stat around
each change, memory per agent from VmRSS before the agents and after they all synced.

**Baseline**, same run and same client code: a bare grpc.aio server (``bare-server`` below) that
answers each stream's Announce with END_OF_SNAPSHOT and, on a trigger RPC, writes to each affected
agent the serialized Delta bytes the planner computes for it (the same agents, the same bytes; no
planning, no per-node diff or encoding in the server). Ratios: baseline / ours for times, CPU and
memory (higher is better, 1.0 = as cheap as pushing bytes).

Feasibility is measured, not assumed: the agents of one N must all be synced within ``--budget``
seconds; if not, that N is reported as not feasible for that shape with how far the bring-up got,
and larger N of the same shape are not attempted (bring-up cost only grows with N).

Modules: ``params`` (what every process agrees on), ``shapes`` (who the agents are and what
a change must reach), ``agents`` (the worker processes), ``bare`` (the baseline server),
``driver`` (the run) and ``__main__`` (the helper processes' entry point); ``tls_bench`` is
``bench control-tls`` (the same run with mutual TLS on vs off) and ``tlsmat`` its certificates.
"""

from __future__ import annotations

from tools.bench import common as bc
from tools.bench.control.driver import run
from tools.bench.control.params import NAME

HELP = ("time from a node join/leave to the last of N simulated agents reporting it applied, reflector CPU and "
        "memory per agent, vs a bare grpc.aio server pushing the same bytes")  # fmt: skip

__all__ = ["HELP", "NAME", "requires", "run"]


def requires(opts: bc.Options) -> list[str]:
    return bc.need_control_stubs()
