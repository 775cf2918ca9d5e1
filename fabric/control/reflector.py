"""fabric-reflector: the fabric's route reflector, a grpc.aio server of the ``Fabric`` service.

This module is its state machine (:class:`Reflector`: sessions, flushes, leadership, the
startup hold); :mod:`~fabric.control.reflector_service` is its gRPC face and listen addresses,
:mod:`~fabric.control.reflector_metrics` its metrics, :mod:`~fabric.control.reflector_cli` the
``fabric-reflector`` command, :mod:`~fabric.control.record_store` the add-on records it serves
(``PublishRecords``, ``WatchRecords``: their rules are written down there).
The class stays one piece of about 800 lines on purpose: sessions, flushes, the hold and
leadership all read and change the same per-node records on one event loop, in an order that
the contracts below depend on; split across modules they would share private state.

It holds the :class:`~fabric.types.Topology` (cluster configuration from the topology file,
nodes from the announcements of their agents) and, for every node, the state the planner says
the node must have. What happens, in order:

1. **Start.** Listen on every ``--listen`` address. If the configuration names nodes
   (``expected_nodes``) that have not all announced yet, enter the *startup hold*: sessions are
   accepted and the topology is built, but no snapshot and no END_OF_SNAPSHOT is sent until all
   expected nodes have announced or ``--startup-hold`` seconds have passed. Agents garbage-collect
   only after END_OF_SNAPSHOT, so a restarted reflector with a partial topology never makes them
   delete routes to nodes that simply have not reconnected yet. (A configuration without a node
   list holds for the full period: there is nobody to wait for, so time is the only signal.)
   The hold does not make the reflector unready (``/readyz``): agents can end it only by
   reaching it. With a leader Lease (``--status-lease``, Kubernetes source) replicas run
   active/standby: a standby keeps its configuration current, answers GetStatus and refuses
   ``SyncNode`` at once with UNAVAILABLE naming the leader (not a rejection: agents retry) and is
   unready; the leader serves. Losing the Lease closes every session with UNAVAILABLE (agents
   keep their dataplane and reconnect to the new leader); taking it over starts a startup hold
   for the nodes the Cluster statuses list (:meth:`Reflector.set_leader`). Without a Lease the
   reflector always serves.
2. **Announce.** An agent opens ``SyncNode`` and announces its node. The announcement is checked
   against the client certificate's identity (:func:`~fabric.control.authz.announcement_refusals`:
   a node certificate announces its own node only; the other RPCs are authorized by
   :meth:`Reflector.authorize`), then validated
   (:func:`~fabric.control.admission.announcement_refusals`). Refused: the reasons are recorded (see
   GetStatus), sent as ``Rejected`` (texts, and the class of each: ``Rejected.Reason``, also the
   label of ``fabric_reflector_rejections_total``) and the stream closed; nothing already
   working changes.
   Accepted: if the node is known with the very same announcement (a reconnect within the grace
   period, or a second session replacing the first) the topology does not change and nobody else
   hears of it; otherwise the change is queued for the next *flush* (see "Coalescing"), which
   bumps the topology generation and sends each node whose plan changed a ``Delta`` of exactly
   the difference from what it was last sent. Either way the announcing session then gets its
   complete snapshot and END_OF_SNAPSHOT (a new or changed node: at that flush).
3. **Session.** Keepalives flow both ways at the session's negotiated interval: the agent's
   proposal clamped to ``--keepalive-min-s``..``--keepalive-max-s``, then the smaller of it and
   ``--keepalive-interval`` (BGP's rule; our keepalives carry it and the agent follows it,
   :func:`~fabric.control.bounds.negotiate_keepalive`); a session silent for three intervals is
   closed. Agents report the
   version they applied; ``in_sync`` in GetStatus compares it with the node's planned version
   (the generation at which its plan last changed).
4. **Disconnect.** The node stays in the topology for ``--grace-period`` seconds (status shows
   ``withdraw_in_s``), then is withdrawn and the others get a removal delta. Reconnecting in time
   with the same announcement costs the others nothing (no flap).
5. **Gateways.** Every cluster has one active gateway and a hot standby, elected here
   (:func:`~fabric.control.election.elect`) and stored in the topology, so plans stay pure. The
   liveness view it elects from: which nodes have a session, and the ``PeerReport`` of every
   agent - the peers (active and standby gateways it depends on) whose probes through the tunnel
   stopped being answered. The role moves when its peers report the active gateway unreachable
   and a standby is reported by fewer, or when its session has been gone for
   ``session_loss_grace`` (10 s; at most the grace period). A session that ends alone moves
   nothing: the gateway's dataplane forwards without its agent (an agent restart, a crash the
   lab's supervisor or the DaemonSet restarts), and a dead machine is reported by its peers'
   probes within their detection time anyway (:mod:`~fabric.control.election`: what each piece
   of evidence proves). A report by one peer alone of a node that keeps its session counts only
   once it has stood 0.5 s (:func:`~fabric.control.election.confirmed_scores`: a starved or
   flaky prober says as much about itself); two peers, or a peer and a lost session, count at
   once. A healed old gateway becomes the standby (sticky, no flap back). A move
   is an ordinary topology change: only the routes that change go out, as deltas. Elections
   wait for the startup hold to end, so a restarted reflector elects from a complete view.

Coalescing. Announcements, withdrawals, role moves and configuration changes only mark the
topology dirty; a *flush* then elects, plans and fans out everything pending as one generation
with one delta per node. The first change after a quiet period is flushed at once (the next
event-loop turn: no added latency); a change within the current window of the end of the last
flush (or within the duration of that flush, when it was longer: at most half the loop goes to
planning under load) waits for the next flush. The window starts at ``coalesce_window`` and
doubles with every change that has to wait, up to ``max_coalesce_window``; a change after a
quiet period as long as the window resets it. Why adaptive: every flush sends one delta to every
synced node it changes, and each costs a gRPC write and an ``Applied`` read, which dominate the
reflector's CPU (not planning). A bring-up of N agents with a fixed 20 ms window flushed hundreds
of times, each to all nodes already synced: O(N x flushes) messages (1,000 agents took 95 s,
measured by ``fabric-tool bench control``); with the doubling window a storm costs a few dozen
flushes, while a lone change (a gateway failover) still goes out at once. The startup hold ends
with a flush (bounded like any other: its new nodes may take several, see below).

Bounded flushes. A flush plans the new nodes it adopts in full and builds their snapshots; at a
bring-up that work grows with the nodes admitted since the last flush times the size of the
fabric (a flush of 2,000 new nodes at N = 3,000 took 20-30 s, and the loop accepted no stream
meanwhile: gRPC cancelled thousands before admission, issue 21). So a flush adopts only the new
nodes (in admission order) whose planning is expected to fit in ``flush_slice``, by the measured
cost of one (:meth:`Reflector._bounded`; or within the measured cost of the rest of a flush,
when that is longer: it grows with the fabric, and ~100 small flushes spent most of a bring-up
of 10,000 nodes on it); the others stay admitted and pending (validated, in
``_pending``, their sessions waiting for a snapshot) and the next flush, scheduled as any
pending change, adopts the next of them. Admission itself never waits: it is validation against
the pending topology, independent of planning. Only brand-new nodes are deferred (withdrawals,
changed announcements, role moves and configuration changes are adopted at once), and never in
a way that changes the election: a cluster whose roles would differ without its deferred nodes
adopts its deferred gateway candidates now. Each flush's topology is therefore the previous one
plus a subset of the joins, with the roles the unbounded flush would have elected, and once
nothing is deferred the plans are exactly those of the unbounded flushes (a unit test compares
the two over random join sequences).

Pacing. In a storm of joins (a brand-new node admitted within the pace of the previous one, or
the next slice of a bring-up's deferred nodes), a flush with only new nodes pending also waits,
after the end of the last flush, ``FANOUT_PACE`` times as long as that flush's fan-out took
(from queueing its deltas to the last affected agent's Applied; at most ``MAX_FANOUT_PACE_S``),
and a bounded flush gives its joins at least as much planning time as that fan-out. Why: a
fan-out costs the loop a write and an ``Applied`` read per synced agent (0.8 s of CPU at 3,000
agents), and gRPC hands the server a new stream only as the same loop turns (a few turns per
stream, measured by ``tools.bench.control.accept``). Without pacing, the joins that came late in
a bring-up were each flushed alone, each a fan-out to every synced agent, which kept the loop
too busy to take up the next stream: a bring-up of 3,000 agents in the gateway shape once
crawled at 1.5 joins a second for five minutes, and one of 10,000 had 6,095 agents in sync after
400 s. Paced, the loop is free half the time to take up the streams that wait, and the next
flush adopts them together. A lone join (none other within the pace) goes out at once, as
before, so its latency does not pay for the last fan-out; withdrawals, changed announcements,
reconnects, role moves and configuration changes are never paced, and one of them moves a paced
flush forward.

Planning is incremental (:class:`~fabric.control.incremental.IncrementalPlanner`): a flush costs
O(nodes) cheap compares to find the sources that changed, then per node only the plan parts of
those sources (computed once per viewer class), so a join costs O(1) planner work per node, not
O(nodes). ``planner.plan`` stays the reference; the unit tests check the two agree.

Bugs. An unexpected exception in an RPC handler (or in a session's reader or keepalive task, or
in the relay hub's reader of a relay stream) is a bug of the reflector, not a transport problem:
it is logged with its traceback, the RPC ends with INTERNAL, and the reflector stops and exits
non-zero (:meth:`Reflector.crash`), so its supervisor (the Deployment) restarts it into a clean
state - agents keep their dataplane and resync with the new process, as after any restart
(DESIGN.md: a bug crashes the process). It is never reported as UNAVAILABLE, which tells clients
"retry" and would hide it. Expected conditions are not bugs: the agent going away or the RPC
being cancelled or timing out (gRPC cancels the handler: CancelledError), gRPC's own errors
about the RPC's state (the stream ended under us: UNAVAILABLE), and a malformed message from the
agent (INVALID_ARGUMENT).

Everything mutating the reflector's state runs on the event loop without awaiting in between, so
no locks are needed. Every message is built once (per node, or once for all nodes of one class
that get the same delta) and queued to its session; one task per session writes the queue to the
stream. Snapshots and deltas are queued as their bytes (``_Encoded``), joined from each entry's
encoding, made once for every node that holds the entry (:class:`~fabric.control.codec.EntryWire`),
and SyncNode's serializer writes bytes as they are
(:func:`~fabric.control.reflector_service.wire`): a delta shared by many sessions costs one
encoding, not one per agent; so do keepalives (one encoding per interval).
Queues are bounded in bytes (:mod:`~fabric.control.bounds`, ``--send-queue-bytes``): a
session or topology watcher that falls further behind is cut off with RESOURCE_EXHAUSTED (its
queue dropped, the node treated as disconnected at once) and reconnects to a fresh snapshot;
so are streams and announcements per client identity and message sizes.

Garbage collection
------------------

Python's cyclic collector walks every object it tracks in a full collection: at 1,000 agents
about 210,000 (mostly the grpc.aio machinery of the open streams), 130-140 ms of CPU. On the
interpreter's own schedule one started in about every tenth change, inside its flush (the
allocation that starts a collection is the flush's), so that change's fan-out took the pause:
the join fan-out p99 of ``bench control`` at N = 1,000 was that pause (details and figures in
:mod:`~fabric.control.quiet_gc`). ``fabric-reflector`` therefore runs full collections itself
(``--gc quiet``, the default): when one is due (memory grew by a quarter since the last) and the
reflector is quiet (:meth:`Reflector._quiet`: no flush pending, no fan-out waiting for an
``Applied``, no snapshot waiting), asked every ``GC_POLL_S`` and as soon as the last fan-out in
flight is done; or, due for 10 s without a quiet moment, at once; and never sooner after the
last one than 19 times its duration (a bring-up grows memory by streams, not garbage). Young
collections are unchanged. A Reflector built without a ``gc_policy`` (tests, in-process use)
leaves the interpreter's schedule alone.

Reachability records
--------------------

The reflector publishes one add-on record per ordered cluster pair (kind
``fabric.kosmos.io/reachability``, publisher ``fabric/reflector``: :mod:`fabric.control.reachability`
is the contract, :mod:`fabric.control.reachability_rules` the rules) into its own record store
(``RecordStore.put_own``), so add-ons read them with WatchRecords like any record: the fabric's
answer rides the one control channel. Whatever changes an input (a counted peer report, a session
that starts or ends, a flush: topology, roles, configuration) asks for a recompute on the next
event-loop turn (:meth:`Reflector._reachability_changed`), or, within 50 ms of the last recompute,
50 ms after it (``REACHABILITY_MIN_INTERVAL_S``): a cut reported by an agent after a quiet
period reaches subscribers without a timer in between, and a storm of changes costs at most 20
derivations a second. A report that changes only measured RTT/loss waits up to a second
(``QUALITY_MIN_INTERVAL_S``) unless something else asks sooner. Only the records whose bytes
changed are put (one revision for all of them). Nothing is published
during the startup hold (an incomplete topology would call whole clusters unreachable) nor by a
standby; a new leader publishes at once from its own view. Nothing is even recomputed then, nor
during the record store's startup hold (subscribers get no snapshot before it ends, and a
bring-up starts thousands of sessions in it): the hold's end asks for one recompute (the node
hold's through its flush; the record store's just before it syncs the waiting subscribers, so
their snapshots carry the records).

Peer reports after a partition
------------------------------

An agent cut off from the underlay cannot reach its probe targets, and its prober says so; the
reports it makes (or queues on a session that outlives the cut) reach the reflector only when
the link is back, in a burst, while its probes are still recovering one target after the other.
Counted as they come, they made a healed node move the gateway of a cluster that never failed,
or pull the role back to itself (a flap). So an agent heard from again after a silence longer
than 1.5 of its keepalive intervals, or one that reconnects, has its reports held for
``report_settle`` seconds (2 s): the latest one then counts. Reports of agents that were never
cut off count at once, so a real failure still moves the role within the probes' detection time.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import message as pb_message
from prometheus_client import Histogram
from prometheus_client.registry import Collector

from fabric import types
from fabric.control import (
    admission,
    api,
    authz,
    bootstrap,
    bounds,
    codec,
    election,
    incremental,
    planner,
    quiet_gc,
    reachability,
    reachability_rules,
    record_store,
)
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.identity import Identity
from fabric.control.reflector_metrics import MetricsCollector
from fabric.control.reflector_service import (
    DecodeInterceptor,
    Servicer,
    add_to_server,
    bind,
    peer_name,
    publisher_identity,
    server_options,
)

_log = logging.getLogger(__name__)

DEFAULT_LISTEN = f"0.0.0.0:{api.DEFAULT_REFLECTOR_PORT}"
DEFAULT_GRACE_PERIOD_S = 30.0
DEFAULT_KEEPALIVE_INTERVAL_S = 2.0
#: A session that sent nothing for this many keepalive intervals is dead.
DEAD_AFTER_INTERVALS = 3
#: Rejections kept for GetStatus (one per node identity; oldest dropped first).
MAX_REJECTIONS = 1000
#: Changes within this many seconds of the end of the last flush are coalesced into the next one
#: (the starting window: it doubles while changes keep arriving, see "Coalescing").
DEFAULT_COALESCE_WINDOW_S = 0.02
#: The longest the window grows to: the added latency of a change during a storm of changes.
DEFAULT_MAX_COALESCE_WINDOW_S = 1.0
#: The planning work for new nodes one flush may take, in seconds (see "Bounded flushes"): the
#: nodes adopted are those whose full plans and snapshots are expected to fit in it, the rest
#: are adopted by the next flush. Far below gRPC's 30 s before it cancels a stream the loop has
#: not accepted (and the flush's own work per synced node comes on top); long enough that a
#: flush adopts hundreds of nodes at 10,000 (~1.5 ms each there), so a bring-up is not cut into
#: so many flushes that their deltas to every synced agent cost more than the planning.
DEFAULT_FLUSH_SLICE_S = 0.5
#: New nodes a flush adopts before the cost of one is known (the first flush after a start or a
#: startup hold): enough to measure it, few enough to keep that flush short at any scale.
FIRST_FLUSH_JOINS = 64
#: A flush of new nodes waits this many times the last generation's fan-out (see "Pacing"): 2
#: leaves the loop as long again for taking up streams as the fan-out took.
FANOUT_PACE = 2.0
#: The longest a flush of new nodes waits for the last generation's fan-out (see "Pacing"):
#: bounds what a slow or stuck agent's late Applied can add to a join's latency.
MAX_FANOUT_PACE_S = 5.0
#: Topology changes whose fan-out is timed at once (older ones are dropped unobserved).
MAX_FANOUT_TRACKED = 256
#: How long the peer reports of an agent that was cut off are held back once it is heard from
#: again (see "Peer reports after a partition"): longer than its probes' detection time (0.3 s)
#: plus a tunnel path coming back, short against the minute a partition of one node can last.
DEFAULT_REPORT_SETTLE_S = 2.0
#: A node whose session ended keeps its gateway roles this long unless its peers report it
#: unreachable through the tunnel (see "Gateways"): longer than an agent restart (the lab's
#: supervisor restarts a crashed agent within a second or two, plus its start-up), short
#: enough that a gateway whose agent stays away hands its role to one that can be told of
#: topology changes.
DEFAULT_SESSION_LOSS_GRACE_S = 10.0
#: An agent silent for this many of its own keepalive intervals was cut off.
SILENT_AFTER_INTERVALS = 1.5
#: Reachability records are recomputed at most this often (see "Reachability records"): a lone
#: change goes out on the next loop turn, a storm (a bring-up of thousands of agents) costs at
#: most 20 derivations a second, not one per session.
REACHABILITY_MIN_INTERVAL_S = 0.05
#: ... and for a change of measured RTT/loss alone (agents already rate-limit those), this often.
QUALITY_MIN_INTERVAL_S = 1.0
#: Pairs whose reachability changed in one derivation that are each logged at INFO/WARNING;
#: more are summed up in one line (and each logged at DEBUG): a bring-up of 100 clusters turns
#: 9,900 pairs reachable at once.
MAX_PAIR_CHANGES_LOGGED = 10
#: Admitted sessions logged one line each at INFO between two flushes; past it, each is
#: logged at DEBUG and the next flush counts them in one line. A bring-up of 10,000 agents
#: wrote 10,000 INFO lines, about 5 % of the reflector's CPU (issue 21).
MAX_ADMISSIONS_LOGGED = 20
#: How often the reflector asks its collector (see "Garbage collection") whether a full
#: collection is due; it also asks as soon as the last fan-out in flight is done.
GC_POLL_S = 0.5

_DEFAULT_LIMITS = bounds.Limits()


@dataclasses.dataclass(frozen=True, slots=True)
class _Encoded:
    """A SyncNode message as its bytes, encoded once (a delta shared by a viewer class, a
    keepalive) or joined from cached entry encodings (snapshots and deltas:
    :class:`~fabric.control.codec.EntryWire`): the gRPC face writes ``data`` as it is
    (:func:`~fabric.control.reflector_service.wire`); in-process readers (tests) decode it."""

    data: bytes

    @classmethod
    def of(cls, message: pb.SyncNodeResponse) -> _Encoded:
        return cls(message.SerializeToString())

    @property
    def message(self) -> pb.SyncNodeResponse:
        """The message decoded (a new one per call: for in-process readers, not the hot path)."""
        return pb.SyncNodeResponse.FromString(self.data)


@dataclasses.dataclass(frozen=True, slots=True)
class _Close:
    """Queued to a session or watcher to end its stream (after everything queued before it)."""

    reason: str
    code: grpc.StatusCode | None = None


class _Session:
    """One agent's SyncNode stream, from the accepted announcement to its end. Its queue is
    bounded (:class:`~fabric.control.bounds.SendQueue`): a send past the bound cuts it off."""

    _ids = itertools.count(1)

    def __init__(
        self, key: types.NodeKey, peer: str, now: float, limit: int = _DEFAULT_LIMITS.send_queue_bytes,
        on_cut: Callable[[_Session, str], None] | None = None,
    ) -> None:  # fmt: skip
        self.id = next(self._ids)
        self.key = key
        self.peer = peer
        self.queue: bounds.SendQueue[pb.SyncNodeResponse | _Encoded | _Close] = bounds.SendQueue(limit)
        self._on_cut = on_cut
        #: The negotiated keepalive interval (0 until the reflector sets it) and a wake-up of
        #: the keepalive task when it changes (see ``Reflector._keepalive``).
        self.interval = 0.0
        self.renegotiated = asyncio.Event()
        #: The keepalive queued and not written yet: one at a time is enough to prove we live,
        #: so a client that reads nothing does not collect one per interval.
        self.keepalive_queued: _Encoded | None = None
        #: Snapshot and END_OF_SNAPSHOT have been queued; from now on only deltas.
        self.synced = False
        self.counters = api.SessionCounters()
        self.last_rx = now
        self.peer_interval = 0.0
        self.closed = False
        #: Peer reports count from this time on; one that comes earlier is held (``held``) and
        #: counted then, unless a newer one replaced it.
        self.reports_from = now
        self.held: frozenset[types.NodeKey] | None = None
        self.held_quality: dict[types.NodeKey, codec.PeerQuality] = {}
        self.held_handle: asyncio.TimerHandle | None = None
        #: The client certificate's identity (None: a plaintext session); see authz.
        self.identity: Identity | None = None
        #: A session a relay carries (:meth:`Reflector.open_relayed`): its keepalive timer, in
        #: place of the keepalive task of a direct session. None for a direct session.
        self.relay_timer: asyncio.TimerHandle | None = None

    def send(self, msg: pb.SyncNodeResponse | _Encoded, size: int | None = None, *, bounded: bool = True) -> None:
        """Queue ``msg`` (``size``: its bytes, when the caller knows them); past the queue's
        bound the session is cut off (its queue dropped, RESOURCE_EXHAUSTED)."""
        if self.closed:
            return
        n = size if size is not None else len(msg.data) if isinstance(msg, _Encoded) else msg.ByteSize()
        if not self.queue.put(msg, n, bounded=bounded):
            reason = self.queue.over_limit_text(n, f"agent session of node {self.key}")
            self.queue.cut()
            self.close(reason, grpc.StatusCode.RESOURCE_EXHAUSTED)
            if self._on_cut is not None:
                self._on_cut(self, reason)

    def close(self, reason: str, code: grpc.StatusCode | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put(_Close(reason, code), 0, bounded=False)


@dataclasses.dataclass(slots=True)
class _NodeRecord:
    """A node in the topology: its announcement, versions and current session (its plan is held
    by the reflector's IncrementalPlanner)."""

    ann: types.NodeAnnouncement
    planned_version: int = 0
    applied_version: int = 0
    session: _Session | None = None
    #: Counters of the current session, or of the last one while disconnected.
    counters: api.SessionCounters = dataclasses.field(default_factory=api.SessionCounters)
    withdraw_at: float | None = None
    withdraw_handle: asyncio.TimerHandle | None = None
    #: When its last session ended (reflector clock); None while it has one. Within the
    #: session-loss grace of this it is *lingering* for the election.
    lost_at: float | None = None
    lost_handle: asyncio.TimerHandle | None = None
    #: The identity of its latest session (the label of a refusal when a new configuration drops it).
    identity: Identity | None = None


class _Watcher:
    """One WatchTopology stream; its queue bounded as a session's."""

    def __init__(self, peer: str, limit: int, on_cut: Callable[[_Watcher, str], None]) -> None:
        self.peer = peer
        self.queue: bounds.SendQueue[pb.WatchTopologyResponse | _Close] = bounds.SendQueue(limit)
        self.synced = False
        self.closed = False
        self._on_cut = on_cut

    def send(self, msg: pb.WatchTopologyResponse, size: int, *, bounded: bool = True) -> None:
        if self.closed:
            return
        if not self.queue.put(msg, size, bounded=bounded):
            reason = self.queue.over_limit_text(size, f"topology watch of {self.peer}")
            self.queue.cut()
            self.close(reason, grpc.StatusCode.RESOURCE_EXHAUSTED)
            self._on_cut(self, reason)

    def close(self, reason: str, code: grpc.StatusCode | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put(_Close(reason, code), 0, bounded=False)



class Reflector:
    """The reflector's state machine and gRPC server. See the module docstring for the flow.

    ``clock`` is injectable so status arithmetic is testable; timers use the event loop.
    """

    def __init__(
        self,
        config: types.FabricConfig,
        *,
        grace_period: float = DEFAULT_GRACE_PERIOD_S,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL_S,
        startup_hold: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        coalesce_window: float = DEFAULT_COALESCE_WINDOW_S,
        max_coalesce_window: float = DEFAULT_MAX_COALESCE_WINDOW_S,
        report_settle: float = DEFAULT_REPORT_SETTLE_S,
        session_loss_grace: float = DEFAULT_SESSION_LOSS_GRACE_S,
        records_grace_period: float = record_store.DEFAULT_RECORDS_GRACE_PERIOD_S,
        records_startup_hold: float = record_store.DEFAULT_RECORDS_STARTUP_HOLD_S,
        record_limits: record_store.RecordLimits | None = None,
        record_policy: record_store.PublishPolicy = record_store.allow_all,
        limits: bounds.Limits | None = None,
        reachability_records: bool = True,
        flush_slice: float | None = DEFAULT_FLUSH_SLICE_S,
        gc_policy: quiet_gc.QuietCollector | None = None,
    ) -> None:
        if keepalive_interval <= 0:
            raise ValueError(f"keepalive interval must be positive, got {keepalive_interval}")
        self.config = config
        self.grace_period = max(0.0, grace_period)
        self.keepalive_interval = keepalive_interval
        #: Bounds on what clients can make the reflector hold or do (fabric/control/bounds.py).
        self.limits = limits or _DEFAULT_LIMITS
        self.gate = bounds.StreamGate(self.limits, clock)
        self.startup_hold = self.grace_period if startup_hold is None else max(0.0, startup_hold)
        self.clock = clock
        self.epoch = uuid.uuid4().hex[:12]
        #: Add-on records (PublishRecords, WatchRecords): their own state, see record_store.
        self.records_startup_hold = max(0.0, records_startup_hold)
        self.records = record_store.RecordStore(
            epoch=self.epoch, limits=record_limits, grace_period=records_grace_period, policy=record_policy,
            clock=clock, on_cut=self.gate.note_cut,
        )  # fmt: skip
        self.records.before_release = self._records_hold_ends
        #: The topology of the last flush (generation ``generation``, roles elected).
        self.topology = types.Topology(config)
        #: The topology with every change admitted since (:attr:`_pending`), but for the new or
        #: changed announcements in ``_admitted``, merged in when it is read: a copy of the node
        #: tuple per admission cost O(nodes) each at a bring-up (issue 21). Announcements are
        #: validated against ``_index`` (the pending nodes indexed: a check costs O(log nodes),
        #: not O(nodes)), which is always current.
        self._pending_base = self.topology
        self._admitted: dict[types.NodeKey, types.NodeAnnouncement] = {}
        self._index = admission.NodeIndex(config)
        self.coalesce_window = max(0.0, coalesce_window)
        self.report_settle = max(0.0, report_settle)
        #: See "Gateways": never longer than the grace period (the node is withdrawn then).
        self.session_loss_grace = min(self.grace_period, max(0.0, session_loss_grace))
        self.max_coalesce_window = max(self.coalesce_window, max_coalesce_window)
        #: The current coalescing window (between the two above).
        self._window = self.coalesce_window
        self._planner = incremental.IncrementalPlanner()
        #: Planning work per flush for new nodes, seconds (None: unbounded; see "Bounded flushes").
        self.flush_slice = None if flush_slice is None else max(0.0, flush_slice)
        #: Nodes admitted that are not in ``topology`` yet, in admission order: the candidates of
        #: the next flush for adoption (see "Bounded flushes").
        self._joining: dict[types.NodeKey, None] = {}
        #: Measured planning cost of one adopted new node (full plan and snapshot), seconds;
        #: 0 until a flush adopted one.
        self._join_cost = 0.0
        #: Measured cost of a flush besides its new nodes' plans and snapshots (election, changed
        #: parts per viewer class, deltas), seconds, smoothed: it grows with the fabric, not with
        #: the joins a flush adopts, so :meth:`_bounded` gives the joins at least as much time
        #: (else at N = 10,000 most of a bring-up was this fixed part of ~100 small flushes).
        self._flush_fixed = 0.0
        #: New nodes left for the next flush by the last one (see "Bounded flushes").
        self.deferred = 0
        self._flush_handle: asyncio.Handle | None = None
        self._last_flush_end = float("-inf")
        self._last_flush_cost = 0.0
        #: How long the last generation whose every delta was applied took from its flush to its
        #: last Applied (time.monotonic), and whether the scheduled flush is paced by it (see
        #: "Pacing").
        self._last_fanout_s = 0.0
        self._flush_paced = False
        #: When the last brand-new node was admitted (time.monotonic; see "Pacing").
        self._last_join_at = float("-inf")
        #: Nodes announced, changed or withdrawn since the last flush (for watchers), and nodes
        #: whose session waits for its snapshot from the next flush.
        self._changed: set[types.NodeKey] = set()
        self._awaiting: set[types.NodeKey] = set()
        self._dirty = False
        self.flushes = 0
        self.generation = 0
        self.holding = False
        self._nodes: dict[types.NodeKey, _NodeRecord] = {}
        #: The nodes with a session, kept as sessions come and go (a set, not a pass over
        #: ``_nodes``: a bring-up asks after every session it admits), and the frozen copy
        #: :meth:`_connected` hands out until the set changes.
        self._connected_set: set[types.NodeKey] = set()
        self._connected_keys: frozenset[types.NodeKey] | None = frozenset()
        self._rejections: dict[str, api.Rejection] = {}
        self._rejections_total = 0
        #: Sessions admitted since the last flush (the first MAX_ADMISSIONS_LOGGED are logged at INFO).
        self._admissions_logged = 0
        #: Refusals by their class (``Refusal.reason``) and identity label, for the metrics.
        self._rejections_by: dict[tuple[api.RejectionReason, str], int] = {}
        #: Refusals of a proven identity are logged once per identity and reason (authz).
        self._rejections_logged = bounds.OnceLog()
        #: The identity label each refusal is counted under (bounded cardinality).
        self._rejection_labels = authz.IdentityLabels()
        #: Fan-out in flight: generation -> (time of the change, synced nodes that were sent a
        #: delta for it and have not reported it applied yet). See ``fanout_lag``.
        self._fanout: dict[int, tuple[float, set[types.NodeKey]]] = {}
        #: The generations of ``_fanout``, ascending, and when each was queued (time.monotonic).
        self._fanout_order: list[int] = []
        self._fanout_sent: dict[int, float] = {}
        self.fanout_lag = Histogram(
            "fabric_reflector_fanout_lag_seconds",
            "From a topology change to the report of the last agent it changed (each agent applied it)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=None,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: set[_Watcher] = set()
        self._hold_handle: asyncio.TimerHandle | None = None
        self._server: grpc.aio.Server | None = None
        self._expected = {types.NodeKey.parse(k) for k in config.expected_nodes}
        #: Latest PeerReport of every node with an open session: the peers it cannot reach.
        self._reports: dict[types.NodeKey, frozenset[types.NodeKey]] = {}
        #: ... and since when (reflector clock) each reporter has reported each of those: a
        #: lone report counts only once it has stood a while (election.confirmed_scores).
        self._report_since: dict[types.NodeKey, dict[types.NodeKey, float]] = {}
        self.lone_report_confirm = election.LONE_REPORT_CONFIRM_S
        self._confirm_handle: asyncio.TimerHandle | None = None
        self._confirm_at = float("inf")
        #: ... and its measurements of the peers it probes (RTT ms, loss), when it sent any.
        self._quality: dict[types.NodeKey, dict[types.NodeKey, codec.PeerQuality]] = {}
        self._gateway_moves: dict[str, int] = {}
        #: None while this replica serves agents (the leader, or the only replica); else why it
        #: does not (standby of a leader Lease: see :meth:`set_leader`).
        self.standby_reason: str | None = None
        #: The first bug (see "Bugs" in the module docstring); set, the process is to exit.
        self.crashed: BaseException | None = None
        #: Signs node certificates (IssueCertificate, fabric.control.bootstrap); None: issues none.
        self.signer: bootstrap.Signer | None = None
        self._crash = asyncio.Event()
        #: Publish the reachability records (see "Reachability records"); off only in tests of the
        #: record store that count its revisions exactly.
        self.reachability_records = reachability_records
        #: A recompute of the reachability records is scheduled (see "Reachability records").
        self._reach_handle: asyncio.Handle | None = None
        #: Loop time the scheduled recompute runs at, and of the last one.
        self._reach_at = 0.0
        self._reach_last = float("-inf")
        #: How long the last derivation took: the least spacing to the next one.
        self._reach_cost = 0.0
        #: The last derived pair states, by (source, target): status and metrics read them.
        self.reachability: dict[tuple[str, str], reachability.PairState] = {}
        self.reachability_updates = 0
        #: What the last derivation read (reachability_rules.inputs); None: derive next time.
        self._reach_inputs: tuple[object, ...] | None = None
        #: Keepalive messages by interval, encoded once (see _send_keepalive).
        self._keepalives: dict[float, _Encoded] = {}
        #: Each planned entry's encoding, made once for every node whose snapshot or delta
        #: carries it (codec.EntryWire; issue 21).
        self._wire = codec.EntryWire()
        #: Per viewer class, its union's SnapshotChunk messages, encoded once for every snapshot
        #: of a node whose plan is that union plus its own entries (see _send_snapshot), with
        #: the union version they were made at (IncrementalPlanner.snapshot_source).
        self._class_chunks: dict[object, tuple[int, list[bytes]]] = {}
        #: Runs the cyclic collector's full collections when the reflector is quiet (see
        #: "Garbage collection"); None: the interpreter's own schedule (tests, in-process use).
        self.gc_policy = gc_policy
        self._gc_handle: asyncio.TimerHandle | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, listen: Sequence[str], credentials: grpc.ServerCredentials | None = None) -> list[str]:
        """Bind every address, start serving, begin the startup hold; returns the bound targets
        (``host:port`` with the real port for ``:0``, or ``unix:/path``). ``credentials``: mutual
        TLS on every address (:func:`fabric.control.tls.server_credentials`); None: plaintext."""
        server = grpc.aio.server(
            options=server_options(self.limits), interceptors=[DecodeInterceptor()]
        )
        add_to_server(Servicer(self), server)
        bound: list[str] = []
        for addr in listen:
            bound.append(bind(server, addr, credentials))
        await server.start()
        self._server = server
        self._loop = asyncio.get_running_loop()
        loop = asyncio.get_running_loop()
        if self.standby_reason is None:
            self.records.hold(self.records_startup_hold)
        if self.startup_hold > 0 and not self._all_expected_present():
            self.holding = True
            self._hold_handle = loop.call_later(
                self.startup_hold, self._release_hold, f"startup hold of {self.startup_hold:g}s elapsed"
            )
            _log.info(
                "holding END_OF_SNAPSHOT for up to %gs until %s announce",
                self.startup_hold,
                f"{len(self._expected)} expected nodes" if self._expected else "(no node list: the full period)",
            )
        self._reachability_changed()
        if self.gc_policy is not None:
            self._gc_handle = loop.call_later(GC_POLL_S, self._gc_tick)
        _log.info("reflector %s serving on %s", self.epoch, ", ".join(bound))
        return bound

    async def stop(self, grace: float = 0.5) -> None:
        if self._confirm_handle is not None:
            self._confirm_handle.cancel()
            self._confirm_handle, self._confirm_at = None, float("inf")
        for rec in self._nodes.values():
            if rec.withdraw_handle is not None:
                rec.withdraw_handle.cancel()
            if rec.lost_handle is not None:
                rec.lost_handle.cancel()
            if rec.session is not None:
                rec.session.close("reflector shutting down", grpc.StatusCode.UNAVAILABLE)
        for w in self._watchers:
            w.close("reflector shutting down", grpc.StatusCode.UNAVAILABLE)
        self.records.close_all("reflector shutting down", grpc.StatusCode.UNAVAILABLE)
        if self._hold_handle is not None:
            self._hold_handle.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._reach_handle is not None:
            self._reach_handle.cancel()
            self._reach_handle = None
        if self._gc_handle is not None:
            self._gc_handle.cancel()
            self._gc_handle = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    def crash(self, exc: BaseException, where: str) -> None:
        """Record a bug (an unexpected exception ``where``) and make :func:`main` stop the
        reflector and exit non-zero. Why not carry on: the exception left the state machine
        half-updated at an unknown point, and a restart resyncs every agent from a clean state
        at the cost of one reconnect, which the protocol is built for."""
        _log.critical("bug in %s: the reflector stops for a clean restart", where, exc_info=exc)
        if self.crashed is None:
            self.crashed = exc
        self._crash.set()

    async def wait_crashed(self) -> BaseException:
        """Return the first bug once one happened (see :meth:`crash`)."""
        await self._crash.wait()
        assert self.crashed is not None
        return self.crashed

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- announcements ----------------------------------------------------------------------

    @property
    def _pending(self) -> types.Topology:
        """The topology with every change admitted since the last flush (see ``_pending_base``)."""
        if self._admitted:
            self._pending_base = _with_nodes(self._pending_base, self._admitted.values())
            self._admitted.clear()
        return self._pending_base

    @_pending.setter
    def _pending(self, topology: types.Topology) -> None:
        self._admitted.clear()
        self._pending_base = topology

    def _admit(self, ann: types.NodeAnnouncement, session: _Session) -> pb.SyncNodeResponse | None:
        """Validate ``ann`` and attach ``session`` to its node; returns the ``Rejected`` to send
        when it is refused."""
        key = ann.key
        # Authorization first: an unauthorized client learns nothing about the other nodes.
        reasons = authz.announcement_refusals(session.identity, ann) or admission.announcement_refusals(
            self._pending_base, ann, self._index  # its configuration is the pending one; the nodes are the index's
        )
        if reasons:
            label = authz.metric_label(session.identity)
            return self._reject(f"announcement {key} from {session.peer} ({label})", str(key), reasons, label)
        self._rejections.pop(str(key), None)
        session.interval = self.keepalive_interval  # until the agent proposes its own
        self._send_keepalive(session)
        rec = self._nodes.get(key)
        paced = rec is None and self._join_storm()  # only a brand-new node in a storm: see "Pacing"
        self._admissions_logged += 1
        level = logging.INFO if self._admissions_logged <= MAX_ADMISSIONS_LOGGED else logging.DEBUG
        if rec is not None and rec.ann == ann:
            if rec.session is not None:
                _log.log(level, "node %s: new session from %s replaces session %d", key, session.peer, rec.session.id)
            else:
                _log.log(level, "node %s reconnected from %s within the grace period: nothing changes", key,
                         session.peer)  # fmt: skip
            self._settle_reports(session, "it reconnected")
            self._attach(rec, session)
            self._reelect(f"node {key} connected")
        else:
            changed = rec is not None
            if rec is None:
                rec = _NodeRecord(ann)
                self._nodes[key] = rec
            rec.ann = ann
            self._attach(rec, session)
            self._admitted[key] = ann
            self._index.add(ann)
            if _node_in(self.topology, key) is None:
                self._joining[key] = None
            else:
                paced = False  # a changed announcement of an adopted node
            self._changed.add(key)
            self._dirty = True
            if _log.isEnabledFor(level):
                _log.log(level, "node %s %s from %s: underlay %s, pod CIDRs %s", key,
                         "changed its announcement" if changed else "joined", session.peer, ann.underlay_ip,
                         ",".join(ann.pod_cidrs) or "none")  # fmt: skip
        if not self.holding and self._planner.planned(key, ann):
            self._send_snapshot(rec, session)
        else:
            self._awaiting.add(key)
        if self.holding:
            self._maybe_release_hold()
        else:
            self._schedule_flush(paced=paced)
        return None

    def _attach(self, rec: _NodeRecord, session: _Session) -> None:
        if rec.withdraw_handle is not None:
            rec.withdraw_handle.cancel()
        rec.withdraw_handle = None
        rec.withdraw_at = None
        if rec.lost_handle is not None:
            rec.lost_handle.cancel()
        rec.lost_handle = None
        rec.lost_at = None
        if rec.session is not None:
            rec.session.close(f"replaced by a newer session from {session.peer}", grpc.StatusCode.ABORTED)
        rec.session = session
        self._connected_set.add(session.key)
        self._connected_keys = None
        rec.identity = session.identity
        if reachability_rules.speaks_for_pairs(self.topology, session.key):
            self._reachability_changed()
        # Versions are per session: the new session has applied nothing yet.
        rec.applied_version = 0
        rec.counters = session.counters

    def _reject(
        self, source: str, ident: str, refusals: Sequence[admission.Refusal], label: str = authz.INSECURE_LABEL
    ) -> pb.SyncNodeResponse:
        """Record a refusal (GetStatus, metrics by class and identity ``label``, log) and return
        the ``Rejected`` to send. Logged every time on a plaintext session (as before issue 20),
        once per identity and class for a certificate's (then only counted)."""
        reason = "; ".join(r.text for r in refusals)
        codes = tuple(r.reason for r in refusals)
        self._rejections.pop(ident, None)
        self._rejections[ident] = api.Rejection(source=source, reason=reason, reasons=codes)
        self._rejections_total += 1
        first = False
        for code in codes:
            counted = self._rejection_labels(label)
            self._rejections_by[(code, counted)] = self._rejections_by.get((code, counted), 0) + 1
            first = self._rejections_logged.first(label, code) or first
        while len(self._rejections) > MAX_REJECTIONS:
            del self._rejections[next(iter(self._rejections))]
        if label == authz.INSECURE_LABEL or first:
            _log.info("rejected %s: %s", source, reason)
        else:
            _log.debug("rejected %s: %s (logged before for %s)", source, reason, label)
        return codec.rejected_message(reason, codes)

    def _unauthorized(self, source: str, ident: str, text: str, label: str) -> pb.SyncNodeResponse:
        """:meth:`_reject` of one refusal of class UNAUTHORIZED."""
        return self._reject(source, ident, [admission.Refusal(api.RejectionReason.UNAUTHORIZED, text)], label)

    def authorize(self, rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """May the peer of ``context`` call ``rpc`` at all (authz.rpc_refusal)? If not, the RPC's
        status is set (UNAUTHENTICATED: its certificate names no identity; PERMISSION_DENIED:
        its role may not) and the refusal recorded like a rejected announcement (GetStatus,
        metrics, log once). SyncNode is authorized with its announcement (``_admit``)."""
        code = grpc.StatusCode.PERMISSION_DENIED
        try:
            ident = authz.identify(context)
            why, label = authz.rpc_refusal(ident, rpc), authz.metric_label(ident)
        except authz.Unauthorized as e:
            code, why, label = grpc.StatusCode.UNAUTHENTICATED, e.text, e.label
        if why is None:
            return True
        peer = peer_name(context.peer())
        self._unauthorized(f"{rpc} from {peer} ({label})", f"{rpc} {label}", why, label)
        context.set_code(code)
        context.set_details(why)
        return False

    def _send_snapshot(self, rec: _NodeRecord, session: _Session) -> None:
        for data in self._snapshot_wire(rec):
            session.send(_Encoded(data), len(data), bounded=False)
        session.synced = True
        c = session.counters
        size = self._planner.size(rec.ann.key)
        session.counters = dataclasses.replace(
            c, snapshots_sent=c.snapshots_sent + 1, snapshot_entries_sent=c.snapshot_entries_sent + size
        )
        rec.counters = session.counters
        _log.debug("node %s: snapshot of %d entries, version %d", rec.ann.key, size, rec.planned_version)

    def _snapshot_wire(self, rec: _NodeRecord) -> list[bytes]:
        """The messages of ``rec``'s snapshot. A node whose plan is its viewer class's union plus
        its own entries (every node but the hot gateways of gateway-mode clusters) gets the
        class's chunks, encoded once per version of the union, then its own entries (in the
        room the class's last chunk has left: one message less, see
        :func:`~fabric.control.codec.more_snapshot_chunks`): at 10,000 agents of a few hundred
        classes, building and encoding each plan was a fifth of a bring-up (issue 21)."""
        key = rec.ann.key
        src = self._planner.snapshot_source(key)
        if src is None:
            return codec.snapshot_wire(self._planner.state(key), rec.planned_version, self.epoch, wire=self._wire)
        cls, version, union, mine = src
        held = self._class_chunks.get(cls)
        if held is None or held[0] != version:
            if held is None and len(self._class_chunks) >= 2 * self._planner.classes() + 64:
                self._class_chunks.clear()  # classes gone (their versions are never reused)
            held = self._class_chunks[cls] = (version, codec.snapshot_chunks(list(union.values()), wire=self._wire))
        return [*codec.more_snapshot_chunks(held[1], len(union), list(mine.values()), wire=self._wire),
                codec.end_of_snapshot_wire(rec.planned_version, self.epoch)]  # fmt: skip

    def _schedule_flush(self, paced: bool = False) -> None:
        """Flush pending changes soon: at once after a quiet period, else once the coalescing
        window (or the duration of the last flush, if longer) has passed since the last one;
        ``paced`` (only new nodes are pending, in a storm of joins): also not before
        :meth:`_pace` since the end of the last flush (see "Pacing"). An unpaced change moves a
        paced flush forward. Without a running event loop (a synchronous caller: tests) the
        flush happens now."""
        if self.holding:
            return
        if self._flush_handle is not None:
            if paced or not self._flush_paced:
                return
            self._flush_handle.cancel()  # paced, and now something else is pending too
            self._flush_handle = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush()
            return
        since = time.monotonic() - self._last_flush_end
        if since >= self._window:
            self._window = self.coalesce_window  # quiet for a whole window: back to the start
        wait = max(self._window, self._last_flush_cost) - since
        if paced:
            wait = max(wait, self._pace() - since)
        self._flush_paced = paced
        if wait > 0:
            self._window = min(self.max_coalesce_window, self._window * 2)
            self._flush_handle = loop.call_later(wait, self._flush)
        else:
            self._flush_handle = loop.call_soon(self._flush)

    def _pace(self) -> float:
        """How long after the end of a flush a paced one may follow (see "Pacing")."""
        return min(MAX_FANOUT_PACE_S, FANOUT_PACE * self._last_fanout_s)

    def _join_storm(self) -> bool:
        """Note a brand-new node's admission; whether it came within :meth:`_pace` of the
        previous one (joins arriving faster than a fan-out is worth flushing each for)."""
        now = time.monotonic()
        storm = now - self._last_join_at < self._pace()
        self._last_join_at = now
        return storm

    def _flush(self) -> None:
        """Adopt everything pending as one topology generation: elect gateways (after the
        startup hold), plan incrementally, queue one delta to each synced session whose plan
        changed, then the snapshots of sessions waiting for one. Nothing pending and no role
        move: nothing happens (no generation is spent)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.holding:
            return
        if self._admissions_logged > MAX_ADMISSIONS_LOGGED:
            _log.info("%d more sessions admitted since the last flush (each logged at DEBUG)",
                      self._admissions_logged - MAX_ADMISSIONS_LOGGED)  # fmt: skip
        self._admissions_logged = 0
        started = time.monotonic()
        old = self.topology
        pending = self._pending
        connected, lingering, scores = self._connected(), self._lingering(), self._election_scores()
        roles = election.elect(pending, connected, scores, lingering)
        full = pending.with_roles(roles) if roles != pending.roles else pending
        self._pending = full
        new, deferred = self._bounded(pending, full, connected, scores, lingering)
        if new.roles == old.roles and (not self._dirty or (new.config == old.config and new.nodes == old.nodes)):
            self._dirty = False
            self._changed.clear()
            self._send_waiting_snapshots()
            self._reachability_changed()
            return
        self._log_moves(old, new)
        self.topology = new
        self.generation += 1
        self.flushes += 1
        gen = self.generation
        work = self._planner.full_plan_seconds, self._planner.changes_seconds, self._planner.counter.full_plans
        deltas = self._planner.update(new)
        plan_s = self._planner.full_plan_seconds - work[0]
        change_s = self._planner.changes_seconds - work[1]
        plans = self._planner.counter.full_plans - work[2]
        debug = _log.isEnabledFor(logging.DEBUG)
        fanout: set[types.NodeKey] = set()
        # One message per distinct delta object, encoded once: every session of a viewer class
        # that gets the same delta is written the same bytes.
        messages: dict[int, tuple[_Encoded, int]] = {}
        for key, delta in deltas.items():
            rec = self._nodes[key]
            rec.planned_version = gen
            s = rec.session
            if s is None or not s.synced:
                continue
            built = messages.get(id(delta))
            if built is None:
                enc = _Encoded(codec.delta_wire(delta, gen, self._wire))
                built = messages[id(delta)] = (enc, len(enc.data))
            s.send(*built)
            if s.closed:  # cut off: too far behind (it reconnects to a fresh snapshot)
                continue
            fanout.add(key)
            c = s.counters
            s.counters = dataclasses.replace(
                c, deltas_sent=c.deltas_sent + 1, delta_entries_sent=c.delta_entries_sent + len(delta)
            )
            rec.counters = s.counters
            if debug:
                for e in delta.upserts:
                    _log.debug("node %s: version %d upsert %s", key, gen, e)
                for k in delta.removals:
                    _log.debug("node %s: version %d remove %s", key, gen, k)
        if fanout:
            self._fanout[gen] = (self.clock(), fanout)
            self._fanout_sent[gen] = time.monotonic()
            self._fanout_order.append(gen)  # generations only grow: stays sorted
            while len(self._fanout_order) > MAX_FANOUT_TRACKED:
                dropped = self._fanout_order.pop(0)  # never completes (a stuck agent): stop waiting
                del self._fanout[dropped]
                self._fanout_sent.pop(dropped, None)
        if self._watchers and self._changed:
            before = {k: n for k in self._changed if (n := _node_in(old, k)) is not None}
            now = {k: n for k in self._changed if (n := _node_in(new, k)) is not None}  # not the deferred
            upserts = [now[k] for k in sorted(now) if before.get(k) != now[k]]
            removals = [k for k in sorted(before) if k not in now]
            if upserts or removals:
                msg_w = codec.topology_delta_message(gen, upserts, removals)
                size_w = msg_w.ByteSize()
                for w in list(self._watchers):
                    if w.synced:
                        w.send(msg_w, size_w)
        # The deferred joins stay pending: announced to watchers and sent their snapshots once
        # a flush adopts them (the next one, scheduled below).
        self._dirty = bool(deferred)
        self._changed.intersection_update(deferred)
        snap_s, snaps = self._send_waiting_snapshots(deferred)
        self._learn_join_cost(plan_s, plans, snap_s, snaps)
        self._reachability_changed()
        end = time.monotonic()
        fixed = max(0.0, end - started - plan_s - snap_s)
        self._flush_fixed = fixed if self._flush_fixed <= 0 else (self._flush_fixed + fixed) / 2
        self._last_flush_end, self._last_flush_cost = end, end - started
        self.deferred = len(deferred)
        _log.debug(
            "generation %d: %d nodes (%d new ones deferred), %d deltas (%d messages) in %.1f ms (full plans "
            "%.1f ms, changed parts %.1f ms, snapshots %.1f ms)", gen, len(new.nodes), len(deferred), len(deltas),
            len(messages), (end - started) * 1000, plan_s * 1000, change_s * 1000, snap_s * 1000,
        )  # fmt: skip
        if deferred:
            self._schedule_flush(paced=True)

    def _bounded(
        self, pending: types.Topology, full: types.Topology, connected: frozenset[types.NodeKey],
        scores: Mapping[types.NodeKey, int], lingering: frozenset[types.NodeKey],
    ) -> tuple[types.Topology, set[types.NodeKey]]:  # fmt: skip
        """The topology this flush adopts and the new nodes it leaves for the next one (see
        "Bounded flushes"): ``full`` (``pending`` with the roles elected on it) without the
        joins past the number whose planning fits in ``flush_slice`` (or in the measured fixed
        cost of a flush, when that is longer: see ``_flush_fixed``). A cluster whose election
        on the adopted nodes would differ from ``full``'s adopts its deferred gateway candidates
        (what the election depends on: the candidates present), so the roles are ``full``'s."""
        joining = self._joining
        present = self._index.nodes
        for key in [k for k in joining if k not in present]:  # withdrawn or dropped meanwhile
            del joining[key]
        if self.flush_slice is None or not joining:
            joining.clear()
            return full, set()
        # The joins' share: at least as long as the rest of the flush, and as its deltas' fan-out
        # (both grow with the synced agents, not with the joins adopted; see "Pacing").
        budget = max(self.flush_slice, self._flush_fixed, self._last_fanout_s)
        take = FIRST_FLUSH_JOINS if self._join_cost <= 0 else max(1, int(budget / self._join_cost))
        if take >= len(joining):
            joining.clear()
            return full, set()
        deferred = set(itertools.islice(joining, take, None))
        base = dataclasses.replace(pending, nodes=tuple(n for n in pending.nodes if n.key not in deferred))
        want = {r.cluster: r for r in full.roles}
        got = {r.cluster: r for r in election.elect(base, connected, scores, lingering)}
        differ = {c for c in want.keys() | got.keys() if want.get(c) != got.get(c)}
        if differ:
            clusters = {c.name: c for c in full.config.clusters}
            back = {
                k for k in deferred
                if k.cluster in differ and (not clusters[k.cluster].gateways or k.name in clusters[k.cluster].gateways)
            }  # fmt: skip
            deferred -= back
        for key in [k for k in joining if k not in deferred]:
            del joining[key]
        adopted = dataclasses.replace(full, nodes=tuple(n for n in full.nodes if n.key not in deferred))
        return adopted, deferred

    def _learn_join_cost(self, plan_s: float, plans: int, snap_s: float, snaps: int) -> None:
        """Update the measured planning cost of one new node, smoothed over flushes: what
        :meth:`_bounded` divides the slice by: its full plan and its snapshot. Not counted: the
        changed parts per viewer class (logged), which grow with the clusters the
        joins fall in more than with their number, and the work per synced node (deltas,
        fan-out), which does not grow with the joins adopted; counted, they made small flushes
        look dear per join and the next flush smaller still."""
        if not plans and not snaps:
            return
        cost = (plan_s / plans if plans else 0.0) + (snap_s / snaps if snaps else 0.0)
        self._join_cost = cost if self._join_cost <= 0 else (self._join_cost + cost) / 2

    def _send_waiting_snapshots(self, deferred: Collection[types.NodeKey] = ()) -> tuple[float, int]:
        """Send the snapshots of the sessions waiting for one whose node is planned; those of
        ``deferred`` nodes keep waiting. Returns the time it took and the snapshots sent."""
        started, sent = time.monotonic(), 0
        # Not the deferred ones (not planned: nothing to send), which at a bring-up of 10,000
        # are thousands, sorted and looked at per flush (issue 21).
        for key in sorted(k for k in self._awaiting if k not in deferred):
            rec = self._nodes.get(key)
            s = rec.session if rec is not None else None
            if rec is not None and s is not None and not s.synced and self._planner.planned(key, rec.ann):
                self._send_snapshot(rec, s)
                sent += 1
        self._awaiting = {k for k in self._awaiting if k in deferred}
        return time.monotonic() - started, sent

    def set_config(self, config: types.FabricConfig) -> None:
        """Adopt a new fabric configuration (e.g. a Cluster resource was edited); call on the
        reflector's event loop. Raises ValueError (and changes nothing) for a configuration
        that is invalid in itself. Nodes still valid under it are kept; a node that is not any
        more is withdrawn at once, its refusal recorded (GetStatus) and sent to its agent as
        ``Rejected``. Everything is then re-planned (in full: a configuration change may touch
        every plan) and only the differences go out, as deltas. Topology watchers are closed
        so that they start over with the new clusters (their snapshot carries them)."""
        problems = admission.config_problems(config)
        if problems:
            raise ValueError("fabric configuration refused: " + "; ".join(problems))
        if config == self.config:
            return
        empty = dataclasses.replace(self._pending, config=config, nodes=())
        index = admission.NodeIndex(config)
        dropped: list[tuple[types.NodeAnnouncement, list[admission.Refusal]]] = []
        for n in self._pending.nodes:  # each against those kept before it (the index), in key order
            reasons = admission.announcement_refusals(empty, n, index)
            if reasons:
                dropped.append((n, reasons))
            else:
                index.add(n)
        kept = dataclasses.replace(empty, nodes=tuple(index.nodes.values()))  # still in key order
        self.config = config
        self._expected = {types.NodeKey.parse(k) for k in config.expected_nodes}
        self._pending = kept
        self._index = index
        self._dirty = True
        for n, reasons in dropped:
            rec = self._nodes.pop(n.key)
            self._connected_set.discard(n.key)
            self._connected_keys = None
            rejected = self._reject(f"node {n.key} under the new fabric configuration", str(n.key), reasons,
                                    authz.metric_label(rec.identity))  # fmt: skip
            self._changed.add(n.key)
            self._reports.pop(n.key, None)
            self._report_since.pop(n.key, None)
            self._quality.pop(n.key, None)
            if rec.withdraw_handle is not None:
                rec.withdraw_handle.cancel()
            if rec.lost_handle is not None:
                rec.lost_handle.cancel()
            if rec.session is not None:
                rec.session.send(rejected)
                rec.session.close("refused by the new fabric configuration", grpc.StatusCode.FAILED_PRECONDITION)
        for w in self._watchers:
            w.close("fabric configuration changed")
        _log.info(
            "new fabric configuration: %d clusters; %d nodes kept, %d withdrawn",
            len(config.clusters), len(kept.nodes), len(dropped),
        )  # fmt: skip
        if self.holding:
            self._maybe_release_hold()
        else:
            self._schedule_flush()

    # -- gateway election ---------------------------------------------------------------------

    def _connected(self) -> frozenset[types.NodeKey]:
        if self._connected_keys is None:
            self._connected_keys = frozenset(self._connected_set)
        return self._connected_keys

    def _lingering(self) -> frozenset[types.NodeKey]:
        """Nodes whose session ended less than ``session_loss_grace`` ago (see "Gateways")."""
        now = self.clock()
        return frozenset(
            k for k, rec in self._nodes.items()
            if rec.session is None and rec.lost_at is not None and now - rec.lost_at < self.session_loss_grace
        )  # fmt: skip

    def _session_loss_expired(self, key: types.NodeKey) -> None:
        rec = self._nodes.get(key)
        if rec is None or rec.session is not None:
            return
        rec.lost_handle = None
        _log.info("node %s: no session for %gs: its gateway roles may move", key, self.session_loss_grace)
        self._reelect(f"session-loss grace of {key} ended")

    def _probe_targets(self) -> dict[types.NodeKey, frozenset[str]]:
        """The probe targets of every reporter, from its plan."""
        targets = {}
        for reporter in self._reports:
            rec = self._nodes.get(reporter)
            entries = self._planner.values(reporter) if rec else ()
            targets[reporter] = frozenset(e.node for e in entries if isinstance(e, types.Peer) and e.probe)
        return targets

    def _scores(self) -> dict[types.NodeKey, int]:
        """Per node, how many other nodes with a session report it unreachable (see
        :func:`election.unreachable_scores` for which reports count): what status shows."""
        return election.unreachable_scores(self._reports, self._probe_targets())

    def _election_scores(self) -> dict[types.NodeKey, int]:
        """The scores the election weighs (:func:`election.confirmed_scores`: a lone report of a
        connected node counts once it has stood ``lone_report_confirm``); when one is pending,
        a re-election is scheduled for the moment it would count."""
        scores, pending = election.confirmed_scores(
            self._reports, self._probe_targets(), self._report_since, self.clock(), self._connected(),
            self.lone_report_confirm,
        )  # fmt: skip
        if pending is not None and pending < self._confirm_at:
            with contextlib.suppress(RuntimeError):  # no loop: a synchronous caller (tests)
                loop = asyncio.get_running_loop()
                if self._confirm_handle is not None:
                    self._confirm_handle.cancel()
                self._confirm_at = pending
                self._confirm_handle = loop.call_later(max(0.0, pending - self.clock()) + 0.01, self._confirm_due)
        return scores

    def _confirm_due(self) -> None:
        self._confirm_handle, self._confirm_at = None, float("inf")
        self._reelect("a lone peer report stood long enough to count")

    def _reelect(self, why: str) -> None:
        """Re-run the election on the current liveness view; a changed role is a topology change
        (flushed with whatever else is pending)."""
        if self.holding:
            return
        roles = election.elect(self._pending, self._connected(), self._election_scores(), self._lingering())
        if roles == self._pending.roles:
            return
        _log.debug("re-election after %s", why)
        self._schedule_flush()

    def _log_moves(self, old: types.Topology, new: types.Topology) -> None:
        """Log role changes; every active gateway that lost its role (the first active, or one of
        the others with ``activeGateways`` > 1) counts as one move, with the reason it went."""
        scores = self._scores()
        connected = self._connected()
        for role in new.roles:
            before = old.role(role.cluster)
            lost = [n for n in before.actives if n not in role.actives] if before is not None else []
            for name in lost:
                self._gateway_moves[role.cluster] = self._gateway_moves.get(role.cluster, 0) + 1
                why = self._why_role_lost(types.NodeKey(role.cluster, name), scores, connected)
                if before is not None and name == before.active:
                    _log.warning(
                        "cluster %s: active gateway moves from %s to %s (%s); standby now %s",
                        role.cluster, name, role.active, why, role.standby or "none",
                    )  # fmt: skip
                else:
                    _log.warning(
                        "cluster %s: active gateway %s drops out (%s); active now %s; standby now %s",
                        role.cluster, name, why, ", ".join(role.actives) or "none", role.standby or "none",
                    )  # fmt: skip
            if not lost and (before is None or before != role):
                _log.info(
                    "cluster %s: active gateway%s %s, standby %s", role.cluster, "s" if len(role.actives) > 1 else "",
                    ", ".join(role.actives) or "none", role.standby or "none",
                )  # fmt: skip

    def _why_role_lost(
        self, key: types.NodeKey, scores: Mapping[types.NodeKey, int], connected: Collection[types.NodeKey]
    ) -> str:
        """Why a gateway lost its active role, for the log."""
        if key not in self._nodes:
            return "it left the topology"
        if key not in connected and scores.get(key, 0) == 0:
            return f"its session is gone for {self.session_loss_grace:g}s"
        if key not in connected:
            return f"its session is gone and {scores[key]} peers report it unreachable"
        return f"{scores.get(key, 0)} peers report it unreachable"

    def _settle_reports(self, session: _Session, why: str) -> None:
        """Hold ``session``'s peer reports for ``report_settle`` seconds from now (see "Peer
        reports after a partition")."""
        if self.report_settle <= 0:
            return
        session.reports_from = self.clock() + self.report_settle
        _log.info("node %s: its peer reports count again in %gs (%s)", session.key, self.report_settle, why)

    def _release_held_report(self, session: _Session) -> None:
        session.held_handle = None
        held, session.held = session.held, None
        if held is not None and not session.closed:
            self._on_peer_report(session, held, session.held_quality)

    def _on_peer_report(
        self, session: _Session, unreachable: frozenset[types.NodeKey],
        quality: dict[types.NodeKey, codec.PeerQuality] | None = None,
    ) -> None:  # fmt: skip
        rec = self._nodes.get(session.key)
        if rec is None or rec.session is not session:
            return
        quality = quality or {}
        wait = session.reports_from - self.clock()
        if wait > 0:
            # Made (or queued) while the agent was cut off: it says more about the reporter than
            # about its peers. The latest one counts once the probes have had time to settle.
            session.held, session.held_quality = unreachable, quality
            if session.held_handle is None:
                session.held_handle = asyncio.get_running_loop().call_later(
                    wait, self._release_held_report, session
                )
            _log.info("node %s reports unreachable: %s (held for %.1fs: it was just cut off)", session.key,
                      ", ".join(sorted(map(str, unreachable))) or "nobody", wait)  # fmt: skip
            return
        if self._quality.get(session.key, {}) != quality:
            if quality:
                self._quality[session.key] = quality
            else:
                self._quality.pop(session.key, None)
            self._reachability_changed(quality_only=True)
        if self._reports.get(session.key, frozenset()) == unreachable:
            return
        if unreachable:
            self._reports[session.key] = unreachable
            now, before = self.clock(), self._report_since.get(session.key, {})
            self._report_since[session.key] = {k: before.get(k, now) for k in unreachable}
        else:
            self._reports.pop(session.key, None)
            self._report_since.pop(session.key, None)
        _log.info(
            "node %s reports unreachable: %s", session.key, ", ".join(sorted(map(str, unreachable))) or "nobody"
        )
        self._reelect(f"peer report of {session.key}")
        self._reachability_changed()

    # -- sessions ---------------------------------------------------------------------------

    def _on_applied(self, session: _Session, version: int) -> None:
        rec = self._nodes.get(session.key)
        if rec is None or rec.session is not session:
            return
        previous, rec.applied_version = rec.applied_version, version
        self._fanout_done(session.key, version, previous)
        _log.debug("node %s applied version %d (planned %d)", session.key, version, rec.planned_version)

    def _fanout_done(self, key: types.NodeKey, version: int, previous: int = 0) -> None:
        """``key`` has applied everything up to ``version`` (or will never report: version
        -1 on a lost session): generations whose last pending node that was are observed.
        Only generations after ``previous`` (what ``key`` reported before) can still wait for
        it: an Applied costs O(log tracked + its new generations), not O(tracked)."""
        now = self.clock()
        order = self._fanout_order
        if version < 0:
            todo = list(order)
        else:
            todo = order[bisect.bisect_right(order, previous) : bisect.bisect_right(order, version)]
        for gen in todo:
            started, pending = self._fanout[gen]
            pending.discard(key)
            if not pending:
                del self._fanout[gen]
                sent = self._fanout_sent.pop(gen, None)
                order.remove(gen)
                if version >= 0:
                    self.fanout_lag.observe(max(0.0, now - started))
                    if sent is not None:
                        self._last_fanout_s = time.monotonic() - sent
                if not order and self.gc_policy is not None and self._loop is not None:
                    self._loop.call_soon(self._gc_poll)  # the last fan-out is done: maybe quiet now

    def _session_ended(self, session: _Session, reason: str) -> None:
        session.closed = True
        rec = self._nodes.get(session.key)
        if rec is None or rec.session is not session:
            return  # replaced by a newer session, or already withdrawn
        rec.session = None
        self._connected_set.discard(session.key)
        self._connected_keys = None
        self._fanout_done(session.key, -1)
        self._reports.pop(session.key, None)
        self._report_since.pop(session.key, None)
        self._quality.pop(session.key, None)
        if reachability_rules.speaks_for_pairs(self.topology, session.key):
            self._reachability_changed()
        # A session loss alone is not a dead gateway (see "Gateways"): its roles stay for the
        # session-loss grace unless its peers report it unreachable, then they may move.
        rec.lost_at = self.clock()
        if self.session_loss_grace > 0 and self.session_loss_grace < self.grace_period:
            rec.lost_handle = asyncio.get_running_loop().call_later(
                self.session_loss_grace + 0.01, self._session_loss_expired, session.key
            )
        self._reelect(f"session of {session.key} ended")
        if self.grace_period <= 0:
            _log.info("session of node %s ended (%s)", session.key, reason)
            self._withdraw(session.key)
            return
        rec.withdraw_at = self.clock() + self.grace_period
        rec.withdraw_handle = asyncio.get_running_loop().call_later(self.grace_period, self._withdraw, session.key)
        _log.info(
            "session of node %s ended (%s); withdrawing it in %gs unless it reconnects",
            session.key,
            reason,
            self.grace_period,
        )

    def _withdraw(self, key: types.NodeKey) -> None:
        rec = self._nodes.get(key)
        if rec is None or rec.session is not None:
            return
        del self._nodes[key]
        self._pending = self._pending.without_node(key)
        self._index.remove(key)
        self._joining.pop(key, None)
        self._changed.add(key)
        self._dirty = True
        self._schedule_flush()
        _log.info("node %s withdrawn", key)

    def _session_cut(self, session: _Session, reason: str) -> None:
        """``session`` was cut off (its queue passed its bound). Its handler may stay blocked in
        a write the agent never reads, so the node is treated as disconnected now (grace period,
        gateway role): on the next loop turn, as this runs inside a flush."""
        self.gate.note_cut("sync_node", f"node {session.key} from {session.peer}", reason)
        asyncio.get_running_loop().call_soon(self._session_ended, session, reason)

    def _watcher_cut(self, w: _Watcher, reason: str) -> None:
        self.gate.note_cut("watch_topology", w.peer, reason)
        self._watchers.discard(w)

    def _hold_time(self, session: _Session | None) -> float:
        """How long ``session`` may stay silent: three negotiated keepalive intervals (see
        :func:`~fabric.control.bounds.negotiate_keepalive`); our own interval's before it
        proposed one, or for a stream that has no session yet (None)."""
        interval = session.interval if session is not None and session.interval else self.keepalive_interval
        return DEAD_AFTER_INTERVALS * interval

    def _on_keepalive(self, session: _Session, proposed: float) -> None:
        """The agent proposes ``proposed`` seconds: negotiate (clamped, the smaller side's) and,
        when that changes the session's interval, tell the agent at once (our keepalives carry
        the negotiated interval, which the agent follows)."""
        session.peer_interval = proposed
        interval = bounds.negotiate_keepalive(self.keepalive_interval, proposed, self.limits)
        if interval != session.interval:
            if not self.limits.keepalive_min_s <= proposed <= self.limits.keepalive_max_s:
                _log.info("node %s proposes a keepalive interval of %gs, outside %g-%gs: the session runs at %gs",
                          session.key, proposed, self.limits.keepalive_min_s, self.limits.keepalive_max_s,
                          interval)  # fmt: skip
            session.interval = interval
            if session.relay_timer is not None:  # a relayed session: its timer is its keepalive task
                session.relay_timer.cancel()
                session.keepalive_queued = None  # the new interval goes out even behind an old one
                self._relay_keepalive(session)
            else:
                session.renegotiated.set()

    def _send_keepalive(self, session: _Session) -> None:
        """Queue a keepalive with the session's interval, unless one is still queued."""
        if session.keepalive_queued is None:
            interval = session.interval or self.keepalive_interval
            shared = self._keepalives.get(interval)
            if shared is None:  # one encoding per interval (there are a few), not per keepalive
                shared = self._keepalives[interval] = _Encoded.of(
                    pb.SyncNodeResponse(keepalive=codec.keepalive_message(interval)))  # fmt: skip
            # Its own wrapper: the writer knows this session's keepalive by identity.
            msg = _Encoded(shared.data)
            session.keepalive_queued = msg
            session.send(msg, len(msg.data))

    async def _read_requests(self, session: _Session, requests: AsyncIterator[pb.SyncNodeRequest]) -> None:
        try:
            async for req in requests:
                if not self._on_request(session, req):
                    return
            session.close("agent closed the session")
        except pb_message.DecodeError as e:  # gRPC decodes as we read: the agent's fault, not ours
            session.close(f"malformed message from agent: {e}", grpc.StatusCode.INVALID_ARGUMENT)
        except grpc.aio.BaseError as e:  # gRPC's own (UsageError, InternalError): the RPC ended under us
            session.close(f"stream from agent failed: {e!r}", grpc.StatusCode.UNAVAILABLE)
        # Anything else is a bug: it ends this task, and _watch_task crashes the reflector. An
        # agent that goes away ends the iteration (and gRPC cancels this RPC's handler).

    def _on_request(self, session: _Session, req: pb.SyncNodeRequest) -> bool:
        """One message of an admitted agent. False: it broke the protocol, and the session is
        closed (INVALID_ARGUMENT); nothing more of it is read."""
        now = self.clock()
        # Judged by the session's negotiated interval, so only once the agent proposed one.
        if session.peer_interval and now - session.last_rx > SILENT_AFTER_INTERVALS * session.interval:
            self._settle_reports(session, f"it was silent for {now - session.last_rx:.1f}s")
        session.last_rx = now
        kind = req.WhichOneof("message")
        if kind == "keepalive":
            self._on_keepalive(session, req.keepalive.interval_ms / 1000.0)
        elif kind == "applied":
            self._on_applied(session, req.applied.version)
        elif kind == "peer_report":
            try:
                report = codec.peer_report_from_pb(req.peer_report)
                quality = codec.peer_quality_from_pb(req.peer_report)
            except codec.DecodeError as e:  # the agent's fault, not ours
                session.close(f"malformed message from agent: {e}", grpc.StatusCode.INVALID_ARGUMENT)
                return False
            self._on_peer_report(session, report, quality)
        else:
            session.close(f"protocol error: {kind or 'empty'} message after the announcement",
                          grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
            return False
        return True

    async def _keepalive(self, session: _Session) -> None:
        """Every negotiated interval: the hold check, and a keepalive. A new negotiated interval
        wakes it at once (the agent may expect keepalives more often from now on). The first
        keepalive went out with the admission (:meth:`_admit`): sending one more as this task
        starts wrote a second, identical message to every agent of a bring-up (issue 21)."""
        while not session.closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(session.interval or self.keepalive_interval):
                    await session.renegotiated.wait()
            silent = self.clock() - session.last_rx
            if silent > self._hold_time(session):
                session.close(f"keepalive timeout: nothing received for {silent:.1f}s", grpc.StatusCode.UNAVAILABLE)
                return
            if session.renegotiated.is_set():
                session.keepalive_queued = None  # the new interval goes out even behind an old one
            session.renegotiated.clear()
            self._send_keepalive(session)

    async def sync_node(
        self, requests: AsyncIterator[pb.SyncNodeRequest], context: grpc.aio.ServicerContext[Any, Any],
        slot: bounds.Slot | None = None, *, wire: bool = False,
    ) -> AsyncIterator[Any]:
        """One agent's session; ``slot``: its place in the stream count (given back if it is cut
        off). Yields ``SyncNodeResponse`` messages; with ``wire`` (the gRPC face), a message
        encoded once for many sessions as its bytes instead (reflector_service.wire)."""
        peer = peer_name(context.peer())
        if self.standby_reason is None:
            try:
                async with asyncio.timeout(self._hold_time(None)):
                    first = await anext(requests)
            except (StopAsyncIteration, TimeoutError):
                _log.info("session from %s ended before announcing its node", peer)
                return
            except pb_message.DecodeError as e:  # gRPC decodes as we read: the agent's fault, not ours
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(f"malformed message from agent {peer}: {e}")
                return
        if self.standby_reason is not None:  # a standby (or it became one while we waited)
            # Not a rejection: agents retry UNAVAILABLE, through the Service, to the leader.
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(self.standby_reason)
            return
        opened = self._open_session(first, context, peer, slot)
        if not isinstance(opened, _Session):
            yield opened  # its rejection
            return
        session = opened
        reader = asyncio.create_task(self._read_requests(session, requests))
        ticker = asyncio.create_task(self._keepalive(session))
        for task, what in ((reader, "reading"), (ticker, "keepalives")):
            self._watch_task(task, session, f"SyncNode of {session.key} from {peer} ({what})")
        end_reason = "stream cancelled (agent gone)"
        try:
            while True:
                item = await session.queue.get()
                if isinstance(item, _Close):
                    end_reason = item.reason
                    if item.code is not None:
                        context.set_code(item.code)
                        context.set_details(item.reason)
                    break
                if item is session.keepalive_queued:
                    session.keepalive_queued = None
                if isinstance(item, _Encoded):
                    yield item.data if wire else item.message
                else:
                    yield item
        finally:
            reader.cancel()
            ticker.cancel()
            self._session_ended(session, end_reason)

    def _open_session(
        self, first: pb.SyncNodeRequest, context: Any, peer: str, slot: bounds.Slot | None,
        on_ready: Callable[[], None] | None = None,
    ) -> _Session | pb.SyncNodeResponse:  # fmt: skip
        """The session of the agent whose first message is ``first``, admitted (its keepalive
        and, when its plan is ready, its snapshot queued), or the ``Rejected`` to send it: the
        authorization, the announcement's place and its admission, for direct and relayed
        sessions alike."""
        try:
            ident = authz.identify(context)
        except authz.Unauthorized as e:
            return self._unauthorized(f"session from {peer}", f"peer {peer}", e.text, e.label)
        if first.WhichOneof("message") != "announce":
            refusal = admission.Refusal(
                api.RejectionReason.PROTOCOL,
                f"the first message must be an announcement, not {first.WhichOneof('message') or 'empty'}",
            )
            return self._reject(f"session from {peer}", f"peer {peer}", [refusal], authz.metric_label(ident))
        ann = codec.node_from_pb(first.announce.node)
        session = _Session(ann.key, peer, self.clock(), self.limits.send_queue_bytes, self._session_cut)
        session.queue.slot = slot
        session.queue.on_ready = on_ready
        session.identity = ident
        return self._admit(ann, session) or session

    # -- sessions a relay carries (fabric/control/relay_hub.py) -----------------------------

    def open_relayed(
        self, first: pb.SyncNodeRequest, context: Any, on_ready: Callable[[], None]
    ) -> _Session | bytes | None:
        """The session of an agent a relay carries, opened from its first message with the same
        authorization and admission as :meth:`sync_node`, but without a task of its own: the
        relay stream's reader hands it the agent's messages (:meth:`relayed_request`), its
        keepalives run on a timer, and the hub takes what it has to send
        (:meth:`relayed_take`) when ``on_ready`` says its queue is no longer empty. Returns the
        session; or the bytes of its ``Rejected`` (then it has ended: OK after them); or None
        on a standby (``context`` then says UNAVAILABLE and names the leader)."""
        if self.standby_reason is not None:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(self.standby_reason)
            return None
        opened = self._open_session(first, context, peer_name(context.peer()), None, on_ready)
        if not isinstance(opened, _Session):
            return opened.SerializeToString()
        if not opened.closed:
            self._relay_keepalive_later(opened)
        return opened

    def relayed_request(self, session: _Session, req: pb.SyncNodeRequest) -> None:
        """A message the agent of relayed ``session`` sent (a protocol error closes it)."""
        if not session.closed:
            self._on_request(session, req)

    def relayed_take(self, session: _Session) -> bytes | tuple[grpc.StatusCode | None, str] | None:
        """The next message queued to relayed ``session`` as its bytes; its end (status code,
        None for OK, and reason) once everything before it was taken; None: nothing queued."""
        if session.queue.empty():
            return None
        item = session.queue.get_nowait()
        if isinstance(item, _Close):
            return item.code, item.reason
        if item is session.keepalive_queued:
            session.keepalive_queued = None
        return item.data if isinstance(item, _Encoded) else item.SerializeToString()

    def relayed_close(self, session: _Session, reason: str) -> None:
        """The relay closed the session (its agent left, or went silent): its end is queued."""
        session.close(reason)

    def relayed_ended(self, session: _Session, reason: str) -> None:
        """Relayed ``session`` is over (its end taken, or its relay stream gone): what a direct
        session's handler does as it returns. Idempotent."""
        if session.relay_timer is not None:
            session.relay_timer.cancel()
        session.queue.clear()
        session.closed = True
        self._session_ended(session, reason)

    def _relay_keepalive_later(self, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        session.relay_timer = loop.call_later(session.interval or self.keepalive_interval, self._relay_keepalive,
                                              session)  # fmt: skip

    def _relay_keepalive(self, session: _Session) -> None:
        """A relayed session's keepalive, every negotiated interval. No hold check: the relay
        judges its agent's liveness (it closes the session of an agent silent for three
        intervals, and every session goes with the relay stream), so the agent counts as heard
        from (its reports are not settled as a silent agent's)."""
        if session.closed:
            return
        session.last_rx = self.clock()
        self._send_keepalive(session)
        self._relay_keepalive_later(session)

    def _watch_task(self, task: asyncio.Task[None], session: _Session, where: str) -> None:
        """A session's helper task that raises is a bug: end the session with INTERNAL (not
        UNAVAILABLE: nothing to retry) and crash the reflector."""

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or t.exception() is None:
                return
            exc = t.exception()
            assert exc is not None
            session.close(f"reflector bug: {exc!r}", grpc.StatusCode.INTERNAL)
            self.crash(exc, where)

        task.add_done_callback(done)

    async def watch_topology(
        self, context: grpc.aio.ServicerContext[Any, Any] | None = None, slot: bounds.Slot | None = None
    ) -> AsyncIterator[pb.WatchTopologyResponse]:
        peer = peer_name(context.peer()) if context is not None else "in-process watcher"
        w = _Watcher(peer, self.limits.send_queue_bytes, self._watcher_cut)
        w.queue.slot = slot
        self._watchers.add(w)
        if not self.holding:
            self._sync_watcher(w)
        try:
            while True:
                item = await w.queue.get()
                if isinstance(item, _Close):
                    if item.code is not None and context is not None:
                        context.set_code(item.code)
                        context.set_details(item.reason)
                    break
                yield item
        finally:
            w.closed = True
            self._watchers.discard(w)

    def _sync_watcher(self, w: _Watcher) -> None:
        for msg in codec.topology_snapshot_messages(self.topology, self.generation):
            w.send(msg, msg.ByteSize(), bounded=False)
        w.synced = True

    # -- add-on records (the rules: fabric/control/record_store.py) --------------------------

    async def publish_records(
        self, requests: AsyncIterator[pb.PublishRecordsRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.PublishRecordsResponse]:
        """A publisher's session: open, then one ack per request, in order. Requests are
        applied as they are read and each ack is written before the next request is read, so a
        publisher that does not read its acks stops being read (gRPC flow control): nothing
        queues up here. Ends when the publisher closes, the stream breaks (HTTP/2 keepalive
        detects a dead peer) or a newer session of the identity replaces this one."""
        peer = peer_name(context.peer())
        it = aiter(requests)
        try:
            async with asyncio.timeout(self._hold_time(None)):
                first = await anext(it)
        except (StopAsyncIteration, TimeoutError):
            _log.info("PublishRecords from %s ended before it opened", peer)
            return
        except pb_message.DecodeError as e:  # gRPC decodes as we read: the publisher's fault, not ours
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(f"PublishRecords from {peer}: malformed message: {e}")
            return
        if self.standby_reason is not None:  # it became a standby while we waited
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(self.standby_reason)
            return
        if first.WhichOneof("message") != "open":
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(f"PublishRecords from {peer}: the first message must be open, not "
                                f"{first.WhichOneof('message') or 'empty'}")  # fmt: skip
            return
        try:
            identity, proven = publisher_identity(first.open.identity, context)
        except authz.Unauthorized as e:
            self._unauthorized(f"PublishRecords from {peer} ({e.label})", f"PublishRecords {e.label}", e.text, e.label)
            context.set_code(grpc.StatusCode.PERMISSION_DENIED)
            context.set_details(e.text)
            return
        try:
            session, reclaimed = self.records.open(identity, peer, proven=proven)
        except record_store.OpenRefused as e:
            context.set_code(e.code)
            context.set_details(e.text)
            return
        end_reason = "publisher closed the session"
        ending = asyncio.ensure_future(session.ending.event.wait())
        try:
            yield pb.PublishRecordsResponse(
                opened=pb.PublishOpened(identity=identity, reclaimed=reclaimed, epoch=self.epoch)
            )
            while True:
                nxt = asyncio.ensure_future(anext(it))
                nxt.add_done_callback(_retrieve)  # its end is read below, or of no interest once cancelled
                await asyncio.wait((nxt, ending), return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():  # replaced, or the reflector stops or stands down
                    nxt.cancel()
                    end_reason = session.ending.reason
                    if session.ending.code is not None:
                        context.set_code(session.ending.code)
                        context.set_details(end_reason)
                    break
                try:
                    req = nxt.result()
                except StopAsyncIteration:
                    break
                except grpc.aio.BaseError as e:  # gRPC's own: the RPC ended under us
                    end_reason = f"stream from publisher failed: {e!r}"
                    break
                except pb_message.DecodeError as e:  # the publisher's fault, not ours
                    end_reason = f"PublishRecords of {identity} from {peer}: malformed message: {e}"
                    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                    context.set_details(end_reason)
                    break
                if req.WhichOneof("message") == "open":
                    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                    end_reason = f"PublishRecords of {identity} from {peer}: a second open in one session"
                    context.set_details(end_reason)
                    break
                ack = self.records.apply(session, req)
                if ack.ack.refused == pb.RecordRefusal.REASON_POLICY:  # a kind not its own: authorization
                    label = identity if proven else authz.INSECURE_LABEL
                    self._unauthorized(f"PublishRecords of {identity} from {peer}", f"PublishRecords {label}",
                                       ack.ack.reason, label)  # fmt: skip
                yield ack
        finally:
            ending.cancel()
            self.records.session_ended(session, end_reason)

    async def watch_records(
        self, request: pb.WatchRecordsRequest, context: grpc.aio.ServicerContext[Any, Any],
        slot: bounds.Slot | None = None,
    ) -> AsyncIterator[pb.WatchRecordsResponse]:
        """Snapshot, END_OF_SNAPSHOT, then deltas of one kind (see record_store)."""
        peer = peer_name(context.peer())
        try:
            sub = self.records.subscribe(request.kind, request.publisher, peer, slot)
        except record_store.OpenRefused as e:
            context.set_code(e.code)
            context.set_details(e.text)
            return
        try:
            while (msg := await sub.next()) is not None:
                yield msg
            if sub.ending.code is not None:
                context.set_code(sub.ending.code)
                context.set_details(sub.ending.reason)
        finally:
            self.records.unsubscribe(sub)

    # -- startup hold -----------------------------------------------------------------------

    def _all_expected_present(self) -> bool:
        return bool(self._expected) and all(k in self._nodes for k in self._expected)

    def _maybe_release_hold(self) -> None:
        if self.holding and self._all_expected_present():
            self._release_hold(f"all {len(self._expected)} expected nodes announced")

    def _release_hold(self, why: str) -> None:
        if not self.holding:
            return
        self.holding = False
        if self._hold_handle is not None:
            self._hold_handle.cancel()
            self._hold_handle = None
        _log.info("startup hold released (%s): electing gateways, sending snapshots and END_OF_SNAPSHOT", why)
        self._dirty = True
        self._awaiting.update(k for k, rec in self._nodes.items() if rec.session is not None)
        self._flush()
        for w in self._watchers:
            if not w.synced:
                self._sync_watcher(w)

    # -- status -----------------------------------------------------------------------------

    def status(self) -> api.FabricStatus:
        now = self.clock()
        scores = self._scores()
        nodes_by_cluster: dict[str, list[api.NodeStatus]] = {c.name: [] for c in self.config.clusters}
        for node in self._pending.nodes:
            rec = self._nodes[node.key]
            nodes_by_cluster.setdefault(node.cluster, []).append(
                api.NodeStatus(
                    cluster=node.cluster,
                    name=node.name,
                    underlay_ip=node.underlay_ip,
                    pod_cidrs=node.pod_cidrs,
                    connected=rec.session is not None,
                    planned_version=rec.planned_version,
                    applied_version=rec.applied_version,
                    planned_entries=self._planner.size(node.key),
                    counters=rec.counters,
                    withdraw_in_s=None if rec.withdraw_at is None else max(0.0, rec.withdraw_at - now),
                    unreachable_reports=scores.get(node.key, 0),
                    reports_unreachable=tuple(sorted(str(k) for k in self._reports.get(node.key, ()))),
                    extra_underlay_ips=node.extra_underlay_ips,
                )
            )
        return api.FabricStatus(
            epoch=self.epoch,
            generation=self.generation,
            holding=self.holding,
            clusters=tuple(
                api.ClusterStatus(
                    name=c.name,
                    mode=c.mode.value,
                    pod_cidrs=c.pod_cidrs,
                    service_cidrs=c.service_cidrs,
                    nodes=tuple(nodes_by_cluster.get(c.name, ())),
                    active_gateway=role.active if (role := self.topology.role(c.name)) else "",
                    standby_gateway=role.standby if role else "",
                    gateways=c.gateways,
                    gateway_moves=self._gateway_moves.get(c.name, 0),
                    ip_families=c.families,
                    also_active_gateways=role.also_active if role else (),
                )
                for c in self.config.clusters
            ),
            rejections=tuple(self._rejections.values()),
            unreachable_pairs=tuple(
                api.UnreachablePair(a, b, why) for a, b, why in planner.unreachable_pairs(self.config)
            ),
        )

    def collector(self) -> Collector:
        return MetricsCollector(self)

    # -- health (called from the HTTP thread) -------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        """Live while the event loop answers within a few seconds (a wedged loop serves no one)."""
        loop = self._loop
        if loop is None or self._server is None:
            return False, "not serving"

        async def ping() -> None:
            return None

        try:
            asyncio.run_coroutine_threadsafe(ping(), loop).result(timeout=5.0)
        except (TimeoutError, RuntimeError) as e:
            return False, f"event loop did not answer within 5 s ({type(e).__name__})"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Ready while serving agents: listening and not a standby. The startup hold does not
        count: agents can end it only by reaching this replica (through a Service that routes to
        ready pods), so a holding leader must be ready."""
        if self._server is None:
            return False, "not serving"
        if self.standby_reason is not None:
            return False, self.standby_reason
        return (True, "ok (startup hold: waiting for expected nodes)") if self.holding else (True, "ok")

    def set_leader(self, leading: bool, why: str, expected: Iterable[str] | None = None) -> None:
        """Serve agents (``leading``: this replica holds the leader Lease) or stand by; call on
        the event loop. Standing down closes every session and topology watch with UNAVAILABLE
        (agents reconnect to the new leader and keep their dataplane meanwhile); a standby
        refuses ``SyncNode`` with ``why`` (naming the leader). Taking over starts a startup hold
        for ``expected`` (``cluster/node`` names; None keeps the configuration's), exactly as a
        restart would: no END_OF_SNAPSHOT until those nodes announced or the hold elapsed."""
        if not leading:
            was_leading = self.standby_reason is None
            self.standby_reason = why
            if not was_leading:
                return
            closed = 0
            for rec in self._nodes.values():
                if rec.session is not None:
                    rec.session.close(why, grpc.StatusCode.UNAVAILABLE)
                    closed += 1
            for w in self._watchers:
                w.close(why, grpc.StatusCode.UNAVAILABLE)
            self.records.close_all(why, grpc.StatusCode.UNAVAILABLE)
            _log.log(logging.WARNING if closed else logging.INFO, "standby from now on (%s): closed %d agent sessions",
                     why, closed)  # fmt: skip
            return
        if self.standby_reason is None:
            return
        self.standby_reason = None
        if expected is not None:
            self._expected = {types.NodeKey.parse(k) for k in expected}
        _log.info("leader from now on (%s): serving agents", why)
        if self._loop is not None:  # before start(), start() begins the hold
            self.records.hold(self.records_startup_hold)
            self.reachability = {}  # standing down dropped the records: publish them all again
            self._reach_inputs = None
        if self._loop is not None and self.startup_hold > 0 and not self._all_expected_present():
            # A full hold from now (an old one began when this replica started, as a standby);
            # before start() there is nothing to do: start() begins the hold.
            if self._hold_handle is not None:
                self._hold_handle.cancel()
            self.holding = True
            self._hold_handle = self._loop.call_later(
                self.startup_hold, self._release_hold, f"startup hold of {self.startup_hold:g}s elapsed"
            )
            _log.info("holding END_OF_SNAPSHOT for up to %gs until %s announce", self.startup_hold,
                      f"{len(self._expected)} expected nodes" if self._expected else "(no node list: the full period)")
        elif self.holding:
            self._maybe_release_hold()
        self._reachability_changed()

    # -- garbage collection (see "Garbage collection") ---------------------------------------

    def _quiet(self) -> bool:
        """Nothing in flight: no flush pending, no fan-out waiting for an Applied, no session
        waiting for its snapshot, no hold. A full collection now delays no change in progress."""
        return not (
            self.holding or self._flush_handle is not None or self._dirty or self._fanout or self._awaiting
            or self._joining
        )  # fmt: skip

    def _gc_poll(self) -> None:
        if self.gc_policy is not None:
            self.gc_policy.poll(self._quiet())

    def _gc_tick(self) -> None:
        self._gc_handle = None
        self._gc_poll()
        if self._loop is not None:
            self._gc_handle = self._loop.call_later(GC_POLL_S, self._gc_tick)

    # -- reachability records (see "Reachability records") ---------------------------------

    def _reachability_changed(self, *, quality_only: bool = False) -> None:
        """An input of the reachability records changed: recompute them on the next loop turn,
        or once the minimum interval since the last recompute has passed (``quality_only``: the
        longer one of measurements); now, without a running loop (synchronous tests). Not during
        a hold or as a standby: nothing would be published (see "Reachability records")."""
        if self.holding or self.standby_reason is not None or self.records.holding:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._publish_reachability()
            return
        now = loop.time()
        # At least as long as the last derivation took (at most half the loop goes to it): at
        # 100 clusters one takes ~0.1 s and more under load, and 20 a second during a bring-up
        # of 10,000 agents left the loop no time to admit streams (issue 21, measured).
        spacing = max(QUALITY_MIN_INTERVAL_S if quality_only else REACHABILITY_MIN_INTERVAL_S, self._reach_cost)
        at = max(now, self._reach_last + spacing)
        if self._reach_handle is not None:
            if self._reach_at <= at:
                return
            self._reach_handle.cancel()
        self._reach_at = at
        self._reach_handle = loop.call_soon(self._publish_reachability) if at <= now else loop.call_at(
            at, self._publish_reachability)  # fmt: skip

    def _records_hold_ends(self) -> None:
        """The record store's startup hold is ending: put the reachability records now, from the
        view of this moment, so the snapshots about to be sent carry them."""
        if self._reach_handle is not None:
            self._reach_handle.cancel()
        self._publish_reachability()

    def _publish_reachability(self) -> None:
        """Derive every pair's state and put the records whose bytes changed (one revision),
        deleting those of pairs gone from the configuration."""
        self._reach_handle = None
        if self.holding or self.standby_reason is not None or not self.reachability_records:
            return
        started = time.monotonic()
        try:
            self._derive_and_put_reachability()
        finally:
            self._reach_cost = time.monotonic() - started
            with contextlib.suppress(RuntimeError):  # no running loop: synchronous tests
                self._reach_last = asyncio.get_running_loop().time()

    def _derive_and_put_reachability(self) -> None:
        connected = self._connected()
        inputs = reachability_rules.inputs(self.topology, connected, self._reports, self._quality)
        if inputs == self._reach_inputs:
            return  # the same records (see reachability_rules.inputs)
        self._reach_inputs = inputs
        targets = reachability_rules.probe_targets(self.topology)
        quality = reachability_rules.pair_quality(self.topology, connected, self._reports, self._quality, targets)
        states = reachability_rules.derive(self.topology, connected, self._reports, quality, targets)
        if states == self.reachability:
            return
        held = {r.name: r.data for r in self.records.records(reachability.KIND, reachability.PUBLISHER)}
        upserts: dict[str, bytes] = {}
        moved: list[tuple[str, str, reachability.PairState]] = []
        for (source, target), state in states.items():
            name = reachability.record_name(source, target)
            data = reachability.encode(state)
            if held.get(name) != data:
                upserts[name] = data
            before = self.reachability.get((source, target))
            if before is not None and before.reachable != state.reachable:
                moved.append((source, target, state))
        _log_pair_changes(moved)
        names = {reachability.record_name(s, t) for s, t in states}
        gone = [n for n in held if n not in names]
        self.reachability = states
        if upserts or gone:
            self.records.put_own(reachability.PUBLISHER, reachability.KIND, upserts, gone)
            self.reachability_updates += 1


def _log_pair_changes(moved: Sequence[tuple[str, str, reachability.PairState]]) -> None:
    """Log the pairs whose reachability changed in one derivation: each one (INFO when it became
    reachable, WARNING when not) when there are at most :data:`MAX_PAIR_CHANGES_LOGGED`, else one
    line with the counts and the first few of each way, and each pair at DEBUG."""
    if len(moved) <= MAX_PAIR_CHANGES_LOGGED:
        for source, target, state in moved:
            _log.log(logging.INFO if state.reachable else logging.WARNING, "cluster %s -> %s: %s (%s)", source,
                     target, "reachable" if state.reachable else "unreachable", state.reason)  # fmt: skip
        return
    up = [f"{s} -> {t}" for s, t, st in moved if st.reachable]
    down = [f"{s} -> {t} ({st.reason})" for s, t, st in moved if not st.reachable]
    shown = MAX_PAIR_CHANGES_LOGGED // 2

    def some(pairs: list[str]) -> str:
        return ", ".join(pairs[:shown]) + (f" and {len(pairs) - shown} more" if len(pairs) > shown else "")

    parts = [f"{len(up)} became reachable ({some(up)})" if up else "",
             f"{len(down)} unreachable ({some(down)})" if down else ""]  # fmt: skip
    _log.log(logging.WARNING if down else logging.INFO, "cluster pairs: %s (each pair at DEBUG)",
             "; ".join(p for p in parts if p))  # fmt: skip
    if _log.isEnabledFor(logging.DEBUG):
        for source, target, state in moved:
            _log.debug("cluster %s -> %s: %s (%s)", source, target, "reachable" if state.reachable else "unreachable",
                       state.reason)  # fmt: skip


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a finished task's outcome as seen (a read abandoned for the end of its session)."""
    if not task.cancelled():
        task.exception()


def _node_in(topology: types.Topology, key: types.NodeKey) -> types.NodeAnnouncement | None:
    """``topology.node(key)`` by bisection (nodes are sorted by key)."""
    nodes = topology.nodes
    i = bisect.bisect_left(nodes, key, key=lambda n: n.key)
    return nodes[i] if i < len(nodes) and nodes[i].key == key else None


def _with_nodes(topology: types.Topology, anns: Collection[types.NodeAnnouncement]) -> types.Topology:
    """``topology`` with ``anns`` added or replacing the node of the same key, nodes in key
    order: one pass over the nodes (the new ones sorted and merged in), however many."""
    if not anns:
        return topology
    new = sorted(anns, key=lambda n: n.key)
    replaced = {n.key for n in new}
    old = [n for n in topology.nodes if n.key not in replaced]
    merged: list[types.NodeAnnouncement] = []
    i = 0
    for n in new:
        j = bisect.bisect_left(old, n.key, lo=i, key=lambda o: o.key)
        merged.extend(old[i:j])
        merged.append(n)
        i = j
    merged.extend(old[i:])
    return dataclasses.replace(topology, nodes=tuple(merged))
