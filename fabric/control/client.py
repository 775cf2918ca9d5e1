"""Clients of the ``Fabric`` service: the agent's session, status for tools, topology for add-ons
(add-on records: :mod:`fabric.control.records`).

AgentSession, one per agent, forever:

1. connect to the reflector (``host:port`` or ``unix:/path``) and open ``SyncNode``;
2. send the Announce, then Keepalives: each proposes ``keepalive_interval``; the reflector
   negotiates the session's interval (the proposal clamped to its range, then the smaller of it
   and its own, as BGP does with hold times) and its keepalives carry the result, which we
   follow: we send at least that often and declare the reflector dead after 3 of its intervals;
3. collect SnapshotChunks until END_OF_SNAPSHOT, then hand the *complete* state to
   ``handler.on_snapshot`` (never a partial one: the agent garbage-collects on it);
4. apply every Delta, in order, to ``session.state`` and hand it to ``handler.on_delta``;
   the rules of that order (:class:`SyncStream`) are strict: a delta before END_OF_SNAPSHOT
   or a delta version that does not increase is a protocol violation that ends the session
   (logged, counted in ``protocol_violations``), and the next one starts from a fresh snapshot;
5. on any failure (connection refused, stream broken, reflector silent for 3 keepalive
   intervals once it admitted the session, or for :data:`ADMISSION_WAIT_S` before, Rejected)
   tell the handler, wait a jittered exponential backoff and start over.
   Connection problems never escape :meth:`AgentSession.run`; handler exceptions do (they are
   bugs of the agent, and the agent crashing into a clean resync is the designed reaction).

The handler's callbacks run on the session's task, one at a time, so deltas are applied in the
order the reflector sent them and a slow handler simply delays reading (gRPC flow control pushes
back on the reflector). Our own keepalives run on a separate task, so a slow handler does not
make the reflector think we are dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import grpc

from fabric import types
from fabric.backoff import Backoff
from fabric.control import api, bounds, codec, tls
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc

_log = logging.getLogger(__name__)

#: HTTP/2 keepalive under the application keepalive (see reflector_service.server_options: the server
#: accepts pings every 5 s; we ping every 10 s so we are never sent GOAWAY "too_many_pings").
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after the reflector restarts; our own backoff paces the attempts.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # The reflector's message size bounds, mirrored (fabric/control/bounds.py, Limits: how they
    # were chosen): we read what it may write, and write no more than it reads.
    ("grpc.max_receive_message_length", bounds.Limits().max_send_message_bytes),
    ("grpc.max_send_message_length", bounds.Limits().max_receive_message_bytes),
]
DEAD_AFTER_INTERVALS = 3
#: How long a new session waits for the reflector's first message (its admission: a keepalive
#: at once) before giving up, when that is longer than the keepalive hold. A reflector that
#: has not picked up a new stream yet is not dead: after a restart all agents reconnect at
#: once, and even a bare grpc.aio server took 14-17 s to take up 10,000 streams (issue 21,
#: BENCHMARKS.md); agents that gave up after 3 keepalives (6 s by default) and came back
#: multiplied the streams it had to take up. gRPC's server cancels a stream it has not taken up
#: within 30 s (grpc.server_max_unrequested_time_in_server), and HTTP/2 keepalive pings
#: (CHANNEL_OPTIONS) detect a dead connection in 15 s, so this only bounds what both miss.
ADMISSION_WAIT_S = 35.0


class ReflectorUnavailable(Exception):
    """The reflector at ``target`` could not be asked (down, unreachable, timed out)."""

    def __init__(self, target: str, reason: str) -> None:
        self.target = target
        self.reason = reason
        super().__init__(f"reflector at {target} is unavailable: {reason}")


class SessionHandler(Protocol):
    """What an AgentSession tells its agent. All callbacks run on the session's task."""

    async def on_snapshot(self, state: types.NodeState, version: int) -> None:
        """The complete planned state (once per session, after END_OF_SNAPSHOT)."""

    async def on_delta(self, delta: types.StateDelta, version: int) -> None:
        """A change after the snapshot; ``session.state`` already includes it."""

    async def on_connection(self, connected: bool, reason: str) -> None:
        """The session was accepted (True) or was lost (False, with the reason)."""

    async def on_rejected(self, reason: str) -> None:
        """The reflector refused the announcement; the session retries after a backoff. The
        class of each refusal is ``session.rejected_for``."""


class _SessionEnded(Exception):
    """Internal: the current session is over for ``reason``; back off and reconnect."""


# --------------------------------------------------------------------------------------------
# The SyncNode stream as a state machine
# --------------------------------------------------------------------------------------------


class ProtocolViolation(Exception):
    """The reflector sent something the SyncNode protocol forbids; the text says what and to whom.

    The session cannot continue: whatever the agent would build on top of it is not the plan.
    AgentSession ends the session and reconnects to a fresh snapshot."""


@dataclasses.dataclass(frozen=True, slots=True)
class Keepalive:
    """The reflector is alive and keeps alive every ``interval`` seconds."""

    interval: float


@dataclasses.dataclass(frozen=True, slots=True)
class Synced:
    """END_OF_SNAPSHOT: the snapshot is complete (``SyncStream.entries``) as of ``version``."""

    version: int
    epoch: str


@dataclasses.dataclass(frozen=True, slots=True)
class Changed:
    """A delta after the snapshot, already applied to ``SyncStream.entries``."""

    delta: types.StateDelta
    version: int


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """The reflector rejected the announcement: ``reason`` says why in words, ``classes`` names
    the kinds of refusal (metric labels, machine-readable)."""

    reason: str
    classes: tuple[api.RejectionReason, ...] = ()


SyncEvent = Keepalive | Synced | Changed | Refused


class StreamOrder:
    """The order every watch stream of the service keeps, checked on the receiving side: snapshot
    chunks only before END_OF_SNAPSHOT, one END_OF_SNAPSHOT, deltas only after it, each delta's
    ``counter`` (SyncNode's version, WatchRecords' revision) greater than the one before (END_OF_
    SNAPSHOT's, then the last delta's). The one implementation of these rules, used by
    :class:`SyncStream` and :class:`fabric.control.records.RecordStream`; a broken rule raises
    :class:`ProtocolViolation` naming the RPC and whose stream it is."""

    def __init__(self, rpc: str, who: str, counter: str = "version") -> None:
        self.rpc = rpc
        self.who = who
        self.counter = counter
        self.synced = False
        #: END_OF_SNAPSHOT's counter, then the last delta's.
        self.at = 0

    def violation(self, what: str) -> ProtocolViolation:
        return ProtocolViolation(f"protocol violation on the {self.rpc} stream of {self.who}: {what}")

    def snapshot_chunk(self) -> None:
        if self.synced:
            raise self.violation(f"snapshot chunk after END_OF_SNAPSHOT ({self.counter} {self.at})")

    def end_of_snapshot(self, at: int) -> None:
        if self.synced:
            raise self.violation(f"second END_OF_SNAPSHOT ({self.counter} {at} after {self.counter} {self.at})")
        self.synced = True
        self.at = at

    def delta(self, at: int) -> None:
        if not self.synced:
            raise self.violation(f"delta ({self.counter} {at}) before END_OF_SNAPSHOT")
        if at <= self.at:
            raise self.violation(f"delta {self.counter} {at} does not increase on {self.counter} {self.at}")
        self.at = at


def closed_the_call(closed: asyncio.Event) -> bool:
    """In a reconnecting client's ``except asyncio.CancelledError``: whether the cancellation is
    the client's own ``close()`` cancelling its call (the session simply ended), rather than a
    cancellation of the task running the client, which must propagate."""
    task = asyncio.current_task()
    return closed.is_set() and not (task is not None and task.cancelling())


async def sleep_unless_closed(closed: asyncio.Event, seconds: float) -> None:
    """A reconnecting client's back-off: ``seconds``, or less when ``closed`` is set meanwhile.
    ``asyncio.timeout``, not ``wait_for``: on Python 3.11 ``wait_for`` can swallow a cancellation
    that arrives as the wait completes (CPython gh-86296)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await closed.wait()


async def end_call(call: Any, channel: grpc.aio.Channel | None) -> None:
    """End a reconnecting client's session: cancel its call and close its channel (either may
    be None). Callers clear their references first, so a second end finds nothing to do."""
    if call is not None:
        call.cancel()
    if channel is not None:
        await channel.close(grace=None)


class SyncStream:
    """The client's side of one SyncNode stream: feed every response, in order, to :meth:`feed`.

    The one implementation of the protocol rules, shared by :class:`AgentSession` and the
    control benchmark's light agents (:mod:`tools.bench.control.agents`), so what the benchmark checks
    is what agents enforce. Strict, because every rule broken means the agent's state is no
    longer the reflector's plan for it:

    * snapshot chunks only before END_OF_SNAPSHOT, and one END_OF_SNAPSHOT;
    * deltas only after END_OF_SNAPSHOT (a delta to a snapshot still arriving has no version to
      follow: the reflector sends snapshots atomically);
    * every delta's version greater than the one before it (END_OF_SNAPSHOT's, then the last
      delta's): a repeated or older version is a lost or reordered change;
    * with ``removals_must_exist``, every removal names an entry held (the benchmark's check; off
      for agents, to which removing nothing is harmless).

    The first three are :class:`StreamOrder`'s. A broken rule raises :class:`ProtocolViolation`;
    the stream is then unusable (start a new session). The state is kept as a dict (O(change)
    per delta, which the benchmark's thousands of agents per process need); :attr:`state`
    builds the sorted :class:`~fabric.types.NodeState`.
    """

    def __init__(
        self, who: str, *, removals_must_exist: bool = False, decoder: codec.EntryDecoder | None = None
    ) -> None:
        self.who = who
        self.removals_must_exist = removals_must_exist
        #: Decoded entries by their bytes (codec.EntryDecoder): an agent keeps one across its
        #: sessions, so a resync snapshot after a reconnect is mostly lookups; the benchmark's
        #: light agents share one per worker process.
        self.decoder = decoder if decoder is not None else codec.EntryDecoder()
        #: Entries by key: the snapshot so far, then the complete state as of :attr:`version`.
        self.entries: dict[str, types.Entry] = {}
        self.epoch = ""
        self._order = StreamOrder("SyncNode", who)

    @property
    def version(self) -> int:
        """END_OF_SNAPSHOT's version, then the last delta's."""
        return self._order.at

    @property
    def synced(self) -> bool:
        return self._order.synced

    @property
    def state(self) -> types.NodeState:
        return types.NodeState.from_entries(self.entries.values())

    def feed(self, msg: pb.SyncNodeResponse) -> SyncEvent | None:
        """Apply one response; returns what happened (None: a snapshot chunk was collected)."""
        kind = msg.WhichOneof("message")
        if kind == "keepalive":
            return Keepalive(msg.keepalive.interval_ms / 1000.0)
        if kind == "snapshot":
            self._order.snapshot_chunk()
            keyed, entries = self.decoder.keyed, self.entries
            for e in msg.snapshot.entries:
                key, entry = keyed(e)
                entries[key] = entry
            return None
        if kind == "end_of_snapshot":
            self._order.end_of_snapshot(msg.end_of_snapshot.version)
            self.epoch = msg.end_of_snapshot.epoch
            return Synced(self.version, self.epoch)
        if kind == "delta":
            version = msg.delta.version
            self._order.delta(version)  # the stream is unusable once anything below raises
            upserts = [self.decoder.keyed(e) for e in msg.delta.upserts]
            delta = types.StateDelta(upserts=tuple(e for _, e in upserts), removals=tuple(msg.delta.removals))
            for k in delta.removals:
                if self.entries.pop(k, None) is None and self.removals_must_exist:
                    raise self._order.violation(f"delta {version} removes {k!r}, which was never sent")
            for key, entry in upserts:
                self.entries[key] = entry
            return Changed(delta, version)
        if kind == "rejected":
            return Refused(msg.rejected.reason, codec.rejection_reasons_from_pb(msg.rejected.codes))
        raise self._order.violation(f"unknown message {kind!r}")


class _Cadence:
    """The keepalive intervals of one session, as the reflector negotiated them (see the module
    docstring, 2): ``peer``, the reflector's (we expect a keepalive at least this often; our own
    until it said), and ``send``, ours (the smaller of our proposal and ``peer``: a reflector
    that raised our proposal to its minimum gets more than it asked for, never less)."""

    def __init__(self, own: float) -> None:
        self.own = own
        self.peer = own
        self.send = own
        self.changed = asyncio.Event()

    def follow(self, interval: float) -> None:
        if interval != self.peer:
            self.peer = interval
            send = min(self.own, interval)
            if send != self.send:
                self.send = send
                self.changed.set()


class AgentSession:
    """The agent's side of ``SyncNode``. See the module docstring for the sequence."""

    def __init__(
        self,
        target: str,
        announcement: types.NodeAnnouncement,
        handler: SessionHandler,
        *,
        keepalive_interval: float = 2.0,
        backoff: tuple[float, float] = (0.2, 5.0),
        tls_dir: tls.TLSDir | None = None,
    ) -> None:
        if keepalive_interval <= 0:
            raise ValueError(f"keepalive_interval must be positive, got {keepalive_interval}")
        if not 0 < backoff[0] <= backoff[1]:
            raise ValueError(f"backoff must be (initial, maximum) with 0 < initial <= maximum, got {backoff}")
        #: Paces reconnections (see fabric.backoff); reset by a session that got its snapshot.
        self._backoff = Backoff(*backoff)
        self.target = target
        #: Mutual TLS material (None: plaintext, ``--insecure``).
        self.tls = tls_dir
        self.announcement = announcement
        self.handler = handler
        self.keepalive_interval = keepalive_interval
        #: The node's complete state as of ``version`` (empty until the first snapshot).
        self.state = types.NodeState()
        self.version = 0
        #: Reflector epoch of the current/last session.
        self.epoch = ""
        self.connected = False
        self._closed = asyncio.Event()
        self._outbox: asyncio.Queue[pb.SyncNodeRequest | None] | None = None
        self._call: Any = None
        self._channel: grpc.aio.Channel | None = None
        self._attempts = 0
        #: The current session got its END_OF_SNAPSHOT (resets the backoff when it ends).
        self._synced = False
        #: Decoded entries by their bytes, kept across sessions: the snapshot after a reconnect
        #: is mostly entries held already (codec.EntryDecoder).
        self._decoder = codec.EntryDecoder()
        #: The class of each refusal of the last ``Rejected`` (set before ``on_rejected`` runs).
        self.rejected_for: tuple[api.RejectionReason, ...] = ()
        #: Probed peers that do not answer (sent on change and again on every new session).
        self._unreachable: frozenset[types.NodeKey] = frozenset()
        self._quality: dict[types.NodeKey, codec.PeerQuality] = {}
        #: Sessions ended because the reflector broke the protocol (see :class:`SyncStream`).
        self.protocol_violations = 0

    # -- public API ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Run sessions until :meth:`close`; reconnects with jittered exponential backoff."""
        while not self._closed.is_set():
            self._attempts += 1
            self._synced = False
            try:
                await self._run_once()
                reason = "reflector closed the session"
            except _SessionEnded as e:
                reason = str(e)
            except grpc.aio.AioRpcError as e:
                reason = f"{e.code().name}: {e.details()}{tls.explain_failure(self.tls, e.code(), e.details() or '')}"
            except asyncio.CancelledError:
                if not closed_the_call(self._closed):
                    raise
                reason = "session closed by the agent"
            finally:
                await self._teardown()
            if self.connected:
                self.connected = False
                await self.handler.on_connection(False, reason)
            if self._closed.is_set():
                break
            if self._synced:
                self._backoff.reset()  # a session that worked resets the backoff
            sleep = self._backoff.next()
            _log.info("session to %s ended (%s); reconnecting in %.2fs", self.target, reason, sleep)
            await sleep_unless_closed(self._closed, sleep)

    async def report_applied(self, version: int) -> None:
        """Tell the reflector ``version`` is programmed. Dropped when no session is up: a new
        session starts from a fresh snapshot whose version the agent will report again."""
        if self._outbox is not None and self.connected:
            self._outbox.put_nowait(pb.SyncNodeRequest(applied=pb.Applied(version=version)))

    def report_unreachable(
        self, unreachable: frozenset[types.NodeKey], quality: Mapping[types.NodeKey, codec.PeerQuality] | None = None
    ) -> None:
        """Tell the reflector which probed peers stopped answering (the complete set) and, when
        ``quality`` is given, the latest measurement of each probed peer (None: the last one
        given stands; the caller rate-limits it, fabric/agent/quality.py). Kept and re-sent on
        every new session, since the reflector forgets a session's report with it."""
        q = self._quality if quality is None else dict(quality)
        if unreachable == self._unreachable and q == self._quality:
            return
        self._unreachable = frozenset(unreachable)
        self._quality = q
        if self._outbox is not None and self.connected:
            self._outbox.put_nowait(codec.peer_report_message(self._unreachable, self._quality))

    async def close(self) -> None:
        """End the session for good; :meth:`run` returns soon after."""
        self._closed.set()
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._call is not None:
            self._call.cancel()

    # -- one session --------------------------------------------------------------------------

    async def _requests(self, outbox: asyncio.Queue[pb.SyncNodeRequest | None]) -> AsyncIterator[pb.SyncNodeRequest]:
        yield pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(self.announcement)))
        while True:
            msg = await outbox.get()
            if msg is None:
                return
            yield msg

    async def _keepalives(self, outbox: asyncio.Queue[pb.SyncNodeRequest | None], cadence: _Cadence) -> None:
        """Propose our interval every ``cadence.send`` seconds; a new negotiated interval
        wakes us at once (the reflector may expect us more often from now on)."""
        while True:
            cadence.changed.clear()
            outbox.put_nowait(pb.SyncNodeRequest(keepalive=codec.keepalive_message(self.keepalive_interval)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cadence.send):
                    await cadence.changed.wait()

    async def _run_once(self) -> None:
        """One session, until it fails (raises) or the reflector ends the stream."""
        outbox: asyncio.Queue[pb.SyncNodeRequest | None] = asyncio.Queue()
        self._outbox = outbox
        self._channel = tls.channel(self.target, self.tls, options=CHANNEL_OPTIONS)
        stub = pb_grpc.FabricStub(self._channel)
        self._call = call = stub.SyncNode(self._requests(outbox))
        cadence = _Cadence(self.keepalive_interval)
        ticker = asyncio.create_task(self._keepalives(outbox, cadence))
        stream = SyncStream(f"node {self.announcement.key} from {self.target}", decoder=self._decoder)
        admitted = False
        try:
            while True:
                hold = DEAD_AFTER_INTERVALS * cadence.peer
                if not admitted:
                    hold = max(hold, ADMISSION_WAIT_S)
                try:
                    async with asyncio.timeout(hold):
                        msg = await call.read()
                except TimeoutError:
                    if not admitted:
                        raise _SessionEnded(f"not admitted: the reflector sent nothing for {hold:g}s") from None
                    raise _SessionEnded(f"keepalive timeout: reflector silent for {hold:g}s") from None
                admitted = True
                if msg is grpc.aio.EOF:
                    status = await call.code()
                    details = await call.details()
                    raise _SessionEnded(f"reflector ended the session ({status.name}: {details})")
                try:
                    ev = stream.feed(msg)
                except ProtocolViolation as e:
                    # The state built so far cannot be trusted: no backoff reset, a fresh snapshot.
                    self._synced = False
                    self.protocol_violations += 1
                    _log.warning("%s; ending the session to start over from a fresh snapshot", e)
                    raise _SessionEnded(str(e)) from None
                if isinstance(ev, Keepalive):
                    cadence.follow(ev.interval)
                    if not self.connected:
                        self.connected = True
                        _log.info("session to %s accepted for node %s", self.target, self.announcement.key)
                        if self._unreachable or self._quality:
                            outbox.put_nowait(codec.peer_report_message(self._unreachable, self._quality))
                        await self.handler.on_connection(True, f"connected to {self.target}")
                elif isinstance(ev, Synced):
                    self.state = stream.state
                    self.version = ev.version
                    self.epoch = ev.epoch
                    self._synced = True
                    _log.info("snapshot of %d entries, version %d", len(self.state), self.version)
                    await self.handler.on_snapshot(self.state, self.version)
                elif isinstance(ev, Changed):
                    self.state = stream.state
                    self.version = ev.version
                    _log.debug("delta of %d entries, version %d", len(ev.delta), self.version)
                    await self.handler.on_delta(ev.delta, self.version)
                elif isinstance(ev, Refused):
                    self.rejected_for = ev.classes
                    classes = ", ".join(r.value for r in ev.classes) or "unspecified"
                    _log.warning("reflector %s rejected node %s (%s): %s", self.target, self.announcement.key,
                                 classes, ev.reason)  # fmt: skip
                    await self.handler.on_rejected(ev.reason)
                    raise _SessionEnded(f"rejected ({classes}): {ev.reason}")
        finally:
            ticker.cancel()

    async def _teardown(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        self._outbox = None
        call, channel, self._call, self._channel = self._call, self._channel, None, None
        await end_call(call, channel)


# --------------------------------------------------------------------------------------------
# Status for tools
# --------------------------------------------------------------------------------------------


def unavailable_error(target: str, e: grpc.RpcError, tls_dir: tls.TLSDir | None = None) -> ReflectorUnavailable:
    """``e`` (a failed call to the reflector at ``target``) as :class:`ReflectorUnavailable`;
    with TLS, a refused handshake's reason as far as this side can tell (:func:`tls.explain_failure`)."""
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    why = tls.explain_failure(tls_dir, code, details or "")
    return ReflectorUnavailable(target, f"{code.name if code else 'error'}: {details}{why}")


async def get_status(target: str, timeout: float = 5.0, tls_dir: tls.TLSDir | None = None) -> api.FabricStatus:
    """The reflector's status; raises :class:`ReflectorUnavailable` on any failure."""
    async with tls.channel(target, tls_dir, options=CHANNEL_OPTIONS) as channel:
        try:
            resp = await pb_grpc.FabricStub(channel).GetStatus(pb.GetStatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise unavailable_error(target, e, tls_dir) from e
    return codec.status_from_pb(resp)


def get_status_sync(target: str, timeout: float = 5.0, tls_dir: tls.TLSDir | None = None) -> api.FabricStatus:
    """Blocking :func:`get_status` for CLI tools (a blocking channel, no event loop)."""
    with tls.channel(target, tls_dir, options=CHANNEL_OPTIONS, sync=True) as channel:
        try:
            resp = pb_grpc.FabricStub(channel).GetStatus(pb.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise unavailable_error(target, e, tls_dir) from e
    return codec.status_from_pb(resp)


class CertificateRefused(Exception):
    """The reflector answered an IssueCertificate request with a refusal (``code``, ``details``)."""

    def __init__(self, target: str, code: grpc.StatusCode, details: str) -> None:
        self.target = target
        self.code = code
        self.details = details
        super().__init__(f"reflector at {target} refused the certificate request: {code.name}: {details}")


_REFUSALS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
             grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip


async def issue_certificate(
    target: str, tls_dir: tls.TLSDir, csr_pem: bytes, node: str, *, timeout: float = 10.0
) -> tuple[bytes, bytes]:
    """``IssueCertificate`` (:mod:`fabric.control.bootstrap`): (certificate PEM, CA PEM) for the
    CSR of ``node``, asked with the certificate in ``tls_dir``. Raises :class:`CertificateRefused`
    (the reflector said no) or :class:`ReflectorUnavailable` (it could not be asked)."""
    async with tls.channel(target, tls_dir, options=CHANNEL_OPTIONS) as channel:
        try:
            resp = await pb_grpc.FabricStub(channel).IssueCertificate(
                pb.IssueCertificateRequest(csr_pem=csr_pem, node=node), timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            if e.code() in _REFUSALS:
                raise CertificateRefused(target, e.code(), e.details() or "") from e
            raise unavailable_error(target, e, tls_dir) from e
    return resp.certificate_pem, resp.ca_pem


# --------------------------------------------------------------------------------------------
# Topology for add-ons
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TopologyEvent:
    """One WatchTopology message as plain values.

    ``kind`` is ``snapshot`` (clusters on the first one, nodes), ``end_of_snapshot`` (the
    snapshot is complete as of ``generation``) or ``delta`` (nodes joined/changed or withdrawn).
    """

    kind: str
    generation: int
    clusters: tuple[types.ClusterConfig, ...] = ()
    upserts: tuple[types.NodeAnnouncement, ...] = ()
    removals: tuple[types.NodeKey, ...] = ()


_KINDS = {
    pb.WatchTopologyResponse.KIND_SNAPSHOT: "snapshot",
    pb.WatchTopologyResponse.KIND_END_OF_SNAPSHOT: "end_of_snapshot",
    pb.WatchTopologyResponse.KIND_DELTA: "delta",
}


class TopologyWatcher:
    """``async for event in TopologyWatcher(target)``: the topology as a stream of events.

    No reconnect: the iteration ends (raising :class:`ReflectorUnavailable`) when the stream
    breaks, and the add-on starts a new watcher, which begins with a fresh snapshot.
    """

    def __init__(self, target: str, tls_dir: tls.TLSDir | None = None) -> None:
        self.target = target
        self.tls = tls_dir
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None

    def __aiter__(self) -> AsyncIterator[TopologyEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[TopologyEvent]:
        self._channel = tls.channel(self.target, self.tls, options=CHANNEL_OPTIONS)
        try:
            self._call = pb_grpc.FabricStub(self._channel).WatchTopology(pb.WatchTopologyRequest())
            try:
                async for msg in self._call:
                    kind = _KINDS.get(msg.kind)
                    if kind is None:
                        raise codec.DecodeError(f"WatchTopology message of unknown kind {msg.kind}")
                    yield TopologyEvent(
                        kind=kind,
                        generation=msg.generation,
                        clusters=tuple(codec.cluster_from_pb(c) for c in msg.clusters),
                        upserts=tuple(codec.node_from_pb(n) for n in msg.node_upserts),
                        removals=tuple(types.NodeKey.parse(k) for k in msg.node_removals),
                    )
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    raise unavailable_error(self.target, e, self.tls) from e
        finally:
            await self.close()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None
