"""fabric-relay: the relay tier between agents and fabric-reflector (issue 21, "past one process";
Calico's Typha plays this part for Felix).

Why a relay, and where the saving comes from
--------------------------------------------

Each node's plan differs, so a relay that proxied one upstream stream per agent would only
move the reflector's work around. What is shared is the *messages*: every node of one planner
viewer class gets the same delta, and the reflector already encodes it once
(:mod:`~fabric.control.reflector`, "encode once"). A relay holds the agents' streams (TCP, TLS,
HTTP/2, gRPC flow control, one write per agent per message) and keeps a single ``RelayNodes``
stream to the reflector over which every distinct message crosses once, with the list of the
relay's sessions it is for (:mod:`fabric.control.relay_hub` is the reflector's end). With K
relays and N agents the reflector holds K connections instead of N, does one gRPC write per
distinct message per relay instead of one per agent, and the per-agent writes are spread over K
processes (and machines).

::

    agent --SyncNode (unchanged)--> fabric-relay --RelayNodes--> fabric-reflector
      Announce, Keepalive,            | TLS terminated here:      | one session per agent,
      Applied, PeerReport  --------->  | identity from the agent's | with a direct one's rules
                                       | certificate, keepalives   | (admission, authz, grace,
                                       | checked here              | elections), not its tasks
      <-- bytes, unchanged ----------  | fanout{sessions[], bytes} | each message once per relay

What the relay does per agent, so the reflector does not:

* **TLS termination and identity.** The agent's mutual TLS ends at the relay, which verifies
  its node certificate against the fabric CA (the relay serves with ``--tls-dir``, a server
  certificate, requiring client certificates like the reflector; it shows the reflector its own
  client certificate, ``--upstream-tls-dir``) and passes the *proven* identity upstream with the
  session. An agent cannot claim another node through a relay: the identity comes from the
  handshake, never from anything the agent sends, and the reflector still checks the
  announcement against it (:func:`fabric.control.authz.announcement_refusals`). The reflector
  trusts vouched identities only on a stream whose own certificate is ``relay/<name>``
  (:data:`fabric.control.authz.CALLERS`): a relay's certificate is as powerful as the identities
  it carries, so it is issued to infrastructure only, like the reflector's. Pass-through of the
  agent's TLS to the reflector is not possible here: the point is that the reflector no longer
  holds one TLS session per agent.
* **Admission.** Streams and announcements per identity (or plaintext host) are bounded here with
  the reflector's own gate (:class:`~fabric.control.bounds.StreamGate`, same defaults), and the
  first message must arrive within the hold time; the reflector still admits each announcement.
* **Keepalives.** The relay forwards the reflector's keepalives (they carry the negotiated
  interval; the bytes cross once per relay) and judges the agent's liveness itself: an agent
  silent for 3 negotiated intervals is ended here and its session closed upstream. An agent's
  keepalive goes upstream only when it proposes a new interval (the reflector negotiates);
  the reflector holds no liveness check of its own for the agents a relay carries.
* **Aggregation.** Everything agents send (Announce, Applied, PeerReport) within one event-loop
  turn goes upstream in one ``RelayNodesRequest``.
* **Bounds.** Each agent's send queue is bounded in bytes (``--send-queue-bytes``): an agent that
  falls behind is cut off (RESOURCE_EXHAUSTED) and reconnects to a fresh snapshot.

Failure and fallback (no stale state)
-------------------------------------

* The relay loses its upstream (reflector restarted, network): it ends **every** agent stream at
  once with UNAVAILABLE. Agents keep their dataplane (client contract), reconnect with backoff
  and get a fresh snapshot; nothing they hold is ever half-updated. While it has no upstream the
  relay refuses new SyncNode streams at once with UNAVAILABLE, so agents move on.
* A relay dies: its agents' streams break and they reconnect. Agents need no change to use
  relays: the same SyncNode API at the relay's address. To fall back to another relay or to the
  reflector, give the agent a target that lists several (a Kubernetes Service in front of the
  relays, as Typha's, or gRPC's multi-address ``ipv4:10.0.0.1:7946,10.0.0.2:7946``: pick_first
  takes the next when one is refused or down).
* The reflector ends a session (rejection, replaced, cut off): the relay ends that agent's stream
  with the same status and details.

Compared with Typha: Typha keeps one datastore watch, caches the whole state and serves each
Felix its snapshot from that cache, which works because every Felix reads the same data and
filters it itself. Here each agent's state is its own plan, made by the reflector's planner, so
the relay carries the reflector's messages instead of caching a shared state; what it shares is
each message's bytes and its one trip over the relay stream.

What the relay does not do (yet): serve snapshots to reconnecting agents from its own cache
(a reconnect still asks the reflector, which encodes that node's snapshot), and proxy the
agents' other RPCs (IssueCertificate for renewals, WatchRecords): agents keep those on the
reflector's address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import message as pb_message
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fabric import health, logs
from fabric.backoff import Backoff
from fabric.control import api, authz, bounds, client, identity, quiet_gc, relay_hub, tls
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc
from fabric.control.reflector_service import bind, parse_listen, peer_name, server_options

_log = logging.getLogger(__name__)

DEFAULT_LISTEN = f"0.0.0.0:{api.DEFAULT_RELAY_PORT}"
#: Until the reflector negotiates one: the agents' default interval (client.AgentSession).
DEFAULT_KEEPALIVE_S = 2.0
DEAD_AFTER_INTERVALS = 3
#: How often the relay asks its collector whether a full collection is due (``--gc quiet``).
GC_POLL_S = 0.5
#: Largest RelayNodesRequest the relay writes (the reflector reads up to 4 MiB).
MAX_REQUEST_BYTES = 1024 * 1024
#: Bytes of agents' messages the relay holds for the reflector before it stops reading agents
#: (gRPC flow control then pushes back on them): the upstream buffer's bound.
UP_BUFFER_BYTES = 8 * 1024 * 1024
SWEEP_S = 1.0


class _End:
    """Queued to an agent to end its stream with ``code`` and ``details``."""

    __slots__ = ("code", "details")

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details


class _Agent:
    """One agent's SyncNode stream held by the relay."""

    __slots__ = ("ended", "generation", "interval", "last_rx", "peer", "proposed_ms", "queue", "sid")

    def __init__(self, sid: int, peer: str, limit: int, now: float, generation: int) -> None:
        self.sid = sid
        self.peer = peer
        self.queue: bounds.SendQueue[bytes | _End] = bounds.SendQueue(limit)
        #: The negotiated keepalive interval, from the reflector's keepalives (0: none yet).
        self.interval = 0.0
        self.last_rx = now
        #: The interval the agent last proposed and the relay forwarded.
        self.proposed_ms = -1
        self.ended = False
        #: The upstream stream the session was opened on.
        self.generation = generation


class Relay:
    """The relay: a SyncNode server for agents and one RelayNodes stream to the reflector."""

    def __init__(
        self,
        upstream: str,
        *,
        upstream_tls: tls.TLSDir | None = None,
        limits: bounds.Limits | None = None,
        backoff: tuple[float, float] = (0.2, 5.0),
        clock: Any = time.monotonic,
        gc_policy: quiet_gc.QuietCollector | None = None,
    ) -> None:
        self.upstream = upstream
        self.upstream_tls = upstream_tls
        self.limits = limits or bounds.Limits()
        self.clock = clock
        self.gate = bounds.StreamGate(self.limits, clock)
        self._backoff = Backoff(*backoff)
        self._ids = itertools.count(1)
        self.agents: dict[int, _Agent] = {}
        #: What agents said, with each item's size in the request, for the next upstream batch.
        self._up_items: list[tuple[pb.RelayItem, int]] = []
        self._up_bytes = 0
        self._up_wake = asyncio.Event()
        self._up_room = asyncio.Event()
        self._up_room.set()
        #: Counts upstream streams; a session belongs to the one it was opened on.
        self.generation = 0
        self.up = asyncio.Event()
        self.upstream_reason = "not connected yet"
        self._server: grpc.aio.Server | None = None
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        #: Negotiated intervals of the reflector's keepalive bytes (a few distinct ones).
        self._intervals: dict[bytes, float | None] = {}
        #: Counters (metrics, tests): upstream messages read and agent messages written from
        #: them, upstream streams lost, agents ended by the relay itself.
        self.fanouts_received = 0
        self.deliveries = 0
        self.upstream_losses = 0
        self.agents_ended: dict[str, int] = {}
        #: Full collections at quiet moments (``--gc quiet``), as the reflector runs them: a relay
        #: holds its agents' grpc.aio streams, the objects a full collection walks; None: Python's
        #: own schedule (tests, in-process use).
        self.gc_policy = gc_policy

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, listen: Sequence[str], credentials: grpc.ServerCredentials | None = None) -> list[str]:
        """Serve SyncNode on ``listen`` (mutual TLS with ``credentials``) and connect upstream."""
        server = grpc.aio.server(options=server_options(self.limits))
        handler = grpc.stream_stream_rpc_method_handler(
            self.sync_node, request_deserializer=pb.SyncNodeRequest.FromString, response_serializer=_as_bytes
        )
        issue = grpc.unary_unary_rpc_method_handler(
            _refuse_certificate, request_deserializer=pb.IssueCertificateRequest.FromString,
            response_serializer=pb.IssueCertificateResponse.SerializeToString,
        )  # fmt: skip
        service = pb.DESCRIPTOR.services_by_name["Fabric"].full_name
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"SyncNode": handler, "IssueCertificate": issue}),)
        )
        bound = [bind(server, addr, credentials) for addr in listen]
        await server.start()
        self._server = server
        self._tasks = [asyncio.create_task(self._upstream_loop(), name="relay upstream"),
                       asyncio.create_task(self._sweep(), name="relay keepalive sweep")]  # fmt: skip
        if self.gc_policy is not None:
            self._tasks.append(asyncio.create_task(self._gc_loop(), name="relay quiet collections"))
        _log.info("relay serving on %s, upstream %s", ", ".join(bound), self.upstream)
        return bound

    async def stop(self, grace: float = 0.5) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._end_all(grpc.StatusCode.UNAVAILABLE, "relay stopping")
        if self._server is not None:
            await self._server.stop(grace)

    def quiet(self) -> bool:
        """Nothing in flight through the relay: no agent message waiting to go upstream and every
        agent's queue handed to gRPC. A full collection now delays no delivery."""
        return not self._up_items and all(a.queue.empty() for a in self.agents.values())

    async def _gc_loop(self) -> None:
        assert self.gc_policy is not None
        while True:
            await asyncio.sleep(GC_POLL_S)
            self.gc_policy.poll(self.quiet())

    # -- upstream ----------------------------------------------------------------------------

    async def _upstream_loop(self) -> None:
        """Keep one RelayNodes stream to the reflector; when it ends, end every agent's stream
        (no stale state) and reconnect with backoff."""
        while not self._closing:
            channel = tls.channel(self.upstream, self.upstream_tls, options=client.CHANNEL_OPTIONS)
            reason = "relay stream ended"
            try:
                async with asyncio.timeout(5.0):
                    await channel.channel_ready()
                self.generation += 1
                self._clear_up()
                call = pb_grpc.FabricStub(channel).RelayNodes(self._upstream_requests(self.generation))
                self.upstream_reason = ""
                self.up.set()
                _log.info("relay stream %d to %s open", self.generation, self.upstream)
                async for resp in call:
                    self._backoff.reset()
                    self._dispatch(resp)
                reason = f"reflector ended the relay stream ({(await call.code()).name}: {await call.details()})"
            except TimeoutError:
                reason = f"cannot connect to {self.upstream}"
            except grpc.aio.AioRpcError as e:
                reason = f"relay stream failed ({e.code().name}: {e.details()})"
            finally:
                if self.up.is_set():
                    self.upstream_losses += 1
                self.up.clear()
                self.upstream_reason = reason
                self._clear_up()
                self._end_all(grpc.StatusCode.UNAVAILABLE, f"relay lost its upstream: {reason}; reconnect for a "
                              "fresh snapshot")  # fmt: skip
                await channel.close()
            delay = self._backoff.next()
            _log.warning("%s; reconnecting in %.2fs", reason, delay)
            await asyncio.sleep(delay)

    async def _upstream_requests(self, generation: int) -> AsyncIterator[pb.RelayNodesRequest]:
        """What agents said, batched per event-loop turn, split below :data:`MAX_REQUEST_BYTES`."""
        while generation == self.generation:
            await self._up_wake.wait()
            self._up_wake.clear()
            await asyncio.sleep(0)
            if generation != self.generation:
                return
            items, self._up_items = self._up_items, []
            self._up_bytes = 0
            self._up_room.set()
            for chunk in bounds.chunks(items, MAX_REQUEST_BYTES):
                yield pb.RelayNodesRequest(items=chunk)

    def _send_up(self, item: pb.RelayItem) -> None:
        n = item.ByteSize()
        self._up_items.append((item, n + 4))  # + its tag and length in the request
        self._up_bytes += n
        self._up_wake.set()

    def _clear_up(self) -> None:
        self._up_items.clear()
        self._up_bytes = 0
        self._up_room.set()

    def _dispatch(self, resp: pb.RelayNodesResponse) -> None:
        for item in resp.items:
            kind = item.WhichOneof("item")
            if kind == "fanout":
                f = item.fanout
                data = f.response
                self.fanouts_received += 1
                interval = self._keepalive_interval(data)
                for sid in f.sessions:
                    a = self.agents.get(sid)
                    if a is None:
                        continue
                    if interval is not None:
                        a.interval = interval
                    self._deliver(a, data)
            elif kind == "end":
                e = item.end
                a = self.agents.get(e.session)
                if a is not None:
                    self._finish(a, relay_hub.status_code(e.code), e.details, tell_upstream=False)

    def _keepalive_interval(self, data: bytes) -> float | None:
        if len(data) > 16:
            return None
        if data not in self._intervals:
            try:
                msg = pb.SyncNodeResponse.FromString(data)
                got = msg.keepalive.interval_ms / 1000.0 if msg.WhichOneof("message") == "keepalive" else None
            except pb_message.DecodeError:
                got = None
            if len(self._intervals) < 1024:
                self._intervals[data] = got
            return got
        return self._intervals[data]

    def _deliver(self, a: _Agent, data: bytes) -> None:
        if a.ended:
            return
        if not a.queue.put(data, len(data)):
            reason = a.queue.over_limit_text(len(data), f"agent {a.peer} (relay session {a.sid})")
            a.queue.cut()
            self._finish(a, grpc.StatusCode.RESOURCE_EXHAUSTED, reason, tell_upstream=True)
            return
        self.deliveries += 1

    def _finish(self, a: _Agent, code: grpc.StatusCode, details: str, *, tell_upstream: bool) -> None:
        """End agent ``a``'s stream (after what is queued); tell the reflector unless it ended it."""
        if a.ended:
            return
        a.ended = True
        self.agents.pop(a.sid, None)
        self.agents_ended[code.name] = self.agents_ended.get(code.name, 0) + 1
        a.queue.put(_End(code, details), 0, bounded=False)
        if tell_upstream and a.generation == self.generation and self.up.is_set():
            self._send_up(pb.RelayItem(close=pb.RelayAgentClose(session=a.sid, reason=details)))

    def _end_all(self, code: grpc.StatusCode, details: str) -> None:
        for a in list(self.agents.values()):
            self._finish(a, code, details, tell_upstream=False)

    async def _sweep(self) -> None:
        """Every second: end agents silent for 3 negotiated keepalive intervals (once the
        reflector accepted them and the interval is known)."""
        while True:
            await asyncio.sleep(SWEEP_S)
            now = self.clock()
            for a in list(self.agents.values()):
                if not a.interval:
                    # Not accepted by the reflector yet (its first keepalive carries the interval):
                    # the agent waits on the reflector, not the other way round; a default hold
                    # would cut off agents queued behind a busy reflector (at N=10,000 it admits
                    # tens a second). A dead connection meanwhile is HTTP/2's to find.
                    continue
                hold = DEAD_AFTER_INTERVALS * a.interval
                if now - a.last_rx > hold:
                    why = f"keepalive timeout: nothing received for {now - a.last_rx:.1f}s"
                    self._finish(a, grpc.StatusCode.UNAVAILABLE, why, tell_upstream=True)

    # -- agents ------------------------------------------------------------------------------

    async def sync_node(
        self, requests: AsyncIterator[pb.SyncNodeRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """An agent's SyncNode stream: admitted here, carried upstream as one relay session."""
        peer = peer_name(context.peer())
        if not self.up.is_set():
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(f"relay has no connection to the reflector ({self.upstream_reason})")
            return
        try:
            ident = authz.identify(context)
        except authz.Unauthorized as e:
            context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            context.set_details(e.text)
            return
        if ident is not None and ident.role != identity.NODE:
            context.set_code(grpc.StatusCode.PERMISSION_DENIED)
            context.set_details(authz.rpc_refusal(ident, authz.SYNC_NODE) or f"{ident} is not a node")
            return
        with self.gate.stream("SyncNode", context, announce=True) as slot:
            if slot.refused is not None:
                return
            try:
                async with asyncio.timeout(DEAD_AFTER_INTERVALS * DEFAULT_KEEPALIVE_S):
                    first = await anext(aiter(requests))
            except (StopAsyncIteration, TimeoutError):
                _log.info("session from %s ended before announcing its node", peer)
                return
            except pb_message.DecodeError as e:
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(f"malformed message from agent {peer}: {e}")
                return
            if not self.up.is_set():
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details(f"relay has no connection to the reflector ({self.upstream_reason})")
                return
            a = _Agent(next(self._ids), peer, self.limits.send_queue_bytes, self.clock(), self.generation)
            a.queue.slot = slot
            self.agents[a.sid] = a
            if first.WhichOneof("message") == "keepalive":
                a.proposed_ms = first.keepalive.interval_ms
            self._send_up(pb.RelayItem(open=pb.RelayAgentOpen(
                session=a.sid, identity="" if ident is None else str(ident), peer=peer, first=first)))  # fmt: skip
            reader = asyncio.create_task(self._read_agent(a, requests))
            try:
                while True:
                    item = await a.queue.get()
                    if isinstance(item, _End):
                        if item.code != grpc.StatusCode.OK:
                            context.set_code(item.code)
                            context.set_details(item.details)
                        break
                    yield item
            finally:
                reader.cancel()
                self._finish(a, grpc.StatusCode.CANCELLED, "agent gone", tell_upstream=True)

    async def _read_agent(self, a: _Agent, requests: AsyncIterator[pb.SyncNodeRequest]) -> None:
        try:
            async for req in requests:
                a.last_rx = self.clock()
                if req.WhichOneof("message") == "keepalive":
                    if req.keepalive.interval_ms == a.proposed_ms:
                        continue  # liveness is judged here; the reflector needs only a new proposal
                    a.proposed_ms = req.keepalive.interval_ms
                if a.ended or a.generation != self.generation:
                    return
                self._send_up(pb.RelayItem(message=pb.RelayAgentMessage(session=a.sid, request=req)))
                while self._up_bytes > UP_BUFFER_BYTES and not a.ended:
                    self._up_room.clear()
                    await self._up_room.wait()
            self._finish(a, grpc.StatusCode.OK, "agent closed the session", tell_upstream=True)
        except (pb_message.DecodeError, grpc.aio.BaseError) as e:
            self._finish(a, grpc.StatusCode.INVALID_ARGUMENT, f"stream from agent {a.peer} failed: {e}",
                         tell_upstream=True)  # fmt: skip


class RelayMetrics(Collector):
    """Prometheus view read from the relay at scrape time."""

    def __init__(self, relay: Relay) -> None:
        self._r = relay

    def collect(self) -> Any:
        r = self._r
        yield GaugeMetricFamily("fabric_relay_agents", "Agent SyncNode streams the relay holds.", value=len(r.agents))
        yield GaugeMetricFamily("fabric_relay_upstream_up", "1 while the RelayNodes stream to the reflector is open.",
                                value=int(r.up.is_set()))  # fmt: skip
        yield CounterMetricFamily("fabric_relay_upstream_losses", "RelayNodes streams lost (every agent was ended).",
                                  value=r.upstream_losses)  # fmt: skip
        yield CounterMetricFamily("fabric_relay_fanouts", "Messages received from the reflector (each for one or "
                                  "more agents).", value=r.fanouts_received)  # fmt: skip
        yield CounterMetricFamily("fabric_relay_deliveries", "Messages queued to agents from them.",
                                  value=r.deliveries)  # fmt: skip
        ended = CounterMetricFamily("fabric_relay_agents_ended", "Agent streams ended, by status.", labels=["code"])
        for code, n in sorted(r.agents_ended.items()):
            ended.add_metric([code], n)
        yield ended
        if r.gc_policy is not None:
            yield CounterMetricFamily("fabric_relay_gc_full_collections", "Full garbage collections run at quiet "
                                      "moments (--gc quiet).", value=r.gc_policy.collections)  # fmt: skip


#: What an agent that asks a relay for a certificate is told (its log shows it).
REFUSE_CERTIFICATE = (
    "fabric-relay carries SyncNode sessions only and does not issue certificates: give the agent "
    "--certificates-from with the reflector's address (its --reflector stays this relay)"
)


async def _refuse_certificate(request: pb.IssueCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    """An agent asking the relay for a certificate is misconfigured: say so and how to fix it,
    instead of gRPC's bare "Method not found" (FAILED_PRECONDITION: the agent reports it as a
    refusal with this text, not as an unreachable reflector)."""
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, REFUSE_CERTIFICATE)


def _as_bytes(msg: bytes) -> bytes:
    """SyncNode's response serializer at the relay: the reflector's bytes, written unchanged."""
    return msg


# --------------------------------------------------------------------------------------------
# fabric-relay
# --------------------------------------------------------------------------------------------

EXAMPLES = """\
examples:
  # a relay for the agents of one zone, mutual TLS both ways: a server certificate for the agents,
  # a client certificate relay/zone-a for the reflector
  fabric-relay --upstream kosmos-fabric-reflector.kosmos-system.svc:4880 --listen 0.0.0.0:7947 \\
      --tls-dir /etc/fabric/relay-server --upstream-tls-dir /etc/fabric/relay-client

  # plaintext, as the control benchmark runs it (agents and reflector on unix sockets)
  fabric-relay --upstream unix:/tmp/kft/reflector.sock --listen unix:/tmp/kft/relay0.sock --insecure

  # agents point their session at relays (several addresses give them a fallback) and ask the
  # reflector itself for certificates
  fabric-agent --reflector ipv4:10.0.0.11:7947,10.0.0.12:7947,10.0.0.10:4880 \\
      --certificates-from 10.0.0.10:4880 ...
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fabric-relay",
        description="Hold agents' SyncNode streams and carry them to fabric-reflector over one stream, each "
        "message once per relay (fabric/control/relay.py explains the design).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--upstream", required=True, metavar="TARGET",
                   help="the reflector: HOST:PORT or unix:/path")  # fmt: skip
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help=f"where agents connect: HOST:PORT or unix:/path (repeatable; default "
                   f"{DEFAULT_LISTEN})")  # fmt: skip
    tls.add_flags(p, "the relay's server certificate, served to agents")
    p.add_argument("--upstream-tls-dir", metavar="DIR",
                   help="with --tls-dir: the relay's client certificate (identity relay/<name>), its key and the "
                   "fabric CA, shown to the reflector (a fabric certificate is a server or a client one)")  # fmt: skip
    p.add_argument("--send-queue-bytes", type=int, default=bounds.Limits().send_queue_bytes, metavar="B",
                   help="bytes queued to one agent; an agent that falls further behind is cut off")  # fmt: skip
    p.add_argument("--max-pending-streams", type=int, default=bounds.Limits().max_pending_streams, metavar="N",
                   help="new agent streams gRPC holds until the relay takes them up; more at once are refused "
                   "with CANCELLED (default %(default)s)")  # fmt: skip
    p.add_argument("--metrics-listen", metavar="ADDR:PORT",
                   help="serve Prometheus metrics (fabric_relay_*), /healthz and /readyz (ready: upstream open) "
                   f"here (default: off; the manifests use port {api.DEFAULT_RELAY_METRICS_PORT})")  # fmt: skip
    p.add_argument("--gc", choices=("quiet", "interpreter"), default="quiet",
                   help="when the cyclic garbage collector's full collections run: 'quiet' (when nothing is in "
                   "flight through the relay, or once one has waited 10 s; fabric/control/quiet_gc.py) or "
                   "'interpreter' (Python's own schedule) (default %(default)s)")  # fmt: skip
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    args = p.parse_args(argv)
    if args.metrics_listen is not None:
        try:
            if args.metrics_listen.startswith("unix:"):
                raise ValueError(f"--metrics-listen {args.metrics_listen!r}: must be ADDR:PORT")
            parse_listen(args.metrics_listen)
        except ValueError as e:
            p.error(str(e).replace("--listen", "--metrics-listen"))
    try:
        args.listen = [parse_listen(a) for a in (args.listen or [DEFAULT_LISTEN])]
    except ValueError as e:
        p.error(str(e))
    if bool(args.tls_dir) != bool(args.upstream_tls_dir):
        p.error("--tls-dir and --upstream-tls-dir go together (mutual TLS towards agents and the reflector); "
                "neither with --insecure")  # fmt: skip
    for flag, value in (("--send-queue-bytes", args.send_queue_bytes),
                        ("--max-pending-streams", args.max_pending_streams)):
        if value <= 0:
            p.error(f"{flag} {value}: must be positive")
    return args


async def _serve(args: argparse.Namespace) -> int:
    tls_dir = tls.from_args(args)
    upstream_tls = None if tls_dir is None else tls.choose(args.upstream_tls_dir, False)
    gc_policy = quiet_gc.QuietCollector() if args.gc == "quiet" else None
    relay = Relay(args.upstream, upstream_tls=upstream_tls, gc_policy=gc_policy,
                  limits=dataclasses.replace(bounds.Limits(), send_queue_bytes=args.send_queue_bytes,
                                             max_pending_streams=args.max_pending_streams))  # fmt: skip
    creds = None if tls_dir is None else tls.server_credentials(tls_dir)
    if gc_policy is not None:
        gc_policy.install()
    try:
        return await _run(relay, args, creds)
    finally:
        if gc_policy is not None:
            gc_policy.uninstall()


async def _run(relay: Relay, args: argparse.Namespace, creds: grpc.ServerCredentials | None) -> int:
    await relay.start(args.listen, creds)
    if args.metrics_listen:
        registry = CollectorRegistry()
        registry.register(RelayMetrics(relay))
        ready = lambda: (relay.up.is_set(), relay.upstream_reason or "upstream open")  # noqa: E731
        health.serve(args.metrics_listen, lambda: (True, "serving"), ready, registry=registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await relay.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.log_level)
    try:
        return asyncio.run(_serve(args))
    except tls.TLSError as e:
        print(f"fabric-relay: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
