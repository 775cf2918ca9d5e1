"""The reflector's bounds (fabric/control/bounds.py, issue 20 item 4), in one process on
127.0.0.1: a client that reads nothing is cut off with its queue bounded (measured) while the
others stay in sync, keepalive negotiation (clamped, the smaller side's, followed by the agent),
streams and announcements per identity or host, message sizes, and the flags and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from fabric import types
from fabric.control import bounds, client, codec, record_store, reflector, reflector_cli, reflector_service, relay_hub
from fabric.control.generated import fabric_pb2 as pb
from fabric.control.generated import fabric_pb2_grpc as pb_grpc
from tests.unit.test_control_session import CONFIG, E1, E2, W1, Recorder, run
from tests.waiting import wait_until_async

KEEPALIVE = 0.2


@contextlib.asynccontextmanager
async def serving(limits: bounds.Limits, **kw: Any) -> AsyncIterator[tuple[reflector.Reflector, str]]:
    refl = reflector.Reflector(CONFIG, grace_period=kw.pop("grace", 5.0), startup_hold=0.0, limits=limits,
                               keepalive_interval=kw.pop("keepalive", KEEPALIVE), **kw)  # fmt: skip
    (target,) = await refl.start(["127.0.0.1:0"])
    try:
        yield refl, target
    finally:
        await refl.stop(0)


class RawAgent:
    """A SyncNode client that announces, keeps alive (proposing ``propose`` seconds) and reads
    nothing at all unless told to: the slow or hostile client."""

    def __init__(self, target: str, ann: types.NodeAnnouncement, *, propose: float = 0.1, keepalives: bool = True
                 ) -> None:  # fmt: skip
        # No BDP probing: the HTTP/2 window stays at its 64 KiB start, as a client that wants the
        # reflector to buffer for it would keep it (with probing gRPC grows it to megabytes).
        options = [*client.CHANNEL_OPTIONS, ("grpc.http2.bdp_probe", 0)]
        self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stop = asyncio.Event()
        self.propose = propose
        self.keepalives = keepalives
        self.call: Any = pb_grpc.FabricStub(self.channel).SyncNode(self._requests(ann))

    async def _requests(self, ann: types.NodeAnnouncement) -> AsyncIterator[pb.SyncNodeRequest]:
        yield pb.SyncNodeRequest(announce=pb.Announce(node=codec.node_to_pb(ann)))
        while not self.stop.is_set():
            if self.keepalives:
                yield pb.SyncNodeRequest(keepalive=codec.keepalive_message(self.propose))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self.stop.wait()

    async def status(self) -> tuple[grpc.StatusCode, str]:
        """Read everything to the end; the final status. Writes stop first: a write racing the
        status can make the gRPC client report "Internal error from Core" instead of it."""
        self.keepalives = False
        try:
            while (await self.call.read()) is not grpc.aio.EOF:
                pass
            return await self.call.code(), await self.call.details()
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""

    async def close(self) -> None:
        self.stop.set()
        self.call.cancel()
        await self.channel.close(grace=None)


def session_of(refl: reflector.Reflector, key: str) -> reflector._Session | None:
    rec = refl._nodes.get(types.NodeKey.parse(key))
    return rec.session if rec is not None else None


# -- the acceptance: a client that reads nothing while 10,000 deltas are produced -----------------


def test_client_that_reads_nothing_is_cut_off_memory_bounded_others_in_sync() -> None:
    """10,000 generations, each a delta to the east nodes (a churning west node moves its pod
    CIDR back and forth). E2 announces and keeps alive but reads nothing. Measured: the bytes queued to it
    never pass the limit plus one delta (after its snapshot), and the memory the reflector holds
    after all 10,000 is no more than after the first 1,000 plus a fraction of what unbounded
    queueing would have held. E1 and W1 apply every delta and end in sync (W1 in w9's own
    cluster gets few: pods inside a cluster are not the fabric's to route)."""
    limit = 32 * 1024
    deltas = 10_000

    async def body() -> None:
        # Keepalives of 1 s: the event loop is busy producing, and the test is not about them.
        async with serving(bounds.Limits(send_queue_bytes=limit), keepalive=1.0) as (refl, target):
            fast: list[tuple[client.AgentSession, Recorder, asyncio.Task[None]]] = []
            for ann in (E1, W1):
                rec = Recorder(counts_only=True)
                s = client.AgentSession(target, ann, rec, keepalive_interval=1.0, backoff=(0.05, 0.2))
                rec.session = s
                fast.append((s, rec, asyncio.create_task(s.run())))
            slow = RawAgent(target, E2, propose=1.0)
            await wait_until_async(lambda: all(session_of(refl, k) is not None for k in ("east/e1", "west/w1",
                                   "east/e2")), 5, "three sessions")  # fmt: skip
            slow_session = session_of(refl, "east/e2")
            assert slow_session is not None
            await wait_until_async(lambda: slow_session.synced, 5, "the slow session's snapshot is queued")

            churn = [types.NodeAnnouncement("west", "w9", "198.18.0.29", (f"10.20.{9 + i}.0/24",)) for i in (0, 1)]
            high_water = 0
            produced = 0
            per_message = 0.0  # bytes per queued message, to tell what unbounded queueing would have held
            mem_after_1000 = 0
            try:
                for i in range(deltas):
                    fake = reflector._Session(churn[i % 2].key, "churn", refl.clock())
                    assert refl._admit(churn[i % 2], fake) is None
                    gen = refl.generation
                    refl._flush()
                    assert refl.generation == gen + 1
                    produced += 1
                    await asyncio.sleep(0)  # the others' streams and reads go on meanwhile
                    if not slow_session.closed and slow_session.queue.bounded_bytes > high_water:
                        high_water = slow_session.queue.bounded_bytes
                        per_message = high_water / slow_session.queue.qsize()
                    if i % 100 == 99:  # let the agents that do read keep up (they are not the test)
                        await wait_until_async(
                            lambda: all((r := refl._nodes[s.announcement.key]).applied_version == r.planned_version
                                        for s, _, _ in fast), 10, "E1 and W1 applied their latest plans")  # fmt: skip
                    if i == 999:  # traced from here: what the reflector keeps from now on
                        tracemalloc.start()
                        mem_after_1000 = tracemalloc.get_traced_memory()[0]
                mem_after_all = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            assert produced == deltas
            # The slow one was cut off with a clear status, its queue dropped.
            assert slow_session.closed and slow_session.queue.qsize() <= 1
            assert refl.gate.cut == {"sync_node": 1}
            code, details = await asyncio.wait_for(slow.status(), 10)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert "--send-queue-bytes=32768" in details and "node east/e2" in details
            # Its queue never held more than the limit plus one delta after its snapshot.
            assert 0 < high_water <= limit + 200
            # Memory: no growth with the number of deltas (the queue's content is gone).
            growth = mem_after_all - mem_after_1000
            print(f"slow session high water {high_water} B (unbounded: about {per_message * deltas:.0f} B); traced "
                  f"memory after 1,000 deltas {mem_after_1000} B, after {deltas:,} {mem_after_all} B "
                  f"(growth {growth} B)")  # fmt: skip
            assert growth < 256 * 1024 < per_message * deltas / 2
            # Every other agent is in sync with the plan.
            nodes = list(refl.topology.nodes)
            for s, rec, _ in fast:
                node = refl._nodes[s.announcement.key]
                assert node.applied_version == node.planned_version
                assert s.state == refl._planner.state(s.announcement.key)
                assert rec.snapshots == 1  # never cut, never resynced
            assert any(n.key == churn[(deltas - 1) % 2].key for n in nodes)
            # E1 (east, as the slow E2) had a delta from every generation; W1 shares w9's cluster.
            # (the first may come with its snapshot; E2's cut moves the east gateway role: one more)
            assert deltas - 2 <= fast[0][1].deltas <= deltas + 2
            await slow.close()
            for s, _, task in fast:
                await s.close()
                await asyncio.wait_for(task, 5)

    run(body(), timeout=600)


# -- keepalive negotiation ---------------------------------------------------------------------


def test_negotiated_keepalive_is_clamped_and_the_smaller_sides() -> None:
    lim = bounds.Limits(keepalive_min_s=0.5, keepalive_max_s=60.0)
    assert bounds.negotiate_keepalive(2.0, 1.0, lim) == 1.0  # the agent's, smaller
    assert bounds.negotiate_keepalive(2.0, 30.0, lim) == 2.0  # ours, smaller
    assert bounds.negotiate_keepalive(2.0, 3600.0, lim) == 2.0  # no immortal session
    assert bounds.negotiate_keepalive(2.0, 0.001, lim) == 0.5  # no flood of keepalives
    assert bounds.negotiate_keepalive(120.0, 3600.0, lim) == 60.0  # clamped, then the smaller
    with pytest.raises(ValueError, match="--keepalive-min-s 5 is above --keepalive-max-s 1"):
        bounds.Limits(keepalive_min_s=5, keepalive_max_s=1)


def test_client_proposing_an_hour_is_still_timed_out_at_our_interval() -> None:
    """Before: the hold was 3 x max(ours, the client's), so proposing an hour kept a dead
    session for three. Now the session runs at our 0.2 s and the silent client is closed, and
    every keepalive we send it carries the negotiated interval."""

    async def body() -> None:
        async with serving(bounds.Limits(keepalive_min_s=0.1, keepalive_max_s=7200)) as (refl, target):
            agent = RawAgent(target, E1, propose=3600.0)
            await wait_until_async(lambda: session_of(refl, "east/e1") is not None, 5, "e1 connected")
            s = session_of(refl, "east/e1")
            assert s is not None
            await wait_until_async(lambda: s.peer_interval == 3600.0, 5, "the proposal was read")
            assert s.interval == KEEPALIVE
            assert refl._hold_time(s) == pytest.approx(3 * KEEPALIVE)
            agent.keepalives = False  # silence from now on (the stream stays open)
            await wait_until_async(lambda: s.closed, 5, "the silent session closed")
            intervals = []
            code, details = grpc.StatusCode.OK, ""
            try:
                while (msg := await agent.call.read()) is not grpc.aio.EOF:
                    if msg.WhichOneof("message") == "keepalive":
                        intervals.append(msg.keepalive.interval_ms)
                code, details = await agent.call.code(), await agent.call.details()
            except grpc.aio.AioRpcError as e:
                code, details = e.code(), e.details() or ""
            assert code == grpc.StatusCode.UNAVAILABLE and "keepalive timeout" in details
            assert intervals and set(intervals) == {200}
            await agent.close()

    run(body())


def test_agent_follows_the_negotiated_interval() -> None:
    """An agent configured with 5 s against a reflector of 0.2 s: the session runs at 0.2 s, so
    the agent sends that often (else the reflector's hold of 0.6 s would end it) and expects the
    reflector's keepalives that often."""

    async def body() -> None:
        async with serving(bounds.Limits()) as (refl, target):
            rec = Recorder()
            agent = client.AgentSession(target, E1, rec, keepalive_interval=5.0, backoff=(0.05, 0.2))
            rec.session = agent
            task = asyncio.create_task(agent.run())
            await wait_until_async(lambda: session_of(refl, "east/e1") is not None, 5, "e1 connected")
            s = session_of(refl, "east/e1")
            assert s is not None
            await wait_until_async(lambda: s.peer_interval == 5.0, 5, "the proposal was read")
            assert s.interval == KEEPALIVE
            seen: set[float] = set()

            def heard_ten() -> bool:
                seen.add(s.last_rx)
                return len(seen) >= 10

            # Ten keepalives from the agent: 2 s at 0.2 s; the session would have died at 0.6 s
            # (and had a 5 s agent's keepalives come at 5 s, the wait would time out).
            await wait_until_async(heard_ten, 5, "ten keepalives from the agent", interval=0.05)
            assert not s.closed and session_of(refl, "east/e1") is s
            assert rec.count("connection") == 1  # connected once, never lost
            await agent.close()
            await asyncio.wait_for(task, 3)

    run(body())


# -- streams and announcements per identity or host ------------------------------------------------


def FakeContext(peer: str, ident: str | None = None) -> relay_hub.VirtualContext:
    """What StreamGate reads of a ServicerContext (its peer, auth context and status): the
    context the reflector gives an agent session carried by a TLS relay that vouched ``ident``."""
    return relay_hub.VirtualContext(peer, relay_hub.agent_auth(ident is not None, ident or ""))


def test_stream_gate_counts_per_identity_and_host_with_a_token_bucket() -> None:
    now = [100.0]
    gate = bounds.StreamGate(bounds.Limits(max_streams_per_identity=2, announce_rate=0.5, announce_burst=2,
                                           max_streams_per_host=3), clock=lambda: now[0])  # fmt: skip
    a = FakeContext("ipv4:10.0.0.1:5000", "node/east/e1")
    b = FakeContext("ipv4:10.0.0.1:5001", "node/east/e2")  # same host, another identity
    assert bounds.limit_key(a) == ("node/east/e1", True)
    assert bounds.limit_key(FakeContext("ipv6:[::1]:7")) == ("host ::1", False)
    assert bounds.limit_key(FakeContext("unix:/run/x.sock")) == ("host unix", False)
    with gate.stream("SyncNode", a, announce=True) as r1, gate.stream("SyncNode", a, announce=True) as r2:
        assert r1.refused is None and r2.refused is None
        with gate.stream("WatchTopology", a) as r3:
            assert r3.refused == "WatchTopology of node/east/e1: 2 streams open, the limit --max-streams-per-identity=2"
            assert a.code == grpc.StatusCode.RESOURCE_EXHAUSTED and a.details == r3.refused
        with gate.stream("SyncNode", b, announce=True) as other:
            assert other.refused is None  # identities are counted apart, whatever their host
    assert gate.streams("node/east/e1") == 0  # released at the end of each block
    # The burst of 2 is spent: the third announcement within the second is refused ...
    with gate.stream("SyncNode", a, announce=True) as r4:
        assert r4.refused is not None and "--announce-rate=0.5/s after a burst of --announce-burst=2" in r4.refused
    now[0] += 2.0  # ... and one token is back 2 s later (0.5/s)
    with gate.stream("SyncNode", a, announce=True) as r5:
        assert r5.refused is None
    assert gate.refused == {"max_streams_per_identity": 1, "announce_rate": 1}
    # Plaintext peers count against their host, with the host limits.
    p = [FakeContext(f"ipv4:10.0.0.9:{port}") for port in range(4)]
    with (gate.stream("WatchTopology", p[0]), gate.stream("WatchTopology", p[1]), gate.stream("WatchRecords", p[2]),
          gate.stream("WatchTopology", p[3]) as r6):  # fmt: skip
        assert r6.refused == "WatchTopology of host 10.0.0.9: 3 streams open, the limit --max-streams-per-host=3"


def test_streams_and_announcements_over_their_limits_are_refused_on_the_wire() -> None:
    """Plaintext on 127.0.0.1: one host. Three streams open, the fourth is refused; a burst of two
    announcements with no refill, the third is refused. Both RESOURCE_EXHAUSTED naming the flag."""
    limits = bounds.Limits(max_streams_per_host=3, host_announce_burst=2, host_announce_rate=0.001)

    async def body() -> None:
        async with serving(limits) as (refl, target):
            async with grpc.aio.insecure_channel(target) as ch:
                stub = pb_grpc.FabricStub(ch)
                watches = [stub.WatchTopology(pb.WatchTopologyRequest()) for _ in range(3)]
                for w in watches:
                    assert (await w.read()).kind == pb.WatchTopologyResponse.KIND_SNAPSHOT
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.WatchTopology(pb.WatchTopologyRequest()).read()
                assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "3 streams open, the limit --max-streams-per-host=3" in (exc.value.details() or "")
                for w in watches:
                    w.cancel()
                await wait_until_async(lambda: refl.gate.streams("host 127.0.0.1") == 0, 5, "all released")
            agents = [RawAgent(target, ann) for ann in (E1, E2)]
            await wait_until_async(lambda: all(session_of(refl, k) for k in ("east/e1", "east/e2")), 5, "two in")
            third = RawAgent(target, W1, keepalives=False)
            code, details = await asyncio.wait_for(third.status(), 5)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert "announcing too often, over the limit --host-announce-rate=0.001/s" in details, details
            assert session_of(refl, "west/w1") is None
            assert refl.gate.refused == {"max_streams_per_host": 1, "host_announce_rate": 1}
            for a in (*agents, third):
                await a.close()

    run(body())


# -- message sizes ------------------------------------------------------------------------------


def test_an_oversize_message_is_refused_and_others_go_on() -> None:
    async def body() -> None:
        async with serving(bounds.Limits(max_receive_message_bytes=64 * 1024)) as (refl, target):
            ok = RawAgent(target, E1)
            await wait_until_async(lambda: session_of(refl, "east/e1") is not None, 5, "e1 connected")
            big = dataclasses.replace(E2, pod_cidrs=tuple(f"10.10.{i // 256}.{i % 256}/32" for i in range(8000)))
            huge = RawAgent(target, big, keepalives=False)
            code, details = await asyncio.wait_for(huge.status(), 5)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert "65536" in details  # gRPC's own text: received ... vs. 65536
            assert session_of(refl, "east/e2") is None
            s = session_of(refl, "east/e1")
            assert s is not None and not s.closed
            await ok.close()
            await huge.close()

    run(body())


def test_client_channel_options_mirror_the_reflector_bounds() -> None:
    opts = dict(client.CHANNEL_OPTIONS)
    lim = bounds.Limits()
    assert opts["grpc.max_receive_message_length"] == lim.max_send_message_bytes
    assert opts["grpc.max_send_message_length"] == lim.max_receive_message_bytes
    assert dict(bounds.server_options(lim)) == {
        "grpc.server.max_pending_requests": lim.max_pending_streams,
        "grpc.server.max_pending_requests_hard_limit": lim.max_pending_streams,
        "grpc.max_receive_message_length": lim.max_receive_message_bytes,
        "grpc.max_send_message_length": lim.max_send_message_bytes,
    }
    # The servers that hold agent streams take the bounds and a keepalive the client's pings fit.
    served = dict(reflector_service.server_options(dataclasses.replace(lim, max_pending_streams=7)))
    assert served["grpc.server.max_pending_requests"] == 7
    assert served["grpc.http2.min_ping_interval_without_data_ms"] <= opts["grpc.keepalive_time_ms"]


# -- flags and metrics ---------------------------------------------------------------------------


def test_every_limit_has_a_flag_and_a_metric(tmp_path: Any) -> None:
    cfg = tmp_path / "fabric.yaml"
    cfg.write_text("clusters:\n  - {name: east, mode: p2p, pod_cidrs: [10.10.0.0/16]}\n")
    args = reflector_cli.parse_args(["--config", str(cfg), "--send-queue-bytes", "1000", "--announce-rate", "0.5",
                                     "--keepalive-min-s", "0.25"])  # fmt: skip
    assert args.limits == bounds.Limits(send_queue_bytes=1000, announce_rate=0.5, keepalive_min_s=0.25)
    assert set(reflector_cli._LIMIT_HELP) == {f.name for f in dataclasses.fields(bounds.Limits)}
    with pytest.raises(SystemExit):
        reflector_cli.parse_args(["--config", str(cfg), "--max-streams-per-identity", "0"])
    refl = reflector.Reflector(CONFIG, limits=args.limits)
    registry = CollectorRegistry()
    registry.register(refl.collector())
    text = generate_latest(registry).decode()
    assert 'fabric_reflector_limit{limit="send_queue_bytes"} 1000.0' in text
    assert 'fabric_reflector_limit{limit="keepalive_max_s"} 60.0' in text
    for line in ('fabric_reflector_send_queue_bytes{stream="sync_node"} 0.0',
                 'fabric_reflector_send_queue_max_bytes{stream="watch_records"} 0.0',
                 'fabric_reflector_streams_cut_total{stream="watch_topology"} 0.0',
                 'fabric_reflector_refused_by_limit_total{limit="announce_rate"} 0.0'):  # fmt: skip
        assert line in text


# -- WatchTopology and WatchRecords queues --------------------------------------------------------


def test_send_queue_bounds_what_follows_the_snapshot_and_takes_one_message_when_empty() -> None:
    q: bounds.SendQueue[str] = bounds.SendQueue(100)
    assert q.put("snapshot", 10_000, bounded=False)  # a snapshot of any size
    assert q.put("big delta", 500)  # more than the limit, but nothing bounded is queued yet
    assert not q.put("next", 1)  # now over: the owner cuts the stream off
    assert (q.bytes, q.bounded_bytes, q.high_water) == (10_500, 500, 10_500)
    assert q.get_nowait() == "snapshot" and q.get_nowait() == "big delta"
    assert q.put("small", 60) and q.put("small", 40) and not q.put("small", 1)
    q.clear()
    assert (q.bytes, q.bounded_bytes, q.qsize()) == (0, 0, 0)


def test_topology_watcher_that_reads_nothing_is_cut_off() -> None:
    async def body() -> None:
        async with serving(bounds.Limits(send_queue_bytes=4096)) as (refl, target):
            options = [*client.CHANNEL_OPTIONS, ("grpc.http2.bdp_probe", 0)]
            async with grpc.aio.insecure_channel(target, options=options) as ch:
                call = pb_grpc.FabricStub(ch).WatchTopology(pb.WatchTopologyRequest())
                await wait_until_async(lambda: len(refl._watchers) == 1, 5, "the watcher is open")
                churn = [types.NodeAnnouncement("west", "w9", "198.18.0.29", (f"10.20.{9 + i}.0/24",)) for i in (0, 1)]
                i = 0
                while refl.gate.cut.get("watch_topology", 0) == 0:
                    i += 1
                    assert i <= 20_000, "20,000 topology changes and the watcher was never cut off"
                    fake = reflector._Session(churn[i % 2].key, "churn", refl.clock())
                    assert refl._admit(churn[i % 2], fake) is None
                    refl._flush()
                    await asyncio.sleep(0)
                assert not refl._watchers  # it gets nothing more
                code, details = grpc.StatusCode.OK, ""
                try:
                    while (await call.read()) is not grpc.aio.EOF:
                        pass
                    code, details = await call.code(), await call.details()
                except grpc.aio.AioRpcError as e:
                    code, details = e.code(), e.details() or ""
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "topology watch of 127.0.0.1" in details and "--send-queue-bytes=4096" in details

    run(body(), timeout=120)


def test_records_subscriber_snapshot_does_not_count_against_its_queue_bound() -> None:
    """A subscriber whose snapshot (far above its queue bound) is still queued gets the next
    delta: the bound is on what follows the snapshot (the snapshot is bounded by the store)."""
    limits = record_store.RecordLimits(max_subscriber_queue_bytes=1024)

    async def body() -> None:
        store = record_store.RecordStore(epoch="e", limits=limits)
        session, _ = store.open("tree/root-a", "peer")
        for i in range(20):
            store.put(session, "k.io/x", f"r{i}", 1, b"x" * 500)
        sub = store.subscribe("k.io/x", "", "sub")
        assert sub.queued_bytes > 10_000
        store.put(session, "k.io/x", "more", 1, b"y" * 100)
        assert not sub.ending.event.is_set() and store.subscribers_cut == 0
        store.put(session, "k.io/x", "big", 1, b"z" * 2000)  # now deltas are queued: over the bound
        assert sub.ending.code == grpc.StatusCode.RESOURCE_EXHAUSTED and store.subscribers_cut == 1
        assert sub.queued_bytes == 0  # its memory went at once

    run(body())


# -- a cut-off stream's slot, and the log of refusals -------------------------------------------------


def test_a_cut_off_session_gives_its_slot_back_though_its_client_never_reads() -> None:
    """E2 announces and reads nothing; churn cuts it off. Its handler stays blocked in a write
    that E2 never reads, yet its slot is given back at once: the same key (plaintext: the host)
    opens new sessions up to the limit of 2 (before, the cut one kept one of the two until E2
    read), and one more is refused. The cut stream still lingers, counted apart."""
    limits = bounds.Limits(send_queue_bytes=4096, max_streams_per_host=2)
    key = "host 127.0.0.1"

    async def body() -> None:
        async with serving(limits, keepalive=1.0) as (refl, target):
            slow = RawAgent(target, E2, propose=1.0)
            await wait_until_async(lambda: session_of(refl, "east/e2") is not None, 5, "e2 connected")
            cut = session_of(refl, "east/e2")
            assert cut is not None and refl.gate.streams(key) == 1
            churn = [types.NodeAnnouncement("west", "w9", "198.18.0.29", (f"10.20.{9 + i}.0/24",)) for i in (0, 1)]
            i = 0
            while not cut.closed:
                i += 1
                assert i <= 20_000, "20,000 topology changes and e2 was never cut off"
                assert refl._admit(churn[i % 2], reflector._Session(churn[i % 2].key, "churn", refl.clock())) is None
                refl._flush()
                # Paced so that the handler writes all it can: the queue grows (to the cut) only
                # once gRPC takes no more, E2's HTTP/2 window being full (the handler blocked).
                await asyncio.sleep(0.002)
            assert refl.gate.cut == {"sync_node": 1}
            await asyncio.sleep(0.1)
            assert cut.queue.qsize() == 1, "the handler is blocked in a write: its end marker is still queued"
            assert (refl.gate.streams(key), refl.gate.lingering(key)) == (0, 1)
            others = [RawAgent(target, ann) for ann in (E1, W1)]
            await wait_until_async(lambda: all(session_of(refl, k) for k in ("east/e1", "west/w1")), 5,
                                   "two new sessions of the same host")  # fmt: skip
            assert (refl.gate.streams(key), refl.gate.lingering(key)) == (2, 1)
            over = RawAgent(target, types.NodeAnnouncement("west", "w2", "198.18.0.22", ("10.20.2.0/24",)),
                            keepalives=False)  # fmt: skip
            code, details = await asyncio.wait_for(over.status(), 5)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert "2 streams open, the limit --max-streams-per-host=2" in details, details
            # E2 reads at last: it finds its end, and its lingering stream is gone.
            code, details = await asyncio.wait_for(slow.status(), 10)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--send-queue-bytes=4096" in details
            await wait_until_async(lambda: refl.gate.lingering(key) == 0, 5, "the cut stream's handler ended")
            assert refl.gate.streams(key) == 2
            for a in (slow, *others, over):
                await a.close()

    run(body(), timeout=120)


def test_lingering_streams_of_a_key_are_bounded_by_its_limit() -> None:
    """A client that never reads and reconnects after every cut: its cut streams linger (a handler
    blocked in a write), and are bounded by the same limit, so it holds at most twice its limit."""
    gate = bounds.StreamGate(bounds.Limits(max_streams_per_identity=2))
    ctx = FakeContext("ipv4:10.0.0.1:5000", "node/east/e1")
    key = "node/east/e1"
    q: bounds.SendQueue[str] = bounds.SendQueue(10)
    with gate.stream("SyncNode", ctx) as s1, gate.stream("SyncNode", ctx) as s2:
        for s in (s1, s2):
            q.slot = s
            q.put("a delta", 10)
            assert not q.put("one too many", 1)
            q.cut()  # what the owner of the queue does when put refuses
            assert q.qsize() == 0
            q.cut()  # twice: the slot moves once
        assert (gate.streams(key), gate.lingering(key)) == (0, 2)
        with gate.stream("SyncNode", ctx) as s3:
            assert s3.refused == ("SyncNode of node/east/e1: 2 streams cut off for falling behind and not ended yet "
                                  "(their client reads nothing), the limit --max-streams-per-identity=2")  # fmt: skip
        s1.release()  # its handler ended: a lingering place is free again
        assert gate.lingering(key) == 1
        with gate.stream("SyncNode", ctx) as s4:
            assert s4.refused is None and gate.streams(key) == 1
    assert (gate.streams(key), gate.lingering(key)) == (0, 0)  # each slot released once, none twice


def test_stream_gate_logs_each_refusal_once_and_forgets_past_its_bound(caplog: pytest.LogCaptureFixture) -> None:
    """Refusals are logged once per key and limit; the set of logged keys is bounded (before,
    every key ever refused stayed in it: identities a leaked bootstrap credential can have
    signed without end)."""
    gate = bounds.StreamGate(bounds.Limits(max_streams_per_identity=1), log_once=100)
    caplog.set_level("WARNING", logger="fabric.control.bounds")
    for i in range(1000):
        ctx = FakeContext("ipv4:10.0.0.1:5000", f"node/east/n{i}")
        with gate.stream("SyncNode", ctx) as s, gate.stream("SyncNode", ctx) as refused, \
                gate.stream("SyncNode", ctx) as again:  # fmt: skip
            assert s.refused is None and refused.refused is not None and again.refused is not None
        assert len(gate._logged) <= 100
    assert gate.refused == {"max_streams_per_identity": 2000}
    logged = [r for r in caplog.records if r.getMessage().startswith("refused SyncNode of node/east/n")]
    assert len(logged) == 1000  # each key once (the second refusal of a key is only counted)
    assert len({r.getMessage() for r in logged}) == 1000


def test_chunks_keep_order_and_stay_under_the_limit_an_oversized_item_alone() -> None:
    sized = [("a", 3), ("b", 4), ("c", 9), ("d", 12), ("e", 1), ("f", 1)]
    got = list(bounds.chunks(sized, 10))
    assert got == [["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert [x for chunk in got for x in chunk] == [x for x, _ in sized]
    assert list(bounds.chunks([], 10)) == []
