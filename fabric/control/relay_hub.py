"""The reflector's end of the relay tier: one ``RelayNodes`` stream carries the SyncNode sessions
of every agent connected to one fabric-relay (:mod:`fabric.control.relay` is the relay and the
design; this is the part that runs inside fabric-reflector).

Flow, per relay stream (:func:`serve`, called by the reflector's servicer)::

    relay  --RelayNodesRequest{items: open | message | close}-->  Hub.read
                                                                    | per item, as it is read:
                                                                    v
                      Reflector.open_relayed / relayed_request / relayed_close   (one session per agent)
                                                                    | its send queue, when not empty
                                                                    v
    relay  <--RelayNodesResponse{items: fanout{sessions[], bytes} | end}--  Hub.responses (relayed_take)

* Each agent's session goes through the reflector's own admission, authorization, grace
  period, elections and bounded send queue, as a direct one: the relay moves the transport
  (TCP, TLS, HTTP/2, one gRPC stream per agent) out of the reflector, not the rules. What it
  does not get is a direct session's tasks (a reader, a keepalive task, a handler waiting on
  its queue): the hub's reader hands each agent message to its session as it is read, the
  session's keepalives run on a timer, and the hub takes what the sessions queued when it
  writes (the sessions' queues tell it when they stop being empty). At 10,000 relayed agents
  those tasks and their queue hand-offs were about a fifth of the reflector's CPU per agent in
  a bring-up (issue 21: 0.52-0.62 ms without them against 0.70-0.73 ms).
  Its context (:class:`VirtualContext`) names the agent's address and the identity the relay
  verified.
* **Encode once, send once per relay.** The reflector queues a message shared by many
  sessions (a viewer class's delta, a keepalive) as the *same* bytes object for each of them.
  The hub batches what its sessions queued within one event-loop turn and merges equal
  objects into one ``RelayFanout`` with the list of sessions, so a delta that 1,000 agents of
  this relay get crosses the stream once. A session joins an entry only if the entry comes
  after the session's own last entry in the batch, so every agent still receives its messages
  in the order the reflector queued them.
* **Keepalives.** The relay checks its agents' keepalives itself (it closes the session of an
  agent silent for three negotiated intervals) and forwards an agent's keepalive only when it
  proposes a new interval, which the reflector negotiates as for a direct agent. The reflector
  sends a relayed session its keepalives on a timer (the relay forwards them: they carry the
  negotiated interval) and holds no liveness check of its own for it: the session lives as long
  as the relay keeps the agent and the relay stream lasts.
* **Identity.** On a mutual-TLS reflector only a ``relay/<name>`` certificate may open this
  stream (:data:`~fabric.control.authz.CALLERS`); each session then carries the identity the
  relay's own TLS handshake with the agent proved, and the reflector authorizes the
  announcement against it exactly as for a direct agent. A session without one (or from a
  plaintext relay stream to a TLS reflector) has a TLS context naming no identity and is
  refused UNAUTHORIZED. On a plaintext reflector (``--insecure``) nothing has an identity.
* **Bounds.** What the hub has batched and not written yet is bounded (:data:`BATCH_BYTES`):
  past it, the rest stays in the sessions' own send queues, whose bounds then cut off the
  sessions that fall too far behind (RESOURCE_EXHAUSTED, as for a direct agent). Responses are
  split below the message size bound. What the relay sends is handled as it is read, so a relay
  that sends faster than the reflector handles it is held back by HTTP/2 flow control on its
  stream: nothing of it queues in the reflector. The relay stream ending (relay gone,
  cancelled) ends every session on it; their nodes enter the grace period like any lost
  session.
* **Standby.** A standby replica refuses RelayNodes with UNAVAILABLE naming the leader (as it
  refuses SyncNode), and a leader that stands down ends its relay streams the same way after
  their sessions: relays reconnect, through their upstream address, to the new leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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

#: Bytes the hub batches before the rest waits in the sessions' queues for the relay stream.
BATCH_BYTES = 8 * 1024 * 1024
#: Largest RelayNodesResponse the hub writes (under the reflector's send bound, 16 MiB, and the
#: relay's receive bound, the same).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
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


class Hub:
    """The sessions of one relay stream, and the batch of what they have to send it."""

    def __init__(self, reflector: Reflector, relay: str, secure: bool) -> None:
        self._r = reflector
        self.relay = relay
        self._secure = secure
        #: The relay's session number -> the reflector's session.
        self.sessions: dict[int, Any] = {}
        #: Sessions whose send queue holds something, in the order they became so.
        self._ready: dict[int, None] = {}
        #: The batch: fanout entries ([bytes, session ids]) and ends (RelayAgentEnd), in order.
        self._batch: list[list[Any] | pb.RelayAgentEnd] = []
        #: id(bytes) -> index in the batch of the entry sending that object.
        self._index: dict[int, int] = {}
        #: session -> index of its last entry in the batch.
        self._last: dict[int, int] = {}
        self._bytes = 0
        self._wake = asyncio.Event()
        self._ended = False
        #: Why the hub ends the relay stream itself (the reflector stood down), else None.
        self.leaving: str | None = None
        #: Messages that crossed the stream and the agent messages they stood for (tests, logs).
        self.fanouts_sent = 0
        self.deliveries = 0

    # -- relay -> reflector ------------------------------------------------------------------

    async def read(self, requests: AsyncIterator[pb.RelayNodesRequest]) -> None:
        """Hand the relay's items to their sessions, as they are read, until the relay stream
        ends. Each is handled before the next is read, so the relay is held back by HTTP/2 flow
        control when the reflector is busy, as a direct agent is: nothing queues up here."""
        try:
            async for req in requests:
                for item in req.items:
                    kind = item.WhichOneof("item")
                    if kind == "open":
                        self._open(item.open)
                        continue
                    # The relay may still send for a session that ended here: ignored.
                    if kind == "message" and (s := self.sessions.get(item.message.session)) is not None:
                        self._r.relayed_request(s, item.message.request)
                    elif kind == "close" and (s := self.sessions.get(item.close.session)) is not None:
                        self._r.relayed_close(s, item.close.reason or "agent closed the session")
        except pb_message.DecodeError as e:
            _log.warning("relay %s: malformed message, ending its stream: %s", self.relay, e)
        except grpc.aio.BaseError as e:
            _log.info("relay %s: stream failed: %r", self.relay, e)
        finally:
            self.end_all(f"the stream of relay {self.relay} ended")

    def _open(self, o: pb.RelayAgentOpen) -> None:
        sid = o.session
        if sid in self.sessions:
            _log.warning("relay %s opened session %d twice; the second is ignored", self.relay, sid)
            return
        ctx = VirtualContext(f"{o.peer or 'agent'} via relay {self.relay}", agent_auth(self._secure, o.identity))
        opened = self._r.open_relayed(o.first, ctx, functools.partial(self._now_ready, sid))
        if opened is None or isinstance(opened, bytes):  # a standby, or its rejection
            if opened is not None:
                self._emit(sid, opened)
            self._end(sid, ctx.code or grpc.StatusCode.OK, ctx.details)
            self._leave_if_standby()
        else:
            self.sessions[sid] = opened

    def _now_ready(self, sid: int) -> None:
        self._ready[sid] = None
        self._wake.set()

    def end_all(self, reason: str) -> int:
        """The relay stream ended, or the hub ends it: every session on it is over (as far as
        the reflector is concerned; the relay ends the agents' own streams). Returns how many."""
        self._ended = True
        sessions, self.sessions = self.sessions, {}
        self._ready.clear()
        for s in sessions.values():
            self._r.relayed_ended(s, reason)
        self._wake.set()
        return len(sessions)

    def _leave_if_standby(self) -> None:
        if self._r.standby_reason is not None and self.leaving is None:
            # A standby serves no agents: the relay must go to the leader (it reconnects
            # through its upstream address, e.g. the Service, where only the leader is ready).
            self.leaving = self._r.standby_reason
            self.end_all(f"the reflector stood down ({self.leaving})")

    # -- reflector -> relay ------------------------------------------------------------------

    def _drain(self) -> None:
        """Take what the ready sessions have queued into the batch, until it holds
        :data:`BATCH_BYTES`; the rest waits in the sessions' own bounded queues, whose bounds
        then cut off those that fall too far behind (as a direct session's would)."""
        ready = self._ready
        while ready and self._bytes < BATCH_BYTES:
            sid = next(iter(ready))
            s = self.sessions.get(sid)
            if s is None:
                del ready[sid]
                continue
            while self._bytes < BATCH_BYTES:
                got = self._r.relayed_take(s)
                if got is None:
                    del ready[sid]
                    break
                if isinstance(got, bytes):
                    self._emit(sid, got)
                    continue
                code, reason = got
                del ready[sid]
                del self.sessions[sid]
                self._end(sid, code or grpc.StatusCode.OK, "" if code is None else reason)
                self._r.relayed_ended(s, reason)
                self._leave_if_standby()
                break

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
        """The relay stream's responses: what the ready sessions queued, once the event loop
        turned (so every session a flush woke has its part), split below
        :data:`MAX_RESPONSE_BYTES`; the next batch is taken once gRPC took this one."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)
            self._drain()
            batch, self._batch = self._batch, []
            self._index.clear()
            self._last.clear()
            self._bytes = 0
            for chunk in bounds.chunks(self._items(batch), MAX_RESPONSE_BYTES):
                yield pb.RelayNodesResponse(items=chunk)
            if self._ready:
                self._wake.set()  # more than one batch was queued
            if self._ended and not self._batch:
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

    def read_done(task: asyncio.Task[None]) -> None:
        """The reader that raised is a reflector bug, as in a direct session's reader task."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            reflector.crash(exc, task.get_name())

    reader.add_done_callback(read_done)
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
        ended = hub.end_all(f"the stream of relay {relay} ended")
        _log.info("relay %s gone: %d sessions ended with it", relay, ended)
