"""Control-plane benchmark: topology change -> the last affected simulated agent reporting it applied.

Processes (all on this machine, talking over unix sockets in a private temporary directory; no
namespaces, no kernel objects, so no root needed)::

    driver (this module's run())
      |-- fabric-reflector  (python -m fabric.control.reflector; --grace-period 0 so a leave is
      |                      immediate, --startup-hold 0, keepalives every 30 s)
      |-- W worker processes (python -m tools.bench.control worker): N light agents in total,
      |                      each its own channel (own connection) and SyncNode stream
      '-- 1 joiner process   (the same worker code with one agent that joins/leaves on command)

**Shapes** (``--shape``; :class:`Shape`): ``p2p`` = two P2P clusters, so every agent's plan holds
a peer and a route for every other node (O(N^2) state in the reflector and in the snapshots: the
worst case); ``gateway`` = gateway-mode clusters of :data:`CLUSTER_SIZE` nodes (at least two
clusters), each with :data:`GATEWAY_CANDIDATES` gateway candidates, one /16 pod CIDR per cluster
and a /24 per node, where internal nodes hold O(1) peers. Default: ``p2p`` for N up to
:data:`P2P_DEFAULT_MAX_N` and ``gateway`` for every N. Figures of ``p2p`` keep their names
(``join_fanout_p50_n1000``); the others carry the shape (``join_fanout_p50_gateway_n1000``).

A **light agent** speaks the real SyncNode protocol with the generated stubs: Announce, a
Keepalive, then it validates every message it receives with the agents' own state machine,
``fabric.control.client.SyncStream`` (each entry decoded by ``fabric.control.codec``; chunks
only before END_OF_SNAPSHOT; deltas only after it, with increasing versions; here also: every
removal must name an entry it holds) and answers every END_OF_SNAPSHOT
and Delta with ``Applied(version)``, stamping ``time.monotonic()`` (one clock for every process
of the machine) as it sends it.

One **change** = the joiner announces a new node (it joins the first cluster), then leaves again
(the reflector withdraws it at once: a second change). A change affects only some agents (in the
gateway shape, not the internal nodes of the joiner's cluster). The driver computes which, with
the real planner (:func:`planned_change`: ``plan`` before and after the join, once per planner
viewer class, with the gateway roles the reflector reports in GetStatus), and tells each worker
its affected agents after bring-up (``expect``). A worker reports one ``applied`` line per change
version when all its affected agents applied it, and reports an error when an agent it was not
told about receives a delta: so the driver's computation and what the reflector sends are checked
against each other in every run. Fan-out time = the last affected agent's Applied stamp - the
moment the joiner opened its stream (join) or cancelled it (leave). Reflector CPU per change
comes from /proc/PID/stat around each change, memory per agent from VmRSS before the agents and
after they all synced.

**Baseline**, same run and same client code: a bare grpc.aio server (``bare-server`` below) that
answers each stream's Announce with END_OF_SNAPSHOT and, on a trigger RPC, writes to each affected
agent the serialized Delta bytes the planner computes for it (the same agents, the same bytes; no
planning, no per-node diff or encoding in the server). Ratios: baseline / ours for times, CPU and
memory (higher is better, 1.0 = as cheap as pushing bytes).

Feasibility is measured, not assumed: the agents of one N must all be synced within ``--budget``
seconds; if not, that N is reported as not feasible for that shape with how far the bring-up got,
and larger N of the same shape are not attempted (bring-up cost only grows with N).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tools.bench import common as bc

_log = logging.getLogger(__name__)
NAME = "control"
HELP = ("time from a node join/leave to the last of N simulated agents reporting it applied, reflector CPU and "
        "memory per agent, vs a bare grpc.aio server pushing the same bytes")  # fmt: skip

KEEPALIVE_S = 30.0
#: Pause before each fabric change: longer than the reflector's longest coalescing window
#: (fabric.control.reflector.DEFAULT_MAX_COALESCE_WINDOW_S), so every change is a lone change.
QUIET_S = 1.2
BARE_STREAM = "/kft.bench.Bare/Stream"
BARE_BROADCAST = "/kft.bench.Bare/Broadcast"


def agent_channel_options() -> list[tuple[str, Any]]:
    """What real agents use (fabric.control.client), plus a connection of its own per agent (no
    shared subchannel), as agents on separate nodes have."""
    from fabric.control import client

    return [*client.CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


CHANGE_TIMEOUT_S = 300.0


def requires(opts: bc.Options) -> list[str]:
    return bc.need_control_stubs()


# -- who the agents are ----------------------------------------------------------------------

#: Nodes per cluster of the gateway shape (fewer when N < 2 * CLUSTER_SIZE: at least 2 clusters).
CLUSTER_SIZE = 100
#: Gateway candidates per cluster of the gateway shape (its first nodes).
GATEWAY_CANDIDATES = 3
#: Underlay addresses per gateway-shape cluster (its node subnet): room for CLUSTER_SIZE nodes and
#: the joiner, aligned, so a cluster's vx-local addresses collapse into a few routes as in life.
UNDERLAY_BLOCK = 128
#: Without ``--shape``, P2P runs only up to this N (its state grows with N^2).
P2P_DEFAULT_MAX_N = 1000
#: The joiner's index: above any N this benchmark runs.
JOINER = 60_000


def shapes_for(opts: bc.Options, n: int) -> tuple[str, ...]:
    """The shapes to run at ``n``: ``--shape`` if given, else p2p up to P2P_DEFAULT_MAX_N and gateway."""
    if opts.shapes:
        return opts.shapes
    return ("p2p", "gateway") if n <= P2P_DEFAULT_MAX_N else ("gateway",)


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
    """

    kind: str
    n: int

    def __post_init__(self) -> None:
        if self.kind not in bc.CONTROL_SHAPES:
            raise ValueError(f"unknown shape {self.kind!r} (known: {', '.join(bc.CONTROL_SHAPES)})")
        if not 1 <= self.n < JOINER:
            raise ValueError(f"N={self.n}: the control benchmark simulates 1 to {JOINER - 1} agents")
        if self.kind == "gateway" and self.clusters * UNDERLAY_BLOCK > 65536:
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
        if self.kind == "gateway" and i == JOINER:
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
    ``planner.elect`` gives with every agent connected (the bare baseline has no reflector). The
    roles after the join and after the leave are elected from those, as the reflector does.

    Cost: the planner plans every node of one viewer class alike (``planner.viewer_class``: the
    class is everything a node's view of the others depends on), so the delta is computed once
    per class with ``plan`` (O(classes * plan size), a few per cluster) instead of once per node
    (O(N * plan size), which is O(N^2) in the p2p shape). A node whose class changes with the
    join is computed on its own. Workers check the result against what the reflector sends.
    """
    from fabric import types
    from fabric.control import planner

    config = shape.fabric_config()
    anns = [shape.announcement(i) for i in range(shape.n)]
    joiner = shape.announcement(JOINER)
    keys = {a.key for a in anns}

    def topo(nodes: list[Any], rs: Sequence[Any]) -> Any:
        return types.Topology(config, tuple(sorted(nodes, key=lambda a: a.key)), tuple(sorted(rs)))

    before = topo(anns, ())
    before = before.with_roles(planner.elect(before, keys, {}) if roles is None else roles)
    after = topo([*anns, joiner], before.roles)
    after = after.with_roles(planner.elect(after, keys | {joiner.key}, {}))
    left = topo(anns, after.roles)
    left = left.with_roles(planner.elect(left, keys, {}))
    # A leave that restores the roles restores the topology (the usual case): its plans are known.
    stages = (before, after) if left == before else (before, after, left)
    # One topology at a time: the planner caches the view of the last topology it planned.
    classes = [[planner.viewer_class(t, a.key) for a in anns] for t in stages]
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


# -- the worker: light agents ----------------------------------------------------------------


class AgentError(Exception):
    """A simulated agent saw something the protocol forbids (or its stream failed)."""


class NotAdmitted(AgentError):
    """The stream failed before the snapshot arrived: like the real AgentSession, retry later.

    Seen when the reflector's event loop is too busy to pick up new streams: gRPC core cancels
    an RPC the application has not accepted within 30 s (server_max_unrequested_time_in_server).
    """


class _Worker:
    """N light agents in one asyncio process, reporting to the driver through stdout.

    Events (JSON lines): ``ready`` once every agent has its snapshot, ``progress`` every 2 s
    until then, ``expecting`` when the driver's ``expect`` command is in force, then one
    ``applied`` per change version when all the agents the change affects applied it (``n``
    agents, ``t`` the last stamp), ``error`` on any protocol violation.
    """

    def __init__(self, shape: Shape, target: str, mode: str, first: int, count: int) -> None:
        from fabric.control.generated import fabric_pb2 as pb

        self.pb = pb
        self.shape = shape
        self.target = target
        self.mode = mode
        self.indexes = list(range(first, first + count))
        self.count = count
        self.ready = 0
        #: The agents each change affects (set by the driver's ``expect``; None: not yet).
        self.expected: frozenset[int] | None = None
        #: Deltas up to this version belong to the bring-up and are not counted.
        self.after = 0
        self.applied: dict[int, list[float]] = {}  # version -> [agents, last stamp]
        self.outboxes: list[asyncio.Queue[Any]] = []
        self.calls: dict[int, Any] = {}
        self.channels: list[Any] = []
        #: Version of the last END_OF_SNAPSHOT any agent of this worker received (the joiner's).
        self.last_eos = -1
        #: Agents whose stream we cancel on purpose (the joiner leaving).
        self.leaving: set[int] = set()
        #: Streams that failed before their snapshot and were retried.
        self.retries = 0

    def emit(self, **ev: Any) -> None:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

    def _stream(self, channel: Any, requests: AsyncIterator[Any]) -> Any:
        pb = self.pb
        if self.mode == "bare":
            method = channel.stream_stream(
                BARE_STREAM,
                request_serializer=pb.SyncNodeRequest.SerializeToString,
                response_deserializer=pb.SyncNodeResponse.FromString,
            )
            return method(requests)
        from fabric.control.generated import fabric_pb2_grpc as pb_grpc

        return pb_grpc.FabricStub(channel).SyncNode(requests)

    async def agent(self, i: int, channel: Any, on_ready: asyncio.Future[float] | None = None) -> None:
        """One agent's session until the stream ends; raises AgentError on any violation."""
        import grpc

        from fabric.control import client, codec

        pb = self.pb
        ann = self.shape.announcement(i)
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.outboxes.append(outbox)

        async def requests() -> AsyncIterator[Any]:
            yield pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(ann)))
            yield pb.SyncNodeRequest(keepalive=codec.keepalive_message(KEEPALIVE_S))
            while True:
                msg = await outbox.get()
                if msg is None:
                    return
                yield msg

        call = self._stream(channel, requests())
        self.calls[i] = call
        # The agents' own protocol rules (fabric.control.client.SyncStream), plus: every removal
        # names an entry held. The bare server sends no snapshot (its agents hold nothing to remove).
        stream = client.SyncStream(f"agent {ann.key}", removals_must_exist=self.mode != "bare")
        try:
            async for msg in call:
                try:
                    ev = stream.feed(msg)
                except client.ProtocolViolation as e:
                    raise AgentError(str(e)) from e
                if isinstance(ev, client.Synced):
                    version = ev.version
                    self.last_eos = version
                    outbox.put_nowait(pb.SyncNodeRequest(applied=pb.Applied(version=version)))
                    if on_ready is not None and not on_ready.done():
                        on_ready.set_result(time.monotonic())
                    self.ready += 1
                    if self.ready == self.count and on_ready is None:
                        self.emit(ev="ready", n=self.count, retries=self.retries)
                elif isinstance(ev, client.Changed):
                    outbox.put_nowait(pb.SyncNodeRequest(applied=pb.Applied(version=ev.version)))
                    self._applied(i, ev.version, time.monotonic())
                elif isinstance(ev, client.Refused):
                    raise AgentError(f"agent {ann.key} rejected: {ev.reason}")
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and i in self.leaving:
                return
            if not stream.synced:
                raise NotAdmitted(f"agent {ann.key}: {e.code().name}: {e.details()}") from e
            raise AgentError(f"agent {ann.key}: stream failed: {e.code().name}: {e.details()}") from e
        finally:
            self.calls.pop(i, None)

    async def agent_with_retries(self, i: int, channel: Any) -> None:
        """:meth:`agent`, retried with a jittered exponential backoff (0.2 s .. 5 s) while it was
        not admitted, as fabric.control.client.AgentSession does (the same fabric.backoff)."""
        from fabric.backoff import Backoff

        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                await self.agent(i, channel)
                return
            except NotAdmitted:
                self.retries += 1
                await asyncio.sleep(backoff.next())

    def _applied(self, i: int, version: int, stamp: float) -> None:
        """Count agent ``i``'s Applied of a change version; one line when the last affected agent
        of this worker applied it. A delta to an agent the change does not affect means the
        driver's planner computation and the server disagree: an error, never a silent count."""
        expected = self.expected
        if expected is None or version <= self.after:
            return
        if i not in expected:
            raise AgentError(
                f"agent {self.shape.announcement(i).key} received delta {version}, but the planner says the change "
                "does not affect it (the benchmark's affected set and the server disagree)"
            )
        slot = self.applied.setdefault(version, [0, 0.0])
        slot[0] += 1
        slot[1] = max(slot[1], stamp)
        if slot[0] == len(expected):
            self.emit(ev="applied", v=version, n=len(expected), t=slot[1])
        elif slot[0] > len(expected):
            raise AgentError(f"version {version} applied {slot[0]} times by {len(expected)} affected agents")

    def command(self, line: str) -> None:
        """A driver command other than ``quit``: ``expect AFTER I,J,..`` (or ``-`` for none)."""
        word, _, rest = line.partition(" ")
        if word != "expect":
            raise AgentError(f"unknown driver command {line[:80]!r}")
        after, _, agents = rest.partition(" ")
        self.after = int(after)
        self.expected = frozenset(int(x) for x in agents.split(",") if x not in ("", "-"))
        self.applied.clear()
        self.emit(ev="expecting", n=len(self.expected))

    async def keepalives(self) -> None:
        from fabric.control import codec

        while True:
            await asyncio.sleep(KEEPALIVE_S)
            for q in self.outboxes:
                q.put_nowait(self.pb.SyncNodeRequest(keepalive=codec.keepalive_message(KEEPALIVE_S)))

    async def progress(self) -> None:
        while self.ready < self.count:
            await asyncio.sleep(2.0)
            self.emit(ev="progress", ready=self.ready, retries=self.retries)

    async def run_agents(self) -> None:
        import grpc

        agents: dict[asyncio.Task[None], int] = {}
        for i in self.indexes:
            channel = grpc.aio.insecure_channel(self.target, options=agent_channel_options())
            self.channels.append(channel)
            agents[asyncio.create_task(self.agent_with_retries(i, channel))] = i
        helpers = [asyncio.create_task(self.keepalives()), asyncio.create_task(self.progress())]
        commands = asyncio.create_task(_read_commands(self.command))
        try:
            done, _ = await asyncio.wait([*agents, commands], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is commands:
                    t.result()  # raises AgentError for a bad driver command
                    continue
                t.result()  # raises the agent's AgentError
                raise AgentError(f"agent {self.shape.announcement(agents[t]).key}: the server ended its stream")
        finally:
            for t in [*agents, *helpers, commands]:
                t.cancel()
            for ch in self.channels:
                await ch.close(grace=None)

    async def run_joiner(self) -> None:
        """One agent that joins on ``join`` and leaves on ``leave`` (stdin commands)."""
        import grpc

        i = self.indexes[0]
        channel = grpc.aio.insecure_channel(self.target, options=agent_channel_options())
        await channel.channel_ready()
        task: asyncio.Task[None] | None = None
        lines = _stdin_lines()
        try:
            async for line in lines:
                if line == "join":
                    self.leaving.discard(i)
                    ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                    self.outboxes.clear()
                    t0 = time.monotonic()
                    task = asyncio.create_task(self.agent(i, channel, ready))
                    await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
                    if not ready.done():
                        task.result()  # raises the agent's error
                        raise AgentError("the joining agent's stream ended before END_OF_SNAPSHOT")
                    self.emit(ev="joined", t0=t0, v=self.last_eos)
                elif line == "leave":
                    self.leaving.add(i)
                    t0 = time.monotonic()
                    call = self.calls.get(i)
                    if call is not None:
                        call.cancel()
                    if task is not None:
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                    self.emit(ev="left", t0=t0)
                elif line == "quit":
                    return
        finally:
            if task is not None:
                task.cancel()
            await channel.close(grace=None)


async def _stdin_lines() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 22)  # ``expect`` lists thousands of agents
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        raw = await reader.readline()
        if not raw:
            return
        yield raw.decode().strip()


async def _read_commands(handle: Callable[[str], None] | None = None) -> None:
    """Returns when the driver says ``quit`` or closes our stdin; other lines go to ``handle``."""
    async for line in _stdin_lines():
        if line == "quit":
            return
        if line and handle is not None:
            handle(line)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def worker_main(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    w = _Worker(Shape(args.shape, args.n), args.target, args.mode, args.first, args.count)
    try:
        asyncio.run(w.run_joiner() if args.joiner else w.run_agents())
    except AgentError as e:
        w.emit(ev="error", msg=str(e))
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# -- the baseline server ---------------------------------------------------------------------


def broadcast_request(groups: Sequence[tuple[Sequence[int], bytes]]) -> bytes:
    """The baseline's trigger: per group of agent indexes, the message bytes to write to each."""
    return json.dumps([[list(idx), base64.b64encode(payload).decode()] for idx, payload in groups]).encode()


async def _bare_serve(listen: str) -> None:
    """A bare grpc.aio server: EOS to every stream's first message, bytes pushed on demand to the
    streams of the agents a Broadcast names (each stream is known by its Announce's node name)."""
    import grpc

    from fabric.control.generated import fabric_pb2 as pb

    eos = pb.SyncNodeResponse(end_of_snapshot=pb.EndOfSnapshot(version=0, epoch="bare")).SerializeToString()
    streams: dict[int, asyncio.Queue[bytes | None]] = {}

    async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        first = await anext(requests)
        if not first:
            return
        agent = agent_index(pb.SyncNodeRequest.FromString(first).announce.node.name)
        streams[agent] = q

        async def drain() -> None:
            async for _ in requests:  # Keepalive and Applied: read and dropped, as bytes
                pass

        reader = asyncio.create_task(drain())
        try:
            yield eos
            while True:
                item = await q.get()
                if item is None:
                    return
                yield item
        finally:
            reader.cancel()
            if streams.get(agent) is q:
                del streams[agent]

    async def broadcast(request: bytes, context: Any) -> bytes:
        sent = 0
        for idx, payload in json.loads(request):
            data = base64.b64decode(payload)
            for i in idx:
                q = streams.get(i)
                if q is not None:
                    q.put_nowait(data)
                    sent += 1
        return str(sent).encode()

    handler = grpc.method_handlers_generic_handler(
        "kft.bench.Bare",
        {
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
            "Broadcast": grpc.unary_unary_rpc_method_handler(broadcast),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(listen)
    await server.start()
    print(json.dumps({"ev": "listening"}), flush=True)
    await _read_commands()
    await server.stop(0.5)


def bare_server_main(args: argparse.Namespace) -> int:
    _raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_bare_serve(args.listen))
    return 0


# -- the driver ------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class _Events:
    """JSON-line events of every child, merged into one queue by reader threads."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def attach(self, who: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        stream = proc.stdout

        def read() -> None:
            for raw in stream:
                try:
                    self.q.put((who, json.loads(raw)))
                except ValueError:
                    self.q.put((who, {"ev": "error", "msg": f"unparsable line {raw[:200]!r}"}))
            self.q.put((who, {"ev": "exit"}))

        threading.Thread(target=read, name=f"events-{who}", daemon=True).start()

    def next(self, deadline: float) -> tuple[str, dict[str, Any]] | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return self.q.get(timeout=left)
        except queue.Empty:
            return None


class Infeasible(Exception):
    """This N cannot be measured within the budget (the text says how far it got)."""


@dataclasses.dataclass
class Phase:
    """One server kind at one shape and N: bring-up, memory, and per change times and CPU."""

    bringup_s: float = 0.0
    #: Agent streams cancelled before admission during bring-up and retried.
    retries: int = 0
    rss_per_agent_kib: float = 0.0
    #: Agents whose plan each change changes (the ones fan-out waits for).
    affected: int = 0
    #: Seconds from the last snapshot until every agent applied the bring-up's deltas (fabric).
    settle_s: float = 0.0
    join_ms: list[list[float]] = dataclasses.field(default_factory=list)  # per round
    leave_ms: list[list[float]] = dataclasses.field(default_factory=list)
    cpu_ms: list[float] = dataclasses.field(default_factory=list)  # per change, averaged per round


class _Run:
    """One phase: a server (reflector or bare), workers, optionally the joiner."""

    def __init__(self, procs: bc.Procs, mode: str, shape: Shape, tmp: Path, budget_s: float) -> None:
        self.procs, self.mode, self.shape, self.tmp, self.budget_s = procs, mode, shape, tmp, budget_s
        self.n = shape.n
        self.events = _Events()
        self.sock = f"unix:{tmp}/{mode}.sock"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.firsts: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.retries = 0
        #: Agents each change affects, in total (what wait_applied waits for); set by arm().
        self.expected = 0
        self.pending: dict[int, dict[str, Any]] = {}  # version -> {"n": agents, "t": last stamp}
        self.server: subprocess.Popen[bytes] | None = None
        self.joiner: subprocess.Popen[bytes] | None = None
        self.log = open(tmp / "reflector.log", "wb")  # noqa: SIM115 - closed by stop()

    def _py(self, *args: str, stdout: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
        return self.procs.spawn(None, [sys.executable, "-m", *args], stdout=stdout, stdin=subprocess.PIPE,
                                stderr=None)  # fmt: skip

    def _worker_argv(self, first: int, count: int) -> list[str]:
        return ["tools.bench.control", "worker", "--target", self.sock, "--mode", self.mode, "--shape",
                self.shape.kind, "--n", str(self.n), "--first", str(first), "--count", str(count)]  # fmt: skip

    def _wait(self, want: str, deadline: float, who: str | None = None) -> dict[str, Any]:
        while True:
            item = self.events.next(deadline)
            if item is None:
                raise TimeoutError(f"no {want!r} event in time")
            src, ev = item
            self._note(src, ev)
            if ev["ev"] == want and (who is None or src == who):
                return ev

    def _note(self, src: str, ev: dict[str, Any]) -> None:
        if ev["ev"] == "error":
            raise RuntimeError(f"control benchmark: {src}: {ev['msg']}{self.log_tail()}")
        if ev["ev"] == "exit" and src != "server":
            raise RuntimeError(f"control benchmark: {src} exited unexpectedly{self.log_tail()}")
        if ev["ev"] == "applied":
            slot = self.pending.setdefault(int(ev["v"]), {"n": 0, "t": 0.0})
            slot["n"] += int(ev["n"])
            slot["t"] = max(slot["t"], float(ev["t"]))

    def log_tail(self, lines: int = 15) -> str:
        """The end of the reflector's log, to explain a failure (it is deleted with the run)."""
        if self.mode != "fabric":
            return ""
        self.log.flush()
        tail = Path(self.log.name).read_text(errors="replace").splitlines()[-lines:]
        return "\nreflector log (last lines):\n  " + "\n  ".join(tail)

    def start_server(self) -> None:
        if self.mode == "fabric":
            cfg = self.tmp / "fabric.yaml"
            cfg.write_text(yaml.safe_dump(self.shape.config_doc(), sort_keys=False))
            self.server = self.procs.spawn(None, [
                sys.executable, "-m", "fabric.control.reflector", "--config", str(cfg), "--listen", self.sock,
                "--grace-period", "0", "--startup-hold", "0", "--keepalive-interval", f"{KEEPALIVE_S:g}",
                "--log-level", "info",
            ], stderr=self.log)  # fmt: skip
            from fabric.control import client

            deadline = time.monotonic() + 30
            while True:
                try:
                    client.get_status_sync(self.sock, 1.0)
                    return
                except client.ReflectorUnavailable:
                    if time.monotonic() > deadline or self.server.poll() is not None:
                        raise RuntimeError(f"fabric-reflector did not start{self.log_tail()}") from None
                    time.sleep(0.1)
        self.server = self._py("tools.bench.control", "bare-server", "--listen", self.sock)
        self.events.attach("server", self.server)
        self._wait("listening", time.monotonic() + 30, "server")

    def bring_up(self) -> float:
        workers = 1 if self.n <= 50 else 2 if self.n <= 500 else 4
        t0 = time.monotonic()
        first = 0
        for w in range(workers):
            count = self.n // workers + (1 if w < self.n % workers else 0)
            name = f"worker{w}"
            proc = self._py(*self._worker_argv(first, count))
            self.workers[name] = proc
            self.firsts[name] = first
            self.counts[name] = count
            self.events.attach(name, proc)
            first += count
        deadline = t0 + self.budget_s
        ready: set[str] = set()
        progress: dict[str, int] = {}
        last_report = t0
        what = f"{self.shape.label} {self.mode}"
        while len(ready) < len(self.workers):
            item = self.events.next(min(deadline, time.monotonic() + 10))
            now = time.monotonic()
            if item is None and now >= deadline:
                got = sum(self.counts[w] if w in ready else progress.get(w, 0) for w in self.workers)
                raise Infeasible(
                    f"bringing up {self.n} agents ({self.shape.kind} shape) on the {self.mode} server did not finish "
                    f"within the {self.budget_s:g}s budget: about {got} of {self.n} agents had their snapshot"
                )
            if item is not None:
                src, ev = item
                self._note(src, ev)
                if ev["ev"] == "ready":
                    ready.add(src)
                    progress[src] = self.counts[src]
                    self.retries += int(ev.get("retries", 0))
                elif ev["ev"] == "progress":
                    progress[src] = int(ev["ready"])
            if now - last_report >= 10:
                total = sum(progress.values())
                bc.progress(NAME, f"{what}: {total:,}/{self.n:,} agents synced after {now - t0:.0f}s")
                last_report = now
        return time.monotonic() - t0

    def arm(self, affected: frozenset[int], after: int) -> None:
        """Tell every worker which of its agents each change affects (deltas of versions above
        ``after``) and wait until all have it in force."""
        for name, proc in self.workers.items():
            mine = [i for i in range(self.firsts[name], self.firsts[name] + self.counts[name]) if i in affected]
            self.send(proc, f"expect {after} {','.join(map(str, mine)) or '-'}")
        armed: set[str] = set()
        deadline = time.monotonic() + 60
        while len(armed) < len(self.workers):
            item = self.events.next(deadline)
            if item is None:
                raise RuntimeError(f"workers {sorted(set(self.workers) - armed)} did not confirm 'expect'")
            self._note(*item)
            if item[1]["ev"] == "expecting":
                armed.add(item[0])
        self.expected = len(affected)
        self.pending.clear()

    def wait_applied(self, version: int, what: str) -> float:
        deadline = time.monotonic() + CHANGE_TIMEOUT_S
        while self.pending.get(version, {}).get("n", 0) < self.expected:
            item = self.events.next(deadline)
            if item is None:
                got = self.pending.get(version, {}).get("n", 0)
                raise Infeasible(f"{what} ({self.shape.label}): only {got} of the {self.expected} affected agents "
                                 f"applied version {version} within {CHANGE_TIMEOUT_S:g}s")  # fmt: skip
            self._note(*item)
        return float(self.pending.pop(version)["t"])

    def send(self, proc: subprocess.Popen[bytes], line: str) -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()

    def stop(self) -> None:
        everyone = [p for p in (*self.workers.values(), self.joiner, self.server) if p is not None]
        for proc in everyone:
            if proc.stdin is not None:
                self.send(proc, "quit")
        for proc in everyone:
            self.procs.stop(proc, timeout_s=10.0)
        self.log.close()

    # -- changes --

    @property
    def server_pid(self) -> int:
        assert self.server is not None, "the server is started first"
        return self.server.pid

    def server_cpu_ms(self) -> float:
        return _cpu_s(self.server_pid) * 1000

    def fabric_change(self) -> tuple[float, float]:
        """Join then leave (two changes); returns (join ms, leave ms). Each change comes after a
        quiet period longer than the reflector's longest coalescing window, so each is timed as
        a lone change (a change during a storm of changes waits up to that window by design)."""
        if self.joiner is None:
            argv = self._worker_argv(JOINER, 1)
            self.joiner = self._py(*argv, "--joiner")
            self.events.attach("joiner", self.joiner)
        time.sleep(QUIET_S)
        self.send(self.joiner, "join")
        ev = self._wait("joined", time.monotonic() + CHANGE_TIMEOUT_S, "joiner")
        version = int(ev["v"])
        join_ms = (self.wait_applied(version, "join") - float(ev["t0"])) * 1000
        time.sleep(QUIET_S)
        self.send(self.joiner, "leave")
        ev = self._wait("left", time.monotonic() + CHANGE_TIMEOUT_S, "joiner")
        leave_ms = (self.wait_applied(version + 1, "leave") - float(ev["t0"])) * 1000
        return join_ms, leave_ms

    def bare_change(self, channel: Any, change: Change, version: int) -> float:
        """One push of the join's Delta bytes to the affected agents; returns ms to the last Applied."""
        request = broadcast_request(change.delta_bytes(version))
        broadcast = channel.unary_unary(BARE_BROADCAST)
        t0 = time.monotonic()
        sent = int(broadcast(request, timeout=CHANGE_TIMEOUT_S))
        if sent != self.expected:
            raise RuntimeError(f"the bare server had streams for {sent} of the {self.expected} affected agents")
        return (self.wait_applied(version, "broadcast") - t0) * 1000


def _settle(sock: str, n: int, what: str, timeout_s: float) -> tuple[float, int, tuple[Any, ...]]:
    """Wait until every agent applied its latest plan (GetStatus: all N connected and in sync):
    the deltas of the bring-up (each join goes to every synced agent) may still be queued behind
    the last snapshot, and a change measured before they drain would time the backlog. Returns
    the seconds it took, the topology generation and the gateway roles (GetStatus)."""
    from fabric import types
    from fabric.control import client

    t0 = time.monotonic()
    last_report = t0
    while True:
        status = client.get_status_sync(sock, 60.0)
        nodes = status.nodes()
        behind = sum(1 for x in nodes if not x.in_sync)
        now = time.monotonic()
        if len(nodes) == n and not behind:
            break
        if now - t0 > timeout_s:
            raise Infeasible(f"{what}: {behind} of {len(nodes)} agents still behind their plan {timeout_s:g}s "
                             "after bring-up")  # fmt: skip
        if now - last_report >= 10:
            bc.progress(NAME, f"{what}: waiting for {behind:,} agents to apply the bring-up's deltas")
            last_report = now
        time.sleep(1.0)
    roles = tuple(
        types.GatewayRole(c.name, c.active_gateway, c.standby_gateway) for c in status.clusters if c.active_gateway
    )
    return time.monotonic() - t0, status.generation, roles


def _phase(mode: str, shape: Shape, rounds: int, changes: int, budget_s: float) -> Phase:
    import grpc

    out = Phase()
    n = shape.n
    what = f"{shape.label} {mode}"
    with tempfile.TemporaryDirectory(prefix="kft-ctl-") as tmp, bc.procs() as procs:
        run = _Run(procs, mode, shape, Path(tmp), budget_s)
        try:
            run.start_server()
            time.sleep(0.3)
            rss0 = _rss_kib(run.server_pid)
            bc.progress(NAME, f"{what}: bringing up {n:,} agents (budget {budget_s:g}s)")
            out.bringup_s = run.bring_up()
            out.retries = run.retries
            if mode == "fabric":
                out.settle_s, generation, roles = _settle(run.sock, n, what, budget_s)
                change = planned_change(shape, roles)
            else:
                generation, change = 0, planned_change(shape)
            time.sleep(1.0)  # let the last Applied/keepalives settle before reading memory
            out.rss_per_agent_kib = (_rss_kib(run.server_pid) - rss0) / n
            out.affected = len(change.affected)
            run.arm(change.affected, generation)
            bc.progress(NAME, f"{what}: {n:,} agents synced in {out.bringup_s:.1f}s (all in sync "
                        f"{out.settle_s:.1f}s later); a change affects {out.affected:,} of them; "
                        f"{rounds} rounds of {changes} changes")  # fmt: skip
            with grpc.insecure_channel(run.sock) as channel:
                version = 0
                for _ in range(rounds):
                    joins: list[float] = []
                    leaves: list[float] = []
                    cpu0 = run.server_cpu_ms()
                    for _ in range(changes):
                        if mode == "fabric":
                            j, lv = run.fabric_change()
                            leaves.append(lv)
                        else:
                            version += 1
                            j = run.bare_change(channel, change, version)
                        joins.append(j)
                    # CPU per change over the whole round: clock-tick resolution (10 ms) needs many changes.
                    out.cpu_ms.append((run.server_cpu_ms() - cpu0) / (changes * (2 if leaves else 1)))
                    out.join_ms.append(joins)
                    if leaves:
                        out.leave_ms.append(leaves)
                    bc.progress(NAME, f"{what}: fan-out ms, joins {' '.join(f'{x:.0f}' for x in joins)}"
                                + (f"; leaves {' '.join(f'{x:.0f}' for x in leaves)}" if leaves else ""))  # fmt: skip
        except RuntimeError:
            if mode == "fabric":
                run.log.flush()
                kept = Path(tempfile.gettempdir()) / f"kft-bench-control-{os.getpid()}-{shape.kind}-n{n}.log"
                shutil.copyfile(run.log.name, kept)
                bc.progress(NAME, f"{what}: failed; the reflector's log is kept in {kept}")
            raise
        finally:
            run.stop()
    return out


def run(opts: bc.Options) -> bc.Report:
    rounds = opts.repeat
    report = bc.Report()
    infeasible_from: dict[str, int] = {}  # shape -> the first N that did not complete
    for n in opts.n:
        for kind in shapes_for(opts, n):
            try:
                shape = Shape(kind, n)
            except ValueError as e:
                report.notes.append(f"{kind} N={n:,}: not run: {e}")
                continue
            if kind in infeasible_from:
                report.notes.append(f"{shape.label}: not attempted, N={infeasible_from[kind]:,} of this shape already "
                                    "did not complete (bring-up only gets slower with N)")  # fmt: skip
                continue
            changes = 2 if opts.tiny else 10 if n <= 300 else 5
            try:
                bare = _phase("bare", shape, rounds, changes, opts.budget_s)
                ours = _phase("fabric", shape, rounds, changes, opts.budget_s)
            except Infeasible as e:
                report.notes.append(f"{shape.label}: NOT FEASIBLE on this machine: {e}")
                infeasible_from[kind] = n
                continue
            except RuntimeError as e:  # a protocol violation or a broken stream: a finding, reported
                first_line = str(e).splitlines()[0]
                report.notes.append(f"{shape.label}: FAILED: {first_line}")
                bc.progress(NAME, f"{shape.label}: FAILED: {e}")
                infeasible_from[kind] = n
                continue
            _figures(report, shape, ours, bare)
            report.notes.append(_shape_note(shape, ours))
            for phase, what in ((ours, "fabric-reflector"), (bare, "bare server")):
                if phase.retries:
                    report.notes.append(
                        f"{shape.label}: during bring-up, {phase.retries} agent streams to the {what} were cancelled "
                        "before admission (gRPC cancels a stream the server's busy event loop has not accepted within "
                        "30 s) and were retried with backoff, as real agents do"
                    )
    report.notes.append(
        "fanout = ms from the change (joiner opens/cancels its stream; baseline: trigger RPC) to the last affected "
        "agent sending Applied (affected = its plan changes, by the planner; checked against the deltas the "
        "reflector sends); p50/p99 over the changes of a round, then median/min/max over rounds (p99 of fewer than "
        "100 changes is their maximum). Leave figures share the join's baseline (the same bytes to the same agents). "
        "cpu_per_agent = per affected agent. Figures without a shape in their name are the p2p shape (two P2P "
        f"clusters); gateway = gateway-mode clusters of {CLUSTER_SIZE} nodes, {GATEWAY_CANDIDATES} candidates "
        f"each. Reflector keepalive {KEEPALIVE_S:g}s; every agent has its own connection (unix socket)."
    )
    return report


def _shape_note(shape: Shape, ours: Phase) -> str:
    if shape.kind == "p2p":
        layout = "2 P2P clusters"
    else:
        layout = f"{shape.clusters} gateway-mode clusters of up to {-(-shape.n // shape.clusters)} nodes"
    return (
        f"{shape.label}: {layout}; a join or leave changes the plans of {ours.affected:,} of the {shape.n:,} "
        f"agents; after bring-up, the reflector needed {ours.settle_s:.1f}s more until every agent had applied the "
        "bring-up's deltas (changes are measured from then on)"
    )


def _figures(report: bc.Report, shape: Shape, ours: Phase, bare: Phase) -> None:
    def per_round(rounds: list[list[float]], p: float) -> list[float]:
        return [bc.percentile(r, p) for r in rounds]

    sfx = shape.suffix
    for p in (50, 99):
        report.figures[f"join_fanout_p{p}{sfx}"] = bc.figure(
            per_round(ours.join_ms, p), {"": per_round(bare.join_ms, p)}, higher_is_better=False
        )
        report.figures[f"leave_fanout_p{p}{sfx}"] = bc.figure(
            per_round(ours.leave_ms, p), {"": per_round(bare.join_ms, p)}, higher_is_better=False
        )
        report.units[f"join_fanout_p{p}{sfx}"] = report.units[f"leave_fanout_p{p}{sfx}"] = "ms"
    report.figures[f"server_cpu_per_change{sfx}"] = bc.figure(ours.cpu_ms, {"": bare.cpu_ms}, higher_is_better=False)
    report.units[f"server_cpu_per_change{sfx}"] = "ms"

    def per_agent(phase: Phase) -> list[float]:
        return [c * 1000 / max(1, phase.affected) for c in phase.cpu_ms]

    report.figures[f"server_cpu_per_agent_per_change{sfx}"] = bc.figure(
        per_agent(ours), {"": per_agent(bare)}, higher_is_better=False
    )
    report.units[f"server_cpu_per_agent_per_change{sfx}"] = "µs"
    report.figures[f"server_rss_per_agent{sfx}"] = bc.figure(
        [ours.rss_per_agent_kib], {"": [bare.rss_per_agent_kib]}, higher_is_better=False
    )
    report.units[f"server_rss_per_agent{sfx}"] = "KiB"
    report.figures[f"bringup{sfx}"] = bc.figure([ours.bringup_s], {"": [bare.bringup_s]}, higher_is_better=False)
    report.units[f"bringup{sfx}"] = "s"


# -- entry point of the helper processes -----------------------------------------------------


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.control", description="helper processes of bench control")
    sub = p.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker", help="light agents (or the joiner) for the control benchmark")
    w.add_argument("--target", required=True)
    w.add_argument("--mode", choices=("fabric", "bare"), required=True)
    w.add_argument("--shape", choices=bc.CONTROL_SHAPES, required=True)
    w.add_argument("--n", type=int, required=True, help="agents of the shape (the joiner's index is above)")
    w.add_argument("--first", type=int, required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--joiner", action="store_true")
    s = sub.add_parser("bare-server", help="the baseline: a bare grpc.aio server")
    s.add_argument("--listen", required=True)
    args = p.parse_args(list(argv))
    return worker_main(args) if args.role == "worker" else bare_server_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
