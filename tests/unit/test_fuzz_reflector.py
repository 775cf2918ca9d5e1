"""Fuzzing the reflector's session messages (issue 20 item 5): random and mutated messages into a
LIVE reflector never crash it, every refusal says why, and the other sessions see nothing.

Each test starts one reflector (in-process ``grpc.aio`` server on 127.0.0.1, plaintext) with its
well-behaved bystanders: an agent (:class:`~fabric.control.client.AgentSession` for ``east/e1``,
synced) and, for the records RPCs, a publisher holding one record and a subscriber watching that
publisher. Then every hypothesis example is one fuzz RPC on the same server:

* *typed*: messages drawn from the proto descriptors (:func:`messages`: every field, oneof member
  and enum, unknown enum numbers, text that is almost a cluster, node, CIDR or identity);
* *raw*: valid serialized messages mutated byte by byte (flips, truncations, insertions, splices)
  or plain random bytes, sent with a generic stub (no serializer), so malformed protobuf reaches
  the server's own decoding.

After each example: the reflector did not crash (``Reflector.crashed`` is None, no INTERNAL or
UNKNOWN status); a refusal carries its reason (a ``Rejected`` with text and classes, an ack's
refusal with text, or a non-OK status with details); the bystanders are still connected, were
sent nothing new once the fuzz session's own effects were gone (a fuzzed node that was admitted
is withdrawn when its session ends: ``grace_period=0``) and their state is what it was.

Budget: :mod:`tests.fuzzing` (``FABRIC_FUZZ_EXAMPLES=N ./dev.sh test -m fuzz`` for a long run).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf import message_factory
from hypothesis import assume, given
from hypothesis import strategies as st

from fabric import types
from fabric.control import client, codec, reflector
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc
from tests.fuzzing import budget
from tests.unit.test_planner import CONFIG, E1, E2, W1
from tests.waiting import wait_until_async

T = TypeVar("T")
FD = pb_descriptor.FieldDescriptor
SERVICE = "/kosmos.fabric.v1.Fabric/"
#: How long one fuzz RPC may take before the example fails (a hang is a bug too).
RPC_TIMEOUT_S = 10.0
BYSTANDER_PUBLISHER = "bystander/pub"
BYSTANDER_RECORD = pb.Record(kind="bystander.io/kind", name="keep-me", version=7, data=b"bystander")
#: Status codes that mean "the reflector failed", never an answer to bad input.
BUG_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
#: What grpc.aio's client makes of a write that races the server's end of the RPC (the server
#: answered and closed while the client still sent): the client library's own INTERNAL
#: (``_StreamRequestMixin._write``: ``set_internal_error``), the server's status lost. Never the
#: reflector's: its INTERNAL says "reflector bug in ..." and sets ``Reflector.crashed``.
CLIENT_WRITE_RACE = "Internal error from Core"

# ---------------------------------------------------------------------------------------------
# Strategies: messages from the proto descriptors, and byte-level mutations
# ---------------------------------------------------------------------------------------------

#: Strings that are almost right: names of the configuration, addresses, CIDRs, identities.
NEAR_MISSES = (
    "", "east", "west", "south", "gw", "nowhere", "e1", "e2", "e9", "E1", "east/e1", "east/e9", "a/b/c", "/", "x/",
    "198.18.0.11", "198.18.0.99", "198.18.1.200", "0.0.0.0", "255.255.255.255", "300.1.1.1", "::", "::1",
    "fd00::99", "fe80::1%eth0", "10.10.9.0/24", "10.10.1.0/24", "10.10.0.0/16", "10.20.7.0/24", "10.10.9.1/24",
    "10.10.9.0/33", "0.0.0.0/0", "::/0", "fd00:10::/64", "10.96.0.0/20", "100.64.0.0/10", "1.2.3.4/-1",
    "tree/root-a", "scheduler/s", "bystander/pub", "kind", "tree.kosmos.io/free", "a" * 64, "a" * 300,
    "vx-bridge", "tunnel", "hairpin", "device/vx-bridge", "route/10.10.0.0/16", "\x00", "é", "\u202e",
)


def _text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(NEAR_MISSES), st.text(max_size=24))


def _scalar(f: pb_descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FD.TYPE_STRING:
        return _text()
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(width=64 if t == FD.TYPE_DOUBLE else 32)
    if t == FD.TYPE_ENUM:
        assert f.enum_type is not None
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    bits = 64 if t in (FD.TYPE_UINT64, FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_FIXED64, FD.TYPE_SFIXED64) else 32
    if t in (FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_FIXED32, FD.TYPE_FIXED64):
        edges = [0, 1, 2, 68, 1280, 1500, 9000, 65535, 2**bits - 1]
        return st.one_of(st.sampled_from(edges), st.integers(0, 2**bits - 1))
    return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@st.composite
def _message(draw: st.DrawFn, desc: pb_descriptor.Descriptor, depth: int) -> pb_message.Message:
    msg = message_factory.GetMessageClass(desc)()
    in_oneof = {f.name for o in desc.oneofs for f in o.fields}
    chosen = [draw(st.sampled_from([None, *o.fields])) for o in desc.oneofs]
    fields = [f for f in chosen if f is not None]
    fields += [f for f in desc.fields if f.name not in in_oneof and draw(st.booleans())]
    for f in fields:
        if f.type == FD.TYPE_MESSAGE:
            if depth >= 4 or f.message_type is None:
                continue
            sub = _message(f.message_type, depth + 1)
            if f.is_repeated:
                for v in draw(st.lists(sub, max_size=3)):
                    getattr(msg, f.name).add().CopyFrom(v)
            else:
                getattr(msg, f.name).SetInParent()
                getattr(msg, f.name).CopyFrom(draw(sub))
        elif f.is_repeated:
            getattr(msg, f.name).extend(draw(st.lists(_scalar(f), max_size=4)))
        else:
            setattr(msg, f.name, draw(_scalar(f)))
    return msg


def messages(cls: Callable[..., T]) -> st.SearchStrategy[T]:
    """Messages of ``cls`` built from its descriptor: any subset of fields, one member of each
    oneof (or none), values from the whole range of each type."""
    return _message(cls.DESCRIPTOR, 0)  # type: ignore[attr-defined,return-value]


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """A seed with one to four byte-level mutations, or random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=96))
    data = bytearray(draw(st.sampled_from(list(seeds))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate", "splice", "dup")))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from((0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x22, 0x1A)))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            other = draw(st.sampled_from(list(seeds)))
            data[pos:] = other[draw(st.integers(0, len(other))) :]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


def _ser(*msgs: pb_message.Message) -> list[bytes]:
    return [m.SerializeToString() for m in msgs]


#: Valid SyncNode requests (announcements of nodes other than the bystander, and what follows).
SYNC_SEEDS = _ser(
    pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(E2))),
    pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(W1))),
    pb.SyncNodeRequest(keepalive=pb.Keepalive(interval_ms=2000)),
    pb.SyncNodeRequest(applied=pb.Applied(version=3)),
    pb.SyncNodeRequest(peer_report=pb.PeerReport(unreachable=["east/e1", "west/w1"])),
)
PUBLISH_SEEDS = _ser(
    pb.PublishRecordsRequest(seq=1, open=pb.PublishOpen(identity="tree/root-a")),
    pb.PublishRecordsRequest(seq=2, put=pb.Record(kind="tree.kosmos.io/free", name="n1", version=1, data=b"{}")),
    pb.PublishRecordsRequest(seq=3, delete=pb.RecordDelete(kind="tree.kosmos.io/free", name="n1")),
    pb.PublishRecordsRequest(seq=4, end_of_snapshot=pb.PublishEndOfSnapshot()),
)
WATCH_SEEDS = _ser(
    pb.WatchRecordsRequest(kind="tree.kosmos.io/free"),
    pb.WatchRecordsRequest(kind="bystander.io/kind", publisher=BYSTANDER_PUBLISHER),
)


#: Most raw sessions start with a valid first message, so the mutations reach what follows it
#: (a session that does not open or announce well is refused at once).
VALID_OPEN = pb.PublishRecordsRequest(seq=1, open=pb.PublishOpen(identity="fuzz/pub")).SerializeToString()
VALID_ANNOUNCE = SYNC_SEEDS[0]


def _sessions(first: bytes, seeds: Sequence[bytes], max_size: int) -> st.SearchStrategy[list[bytes]]:
    tail = st.lists(mutated(seeds), min_size=1, max_size=max_size)
    return st.one_of(tail, tail.map(lambda t: [first, *t]))


# ---------------------------------------------------------------------------------------------
# The harness: one live reflector and its bystanders per test
# ---------------------------------------------------------------------------------------------


class _Agent:
    """The bystander agent's handler: what its session was told."""

    def __init__(self) -> None:
        self.connections: list[tuple[bool, str]] = []
        self.rejections: list[str] = []
        self.snapshots = 0

    async def on_snapshot(self, state: types.NodeState, version: int) -> None:
        self.snapshots += 1

    async def on_delta(self, delta: types.StateDelta, version: int) -> None:
        return None

    async def on_connection(self, connected: bool, reason: str) -> None:
        self.connections.append((connected, reason))

    async def on_rejected(self, reason: str) -> None:
        self.rejections.append(reason)


class Outcome:
    """What one fuzz RPC got back: its responses and how it ended."""

    def __init__(self, responses: list[Any], code: grpc.StatusCode, details: str) -> None:
        self.responses = responses
        self.code = code
        self.details = details

    def __repr__(self) -> str:
        return f"Outcome({self.code.name}: {self.details!r}, {self.responses!r})"


#: The bystanders' keepalive (both sides: a session uses the smaller). The harness's loop stands
#: still between examples, while hypothesis makes the next one: with a hold of 3 keepalives, a
#: pause longer than that on a loaded machine ended the bystander's session (1.5 s before).
KEEPALIVE_S = 10.0


class Harness:
    """One reflector on 127.0.0.1 with its bystanders, on an event loop of the test's own that
    runs only while an example (or the set-up) runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.refl = reflector.Reflector(
            CONFIG, grace_period=0, keepalive_interval=KEEPALIVE_S, startup_hold=0, coalesce_window=0,
            max_coalesce_window=0, records_grace_period=0, records_startup_hold=0,
        )  # fmt: skip
        self.target = ""
        self.channel: grpc.aio.Channel | None = None
        self.agent = _Agent()
        self.session: client.AgentSession | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.initial_state = types.NodeState()
        self.publisher: Any = None
        self.watched: list[pb.WatchRecordsResponse] = []
        self.watch: Any = None

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]

    async def start(self) -> None:
        (self.target,) = await self.refl.start(["127.0.0.1:0"])
        self.channel = grpc.aio.insecure_channel(self.target)
        stub = pb_grpc.FabricStub(self.channel)
        # The agent: east/e1, synced.
        self.session = client.AgentSession(self.target, E1, self.agent, keepalive_interval=KEEPALIVE_S)
        self.tasks.append(asyncio.create_task(self.session.run()))
        await wait_until_async(lambda: self.agent.snapshots == 1, 10, "the bystander agent synced")
        self.initial_state = self.session.state
        # A publisher holding one record, and a subscriber of that publisher's records.
        opened = asyncio.Event()
        self.pub_out: asyncio.Queue[pb.PublishRecordsRequest] = asyncio.Queue()
        for r in (pb.PublishRecordsRequest(seq=1, open=pb.PublishOpen(identity=BYSTANDER_PUBLISHER)),
                  pb.PublishRecordsRequest(seq=2, put=BYSTANDER_RECORD),
                  pb.PublishRecordsRequest(seq=3, end_of_snapshot=pb.PublishEndOfSnapshot())):  # fmt: skip
            self.pub_out.put_nowait(r)

        async def pub_requests() -> AsyncIterator[pb.PublishRecordsRequest]:
            while True:
                yield await self.pub_out.get()

        self.publisher = stub.PublishRecords(pub_requests())
        self.pub_answers: list[pb.PublishRecordsResponse] = []

        async def read_publisher() -> None:
            async for msg in self.publisher:
                self.pub_answers.append(msg)
                if len(self.pub_answers) == 3:
                    opened.set()

        self.tasks.append(asyncio.create_task(read_publisher()))
        await asyncio.wait_for(opened.wait(), 10)
        assert [a.ack.refused for a in self.pub_answers[1:]] == [0, 0], self.pub_answers
        self.watch = stub.WatchRecords(pb.WatchRecordsRequest(publisher=BYSTANDER_PUBLISHER))

        async def read_watch() -> None:
            async for msg in self.watch:
                self.watched.append(msg)

        self.tasks.append(asyncio.create_task(read_watch()))
        await wait_until_async(
            lambda: any(m.kind == pb.WatchRecordsResponse.KIND_END_OF_SNAPSHOT for m in self.watched), 10,
            "the bystander subscriber synced",
        )
        self.watched_at_start = list(self.watched)
        assert [u.name for m in self.watched for u in m.upserts] == ["keep-me"]

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        for call in (self.publisher, self.watch):
            if call is not None:
                call.cancel()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.channel is not None:
            await self.channel.close()
        await self.refl.stop(0)

    # -- one fuzz RPC -----------------------------------------------------------------------

    async def stream(self, rpc: str, requests: Sequence[Any], response: Any, *, raw: bool) -> Outcome:
        """A stream-stream RPC with ``requests`` (then half-close); every response to the end."""
        assert self.channel is not None
        method = self.channel.stream_stream(
            SERVICE + rpc,
            request_serializer=None if raw else (lambda m: m.SerializeToString()),
            response_deserializer=response.FromString,
        )
        call = method(iter(list(requests)), timeout=RPC_TIMEOUT_S)
        got: list[Any] = []
        try:
            async for msg in call:
                got.append(msg)
        except grpc.aio.AioRpcError as e:
            return Outcome(got, e.code(), e.details() or "")
        return Outcome(got, await call.code(), await call.details() or "")

    async def watch_records(self, request: Any, *, raw: bool) -> Outcome:
        """WatchRecords with ``request``: responses up to END_OF_SNAPSHOT (then cancelled: a
        watch never ends by itself) or the end of the stream."""
        assert self.channel is not None
        method = self.channel.unary_stream(
            SERVICE + "WatchRecords",
            request_serializer=None if raw else (lambda m: m.SerializeToString()),
            response_deserializer=pb.WatchRecordsResponse.FromString,
        )
        call = method(request, timeout=RPC_TIMEOUT_S)
        got: list[pb.WatchRecordsResponse] = []
        try:
            async for msg in call:
                got.append(msg)
                if msg.kind == pb.WatchRecordsResponse.KIND_END_OF_SNAPSHOT:
                    call.cancel()
                    return Outcome(got, grpc.StatusCode.OK, "")
        except grpc.aio.AioRpcError as e:
            return Outcome(got, e.code(), e.details() or "")
        return Outcome(got, await call.code(), await call.details() or "")

    # -- what must hold after every example ---------------------------------------------------

    async def unharmed(self, out: Outcome) -> None:
        """The reflector did not crash; the bystanders are connected, their state is what it was
        once the fuzz session's node (if it was admitted) is withdrawn again."""
        assert self.refl.crashed is None, (self.refl.crashed, out)
        lost = out.code == grpc.StatusCode.INTERNAL and out.details == CLIENT_WRITE_RACE
        assert lost or out.code not in BUG_CODES, out
        if out.code != grpc.StatusCode.OK and not lost:
            assert out.details.strip(), f"a refusal without a reason: {out}"
        session = self.session
        assert session is not None

        def settled() -> bool:
            nodes = self.refl.status().nodes()
            return (
                [n.key for n in nodes] == [str(E1.key)]
                and nodes[0].connected
                and session.version == nodes[0].planned_version
                and session.state == self.initial_state
            )

        await wait_until_async(settled, 10, f"the bystander agent back at its state after {out}")
        assert self.agent.connections == [(True, f"connected to {self.target}")], self.agent.connections
        assert self.agent.rejections == [] and self.agent.snapshots == 1
        assert not self.publisher.done() and not self.watch.done()
        assert len(self.pub_answers) == 3
        assert self.watched == self.watched_at_start, "the bystander subscriber was sent a change"
        assert self.refl.records.records(publisher=BYSTANDER_PUBLISHER) == [
            pb.Record(kind=BYSTANDER_RECORD.kind, name="keep-me", version=7, data=b"bystander",
                      publisher=BYSTANDER_PUBLISHER, revision=self.pub_answers[1].ack.revision)
        ]  # fmt: skip


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        h.run(h.start())
        yield h
    finally:
        with contextlib.suppress(Exception):
            h.run(h.stop())
        h.loop.close()


def _is_bystander(node: pb.Node) -> bool:
    return node.cluster == E1.cluster and node.name == E1.name


def _check_sync(out: Outcome, first: pb.SyncNodeRequest | None) -> None:
    """A session either was admitted (its first answer is a keepalive) or refused with a reason."""
    kinds = [r.WhichOneof("message") for r in out.responses]
    if "rejected" in kinds:
        rej = out.responses[kinds.index("rejected")].rejected
        assert rej.reason.strip() and rej.codes and all(c != 0 for c in rej.codes), out
        assert kinds == ["rejected"], out  # nothing before or after a refusal
    elif first is not None and first.WhichOneof("message") != "announce":
        raise AssertionError(f"a session that did not announce was not refused: {out}")


# ---------------------------------------------------------------------------------------------
# SyncNode
# ---------------------------------------------------------------------------------------------


@pytest.mark.fuzz
def test_sync_node_typed_messages(harness: Harness) -> None:
    announce_first = messages(pb.Node).map(lambda n: pb.SyncNodeRequest(announce=pb.Announce(node=n)))

    @budget(0.5)
    @given(first=st.one_of(announce_first, messages(pb.SyncNodeRequest)),
           rest=st.lists(messages(pb.SyncNodeRequest), max_size=5))  # fmt: skip
    def prop(first: pb.SyncNodeRequest, rest: list[pb.SyncNodeRequest]) -> None:
        assume(not any(r.WhichOneof("message") == "announce" and _is_bystander(r.announce.node)
                       for r in (first, *rest)))  # fmt: skip

        async def one() -> None:
            out = await harness.stream("SyncNode", [first, *rest], pb.SyncNodeResponse, raw=False)
            _check_sync(out, first)
            await harness.unharmed(out)

        harness.run(one())

    prop()


@pytest.mark.fuzz
def test_sync_node_mutated_bytes(harness: Harness) -> None:
    @budget(0.5)
    @given(_sessions(VALID_ANNOUNCE, SYNC_SEEDS, 4))
    def prop(raw: list[bytes]) -> None:
        for b in raw:
            with contextlib.suppress(pb_message.DecodeError):
                m = pb.SyncNodeRequest.FromString(b)
                assume(not (m.WhichOneof("message") == "announce" and _is_bystander(m.announce.node)))

        async def one() -> None:
            out = await harness.stream("SyncNode", raw, pb.SyncNodeResponse, raw=True)
            await harness.unharmed(out)

        harness.run(one())

    prop()


# ---------------------------------------------------------------------------------------------
# PublishRecords
# ---------------------------------------------------------------------------------------------


def _check_publish(out: Outcome, requests: Sequence[pb.PublishRecordsRequest]) -> None:
    """Opened, then one ack per write in order (a refused one with its class and text), until a
    second open ends the session; or refused at the open with a status that says why."""
    if not out.responses:  # refused at the open, by its status
        assert out.code != grpc.StatusCode.OK or not requests, out
        return
    assert out.responses[0].WhichOneof("message") == "opened", out
    acks = [r.ack for r in out.responses[1:]]
    assert all(r.WhichOneof("message") == "ack" for r in out.responses[1:]), out
    writes = list(requests[1:])
    for i, ack in enumerate(acks):
        assert ack.seq == writes[i].seq, out
        if ack.refused:
            assert ack.reason.strip() and ack.revision == 0, out
    if len(acks) < len(writes):  # ended early: only by a second open
        assert writes[len(acks)].WhichOneof("message") == "open", out
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT or out.details == CLIENT_WRITE_RACE, out


@pytest.mark.fuzz
def test_publish_records_typed_messages(harness: Harness) -> None:
    opens = messages(pb.PublishOpen).map(lambda o: pb.PublishRecordsRequest(open=o))

    @budget(0.5)
    @given(first=st.one_of(opens, messages(pb.PublishRecordsRequest)),
           rest=st.lists(messages(pb.PublishRecordsRequest), max_size=6))  # fmt: skip
    def prop(first: pb.PublishRecordsRequest, rest: list[pb.PublishRecordsRequest]) -> None:
        assume(not any(r.WhichOneof("message") == "open" and r.open.identity == BYSTANDER_PUBLISHER
                       for r in (first, *rest)))  # fmt: skip

        async def one() -> None:
            out = await harness.stream("PublishRecords", [first, *rest], pb.PublishRecordsResponse, raw=False)
            _check_publish(out, [first, *rest])
            await harness.unharmed(out)

        harness.run(one())

    prop()


@pytest.mark.fuzz
def test_publish_records_mutated_bytes(harness: Harness) -> None:
    @budget(0.5)
    @given(_sessions(VALID_OPEN, PUBLISH_SEEDS, 5))
    def prop(raw: list[bytes]) -> None:
        for b in raw:
            with contextlib.suppress(pb_message.DecodeError):
                m = pb.PublishRecordsRequest.FromString(b)
                assume(not (m.WhichOneof("message") == "open" and m.open.identity == BYSTANDER_PUBLISHER))

        async def one() -> None:
            out = await harness.stream("PublishRecords", raw, pb.PublishRecordsResponse, raw=True)
            await harness.unharmed(out)

        harness.run(one())

    prop()


# ---------------------------------------------------------------------------------------------
# WatchRecords
# ---------------------------------------------------------------------------------------------


@pytest.mark.fuzz
def test_watch_records_typed_and_mutated(harness: Harness) -> None:
    @budget(0.5)
    @given(st.one_of(messages(pb.WatchRecordsRequest), mutated(WATCH_SEEDS)))
    def prop(request: pb.WatchRecordsRequest | bytes) -> None:
        async def one() -> None:
            out = await harness.watch_records(request, raw=isinstance(request, bytes))
            if out.code == grpc.StatusCode.OK:  # a snapshot, complete
                assert out.responses and out.responses[-1].kind == pb.WatchRecordsResponse.KIND_END_OF_SNAPSHOT
            await harness.unharmed(out)

        harness.run(one())

    prop()


# ---------------------------------------------------------------------------------------------
# The crashes the fuzzing found, as plain examples
# ---------------------------------------------------------------------------------------------

#: Not a protobuf message: field 0 does not exist ("wire format was corrupt").
CORRUPT = b"\x00"


def _refused_malformed(out: Outcome) -> None:
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT, out
    assert "malformed" in out.details and "corrupt" in out.details, out


def test_malformed_first_sync_node_message_is_refused_not_a_crash(harness: Harness) -> None:
    async def body() -> None:
        out = await harness.stream("SyncNode", [CORRUPT], pb.SyncNodeResponse, raw=True)
        _refused_malformed(out)
        await harness.unharmed(out)

    harness.run(body())


def test_malformed_publish_records_messages_are_refused_not_a_crash(harness: Harness) -> None:
    async def body() -> None:
        for requests in ([CORRUPT], [VALID_OPEN, PUBLISH_SEEDS[1], CORRUPT]):
            out = await harness.stream("PublishRecords", requests, pb.PublishRecordsResponse, raw=True)
            _refused_malformed(out)
            await harness.unharmed(out)
        assert harness.refl.records.records(publisher="fuzz/pub") == []  # its session ended: expired

    harness.run(body())


def test_malformed_unary_requests_are_invalid_argument_not_unknown(harness: Harness) -> None:
    async def body() -> None:
        out = await harness.watch_records(CORRUPT, raw=True)
        _refused_malformed(out)
        await harness.unharmed(out)
        assert harness.channel is not None
        status = harness.channel.unary_unary(SERVICE + "GetStatus", request_serializer=None,
                                             response_deserializer=pb.GetStatusResponse.FromString)  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await status(CORRUPT, timeout=RPC_TIMEOUT_S)
        _refused_malformed(Outcome([], info.value.code(), info.value.details() or ""))
        # A well-formed request is still answered.
        got = await status(b"", timeout=RPC_TIMEOUT_S)
        assert [c.name for c in got.clusters] == [c.name for c in CONFIG.clusters]
        await harness.unharmed(out)

    harness.run(body())
