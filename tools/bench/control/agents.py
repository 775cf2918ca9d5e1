"""The worker processes: N light agents each holding its own channel and stream, built on
the production client's strict session state machine (:class:`fabric.control.client.SyncStream`),
reporting to the driver when a change reached them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tools.bench.control.params import BARE_STREAM, KEEPALIVE_S, agent_channel_options
from tools.bench.control.shapes import Shape

if TYPE_CHECKING:
    from fabric.control.tls import TLSDir

_log = logging.getLogger(__name__)


async def node_credentials(tls_root: Path | None, i: int, exchange: tuple[str, str] | None = None) -> TLSDir | None:
    """CERTIFICATE EXCHANGE HOOK: the ``--tls-dir`` agent ``i`` connects with (None: plaintext).

    Without ``exchange``: the node certificate issued before the run (tools.bench.control.tlsmat).
    With ``exchange = (target, node identity)``: the bootstrap's certificate exchange, as the real
    agent does it (:func:`fabric.control.bootstrap.obtain`: a new key and CSR, ``IssueCertificate``
    over its own mutual-TLS channel authenticated with the pre-issued ``bootstrap/<cluster>``
    certificate, the answer checked and written) into a new, empty directory, which is returned.
    The joiner awaits this between its start stamp and opening its channel, so
    ``agent_start_to_in_sync`` of an exchanging join includes the exchange.
    """
    if tls_root is None:
        return None
    from fabric.control import tls
    from tools.bench.control.tlsmat import agent_dir, bootstrap_dir

    if exchange is None:
        return tls.TLSDir(agent_dir(tls_root, i))
    from fabric.control import bootstrap, identity

    target, who = exchange
    out = Path(tempfile.mkdtemp(prefix=f"exchanged-{i}-", dir=tls_root))
    try:
        await bootstrap.obtain(target, tls.TLSDir(bootstrap_dir(tls_root, i)), out, identity.parse(who))
    except Exception as e:  # a refusal or an unusable answer: a finding, not a retry
        raise AgentError(f"certificate exchange for {who}: {e}") from e
    return tls.TLSDir(out)


# -- the worker: light agents ----------------------------------------------------------------


class AgentError(Exception):
    """A simulated agent saw something the protocol forbids (or its stream failed)."""


class NotAdmitted(AgentError):
    """The stream failed before the snapshot arrived: like the real AgentSession, retry later.

    gRPC core cancels a stream the server has not taken up within 30 s
    (``grpc.server_max_unrequested_time_in_server``) and refuses new ones with CANCELLED while
    more than ``--max-pending-streams`` wait (INTERNAL where the agent's first message met the
    refused stream); a unix socket's full listen backlog refuses connections (UNAVAILABLE).
    ``cause`` tells them apart in the benchmark's note, since each calls for a different cure.
    """

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        #: The status code and the start of its details, e.g. "CANCELLED: CANCELLED".
        self.cause = cause


class _Worker:
    """N light agents in one asyncio process, reporting to the driver through stdout.

    Events (JSON lines): ``ready`` once every agent has its snapshot, ``progress`` every 2 s
    until then, ``expecting`` when the driver's ``expect`` command is in force, then one
    ``applied`` per change version when all the agents the change affects applied it (``n``
    agents, ``t`` the last stamp), ``error`` on any protocol violation.
    """

    def __init__(
        self, shape: Shape, target: str, mode: str, first: int, count: int, tls_root: Path | None = None,
        spread: bool = False,
    ) -> None:  # fmt: skip
        from fabric.control import codec
        from fabric.control.generated import fabric_pb2 as pb

        #: One entry decoder for every agent of this worker (codec.EntryDecoder), in both modes:
        #: agents of one viewer class get the same routes, which a real fleet decodes on
        #: thousands of machines; decoded once per worker here, the simulated agents' CPU (on the
        #: cores the server under test uses) stays out of the figures as far as it can.
        self.decoder = codec.EntryDecoder(limit=1 << 20)
        #: ``target`` lists several servers, one per relay; agent i uses the (i mod K)-th.
        self.spread = spread
        self.pb = pb
        self.shape = shape
        self.target = target
        self.mode = mode
        #: The material root of the mutual-TLS variant (None: plaintext channels).
        self.tls_root = tls_root
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
        #: Retries by what failed the stream (NotAdmitted.cause).
        self.retry_causes: collections.Counter[str] = collections.Counter()

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
        stream = client.SyncStream(
            f"agent {ann.key}", removals_must_exist=self.mode != "bare", decoder=self.decoder
        )
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
                        self.emit(ev="ready", n=self.count, retries=self.retries, causes=dict(self.retry_causes))
                elif isinstance(ev, client.Changed):
                    outbox.put_nowait(pb.SyncNodeRequest(applied=pb.Applied(version=ev.version)))
                    self._applied(i, ev.version, time.monotonic())
                elif isinstance(ev, client.Refused):
                    raise AgentError(f"agent {ann.key} rejected: {ev.reason}")
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and i in self.leaving:
                return
            if not stream.synced:
                cause = f"{e.code().name}: {(e.details() or '')[:80]}"
                raise NotAdmitted(f"agent {ann.key}: {cause}", cause) from e
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
            except NotAdmitted as e:
                self.retries += 1
                self.retry_causes[e.cause] += 1
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

    async def _channel(self, i: int, exchange: bool = False) -> Any:
        """Agent ``i``'s own channel, made the one way every fabric client makes one
        (fabric.control.tls.channel): mutual TLS with its node certificate (with ``exchange``,
        one it gets by the bootstrap's certificate exchange first), or plaintext."""
        from fabric.control import tls
        from tools.bench.control.tlsmat import node_identity

        target = self.target_of(i)
        how = (target, node_identity(self.shape, i)) if exchange else None
        creds = await node_credentials(self.tls_root, i, how)
        return tls.channel(target, creds, options=agent_channel_options())

    def target_of(self, i: int) -> str:
        """Agent ``i``'s server: the target, or with ``--spread`` (the relay phase: one target
        per fabric-relay, comma-separated) the (i mod K)-th of them."""
        if not self.spread:
            return self.target
        targets = self.target.split(",")
        return targets[i % len(targets)]

    async def run_agents(self) -> None:
        agents: dict[asyncio.Task[None], int] = {}
        for i in self.indexes:
            channel = await self._channel(i)
            self.channels.append(channel)
            agents[asyncio.create_task(self.agent_with_retries(i, channel))] = i
        helpers = [asyncio.create_task(self.keepalives()), asyncio.create_task(self.progress())]
        commands = asyncio.create_task(read_commands(self.command))
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
        """One agent that joins on ``join`` (``join exchange``: getting its node certificate by
        the certificate exchange first) and leaves on ``leave`` (stdin commands).

        Each join is an agent start: credentials (:func:`node_credentials`), a new channel
        (connection, and with TLS the handshake: ``channel_ready``), then the stream. The
        ``joined`` event carries ``start`` (before the credentials), ``connected`` (channel
        ready), ``t0`` (the stream opened: where join fan-out is timed from, so fan-out excludes
        the connection) and ``synced`` (END_OF_SNAPSHOT received). A leave cancels the stream
        and closes the channel.
        """
        i = self.indexes[0]
        channel: Any = None
        task: asyncio.Task[None] | None = None
        lines = _stdin_lines()
        try:
            async for line in lines:
                if line in ("join", "join exchange"):
                    exchange = line == "join exchange"
                    if exchange and self.tls_root is None:
                        raise AgentError("join exchange: a certificate exchange needs the TLS variant")
                    self.leaving.discard(i)
                    ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                    self.outboxes.clear()
                    start = time.monotonic()
                    channel = await self._channel(i, exchange)
                    await channel.channel_ready()
                    connected = time.monotonic()
                    t0 = time.monotonic()
                    task = asyncio.create_task(self.agent(i, channel, ready))
                    await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
                    if not ready.done():
                        task.result()  # raises the agent's error
                        raise AgentError("the joining agent's stream ended before END_OF_SNAPSHOT")
                    self.emit(ev="joined", t0=t0, v=self.last_eos, start=start, connected=connected,
                              synced=ready.result(), exchange=exchange)  # fmt: skip
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
                    if channel is not None:
                        await channel.close(grace=None)
                        channel = None
                elif line == "quit":
                    return
        finally:
            if task is not None:
                task.cancel()
            if channel is not None:
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


async def read_commands(handle: Callable[[str], None] | None = None) -> None:
    """Returns when the driver says ``quit`` or closes our stdin; other lines go to ``handle``."""
    async for line in _stdin_lines():
        if line == "quit":
            return
        if line and handle is not None:
            handle(line)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def worker_main(args: argparse.Namespace) -> int:
    raise_fd_limit()
    tls_root = Path(args.tls_root) if args.tls_root else None
    w = _Worker(Shape(args.shape, args.n), args.target, args.mode, args.first, args.count, tls_root,
                spread=args.spread)  # fmt: skip
    try:
        asyncio.run(w.run_joiner() if args.joiner else w.run_agents())
    except AgentError as e:
        w.emit(ev="error", msg=str(e))
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
