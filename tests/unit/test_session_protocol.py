"""The SyncNode protocol rules on the client side (fabric.control.client.SyncStream), strict:
a delta before END_OF_SNAPSHOT or a delta version that does not increase ends the session, and
the agent starts over from a fresh snapshot.

The end-to-end tests use a scripted reflector (a grpc.aio server on 127.0.0.1 that sends, per
session, exactly the messages a test lists), because the real reflector never breaks the rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest

from fabric import types
from fabric.control import client, codec
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc

KEEPALIVE = 0.1
NODE = types.NodeAnnouncement("east", "e1", "198.18.0.11", ("10.10.1.0/24",))
X = types.RouteEntry(dst="10.20.1.0/24", via="100.82.0.21", device="vx-bridge")
Y = types.RouteEntry(dst="10.20.2.0/24", via="100.82.0.22", device="vx-bridge")


def keepalive() -> pb.SyncNodeResponse:
    return pb.SyncNodeResponse(keepalive=codec.keepalive_message(KEEPALIVE))


def snapshot(version: int, *entries: types.Entry, epoch: str = "scripted") -> list[pb.SyncNodeResponse]:
    return codec.snapshot_messages(types.NodeState.from_entries(entries), version, epoch)


def delta(version: int, upserts: Sequence[types.Entry] = (), removals: Sequence[str] = ()) -> pb.SyncNodeResponse:
    return codec.delta_message(types.StateDelta(upserts=tuple(upserts), removals=tuple(removals)), version)


async def wait_for(pred: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class Recorder:
    """A SessionHandler that records every callback in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.events if k == kind)

    async def on_snapshot(self, state: types.NodeState, version: int) -> None:
        self.events.append(("snapshot", (state, version)))

    async def on_delta(self, delta: types.StateDelta, version: int) -> None:
        self.events.append(("delta", (delta, version)))

    async def on_connection(self, connected: bool, reason: str) -> None:
        self.events.append(("connection", (connected, reason)))

    async def on_rejected(self, reason: str) -> None:
        self.events.append(("rejected", reason))


class Scripted(pb_grpc.FabricServicer):  # type: ignore[misc]
    """Session n gets ``scripts[n]`` (the last script again for any later one), keepalives every
    KEEPALIVE after it, and stays open until the client goes."""

    def __init__(self, scripts: list[list[pb.SyncNodeResponse]]) -> None:
        self.scripts = scripts
        self.sessions = 0

    async def SyncNode(
        self, request_iterator: AsyncIterator[pb.SyncNodeRequest], context: Any
    ) -> AsyncIterator[pb.SyncNodeResponse]:
        first = await request_iterator.__anext__()
        assert first.WhichOneof("message") == "announce"
        script = self.scripts[min(self.sessions, len(self.scripts) - 1)]
        self.sessions += 1
        for msg in script:
            yield msg
        while True:
            await asyncio.sleep(KEEPALIVE)
            yield keepalive()


@contextlib.asynccontextmanager
async def scripted_session(
    scripts: list[list[pb.SyncNodeResponse]],
) -> AsyncIterator[tuple[client.AgentSession, Recorder, Scripted]]:
    server = grpc.aio.server()
    servicer = Scripted(scripts)
    pb_grpc.add_FabricServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    rec = Recorder()
    s = client.AgentSession(f"127.0.0.1:{port}", NODE, rec, keepalive_interval=KEEPALIVE, backoff=(0.02, 0.05))
    task = asyncio.create_task(s.run())
    try:
        yield s, rec, servicer
    finally:
        await s.close()
        await asyncio.wait_for(task, 2)
        await server.stop(0)


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 10.0))


def test_delta_before_end_of_snapshot_ends_the_session_and_a_fresh_snapshot_follows() -> None:
    first = [keepalive(), *snapshot(5, X)[:-1], delta(5, upserts=[Y]), *snapshot(5, X)[-1:]]
    second = [keepalive(), *snapshot(7, X, epoch="second")]

    async def body() -> None:
        async with scripted_session([first, second]) as (s, rec, servicer):
            await wait_for(lambda: rec.count("snapshot") == 1, what="a snapshot")
            # The delta never reached the state: the only snapshot is the second session's.
            assert rec.events[-1] == ("snapshot", (types.NodeState.from_entries([X]), 7))
            assert s.epoch == "second" and servicer.sessions == 2
            assert s.protocol_violations == 1
            lost = [v for k, v in rec.events if k == "connection" and not v[0]]
            assert len(lost) == 1
            assert "delta (version 5) before END_OF_SNAPSHOT" in lost[0][1]
            assert "node east/e1" in lost[0][1]

    run(body())


@pytest.mark.parametrize("repeat", [6, 3], ids=["same-version", "older-version"])
def test_delta_version_that_does_not_increase_ends_the_session(repeat: int) -> None:
    first = [keepalive(), *snapshot(5, X), delta(6, upserts=[Y]), delta(repeat, removals=[types.entry_key(X)])]
    second = [keepalive(), *snapshot(9, X, Y, epoch="second")]

    async def body() -> None:
        async with scripted_session([first, second]) as (s, rec, servicer):
            await wait_for(lambda: rec.count("snapshot") == 2, what="a fresh snapshot after the violation")
            kinds = [(k, v[1] if k != "connection" else v[0]) for k, v in rec.events]
            assert kinds == [
                ("connection", True),
                ("snapshot", 5),
                ("delta", 6),  # the second delta (version `repeat`) was never handed on
                ("connection", False),
                ("connection", True),
                ("snapshot", 9),
            ]
            assert f"delta version {repeat} does not increase on version 6" in rec.events[3][1][1]
            assert s.state == types.NodeState.from_entries([X, Y]) and s.version == 9
            assert s.protocol_violations == 1 and servicer.sessions == 2

    run(body())


# -- the state machine alone ----------------------------------------------------------------


def feed_all(stream: client.SyncStream, msgs: Sequence[pb.SyncNodeResponse]) -> list[client.SyncEvent | None]:
    return [stream.feed(m) for m in msgs]


def test_stream_in_order_builds_the_state() -> None:
    st = client.SyncStream("test")
    msgs = [keepalive(), *snapshot(5, X), delta(6, upserts=[Y]), delta(8, removals=["route/10.20.1.0/24"])]
    events = feed_all(st, msgs)
    assert events == [
        client.Keepalive(KEEPALIVE),
        None,
        client.Synced(5, "scripted"),
        client.Changed(types.StateDelta(upserts=(Y,)), 6),
        client.Changed(types.StateDelta(removals=("route/10.20.1.0/24",)), 8),
    ]
    assert st.state == types.NodeState.from_entries([Y]) and st.version == 8 and st.synced


@pytest.mark.parametrize(
    ("msgs", "what"),
    [
        ([delta(1, upserts=[X])], "delta (version 1) before END_OF_SNAPSHOT"),
        ([*snapshot(5, X), delta(5)], "delta version 5 does not increase on version 5"),
        ([*snapshot(5, X), delta(4)], "delta version 4 does not increase on version 5"),
        ([*snapshot(5, X), *snapshot(6, Y)[:1]], "snapshot chunk after END_OF_SNAPSHOT"),
        ([*snapshot(5), *snapshot(6)], "second END_OF_SNAPSHOT (version 6 after version 5)"),
        ([pb.SyncNodeResponse()], "unknown message None"),
    ],
)
def test_stream_violations_name_what_and_whose(msgs: list[pb.SyncNodeResponse], what: str) -> None:
    st = client.SyncStream("agent east/e1")
    with pytest.raises(client.ProtocolViolation) as exc:
        feed_all(st, msgs)
    assert what in str(exc.value) and "agent east/e1" in str(exc.value)


def test_removal_of_an_unknown_entry_only_counts_when_asked() -> None:
    msgs = [*snapshot(5, X), delta(6, removals=["route/10.99.0.0/24"])]
    lenient = client.SyncStream("agent")
    feed_all(lenient, msgs)
    assert lenient.state == types.NodeState.from_entries([X])
    with pytest.raises(client.ProtocolViolation) as exc:
        feed_all(client.SyncStream("bench agent", removals_must_exist=True), msgs)
    assert "delta 6 removes 'route/10.99.0.0/24', which was never sent" in str(exc.value)


def test_a_shared_decoder_decodes_each_entry_once() -> None:
    """Streams sharing an EntryDecoder (an agent across its sessions, the benchmark's agents of
    one worker) decode an entry once: a later snapshot or delta carrying it gets the very object
    decoded first, and each stream's state is still its own."""
    dec = codec.EntryDecoder()
    a, b = client.SyncStream("a", decoder=dec), client.SyncStream("b", decoder=dec)
    feed_all(a, [*snapshot(5, X, Y), delta(6, removals=["route/10.20.2.0/24"])])
    feed_all(b, [*snapshot(3, X), delta(4, upserts=[Y])])
    assert dec.decoded == 2 and len(dec) == 2
    assert a.entries["route/10.20.1.0/24"] is b.entries["route/10.20.1.0/24"]
    assert a.state == types.NodeState.from_entries([X]) and b.state == types.NodeState.from_entries([X, Y])


def test_decoder_starts_over_at_its_limit_and_still_decodes_correctly() -> None:
    dec = codec.EntryDecoder(limit=2)
    routes = [types.RouteEntry(f"10.20.{i}.0/24", "100.82.0.1", "vx-bridge") for i in range(5)]
    for r in routes:
        assert dec.keyed(codec.entry_to_pb(r)) == (types.entry_key(r), r)
    assert len(dec) <= 2 and dec.decoded == 5
    with pytest.raises(codec.DecodeError, match="no device, peer or route"):
        dec.keyed(pb.Entry())
