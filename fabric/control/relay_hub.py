"""The reflector's end of the relay tier: one ``RelayNodes`` stream carries the SyncNode sessions
of every agent connected to one fabric-relay (:mod:`fabric.control.relay` is the relay and the
design; this is the part that runs inside fabric-reflector).

Flow, per relay stream (:func:`serve`, called by the reflector's servicer)::

    relay  --RelayNodesRequest{items: open | message | close}-->  Hub._read
                                                                    | one virtual session per agent:
                                                                    v
                              Reflector.sync_node(requests, VirtualContext)   (unchanged)
                                                                    | what it yields, per session
                                                                    v
    relay  <--RelayNodesResponse{items: fanout{sessions[], bytes} | end}--  Hub._emit / responses

* Each agent's session runs through the reflector's own ``sync_node`` with the same admission,
  authorization, grace period, elections and bounded send queue as a direct one: the relay
  moves the transport (TCP, TLS, HTTP/2, one gRPC stream per agent) out of the reflector, not
  the rules. Its request stream is a queue this hub fills from the relay's items; its context
  (:class:`VirtualContext`) names the agent's address and the identity the relay verified.
* **Encode once, send once per relay.** ``sync_node(wire=True)`` yields a message shared by
  many sessions (a viewer class's delta, a keepalive) as the *same* bytes object for each of
  them. The hub batches what its sessions yield within one event-loop turn and merges equal
  objects into one ``RelayFanout`` with the list of sessions, so a delta that 1,000 agents of
  this relay get crosses the stream once. A session joins an entry only if the entry comes
  after the session's own last entry in the batch, so every agent still receives its messages
  in the order the reflector queued them.
* **Keepalives.** The relay checks its agents' keepalives itself and forwards an agent's
  keepalive only when it proposes a new interval. Whenever the reflector's keepalive for a
  session passes through the hub, the hub answers it on the session's request stream with the
  agent's last proposal: the session stays alive exactly as long as the relay stream does and
  the relay keeps the agent (it closes the session when the agent goes silent).
* **Identity.** On a mutual-TLS reflector only a ``relay/<name>`` certificate may open this
  stream (:data:`~fabric.control.authz.CALLERS`); each session then carries the identity the
  relay's own TLS handshake with the agent proved, and the reflector authorizes the
  announcement against it exactly as for a direct agent. A session without one (or from a
  plaintext relay stream to a TLS reflector) has a TLS context naming no identity and is
  refused UNAUTHORIZED. On a plaintext reflector (``--insecure``) nothing has an identity.
* **Bounds.** What the hub has batched and not written yet is bounded (:data:`BATCH_BYTES`):
  past it, sessions stop pulling from their reflector queues, whose own bounds then cut off
  the sessions that fall too far behind (RESOURCE_EXHAUSTED, as for a direct agent). Responses
  are split below the message size bound. Each session's unread requests are bounded too
  (:data:`SESSION_QUEUE_BYTES`): a session past it ends with RESOURCE_EXHAUSTED, so a relay
  that sends faster than the reflector reads cannot grow the reflector's memory. The relay
  stream ending (relay gone, cancelled) ends every session on it; their nodes enter the grace
  period like any lost session.
* **Standby.** A standby replica refuses RelayNodes with UNAVAILABLE naming the leader (as it
  refuses SyncNode), and a leader that stands down ends its relay streams the same way after
  their sessions: relays reconnect, through their upstream address, to the new leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import message as pb_message

from fabric.control import authz, bounds, identity
from fabric.control.generated import fabric_pb2 as pb

if TYPE_CHECKING:
    from fabric.control.reflector import Reflector

_log = logging.getLogger(__name__)

#: Bytes the hub batches before its sessions wait for the relay stream to take them.
BATCH_BYTES = 8 * 1024 * 1024
#: Largest RelayNodesResponse the hub writes (under the reflector's send bound, 16 MiB, and the
#: relay's receive bound, the same).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: Bytes of one session's requests the hub holds that its ``sync_node`` has not read yet. A
#: direct agent is held back by HTTP/2 flow control; a relay stream is read for all its sessions
#: at once, so each session's backlog has its own bound: two of the largest messages an agent
#: may send (a peer report is ~0.4 MB at 10,000 nodes), so a busy reflector never cuts a
#: well-behaved agent. A session past it is ended (RESOURCE_EXHAUSTED), not buffered.
SESSION_QUEUE_BYTES = 2 * bounds.Limits().max_receive_message_bytes
#: A keepalive response is a few bytes; larger messages are never decoded by the hub.
_KEEPALIVE_MAX_BYTES = 16

_STATUS_BY_CODE = {c.value[0]: c for c in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of its number (``RelayAgentEnd.code``); UNKNOWN for others."""
    return _STATUS_BY_CODE.get(value, grpc.StatusCode.UNKNOWN)


class VirtualContext:
    """What ``Reflector.sync_node`` asks of its RPC context, for a session carried by a relay:
    the agent's address, its identity (as an auth context in the shape gRPC gives) and the status
    the reflector ends the session with."""

    def __init__(self, peer: str, auth: dict[str, list[bytes]]) -> None:
        self._peer = peer
        self._auth = auth
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def agent_auth(relay_secure: bool, vouched: str) -> dict[str, list[bytes]]:
    """The auth context of a session the relay vouches ``vouched`` for. A plaintext relay stream
    gives none (a plaintext reflector: no identities); a TLS one gives a TLS context carrying the
    vouched identity's URI, or none at all (then the reflector refuses it UNAUTHORIZED)."""
    if not relay_secure:
        return {}
    auth = {"transport_security_type": [b"ssl"], "ssl_tls_version": [identity.TLS_VERSION.encode()]}
    if vouched:
        auth["peer_uri"] = [f"{identity.URI_PREFIX}{vouched}".encode()]
    return auth


class _Virtual:
    """One agent session carried by the relay stream."""

    __slots__ = ("context", "interval_ms", "queued", "requests", "sid", "task")

    def __init__(self, sid: int, context: VirtualContext) -> None:
        self.sid = sid
        #: The session's requests with their sizes; None ends the request stream.
        self.requests: asyncio.Queue[tuple[pb.SyncNodeRequest, int] | None] = asyncio.Queue()
        #: Bytes in ``requests`` (bounded by :data:`SESSION_QUEUE_BYTES`); -1 once cut off.
        self.queued = 0
        #: The agent's last proposed keepalive interval (0: none yet), echoed to the reflector.
        self.interval_ms = 0
        self.task: asyncio.Task[None] | None = None
        self.context = context

    def put(self, req: pb.SyncNodeRequest, relay: str) -> None:
        """Queue ``req`` for the session's ``sync_node``; past the bound, end the session."""
        if self.queued < 0:
            return
        n = req.ByteSize()
        if self.queued + n > SESSION_QUEUE_BYTES:
            details = (f"relay {relay} session {self.sid}: {self.queued + n} bytes of requests unread by the "
                       f"reflector, over its bound of {SESSION_QUEUE_BYTES}")  # fmt: skip
            _log.warning("%s; ending the session", details)
            self.context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.context.set_details(details)
            self.queued = -1
            self.requests.put_nowait(None)
            return
        self.queued += n
        self.requests.put_nowait((req, n))


class Hub:
    """The sessions of one relay stream, and the batch of what they have to send it."""

    def __init__(self, reflector: Reflector, relay: str, secure: bool) -> None:
        self._r = reflector
        self.relay = relay
        self._secure = secure
        self.sessions: dict[int, _Virtual] = {}
        #: The batch: fanout entries ([bytes, session ids]) and ends (RelayAgentEnd), in order.
        self._batch: list[list[Any] | pb.RelayAgentEnd] = []
        #: id(bytes) -> index in the batch of the entry sending that object.
        self._index: dict[int, int] = {}
        #: session -> index of its last entry in the batch.
        self._last: dict[int, int] = {}
        self._bytes = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._ended = False
        #: Why the hub ends the relay stream itself (the reflector stood down), else None.
        self.leaving: str | None = None
        #: Messages that crossed the stream and the agent messages they stood for (tests, logs).
        self.fanouts_sent = 0
        self.deliveries = 0

    # -- relay -> reflector ------------------------------------------------------------------

    async def read(self, requests: AsyncIterator[pb.RelayNodesRequest]) -> None:
        """Hand the relay's items to their sessions until the relay stream ends."""
        try:
            async for req in requests:
                for item in req.items:
                    kind = item.WhichOneof("item")
                    if kind == "open":
                        self._open(item.open)
                    elif kind == "message":
                        self._message(item.message)
                    elif kind == "close":
                        v = self.sessions.get(item.close.session)
                        if v is not None:
                            v.requests.put_nowait(None)
        except pb_message.DecodeError as e:
            _log.warning("relay %s: malformed message, ending its stream: %s", self.relay, e)
        except grpc.aio.BaseError as e:
            _log.info("relay %s: stream failed: %r", self.relay, e)
        finally:
            self.end_all()

    def _open(self, o: pb.RelayAgentOpen) -> None:
        if o.session in self.sessions:
            _log.warning("relay %s opened session %d twice; the second is ignored", self.relay, o.session)
            return
        ctx = VirtualContext(f"{o.peer or 'agent'} via relay {self.relay}", agent_auth(self._secure, o.identity))
        v = _Virtual(o.session, ctx)
        self.sessions[o.session] = v
        self._note_keepalive(v, o.first)
        v.put(o.first, self.relay)
        v.task = asyncio.create_task(self._run(v), name=f"relay {self.relay} session {o.session}")
        v.task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A session task that raised is a reflector bug, as in a direct SyncNode handler."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._r.crash(exc, f"{task.get_name()}")

    def _message(self, m: pb.RelayAgentMessage) -> None:
        v = self.sessions.get(m.session)
        if v is None:
            return  # the session ended here while the relay still sent for it
        self._note_keepalive(v, m.request)
        v.put(m.request, self.relay)

    @staticmethod
    def _note_keepalive(v: _Virtual, req: pb.SyncNodeRequest) -> None:
        if req.WhichOneof("message") == "keepalive":
            v.interval_ms = req.keepalive.interval_ms

    def end_all(self) -> None:
        """The relay stream ended: every session on it ends (the agent closed it, as far as the
        reflector is concerned; the relay ends the agents' own streams)."""
        self._ended = True
        for v in self.sessions.values():
            v.requests.put_nowait(None)
        self._wake.set()
        self._room.set()

    # -- reflector -> relay ------------------------------------------------------------------

    @staticmethod
    async def _requests(v: _Virtual) -> AsyncIterator[pb.SyncNodeRequest]:
        while True:
            got = await v.requests.get()
            if got is None:
                return
            req, n = got
            if v.queued > 0:
                v.queued -= n
            yield req

    async def _run(self, v: _Virtual) -> None:
        """One session through the reflector's own ``sync_node``; what it yields goes to the
        batch, and its end to the relay."""
        try:
            async for item in self._r.sync_node(self._requests(v), v.context, None, wire=True):
                data = item if isinstance(item, bytes) else item.SerializeToString()
                if len(data) <= _KEEPALIVE_MAX_BYTES and v.interval_ms and _is_keepalive(data):
                    # The relay answers for the agent's liveness (module docstring, "Keepalives").
                    v.put(pb.SyncNodeRequest(keepalive=pb.Keepalive(interval_ms=v.interval_ms)), self.relay)
                self._emit(v.sid, data)
                while self._bytes > BATCH_BYTES and not self._ended:
                    self._room.clear()
                    await self._room.wait()
        finally:
            self.sessions.pop(v.sid, None)
            code = v.context.code or grpc.StatusCode.OK
            self._end(v.sid, code, v.context.details)
            if self._r.standby_reason is not None and self.leaving is None:
                # A standby serves no agents: the relay must go to the leader (it reconnects
                # through its upstream address, e.g. the Service, where only the leader is ready).
                self.leaving = self._r.standby_reason
                self.end_all()

    def _emit(self, sid: int, data: bytes) -> None:
        at = self._index.get(id(data))
        if at is not None and at > self._last.get(sid, -1):
            entry = self._batch[at]
            assert isinstance(entry, list)
            entry[1].append(sid)
            self._bytes += 4
        else:
            at = len(self._batch)
            self._batch.append([data, [sid]])
            self._index[id(data)] = at
            self._bytes += len(data) + 8
        self._last[sid] = at
        self.deliveries += 1
        self._wake.set()

    def _end(self, sid: int, code: grpc.StatusCode, details: str) -> None:
        self._last[sid] = len(self._batch)
        self._batch.append(pb.RelayAgentEnd(session=sid, code=code.value[0], details=details))
        self._wake.set()

    async def responses(self) -> AsyncIterator[pb.RelayNodesResponse]:
        """The relay stream's responses: each batch once the event loop turned (so every session
        woken by the same flush has added its part), split below :data:`MAX_RESPONSE_BYTES`."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)
            batch, self._batch = self._batch, []
            self._index.clear()
            self._last.clear()
            self._bytes = 0
            self._room.set()
            for chunk in bounds.chunks(self._items(batch), MAX_RESPONSE_BYTES):
                yield pb.RelayNodesResponse(items=chunk)
            if self._ended and (self.leaving is not None or not self.sessions) and not self._batch:
                return


    def _items(self, batch: list[list[Any] | pb.RelayAgentEnd]) -> Iterator[tuple[pb.RelayOut, int]]:
        """The batch's entries as response items, each with a bound on its encoded size."""
        for entry in batch:
            if isinstance(entry, list):
                data, sids = entry
                self.fanouts_sent += 1
                yield pb.RelayOut(fanout=pb.RelayFanout(sessions=sids, response=data)), len(data) + 6 * len(sids) + 16
            else:
                yield pb.RelayOut(end=entry), len(entry.details) + 32


_KEEPALIVES: dict[bytes, bool] = {}


def _is_keepalive(data: bytes) -> bool:
    """Is ``data`` (a small SyncNodeResponse) a keepalive? Cached: there are a few distinct ones."""
    known = _KEEPALIVES.get(data)
    if known is None:
        try:
            known = pb.SyncNodeResponse.FromString(data).WhichOneof("message") == "keepalive"
        except pb_message.DecodeError:
            known = False
        if len(_KEEPALIVES) < 1024:
            _KEEPALIVES[data] = known
    return known


async def serve(
    reflector: Reflector, requests: AsyncIterator[pb.RelayNodesRequest], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[pb.RelayNodesResponse]:
    """A relay's ``RelayNodes`` stream (authorized by the caller): its sessions until it ends."""
    from fabric.control.reflector_service import peer_name

    ident = authz.identify(context)
    relay = f"{ident or 'plaintext relay'} at {peer_name(context.peer())}"
    hub = Hub(reflector, relay, secure=ident is not None)
    _log.info("relay %s connected", relay)
    reader = asyncio.create_task(hub.read(requests), name=f"relay {relay} reader")
    try:
        async for msg in hub.responses():
            yield msg
        if hub.leaving is not None:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(hub.leaving)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        hub.end_all()
        _log.info("relay %s gone: %d sessions ended with it", relay, len(hub.sessions))
